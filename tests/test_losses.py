"""VAE-GAN loss pieces against hand-computed numpy values (CompVis LPIPSWithDiscriminator)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import losses as L

LOGITS_REAL = np.array([[2.0, 0.5], [-0.3, 1.0]], np.float32)
LOGITS_FAKE = np.array([[-2.0, 0.25], [1.5, -0.7]], np.float32)


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def test_hinge_d_loss():
    # relu(1 - real) = [0, .5, 1.3, 0] -> mean .45 ; relu(1 + fake) = [0, 1.25, 2.5, .3] -> mean 1.0125
    got = float(L.hinge_d_loss(jnp.asarray(LOGITS_REAL), jnp.asarray(LOGITS_FAKE)))
    assert got == pytest.approx(0.5 * (0.45 + 1.0125), rel=1e-6)
    # A perfect discriminator (margins met) has zero loss.
    assert float(L.hinge_d_loss(jnp.full((3,), 1.5), jnp.full((3,), -1.5))) == 0.0
    assert L.D_LOSSES["hinge"] is L.hinge_d_loss


def test_vanilla_d_loss():
    real, fake = LOGITS_REAL.astype(np.float64), LOGITS_FAKE.astype(np.float64)
    ref = 0.5 * (np.mean(_softplus(-real)) + np.mean(_softplus(fake)))
    got = float(L.vanilla_d_loss(jnp.asarray(LOGITS_REAL), jnp.asarray(LOGITS_FAKE)))
    assert got == pytest.approx(ref, rel=1e-6)
    # At zero logits: 0.5 * (log 2 + log 2).
    assert float(L.vanilla_d_loss(jnp.zeros(4), jnp.zeros(4))) == pytest.approx(np.log(2.0), rel=1e-6)
    assert L.D_LOSSES["vanilla"] is L.vanilla_d_loss


def test_generator_loss_kinds():
    fake = jnp.asarray(LOGITS_FAKE)
    # hinge (CompVis): -mean(D(x_hat)) = -(-2 + .25 + 1.5 - .7) / 4 = 0.2375
    assert float(L.generator_loss(fake)) == pytest.approx(0.2375, rel=1e-6)
    assert float(L.generator_loss(fake, "hinge")) == pytest.approx(0.2375, rel=1e-6)
    ref = np.mean(_softplus(-LOGITS_FAKE.astype(np.float64)))
    assert float(L.generator_loss(fake, "non_saturating")) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="foo"):
        L.generator_loss(fake, "foo")


def test_reconstruction_loss():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 4, 3)).astype(np.float32)
    x_hat = rng.uniform(-1, 1, (2, 3, 4, 3)).astype(np.float32)
    p = np.array([0.2, 0.7], np.float32)
    l1 = np.abs(x.astype(np.float64) - x_hat)
    rec = np.asarray(L.reconstruction_loss(jnp.asarray(x), jnp.asarray(x_hat), jnp.asarray(p), 1.0))
    assert rec.shape == x.shape and rec.dtype == np.float32
    np.testing.assert_allclose(rec, l1 + p[:, None, None, None], rtol=1e-6)
    rec = np.asarray(L.reconstruction_loss(jnp.asarray(x), jnp.asarray(x_hat), jnp.asarray(p), 0.5))
    np.testing.assert_allclose(rec, l1 + 0.5 * p[:, None, None, None], rtol=1e-6)
    # No perceptual term (None or weight 0): plain L1.
    for args in ((None, 1.0), (jnp.asarray(p), 0.0)):
        rec = np.asarray(L.reconstruction_loss(jnp.asarray(x), jnp.asarray(x_hat), *args))
        np.testing.assert_allclose(rec, l1, rtol=1e-6)
    # bf16 inputs are reduced in float32.
    rec = L.reconstruction_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(x_hat, jnp.bfloat16), None, 1.0)
    assert rec.dtype == jnp.float32


def test_nll_loss():
    rng = np.random.default_rng(1)
    rec = rng.uniform(0, 2, (4, 3, 5, 3)).astype(np.float32)
    for logvar in (0.0, 0.7, -1.3):
        # sum over C,H,W of rec/exp(lv) + lv, averaged over the batch of 4.
        ref = (rec.astype(np.float64).sum() / np.exp(logvar) + logvar * rec.size) / 4
        got = float(L.nll_loss(jnp.asarray(rec), jnp.asarray(logvar, jnp.float32)))
        assert got == pytest.approx(ref, rel=1e-5)
    # The learnable logvar gets gradient sum(-rec/exp(lv) + 1)/B.
    g = float(jax.grad(lambda lv: L.nll_loss(jnp.asarray(rec), lv))(jnp.float32(0.3)))
    ref_g = (-rec.astype(np.float64).sum() / np.exp(0.3) + rec.size) / 4
    assert g == pytest.approx(ref_g, rel=1e-5)


def test_kl_loss():
    kl = np.array([3.0, 5.0, 10.0], np.float32)
    assert float(L.kl_loss(jnp.asarray(kl))) == pytest.approx(6.0, rel=1e-7)
    assert L.kl_loss(jnp.asarray(kl, jnp.bfloat16)).dtype == jnp.float32


# ------------------------------------------------------------------ adaptive weight


def _toy():
    """A 2-layer toy 'decoder' whose last layer is a linear map, and two toy losses."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    w1 = jnp.asarray(rng.normal(size=(4, 8)) * 0.5, jnp.float32)
    w_last = jnp.asarray(rng.normal(size=(8, 3)) * 0.5, jnp.float32)

    def decode(w_last):
        return jnp.tanh(x @ w1) @ w_last

    def nll(w_last):  # reconstruction-like; quadratic, so its gradient depends on w_last
        return jnp.sum(jnp.square(decode(w_last) - target))

    def gen(w_last):  # generator-like
        return -jnp.mean(decode(w_last) * jnp.array([1.0, -2.0, 0.5]))

    return w_last, nll, gen


