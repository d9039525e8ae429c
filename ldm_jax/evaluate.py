"""Evaluate a trained or converted KL autoencoder on held-out images.

(An LDM training workdir given to the same command is scored on its samples instead: FID,
Inception Score, precision / recall against a reference set; ``ldm_jax.evaluate_generation``.)

    python -m ldm_jax.evaluate --workdir=PATH --data=SPEC [--num_images N] [--batch B]
        [--resolution R] [--full_size] [--out DIR] [--no_lpips] [--no_fid] ...

``PATH`` is a VAE-GAN training workdir (its latest checkpoint) or a converted pretrained
directory (``ldm_jax.pretrained.load_autoencoder``). ``SPEC`` names the images:

* ``embedded`` — the two held-out photographs shipped with scikit-image (a smoke test);
* ``folder:/path`` — every image under ``/path`` (recursive); ``folder:/path:eval`` only
  its hash-based held-out split (the default when ``/path`` is the folder the workdir was
  trained on, so training images are never scored); ``folder:/path:all`` forces all;
* ``tfds:name[:split]`` — a TFDS dataset prepared as ArrayRecord (split default
  ``validation``), e.g. ``tfds:imagenet2012:validation``.

Per image the posterior *mode* is decoded, clipped to [-1, 1] and rounded to 8 bits (as if
saved to PNG); then PSNR, SSIM, MS-SSIM (``ldm_jax.metrics``), L1, LPIPS
(``ldm_jax.models.lpips``) are computed against the original, and rFID between the
Inception features of originals and reconstructions (``ldm_jax.fid``).

Two settings:

* model resolution (always): shorter side resized to ``R`` (default: the model's training
  resolution) and center-cropped to ``R x R``, like the trainer's eval. Batches are
  sharded over all devices (``sharding.make_mesh``/``global_batch``); the last partial
  batch is padded and the pad results dropped, so every image counts exactly once.
* ``--full_size``: each image at its own size (only images smaller than ``R`` are
  upscaled). It is padded at the bottom/right by reflection to a multiple of ``--bucket``
  pixels (default 64; images of similar size then share one compiled shape), encoded
  whole, decoded in overlapping latent tiles with ``ldm_jax.tiling.decode_tiled``
  (``--tile 0``: whole-image decoding) and cropped back. PSNR/SSIM/MS-SSIM are exact on
  the crop (``metrics.region_metrics``); LPIPS averages its distance maps over the image
  area of the padded pair (the padding can slightly touch features at the bottom/right
  border); Inception sees the crop resized to 299 as in pytorch-fid. This pass runs image
  by image on every local device at once (``--full_size_devices`` to use fewer), one image
  per device, and each device compiles once per padded size (on GPUs with the persistent
  compilation cache, the first device to meet a size compiles and the others load).
  Whole-image encoding holds the encoder's mid attention over all (H/f)·(W/f) latent
  positions, so memory grows with the square of the image area: fine for ImageNet-sized
  photos with a KL-f8 model, not for multi-megapixel images.

Outputs in ``--out`` (default ``PATH/eval/<data>``): ``metrics.json`` (every metric, image
counts, skipped files, model description, resolution, versions, warnings),
``per_image.csv`` and ``recon_best_worst.png`` (rows: the ``k`` best originals, their
reconstructions, the ``k`` worst originals, their reconstructions, by PSNR or LPIPS).

MS-SSIM needs at least 176 px (5 scales of an 11 px window); at smaller resolutions it is
reported as null with the reason. FID needs the FID Inception weights
(``ldm_jax.convert.inception_weights``) and LPIPS its VGG/heads weights; if either is
missing the command stops with instructions unless ``--no_fid`` / ``--no_lpips``.
FID on few images is biased upwards (see ``ldm_jax.fid.small_sample_warning``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import sys
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import ldm_jax
from ldm_jax import config_lib, metrics, sharding
from ldm_jax import metric_writers as mw
from ldm_jax.convert.inception_weights import InceptionWeightsMissingError
from ldm_jax.data import sources as sources_lib
from ldm_jax.data import transforms as tf_lib
from ldm_jax.fid import (FeatureStats, fid_of_samples, frechet_distance_or_eigh, inception_features,
                         small_sample_warning)
from ldm_jax.models import inception as inception_lib
from ldm_jax.models import lpips as lpips_lib
from ldm_jax.weights_cache import save_json_atomic

try:  # tiled decoding (overlapping latent tiles, blended); whole-image decoding without it
    from ldm_jax.tiling import decode_tiled
except ImportError:  # pragma: no cover
    decode_tiled = None

__all__ = ["evaluate_autoencoder", "parse_data_spec", "fid_of_samples", "inception_features",
           "main"]

log = logging.getLogger(__name__)

LPIPS_MODES = ("pretrained", "random", "none")
RANK_BY = ("psnr", "lpips")
_METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "l1")


# ----------------------------------------------------------------------------- data


def _training_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _split_top_level(text: str) -> list[str]:
    """Split on ':' outside brackets (tfds split slices such as ``validation[:1000]``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == ":" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_data_spec(spec: str, train_cfg: dict | None = None,
                    tfds_data_dir: str = "") -> tuple[ml_collections.ConfigDict, str, str]:
    """``SPEC`` -> ``(data config of the trainer's schema, mode, description)``.

    ``mode`` is ``'eval'`` (the source's held-out split) or ``'all'`` (folder: every image).
    Fields the training config (``train_cfg``, a workdir's config.json) set for the same
    dataset — tfds_data_dir, image_key, eval_holdout — are inherited.
    """
    data = config_lib.vae_base_config().data
    data.random_crop = False
    data.random_flip = False
    tdata = dict((train_cfg or {}).get("data", {}) or {})
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "embedded" and not rest:
        data.source = "embedded"
        return data, "eval", "embedded (scikit-image held-out photos)"
    if kind == "folder":
        path, mode = rest, ""
        m = re.match(r"^(.*):(eval|all)$", rest)
        if m:
            path, mode = m.group(1), m.group(2)
        if not path:
            raise ValueError(f"--data={spec!r}: give a folder, e.g. folder:/data/val_images")
        path = os.path.abspath(os.path.expanduser(path))
        same = tdata.get("source") == "folder" and tdata.get("path") and \
            os.path.abspath(os.path.expanduser(tdata["path"])) == path
        if not mode:
            mode = "eval" if same else "all"
        data.source = "folder"
        data.path = path
        if same and "eval_holdout" in tdata:
            data.eval_holdout = float(tdata["eval_holdout"])
        what = ("held-out split (eval_holdout=%g) of" % data.eval_holdout if mode == "eval"
                else "all images in")
        return data, mode, f"folder: {what} {path}"
    if kind == "tfds":
        parts = _split_top_level(rest)
        if not parts[0]:
            raise ValueError(f"--data={spec!r}: give a dataset, e.g. tfds:imagenet2012:validation")
        name, split = parts[0], "validation"
        tail = parts[1:]
        if tail and re.fullmatch(r"\d+(\.\d+)*", tail[0]):  # name:version
            name = f"{name}:{tail.pop(0)}"
        if len(tail) > 1:
            raise ValueError(f"--data={spec!r}: expected tfds:name[:version][:split]")
        if tail and tail[0]:
            split = tail[0]
        data.source = "tfds"
        data.tfds_name = name
        data.eval_split = split
        if tdata.get("source") == "tfds" and tdata.get("tfds_name") == name:
            data.tfds_data_dir = tdata.get("tfds_data_dir", "") or ""
            data.image_key = tdata.get("image_key", "image") or "image"
        if tfds_data_dir:
            data.tfds_data_dir = tfds_data_dir
        return data, "eval", f"tfds {name} [{split}]"
    raise ValueError(
        f"--data={spec!r} is not a data spec; use 'embedded', 'folder:/path[:eval|:all]' or "
        "'tfds:name[:split]'")


def _open_source(data_cfg, mode: str):
    if data_cfg.source == "folder" and mode == "all":
        root = data_cfg.path
        files = sources_lib.image_files_under(root, "--data folder")
        return sources_lib.FileListSource(root, files, uid=f"folder:all:{root}")
    return sources_lib.make_source(data_cfg, "eval")


class _Reader:
    """Decodes images of one process's key range (threaded, in order); ``None`` = skipped."""

    def __init__(self, source, keys: range, resolution: int, full_size: bool):
        self.source = source
        self.full_size = full_size
        shard = (keys.start, keys.stop) if len(keys) else (0, 1)
        self.decode = tf_lib.DecodeImage(source, resolution, -1 if full_size else 0, shard)
        self.crop = tf_lib.CenterCrop(resolution)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    def _one(self, key: int) -> np.ndarray | None:
        el = self.decode.map(self.source[key])
        if el is None:
            return None
        if self.full_size:
            return np.asarray(el["image"], np.float32) / np.float32(127.5) - np.float32(1.0)
        return self.crop.map(el)["image"]

    def submit(self, keys) -> list[concurrent.futures.Future]:
        return [self.pool.submit(self._one, int(k)) for k in keys]

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _read_batches(reader: _Reader, keys: range, lb: int, num_batches: int, resolution: int):
    """``num_batches`` (the same on every process) of ``(keys, images [lb, R, R, 3], valid)``
    from ``reader``, the next batch decoding while the caller works on this one; rows past
    the end of ``keys`` and unreadable images are zeros with ``valid`` False."""
    pending = reader.submit(keys[0:lb])
    for b in range(num_batches):
        these = list(keys[b * lb:(b + 1) * lb])
        images = [f.result() for f in pending]
        nxt = keys[(b + 1) * lb:(b + 2) * lb]
        pending = reader.submit(nxt) if len(nxt) else []
        valid = np.array([im is not None for im in images] + [False] * (lb - len(images)))
        x = np.zeros((lb, resolution, resolution, 3), np.float32)
        for i, im in enumerate(images):
            if im is not None:
                x[i] = im
        yield these, x, valid


# ----------------------------------------------------------------------------- helpers


def _q8(x: jax.Array) -> jax.Array:
    """Clip to [-1, 1] and round to the 256 levels of an 8-bit image."""
    x = jnp.clip(x.astype(jnp.float32), -1.0, 1.0)
    return jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0


def _lpips_region(lp: lpips_lib.LPIPS, x: jax.Array, y: jax.Array, h: jax.Array,
                  w: jax.Array) -> jax.Array:
    """LPIPS whose per-layer spatial means run over the top-left ``h x w`` image area only
    (layer k has been max-pooled k times, so its area is ``(h >> k) x (w >> k)``)."""
    b = x.shape[0]
    shift = jnp.asarray(lpips_lib._SHIFT, jnp.float32)
    scale = jnp.asarray(lpips_lib._SCALE, jnp.float32)
    xy = jnp.concatenate([x.astype(jnp.float32), y.astype(jnp.float32)], axis=0)
    feats = lp.vgg((xy - shift) / scale)
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
        f = lpips_lib._unit_normalize(f.astype(jnp.float32))
        d = getattr(lp, f"lin{k}")(jnp.square(f[:b] - f[b:]))[..., None]  # [B, H, W, 1]
        total = total + metrics._masked_mean_hw(d, h >> k, w >> k)[:, 0]
    return total


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("ldm-jax", "jax", "jaxlib", "flax", "numpy", "scipy", "dm-pix", "grain"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _to_local(tree: Any, mesh) -> Any:
    """Host-local NumPy parts of batch-sharded global arrays (this process's rows)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils
    local = multihost_utils.global_array_to_host_local_array(tree, mesh, P(sharding.BATCH_AXES))
    return jax.tree.map(np.asarray, local)


def _allgather(tree: Any) -> Any:
    """Stack equally shaped per-process NumPy trees along a new leading process axis."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda a: np.asarray(a)[None], tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))


def _gather_stats(stats: FeatureStats, dim: int) -> FeatureStats:
    arrays = stats.to_arrays()
    if arrays["mean"].shape != (dim,):
        arrays = {"n": arrays["n"], "mean": np.zeros(dim), "m2": np.zeros((dim, dim))}
    g = _allgather(arrays)
    out = FeatureStats(dim)
    for p in range(g["n"].shape[0]):
        out.merge(FeatureStats.from_arrays(g["n"][p], g["mean"][p], g["m2"][p]))
    return out


class _Extremes:
    """The ``k`` best and ``k`` worst images seen so far (with their pixels)."""

    def __init__(self, k: int, higher_is_better: bool, shape: tuple[int, ...]):
        self.k, self.sign, self.shape = k, (1.0 if higher_is_better else -1.0), shape
        self.items: list[tuple[float, int, np.ndarray, np.ndarray]] = []

    def add(self, scores, keys, originals, recons) -> None:
        for s, key, o, r in zip(scores, keys, originals, recons):
            if np.isfinite(s):
                self.items.append((float(s) * self.sign, int(key), mw.to_uint8(o), mw.to_uint8(r)))
        if len(self.items) > 4 * self.k:
            self._trim()

    def _trim(self) -> None:
        self.items.sort(key=lambda t: (t[0], t[1]))
        if len(self.items) > 2 * self.k:
            self.items = self.items[:self.k] + self.items[-self.k:]

    def gathered(self) -> list[tuple[float, int, np.ndarray, np.ndarray]]:
        """All processes' candidates (an all-gather with fixed shapes)."""
        self._trim()
        n = 2 * self.k
        score = np.full((n,), np.nan)
        key = np.full((n,), -1, np.int64)
        imgs = np.zeros((n, 2) + self.shape, np.uint8)
        for i, (s, kk, o, r) in enumerate(self.items[:n]):
            score[i], key[i], imgs[i, 0], imgs[i, 1] = s, kk, o, r
        g = _allgather({"score": score, "key": key, "imgs": imgs})
        out = []
        for p in range(g["score"].shape[0]):
            for i in range(n):
                if np.isfinite(g["score"][p, i]):
                    out.append((float(g["score"][p, i]), int(g["key"][p, i]),
                                g["imgs"][p, i, 0], g["imgs"][p, i, 1]))
        out.sort(key=lambda t: (t[0], t[1]))
        return out


def _summary(values: dict[str, np.ndarray]) -> dict:
    """Means (and std / count) of the per-image metrics; NaN entries are left out."""
    out = {}
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        ok = v[np.isfinite(v)]
        out[name] = float(ok.mean()) if ok.size else None
        out[f"{name}_std"] = float(ok.std()) if ok.size else None
        out[f"{name}_count"] = int(ok.size)
    return out


# ----------------------------------------------------------------------------- passes


def _model_resolution_pass(*, ae_gd, ae_st, lp_gd, lp_st, inc_gd, inc_st, reader_factory,
                           n: int, batch_size: int, mesh, with_ms_ssim: bool,
                           extremes: _Extremes, rank_by: str, resolution: int):
    count, index = jax.process_count(), jax.process_index()
    per = math.ceil(n / count)
    keys = range(min(index * per, n), min((index + 1) * per, n))
    lb = batch_size // count
    num_batches = max(1, math.ceil(per / lb))
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)

    def step(ae_st, lp_st, inc_st, x):
        ae = nnx.merge(ae_gd, ae_st)
        ae.eval()
        r = _q8(ae.decode(ae.encode(x).mode()))
        out = {"psnr": metrics.psnr(x, r), "ssim": metrics.ssim(x, r),
               "l1": jnp.mean(jnp.abs(x - r), axis=(1, 2, 3)), "recon": r}
        if with_ms_ssim:
            out["ms_ssim"] = metrics.ms_ssim(x, r)
        if lp_gd is not None:
            out["lpips"] = nnx.merge(lp_gd, lp_st)(x, r)
        if inc_gd is not None:
            feats = nnx.merge(inc_gd, inc_st)(jnp.concatenate([x, r], axis=0))
            out["feat_real"], out["feat_recon"] = feats[:x.shape[0]], feats[x.shape[0]:]
        return out

    step_fn = jax.jit(step, in_shardings=(rep, rep if lp_gd is not None else None,
                                          rep if inc_gd is not None else None, batch_sh),
                      out_shardings=batch_sh)  # every output is per image
    reader = reader_factory(keys, full_size=False)
    local = {m: [] for m in _METRICS}
    local_keys, stats_real, stats_recon = [], FeatureStats(), FeatureStats()
    try:
        for these, x, valid in _read_batches(reader, keys, lb, num_batches, resolution):
            gb = sharding.global_batch({"image": x}, batch_sh)["image"]
            out = _to_local(step_fn(ae_st, lp_st, inc_st, gb), mesh)
            kk = np.asarray(these + [-1] * (lb - len(these)), np.int64)
            local_keys.append(np.where(valid, kk, -1))
            for m in _METRICS:
                v = out.get(m)
                local[m].append(np.where(valid, v, np.nan) if v is not None
                                else np.full((lb,), np.nan))
            if inc_gd is not None:
                stats_real.update(out["feat_real"][valid])
                stats_recon.update(out["feat_recon"][valid])
            score = out["psnr"] if rank_by == "psnr" else out.get("lpips", out["psnr"])
            extremes.add(np.where(valid, score, np.nan)[valid], kk[valid], x[valid],
                         out["recon"][valid])
    finally:
        reader.close()
    return ({m: np.concatenate(v) for m, v in local.items()}, np.concatenate(local_keys),
            stats_real, stats_recon)


def _on_device(tree: Any, device) -> Any:
    """A copy of replicated arrays on one local ``device``. A replicated array of a
    multi-process mesh is not fully addressable, so its local copy is moved, not the array."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError("internal error: the full-size pass needs replicated model states")
            x = x.addressable_data(0)
        return jax.device_put(x, device)

    return None if tree is None else jax.tree.map(one, tree)


def _compiles_shared_across_devices() -> bool:
    """Whether a program compiled for one local device is a persistent-cache hit on another:
    on GPUs JAX leaves the device assignment out of the cache key (jax._src.cache_key), so
    with the cache on, the same program on a second GPU loads instead of compiling. On CPUs
    and TPUs the key names the devices."""
    return jax.default_backend() == "gpu" and bool(jax.config.jax_compilation_cache_dir)


class _FirstOfEachSize:
    """``with gate(size):`` around a worker's device work on one image. Enabled, the first
    image of each size runs alone: workers that meet the same size meanwhile wait for it,
    then load the programs it compiled from the persistent cache
    (``_compiles_shared_across_devices``) instead of all compiling the same programs at
    once. A size whose first image failed stays unmarked: the next worker to meet it takes
    the turn. Disabled (or once a size is done), it does nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._done: set = set()
        self._locks: dict = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, size):
        if not self.enabled or size in self._done:
            yield
            return
        with self._guard:
            lock = self._locks.setdefault(size, threading.Lock())
        with lock:
            yield
            self._done.add(size)


