"""Loss pieces of the VAE-GAN (CompVis ``LPIPSWithDiscriminator`` semantics).

rec   = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)          (per pixel)
nll   = sum(rec / exp(logvar) + logvar) / B                         (learnable scalar logvar)
kl    = sum_z KL(q(z|x) || N(0, I)) / B
g     = -mean(D(x_hat))            (or non-saturating: mean softplus(-D(x_hat)))
d_w   = clip(|grad_last nll| / (|grad_last g| + 1e-4), 0, max) * disc_weight, no gradient
total = nll + kl_weight * kl + d_w * disc_factor(step) * g
d     = disc_factor(step) * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))   (hinge)

All reductions are in float32. ``disc_factor`` is a traced ``jnp.where`` on the step, so
switching the GAN term on at ``disc_start`` never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l1_per_pixel(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    return jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32))


def reconstruction_loss(
    x: jax.Array, x_hat: jax.Array, perceptual: jax.Array | None, perceptual_weight: float
) -> jax.Array:
    """Per-pixel L1 plus the per-image perceptual distance broadcast over pixels, [B,H,W,C]."""
    rec = l1_per_pixel(x, x_hat)
    if perceptual is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * perceptual.astype(jnp.float32)[:, None, None, None]
    return rec


def nll_loss(rec: jax.Array, logvar: jax.Array) -> jax.Array:
    """Gaussian-style NLL with one learnable log-variance, summed per image, batch mean."""
    logvar = logvar.astype(jnp.float32)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / rec.shape[0]


def kl_loss(kl_per_image: jax.Array) -> jax.Array:
    return jnp.sum(kl_per_image.astype(jnp.float32)) / kl_per_image.shape[0]


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """'hinge' is CompVis' -mean(D(x_hat)); 'non_saturating' is mean softplus(-D(x_hat))."""
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-logits_fake))
    raise ValueError(f"unknown generator loss {kind!r}; use 'hinge' or 'non_saturating'")


def adaptive_weight(
    grad_nll_last: jax.Array,
    grad_g_last: jax.Array,
    disc_weight: float,
    max_weight: float = 1e4,
) -> jax.Array:
    """CompVis adaptive generator weight from the two gradients at the decoder's last layer."""
    n_nll = jnp.linalg.norm(grad_nll_last.astype(jnp.float32).ravel())
    n_g = jnp.linalg.norm(grad_g_last.astype(jnp.float32).ravel())
    w = jnp.clip(n_nll / (n_g + 1e-4), 0.0, max_weight)
    return jax.lax.stop_gradient(w) * disc_weight


def disc_factor(step: jax.Array, disc_start: int, factor: float = 1.0) -> jax.Array:
    """``factor`` once ``step >= disc_start``, else 0 (traced: no recompilation)."""
    return jnp.where(step >= disc_start, jnp.float32(factor), jnp.float32(0.0))