def test_adaptive_weight_value():
    w_last, nll, gen = _toy()
    g1 = jax.grad(nll)(w_last)
    g2 = jax.grad(gen)(w_last)
    n1 = np.linalg.norm(np.asarray(g1, np.float64))
    n2 = np.linalg.norm(np.asarray(g2, np.float64))
    assert n1 > 0 and n2 > 0
    for dw in (0.5, 1.0):
        got = float(L.adaptive_weight(g1, g2, dw))
        assert got == pytest.approx(n1 / (n2 + 1e-4) * dw, rel=1e-5)
    # Clipped at max_weight (default 1e4) before the disc_weight multiplier.
    tiny_g = g2 * 1e-9
    assert n1 / (1e-9 * n2 + 1e-4) > 1e4  # would exceed the clip
    assert float(L.adaptive_weight(g1, tiny_g, 0.5)) == pytest.approx(1e4 * 0.5, rel=1e-6)
    assert float(L.adaptive_weight(g1, g2, 0.5, max_weight=0.1)) == pytest.approx(0.05, rel=1e-6)
    # bf16 gradients are normed in float32.
    got = float(L.adaptive_weight(g1.astype(jnp.bfloat16), g2.astype(jnp.bfloat16), 0.5))
    assert got == pytest.approx(n1 / (n2 + 1e-4) * 0.5, rel=2e-2)


def test_adaptive_weight_carries_no_gradient():
    w_last, nll, gen = _toy()
    g1 = jax.grad(nll)(w_last)
    g2 = jax.grad(gen)(w_last)
    # No gradient w.r.t. the gradients fed into the norms.
    d1, d2 = jax.grad(lambda a, b: L.adaptive_weight(a, b, 0.5), argnums=(0, 1))(g1, g2)
    np.testing.assert_array_equal(np.asarray(d1), 0.0)
    np.testing.assert_array_equal(np.asarray(d2), 0.0)

    # Used as in the VAE-GAN step: total = nll + d_w * g, with d_w computed from grads of
    # the same parameters. The total's gradient is grad nll + d_w * grad g (d_w constant).
    def total(w):
        d_w = L.adaptive_weight(jax.grad(nll)(w), jax.grad(gen)(w), 0.5)
        return nll(w) + d_w * gen(w)

    d_w = L.adaptive_weight(g1, g2, 0.5)
    np.testing.assert_allclose(
        np.asarray(jax.grad(total)(w_last)), np.asarray(g1 + d_w * g2), rtol=1e-5, atol=1e-6
    )
    # Without the stop-gradient the answer would differ (the test can tell).
    def total_no_sg(w):
        n1 = jnp.linalg.norm(jax.grad(nll)(w))
        n2 = jnp.linalg.norm(jax.grad(gen)(w))
        return nll(w) + n1 / (n2 + 1e-4) * 0.5 * gen(w)

    assert not np.allclose(np.asarray(jax.grad(total_no_sg)(w_last)), np.asarray(g1 + d_w * g2), atol=1e-4)


# ------------------------------------------------------------------ disc factor


def test_disc_factor_values():
    for step, want in ((0, 0.0), (49, 0.0), (50, 1.0), (51, 1.0), (10_000, 1.0)):
        assert float(L.disc_factor(jnp.int32(step), 50)) == want
    assert float(L.disc_factor(jnp.int32(50), 50, factor=0.3)) == pytest.approx(0.3)
    assert float(L.disc_factor(jnp.int32(49), 50, factor=0.3)) == 0.0
    assert L.disc_factor(jnp.int32(7), 5).dtype == jnp.float32


def test_disc_factor_compiles_once_across_disc_start():
    traces = []

    @jax.jit
    def d_step(step, real, fake):
        traces.append(1)  # Python side effect: runs once per trace
        return L.disc_factor(step, 3) * L.hinge_d_loss(real, fake)

    real, fake = jnp.asarray(LOGITS_REAL), jnp.asarray(LOGITS_FAKE)
    full = 0.5 * (0.45 + 1.0125)
    got = [float(d_step(jnp.int32(s), real, fake)) for s in range(6)]
    np.testing.assert_allclose(got, [0, 0, 0, full, full, full], rtol=1e-6)
    assert len(traces) == 1
    if hasattr(d_step, "_cache_size"):
        assert d_step._cache_size() == 1