def _full_size_pass(*, ae_gd, ae_st, lp_gd, lp_st, inc_gd, inc_st, reader_factory, n: int,
                    factor: int, bucket: int, tile: int, overlap: int, inc_batch: int,
                    devices: int = 0):
    """Every image of this process's key range at its own size, image by image, on
    ``devices`` local devices (0: all) at once: one worker thread per device takes every
    ``k``-th image (each device runs its own programs, compiled once per padded size; on
    GPUs with the persistent compilation cache, compiled once and loaded on the other
    devices: ``_FirstOfEachSize``). Per-image metrics do not depend on the device count; the
    Inception features of all workers are batched on the first device."""
    count, index = jax.process_count(), jax.process_index()
    per = math.ceil(n / count)
    keys = range(min(index * per, n), min((index + 1) * per, n))
    local_devs = jax.local_devices()  # devices >= 0: checked by evaluate_autoencoder
    devs = local_devs[:min(devices or len(local_devs), len(local_devs), max(1, len(keys)))]
    multiple = math.lcm(max(1, bucket), factor)
    first_of_size = _FirstOfEachSize(len(devs) > 1 and _compiles_shared_across_devices())

    @jax.jit
    def encode(st, x):
        ae = nnx.merge(ae_gd, st)
        ae.eval()
        return ae.encode(x).mode()

    @jax.jit
    def decode(st, z):
        ae = nnx.merge(ae_gd, st)
        ae.eval()
        return ae.decode(z).astype(jnp.float32)

    @jax.jit
    def region(lp_st, x, r, hw):
        out = metrics.region_metrics(x, r, hw[:, 0], hw[:, 1])
        if lp_gd is not None:
            out["lpips"] = _lpips_region(nnx.merge(lp_gd, lp_st), x, r, hw[:, 0], hw[:, 1])
        return out

    feat_fn = None
    if inc_gd is not None:
        feat_fn = jax.jit(lambda st, x: nnx.merge(inc_gd, st)(x))
        inc_st = _on_device(inc_st, devs[0])

    local = {m: np.full((per,), np.nan) for m in _METRICS}
    local_keys = np.full((per,), -1, np.int64)
    stats_real, stats_recon = FeatureStats(), FeatureStats()
    feats_in: list[np.ndarray] = []
    feats_lock = threading.Lock()
    shapes: set = set()
    size = (inception_lib.INCEPTION_SIZE,) * 2

    def flush(final: bool = False):  # holding feats_lock
        while feats_in and (len(feats_in) >= 2 * inc_batch or final):
            chunk = feats_in[:2 * inc_batch]
            del feats_in[:2 * inc_batch]
            x = np.stack(chunk)
            k = x.shape[0]
            if k < 2 * inc_batch:
                x = np.concatenate([x, np.zeros((2 * inc_batch - k,) + x.shape[1:], x.dtype)])
            f = np.asarray(feat_fn(inc_st, jax.device_put(x, devs[0])))[:k]
            stats_real.update(f[0::2])
            stats_recon.update(f[1::2])

    stop = threading.Event()  # set by a failing worker: the others stop at their next image

    def work(worker: int) -> None:
        try:
            _work(worker)
        except BaseException:
            stop.set()
            raise

    def _work(worker: int) -> None:
        dev = devs[worker]
        one_device = jax.sharding.SingleDeviceSharding(dev)
        st_ae, st_lp = states[worker]

        def decode_fn(z):
            return decode(st_ae, z)

        mine = range(worker, len(keys), len(devs))  # positions in keys
        futures = reader.submit([keys[j] for j in mine[:2]])
        for m_i, i in enumerate(mine):
            if stop.is_set():
                return
            img = futures[0].result()
            futures = futures[1:] + (reader.submit([keys[mine[m_i + 2]]]) if m_i + 2 < len(mine) else [])
            if img is None:
                continue
            h, w = img.shape[:2]
            hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
            shapes.add((hp, wp))
            xp_host = np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="reflect")[None]
            hw = np.asarray([[h, w]], np.int32)
            with first_of_size((hp, wp)):
                xp = jax.device_put(xp_host, dev)
                z = encode(st_ae, xp)
                if decode_tiled is not None and tile > 0:
                    r = decode_tiled(decode_fn, z, factor=factor, tile=tile, overlap=overlap,
                                     sharding=one_device)
                else:
                    r = decode_fn(z)
                r = _q8(jax.device_put(r, dev))
                out = jax.device_get(region(st_lp, xp, r, hw))
            for m in _METRICS:
                if m in out:
                    local[m][i] = float(out[m][0])
            local_keys[i] = keys[i]
            if feat_fn is not None:
                pair = [inception_lib.bilinear_resize_np(xp_host[0, :h, :w], size),
                        inception_lib.bilinear_resize_np(np.asarray(r)[0, :h, :w], size)]
                with feats_lock:
                    feats_in.extend(pair)
                    flush()

    # Copies of the replicated states for each worker, made here: concurrent device_puts of
    # one array from several threads race inside jax.
    states = [(_on_device(ae_st, d), _on_device(lp_st, d)) for d in devs]
    reader = reader_factory(keys, full_size=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(devs)) as pool:
            for f in [pool.submit(work, k) for k in range(len(devs))]:
                f.result()  # a worker's error stops the pass
        if feat_fn is not None:
            flush(final=True)
    finally:
        reader.close()
    return local, local_keys, stats_real, stats_recon, sorted(shapes), len(devs)


