"""Building blocks of the KL autoencoder (NHWC layout throughout).

Numerics: convolutions run in ``dtype`` (bf16 on accelerators) with ``param_dtype``
master weights; GroupNorm statistics and attention softmax are computed in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ldm_jax.config_lib import REMAT_POLICIES

Dtype = Any


# Conv kernels are stored [out, kh, kw, in] ("OHWI"), the filter layout cuDNN's NHWC
# kernels use: the gradient XLA gets back from cuDNN then has the parameter's own layout,
# so the optimizer update is elementwise in place. With [kh, kw, in, out] (flax's HWIO)
# every conv kernel's update read the gradient transposed and XLA copied the Adam moments
# around it: compiled for an H100, the 286M U-Net step moved 9 GB more (64.2 vs ~55 GB)
# and ran 243 more kernels, 242 of them copies. Checkpoints record the layout
# (``CONV_LAYOUT``); older HWIO ones are transposed on load (``kernel_from_hwio``).
CONV_LAYOUT = "OHWI"
CONV_DIMENSION_NUMBERS = ("NHWC", "OHWI", "NHWC")


def kernel_from_torch(w):
    """PyTorch ``Conv2d.weight`` [out, in, kh, kw] -> our kernel [out, kh, kw, in]."""
    return w.transpose(0, 2, 3, 1)


def kernel_to_torch(k):
    """Our kernel [out, kh, kw, in] -> PyTorch ``Conv2d.weight`` [out, in, kh, kw]."""
    return k.transpose(0, 3, 1, 2)


def kernel_from_hwio(k):
    """A kernel saved as [kh, kw, in, out] (checkpoints before CONV_LAYOUT) -> ours."""
    return k.transpose(3, 0, 1, 2)


def is_conv_kernel(path, leaf) -> bool:
    """A 4-D leaf named ``kernel`` (a conv kernel; Linear kernels are 2-D) at a pytree path,
    also inside optimizer state, whose moments mirror the parameter tree."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    while names and names[-1] == "value":  # an nnx Variable's value
        names.pop()
    return bool(names) and names[-1] == "kernel" and len(getattr(leaf, "shape", ())) == 4


def kernels_from_hwio(tree):
    """Every conv kernel of a (host) pytree saved in the old HWIO layout, in ours."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: kernel_from_hwio(x) if is_conv_kernel(p, x) else x, tree)


# Names of the values that the "minimal" remat policy keeps for the backward pass.
CONV_OUTPUT = "conv_output"
NORM_STATS = "norm_stats"


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a rematerialised block (``model.remat_policy``).

    * ``"full"``: nothing inside the block is kept; the backward pass reruns its whole
      forward (the least memory, every convolution computed twice).
    * ``"minimal"``: keeps what is costly to recompute and cheap to hold: convolution
      outputs (tagged :data:`CONV_OUTPUT`), GroupNorm statistics (:data:`NORM_STATS`) and
      the outputs of dense matmuls without batch dimensions (the attention projections).
      The backward recomputes only elementwise work (normalisation, SiLU, scale-shift) and
      the attention scores, so it adds almost no FLOPs; the normalised and activated copies
      of every activation are what it stops holding.
    """
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {name!r}")
    if name == "full":
        return None
    policies = jax.checkpoint_policies
    return policies.save_from_both_policies(
        policies.save_only_these_names(CONV_OUTPUT, NORM_STATS),
        policies.dots_with_no_batch_dims_saveable)


