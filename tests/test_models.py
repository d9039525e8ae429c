"""KL autoencoder, its layers and the PatchGAN discriminator against hand-written references.

Everything here is CPU-sized: tiny configs, a few pixels, float64 numpy references.
The full-size models are only ever built abstractly (``nnx.eval_shape``).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_numpy_init
from ldm_jax import config_lib
from ldm_jax.flops import count_flops
from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.layers import AttnBlock, Downsample, GroupNorm, ResnetBlock, Upsample

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _cfg(name: str, variant: str = ""):
    spec = os.path.join(CONFIGS, f"{name}.py")
    return config_lib.load_config(f"{spec}:{variant}" if variant else spec)


def _np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _np_conv(x, kernel, bias, *, stride: int, pad) -> np.ndarray:
    """NHWC x HWIO cross-correlation in float64 with explicit ((top, bottom), (left, right))."""
    x = np.pad(_np(x), ((0, 0), pad[0], pad[1], (0, 0)))
    k = _np(kernel)
    kh, kw = k.shape[:2]
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride]
            out += patch @ k[i, j]
    return out if bias is None else out + _np(bias)


def _np_group_norm(x, scale, bias, groups: int = 32, eps: float = 1e-6) -> np.ndarray:
    x = _np(x)
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return y * _np(scale) + _np(bias)


def _conv_ref(c, x, *, stride=1, pad=((1, 1), (1, 1))) -> np.ndarray:
    """Our Conv (OHWI kernel) through the HWIO numpy reference."""
    bias = c.bias[...] if c.bias is not None else None
    return _np_conv(x, np.transpose(c.kernel[...], (1, 2, 3, 0)), bias, stride=stride, pad=pad)


def _randomize(module: nnx.Module, seed: int, scale: float = 0.3) -> None:
    """Overwrite every parameter with random values (so zero biases / unit scales test nothing)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            v = var[...]
            var[...] = jnp.asarray(rng.normal(0.0, scale, v.shape), v.dtype)


@nnx.jit
def _reconstruct(model, x, key):
    post = model.encode(x)
    z = post.sample(key)
    return post.mean, post.logvar, z, model.decode(z)


@nnx.jit
def _call_vs_mode(model, x):
    return model(x)[0], model.decode(model.encode(x).mode())


