"""The diffusion U-Net: config checks, time embedding, shapes/dtypes, labels, dropout, remat, jit.

Tiny models only. Parameters come from ``nnx.eval_shape`` filled with numpy random values
(eager initialisation compiles one kernel per parameter shape, seconds on a small CPU), which
also gives the zero-initialised layers non-zero weights so outputs depend on every input.
The full-size model is only built abstractly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_numpy_init
from ldm_jax.flops import count_flops
from ldm_jax.models.layers import remat_policy
from ldm_jax.models.unet import (AttentionBlock, Downsample, ResBlock, UNet, UNetConfig,
                                 attention_layout, count_params, timestep_embedding)

TINY = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16, norm_groups=8)
NUM_CLASSES = 5
B, H = 2, 8


def _cfg(**kw) -> UNetConfig:
    return UNetConfig(**{**TINY, **kw})


def _build(cfg: UNetConfig, dtype=jnp.float32, seed: int = 0) -> UNet:
    return build_numpy_init(lambda: UNet(cfg, dtype=dtype, rngs=nnx.Rngs(0)), seed)


@functools.partial(jax.jit, static_argnums=0)
def _apply_split(graphdef, state, x, t, y, key):
    """A plain ``jax.jit`` over the ``nnx.split`` state, as the trainers run it."""
    return nnx.merge(graphdef, state)(x, t, y, dropout_key=key)


def _apply(model, x, t, y=None, key=None):
    graphdef, state = nnx.split(model)
    return _apply_split(graphdef, state, x, t, y, key)


def _inputs(seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (B, H, H, 3))
    return x, jnp.array([3, 700], jnp.int32), jnp.array([1, 4], jnp.int32)


@functools.lru_cache(maxsize=None)
def _model(num_classes=NUM_CLASSES, dtype=jnp.float32, **kw):
    return _build(_cfg(num_classes=num_classes, **kw), dtype=dtype)


# ------------------------------------------------------------------------------ config


def test_config_from_dict_and_validation():
    cfg = UNetConfig.from_dict(dict(TINY, channel_mult=[1, 2], attention_resolutions=[2],
                                    num_classes=0, some_trainer_key="ignored"))
    assert cfg.channel_mult == (1, 2) and cfg.attention_resolutions == (2,)
    assert cfg.num_classes is None and cfg.null_label is None
    assert UNetConfig.from_dict(dict(TINY, num_classes=7)).null_label == 7
    assert cfg == _cfg()  # hashable, comparable
    bad = [
        (dict(norm_groups=12), "norm_groups"),
        (dict(num_head_channels=24), "num_head_channels"),
        (dict(num_head_channels=-1, num_heads=3), "num_heads"),
        (dict(num_head_channels=0), "num_head_channels"),
        (dict(attention_resolutions=(2, 4, 8)), "match no level"),
        (dict(in_channels=-1), "in_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(attention_impl="flash"), "attention_impl"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            UNetConfig.from_dict(dict(TINY, **kw))
    UNetConfig.from_dict(dict(TINY, num_head_channels=-1, num_heads=4))  # 32 and 64 split in 4


def test_270m_config_param_count_and_layout():
    cfg = UNetConfig()
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks) == (224, (1, 2, 3, 4), 2)
    # Equal to diffusers UNet2DModel with the mapped configuration (block_out_channels
    # (224, 448, 672, 896), scale_shift, attention_head_dim=32, attn_norm_num_groups=32).
    n = count_params(cfg)
    assert n == 285_714_020
    assert count_params(UNetConfig(num_classes=1000)) == n + 1001 * 4 * 224
    layout = attention_layout(cfg)
    assert [(d["ds"], d["width"], d["heads"]) for d in layout] == [
        (1, 224, 0), (2, 448, 14), (4, 672, 21), (8, 896, 28), (8, 896, 28)]


# ------------------------------------------------------------------------------ embedding


def test_timestep_embedding():
    t = jnp.array([0, 1, 10, 999], jnp.int32)
    e = np.asarray(timestep_embedding(t, 64))
    assert e.shape == (4, 64) and e.dtype == np.float32
    np.testing.assert_array_equal(e[0, :32], 1.0)  # cos(0)
    np.testing.assert_array_equal(e[0, 32:], 0.0)  # sin(0)
    assert np.all(np.abs(e) <= 1.0)
    freqs = np.exp(-np.log(10000.0) * np.arange(32) / 32)
    np.testing.assert_allclose(e[2], np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)]),
                               atol=1e-5)
    d = np.abs(e[:, None] - e[None]).sum(-1)
    assert np.all(d[~np.eye(4, dtype=bool)] > 1e-3)  # distinct timesteps, distinct embeddings
    ef = np.asarray(timestep_embedding(jnp.array([2.5]), 64))  # fractional t
    assert not np.allclose(ef[0], e[1]) and not np.allclose(ef[0], e[2])
    np.testing.assert_allclose(ef[0, 0], np.cos(2.5), atol=1e-6)
    assert timestep_embedding(t, 7).shape == (4, 7)


# ------------------------------------------------------------------------------ blocks vs numpy


def _fill_module(ctor, seed=0):
    """A small block built abstractly and filled like ``_build``."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(state)
    leaves = [jnp.asarray(rng.normal(0.0, 0.3, l.shape), l.dtype) for l in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _np_gn(x, norm, groups):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    y = (xg - xg.mean((1, 2, 4), keepdims=True)) / np.sqrt(xg.var((1, 2, 4), keepdims=True) + 1e-5)
    return y.reshape(x.shape) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def _np_conv(x, c):
    k = np.transpose(np.asarray(c.kernel[...], np.float64), (1, 2, 3, 0))  # OHWI -> HWIO
    p = k.shape[0] // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = x.shape[1:3]
    out = sum(xp[:, i:i + h, j:j + w] @ k[i, j]
              for i in range(k.shape[0]) for j in range(k.shape[1]))
    return out + np.asarray(c.bias[...])


def _np_silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_matches_numpy(scale_shift):
    blk = _fill_module(lambda: ResBlock(8, 16, 12, groups=4, eps=1e-5, dropout=0.0,
                                        scale_shift=scale_shift, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    x, emb = rng.normal(size=(2, 4, 4, 8)), rng.normal(size=(2, 12))
    h = _np_conv(_np_silu(_np_gn(x, blk.norm1, 4)), blk.conv1)
    proj = blk.time_emb_proj
    e = _np_silu(emb) @ np.asarray(proj.kernel[...]) + np.asarray(proj.bias[...])
    e = e[:, None, None, :]
    if scale_shift:  # first half scales, second half shifts (ADM / diffusers chunk order)
        h = _np_gn(h, blk.norm2, 4) * (1 + e[..., :16]) + e[..., 16:]
    else:
        h = _np_gn(h + e, blk.norm2, 4)
    ref = _np_conv(x, blk.conv_shortcut) + _np_conv(_np_silu(h), blk.conv2)
    out = blk(jnp.asarray(x, jnp.float32), jnp.asarray(emb, jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_attention_matches_numpy():
    blk = _fill_module(lambda: AttentionBlock(16, 2, groups=4, eps=1e-5, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(2).normal(size=(2, 3, 3, 16))
    tok = _np_gn(x, blk.group_norm, 4).reshape(2, 9, 16)
    lin = lambda m, v: v @ np.asarray(m.kernel[...]) + np.asarray(m.bias[...])  # noqa: E731
    q, k, v = (lin(m, tok).reshape(2, 9, 2, 8) for m in (blk.to_q, blk.to_k, blk.to_v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(2, 9, 16)
    ref = x + lin(blk.to_out, o).reshape(x.shape)
    np.testing.assert_allclose(blk(jnp.asarray(x, jnp.float32)), ref, rtol=1e-4, atol=1e-4)
    # attention_impl: "xla" names the path "auto" takes here; "cudnn" is passed through to
    # jax (which refuses it without a CUDA GPU).
    blk.impl = "xla"
    np.testing.assert_allclose(blk(jnp.asarray(x, jnp.float32)), ref, rtol=1e-4, atol=1e-4)
    blk.impl = "cudnn"
    if jax.default_backend() == "cpu":
        with pytest.raises(RuntimeError, match="cuDNN"):
            blk(jnp.asarray(x, jnp.bfloat16))


def test_downsample_pads_symmetrically():
    """ADM / diffusers (padding=1): pad one pixel on every side, 3x3 conv with stride 2
    (the autoencoder pads only bottom/right)."""
    blk = _fill_module(lambda: Downsample(4, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(3).normal(size=(1, 6, 6, 4))
    ref = _np_conv(x, blk.conv)[:, ::2, ::2]  # stride 2 of the padded stride-1 conv
    out = blk(jnp.asarray(x, jnp.float32))
    assert out.shape == (1, 3, 3, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("num_classes", [NUM_CLASSES, None])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shape_and_dtype(num_classes, dtype):
    model = _model(num_classes, dtype)
    x, t, y = _inputs()
    y = y if num_classes else None
    out = _apply(model, x, t, y)
    assert out.shape == x.shape and out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert float(jnp.std(out.astype(jnp.float32))) > 1e-2  # random weights: non-trivial output
    if dtype == jnp.bfloat16:  # same fp32 parameters: bf16 compute tracks fp32 compute
        ref = _apply(_model(num_classes, jnp.float32), x, t, y)
        rel = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
        assert float(rel) < 0.05
        params = nnx.state(model, nnx.Param)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_cast_to_compute_dtype_same_outputs():
    """``cast_to_compute_dtype`` (the samplers' once-per-call conversion) turns exactly the
    weights the layers convert at each call into bf16 (conv / dense kernels and biases, the
    label table), leaves the GroupNorm parameters in float32, and the model computes the same
    numbers. A float32 model is left as it is."""
    from ldm_jax.models.layers import cast_to_compute_dtype

    model = _model(NUM_CLASSES, jnp.bfloat16)
    x, t, y = _inputs()
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y), cast_to_compute_dtype(nnx.merge(graphdef, state))(x, t, y)

    plain, cast = both(state, x, t, y)
    np.testing.assert_array_equal(np.asarray(cast, np.float32), np.asarray(plain, np.float32))
    shapes = jax.eval_shape(lambda st: nnx.state(cast_to_compute_dtype(nnx.merge(graphdef, st)), nnx.Param), state)
    dtypes = {jax.tree_util.keystr(p): v.dtype for p, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    bf16 = {k for k, d in dtypes.items() if d == jnp.bfloat16}
    assert any("conv_in" in k and "kernel" in k for k in bf16) and any("to_q" in k for k in bf16)
    assert any("class_embedding" in k for k in bf16), sorted(bf16)[:5]
    norms = [k for k in dtypes if "norm" in k]
    assert norms and all(dtypes[k] == jnp.float32 for k in norms)
    assert all(k in bf16 or "norm" in k for k in dtypes), sorted(set(dtypes) - bf16)
    f32 = _model(NUM_CLASSES, jnp.float32)
    cast_to_compute_dtype(f32)  # eager, outside any trace: a float32 model is unchanged
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(f32, nnx.Param)))


def test_labels_null_class_and_timesteps_matter():
    model = _model()
    x, t, y = _inputs()
    out = _apply(model, x, t, y)
    out_null = _apply(model, x, t, jnp.full((B,), NUM_CLASSES, jnp.int32))
    out_none = _apply(model, x, t, None)
    np.testing.assert_allclose(out_none, out_null, atol=1e-6)
    assert float(jnp.abs(out - out_null).mean()) > 1e-3
    out_other = _apply(model, x, t, jnp.array([2, 0], jnp.int32))
    assert np.all(np.abs(np.asarray(out - out_other)).reshape(B, -1).mean(1) > 1e-3)
    out_t = _apply(model, x, t + 50, y)
    assert float(jnp.abs(out - out_t).mean()) > 1e-3
    # Float timesteps are accepted and equal integer ones of the same value.
    np.testing.assert_allclose(_apply(model, x, t.astype(jnp.float32), y), out, atol=1e-5)
    # Per-example independence: batch element 0 does not see element 1.
    x2 = x.at[1].set(0.0)
    np.testing.assert_allclose(_apply(model, x2, t, y)[0], out[0], atol=1e-5)


def test_input_checks():
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="unconditional"):
        _model(None)(x, t, y)
    with pytest.raises(ValueError, match="divisible"):
        _model(None)(x[:, :7, :7], t)


def test_fresh_init_zero_layers():
    """ADM init: the last conv of each ResBlock, attention out-projections and conv_out are
    zero, so a freshly initialised U-Net outputs exactly zero."""
    cfg = UNetConfig(in_channels=2, out_channels=2, model_channels=8, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=(1,), num_head_channels=8,
                     norm_groups=4, num_classes=3)
    # One jitted initialisation (the rbg key compiles faster than threefry on CPU).
    rngs = lambda: nnx.Rngs(jax.random.key(0, impl="rbg"))  # noqa: E731
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: UNet(cfg, rngs=rngs())))
    state = jax.jit(lambda: nnx.state(UNet(cfg, rngs=rngs())))()
    model = nnx.merge(graphdef, state)
    zero = [model.conv_out]
    for _, m in nnx.iter_graph(model):
        if isinstance(m, ResBlock):
            zero.append(m.conv2)
        if isinstance(m, AttentionBlock):
            zero.append(m.to_out)
    assert len(zero) == 1 + 5 + 4  # conv_out; ResBlocks: 1 down, 2 mid, 2 up; attentions 1+1+2
    for m in zero:
        assert not np.any(np.asarray(m.kernel[...])) and not np.any(np.asarray(m.bias[...]))
    assert np.any(np.asarray(model.conv_in.kernel[...]))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 2))
    out = _apply(model, x, jnp.array([1, 2]), jnp.array([0, 3]))
    np.testing.assert_array_equal(out, 0.0)


# ------------------------------------------------------------------------------ dropout, remat


def test_dropout_only_with_key_and_rate():
    x, t, y = _inputs()
    drop = _model(dropout=0.3)
    base = _apply(drop, x, t, y)
    np.testing.assert_allclose(base, _apply(_model(), x, t, y), atol=1e-6)  # same weights
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a = _apply(drop, x, t, y, k1)
    assert float(jnp.abs(a - base).mean()) > 1e-3
    np.testing.assert_array_equal(a, _apply(drop, x, t, y, k1))  # deterministic given the key
    assert float(jnp.abs(a - _apply(drop, x, t, y, k2)).mean()) > 1e-3
    # Dropout 0: a key changes nothing.
    np.testing.assert_allclose(_apply(_model(), x, t, y, k1), _apply(_model(), x, t, y),
                               atol=1e-6)


def test_remat_same_output_and_grads():
    x, t, y = _inputs()
    key = jax.random.PRNGKey(3)
    # One level (attention at ds 1) keeps the gradient compilations short.
    small = dict(num_classes=NUM_CLASSES, dropout=0.1, channel_mult=(1,),
                 attention_resolutions=(1,))
    plain = _build(_cfg(**small))
    full = _build(_cfg(**small, remat=True))
    minimal = _build(_cfg(**small, remat=True, remat_policy="minimal"))
    w = jax.random.normal(jax.random.PRNGKey(4), x.shape)

    def grad_fn(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(params):
            def loss(p):
                out = nnx.merge(graphdef, p, rest)(x, t, y, dropout_key=key)
                return jnp.sum(out * w), out
            return jax.grad(loss, has_aux=True)(params)

        return f, params

    def grads(model):
        f, params = grad_fn(model)
        return jax.jit(f)(params)

    g0, out0 = grads(plain)
    flat0 = jax.tree.leaves(g0)
    assert sum(float(jnp.abs(g).sum()) for g in flat0) > 0
    for model in (full, minimal):
        g1, out1 = grads(model)
        np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
        flat1 = jax.tree.leaves(g1)
        assert len(flat0) == len(flat1)
        for a, b in zip(flat0, flat1):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)

    # What each policy recomputes, from the gradient program's analytic FLOPs: "full"
    # reruns every conv and matmul of the blocks; "minimal" keeps conv and projection
    # outputs, so only the attention products (batched dots: scores, P.V) run twice.
    flops = {name: count_flops(*grad_fn(m))
             for name, m in (("plain", plain), ("full", full), ("minimal", minimal))}
    assert flops["full"]["conv"] > flops["plain"]["conv"] == flops["minimal"]["conv"] > 0
    assert flops["full"]["matmul"] > flops["plain"]["matmul"] == flops["minimal"]["matmul"] > 0
    assert flops["full"]["attention"] == flops["minimal"]["attention"] > flops["plain"]["attention"]


def test_remat_policy_names_checked():
    with pytest.raises(ValueError, match="remat_policy"):
        _cfg(remat=True, remat_policy="everything")
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        remat_policy("dots")


def test_jit_over_split_state_matches_eager():
    model = _model()
    x, t, y = _inputs()
    np.testing.assert_allclose(_apply(model, x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)
