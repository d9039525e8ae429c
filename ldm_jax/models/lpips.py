"""LPIPS v0.1 (VGG16) perceptual distance in Flax NNX, NHWC.

``LPIPS(x, y)`` matches ``lpips.LPIPS(net='vgg', version='0.1')`` (Zhang et al. 2018) given
the same weights: inputs in [-1, 1] -> fixed scaling layer -> VGG16 ``features`` up to
relu5_3 -> per-layer unit normalisation over channels -> squared difference -> non-negative
1x1 heads -> spatial mean -> sum over the five layers. Returns one distance per image.

Frozen weights: every VGG16 and head weight is a ``FrozenWeight`` variable, not an
``nnx.Param``. A training model that owns an ``LPIPS`` therefore keeps these weights out
of ``nnx.state(model, nnx.Param)``, out of ``nnx.Optimizer(..., wrt=nnx.Param)`` and out of
``nnx.grad`` (which differentiates ``nnx.Param`` by default); the forward also wraps them in
``stop_gradient``. Gradients still flow to the *inputs*, which is what the VAE loss needs.

Weights: ``create_lpips`` finds, converts (``ldm_jax.convert.lpips_weights``) or downloads
torchvision's ``vgg16-397923af.pth`` and lpips' ``v0.1/vgg.pth`` into ``default_cache_dir()``
(the shared weights cache, ``ldm_jax.weights_cache``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.convert.lpips_weights import (
    check_keys,
    HEAD_CHANNELS,
    VGG16_LAYERS,
    convert_lpips_files,
    convert_lpips_heads,
    convert_vgg16,
)
from ldm_jax.convert.torch_pickle import load_torch_state_dict
from ldm_jax.sharding import interleave_pairs, split_pairs
from ldm_jax.weights_cache import (
    default_cache_dir,
    download_if_online,
    download_notes_lines,
    find_weights_file,
    place_hint,
    store_converted,
)

__all__ = [
    "FrozenWeight",
    "VGG16Features",
    "LPIPS",
    "LPIPSWeightsMissingError",
    "load_lpips_params",
    "set_lpips_params",
    "default_cache_dir",
    "create_lpips",
    "LPIPS_NPZ_NAME",
    "VGG16_PTH_NAME",
    "HEADS_PTH_NAME",
    "VGG16_URL",
    "HEADS_URL",
]

Dtype = Any
log = logging.getLogger(__name__)

LPIPS_NPZ_NAME = "lpips_vgg16_v0.1.npz"
VGG16_PTH_NAME = "vgg16-397923af.pth"
HEADS_PTH_NAME = "lpips_v0.1_vgg.pth"  # name of lpips' v0.1/vgg.pth inside our cache dir
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
HEADS_URL = (
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
)
# The downloads' sha256 (as recorded by several projects that pin them; torchvision names its
# file by the first 8 digits). The heads file is the one the lpips wheel ships.
_VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
_HEADS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

# lpips' ScalingLayer constants: (x - shift) / scale on inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


class FrozenWeight(nnx.Variable):
    """A pretrained weight that is never trained (VGG16 convs, LPIPS heads).

    Deliberately not an ``nnx.Param``: filters on ``nnx.Param`` (optimizers, ``nnx.grad``,
    ``nnx.state(model, nnx.Param)``) skip it.
    """


class LPIPSWeightsMissingError(FileNotFoundError):
    """Pretrained LPIPS/VGG16 weights could not be found, converted or downloaded."""


# ----------------------------------------------------------------------------- modules


class _FrozenConv3x3(nnx.Module):
    """3x3 stride-1 'same' (padding 1) convolution with frozen kernel and bias."""

    def __init__(self, kernel: jax.Array, bias: jax.Array, *, dtype: Dtype):
        self.kernel = FrozenWeight(kernel)  # [3, 3, in, out]
        self.bias = FrozenWeight(bias)  # [out]
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = jax.lax.stop_gradient(self.kernel[...]).astype(self.dtype)
        bias = jax.lax.stop_gradient(self.bias[...]).astype(self.dtype)
        x = x.astype(self.dtype)
        if min(x.shape[1:3]) < 3:
            return _conv3x3_as_matmul(x, kernel) + bias
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias


def _conv3x3_as_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 'same' 3x3 convolution of an input smaller than the kernel (VGG's last stage on
    32x32 images is 2x2) as one matmul over the nine shifted copies of the padded input.

    XLA rewrites a convolution whose kernel is larger than its input by swapping the two
    operands; XLA:CPU runs that form as a naive loop, ~13x slower than this matmul for a
    512-channel layer on a 2x2 input (30 ms against 2.3 ms, forward alone). Same sums, up
    to float rounding."""
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = jnp.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)
    return jnp.einsum("nhwkc,kco->nhwo", taps, kernel.reshape(9, *kernel.shape[2:]))


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """``torch.nn.MaxPool2d(2, 2)`` on NHWC: odd trailing rows/columns are dropped.

    A max over a reshape, not ``reduce_window``: the gradient (LPIPS back-propagates to
    the reconstruction every VAE-GAN step) is then an elementwise select that XLA fuses,
    where ``reduce_window``'s is a ``select_and_scatter`` kernel of its own per pool. On a
    tie the gradient is shared among the tied inputs instead of going to the first (both
    are subgradients; after a ReLU a tie is almost always at 0, where ReLU passes none).
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class VGG16Features(nnx.Module):
    """The 13 conv layers of torchvision ``vgg16().features`` (NHWC, frozen weights).

    Returns the activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3
    (64, 128, 256, 512, 512 channels), in ``dtype``. A 2x2/2 max-pool precedes blocks 2-5.
    """

    def __init__(self, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        # torchvision's init: kaiming normal (fan_out, ReLU gain), zero bias. One normal
        # draw for all 13 kernels: much faster on CPU than 13 separately shaped draws.
        sizes = [9 * cin * cout for _n, _i, cin, cout in VGG16_LAYERS]
        flat = jax.random.normal(rngs.params(), (sum(sizes),), jnp.float32)
        start = 0
        for (name, _idx, cin, cout), size in zip(VGG16_LAYERS, sizes):
            std = math.sqrt(2.0 / (9 * cout))
            kernel = (std * flat[start : start + size]).reshape(3, 3, cin, cout)
            start += size
            # Frozen and only ever used in ``dtype``: stored in it, so a training step does
            # not convert all 14.7M weights again at every call (files load into it as well).
            bias = jnp.zeros((cout,), dtype)
            setattr(self, name, _FrozenConv3x3(kernel.astype(dtype), bias, dtype=dtype))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs: list[jax.Array] = []
        h = x.astype(self.dtype)
        block = 1
        for name, _idx, _cin, _cout in VGG16_LAYERS:
            b = int(name[4])
            if b != block:  # entering a new block: emit the previous one, then pool
                outs.append(h)
                h = _max_pool_2x2(h)
                block = b
            h = jax.nn.relu(getattr(self, name)(h))
        outs.append(h)
        return outs


class _Head(nnx.Module):
    """LPIPS 1x1 linear head without bias, weights kept >= 0 (frozen)."""

    def __init__(self, channels: int, *, param_dtype: Dtype):
        # Without pretrained heads: weight 1, i.e. lpips' uncalibrated "sum over channels".
        self.weight = FrozenWeight(jnp.ones((channels,), param_dtype))

    def __call__(self, d: jax.Array) -> jax.Array:
        w = jax.lax.stop_gradient(self.weight[...]).astype(jnp.float32)
        return jnp.einsum("bhwc,c->bhw", d, w, precision=jax.lax.Precision.HIGHEST)


def _unit_normalize(f: jax.Array) -> jax.Array:
    """``f / (||f||_channels + 1e-10)``; gradient-safe where a feature vector is all zero."""
    ss = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = ss > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)
    return f / (norm + _EPS)


class LPIPS(nnx.Module):
    """LPIPS v0.1 distance with a VGG16 trunk. ``__call__(x, y) -> [B]`` float32.

    ``x`` and ``y`` are NHWC images in [-1, 1] of any float dtype. The VGG runs in ``dtype``
    (e.g. bf16) and stores its weights in it; normalisation, differences and heads run in
    float32 (heads stored in ``param_dtype``). All weights are
    ``FrozenWeight`` (never ``nnx.Param``), so optimizers of an enclosing model never see
    them; see the module docstring.
    """

    def __init__(
        self, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        self.dtype = dtype
        self.vgg = VGG16Features(dtype=dtype, rngs=rngs)
        for k, c in enumerate(HEAD_CHANNELS):
            setattr(self, f"lin{k}", _Head(c, param_dtype=param_dtype))

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"LPIPS expects two NHWC RGB batches of equal shape, got {x.shape} and {y.shape}"
            )
        b = x.shape[0]
        shift = jnp.asarray(_SHIFT, jnp.float32)
        scale = jnp.asarray(_SCALE, jnp.float32)
        # One trunk pass for both batches, interleaved (x0, y0, x1, y1, ...) so that with the
        # batch sharded over devices the differences below need no data from other devices.
        xy = interleave_pairs(x.astype(jnp.float32), y.astype(jnp.float32))
        feats = self.vgg((xy - shift) / scale)
        total = jnp.zeros((b,), jnp.float32)
        for k, f in enumerate(feats):
            fx, fy = split_pairs(_unit_normalize(f.astype(jnp.float32)))
            d = jnp.square(fx - fy)
            total = total + jnp.mean(getattr(self, f"lin{k}")(d), axis=(1, 2))
        return total


# ----------------------------------------------------------------------------- loading


def frozen_weights(model: nnx.Module) -> dict[str, FrozenWeight]:
    """Every ``FrozenWeight`` of ``model`` by its '/'-joined path (LPIPS:
    ``{'vgg/conv1_1/kernel': variable, ..., 'lin0/weight': variable}``)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, FrozenWeight):
            out["/".join(str(p) for p in path)] = node
    return out