def _param_count(module: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# ------------------------------------------------------------------ configs and shapes


@pytest.mark.parametrize("name", ["vae_f4", "vae_f8", "vae_f16"])
def test_tiny_autoencoder_shapes(name):
    cfg = _cfg(name, "tiny")
    mc = AutoencoderConfig.from_dict(cfg.model)
    f = 2 ** (len(cfg.model.ch_mult) - 1)
    assert mc.downsample_factor == f
    model = build_numpy_init(lambda: AutoencoderKL(mc, rngs=nnx.Rngs(0)))
    res, b = mc.resolution, 2
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, res, res, 3)), jnp.float32)
    mean, logvar, z, y = _reconstruct(model, x, jax.random.key(0))
    latent = (b, res // f, res // f, mc.embed_dim)
    assert mean.shape == logvar.shape == z.shape == latent
    assert y.shape == (b, res, res, 3)
    assert y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    if name == "vae_f8":  # the smallest: model(x) without a key decodes the posterior mode
        recon, y_mode = _call_vs_mode(model, x)
        assert recon.shape == (b, res, res, 3)
        np.testing.assert_allclose(np.asarray(recon), np.asarray(y_mode), rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.asarray(y), np.asarray(y_mode))


@pytest.mark.parametrize("name,factor,embed", [("vae_f4", 4, 3), ("vae_f8", 8, 4), ("vae_f16", 16, 16)])
def test_full_config_factors(name, factor, embed):
    mc = AutoencoderConfig.from_dict(_cfg(name).model)
    assert mc.downsample_factor == factor
    assert mc.embed_dim == embed
    assert mc.resolution // factor == 256 // factor
    if name == "vae_f16":
        assert mc.attn_resolutions == (16,)
    else:
        assert mc.attn_resolutions == ()


def test_full_sd_vae_param_count_abstract():
    mc = AutoencoderConfig.from_dict(_cfg("vae_f8").model)
    model = nnx.eval_shape(lambda: AutoencoderKL(mc, rngs=nnx.Rngs(0)))
    assert _param_count(model) == 83_653_863  # diffusers / SD v1 AutoencoderKL
    # Abstract forward: 256x256 -> 32x32x4 latents.
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    moments = nnx.eval_shape(lambda m, x: m.encode_moments(x), model, x)
    assert moments.shape == (1, 32, 32, 8)


def test_patchgan_param_count_and_logits_abstract():
    d = nnx.eval_shape(lambda: NLayerDiscriminator(rngs=nnx.Rngs(0)))
    assert _param_count(d) == 2_765_633
    out = nnx.eval_shape(lambda m, x: m(x), d, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
    assert out.shape == (2, 30, 30, 1)
    assert out.dtype == jnp.float32


# ------------------------------------------------------------------ resampling


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (9, 6)])
def test_downsample_asymmetric_pad(hw):
    h, w = hw
    m = build_numpy_init(lambda: Downsample(4, rngs=nnx.Rngs(1)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, h, w, 4)), jnp.float32)
    y = np.asarray(m(x))
    # Same as PyTorch F.pad(x, (0, 1, 0, 1)) + Conv2d(k=3, s=2, p=0).
    assert y.shape == (2, (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1, 4)
    ref_lax = jax.lax.conv_general_dilated(
        x, m.conv.kernel[...], (2, 2), ((0, 1), (0, 1)), dimension_numbers=("NHWC", "OHWI", "NHWC")
    ) + m.conv.bias[...]
    np.testing.assert_allclose(y, np.asarray(ref_lax), rtol=1e-5, atol=1e-5)
    ref_np = _conv_ref(m.conv, x, stride=2, pad=((0, 1), (0, 1)))
    np.testing.assert_allclose(y, ref_np, rtol=1e-4, atol=1e-5)
    # Symmetric padding would give a different answer: the test can tell them apart.
    sym = _conv_ref(m.conv, x, stride=2, pad=((1, 1), (1, 1)))
    if sym.shape == y.shape:
        assert not np.allclose(y, sym, atol=1e-3)


@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_upsample_nearest_then_conv(hw):
    m = build_numpy_init(lambda: Upsample(4, rngs=nnx.Rngs(2)), seed=1)
    x = np.random.default_rng(2).normal(size=(2, *hw, 4)).astype(np.float32)
    y = np.asarray(m(jnp.asarray(x)))
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    ref = _conv_ref(m.conv, up, stride=1, pad=((1, 1), (1, 1)))
    assert y.shape == (2, 2 * hw[0], 2 * hw[1], 4)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ GroupNorm


def test_group_norm_matches_float64_reference():
    gn = GroupNorm(64)
    assert gn.num_groups == 32 and gn.epsilon == 1e-6
    _randomize(gn, 3, scale=1.0)
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(2, 5, 6, 64)).astype(np.float32)
    y = np.asarray(gn(jnp.asarray(x)))
    np.testing.assert_allclose(y, _np_group_norm(x, gn.scale[...], gn.bias[...]), rtol=1e-4, atol=1e-4)
    # eps matters for near-constant groups: 1e-6, not PyTorch's default 1e-5.
    tiny = (np.random.default_rng(4).normal(size=(1, 2, 2, 64)) * 1e-3).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(gn(jnp.asarray(tiny))), _np_group_norm(tiny, gn.scale[...], gn.bias[...], eps=1e-6),
        rtol=1e-3, atol=1e-3,
    )


def test_group_norm_single_pass_statistics_offset_and_constant_groups():
    """Single-pass (shifted) float32 statistics: as exact as two passes with a mean 1000x
    the std (plain E[x^2] - E[x]^2 is off by ~1 there), and a constant group gives var 0
    (never negative: no NaN from the rsqrt)."""
    gn = GroupNorm(64)
    _randomize(gn, 6, scale=1.0)
    x = np.random.default_rng(6).normal(1000.0, 1.0, size=(2, 8, 8, 64)).astype(np.float32)
    y = np.asarray(gn(jnp.asarray(x)))
    np.testing.assert_allclose(y, _np_group_norm(x, gn.scale[...], gn.bias[...]), rtol=2e-4, atol=2e-4)
    const = np.full((1, 4, 4, 64), 7.25, np.float32)
    y = np.asarray(gn(jnp.asarray(const)))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, np.broadcast_to(gn.bias[...], y.shape), atol=1e-3)


