"""Image decoding and augmentation as grain transforms, plus the skipped-file registry.

Pipeline per stream position: ``DecodeAt`` (position -> record key -> bytes -> RGB PIL
image, shorter side resized) -> ``AugmentAt`` (train: random or center crop, optional flip,
rng seeded by the global position) or ``CenterCrop`` (eval) -> float32 HWC in [-1, 1].

Unreadable or corrupt records make ``DecodeImage`` return ``None``; ``DecodeAt`` then takes
the record at the next position of the same stream (the next good index), so the replacement
depends only on the stream, never on which process or worker reads it. In the process that
owns the pipeline the skip is registered at once (one ``logging.warning`` per file, counted
by ``skipped_count()``). Inside grain worker processes the keys of skipped records ride
along in the next good record (``"_bad"``, ``BAD_SLOTS`` int64 slots, -1 = empty) and the
main process registers them when the batch arrives (see ``pipeline._Finalize``), so
``skipped_count()`` is right for any worker_count.

This module must not import jax: grain worker processes unpickle these transforms.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

BAD_SLOTS = 8

# ---------------------------------------------------------------------------------------
# Skipped-file registry (per OS process).

_lock = threading.Lock()
_skipped_names: dict[str, None] = {}  # insertion-ordered set of described files
_bad_keys: dict[str, set[int]] = {}  # source uid -> keys known to be bad in this process
_pending: dict[str, list[int]] = {}  # source uid -> bad keys not yet reported (workers)


def skipped_count() -> int:
    """How many distinct unreadable/corrupt files this process has skipped so far."""
    with _lock:
        return len(_skipped_names)


def skipped_files() -> list[str]:
    """The distinct files counted by ``skipped_count()``, in the order they were skipped."""
    with _lock:
        return list(_skipped_names)


def is_skipped(name: str) -> bool:
    with _lock:
        return name in _skipped_names


def register_skip(name: str, reason: str) -> bool:
    """Counts ``name`` once and warns once; returns whether it was new."""
    with _lock:
        if name in _skipped_names:
            return False
        _skipped_names[name] = None
    logger.warning("Skipping unreadable image %s (%s)", name, reason)
    return True


def _reset_for_tests() -> None:
    with _lock:
        _skipped_names.clear()
        _bad_keys.clear()
        _pending.clear()


# ---------------------------------------------------------------------------------------
# Decoding.


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited onto white; 16/32-bit integer
    images are scaled to 8 bits (not clipped); float images are assumed in [0, 1]."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I"):  # "I", "I;16", "I;16B", "I;16L", "I;16N"
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    elif mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.rint(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    return img.convert("RGB")  # "1", "L", "CMYK", "YCbCr", "LAB", "HSV", ...


def decode_image(data: bytes | np.ndarray, min_short_side: int = 0) -> Image.Image:
    """Encoded bytes (or a decoded HWC/HW uint8 array) -> RGB PIL image, fully loaded.

    ``min_short_side > 0`` lets JPEG decode at a reduced DCT scale as long as both sides
    stay >= ``min_short_side`` (large speed-up for big photos; the result is resized
    afterwards anyway). Raises on unreadable data.
    """
    if isinstance(data, np.ndarray):
        arr = data
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            raise ValueError(f"decoded image array must be uint8, got {arr.dtype}")
        return _to_rgb(Image.fromarray(arr))
    img = Image.open(io.BytesIO(data))
    if min_short_side > 0 and img.format == "JPEG":
        img.draft("RGB", (min_short_side, min_short_side))
    img.load()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not lose an otherwise good image
        pass
    return _to_rgb(img)


def target_short_side(short: int, resolution: int, resize_short_side: int) -> int:
    """Shorter side after resizing. 0: to ``resolution`` (CompVis recipe); -1: unchanged
    unless smaller than the crop; >0: to that many pixels."""
    if resize_short_side == 0:
        return resolution
    if resize_short_side < 0:
        return max(short, resolution)
    return max(resize_short_side, resolution)


def resize_image(img: Image.Image, resolution: int, resize_short_side: int) -> Image.Image:
    w, h = img.size
    short = min(w, h)
    target = target_short_side(short, resolution, resize_short_side)
    if target == short:
        return img
    scale = target / short
    nw = target if w == short else max(target, int(round(w * scale)))
    nh = target if h == short else max(target, int(round(h * scale)))
    return img.resize((nw, nh), Image.BICUBIC)


def _to_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


class DecodeImage(grain.transforms.Map):
    """``{"key", "data", "error", "label"}`` -> ``{"image": RGB PIL image, "label": int32,
    "_bad": int64[BAD_SLOTS]}``
    with the shorter side resized per ``resize_short_side``; ``None`` for a bad record."""

    def __init__(self, source, resolution: int, resize_short_side: int, shard: tuple[int, int]):
        self._source = source
        self._uid = source.uid
        self._resolution = int(resolution)
        self._resize = int(resize_short_side)
        self._shard = (int(shard[0]), int(shard[1]))  # [start, end) keys this pipeline reads
        self._owner_pid = os.getpid()

    def known_bad(self, key: int) -> bool:
        with _lock:
            return int(key) in _bad_keys.get(self._uid, ())

    def check_not_all_bad(self) -> None:
        """Raises once every key of ``shard`` is known to be unreadable."""
        start, end = self._shard
        with _lock:
            n_bad = sum(start <= k < end for k in _bad_keys.get(self._uid, ()))
        if n_bad >= end - start:
            raise ValueError(f"All {end - start} images of {self._source!r} [{start}, {end}) are unreadable.")

    def map(self, record: dict[str, Any]) -> dict[str, Any] | None:
        key = int(record["key"])
        if self.known_bad(key):
            return None
        try:
            if record["data"] is None:
                raise OSError(record["error"] or "unreadable")
            hint = self._resolution if self._resize >= 0 else 0
            if self._resize > 0:
                hint = max(self._resize, self._resolution)
            img = decode_image(record["data"], min_short_side=hint)
            img = resize_image(img, self._resolution, self._resize)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            self._mark_bad(key, f"{type(e).__name__}: {e}")
            return None
        bad = np.full((BAD_SLOTS,), -1, dtype=np.int64)
        if os.getpid() != self._owner_pid:
            with _lock:
                pending = _pending.get(self._uid)
                if pending:
                    n = min(BAD_SLOTS, len(pending))
                    bad[:n] = pending[:n]
                    del pending[:n]
        return {"image": img, "label": np.int32(record.get("label", 0)), "_bad": bad}

    def _mark_bad(self, key: int, reason: str) -> None:
        with _lock:
            keys = _bad_keys.setdefault(self._uid, set())
            keys.add(key)
            start, end = self._shard
            all_bad = sum(start <= k < end for k in keys) >= end - start
            in_worker = os.getpid() != self._owner_pid
            if in_worker:
                _pending.setdefault(self._uid, []).append(key)
        if not in_worker:
            register_skip(self._source.describe(key), reason)
        if all_bad:
            raise ValueError(
                f"All {self._shard[1] - self._shard[0]} images of this process's shard of {self._source!r} "
                f"are unreadable (last: {self._source.describe(key)}: {reason})."
            )


class DecodeAt(grain.transforms.Map):
    """Stream position -> ``DecodeImage`` output of the record at that position, or, if that
    record is unreadable, of the record at the next position whose record is readable.

    ``key_at`` maps a position to a record key (a ``grain.MapDataset`` of keys: O(1) random
    access). The position itself is kept in ``"_pos"`` (seeds the augmentation). Raises
    (through ``DecodeImage``) once every record of the source is known to be unreadable.
    """

    def __init__(self, source, key_at, resolution: int, resize_short_side: int,
                 num_keys: int | None = None):
        n = len(source) if num_keys is None else int(num_keys)
        self._source = source
        self._key_at = key_at
        self._decode = DecodeImage(source, resolution, resize_short_side, (0, n))

    def map(self, position) -> dict[str, Any]:
        pos = int(position)
        p = pos
        while True:
            key = int(self._key_at[p])
            if not self._decode.known_bad(key):
                out = self._decode.map(self._source[key])
                if out is not None:
                    out["_pos"] = np.int64(pos)
                    return out
            else:
                self._decode.check_not_all_bad()  # other threads found the last bad ones
            p += 1


class AugmentAt(grain.transforms.Map):
    """``RandomCropFlip`` with an rng seeded by ``(seed, element["_pos"])``: the crop and flip
    of a stream position are the same whichever process, worker or thread computes them."""

    def __init__(self, resolution: int, random_crop: bool, random_flip: bool, seed: int):
        self._crop_flip = RandomCropFlip(resolution, random_crop, random_flip)
        self._seed = int(seed)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng([self._seed, int(element["_pos"])])
        return self._crop_flip.random_map(element, rng)


class RandomCropFlip(grain.transforms.RandomMap):
    """Square crop of ``resolution`` (random or center) and optional horizontal flip,
    drawn from grain's per-record rng; output float32 [resolution, resolution, 3] in
    [-1, 1]."""

    def __init__(self, resolution: int, random_crop: bool, random_flip: bool):
        self._res = int(resolution)
        self._random_crop = bool(random_crop)
        self._random_flip = bool(random_flip)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        img: Image.Image = element["image"]
        w, h = img.size
        r = self._res
        if self._random_crop:
            top = int(rng.integers(0, h - r + 1))
            left = int(rng.integers(0, w - r + 1))
        else:
            top, left = (h - r) // 2, (w - r) // 2
        img = img.crop((left, top, left + r, top + r))
        if self._random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": _to_float(img), "label": element["label"], "_bad": element["_bad"]}


class CenterCrop(grain.transforms.Map):
    """Deterministic center crop (eval); output like ``RandomCropFlip``."""

    def __init__(self, resolution: int):
        self._res = int(resolution)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        img: Image.Image = element["image"]
        w, h = img.size
        r = self._res
        top, left = (h - r) // 2, (w - r) // 2
        img = img.crop((left, top, left + r, top + r))
        return {"image": _to_float(img), "label": element["label"], "_bad": element["_bad"]}
