"""Image-quality metrics on [-1, 1] images (per image, float32): PSNR and SSIM via dm-pix;
MS-SSIM and crop-exact metrics of padded images (``region_metrics``) on the same window."""

from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp


def _unit(x: jax.Array) -> jax.Array:
    return jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB per image for images in [-1, 1] (computed on [0, 1], peak 1)."""
    return pix.psnr(_unit(x), _unit(y))


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """SSIM per image (Gaussian window 11, sigma 1.5, on [0, 1]), averaged over channels."""
    return pix.ssim(_unit(x), _unit(y), max_val=1.0)


# ----------------------------------------------------------------------------- MS-SSIM

# Wang, Simoncelli & Bovik (2003) scale weights, as in TensorFlow's ``ssim_multiscale``.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SSIM_WINDOW, _SSIM_SIGMA, _SSIM_K1, _SSIM_K2 = 11, 1.5, 0.01, 0.03
# The coarsest of the 5 scales (4 halvings) must still hold one 11x11 window.
MS_SSIM_MIN_SIZE = _SSIM_WINDOW * 2 ** (len(MS_SSIM_WEIGHTS) - 1)


def _gaussian_filter_valid(x: jax.Array) -> jax.Array:
    """Separable 11-tap Gaussian (sigma 1.5, normalised) per channel, 'valid' borders."""
    r = jnp.arange(_SSIM_WINDOW, dtype=jnp.float32) - (_SSIM_WINDOW - 1) / 2.0
    g = jnp.exp(-0.5 * jnp.square(r / _SSIM_SIGMA))
    g = g / jnp.sum(g)
    c = x.shape[-1]
    dn = ("NHWC", "HWIO", "NHWC")
    hi = jax.lax.Precision.HIGHEST
    kh = jnp.tile(g.reshape(_SSIM_WINDOW, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(g.reshape(1, _SSIM_WINDOW, 1, 1), (1, 1, 1, c))
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=c, precision=hi)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c, precision=hi)


def _ssim_maps(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SSIM and contrast-structure maps ([B, H-10, W-10, C], 'valid' windows) for images in
    [0, 1], with the constants and window of ``ssim``."""
    c1, c2 = _SSIM_K1 ** 2, _SSIM_K2 ** 2
    f = _gaussian_filter_valid
    mx, my = f(x), f(y)
    sxx = f(x * x) - mx * mx
    syy = f(y * y) - my * my
    sxy = f(x * y) - mx * my
    cs = (2.0 * sxy + c2) / (sxx + syy + c2)
    lum = (2.0 * mx * my + c1) / (mx * mx + my * my + c1)
    return lum * cs, cs