def test_group_norm_gradient_matches_two_pass_autodiff():
    """The written-out backward of the one-pass statistics equals autodiff through the
    textbook two-pass GroupNorm, for the input and for scale and bias."""
    gn = GroupNorm(64)
    _randomize(gn, 7, scale=1.0)
    x = jnp.asarray(np.random.default_rng(7).normal(3.0, 2.0, size=(2, 4, 5, 64)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(8).normal(size=x.shape), jnp.float32)

    def two_pass(x, scale, bias):
        xf = x.reshape(2, 4, 5, 32, 2)
        mean = xf.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)
        return jnp.sum(jnp.sin(y * scale + bias) * w)

    gd, state = nnx.split(gn)

    def ours(x, state):
        return jnp.sum(jnp.sin(nnx.merge(gd, state)(x)) * w)

    gx, gstate = jax.grad(ours, argnums=(0, 1))(x, state)
    got = (gx, gstate["scale"][...], gstate["bias"][...])
    want = jax.grad(two_pass, argnums=(0, 1, 2))(x, jnp.asarray(gn.scale[...]), jnp.asarray(gn.bias[...]))
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_group_norm_bf16_output_with_fp32_stats():
    gn = GroupNorm(64, dtype=jnp.bfloat16)
    _randomize(gn, 5, scale=1.0)
    # Large offset, unit noise, 8*8*2=128 values per group: bf16 accumulation of the
    # statistics would be visibly off; fp32 statistics are exact to bf16 output precision.
    x = jnp.asarray(np.random.default_rng(5).normal(8.0, 1.0, size=(2, 8, 8, 64)), jnp.bfloat16)
    y = gn(x)
    assert y.dtype == jnp.bfloat16
    ref = _np_group_norm(np.asarray(x.astype(jnp.float32)), gn.scale[...], gn.bias[...])
    y = _np(y.astype(jnp.float32))
    # bf16 rounding of the output only: relative 2**-8.
    np.testing.assert_allclose(y, ref, rtol=2**-7, atol=2e-2)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="48"):
        GroupNorm(48)


# ------------------------------------------------------------------ ResnetBlock / AttnBlock


def test_resnet_block_shortcut_only_when_channels_change():
    same = build_numpy_init(lambda: ResnetBlock(32, 32, rngs=nnx.Rngs(0)))
    diff = build_numpy_init(lambda: ResnetBlock(32, 64, rngs=nnx.Rngs(0)))
    assert same.nin_shortcut is None
    assert diff.nin_shortcut is not None
    assert diff.nin_shortcut.kernel[...].shape == (64, 1, 1, 32)  # OHWI
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 4, 32)), jnp.float32)
    # With the residual branch's last conv zeroed the block is exactly its shortcut.
    for blk in (same, diff):
        blk.conv2.kernel[...] = jnp.zeros_like(blk.conv2.kernel[...])
        blk.conv2.bias[...] = jnp.zeros_like(blk.conv2.bias[...])
    np.testing.assert_allclose(np.asarray(same(x)), np.asarray(x), atol=0)
    _randomize(diff.nin_shortcut, 7)
    np.testing.assert_allclose(
        np.asarray(diff(x)), _conv_ref(diff.nin_shortcut, x, pad=((0, 0), (0, 0))), rtol=1e-4, atol=1e-5
    )