def set_frozen_weights(model: nnx.Module, arrays: Mapping[str, np.ndarray], what: str, *,
                       partial: bool = False) -> None:
    """Copy ``arrays`` into ``model``'s frozen weights, each cast to its variable's dtype.
    Unknown keys, and (unless ``partial``) missing keys or any shape mismatch, raise one
    ValueError listing them all, headed "``what`` weights do not fit the model"."""
    targets = frozen_weights(model)
    check_keys(f"{what} weights do not fit the model", arrays,
               {k: tuple(v.shape) for k, v in targets.items()}, partial=partial)
    for k, a in arrays.items():
        var = targets[k]
        var.set_value(jnp.asarray(np.asarray(a), dtype=var.get_value().dtype))


def set_lpips_params(
    model: LPIPS, arrays: Mapping[str, np.ndarray], *, partial: bool = False
) -> None:
    """Copy converted arrays into ``model``.

    Strict unless ``partial``: unknown keys, and (when not ``partial``) missing keys or any
    shape mismatch raise one ValueError listing them all. Values are cast to each
    variable's existing dtype.
    """
    set_frozen_weights(model, arrays, "LPIPS", partial=partial)


def load_lpips_params(model: LPIPS, path: str | os.PathLike) -> None:
    """Load a converted ``.npz`` (see ``ldm_jax.convert.lpips_weights``) strictly into ``model``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    try:
        set_lpips_params(model, arrays)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None


# ----------------------------------------------------------------------------- resolution


def _lpips_package_heads() -> str | None:
    """Path of ``weights/v0.1/vgg.pth`` inside an installed ``lpips`` (without importing it)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "weights", "v0.1", "vgg.pth")
        if os.path.isfile(path):
            return path
    return None