# ----------------------------------------------------------------------------- main API


def evaluate_autoencoder(
    model_path: str,
    data: str = "embedded",
    *,
    num_images: int = 50_000,
    batch_size: int = 64,
    resolution: int | None = None,
    full_size: bool = False,
    out_dir: str | None = None,
    lpips: str = "pretrained",
    lpips_weights: str | None = None,
    fid: bool = True,
    inception_weights: str | None = None,
    num_best_worst: int = 4,
    rank_by: str = "psnr",
    dtype: str = "float32",
    tile: int | None = None,
    tile_overlap: int | None = None,
    bucket: int = 64,
    tfds_data_dir: str = "",
    fid_method: str = "sqrtm",
    full_size_devices: int = 0,
    mesh=None,
) -> dict:
    """Evaluate the autoencoder at ``model_path`` on ``data``; writes and returns the metrics.

    ``lpips``: ``'pretrained'`` (weights from ``lpips_weights`` or the cache; missing ->
    ``LPIPSWeightsMissingError``), ``'random'`` (random VGG features, weight-1 heads —
    for tests/demos only, reported as ``lpips_random_vgg``) or ``'none'``. ``fid``: compute
    rFID with the FID Inception from ``inception_weights`` or the cache (missing ->
    ``InceptionWeightsMissingError``). ``tile``: latent tile size for full-size decoding
    (default: the model's latent size, at least 32; 0 = whole image); ``tile_overlap``
    default tile // 4. ``full_size_devices``: local devices the full-size pass runs on at
    once, one image each (0: all).
    ``fid_method``: ``'sqrtm'`` (pytorch-fid's computation) or ``'eigh'`` (same value,
    faster; see ``ldm_jax.fid.frechet_distance``).
    See the module docstring for everything else.
    """
    from ldm_jax.convert.inception_weights import create_inception
    from ldm_jax.pretrained import load_autoencoder

    t0 = time.time()
    if lpips not in LPIPS_MODES:
        raise ValueError(f"lpips must be one of {LPIPS_MODES}, got {lpips!r}")
    if fid_method not in ("sqrtm", "eigh"):
        raise ValueError(f"fid_method must be 'sqrtm' or 'eigh', got {fid_method!r}")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if rank_by == "lpips" and lpips == "none":
        raise ValueError("rank_by='lpips' needs LPIPS; use rank_by='psnr' or enable LPIPS")
    if num_images < 1 or batch_size < 1 or num_best_worst < 0:
        raise ValueError("num_images and batch_size must be >= 1, num_best_worst >= 0")
    if full_size_devices < 0:
        raise ValueError(f"--full_size_devices must be >= 0 (0: all local devices), got {full_size_devices}")
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(dtype)
    if dt is None:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    is_main = jax.process_index() == 0
    notes: list[str] = []

    # ---- model ---------------------------------------------------------------------------
    ae, cfg, where = load_autoencoder(model_path, dtype=dt)
    factor = cfg.downsample_factor
    res = int(resolution or cfg.resolution)
    if res % factor:
        raise ValueError(f"resolution {res} is not a multiple of the downsampling factor {factor}")
    train_cfg = _training_config(model_path)

    # ---- frozen metric networks (fail fast, before any image is read) ----------------------
    lp_model, lp_status = None, "LPIPS: disabled (--no_lpips)"
    if lpips == "pretrained":
        lp_model, lp_status = lpips_lib.create_lpips(lpips_weights, missing="error",
                                                     rngs=nnx.Rngs(0))
    elif lpips == "random":
        lp_model = lpips_lib.LPIPS(rngs=nnx.Rngs(0))
        lp_status = ("LPIPS: RANDOM VGG weights with weight-1 heads (lpips='random', for tests "
                     "and demos only) — reported as lpips_random_vgg, not comparable to LPIPS")
    lpips_key = "lpips_random_vgg" if lpips == "random" else "lpips"
    inc_model, inc_status = None, "FID: disabled (--no_fid)"
    if fid:
        inc_model, inc_status = create_inception(inception_weights)
    for line in (where, lp_status, inc_status):
        log.info("%s", line)

    # ---- data ----------------------------------------------------------------------------
    data_cfg, mode, data_desc = parse_data_spec(data, train_cfg, tfds_data_dir)
    source = _open_source(data_cfg, mode)
    n = min(int(num_images), len(source))

    def reader_factory(keys, *, full_size):
        return _Reader(source, keys, res, full_size)

    # ---- mesh and states -----------------------------------------------------------------
    if mesh is None:
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "num_devices": -1})
    gb = max(batch_size, mesh.size)
    gb = -(-gb // mesh.size) * mesh.size
    if gb != batch_size:
        notes.append(f"batch size {batch_size} rounded up to {gb} (a multiple of the "
                     f"{mesh.size} devices)")
    rep = sharding.replicated(mesh)
    ae_gd, ae_st = nnx.split(ae)
    ae_st = jax.device_put(ae_st, rep)
    lp_gd, lp_st = (None, None)
    if lp_model is not None:
        lp_gd, lp_st = nnx.split(lp_model)
        lp_st = jax.device_put(lp_st, rep)
    inc_gd, inc_st = (None, None)
    if inc_model is not None:
        inc_gd, inc_st = nnx.split(inc_model)
        inc_st = jax.device_put(inc_st, rep)

    # ---- model-resolution pass -----------------------------------------------------------
    with_ms = metrics.ms_ssim_supported(res, res)
    extremes = _Extremes(num_best_worst, rank_by == "psnr", (res, res, 3))
    local, local_keys, s_real, s_recon = _model_resolution_pass(
        ae_gd=ae_gd, ae_st=ae_st, lp_gd=lp_gd, lp_st=lp_st, inc_gd=inc_gd, inc_st=inc_st,
        reader_factory=reader_factory, n=n, batch_size=gb, mesh=mesh, with_ms_ssim=with_ms,
        extremes=extremes, rank_by=rank_by, resolution=res)
    g = _allgather({"keys": local_keys, **local})
    valid = g["keys"].reshape(-1) >= 0
    keys_all = g["keys"].reshape(-1)[valid]
    per_image = {m: g[m].reshape(-1)[valid] for m in _METRICS}
    order = np.argsort(keys_all, kind="stable")
    keys_all = keys_all[order]
    per_image = {m: v[order] for m, v in per_image.items()}
    if len(set(keys_all.tolist())) != len(keys_all):  # guard: each image exactly once
        raise RuntimeError("internal error: an image was evaluated more than once")

    def metric_block(per: dict, stats: tuple | None, n_imgs: int, ms_reason: str | None) -> dict:
        vals = {m: per[m] for m in ("psnr", "ssim", "ms_ssim", "l1")}
        if lp_model is not None:
            vals[lpips_key] = per["lpips"]
        block = _summary(vals)
        if ms_reason is not None and block["ms_ssim_count"] == 0:
            block["ms_ssim"] = None
            block["ms_ssim_note"] = ms_reason
        block["rfid"] = None
        if stats is not None:
            real, recon = stats
            if real.n >= 2 and recon.n >= 2:
                block["rfid"], fallback = frechet_distance_or_eigh(
                    real.mean, real.cov, recon.mean, recon.cov, fid_method, "rFID")
                w = " ".join(filter(None, (small_sample_warning(real.n), fallback)))
                if w:
                    block["rfid_warning"] = w
            else:
                block["rfid_note"] = f"FID needs at least 2 images, have {real.n}"
            block["rfid_num_images"] = int(real.n)
        else:
            block["rfid_note"] = "disabled (--no_fid)"
        block["num_images"] = int(n_imgs)
        return block

    ms_reason = None if with_ms else (
        f"MS-SSIM needs images of at least {metrics.MS_SSIM_MIN_SIZE}x{metrics.MS_SSIM_MIN_SIZE} "
        f"(5 scales with an 11-pixel window); resolution is {res}x{res}")
    stats = None
    if inc_gd is not None:
        dim = inception_lib.FEATURE_DIM
        stats = (_gather_stats(s_real, dim), _gather_stats(s_recon, dim))
    result_res = metric_block(per_image, stats, len(keys_all), ms_reason)
    result_res.update(resolution=res, crop="center (shorter side resized to the resolution)")

    # ---- full-size pass ------------------------------------------------------------------
    result_full = None
    full_per_image = None
    if full_size:
        latent_tile = max(res // factor, 32) if tile is None else int(tile)
        overlap = (latent_tile // 4) if tile_overlap is None else int(tile_overlap)
        have_tiling = decode_tiled is not None
        decoding = (f"tiled: {latent_tile}x{latent_tile} latent tiles, overlap {overlap} "
                    "(ldm_jax.tiling.decode_tiled)" if have_tiling and latent_tile > 0
                    else "whole image")
        flocal, fkeys, f_real, f_recon, shapes, n_workers = _full_size_pass(
            ae_gd=ae_gd, ae_st=ae_st, lp_gd=lp_gd, lp_st=lp_st, inc_gd=inc_gd, inc_st=inc_st,
            reader_factory=reader_factory, n=n, factor=factor, bucket=bucket,
            tile=latent_tile if have_tiling else 0, overlap=overlap, inc_batch=max(1, gb // 2),
            devices=full_size_devices)
        fg = _allgather({"keys": fkeys, **flocal})
        fvalid = fg["keys"].reshape(-1) >= 0
        fk = fg["keys"].reshape(-1)[fvalid]
        forder = np.argsort(fk, kind="stable")
        full_per_image = {"key": fk[forder]}
        full_per_image.update({m: fg[m].reshape(-1)[fvalid][forder] for m in _METRICS})
        fstats = None
        if inc_gd is not None:
            dim = inception_lib.FEATURE_DIM
            fstats = (_gather_stats(f_real, dim), _gather_stats(f_recon, dim))
        ms_note = (f"MS-SSIM is computed only for images with a shorter side >= "
                   f"{metrics.MS_SSIM_MIN_SIZE}")
        result_full = metric_block(full_per_image, fstats, len(fk), ms_note)
        result_full.update(
            decoding=decoding, encoding="whole image",
            padding=f"reflect, bottom/right, to a multiple of {math.lcm(max(1, bucket), factor)} px",
            padded_shapes_this_process=[list(s) for s in shapes[:50]],
            devices_per_process=n_workers)

    # ---- outputs -------------------------------------------------------------------------
    if out_dir is None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", data).strip("_") or "data"
        out_dir = os.path.join(model_path, "eval", slug)
    # Unreadable images: the keys read but not scored (a file-level registry would miss
    # files an earlier evaluation in this process already skipped).
    scored = set(keys_all.tolist())
    skipped = [source.describe(k) for k in range(n) if k not in scored]
    result = {
        "model": {"path": os.path.abspath(model_path), "description": where,
                  "config": dataclasses.asdict(cfg),
                  "downsample_factor": factor, "dtype": dtype},
        "data": {"spec": data, "description": data_desc, "num_requested": int(num_images),
                 "num_available": len(source), "num_read": int(n),
                 "num_evaluated": int(len(keys_all)), "skipped_files": skipped},
        "resolution": res,
        "metrics": result_res,
        "full_size": result_full,
        "lpips": {"mode": lpips, "status": lp_status, "key": lpips_key if lp_model else None},
        "fid": {"status": inc_status, "method": fid_method if fid else None,
                "note": "rFID: Inception pool3 features of originals vs reconstructions "
                        "(pytorch-fid's FID Inception; bilinear resize to 299)"},
        "reconstruction": "posterior mode, clipped to [-1, 1], rounded to 8 bits",
        "batch_size": gb,
        "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count(),
                    "processes": jax.process_count(), "mesh": dict(mesh.shape)},
        "versions": _versions(),
        "notes": notes,
        "time_s": None,
    }
    if fid and result_res.get("rfid_warning"):
        warnings.warn(result_res["rfid_warning"], UserWarning, stacklevel=2)
    best_worst = extremes.gathered()
    result["time_s"] = round(time.time() - t0, 2)
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        names = [source.describe(int(k)) for k in keys_all]
        _write_csv(os.path.join(out_dir, "per_image.csv"), names, keys_all, per_image,
                   full_per_image, lpips_key)
        if best_worst:
            k = min(num_best_worst, len(best_worst))
            best, worst = best_worst[-k:][::-1], best_worst[:k]
            rows = [np.stack([t[2] for t in best]), np.stack([t[3] for t in best]),
                    np.stack([t[2] for t in worst]), np.stack([t[3] for t in worst])]
            mw.save_png(os.path.join(out_dir, "recon_best_worst.png"), mw.image_grid(rows))
            result["best_worst"] = {
                "file": "recon_best_worst.png", "rank_by": rank_by if rank_by == "psnr" else lpips_key,
                "rows": ["best originals", "best reconstructions", "worst originals",
                         "worst reconstructions"],
                "best": [source.describe(t[1]) for t in best],
                "worst": [source.describe(t[1]) for t in worst]}
        result["out_dir"] = os.path.abspath(out_dir)
        save_json_atomic(_jsonable(result), os.path.join(out_dir, "metrics.json"))
    return _jsonable(result)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _write_csv(path: str, names, keys, per: dict, full: dict | None, lpips_key: str) -> None:
    cols = ["psnr", "ssim", "ms_ssim", "lpips", "l1"]
    header = ["index", "image"] + [c if c != "lpips" else lpips_key for c in cols]
    full_map = {}
    if full is not None:
        header += [f"full_{c if c != 'lpips' else lpips_key}" for c in cols]
        full_map = {int(k): i for i, k in enumerate(full["key"])}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, (name, k) in enumerate(zip(names, keys)):
            row = [int(k), name] + [_fmt(per[c][i]) for c in cols]
            if full is not None:
                j = full_map.get(int(k))
                row += [_fmt(full[c][j]) if j is not None else "" for c in cols]
            w.writerow(row)


def _fmt(v) -> str:
    v = float(v)
    return f"{v:.6g}" if math.isfinite(v) else ""


# ----------------------------------------------------------------------------- CLI


_GENERATION_FLAGS = ("num_samples", "seed", "steps", "sampler", "eta", "cfg_scale", "classes",
                     "noema", "ref_stats", "num_reference", "no_pr", "pr_num", "pr_k", "is_splits")
_AUTOENCODER_FLAGS = ("num_images", "resolution", "full_size", "no_lpips", "lpips_weights",
                      "random_lpips", "no_fid", "k", "rank_by", "dtype", "tile", "tile_overlap",
                      "bucket", "full_size_devices")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ldm_jax.evaluate",
        description="Autoencoder workdirs / pretrained dirs: reconstruction metrics (PSNR, SSIM, "
                    "MS-SSIM, LPIPS, rFID) on held-out images. LDM workdirs: sample quality "
                    "(FID, Inception Score, precision/recall) against a reference set.")
    p.add_argument("--workdir", required=True,
                   help="VAE-GAN training workdir, converted pretrained autoencoder directory, "
                        "or LDM training workdir")
    p.add_argument("--data", default=None,
                   help="embedded | folder:/path[:eval|:all] | tfds:name[:split]; LDM also 'train' / "
                        "'eval' (its training / held-out data). Default: embedded (autoencoder), "
                        "train (LDM)")
    p.add_argument("--batch", type=int, default=64,
                   help="global batch (rounded up to a multiple of the devices; for generation, "
                        "at most --num_samples)")
    p.add_argument("--out", default="", help="output directory (default WORKDIR/eval/<data>)")
    p.add_argument("--inception_weights", default="",
                   help="FID Inception .npz or pt_inception-2015-12-05-6726825d.pth (default: cache)")
    p.add_argument("--tfds_data_dir", default="", help="TFDS data dir for tfds: specs")
    p.add_argument("--fid_method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="sqrtm: pytorch-fid's scipy.linalg.sqrtm; eigh: same value, faster")
    p.add_argument("--compilation_cache_dir", default=None,
                   help="JAX persistent compilation cache, so a second evaluation with the same "
                        "shapes loads its programs (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "~/.cache/ldm_jax/xla; '' : off)")
    a = p.add_argument_group("autoencoder")
    a.add_argument("--num_images", type=int, default=None, help="at most this many images (50000)")
    a.add_argument("--resolution", type=int, default=None, help="crop size (default: the model's)")
    a.add_argument("--full_size", action="store_true", default=None, help="also evaluate at full image size")
    a.add_argument("--no_lpips", action="store_true", default=None, help="skip LPIPS")
    a.add_argument("--lpips_weights", default=None, help="converted LPIPS .npz (default: cache)")
    a.add_argument("--random_lpips", action="store_true", default=None,
                   help="TESTS/DEMOS ONLY: LPIPS with random VGG weights (reported as lpips_random_vgg)")
    a.add_argument("--no_fid", action="store_true", default=None, help="skip rFID")
    a.add_argument("--k", type=int, default=None, help="best/worst images in recon_best_worst.png (4)")
    a.add_argument("--rank_by", choices=RANK_BY, default=None, help="psnr (default) or lpips")
    a.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="autoencoder compute dtype (float32)")
    a.add_argument("--tile", type=int, default=None,
                   help="full size: latent tile size (default: model latent size, >= 32; 0 = whole image)")
    a.add_argument("--tile_overlap", type=int, default=None, help="full size: tile overlap (default tile/4)")
    a.add_argument("--full_size_devices", type=int, default=None,
                   help="full size: local devices that each score one image at a time (default 0: all)")
    a.add_argument("--bucket", type=int, default=None,
                   help="full size: pad sizes up to a multiple of this (64; fewer compiles)")
    g = p.add_argument_group("latent diffusion (LDM workdir)")
    g.add_argument("--num_samples", type=int, default=None, help="generated images (50000)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (0)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: the config's)")
    g.add_argument("--sampler", choices=("ddim", "ddpm", "dpmpp_2m"), default=None,
                   help="default: the config's")
    g.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the config's)")
    g.add_argument("--cfg_scale", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--class", dest="classes", default=None,
                   help="class index or comma-separated list (default: all classes in turn)")
    g.add_argument("--noema", action="store_true", default=None, help="raw instead of EMA weights")
    g.add_argument("--ref_stats", default=None,
                   help="precomputed reference statistics .npz instead of --data: ours, pytorch-fid's (mu, "
                        "sigma: no sFID) or an ADM reference batch (mu_s, sigma_s too; its images "
                        "arr_0 give precision/recall)")
    g.add_argument("--num_reference", type=int, default=None, help="at most this many reference images (50000)")
    g.add_argument("--no_pr", action="store_true", default=None, help="skip precision/recall")
    g.add_argument("--pr_num", type=int, default=None,
                   help="samples and reference images for precision/recall (10000)")
    g.add_argument("--pr_k", type=int, default=None, help="k of the k-NN manifolds (3)")
    g.add_argument("--is_splits", type=int, default=None, help="Inception Score splits (10)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ldm_jax.quiet_library_logs()
    is_ldm = _training_config(args.workdir).get("trainer") == "ldm"
    wrong = [f for f in (_AUTOENCODER_FLAGS if is_ldm else _GENERATION_FLAGS)
             if getattr(args, f) is not None]
    if wrong:
        kind = "an LDM workdir" if is_ldm else "an autoencoder"
        names = ", ".join("--" + ("class" if f == "classes" else f) for f in wrong)
        p.error(f"{args.workdir} is {kind}: {names} do not apply (see --help for the groups)")

    def opt(name, default):
        v = getattr(args, name)
        return default if v is None else v

    from ldm_jax.trainers.common import cli_compilation_cache

    cli_compilation_cache(args.compilation_cache_dir)
    try:
        if is_ldm:
            from ldm_jax.evaluate_generation import evaluate_generation, print_summary
            result = evaluate_generation(
                args.workdir, args.data or "train", num_samples=opt("num_samples", 50_000),
                batch_size=args.batch, seed=opt("seed", 0), steps=opt("steps", 0),
                sampler=args.sampler, eta=args.eta, cfg_scale=args.cfg_scale,
                classes=opt("classes", ""), use_ema=not args.noema,
                reference_stats=args.ref_stats, num_reference=opt("num_reference", 50_000),
                inception_weights=args.inception_weights or None,
                precision_recall=not args.no_pr, pr_num=opt("pr_num", 10_000), pr_k=opt("pr_k", 3),
                is_splits=opt("is_splits", 10), out_dir=args.out or None,
                fid_method=args.fid_method, tfds_data_dir=args.tfds_data_dir)
            if jax.process_index() == 0:
                print_summary(result)
            return 0
        if args.no_lpips and args.random_lpips:
            p.error("--no_lpips and --random_lpips exclude each other")
        tile, overlap = opt("tile", -1), opt("tile_overlap", -1)
        result = evaluate_autoencoder(
            args.workdir, args.data or "embedded", num_images=opt("num_images", 50_000),
            batch_size=args.batch, resolution=args.resolution or None,
            full_size=bool(args.full_size), out_dir=args.out or None,
            lpips="none" if args.no_lpips else ("random" if args.random_lpips else "pretrained"),
            lpips_weights=args.lpips_weights or None, fid=not args.no_fid,
            inception_weights=args.inception_weights or None, num_best_worst=opt("k", 4),
            rank_by=opt("rank_by", "psnr"), dtype=opt("dtype", "float32"),
            tile=None if tile < 0 else tile, tile_overlap=None if overlap < 0 else overlap,
            bucket=opt("bucket", 64), tfds_data_dir=args.tfds_data_dir, fid_method=args.fid_method,
            full_size_devices=opt("full_size_devices", 0))
    except lpips_lib.LPIPSWeightsMissingError as e:
        print(f"error: {e}\nWithout them: --no_lpips skips LPIPS; --random_lpips (tests and demos "
              "only) scores with random VGG features.", file=sys.stderr)
        return 2
    except InceptionWeightsMissingError as e:
        # rFID can be skipped; FID is what an LDM evaluation measures
        print(f"error: {e}" + ("" if is_ldm else "\nWithout them: --no_fid skips rFID."), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        _print_summary(result)
    return 0


def _print_summary(r: dict) -> None:
    def line(title: str, block: dict | None) -> None:
        if not block:
            return
        parts = []
        for k in ("psnr", "ssim", "ms_ssim", "lpips", "lpips_random_vgg", "rfid", "l1"):
            if k in block:
                v = block[k]
                parts.append(f"{k} {'n/a' if v is None else f'{v:.4f}'}")
        print(f"{title} ({block['num_images']} images): " + ", ".join(parts))

    print(r["model"]["description"])
    line(f"{r['resolution']}x{r['resolution']} center crop", r["metrics"])
    line("full size", r.get("full_size"))
    for block in (r["metrics"], r.get("full_size") or {}):
        for k in ("ms_ssim_note", "rfid_warning"):
            if block.get(k):
                print(f"note: {block[k]}")
    if r.get("out_dir"):
        print(f"wrote {os.path.join(r['out_dir'], 'metrics.json')}")


if __name__ == "__main__":
    sys.exit(main())