def test_resnet_block_matches_reference():
    blk = build_numpy_init(lambda: ResnetBlock(32, 64, rngs=nnx.Rngs(1)), seed=8)
    x = np.random.default_rng(8).normal(size=(2, 5, 4, 32)).astype(np.float32)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    h = _conv_ref(blk.conv1, silu(_np_group_norm(x, blk.norm1.scale[...], blk.norm1.bias[...])))
    h = _conv_ref(blk.conv2, silu(_np_group_norm(h, blk.norm2.scale[...], blk.norm2.bias[...])))
    ref = _conv_ref(blk.nin_shortcut, x, pad=((0, 0), (0, 0))) + h
    np.testing.assert_allclose(np.asarray(blk(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)


def test_attn_block_matches_softmax_reference():
    c = 64
    attn = build_numpy_init(lambda: AttnBlock(c, rngs=nnx.Rngs(2)), seed=9)
    x = np.random.default_rng(9).normal(size=(2, 3, 5, c)).astype(np.float32)
    y = np.asarray(attn(jnp.asarray(x)))
    b, h, w, _ = x.shape
    hn = _np_group_norm(x, attn.norm.scale[...], attn.norm.bias[...])
    nopad = ((0, 0), (0, 0))
    q, k, v = (_conv_ref(m, hn, pad=nopad).reshape(b, h * w, c) for m in (attn.q, attn.k, attn.v))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).reshape(b, h, w, c)
    ref = x + _conv_ref(attn.proj_out, out, pad=nopad)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ DiagonalGaussian


def _np_kl(mean, logvar):
    return 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))


def test_diagonal_gaussian_kl_closed_form():
    rng = np.random.default_rng(10)
    moments = np.concatenate(
        [rng.normal(0, 1.5, (3, 4, 4, 4)), rng.uniform(-3, 3, (3, 4, 4, 4))], axis=-1
    ).astype(np.float32)
    post = DiagonalGaussian(jnp.asarray(moments))
    kl = np.asarray(post.kl())
    assert kl.shape == (3,)
    ref = _np_kl(_np(moments[..., :4]), _np(moments[..., 4:]))
    np.testing.assert_allclose(kl, ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(post.mode()), moments[..., :4])
    np.testing.assert_array_equal(np.asarray(post.mean), moments[..., :4])
    np.testing.assert_allclose(np.asarray(post.std), np.exp(0.5 * _np(moments[..., 4:])), rtol=1e-5)
    # A standard normal posterior has zero KL.
    zero = DiagonalGaussian(jnp.zeros((2, 2, 2, 8)))
    np.testing.assert_allclose(np.asarray(zero.kl()), 0.0, atol=0)


def test_diagonal_gaussian_logvar_clamp():
    mean = np.zeros((1, 1, 2, 2), np.float32)
    logvar = np.array([[[[-100.0, 100.0], [-30.0, 20.0]]]], np.float32)
    moments = np.concatenate([mean, logvar], axis=-1)
    post = DiagonalGaussian(jnp.asarray(moments))
    np.testing.assert_array_equal(np.asarray(post.logvar), [[[[-30.0, 20.0], [-30.0, 20.0]]]])
    np.testing.assert_allclose(np.asarray(post.std)[0, 0, 0], [np.exp(-15.0), np.exp(10.0)], rtol=1e-5)
    kl = np.asarray(post.kl())
    assert np.all(np.isfinite(kl))
    ref = _np_kl(_np(mean), np.clip(_np(logvar), -30.0, 20.0))
    np.testing.assert_allclose(kl, ref, rtol=1e-5)
    # Also from bf16 moments (the encoder's compute dtype): computed in float32.
    post16 = DiagonalGaussian(jnp.asarray(moments, jnp.bfloat16))
    assert post16.kl().dtype == jnp.float32
    assert post16.mean.dtype == jnp.float32


def test_diagonal_gaussian_sample_statistics():
    mean = np.array([1.0, -2.0, 0.5, 3.0], np.float32).reshape(1, 1, 2, 2)
    logvar = np.array([0.0, 1.0, -2.0, -4.0], np.float32).reshape(1, 1, 2, 2)
    post = DiagonalGaussian(jnp.asarray(np.concatenate([mean, logvar], -1)))
    n = 20_000
    samples = np.asarray(jax.vmap(post.sample)(jax.random.split(jax.random.key(0), n)))
    assert samples.shape == (n, 1, 1, 2, 2)
    std = np.exp(0.5 * _np(logvar))
    se = std / np.sqrt(n)
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * se)
    np.testing.assert_allclose(samples.std(0), std, rtol=0.03)
    # Different keys give different samples; the same key the same one.
    k = jax.random.key(1)
    np.testing.assert_array_equal(np.asarray(post.sample(k)), np.asarray(post.sample(k)))
    assert not np.allclose(np.asarray(post.sample(k)), np.asarray(post.sample(jax.random.key(2))))


