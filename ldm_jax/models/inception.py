"""FID Inception-v3 in Flax NNX (NHWC, eval-mode BatchNorm, frozen weights).

This is the network behind every published FID number: the TensorFlow graph
``inception-2015-12-05`` (Szegedy et al. 2016, as frozen for Heusel et al. 2017), in the
layout of pytorch-fid's ``FIDInceptionV3`` so that its standard weights file
``pt_inception-2015-12-05-6726825d.pth`` converts by renaming
(``ldm_jax.convert.inception_weights``). It differs from torchvision's ImageNet
Inception-v3 in three places, all reproduced here:

* the 3x3 average pools in the A (Mixed_5b-d), C (Mixed_6b-e) and first E (Mixed_7b)
  blocks divide by the number of *valid* pixels (TensorFlow ``SAME`` pooling, i.e.
  PyTorch ``count_include_pad=False``);
* the pool branch of the last E block (Mixed_7c) is a 3x3 *max* pool (stride 1, pad 1);
* the classifier has 1008 outputs.

Every conv is ``conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU``.

Input: NHWC images in [-1, 1] (any float dtype, any size). They are resized to 299x299
with bilinear interpolation using half-pixel centres and no anti-aliasing, which is
exactly ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)`` as
pytorch-fid's ``InceptionV3(resize_input=True)`` does it (pytorch-fid resizes images in
[0, 1] and then maps to [-1, 1]; both steps are affine per pixel, so resizing the [-1, 1]
image gives the same result). Note that ``jax.image.resize`` would anti-alias when
shrinking and therefore differ; we use explicit interpolation matrices instead.

Output: the 2048-d ``pool3`` features (global average pool after Mixed_7c), optionally
with the 1008 logits of the ``fc`` layer. ``features`` also returns the *spatial*
features of sFID (Nash et al. 2021, as the ADM evaluator computes them): the first 7
channels of the TF graph's ``mixed_6/conv`` tensor, i.e. of the 1x1 branch of Mixed_6d
(the first 192 channels of that block's output), 17x17x7 at 299x299 input, flattened in
(H, W, C) order to 2023 values.

All weights are ``FrozenWeight`` variables (shared with LPIPS): never ``nnx.Param``, never
trained, wrapped in ``stop_gradient``. Convolutions run at ``Precision.HIGHEST`` by default
so that GPUs do not silently use TF32 (FID is sensitive to feature precision).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.models.lpips import FrozenWeight, frozen_weights

__all__ = ["FIDInceptionV3", "INCEPTION_SIZE", "FEATURE_DIM", "NUM_LOGITS", "SPATIAL_CHANNELS",
           "SPATIAL_DIM", "bilinear_resize", "bilinear_resize_np", "inception_weights"]

Dtype = Any
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # sFID: channels kept of mixed_6/conv (Mixed_6d's 1x1 branch)
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # at 299x299 input
BN_EPS = 1e-3


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------- resizing


def _interp_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D linear interpolation, half-pixel centres, no anti-aliasing.

    Source coordinate of output pixel ``i``: ``(i + 0.5) * in/out - 0.5``, clamped below at 0
    (PyTorch's rule for ``align_corners=False``); the right neighbour is clamped at the edge.
    Rounded like PyTorch's CPU kernel: the scale is a float32, the coordinate one fused
    multiply-add rounded once to float32 — the weights then equal ``F.interpolate``'s bit
    for bit (float64 coordinates differ by up to ~2e-5, plain float32 ones by ~4e-6).
    """
    f32 = np.float32
    m = np.zeros((out_size, in_size), np.float32)
    scale = float(f32(in_size) / f32(out_size))
    for i in range(out_size):
        src = max(f32(scale * (i + 0.5) - 0.5), f32(0.0))
        i0 = min(int(src), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        frac = f32(src - f32(i0))
        m[i, i0] += f32(1.0) - frac
        m[i, i1] += frac
    return m


def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC bilinear resize equal to ``F.interpolate(..., 'bilinear', align_corners=False)``."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(_interp_matrix(h, size[0]))
    mw = jnp.asarray(_interp_matrix(w, size[1]))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def bilinear_resize_np(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Host (NumPy) version of ``bilinear_resize`` for one HWC or a batch of NHWC images."""
    a = np.asarray(x, np.float32)
    h, w = a.shape[-3], a.shape[-2]
    if (h, w) == tuple(size):
        return a
    a = np.einsum("oh,...hwc->...owc", _interp_matrix(h, size[0]), a)
    return np.einsum("pw,...owc->...opc", _interp_matrix(w, size[1]), a).astype(np.float32)


# ----------------------------------------------------------------------------- pooling


def _max_pool(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), padding)


def _avg_pool_3x3_valid_count(x: jax.Array) -> jax.Array:
    """3x3 stride-1 pad-1 average over the in-image pixels only (count_include_pad=False)."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    dims, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, padding)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, padding)
    return total / count


# ----------------------------------------------------------------------------- layers


class _Conv(nnx.Module):
    """Bias-free convolution; kernel HWIO (torch ``conv.weight`` transposed). Created as
    zeros; ``FIDInceptionV3`` fills all kernels from one random draw (or loads weights)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], *, param_dtype: Dtype):
        kh, kw = kernel
        self.kernel = FrozenWeight(jnp.asarray(np.zeros((kh, kw, cin, cout)), param_dtype))


class _BatchNorm(nnx.Module):
    """Eval-mode BatchNorm parameters: ``scale`` (gamma), ``bias`` (beta), running
    ``mean`` and ``var``."""

    def __init__(self, c: int, *, param_dtype: Dtype):
        # NumPy-built constants: no per-shape device computation at construction.
        self.scale = FrozenWeight(jnp.asarray(np.ones((c,)), param_dtype))
        self.bias = FrozenWeight(jnp.asarray(np.zeros((c,)), param_dtype))
        self.mean = FrozenWeight(jnp.asarray(np.zeros((c,)), param_dtype))
        self.var = FrozenWeight(jnp.asarray(np.ones((c,)), param_dtype))


class BasicConv(nnx.Module):
    """torchvision ``BasicConv2d``: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, dtype: Dtype,
                 param_dtype: Dtype, precision):
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dtype = dtype
        self.precision = precision
        self.conv = _Conv(cin, cout, _pair(kernel), param_dtype=param_dtype)
        self.bn = _BatchNorm(cout, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        sg = jax.lax.stop_gradient
        kernel = sg(self.conv.kernel[...]).astype(self.dtype)
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel, window_strides=self.stride,
            padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        f32 = jnp.float32
        scale = sg(self.bn.scale[...]).astype(f32) * jax.lax.rsqrt(sg(self.bn.var[...]).astype(f32) + BN_EPS)
        shift = sg(self.bn.bias[...]).astype(f32) - sg(self.bn.mean[...]).astype(f32) * scale
        y = y.astype(f32) * scale + shift
        return jax.nn.relu(y).astype(self.dtype)


class InceptionA(nnx.Module):
    """Mixed_5b-d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg-pool (valid count)->1x1."""

    def __init__(self, cin: int, pool_features: int, **kw):
        c = functools.partial(BasicConv, **kw)
        self.branch1x1 = c(cin, 64, 1)
        self.branch5x5_1 = c(cin, 48, 1)
        self.branch5x5_2 = c(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
        self.branch_pool = c(cin, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_valid_count(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1->3x3->3x3/2 | max-pool 3x3/2."""

    def __init__(self, cin: int, **kw):
        c = functools.partial(BasicConv, **kw)
        self.branch3x3 = c(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = _max_pool(x, 3, 2, 0)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-e: 1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avg-pool->1x1."""

    def __init__(self, cin: int, channels_7x7: int, **kw):
        c = functools.partial(BasicConv, **kw)
        c7 = channels_7x7
        self.branch1x1 = c(cin, 192, 1)
        self.branch7x7_1 = c(cin, c7, 1)
        self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(cin, c7, 1)
        self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_3x3_valid_count(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | max-pool 3x3/2."""

    def __init__(self, cin: int, **kw):
        c = functools.partial(BasicConv, **kw)
        self.branch3x3_1 = c(cin, 192, 1)
        self.branch3x3_2 = c(192, 320, 3, stride=2)
        self.branch7x7x3_1 = c(cin, 192, 1)
        self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        bp = _max_pool(x, 3, 2, 0)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/7c: 1x1 | 1x1->(1x3, 3x1) | 1x1->3x3->(1x3, 3x1) | pool->1x1.

    ``pool='avg'`` (Mixed_7b: average over valid pixels) or ``'max'`` (Mixed_7c: the FID
    graph's 3x3 stride-1 max pool).
    """

    def __init__(self, cin: int, pool: str, **kw):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        c = functools.partial(BasicConv, **kw)
        self.branch1x1 = c(cin, 320, 1)
        self.branch3x3_1 = c(cin, 384, 1)
        self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(cin, 448, 1)
        self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _max_pool(x, 3, 1, 1) if self.pool == "max" else _avg_pool_3x3_valid_count(x)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Linear(nnx.Module):
    def __init__(self, cin: int, cout: int, *, param_dtype: Dtype):
        self.kernel = FrozenWeight(jnp.asarray(np.zeros((cin, cout)), param_dtype))
        self.bias = FrozenWeight(jnp.asarray(np.zeros((cout,)), param_dtype))


class FIDInceptionV3(nnx.Module):
    """The FID Inception-v3. ``__call__(x [B,H,W,3] in [-1,1]) -> pool3 [B, 2048]`` float32
    (``logits=True``: ``(pool3, logits [B, 1008])``).

    ``resize=False`` skips the 299x299 resize (the network still works on other sizes >= 75,
    but FID is only comparable at 299). ``dtype`` is the conv compute dtype; keep float32
    for FID.

    ``rngs``: kernels are drawn at random (He-normal, one draw for all of them) — a
    placeholder for tests; without ``rngs`` they are zeros. Load real weights with
    ``ldm_jax.convert.inception_weights.create_inception`` (or ``set_inception_params``).
    """

    def __init__(self, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 precision=jax.lax.Precision.HIGHEST, rngs: nnx.Rngs | None = None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
        self.dtype = dtype
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.fc = _Linear(FEATURE_DIM, NUM_LOGITS, param_dtype=param_dtype)
        if rngs is not None:
            self._randomize(rngs.params(), param_dtype)

    def _randomize(self, key: jax.Array, param_dtype: Dtype) -> None:
        """He-normal conv kernels and N(0, 1/fan_in) fc from ONE normal draw (per-shape draws
        would compile ~40 random kernels on first use)."""
        kernels = [v for k, v in inception_weights(self).items() if k.endswith("kernel")]
        sizes = [int(np.prod(v.shape)) for v in kernels]
        flat = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
        start = 0
        for var, size in zip(kernels, sizes):
            shape = tuple(var.get_value().shape)
            fan_in = int(np.prod(shape[:-1]))
            gain = 2.0 if len(shape) == 4 else 1.0
            chunk = flat[start:start + size].reshape(shape) * math.sqrt(gain / fan_in)
            var.set_value(jnp.asarray(chunk, param_dtype))
            start += size

    def __call__(self, x: jax.Array, *, resize: bool = True, logits: bool = False):
        f = self.features(x, resize=resize)
        return (f["pool"], f["logits"]) if logits else f["pool"]

    def features(self, x: jax.Array, *, resize: bool = True) -> dict[str, jax.Array]:
        """``{"pool": [B, 2048], "logits": [B, 1008], "spatial": [B, 2023]}`` (float32):
        pool3, the ``fc`` logits (with bias) and the sFID spatial features (see the module
        doc). Under ``jit`` the outputs a caller drops are not computed."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 expects NHWC RGB images, got shape {x.shape}")
        x = x.astype(jnp.float32)
        if resize:
            x = bilinear_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        h = self.Conv2d_1a_3x3(x)
        h = self.Conv2d_2a_3x3(h)
        h = self.Conv2d_2b_3x3(h)
        h = _max_pool(h, 3, 2, 0)
        h = self.Conv2d_3b_1x1(h)
        h = self.Conv2d_4a_3x3(h)
        h = _max_pool(h, 3, 2, 0)
        spatial = None
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            h = getattr(self, name)(h)
            if name == "Mixed_6d":  # its output starts with the 1x1 branch (mixed_6/conv)
                s = h[..., :SPATIAL_CHANNELS].astype(jnp.float32)
                spatial = s.reshape(s.shape[0], -1)
        pool = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        sg = jax.lax.stop_gradient
        out = jnp.dot(pool, sg(self.fc.kernel[...]).astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) + sg(self.fc.bias[...]).astype(jnp.float32)
        return {"pool": pool, "logits": out, "spatial": spatial}


def inception_weights(model: FIDInceptionV3) -> dict[str, FrozenWeight]:
    """``{'Conv2d_1a_3x3/conv/kernel': variable, ..., 'fc/bias': variable}``."""
    return frozen_weights(model)