class Conv(nnx.Module):
    """2-D convolution of NHWC inputs with an OHWI ``kernel`` and an optional ``bias``.

    Runs in ``dtype`` with ``param_dtype`` parameters. ``padding`` is "SAME", "VALID" or
    ((top, bottom), (left, right)). The default kernel init is LeCun normal over the fan-in
    kh * kw * in (as flax's Conv).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1,
                 padding: Any = "SAME", use_bias: bool = True, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, kernel_init: Any = None, rngs: nnx.Rngs):
        init = kernel_init or nnx.initializers.lecun_normal(in_axis=-1, out_axis=0)
        self.kernel = nnx.Param(init(rngs.params(), (out_ch, kernel, kernel, in_ch), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_ch,), param_dtype)) if use_bias else None
        self.stride = stride
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride),
            self.padding, dimension_numbers=CONV_DIMENSION_NUMBERS)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return checkpoint_name(y, CONV_OUTPUT)


def cast_to_compute_dtype(model: nnx.Module) -> nnx.Module:
    """Cast, in place, the parameters that layers convert to their compute dtype at every
    call: the kernels and biases of ``Conv`` and ``nnx.Linear`` and the tables of
    ``nnx.Embed`` whose ``dtype`` differs from the parameter's. Norm parameters, which
    GroupNorm uses in float32, are left alone. The model then makes the same conversions,
    once (same numbers on a GPU; XLA:CPU, which runs bf16 convolutions in float32, may skip
    a rounding that it otherwise keeps, so CPU results can differ in the last bf16 bit);
    returns ``model``.

    For programs that call a model many times on the same parameters inside a loop, such as
    a sampler: XLA does not move the conversions out of the loop, so every iteration would
    otherwise read the float32 parameters and write bfloat16 copies again, one kernel per
    array (the ~270M U-Net's DDIM-50: 9300 of the call's 31070 kernel launches and 77 of its
    287 GB moved). Not for training: gradients would then be taken of the converted arrays.
    """
    for _, m in nnx.iter_graph(model):
        if isinstance(m, (Conv, nnx.Linear)):
            names = ("kernel", "bias")
        elif isinstance(m, nnx.Embed):
            names = ("embedding",)
        else:
            continue
        dtype = getattr(m, "dtype", None)
        if dtype is None:
            continue
        for name in names:
            var = getattr(m, name, None)
            if isinstance(var, nnx.Variable):
                value = var.get_value()
                if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != dtype:
                    var.set_value(value.astype(dtype))
    return model


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: Any = "SAME",
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Any = None,
    rngs: nnx.Rngs,
) -> Conv:
    return Conv(in_ch, out_ch, kernel, stride=stride, padding=padding, use_bias=use_bias,
                dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)


@jax.custom_vjp
def _group_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float32 mean and variance over axes (1, 2, 4) of ``x`` [b, h, w, groups, c/groups].

    One pass of shifted sums: var = E[(x-k)^2] - E[x-k]^2 for any k constant over the
    group; k = one of the group's own values keeps both terms small, so there is no
    cancellation however far the mean is from zero. The backward is written out,
    d/dx = (g_mean + 2 g_var (x - mean)) / n, so it keeps only ``x`` in its own dtype (no
    float32 copy of the activation) and fuses into the neighbouring backward kernels.
    """
    return _group_stats_fwd(x)[0]


def _group_stats_fwd(x):
    xf = x.astype(jnp.float32)
    shift = xf[:, :1, :1, :, :1]
    d = xf - shift
    d_mean = jnp.mean(d, axis=(1, 2, 4), keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(d), axis=(1, 2, 4), keepdims=True) - jnp.square(d_mean), 0.0)
    mean = shift + d_mean
    return (mean, var), (x, mean)


def _group_stats_bwd(res, cts):
    x, mean = res
    g_mean, g_var = cts
    n = x.shape[1] * x.shape[2] * x.shape[4]
    dx = (g_mean + 2.0 * g_var * (x.astype(jnp.float32) - mean)) / n
    return (dx.astype(x.dtype),)


_group_stats.defvjp(_group_stats_fwd, _group_stats_bwd)


class GroupNorm(nnx.Module):
    """GroupNorm with float32 statistics; output cast back to the compute dtype.

    The statistics come from one pass over the input: the sums of ``x - k`` and of its
    square in one fused reduction, float32, with ``k`` one value of the group itself (a
    shifted single pass: no cancellation however far the mean is from zero). A centred
    second pass would read the activation once more per norm; on the SD KL-f8 VAE-GAN step
    compiled for an H100 the single pass moves ~8 GB fewer bytes per step (``python -m
    ldm_jax.bench vae --compile-only --target h100``, docs/benchmarks.md).
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        if num_features % num_groups:
            raise ValueError(
                f"GroupNorm: {num_features} channels are not divisible into {num_groups} groups"
            )
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = self.num_groups
        mean, var = _group_stats(x.reshape(b, h, w, g, c // g))
        mean, var = checkpoint_name(mean, NORM_STATS), checkpoint_name(var, NORM_STATS)
        xf = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ResnetBlock(nnx.Module):
    """Pre-activation residual block: (GN, SiLU, conv3x3) x2, 1x1 shortcut if widths differ."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        dropout: float = 0.0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(in_ch, **kw)
        self.conv1 = conv(in_ch, out_ch, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(out_ch, **kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.conv2 = conv(out_ch, out_ch, 3, rngs=rngs, **kw)
        self.nin_shortcut = conv(in_ch, out_ch, 1, rngs=rngs, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = jax.nn.silu(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/out projections.

    Uses ``jax.nn.dot_product_attention`` with ``implementation=None`` (JAX picks): the
    head width equals the channel count (512 in KL-f8), above what cuDNN's fused kernel
    accepts, so in practice this runs the XLA path.
    """

    def __init__(
        self,
        ch: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = GroupNorm(ch, **kw)
        self.q = conv(ch, ch, 1, rngs=rngs, **kw)
        self.k = conv(ch, ch, 1, rngs=rngs, **kw)
        self.v = conv(ch, ch, 1, rngs=rngs, **kw)
        self.proj_out = conv(ch, ch, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, h * w, 1, c) for m in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k, v, implementation=None)
        return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after zero padding one pixel on the bottom and right only."""

    def __init__(self, ch: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(
            ch, ch, 3, stride=2, padding="VALID", dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, ch: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)