def _find_vgg16_source(cache: str) -> str | None:
    return find_weights_file(VGG16_PTH_NAME, cache)


def _find_heads_source(cache: str) -> str | None:
    return find_weights_file(HEADS_PTH_NAME, cache, torch_hub=False) or _lpips_package_heads()


def _missing_message(
    cache: str, vgg_src: str | None, heads_src: str | None, notes: list[str]
) -> str:
    need = []
    if vgg_src is None:
        need.append(f"  {VGG16_PTH_NAME} (torchvision VGG16 ImageNet weights) from {VGG16_URL}")
    if heads_src is None:
        need.append(
            f"  {HEADS_PTH_NAME} (lpips v0.1 VGG heads, lpips' weights/v0.1/vgg.pth) "
            f"from {HEADS_URL}"
        )
    vgg = vgg_src or os.path.join(cache, VGG16_PTH_NAME)
    heads = heads_src or os.path.join(cache, HEADS_PTH_NAME)
    out = os.path.join(cache, LPIPS_NPZ_NAME)
    lines = [
        "LPIPS pretrained weights not found. Download:",
        *need,
        place_hint(f"{'it' if len(need) == 1 else 'them'} in {cache}")
        + "; the next run converts automatically, or convert yourself:",
        f"  python -m ldm_jax.convert.lpips_weights --vgg16 {vgg} --heads {heads} --out {out}",
    ]
    if heads_src is not None:
        lines.append(f"(LPIPS heads found at {heads_src}.)")
    lines.extend(download_notes_lines(notes))
    return "\n".join(lines)


