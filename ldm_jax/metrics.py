"""Image-quality metrics on [-1, 1] images (per image, float32): PSNR and SSIM via dm-pix."""

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
