"""Convert diffusion U-Net weights between PyTorch (diffusers / CompVis) and ``ldm_jax``.

Our ``ldm_jax.models.unet.UNet`` is the ADM / CompVis ``openaimodel`` U-Net with plain
self-attention blocks (no cross-attention). Two PyTorch naming layouts are understood:

* ``diffusers``: ``diffusers.UNet2DModel`` (``DownBlock2D`` / ``AttnDownBlock2D`` /
  ``UpBlock2D`` / ``AttnUpBlock2D``), e.g. ``down_blocks.1.attentions.0.to_q.weight``. Our
  module tree uses the same names (see the ``unet`` module docstring), so apart from the
  ``kernel``/``scale``/``embedding`` -> ``weight`` and ``to_out`` -> ``to_out.0`` renames this
  is a layout change only. Pre-0.14 attention names (``query/key/value/proj_attn``) are
  accepted on import.
* ``compvis``: ``openaimodel.UNetModel`` of CompVis latent-diffusion (and guided-diffusion),
  as stored under ``model.diffusion_model.`` in LDM ``.ckpt`` files (that prefix, and every
  other key of such a checkpoint, is handled; ``use_ema=True`` reads the LitEma copy
  ``model_ema.diffusion_model<name without dots>`` instead). Numbering::

      input_blocks.0.0                conv_in
      input_blocks.N.0 / .N.1         ResBlock / AttentionBlock of one down step
      input_blocks.N.0.op             Downsample conv (a step of its own)
      middle_block.0 / .1 / .2        ResBlock, AttentionBlock, ResBlock
      output_blocks.N.0 / .N.1        ResBlock / AttentionBlock of one up step
      output_blocks.N.{1|2}.conv      Upsample conv (index 2 when the step has attention)
      time_embed.0 / .2, label_emb    time MLP, class table
      out.0 / out.2                   final GroupNorm, conv_out
    ResBlock: in_layers.0 = norm1, in_layers.2 = conv1, emb_layers.1 = time_emb_proj,
              out_layers.0 = norm2, out_layers.3 = conv2, skip_connection = conv_shortcut
    AttentionBlock: norm = group_norm, qkv (Conv1d C -> 3C, weight (3C, C, 1)),
              proj_out (Conv1d C -> C) = to_out

  The fused ``qkv`` output channels are ordered as ``QKVAttentionLegacy`` (the default,
  ``use_new_attention_order=False``) reads them: per head ``[q | k | v]`` of ``head_dim``
  rows each, i.e. row ``h*3*d + part*d + c``. ``attention_order="new"`` selects
  ``QKVAttention`` (``[q | k | v]`` blocks of ``C`` rows, heads inside). Splitting needs the
  head count, which the weights do not record: it comes from the config.

Conventions: conv kernels OIHW <-> OHWI (ours), Linear ``(out, in)`` <-> ``(in, out)``, Conv1d
``(out, in, 1)`` <-> ``(in, out)``, GroupNorm ``weight`` <-> ``scale``, everything float32.
Class labels: our table has ``num_classes + 1`` rows, the last being the NULL class of
classifier-free guidance; diffusers' ``num_class_embeds`` and CompVis' ``num_classes`` are
the *table size*, so they map to ``num_classes + 1``. (A PyTorch model trained without a null
class still converts exactly; call it with explicit labels, since ``y=None`` selects the
last row.)

Every conversion checks names and shapes first and raises one ``ValueError`` listing all
unknown, missing and mis-shaped keys.

Typical use::

    cfg, params, meta = import_unet("ddpm-unet/")                      # diffusers folder
    cfg, params, meta = import_unet("ldm.ckpt", config="ldm.yaml")      # CompVis LDM + its YAML
    export_diffusers(params, cfg, "out_dir")           # diffusers.UNet2DModel.from_pretrained
    export_compvis(params, cfg, "unet.safetensors", prefix=LDM_PREFIX)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.convert import autoencoder_weights as aw
from ldm_jax.convert.lpips_weights import check_keys
from ldm_jax.models.layers import kernel_from_torch, kernel_to_torch
from ldm_jax.models.unet import UNetConfig

__all__ = [
    "LAYOUTS",
    "ATTENTION_ORDERS",
    "LDM_PREFIX",
    "detect_layout",
    "infer_config",
    "config_from_diffusers",
    "config_from_compvis",
    "diffusers_config",
    "config_dict",
    "expected_torch_shapes",
    "torch_state_dict_to_params",
    "params_to_torch_state_dict",
    "load_unet_file",
    "import_unet",
    "make_unet",
    "config_for_params",
    "export_diffusers",
    "export_compvis",
]

LAYOUTS = ("diffusers", "compvis")
ATTENTION_ORDERS = ("legacy", "new")
LDM_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema."
DIFFUSERS_CLASS = "UNet2DModel"
_HEADS_HINT = ("the attention head layout is not stored in the weights: pass num_head_channels "
               "or num_heads (CLI: --num-head-channels / --num-heads), or a config")


# ------------------------------------------------------------------------- module list


@dataclasses.dataclass(frozen=True)
class _Module:
    """One PyTorch module: its kind, our path prefix and its name in each layout."""

    kind: str  # conv | linear | norm | embed | attn
    ours: tuple
    diffusers: str
    compvis: str
    heads: int = 0


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One PyTorch tensor: how it is built from (and split into) our parameters."""

    kind: str  # conv_w | linear_w | conv1d_w | vec | qkv_w | qkv_b
    paths: tuple  # our param paths (three for qkv, else one)
    torch_shape: tuple
    heads: int = 0


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: UNetConfig) -> dict[tuple, tuple]:
    """``{param path: shape}`` of ``UNet(cfg)`` (abstract: nothing allocated; cached, since
    tracing a U-Net takes seconds; do not modify the result)."""
    import jax
    from flax import nnx

    from ldm_jax.models.unet import UNet

    model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {tuple(aw._key_entry(k) for k in kp): tuple(leaf.shape)
            for kp, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _modules(cfg: UNetConfig, shapes: Mapping[tuple, tuple]) -> list[_Module]:
    """Every PyTorch module of ``UNet(cfg)``, in CompVis execution order."""
    mods: list[_Module] = []
    add = lambda *a, **k: mods.append(_Module(*a, **k))  # noqa: E731

    add("linear", ("time_embedding", "linear_1"), "time_embedding.linear_1", "time_embed.0")
    add("linear", ("time_embedding", "linear_2"), "time_embedding.linear_2", "time_embed.2")
    if cfg.num_classes is not None:
        add("embed", ("class_embedding",), "class_embedding", "label_emb")
    add("conv", ("conv_in",), "conv_in", "input_blocks.0.0")

    def resnet(ours: tuple, cv: str) -> None:
        parts = [("norm", "norm1", "in_layers.0"), ("conv", "conv1", "in_layers.2"),
                 ("linear", "time_emb_proj", "emb_layers.1"), ("norm", "norm2", "out_layers.0"),
                 ("conv", "conv2", "out_layers.3")]
        if ours + ("conv_shortcut", "kernel") in shapes:
            parts.append(("conv", "conv_shortcut", "skip_connection"))
        for kind, name, cv_name in parts:
            add(kind, ours + (name,), _dotted(ours + (name,)), f"{cv}.{cv_name}")

    def attention(ours: tuple, cv: str, ch: int) -> None:
        add("attn", ours, _dotted(ours), cv, heads=cfg.heads(ch))

    levels = len(cfg.channel_mult)
    n = 1
    for i, w in enumerate(cfg.widths):
        for j in range(cfg.num_res_blocks):
            resnet(("down_blocks", i, "resnets", j), f"input_blocks.{n}.0")
            if cfg.level_has_attention(i):
                attention(("down_blocks", i, "attentions", j), f"input_blocks.{n}.1", w)
            n += 1
        if i != levels - 1:
            p = ("down_blocks", i, "downsamplers", 0, "conv")
            add("conv", p, _dotted(p), f"input_blocks.{n}.0.op")
            n += 1
    resnet(("mid_block", "resnets", 0), "middle_block.0")
    attention(("mid_block", "attentions", 0), "middle_block.1", cfg.widths[-1])
    resnet(("mid_block", "resnets", 1), "middle_block.2")
    n = 0
    for k in range(levels):
        i = levels - 1 - k
        attn = cfg.level_has_attention(i)
        for j in range(cfg.num_res_blocks + 1):
            resnet(("up_blocks", k, "resnets", j), f"output_blocks.{n}.0")
            if attn:
                attention(("up_blocks", k, "attentions", j), f"output_blocks.{n}.1", cfg.widths[i])
            if i != 0 and j == cfg.num_res_blocks:
                p = ("up_blocks", k, "upsamplers", 0, "conv")
                add("conv", p, _dotted(p), f"output_blocks.{n}.{2 if attn else 1}.conv")
            n += 1
    add("norm", ("conv_norm_out",), "conv_norm_out", "out.0")
    add("conv", ("conv_out",), "conv_out", "out.2")
    return mods


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _key_map(cfg: UNetConfig, layout: str, attention_order: str = "legacy"
             ) -> tuple[dict[str, _Entry], dict[tuple, tuple]]:
    """``({torch key: _Entry}, {our path: our shape})`` of ``UNet(cfg)`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if attention_order not in ATTENTION_ORDERS:
        raise ValueError(f"attention_order must be one of {ATTENTION_ORDERS}, "
                         f"got {attention_order!r}")
    shapes = _param_shapes(cfg)
    out: dict[str, _Entry] = {}

    def weight_bias(name: str, ours: tuple, kind: str, wleaf: str = "kernel") -> None:
        w = shapes[ours + (wleaf,)]
        if kind == "conv_w":
            tshape = (w[0], w[3], w[1], w[2])  # ours OHWI -> torch OIHW
        elif kind == "conv1d_w":
            tshape = (w[1], w[0], 1)
        elif kind == "linear_w":
            tshape = (w[1], w[0])
        else:  # vec: GroupNorm scale, Embed table
            tshape = w
        out[f"{name}.weight"] = _Entry(kind, (ours + (wleaf,),), tuple(tshape))
        if ours + ("bias",) in shapes:
            out[f"{name}.bias"] = _Entry("vec", (ours + ("bias",),), shapes[ours + ("bias",)])

    for m in _modules(cfg, shapes):
        name = m.diffusers if layout == "diffusers" else m.compvis
        if m.kind == "conv":
            weight_bias(name, m.ours, "conv_w")
        elif m.kind == "linear":
            weight_bias(name, m.ours, "linear_w")
        elif m.kind == "norm":
            weight_bias(name, m.ours, "vec", "scale")
        elif m.kind == "embed":
            weight_bias(name, m.ours, "vec", "embedding")
        elif layout == "diffusers":  # attention, separate projections
            weight_bias(f"{name}.group_norm", m.ours + ("group_norm",), "vec", "scale")
            for proj, torch_proj in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"),
                                     ("to_out", "to_out.0")):
                weight_bias(f"{name}.{torch_proj}", m.ours + (proj,), "linear_w")
        else:  # attention, CompVis fused qkv
            weight_bias(f"{name}.norm", m.ours + ("group_norm",), "vec", "scale")
            c = shapes[m.ours + ("to_q", "kernel")][0]
            qkv = tuple(m.ours + (p,) for p in ("to_q", "to_k", "to_v"))
            out[f"{name}.qkv.weight"] = _Entry("qkv_w", tuple(p + ("kernel",) for p in qkv),
                                               (3 * c, c, 1), m.heads)
            out[f"{name}.qkv.bias"] = _Entry("qkv_b", tuple(p + ("bias",) for p in qkv),
                                             (3 * c,), m.heads)
            weight_bias(f"{name}.proj_out", m.ours + ("to_out",), "conv1d_w")
    covered = {p for e in out.values() for p in e.paths}
    assert covered == set(shapes), sorted(set(shapes) ^ covered)  # the map covers the model
    return out, shapes


def expected_torch_shapes(cfg: UNetConfig, layout: str) -> dict[str, tuple]:
    """``{torch key: torch shape}`` of a ``UNet(cfg)`` state dict in ``layout``."""
    return {k: e.torch_shape for k, e in _key_map(cfg, layout)[0].items()}


# ------------------------------------------------------------------------- tensors


def _split_qkv(a: np.ndarray, heads: int, order: str) -> list[np.ndarray]:
    """Fused qkv rows (3C, ...) -> [q, k, v], each (C, ...) with head-major rows."""
    c = a.shape[0] // 3
    rest = a.shape[1:]
    if order == "legacy":
        a = a.reshape(heads, 3, c // heads, *rest)
        return [np.ascontiguousarray(a[:, i].reshape(c, *rest)) for i in range(3)]
    return [np.ascontiguousarray(x) for x in a.reshape(3, c, *rest)]


def _merge_qkv(parts: list[np.ndarray], heads: int, order: str) -> np.ndarray:
    c = parts[0].shape[0]
    rest = parts[0].shape[1:]
    if order == "legacy":
        stacked = np.stack([p.reshape(heads, c // heads, *rest) for p in parts], axis=1)
        return stacked.reshape(3 * c, *rest)
    return np.concatenate(parts, axis=0)


def _from_torch(e: _Entry, v: np.ndarray, order: str) -> list[np.ndarray]:
    """Torch tensor -> our arrays, one per ``e.paths``."""
    if e.kind == "conv_w":
        return [kernel_from_torch(v)]
    if e.kind == "linear_w":
        return [v.T]
    if e.kind == "conv1d_w":
        return [v[:, :, 0].T]
    if e.kind == "qkv_w":
        return [p.T for p in _split_qkv(v[:, :, 0], e.heads, order)]
    if e.kind == "qkv_b":
        return _split_qkv(v, e.heads, order)
    return [v]


def _to_torch(e: _Entry, ours: list[np.ndarray], order: str) -> np.ndarray:
    if e.kind == "conv_w":
        return kernel_to_torch(ours[0])
    if e.kind == "linear_w":
        return ours[0].T
    if e.kind == "conv1d_w":
        return ours[0].T[:, :, None]
    if e.kind == "qkv_w":
        return _merge_qkv([p.T for p in ours], e.heads, order)[:, :, None]
    if e.kind == "qkv_b":
        return _merge_qkv(ours, e.heads, order)
    return ours[0]


# ------------------------------------------------------------------------- state dicts


def detect_layout(keys) -> str:
    """'diffusers' or 'compvis' from the key names (after any LDM prefix strip)."""
    keys = list(keys)
    if any(re.match(r"^(down_blocks|up_blocks|mid_block)\.", k) for k in keys):
        return "diffusers"
    if any(re.match(r"^(input_blocks|middle_block|output_blocks)\.", k) for k in keys):
        return "compvis"
    raise ValueError(
        "cannot tell the layout of this state dict (neither diffusers 'down_blocks/mid_block/"
        "up_blocks' nor CompVis 'input_blocks/middle_block/output_blocks' names at the top "
        f"level); is it a diffusion U-Net? First keys: {sorted(keys)[:8]}")


def _select(sd: Mapping[str, Any], use_ema: bool) -> dict[str, Any]:
    """The U-Net part of ``sd``: ``model.diffusion_model.*`` of an LDM checkpoint (or, with
    ``use_ema``, its LitEma copy ``model_ema.diffusion_model<name without dots>``)."""
    keys = [k for k in sd if k.startswith(LDM_PREFIX)]
    if not keys:
        if use_ema:
            raise ValueError(f"use_ema needs an LDM checkpoint ({LDM_PREFIX}* and "
                             f"{LDM_EMA_PREFIX}* keys); this state dict has no {LDM_PREFIX}* keys")
        return dict(sd)
    if not use_ema:
        return {k[len(LDM_PREFIX):]: sd[k] for k in keys}
    out, missing = {}, []
    for k in keys:
        ema = LDM_EMA_PREFIX + k[len("model."):].replace(".", "")
        if ema in sd:
            out[k[len(LDM_PREFIX):]] = sd[ema]
        else:
            missing.append(ema)
    if missing:
        raise ValueError(f"use_ema: {len(missing)} of {len(keys)} U-Net tensors have no EMA copy "
                         f"(e.g. {missing[:3]}); does this checkpoint hold {LDM_EMA_PREFIX}* "
                         "weights?")
    return out


def _normalise(sd: Mapping[str, Any], layout: str, use_ema: bool = False
               ) -> tuple[dict[str, np.ndarray], str]:
    sd = _select(sd, use_ema)
    if layout == "auto":
        layout = detect_layout(sd)
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    return aw.as_numpy_state_dict(sd, layout), layout


def _fit_rank(sd: dict[str, np.ndarray], expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    """Accept projections whose stored rank differs only by trailing unit dims: Linear
    ``(out, in)`` vs Conv1d ``(out, in, 1)`` vs 1x1 Conv2d ``(out, in, 1, 1)``."""
    def core(shape):
        return tuple(shape[:2]) + tuple(d for d in shape[2:] if d != 1)

    out = dict(sd)
    for k, v in sd.items():
        want = expected.get(k)
        if (want is not None and tuple(v.shape) != tuple(want) and v.ndim >= 2 and len(want) >= 2
                and core(v.shape) == core(want)):
            out[k] = v.reshape(want)
    return out


def torch_state_dict_to_params(
    sd: Mapping[str, Any],
    cfg: UNetConfig,
    layout: str = "auto",
    *,
    attention_order: str = "legacy",
    use_ema: bool = False,
) -> dict:
    """PyTorch state dict (numpy arrays or torch tensors) -> pure param dict of ``UNet(cfg)``.

    An LDM ``.ckpt`` state dict is accepted whole (``model.diffusion_model.*`` is used, or its
    EMA copy with ``use_ema``). ``attention_order`` applies to the CompVis fused ``qkv``.
    Raises ValueError listing every unknown, missing and mis-shaped key.
    """
    sd, layout = _normalise(sd, layout, use_ema)
    kmap, shapes = _key_map(cfg, layout, attention_order)
    sd = _fit_rank(sd, {k: e.torch_shape for k, e in kmap.items()})
    check_keys(f"{layout} U-Net state dict", sd, {k: e.torch_shape for k, e in kmap.items()})
    flat = {}
    for key, e in kmap.items():
        value = sd[key]
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.kind != "V":
            raise ValueError(f"{key}: expected a floating-point tensor, got {value.dtype}")
        for path, arr in zip(e.paths, _from_torch(e, value.astype(np.float32), attention_order)):
            flat[path] = np.ascontiguousarray(arr.reshape(shapes[path]))
    return aw._unflatten(flat)


def params_to_torch_state_dict(params: Any, cfg: UNetConfig, layout: str = "diffusers", *,
                               prefix: str = "", attention_order: str = "legacy"
                               ) -> dict[str, np.ndarray]:
    """Pure param dict (or ``nnx.State``) of ``UNet(cfg)`` -> PyTorch-layout state dict of
    float32 numpy arrays, keys optionally prefixed (``prefix=LDM_PREFIX`` for LDM names)."""
    if layout == "diffusers":
        diffusers_config(cfg)  # raises when cfg has no diffusers equivalent
    flat = aw._flatten(params)
    kmap, shapes = _key_map(cfg, layout, attention_order)
    check_keys("U-Net params", {_dotted(p): v for p, v in flat.items()},
               {_dotted(p): s for p, s in shapes.items()})
    return {prefix + key: np.ascontiguousarray(
                _to_torch(e, [flat[p].astype(np.float32) for p in e.paths], attention_order))
            for key, e in kmap.items()}


# ------------------------------------------------------------------------- configs


def _ints(keys, pattern: str, group: int = 1) -> list[int]:
    return sorted({int(m.group(group)) for k in keys if (m := re.match(pattern, k))})


def _heads_kwargs(num_head_channels: int | None, num_heads: int | None) -> dict:
    if num_head_channels is not None and num_head_channels > 0:
        return {"num_head_channels": int(num_head_channels), "num_heads": -1}
    if num_heads is not None and num_heads > 0:
        return {"num_head_channels": -1, "num_heads": int(num_heads)}
    raise ValueError(_HEADS_HINT)


def infer_config(sd: Mapping[str, Any], layout: str = "auto", *,
                 num_head_channels: int | None = None, num_heads: int | None = None,
                 norm_groups: int = 32, norm_eps: float = 1e-5, use_ema: bool = False
                 ) -> UNetConfig:
    """``UNetConfig`` from a state dict's keys and shapes.

    Read from the weights: in/out channels, model_channels, channel_mult, num_res_blocks,
    the attention levels, scale-shift norm and the class table. Not recorded in them, so
    given here: the head layout (``num_head_channels`` or ``num_heads``; required) and the
    GroupNorm groups / epsilon (CompVis always uses 32 / 1e-5; diffusers' defaults too).
    """
    sd, layout = _normalise(sd, layout, use_ema)
    heads = _heads_kwargs(num_head_channels, num_heads)
    what = f"{layout} U-Net state dict"

    def get(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"cannot infer the U-Net config from this {what}: key {key!r} is "
                             "missing")
        return sd[key]

    if layout == "diffusers":
        if any(".transformer_blocks." in k or ".attn2." in k for k in sd):
            raise ValueError("this is a cross-attention U-Net (UNet2DConditionModel: "
                             "transformer_blocks); ldm_jax's UNet has self-attention only")
        levels = _ints(sd, r"^down_blocks\.(\d+)\.")
        n = len(levels)
        widths = [int(get(f"down_blocks.{i}.resnets.0.conv1.weight").shape[0]) for i in levels]
        nres = len(_ints(sd, r"^down_blocks\.0\.resnets\.(\d+)\."))
        attn = set(_ints(sd, r"^down_blocks\.(\d+)\.attentions\."))
        up_attn = {n - 1 - k for k in _ints(sd, r"^up_blocks\.(\d+)\.attentions\.")}
        if attn != up_attn:
            raise ValueError(f"attention at down levels {sorted(attn)} but up levels "
                             f"{sorted(up_attn)}: ldm_jax's UNet attends at the same levels")
        if (any(k.startswith("mid_block.attentions.0.") for k in sd)
                and "mid_block.attentions.0.group_norm.weight" not in sd):
            raise ValueError("the mid-block attention has no GroupNorm (a diffusers "
                             "UNet2DModel with resnet_time_scale_shift='scale_shift' and "
                             "attn_norm_num_groups=None); ldm_jax's UNet always normalises")
        conv_in, conv_out = get("conv_in.weight"), get("conv_out.weight")
        temb0 = get("down_blocks.0.resnets.0.time_emb_proj.weight")
        table = sd.get("class_embedding.weight")
        if "class_embedding.linear_1.weight" in sd:
            raise ValueError("class_embed_type='timestep' is not supported (ldm_jax's UNet has "
                             "a class embedding table only)")
    else:
        if any(".transformer_blocks." in k or ".proj_in." in k for k in sd):
            raise ValueError("this CompVis U-Net uses SpatialTransformer (cross-attention) "
                             "blocks; ldm_jax's UNet has plain self-attention only")
        conv_in, conv_out = get("input_blocks.0.0.weight"), get("out.2.weight")
        steps = _ints(sd, r"^input_blocks\.(\d+)\.")
        widths, attn, nres_per_level = [], set(), [0]
        for s in steps[1:]:
            if f"input_blocks.{s}.0.op.weight" in sd:
                widths.append(None)  # level boundary marker
                nres_per_level.append(0)
                continue
            w = int(get(f"input_blocks.{s}.0.in_layers.2.weight").shape[0])
            if nres_per_level[-1] == 0:
                widths.append(w)
            nres_per_level[-1] += 1
            if f"input_blocks.{s}.1.qkv.weight" in sd:
                attn.add(len(nres_per_level) - 1)
        widths = [w for w in widths if w is not None]
        if len(set(nres_per_level)) != 1 or len(widths) != len(nres_per_level):
            raise ValueError(f"{what}: levels with different ResBlock counts {nres_per_level} "
                             "(or a resblock_updown U-Net); not expressible by ldm_jax's UNet")
        nres = nres_per_level[0]
        n = len(widths)
        temb0 = get("input_blocks.1.0.emb_layers.1.weight")
        table = sd.get("label_emb.weight")
        if table is not None and table.ndim != 2:
            raise ValueError("label_emb is not an nn.Embedding table (num_classes='sequential'?)")
    mc = int(conv_in.shape[0])
    if not widths or any(w % mc for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of model_channels={mc}")
    if int(temb0.shape[0]) not in (widths[0], 2 * widths[0]):
        raise ValueError(f"time_emb_proj has {temb0.shape[0]} outputs for width {widths[0]}")
    num_classes = None
    if table is not None:
        if table.shape[0] < 2:
            raise ValueError("a class table with a single row cannot be expressed (ours has "
                             "num_classes + 1 rows, num_classes >= 1)")
        num_classes = int(table.shape[0]) - 1
    return UNetConfig(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(conv_out.shape[0]),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=nres,
        attention_resolutions=tuple(sorted(2**i for i in attn)),
        num_classes=num_classes,
        use_scale_shift_norm=int(temb0.shape[0]) == 2 * widths[0],
        norm_groups=int(norm_groups),
        norm_eps=float(norm_eps),
        **heads,
    )


_DIFFUSERS_REQUIRED = {
    # key: (required value, default when absent, why)
    "time_embedding_type": ("positional", "positional", "ours is the sinusoidal embedding"),
    "flip_sin_to_cos": (True, True, "ours is [cos, sin] (openaimodel order)"),
    "freq_shift": (0, 0, "ours uses frequencies exp(-log(10000) k / (dim/2))"),
    "center_input_sample": (False, False, "ours does not rescale the input"),
    "downsample_padding": (1, 1, "ours pads the stride-2 conv by 1 on every side"),
    "downsample_type": ("conv", "conv", "ours downsamples with a conv"),
    "upsample_type": ("conv", "conv", "ours upsamples nearest + conv"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D",
                       "ours has a ResBlock-attention-ResBlock middle"),
    "mid_block_scale_factor": (1, 1, "ours has no output rescaling"),
    "add_attention": (True, True, "ours always attends in the middle block"),
    "class_embed_type": (None, None, "ours has a class table (num_class_embeds) only"),
}


def config_from_diffusers(dcfg: Mapping[str, Any]) -> UNetConfig:
    """``UNetConfig`` from a diffusers ``UNet2DModel`` ``config.json`` dict (one error lists
    every setting our U-Net cannot express)."""
    cls = dcfg.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise ValueError(f"config.json describes a {cls!r}, not a diffusers {DIFFUSERS_CLASS}")
    problems = []
    for key, (want, default, why) in _DIFFUSERS_REQUIRED.items():
        have = dcfg.get(key, default)
        if have != want and not (isinstance(want, bool) and have == int(want)):
            problems.append(f"{key}={have!r} (needs {want!r}: {why})")
    if dcfg.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn={dcfg['act_fn']!r} (ours: silu)")
    boc = [int(c) for c in dcfg.get("block_out_channels", (224, 448, 672, 896))]
    down = list(dcfg.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                               "AttnDownBlock2D")))
    up = list(dcfg.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                                           "UpBlock2D")))
    n = len(boc)
    if len(down) != n or len(up) != n:
        problems.append(f"{len(down)} down / {len(up)} up block types for {n} levels")
    ok_down, ok_up = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
    if any(t not in ok_down for t in down) or any(t not in ok_up for t in up):
        problems.append(f"block types {down} / {up} (supported: {ok_down} / {ok_up})")
    attn = {i for i, t in enumerate(down) if t == "AttnDownBlock2D"}
    if attn != {n - 1 - k for k, t in enumerate(up) if t == "AttnUpBlock2D"}:
        problems.append(f"down attention levels {sorted(attn)} differ from the up levels "
                        f"{up} (ours attends at the same levels going up and down)")
    mc = boc[0]
    if any(c % mc for c in boc):
        problems.append(f"block_out_channels {boc} are not multiples of the first")
    ted = dcfg.get("time_embedding_dim")
    if ted is not None and int(ted) != 4 * mc:
        problems.append(f"time_embedding_dim={ted} (ours: 4 * block_out_channels[0] = {4 * mc})")
    groups = int(dcfg.get("norm_num_groups", 32) or 32)
    shift = dcfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={shift!r} (supported: default, scale_shift)")
    attn_groups = dcfg.get("attn_norm_num_groups")
    if attn_groups is None and shift != "default":
        problems.append("resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None: "
                        "diffusers' mid-block attention then has no GroupNorm, ours always has one")
    elif attn_groups is not None and int(attn_groups) != groups:
        problems.append(f"attn_norm_num_groups={attn_groups} != norm_num_groups={groups}")
    head_dim = dcfg.get("attention_head_dim", 8)
    if isinstance(head_dim, (list, tuple)):
        problems.append(f"per-level attention_head_dim {head_dim} (ours has one)")
        head_dim = None
    nce = dcfg.get("num_class_embeds")
    if nce is not None and int(nce) < 2:
        problems.append(f"num_class_embeds={nce} (ours has num_classes + 1 >= 2 label rows)")
    if problems:
        raise ValueError(f"diffusers {DIFFUSERS_CLASS} config not expressible by ldm_jax's "
                         "UNet: " + "; ".join(problems))
    heads = ({"num_head_channels": -1, "num_heads": 1} if head_dim is None
             else {"num_head_channels": int(head_dim), "num_heads": -1})
    return UNetConfig(
        in_channels=int(dcfg.get("in_channels", 3)),
        out_channels=int(dcfg.get("out_channels", 3)),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=int(dcfg.get("layers_per_block", 2)),
        attention_resolutions=tuple(sorted(2**i for i in attn)),
        dropout=float(dcfg.get("dropout", 0.0)),
        num_classes=int(nce) - 1 if nce is not None else None,
        use_scale_shift_norm=shift == "scale_shift",
        norm_eps=float(dcfg.get("norm_eps", 1e-5)),
        norm_groups=groups,
        **heads,
    )


def _attention_head_dim(cfg: UNetConfig) -> int | None:
    """diffusers' single ``attention_head_dim`` for ``cfg`` (None = one head per block)."""
    if cfg.num_head_channels > 0:
        return cfg.num_head_channels
    if cfg.num_heads == 1:
        return None
    widths = {w for i, w in enumerate(cfg.widths) if cfg.level_has_attention(i)} | {cfg.widths[-1]}
    dims = {w // cfg.num_heads for w in widths}
    if len(dims) != 1:
        raise ValueError(f"num_heads={cfg.num_heads} gives head widths {sorted(dims)} at the "
                         f"attention widths {sorted(widths)}; diffusers has one attention_head_dim")
    return dims.pop()


def diffusers_config(cfg: UNetConfig, *, sample_size: int | None = None) -> dict:
    """diffusers ``UNet2DModel`` ``config.json`` contents for ``cfg``."""
    if cfg.channel_mult[0] != 1:
        raise ValueError(f"channel_mult[0]={cfg.channel_mult[0]} != 1: diffusers' conv_in outputs "
                         "block_out_channels[0] and its time embedding is 4x that, so "
                         "model_channels must equal the first level's width")
    n = len(cfg.channel_mult)
    out = {
        "_class_name": DIFFUSERS_CLASS,
        "sample_size": int(sample_size) if sample_size else None,
        "in_channels": int(cfg.in_channels),
        "out_channels": int(cfg.out_channels),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if cfg.level_has_attention(i) else "DownBlock2D"
                             for i in range(n)],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if cfg.level_has_attention(n - 1 - k) else "UpBlock2D"
                           for k in range(n)],
        "block_out_channels": [int(w) for w in cfg.widths],
        "layers_per_block": int(cfg.num_res_blocks),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(cfg.dropout),
        "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(cfg),
        "norm_num_groups": int(cfg.norm_groups),
        "attn_norm_num_groups": int(cfg.norm_groups),  # keeps the mid attention's GroupNorm
        "norm_eps": float(cfg.norm_eps),
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes is not None else None,
    }
    return out


def _compvis_params(d: Mapping[str, Any]) -> dict:
    """openaimodel ``UNetModel`` arguments from a CompVis config: a whole LDM YAML
    (``model.params.unet_config.params``), a ``{target, params}`` node, or the arguments."""
    d = dict(d)
    if isinstance(d.get("model"), Mapping):
        d = dict(d["model"])
    if isinstance(d.get("params"), Mapping) and isinstance(d["params"].get("unet_config"), Mapping):
        d = dict(d["params"]["unet_config"])
    if isinstance(d.get("unet_config"), Mapping):
        d = dict(d["unet_config"])
    if isinstance(d.get("params"), Mapping):
        target = str(d.get("target", ""))
        if target and not target.endswith("UNetModel"):
            raise ValueError(f"the CompVis config's U-Net target is {target!r}, not an "
                             "openaimodel UNetModel")
        d = dict(d["params"])
    return d


def config_from_compvis(d: Mapping[str, Any]) -> UNetConfig:
    """``UNetConfig`` from a CompVis openaimodel config (see ``_compvis_params``); its
    ``num_classes`` is the table size (ours + 1). GroupNorm is openaimodel's: 32 groups, 1e-5."""
    p = _compvis_params(d)
    problems = []
    required = ("in_channels", "out_channels", "model_channels", "num_res_blocks",
                "attention_resolutions")
    if "model_channels" not in p:
        raise ValueError("not a CompVis openaimodel UNetModel config (no model_channels); "
                         f"keys: {sorted(p)[:12]}")
    if any(k not in p for k in required):
        raise ValueError(f"CompVis UNetModel config lacks {[k for k in required if k not in p]}")
    for key, want in (("use_spatial_transformer", False), ("resblock_updown", False),
                      ("conv_resample", True), ("dims", 2)):
        if key in p and p[key] != want:
            problems.append(f"{key}={p[key]!r} (ours: {want!r})")
    if p.get("context_dim") is not None:
        problems.append("context_dim is set (cross-attention is not supported)")
    nh, nhc = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    nhu = int(p.get("num_heads_upsample", -1))
    if nhu not in (-1, nh):
        problems.append(f"num_heads_upsample={nhu} != num_heads={nh} (ours: one head layout)")
    nc = p.get("num_classes")
    if nc is not None and not isinstance(nc, int):
        problems.append(f"num_classes={nc!r} (ours: an int table size)")
    elif nc is not None and nc < 2:
        problems.append(f"num_classes={nc} (ours has num_classes + 1 >= 2 label rows)")
    if problems:
        raise ValueError("CompVis UNetModel config not expressible by ldm_jax's UNet: "
                         + "; ".join(problems))
    return UNetConfig(
        in_channels=int(p["in_channels"]),
        out_channels=int(p["out_channels"]),
        model_channels=int(p["model_channels"]),
        channel_mult=tuple(int(m) for m in p.get("channel_mult", (1, 2, 4, 8))),
        num_res_blocks=int(p["num_res_blocks"]),
        attention_resolutions=tuple(int(a) for a in p["attention_resolutions"]),
        num_head_channels=nhc if nhc > 0 else -1,
        num_heads=nh if nhc <= 0 else -1,
        dropout=float(p.get("dropout", 0.0)),
        num_classes=int(nc) - 1 if nc is not None else None,
        use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
        norm_eps=1e-5,
        norm_groups=32,
    )


def config_dict(cfg: UNetConfig) -> dict:
    """JSON-ready dict of ``cfg`` (what ``save_pretrained`` stores)."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _config_kind(d: Mapping[str, Any]) -> str:
    """'diffusers' | 'compvis' | 'ldm_jax' for a config dict."""
    if d.get("_class_name") or "block_out_channels" in d:
        return "diffusers"
    if str(d.get("format", "")).startswith("ldm_jax.pretrained") or "norm_groups" in d:
        return "ldm_jax"
    if d.get("trainer") == "ldm" and isinstance(d.get("model"), Mapping):
        return "ldm_jax"  # an ldm_jax LDM workdir's config.json
    return "compvis"


def _read_config_file(path: str) -> dict:
    """A config file: JSON (diffusers config.json, ldm_jax pretrained.json / config dict, or
    CompVis arguments) or a CompVis LDM YAML; a directory means its config.json."""
    if os.path.isdir(path):
        d = _diffusers_unet_dir(path)
        if d is not None:
            path = os.path.join(d, "config.json")
        elif os.path.isfile(os.path.join(path, "pretrained.json")):
            path = os.path.join(path, "pretrained.json")
        else:
            raise FileNotFoundError(f"no diffusers U-Net config.json in {path} (or {path}/unet) "
                                    "and no ldm_jax pretrained.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such config file: {path}")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(f)
        return json.load(f)


def _config_from_any(config: Any) -> tuple[UNetConfig, int | None, str | None]:
    """``(cfg, sample size or None, CompVis attention order or None)`` from ``config``."""
    if isinstance(config, UNetConfig):
        return config, None, None
    d = _read_config_file(os.fspath(config)) if isinstance(config, (str, os.PathLike)) \
        else dict(config)
    kind = _config_kind(d)
    if kind == "diffusers":
        return config_from_diffusers(d), aw._sample_size(d), None
    if kind == "ldm_jax":
        inner = d.get("config") if isinstance(d.get("config"), Mapping) else d.get("model", d)
        return UNetConfig.from_dict(inner), d.get("sample_size"), None
    p = _compvis_params(d)
    order = "new" if p.get("use_new_attention_order") else "legacy"
    return config_from_compvis(p), p.get("image_size"), order


# ------------------------------------------------------------------------- files

DIFFUSERS_WEIGHT_FILES = aw.DIFFUSERS_WEIGHT_FILES


def _diffusers_unet_dir(path: str) -> str | None:
    """The diffusers UNet2DModel folder at ``path`` (or its ``unet/`` in a pipeline)."""
    for d in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(d, "config.json")) and any(
                os.path.isfile(os.path.join(d, f)) for f in DIFFUSERS_WEIGHT_FILES):
            return d
    return None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Tensors of ``path``; of a full LDM checkpoint only the U-Net (and EMA) keys."""
    with aw.safe_open_np(path) as f:
        keys = list(f.keys())
        wanted = [k for k in keys if k.startswith((LDM_PREFIX, LDM_EMA_PREFIX))]
        if not any(k.startswith(LDM_PREFIX) for k in wanted):
            wanted = keys
        try:
            return {k: f.get_tensor(k) for k in wanted}
        except TypeError:  # bf16 / fp8: numpy has no such dtype
            pass
    return aw._read_safetensors_raw(path, wanted)


def load_unet_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """State dict from a diffusers U-Net folder (or pipeline folder with ``unet/``), a
    ``.safetensors`` or a torch ``.ckpt/.pth/.pt/.bin`` (read without torch)."""
    return aw.load_torch_file(path, find_dir=_diffusers_unet_dir, subfolder="unet")


def import_unet(
    src: str | os.PathLike,
    layout: str = "auto",
    *,
    config: str | os.PathLike | Mapping[str, Any] | UNetConfig | None = None,
    use_ema: bool = False,
    attention_order: str | None = None,
    num_head_channels: int | None = None,
    num_heads: int | None = None,
    norm_groups: int = 32,
) -> tuple[UNetConfig, dict, dict]:
    """Read ``src`` (diffusers folder, .safetensors, .ckpt/.pth/.bin) -> ``(cfg, params, meta)``.

    ``config``: a ``UNetConfig``, or a path/dict of a diffusers ``config.json``, an ldm_jax
    ``pretrained.json`` / UNetConfig dict, or a CompVis LDM YAML / openaimodel arguments. By
    default a diffusers folder's own ``config.json``; otherwise the architecture is inferred
    from the weights with the head layout from ``num_head_channels`` / ``num_heads`` and
    ``norm_groups`` GroupNorm groups (neither is recorded in the weights).
    ``attention_order``: CompVis qkv order (default: the CompVis config's
    ``use_new_attention_order``, else "legacy"). ``meta`` holds ``layout``, ``source`` and,
    when known, ``sample_size`` and ``attention_order``.
    """
    src = os.fspath(src)
    sd = load_unet_file(src)
    cfg, size, cfg_order = None, None, None
    if config is not None:
        cfg, size, cfg_order = _config_from_any(config)
    elif os.path.isdir(src):
        cfg, size, cfg_order = _config_from_any(_read_config_file(src))
    sd, layout = _normalise(sd, layout, use_ema)
    if cfg is None:
        cfg = infer_config(sd, layout, num_head_channels=num_head_channels, num_heads=num_heads,
                           norm_groups=norm_groups)
    order = attention_order or cfg_order or "legacy"
    params = torch_state_dict_to_params(sd, cfg, layout, attention_order=order)
    meta: dict[str, Any] = {"layout": layout, "source": os.path.abspath(src)}
    if layout == "compvis":
        meta["attention_order"] = order
    if use_ema:
        meta["ema"] = True
    if size:
        meta["sample_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
    return cfg, params, meta


def make_unet(cfg: UNetConfig, params: Any, **model_kwargs):
    """``UNet(cfg, **model_kwargs)`` holding ``params`` (checked: one error lists every
    missing / unexpected / mis-shaped entry); no random initialisation is run."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ldm_jax.models.unet import UNet
    from ldm_jax.pretrained import fill_params

    model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0), **model_kwargs))
    nnx.update(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(model)))
    return fill_params(model, params, "(converted)")


def config_for_params(cfg_dict: Mapping[str, Any], params: Any) -> UNetConfig:
    """``UNetConfig`` from a stored config dict (pretrained.json or an LDM workdir's
    ``model`` section, where in/out channels may be -1 = 'latent channels') and the params,
    which fix the channels."""
    d = dict(cfg_dict)
    flat = aw._flatten(params)
    for key, path, axis in (("in_channels", ("conv_in", "kernel"), 3),
                            ("out_channels", ("conv_out", "kernel"), 0)):
        if int(d.get(key, -1)) == -1:
            if path not in flat:
                raise ValueError(f"{key} is -1 and the params have no {'/'.join(path)}")
            d[key] = int(flat[path].shape[axis])
    return UNetConfig.from_dict(d)


def export_diffusers(params: Any, cfg: UNetConfig, out_dir: str, *,
                     sample_size: int | None = None) -> str:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` loadable with
    ``diffusers.UNet2DModel.from_pretrained(out_dir)``. Returns ``out_dir``."""
    dcfg = diffusers_config(cfg, sample_size=sample_size)
    sd = params_to_torch_state_dict(params, cfg, "diffusers")
    os.makedirs(out_dir, exist_ok=True)
    aw._save_tensors(sd, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"),
                     metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dcfg, f, indent=2)
    return out_dir


def export_compvis(params: Any, cfg: UNetConfig, path: str, prefix: str = "", *,
                   attention_order: str = "legacy") -> str:
    """Write CompVis openaimodel-named weights to ``path``: ``.safetensors`` (no torch
    needed) or ``.ckpt`` / ``.pth`` / ``.pt`` (needs torch; saved as ``{"state_dict": ...}``).
    ``prefix=LDM_PREFIX`` gives the names of an LDM checkpoint."""
    if cfg.norm_groups != 32 or cfg.norm_eps != 1e-5:
        warnings.warn(f"CompVis' openaimodel normalises with GroupNorm(32, eps=1e-5); this U-Net "
                      f"uses {cfg.norm_groups} groups, eps={cfg.norm_eps}, so a stock "
                      "openaimodel computes a different function with these weights",
                      stacklevel=2)
    return aw.save_compvis_state_dict(
        params_to_torch_state_dict(params, cfg, "compvis", prefix=prefix, attention_order=attention_order),
        path)