def _unloaded_lpips(dtype: Dtype) -> LPIPS:
    """An LPIPS whose weights are shape placeholders, to be fully overwritten by a load."""
    return nnx.eval_shape(lambda: LPIPS(dtype=dtype, rngs=nnx.Rngs(0)))


def create_lpips(
    weights_path: str | None = None,
    *,
    missing: str = "error",
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> tuple[LPIPS | None, str]:
    """Build an LPIPS model with pretrained weights; returns ``(model or None, status line)``.

    Order: explicit ``weights_path`` (converted ``.npz``; missing -> error regardless of
    ``missing``) -> ``default_cache_dir()/lpips_vgg16_v0.1.npz`` -> convert the two source
    ``.pth`` files if found (cache dir, torch hub cache, installed ``lpips`` package) ->
    download them (skipped when ``LDM_JAX_OFFLINE=1``) and convert. If all fail,
    ``missing`` decides: ``"error"`` raises ``LPIPSWeightsMissingError`` naming the files,
    URLs, directory and conversion command; ``"random"`` returns a randomly initialised
    VGG (real heads if available, else weight-1 heads); ``"disable"`` returns ``None``.
    """
    if missing not in ("error", "random", "disable"):
        raise ValueError(f"missing must be 'error', 'random' or 'disable', got {missing!r}")

    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise LPIPSWeightsMissingError(
                f"LPIPS weights file {weights_path} does not exist. Create it from "
                f"{VGG16_URL} and {HEADS_URL} with: python -m ldm_jax.convert.lpips_weights "
                f"--vgg16 {VGG16_PTH_NAME} --heads vgg.pth --out {weights_path}"
            )
        model = _unloaded_lpips(dtype)
        load_lpips_params(model, weights_path)
        return model, f"LPIPS: loaded VGG16 + v0.1 heads from {weights_path}"

    cache = default_cache_dir()
    npz = os.path.join(cache, LPIPS_NPZ_NAME)
    if os.path.isfile(npz):
        model = _unloaded_lpips(dtype)
        load_lpips_params(model, npz)
        return model, f"LPIPS: loaded VGG16 + v0.1 heads from {npz}"

    vgg_src, heads_src = _find_vgg16_source(cache), _find_heads_source(cache)
    notes: list[str] = []
    if vgg_src is None:
        vgg_src = download_if_online(
            VGG16_URL, os.path.join(cache, VGG16_PTH_NAME), notes, _VGG16_SHA256
        )
    if heads_src is None:
        heads_src = download_if_online(
            HEADS_URL, os.path.join(cache, HEADS_PTH_NAME), notes, _HEADS_SHA256
        )

    if vgg_src is not None and heads_src is not None:
        arrays = convert_lpips_files(vgg_src, heads_src)
        model = _unloaded_lpips(dtype)
        set_lpips_params(model, arrays)
        where = store_converted(arrays, npz)
        return model, f"LPIPS: loaded VGG16 {vgg_src} + heads {heads_src} ({where})"

    if missing == "error":
        raise LPIPSWeightsMissingError(_missing_message(cache, vgg_src, heads_src, notes))
    absent = ", ".join(
        n for n, s in ((VGG16_PTH_NAME, vgg_src), (HEADS_PTH_NAME, heads_src)) if s is None
    )
    reason = f"no {absent} in {cache}"
    if missing == "disable":
        return None, f"LPIPS: pretrained weights missing ({reason}); perceptual loss disabled"
    model = LPIPS(dtype=dtype, rngs=rngs)
    heads_note = "weight-1 heads"
    if vgg_src is not None:
        set_lpips_params(model, convert_vgg16(load_torch_state_dict(vgg_src)), partial=True)
    if heads_src is not None:
        set_lpips_params(model, convert_lpips_heads(load_torch_state_dict(heads_src)), partial=True)
        heads_note = f"heads from {heads_src}"
    if vgg_src is None:
        return model, (
            f"LPIPS: no VGG16 ImageNet weights found ({reason}); using RANDOM VGG features "
            f"({heads_note}) — perceptual term is not meaningful"
        )
    return model, (
        f"LPIPS: VGG16 from {vgg_src} but no LPIPS v0.1 heads ({reason}); using weight-1 heads "
        "(uncalibrated LPIPS)"
    )
