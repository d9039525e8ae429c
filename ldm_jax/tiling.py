"""Tiled decoding: decode a latent array larger than what fits (or was trained) in
overlapping tiles and blend them.

Tiles of ``tile`` x ``tile`` latents start every ``tile - overlap`` latents (the last one
flush with the border), are decoded in batches of ``tiles_per_call`` (one compiled shape),
and are blended with weights that ramp linearly across each overlap, so seams fade out.
Where a tile covers the whole latent the result is exactly the full decode.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


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


def decode_tiled(decode_fn: Callable[[jax.Array], jax.Array], z: jax.Array, *, factor: int,
                 tile: int = 32, overlap: int = 8, tiles_per_call: int = 4) -> np.ndarray:
    """Decode ``z`` [B, h, w, C] with ``decode_fn`` ([n, t, t, C] -> [n, t·f, t·f, 3]).

    ``factor`` is the autoencoder's downsampling factor; returns float32 numpy
    [B, h·f, w·f, 3]. ``decode_fn`` should be jitted; it is called on one tile shape only.
    """
    z = np.asarray(z)
    b, h, w, _ = z.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy = {y: _ramp(h, ys, y, th, factor) for y in ys}
    wx = {x: _ramp(w, xs, x, tw, factor) for x in xs}
    coords = [(n, y, x) for n in range(b) for y in ys for x in xs]
    out = None
    weight = np.zeros((b, h * factor, w * factor, 1), np.float64)
    for i in range(0, len(coords), tiles_per_call):
        chunk = coords[i:i + tiles_per_call]
        tiles = np.stack([z[n, y:y + th, x:x + tw] for n, y, x in chunk])
        if len(chunk) < tiles_per_call:  # keep one compiled shape
            tiles = np.concatenate([tiles, np.repeat(tiles[-1:], tiles_per_call - len(chunk), 0)])
        dec = np.asarray(jax.device_get(decode_fn(jnp.asarray(tiles))), np.float64)
        if out is None:
            out = np.zeros((b, h * factor, w * factor, dec.shape[-1]), np.float64)
        for j, (n, y, x) in enumerate(chunk):
            wt = np.outer(wy[y], wx[x])[..., None]
            sy, sx = y * factor, x * factor
            out[n, sy:sy + th * factor, sx:sx + tw * factor] += wt * dec[j]
            weight[n, sy:sy + th * factor, sx:sx + tw * factor] += wt
    return (out / weight).astype(np.float32)