# ------------------------------------------------------------------ dtype policy


def test_bf16_compute_fp32_params():
    cfg = _cfg("vae_f8", "tiny")
    cfg.model.resolution = 16
    mc = AutoencoderConfig.from_dict(cfg.model)

    def bf16():
        return AutoencoderKL(mc, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))

    # Real initialisation, abstractly: master weights are float32.
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(nnx.eval_shape(bf16), nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    model = build_numpy_init(bf16, seed=1)
    ref = build_numpy_init(lambda: AutoencoderKL(mc, rngs=nnx.Rngs(0)), seed=1)  # same values, fp32 compute
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    x = jnp.asarray(np.random.default_rng(11).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)

    @nnx.jit
    def run(m, x):
        moments = m.encode_moments(x)  # m.encode(x) is DiagonalGaussian(of these)
        post = DiagonalGaussian(moments)
        return moments, post.mean, m.decode(post.mode())

    moments, mean, y = run(model, x)
    assert moments.dtype == jnp.bfloat16
    assert mean.dtype == jnp.float32  # posterior math in fp32
    assert y.dtype == jnp.bfloat16
    assert y.shape == (2, 16, 16, 3)
    _, _, y32 = run(ref, x)
    assert y32.dtype == jnp.float32
    y32 = np.asarray(y32)
    err = np.abs(_np(y.astype(jnp.float32)) - y32).max()
    assert 0 < err < 0.05 * np.abs(y32).max() + 1e-2, err


# ------------------------------------------------------------------ discriminator


def test_discriminator_batchnorm_uses_batch_statistics_and_momentum():
    d = build_numpy_init(lambda: NLayerDiscriminator(ndf=8, n_layers=2, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(12)
    a, b, c = (jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32) for _ in range(3))
    # Running statistics before any update: mean 0, var 1.
    bn = d.norms[0]
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(bn.var[...]), 1.0)
    # The first BatchNorm's input, computed by hand from the (unchanged) convs.
    xb = jnp.concatenate([a, b], 0)
    pre = np.asarray(d.convs[0](jax.nn.leaky_relu(d.conv_in(xb), 0.2)), np.float64)
    out_ab = np.asarray(d(xb))
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * pre.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    # Flax keeps the biased batch variance (PyTorch the unbiased one; N/(N-1) ~ 1 at scale).
    np.testing.assert_allclose(
        np.asarray(bn.var[...]), 0.9 + 0.1 * pre.var((0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    # Train mode: sample a's logits depend on its batch-mate.
    out_ac = np.asarray(d(jnp.concatenate([a, c], 0)))
    assert not np.allclose(out_ab[0], out_ac[0], atol=1e-4)
    # Eval mode uses the running statistics: no dependence on the batch.
    d.eval()
    e_ab = np.asarray(d(jnp.concatenate([a, b], 0)))
    e_ac = np.asarray(d(jnp.concatenate([a, c], 0)))
    np.testing.assert_allclose(e_ab[0], e_ac[0], rtol=1e-5, atol=1e-6)


def test_discriminator_init_statistics():
    d = nnx.jit(lambda: NLayerDiscriminator(rngs=nnx.Rngs(3)))()
    big = np.asarray(d.convs[-1].kernel[...])  # 512x4x4x256 (OHWI): 2M draws
    assert big.shape == (512, 4, 4, 256)
    assert abs(big.mean()) < 1e-3
    assert abs(big.std() - 0.02) < 5e-4
    for c in [d.conv_in, *d.convs, d.conv_out]:
        k = np.asarray(c.kernel[...])
        assert abs(k.std() - 0.02) < 0.15 * 0.02, k.shape
    for c in list(d.convs):
        assert c.bias is None
    scales = np.concatenate([np.asarray(n.scale[...]) for n in d.norms])
    assert scales.size == 128 + 256 + 512
    assert abs(scales.mean() - 1.0) < 3e-3
    assert abs(scales.std() - 0.02) < 3e-3
    for n in d.norms:
        np.testing.assert_array_equal(np.asarray(n.bias[...]), 0.0)
        assert n.momentum == pytest.approx(0.9)


# ------------------------------------------------------------------ remat


def test_remat_same_output_and_gradients():
    cfg = _cfg("vae_f8", "tiny")
    # One level (no resampling) keeps the gradient compilations short; the remat
    # wrapping is the same for every ResnetBlock of every level and of both mid blocks.
    cfg.model.ch_mult = (1,)
    cfg.model.resolution = 8
    base = build_numpy_init(lambda: AutoencoderKL(AutoencoderConfig.from_dict(cfg.model), rngs=nnx.Rngs(0)))

    def with_remat(policy):
        cfg.model.remat, cfg.model.remat_policy = True, policy
        graphdef, _ = nnx.split(
            nnx.eval_shape(lambda: AutoencoderKL(AutoencoderConfig.from_dict(cfg.model), rngs=nnx.Rngs(0))))
        return nnx.merge(graphdef, nnx.state(base))  # same parameters

    full, minimal = with_remat("full"), with_remat("minimal")
    assert base.encoder.remat is False and base.decoder.remat is False
    assert full.encoder.remat is True and full.decoder.remat is True
    assert (full.encoder.remat_policy, minimal.decoder.remat_policy) == ("full", "minimal")
    x = jnp.asarray(np.random.default_rng(13).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)

    def loss_fn(m):
        y, post = m(x, jax.random.key(0))
        return jnp.mean(jnp.square(y - x)) + 1e-3 * jnp.mean(post.kl()), y

    def grad_fn(model):
        gd, st = nnx.split(model)
        return (lambda st: jax.grad(lambda s: loss_fn(nnx.merge(gd, s))[0])(st)), st

    def primitives(model):
        gd, st = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda st: loss_fn(nnx.merge(gd, st))[0])(st)
        return re.findall(r"= (remat2|checkpoint)\[", str(jaxpr))

    # remat=True really puts the ResnetBlocks under jax.checkpoint (1 encoder + 2 decoder
    # level blocks + 2x2 mid blocks = 7); remat=False has none.
    assert primitives(base) == []
    assert len(primitives(full)) == len(primitives(minimal)) == 7
    # "full" reruns every block's convs in the backward; "minimal" keeps the conv outputs
    # (and GroupNorm statistics) and recomputes no convolution at all.
    conv = {name: count_flops(*grad_fn(m))["conv"]
            for name, m in (("base", base), ("full", full), ("minimal", minimal))}
    assert conv["full"] > conv["base"] == conv["minimal"] > 0

    step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
    (l0, y0), g0 = step(base)
    flat0 = jax.tree.leaves(g0)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in flat0)
    for model in (full, minimal):
        (l1, y1), g1 = step(model)
        np.testing.assert_allclose(np.asarray(l0), np.asarray(l1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), rtol=1e-5, atol=1e-6)
        flat1 = jax.tree.leaves(g1)
        assert len(flat0) == len(flat1) > 0
        for a, b in zip(flat0, flat1):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    with pytest.raises(ValueError, match="remat_policy must be one of"):
        AutoencoderConfig(remat_policy="conv")


def test_fill_params_names_every_missing_unexpected_and_misshaped_array():
    """Weights that do not fit a model fail in one error naming each array (dotted paths);
    weights that fit are put in, cast to the model's dtypes."""
    from ldm_jax import pretrained

    class Two(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    good = {"a": {"kernel": np.ones((2, 3), np.float64), "bias": np.zeros(3)},
            "b": {"kernel": np.full((3, 4), 2.0), "bias": np.zeros(4)}}
    m = pretrained.fill_params(Two(), good, "here")
    assert m.b.kernel[...].dtype == jnp.float32 and float(m.b.kernel[0, 0]) == 2.0
    bad = {"a": {"kernel": np.ones((2, 5)), "bias": np.zeros(3)},
           "b": {"kernel": np.ones((3, 4))}, "c": {"kernel": np.ones(1)}}
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.fill_params(Two(), bad, "in x.npz")
    msg = str(e.value)
    assert "weights in x.npz do not fit the model" in msg
    assert "missing (1): b.bias" in msg and "unexpected (1): c.kernel" in msg
    assert "shape mismatch (1): a.kernel: model (2, 3) vs weights (2, 5)" in msg
