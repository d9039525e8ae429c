"""Metric writing (TensorBoard with or without TensorFlow), image grids and a console progress line.

``clu.metric_writers`` imports TensorFlow; GPU hosts often lack it. :func:`create_writer`
uses clu's default writer when TensorFlow is importable and otherwise a tensorboardX
writer with the same methods, so training runs the same on both kinds of host. Only
process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image

log = logging.getLogger("ldm_jax")


class _NullWriter:
    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...
    def write_images(self, step: int, images: Mapping[str, Any]) -> None: ...
    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorboardXWriter(_NullWriter):
    """TensorBoard event files through tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._w = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, float(v), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for k, v in images.items():
            arr = np.asarray(v)
            if arr.ndim == 3:
                arr = arr[None]
            self._w.add_images(k, arr, global_step=int(step), dataformats="NHWC")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))
        self._w.add_text("hparams", text, global_step=0)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def _keep_tensorflow_off_accelerators() -> None:
    """Hide the GPUs from TensorFlow (ImportError when it is not installed). clu's writers
    write event files through TensorFlow, which would otherwise claim every GPU's memory,
    beside JAX's, when its first op runs; it needs only the CPU for that. Must run before
    TensorFlow initialises its devices; when something already did, say so and go on."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        log.warning("TensorFlow's devices were initialised before the metric writer hid the GPUs "
                    "from it (%s); it may hold GPU memory beside JAX", e)


def create_writer(logdir: str, *, is_main: bool, backend: str = "auto"):
    """A writer with write_scalars/write_images/write_hparams/flush/close.

    backend: "auto" (clu if TensorFlow imports, else tensorboardX), "clu" or "tensorboardx".
    """
    if not is_main:
        return _NullWriter()
    os.makedirs(logdir, exist_ok=True)
    if backend in ("auto", "clu"):
        try:
            _keep_tensorflow_off_accelerators()
            from clu import metric_writers  # imports TensorFlow

            return metric_writers.SummaryWriter(logdir)
        except ImportError as e:
            if backend == "clu":
                raise ImportError(
                    "config asked for clu metric writers, which need TensorFlow: "
                    "pip install 'ldm-jax[tf]'"
                ) from e
    return TensorboardXWriter(logdir)


def to_uint8(images: Any) -> np.ndarray:
    """[-1, 1] floats -> uint8."""
    x = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stack rows of equally sized uint8 images [N,H,W,3] into one grid image."""
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for r, row in enumerate(rows):
        for i in range(n):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = row[i]
    return grid


def square_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 images [N,H,W,C] in a near-square grid (ceil(sqrt N) columns), row by row;
    the last row is padded with white."""
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise ValueError(f"square_grid needs images [N,H,W,C] with N >= 1, got shape {images.shape}")
    cols = int(math.ceil(math.sqrt(len(images))))
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    if len(rows[-1]) < cols:
        fill = np.full((cols - len(rows[-1]), *images.shape[1:]), 255, images.dtype)
        rows[-1] = np.concatenate([rows[-1], fill])
    return image_grid(rows, pad=pad)


def save_png(path: str, image: np.ndarray) -> None:
    """Write atomically (tmp file + rename) so a killed run never leaves a broken PNG."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """One console line per report: step/total, bar, loss, img/s, ETA."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True,
                 stream=None):
        self.total = total_steps
        self.batch = batch_size
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._t = time.perf_counter()
        self._step = start_step

    def update(self, step: int, scalars: Mapping[str, float]) -> float:
        """Print a progress line; returns images/s since the previous report."""
        now = time.perf_counter()
        dt, ds = now - self._t, step - self._step
        self._t, self._step = now, step
        ips = ds * self.batch / dt if dt > 0 and ds > 0 else 0.0
        if self.enabled:
            frac = step / max(self.total, 1)
            bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
            eta = (self.total - step) * dt / ds if ds > 0 else 0.0
            parts = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            print(f"[{bar}] step {step}/{self.total} | {parts} | {ips:.1f} img/s | "
                  f"ETA {_fmt_time(eta)}", file=self.stream, flush=True)
        return ips
