"""Tiled decoding: decode a latent array larger than what fits (or was trained) in
overlapping tiles and blend them.

Tiles of ``tile`` x ``tile`` latents start every ``tile - overlap`` latents (the last one
flush with the border), are decoded in batches of ``tiles_per_call`` (one compiled shape),
and are blended with weights that ramp linearly across each overlap, so seams fade out.
Where a tile covers the whole latent the result is exactly the full decode. Given a
sharding, each call's tiles are split over the devices of its mesh.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with >= ``overlap``."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, starts: list[int], start: int, tile: int, factor: int) -> np.ndarray:
    """1-D blend weight of one tile (in output pixels): ramps up over the overlap with the
    previous tile and down over the overlap with the next; flat at the borders."""
    w = np.ones(tile * factor, np.float64)
    i = starts.index(start)
    if i > 0:
        ov = (starts[i - 1] + tile - start) * factor
        if ov > 0:
            w[:ov] = np.minimum(w[:ov], (np.arange(ov) + 0.5) / ov)
    if i < len(starts) - 1:
        ov = (start + tile - starts[i + 1]) * factor
        if ov > 0:
            w[-ov:] = np.minimum(w[-ov:], (np.arange(ov)[::-1] + 0.5) / ov)
    return w


def _shard_count(sharding) -> int:
    """How many ways ``sharding`` (a NamedSharding, or a single device's) splits an array's
    first dimension."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return 1
    spec = tuple(sharding.spec)
    axes = spec[0] if spec else None
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(int(sharding.mesh.shape[a]) for a in axes)


def decode_tiled(decode_fn: Callable[[jax.Array], jax.Array], z: jax.Array, *, factor: int,
                 tile: int = 32, overlap: int = 8, tiles_per_call: int = 4,
                 sharding: NamedSharding | jax.sharding.SingleDeviceSharding | None = None) -> np.ndarray:
    """Decode ``z`` [B, h, w, C] with ``decode_fn`` ([n, t, t, C] -> [n, t·f, t·f, 3]).

    ``factor`` is the autoencoder's downsampling factor; returns float32 numpy
    [B, h·f, w·f, 3]. ``decode_fn`` should be jitted; it is called on one tile shape only.

    With ``sharding`` (a ``NamedSharding`` that splits the first dimension, e.g. the
    trainers' batch sharding; the mesh may span processes, which then all pass the same
    ``z``), each call's tiles are split over the mesh's devices instead of every device
    decoding all of them: ``tiles_per_call`` is rounded up to a multiple of the number of
    shards, and the decoded tiles are gathered on every process. A ``SingleDeviceSharding``
    puts every tile on that device. Without it the tiles go to jax's default placement. The
    next call is dispatched before the previous one's tiles are fetched and blended on the
    host, so decoding and blending overlap.
    """
    z = np.asarray(z)
    b, h, w, _ = z.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy = {y: _ramp(h, ys, y, th, factor) for y in ys}
    wx = {x: _ramp(w, xs, x, tw, factor) for x in xs}
    coords = [(n, y, x) for n in range(b) for y in ys for x in xs]
    if sharding is not None:
        d = _shard_count(sharding)
        tiles_per_call = -(-max(int(tiles_per_call), 1) // d) * d

    def dispatch(chunk):
        tiles = np.stack([z[n, y:y + th, x:x + tw] for n, y, x in chunk])
        if len(chunk) < tiles_per_call:  # keep one compiled shape
            tiles = np.concatenate([tiles, np.repeat(tiles[-1:], tiles_per_call - len(chunk), 0)])
        if sharding is None:
            return decode_fn(jnp.asarray(tiles))
        return decode_fn(jax.make_array_from_callback(tiles.shape, sharding, lambda idx: tiles[idx]))

    def fetch(dec):
        if sharding is not None and not getattr(dec, "is_fully_addressable", True):
            return np.asarray(multihost_utils.process_allgather(dec, tiled=True), np.float64)
        return np.asarray(jax.device_get(dec), np.float64)

    chunks = [coords[i:i + tiles_per_call] for i in range(0, len(coords), tiles_per_call)]
    out = None
    weight = np.zeros((b, h * factor, w * factor, 1), np.float64)
    pending = dispatch(chunks[0])
    for k, chunk in enumerate(chunks):
        queued = dispatch(chunks[k + 1]) if k + 1 < len(chunks) else None  # runs while k is blended
        dec, pending = fetch(pending), queued
        if out is None:
            out = np.zeros((b, h * factor, w * factor, dec.shape[-1]), np.float64)
        for j, (n, y, x) in enumerate(chunk):
            wt = np.outer(wy[y], wx[x])[..., None]
            sy, sx = y * factor, x * factor
            out[n, sy:sy + th * factor, sx:sx + tw * factor] += wt * dec[j]
            weight[n, sy:sy + th * factor, sx:sx + tw * factor] += wt
    return (out / weight).astype(np.float32)