def _ssim_and_cs(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean SSIM and contrast-structure term ([B, C] each)."""
    full, cs = _ssim_maps(x, y)
    return jnp.mean(full, axis=(1, 2)), jnp.mean(cs, axis=(1, 2))


def _halve(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2 (an odd last row/column is dropped)."""
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return s * 0.25


def ms_ssim_supported(height: int, width: int) -> bool:
    """Whether images of this size have all 5 MS-SSIM scales (shorter side >= 176)."""
    return min(int(height), int(width)) >= MS_SSIM_MIN_SIZE


def ms_ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Multi-scale SSIM per image for NHWC images in [-1, 1] (computed on [0, 1]).

    Five scales with weights ``MS_SSIM_WEIGHTS``; the contrast-structure term at the four
    finer scales and the full SSIM at the coarsest, each averaged over the image, clipped
    at 0 (as TensorFlow's ``ssim_multiscale`` does, so a negative term cannot make the
    product undefined), combined as ``prod(term_s ** w_s)`` per channel and averaged over
    channels. Between scales the images are 2x2 average-pooled. Gaussian window 11,
    sigma 1.5, K1 0.01, K2 0.03 — the same window as ``ssim``. Needs a shorter side of at
    least ``MS_SSIM_MIN_SIZE`` (176) pixels; raises ValueError otherwise.
    """
    h, w = x.shape[1], x.shape[2]
    if not ms_ssim_supported(h, w):
        raise ValueError(
            f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIZE}x{MS_SSIM_MIN_SIZE} pixels "
            f"(5 scales with an {_SSIM_WINDOW}-pixel window), got {h}x{w}")
    a, b = _unit(x), _unit(y)
    terms = []
    for s in range(len(MS_SSIM_WEIGHTS)):
        full, cs = _ssim_and_cs(a, b)
        terms.append(full if s == len(MS_SSIM_WEIGHTS) - 1 else cs)
        if s < len(MS_SSIM_WEIGHTS) - 1:
            a, b = _halve(a), _halve(b)
    stacked = jax.nn.relu(jnp.stack(terms))  # [5, B, C]
    weights = jnp.asarray(MS_SSIM_WEIGHTS, jnp.float32)[:, None, None]
    return jnp.mean(jnp.prod(stacked ** weights, axis=0), axis=-1)


# ----------------------------------------------------------------------------- regions


def _masked_mean_hw(m: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Mean of ``m`` [B, H, W, C] over ``[:rows, :cols]`` per image and channel -> [B, C]."""
    r = jnp.arange(m.shape[1])[None, :, None, None] < rows[:, None, None, None]
    c = jnp.arange(m.shape[2])[None, None, :, None] < cols[:, None, None, None]
    mask = (r & c).astype(m.dtype)
    count = jnp.maximum(jnp.sum(mask, axis=(1, 2)), 1.0)
    return jnp.sum(m * mask, axis=(1, 2)) / count


def region_metrics(x: jax.Array, y: jax.Array, height: jax.Array, width: jax.Array) -> dict:
    """PSNR, SSIM and MS-SSIM per image of the top-left ``height x width`` region of NHWC
    images in [-1, 1] (``height``/``width``: int [B], may be traced).

    Equal to ``psnr``/``ssim``/``ms_ssim`` of the cropped images (windows that reach into
    the padding are left out of every mean), so images of different sizes can be padded
    to one shape and share one compiled function. ``ms_ssim`` is NaN for a region whose
    shorter side is below ``MS_SSIM_MIN_SIZE``. Also returns ``l1`` (mean |x - y|, [-1, 1]
    scale).
    """
    height = jnp.asarray(height, jnp.int32).reshape(-1)
    width = jnp.asarray(width, jnp.int32).reshape(-1)
    a, b = _unit(x), _unit(y)
    mse = jnp.mean(_masked_mean_hw(jnp.square(a - b), height, width), axis=-1)
    l1 = 2.0 * jnp.mean(_masked_mean_hw(jnp.abs(a - b), height, width), axis=-1)
    out = {"psnr": -10.0 * jnp.log10(mse), "l1": l1}
    win = _SSIM_WINDOW - 1
    terms = []
    hs, ws = height, width
    for s in range(len(MS_SSIM_WEIGHTS)):
        full, cs = _ssim_maps(a, b)
        if s == 0:
            out["ssim"] = jnp.mean(_masked_mean_hw(full, hs - win, ws - win), axis=-1)
        last = s == len(MS_SSIM_WEIGHTS) - 1
        terms.append(_masked_mean_hw(full if last else cs, hs - win, ws - win))
        if not last:
            a, b = _halve(a), _halve(b)
            hs, ws = hs // 2, ws // 2
            if min(a.shape[1], a.shape[2]) < _SSIM_WINDOW:  # padded shape itself too small
                terms = None
                break
    if terms is None:
        out["ms_ssim"] = jnp.full(height.shape, jnp.nan, jnp.float32)
    else:
        weights = jnp.asarray(MS_SSIM_WEIGHTS, jnp.float32)[:, None, None]
        ms = jnp.mean(jnp.prod(jax.nn.relu(jnp.stack(terms)) ** weights, axis=0), axis=-1)
        ok = jnp.minimum(height, width) >= MS_SSIM_MIN_SIZE
        out["ms_ssim"] = jnp.where(ok, ms, jnp.nan)
    return out
