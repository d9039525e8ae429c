"""Convert KL autoencoder weights between PyTorch (CompVis / diffusers) and ``ldm_jax``.

Two PyTorch naming layouts are understood:

* ``compvis``: the names of CompVis latent-diffusion / taming-transformers and of the
  ``first_stage_model`` of Stable Diffusion ``.ckpt`` files, e.g.
  ``encoder.down.0.block.1.norm1.weight``, ``decoder.up.3.upsample.conv.weight``,
  ``encoder.mid.attn_1.q.weight`` (1x1 conv, 4-D). They match our module tree exactly
  (``kernel``/``scale`` are called ``weight``), because ``AutoencoderKL`` mirrors it.
* ``diffusers``: ``diffusers.AutoencoderKL``, e.g. ``encoder.down_blocks.0.resnets.1.norm1.weight``,
  ``conv_shortcut`` (CompVis ``nin_shortcut``), ``downsamplers.0.conv``,
  ``mid_block.attentions.0.to_q.weight`` (a Linear, 2-D; the legacy names
  ``query/key/value/proj_attn`` are accepted too), ``conv_norm_out``. Decoder
  ``up_blocks`` run in execution order, i.e. ``up_blocks.k`` is CompVis ``up[L-1-k]``.

Tensors: conv kernels OIHW <-> OHWI (ours); Linear ``(out, in)`` <-> 1x1 conv ``(out, 1, 1, in)``;
GroupNorm ``weight`` <-> ``scale``. Everything is converted to float32.

Every conversion checks the full set of names and shapes first and raises one
``ValueError`` listing all unknown, missing and mis-shaped keys.

Typical use::

    cfg, params, meta = import_autoencoder("sd-vae-ft-mse/")     # diffusers dir / .ckpt / .safetensors
    export_diffusers(params, cfg, "out_dir")                      # diffusers.AutoencoderKL.from_pretrained
    export_compvis(params, cfg, "vae.safetensors")                # CompVis names
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.convert.lpips_weights import check_keys
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.layers import kernel_from_torch, kernel_to_torch

__all__ = [
    "LAYOUTS",
    "SD_PREFIX",
    "detect_layout",
    "infer_config",
    "config_from_diffusers",
    "diffusers_config",
    "expected_torch_shapes",
    "torch_state_dict_to_params",
    "params_to_torch_state_dict",
    "load_torch_file",
    "read_diffusers_config",
    "import_autoencoder",
    "make_autoencoder",
    "export_diffusers",
    "export_compvis",
    "discriminator_from_compvis",
]

LAYOUTS = ("compvis", "diffusers")
SD_PREFIX = "first_stage_model."
# Keys of CompVis autoencoder training checkpoints that are not autoencoder weights.
DEFAULT_IGNORE_PREFIXES = ("loss.", "model_ema.")
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# diffusers' single-head attention, pre-0.14 names -> current names.
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ------------------------------------------------------------------------- name mapping


def _compvis_name(path: tuple) -> str:
    """Our param path -> CompVis key (``kernel``/``scale`` are torch's ``weight``)."""
    *mods, leaf = (str(p) for p in path)
    return ".".join(mods + ["weight" if leaf in ("kernel", "scale") else leaf])


def _diffusers_name(path: tuple, num_levels: int) -> str:
    """Our param path -> diffusers key."""
    parts = [str(p) for p in path]
    *mods, leaf = parts
    leaf = "weight" if leaf in ("kernel", "scale") else leaf
    out: list[str] = []
    i = 0
    in_attn = False
    while i < len(mods):
        m = mods[i]
        if m in ("down", "up"):
            level = int(mods[i + 1])
            if m == "up":
                level = num_levels - 1 - level  # diffusers up_blocks run in execution order
            out.append(f"{m}_blocks.{level}")
            i += 2
            continue
        if m == "block" and i + 1 < len(mods) and mods[i + 1].isdigit():
            out.append(f"resnets.{mods[i + 1]}")
            i += 2
            continue
        if m == "attn" and i + 1 < len(mods) and mods[i + 1].isdigit():
            out.append(f"attentions.{mods[i + 1]}")
            in_attn = True
            i += 2
            continue
        if m in ("downsample", "upsample"):
            out.append(f"{m}rs.0")
        elif m == "mid":
            out.append("mid_block")
        elif m in ("block_1", "block_2"):
            out.append(f"resnets.{int(m[-1]) - 1}")
        elif m == "attn_1":
            out.append("attentions.0")
            in_attn = True
        elif m == "norm_out":
            out.append("conv_norm_out")
        elif m == "nin_shortcut":
            out.append("conv_shortcut")
        elif in_attn and m in ("norm", "q", "k", "v", "proj_out"):
            out.append({"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                        "proj_out": "to_out.0"}[m])
        else:
            out.append(m)
        i += 1
    return ".".join(out + [leaf])


def _is_attn_projection(path: tuple) -> bool:
    """Is this the kernel of an attention q/k/v/proj_out 1x1 conv (a Linear in diffusers)?"""
    mods = [str(p) for p in path[:-1]]
    return (str(path[-1]) == "kernel" and len(mods) >= 2 and mods[-1] in ("q", "k", "v", "proj_out")
            and (mods[-2] == "attn_1" or (len(mods) >= 3 and mods[-3] == "attn")))


def _torch_shape(path: tuple, shape: tuple, layout: str) -> tuple:
    if str(path[-1]) != "kernel":
        return tuple(shape)
    cout, kh, kw, cin = shape
    if layout == "diffusers" and _is_attn_projection(path):
        return (cout, cin)
    return (cout, cin, kh, kw)


def _to_torch(path: tuple, value: np.ndarray, layout: str) -> np.ndarray:
    value = np.asarray(value)
    if str(path[-1]) != "kernel":
        return np.ascontiguousarray(value)
    w = kernel_to_torch(value)  # OHWI -> OIHW
    if layout == "diffusers" and _is_attn_projection(path):
        w = w[:, :, 0, 0]
    return np.ascontiguousarray(w)


def _from_torch(path: tuple, value: np.ndarray, our_shape: tuple) -> np.ndarray:
    value = np.asarray(value)
    if str(path[-1]) != "kernel":
        return np.ascontiguousarray(value.reshape(our_shape))
    if value.ndim == 2:  # Linear (out, in) -> (out, in, 1, 1)
        value = value[:, :, None, None]
    return np.ascontiguousarray(kernel_from_torch(value))  # OIHW -> OHWI


# ------------------------------------------------------------------------- our param tree


def _param_shapes(cfg: AutoencoderConfig) -> dict[tuple, tuple]:
    """``{param path: shape}`` of ``AutoencoderKL(cfg)`` (abstract: nothing allocated)."""
    import jax
    from flax import nnx

    from ldm_jax.models.autoencoder import AutoencoderKL

    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        out[tuple(_key_entry(k) for k in kp)] = tuple(leaf.shape)
    return out


def _key_entry(k: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            k = getattr(k, attr)
            break
    if isinstance(k, str) and k.isdigit():
        return int(k)
    return k


def _flatten(params: Any) -> dict[tuple, np.ndarray]:
    import jax
    from flax import nnx

    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    flat = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[tuple(_key_entry(k) for k in kp)] = np.asarray(jax.device_get(leaf))
    return flat


def _unflatten(flat: Mapping[tuple, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def _key_map(cfg: AutoencoderConfig, layout: str) -> dict[str, tuple[tuple, tuple, tuple]]:
    """``{torch key: (our path, our shape, torch shape)}`` for ``cfg`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    levels = len(cfg.ch_mult)
    out = {}
    for path, shape in _param_shapes(cfg).items():
        name = _compvis_name(path) if layout == "compvis" else _diffusers_name(path, levels)
        out[name] = (path, shape, _torch_shape(path, shape, layout))
    return out


def expected_torch_shapes(cfg: AutoencoderConfig, layout: str) -> dict[str, tuple]:
    """``{torch key: torch shape}`` of an ``AutoencoderKL(cfg)`` state dict in ``layout``."""
    return {k: v[2] for k, v in _key_map(cfg, layout).items()}


# ------------------------------------------------------------------------- state dicts


def detect_layout(keys) -> str:
    """'diffusers' or 'compvis' from the key names (after any ``first_stage_model.`` strip)."""
    keys = list(keys)
    if any(re.search(r"(^|\.)(down_blocks|up_blocks|mid_block)\.", k) for k in keys):
        return "diffusers"
    if any(re.search(r"(^|\.)(down|up)\.\d+\.(block|attn|downsample|upsample)\.|\.mid\.block_1\.", k)
           for k in keys):
        return "compvis"
    raise ValueError(
        "cannot tell the layout of this state dict (neither diffusers 'down_blocks/up_blocks/"
        "mid_block' nor CompVis 'encoder.down.N.block' names); is it a KL autoencoder? "
        f"First keys: {sorted(keys)[:8]}")


def _select(sd: Mapping[str, Any], ignore_prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Strip SD's ``first_stage_model.`` (dropping every other key of a full SD checkpoint)
    and drop keys under ``ignore_prefixes`` (CompVis loss / EMA bookkeeping)."""
    if any(k.startswith(SD_PREFIX) for k in sd):
        sd = {k[len(SD_PREFIX):]: v for k, v in sd.items() if k.startswith(SD_PREFIX)}
    return {k: v for k, v in sd.items() if not k.startswith(tuple(ignore_prefixes))}


def _normalise(sd: Mapping[str, Any], layout: str, ignore_prefixes=DEFAULT_IGNORE_PREFIXES
               ) -> tuple[dict[str, np.ndarray], str]:
    sd = _select(sd, tuple(ignore_prefixes))
    if layout == "auto":
        layout = detect_layout(sd)
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    return as_numpy_state_dict(sd, layout), layout


def as_numpy_state_dict(sd: Mapping[str, Any], layout: str) -> dict[str, np.ndarray]:
    """numpy arrays, with old diffusers attention names (``query/key/value/proj_attn``)
    renamed to ``to_q/to_k/to_v/to_out.0`` in the diffusers layout."""
    out = {}
    for k, v in sd.items():
        if layout == "diffusers":
            m = re.match(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", k)
            if m:
                k = f"{m.group(1)}{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
        out[k] = _as_numpy(v)
    return out


def _as_numpy(v: Any) -> np.ndarray:
    """numpy array of ``v`` (torch tensors are accepted: detached, moved to CPU)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch.Tensor; torch itself not imported
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _fit_rank(sd: dict[str, np.ndarray], expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    """Accept attention projections stored as (out, in) where (out, in, 1, 1) is expected and
    vice versa (CompVis 1x1 convs vs diffusers Linears)."""
    out = dict(sd)
    for k, v in sd.items():
        want = expected.get(k)
        if want is None or tuple(v.shape) == tuple(want):
            continue
        squeeze = lambda s: tuple(d for i, d in enumerate(s) if not (i >= 2 and d == 1))  # noqa: E731
        if len(want) in (2, 4) and v.ndim in (2, 4) and squeeze(v.shape) == squeeze(want):
            out[k] = v.reshape(want)
    return out


def _identity_conv(n: int) -> dict[str, np.ndarray]:
    return {"weight": np.eye(n, dtype=np.float32)[:, :, None, None],
            "bias": np.zeros((n,), np.float32)}


def torch_state_dict_to_params(
    sd: Mapping[str, Any],
    cfg: AutoencoderConfig | None = None,
    layout: str = "auto",
    *,
    ignore_prefixes: tuple[str, ...] = DEFAULT_IGNORE_PREFIXES,
    identity_quant_conv: bool = False,
    identity_post_quant_conv: bool = False,
) -> dict:
    """PyTorch state dict (numpy arrays) -> pure param dict of ``AutoencoderKL(cfg)``.

    ``cfg`` None: inferred with ``infer_config``. A full SD checkpoint is accepted: only its
    ``first_stage_model.*`` keys are used. ``identity_(post_)quant_conv``: the checkpoint has
    no such conv (diffusers ``use_quant_conv=False``, e.g. SD3 / FLUX VAEs); use identity 1x1
    convs, which compute exactly the same function.

    Raises ValueError listing every unknown, missing and mis-shaped key.
    """
    sd, layout = _normalise(sd, layout, ignore_prefixes)
    if cfg is None:
        cfg = infer_config(sd, layout)
    if identity_quant_conv:
        for k, v in _identity_conv(2 * cfg.embed_dim).items():
            sd.setdefault(f"quant_conv.{k}", v)
    if identity_post_quant_conv:
        if cfg.embed_dim != cfg.z_channels:
            raise ValueError("an identity post_quant_conv needs embed_dim == z_channels")
        for k, v in _identity_conv(cfg.embed_dim).items():
            sd.setdefault(f"post_quant_conv.{k}", v)
    kmap = _key_map(cfg, layout)
    expected = {k: v[2] for k, v in kmap.items()}
    sd = _fit_rank(sd, expected)
    check_keys(f"{layout} AutoencoderKL state dict", sd, expected)
    flat = {}
    for key, (path, shape, _tshape) in kmap.items():
        value = sd[key]
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.kind != "V":
            raise ValueError(f"{key}: expected a floating-point tensor, got {value.dtype}")
        flat[path] = _from_torch(path, value.astype(np.float32), shape)
    return _unflatten(flat)


def params_to_torch_state_dict(params: Any, cfg: AutoencoderConfig, layout: str = "compvis",
                               *, prefix: str = "") -> dict[str, np.ndarray]:
    """Pure param dict (or ``nnx.State``) of ``AutoencoderKL(cfg)`` -> PyTorch-layout state
    dict of float32 numpy arrays, keys optionally prefixed (``prefix="first_stage_model."``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "diffusers":
        _check_diffusers_compatible(cfg)
    flat = _flatten(params)
    kmap = _key_map(cfg, layout)
    ours = {"/".join(map(str, p)): v for p, v in flat.items()}
    check_keys("AutoencoderKL params", ours,
               {"/".join(map(str, p)): shape for p, shape, _ in kmap.values()})
    return {prefix + key: _to_torch(path, flat[path].astype(np.float32), layout)
            for key, (path, _shape, _tshape) in kmap.items()}


# ------------------------------------------------------------------------- configs


def _levels_matching(keys, pattern: str) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}


def infer_config(sd: Mapping[str, Any], layout: str = "auto", *, resolution: int | None = None
                 ) -> AutoencoderConfig:
    """Read ``AutoencoderConfig`` fields from a state dict's keys and shapes.

    ch, ch_mult, num_res_blocks, in/out_channels, z_channels, embed_dim and the levels with
    attention come from the weights. Attention levels become ``attn_resolutions`` relative
    to ``resolution`` (default 256; it only decides at which levels attention sits).
    """
    sd, layout = _normalise(sd, layout, DEFAULT_IGNORE_PREFIXES)
    resolution = int(resolution or 256)
    if layout == "compvis":
        enc_block = r"^encoder\.down\.(\d+)\.block\.(\d+)\."
        block0 = "encoder.down.{i}.block.0.conv1.weight"
        enc_attn, dec_attn = r"^encoder\.down\.(\d+)\.attn\.", r"^decoder\.up\.(\d+)\.attn\."
        mid_attn = "encoder.mid.attn_1.q.weight"
    else:
        enc_block = r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."
        block0 = "encoder.down_blocks.{i}.resnets.0.conv1.weight"
        enc_attn = r"^encoder\.down_blocks\.(\d+)\.attentions\."
        dec_attn = r"^decoder\.up_blocks\.(\d+)\.attentions\."
        mid_attn = "encoder.mid_block.attentions.0.to_q.weight"

    def get(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"cannot infer the autoencoder config from this {layout} state dict: "
                             f"key {key!r} is missing (is it a KL autoencoder?)")
        return sd[key]

    levels = sorted(_levels_matching(sd, enc_block))
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"cannot infer the encoder levels of this {layout} state dict "
                         f"(found level indices {levels})")
    nres = len({int(m.group(2)) for k in sd if (m := re.match(enc_block, k)) and m.group(1) == "0"})
    conv_in = get("encoder.conv_in.weight")
    ch = int(conv_in.shape[0])
    widths = [int(get(block0.format(i=i)).shape[0]) for i in levels]
    if any(w % ch for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of ch={ch}: not expressible "
                         "as ch * ch_mult")
    z_channels = int(get("decoder.conv_in.weight").shape[1])
    enc_out = int(get("encoder.conv_out.weight").shape[0])
    if enc_out != 2 * z_channels:
        raise ValueError(f"encoder.conv_out has {enc_out} channels, expected 2 * z_channels = "
                         f"{2 * z_channels} (double_z)")
    embed_dim = int(get("post_quant_conv.weight").shape[1]) if "post_quant_conv.weight" in sd \
        else z_channels
    if mid_attn not in sd:
        raise ValueError("this autoencoder has no mid-block attention (diffusers "
                         "mid_block_add_attention=False); ldm_jax's AutoencoderKL always has one")
    n = len(levels)
    enc = _levels_matching(sd, enc_attn)
    dec = _levels_matching(sd, dec_attn)
    if layout == "diffusers":
        dec = {n - 1 - d for d in dec}
    if enc != dec:
        raise ValueError(f"attention at encoder levels {sorted(enc)} but decoder levels "
                         f"{sorted(dec)}: ldm_jax's AutoencoderKL uses one attn_resolutions for both")
    return AutoencoderConfig(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(get("decoder.conv_out.weight").shape[0]),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=nres,
        attn_resolutions=tuple(sorted(resolution // 2**i for i in enc)),
        resolution=resolution,
        z_channels=z_channels,
        embed_dim=embed_dim,
    )


def _sample_size(dcfg: Mapping[str, Any]) -> int | None:
    s = dcfg.get("sample_size")
    if isinstance(s, (list, tuple)):
        s = s[0]
    return int(s) if s else None


def config_from_diffusers(dcfg: Mapping[str, Any]) -> AutoencoderConfig:
    """``AutoencoderConfig`` from a diffusers ``AutoencoderKL`` ``config.json`` dict."""
    cls = dcfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"config.json describes a {cls!r}, not a diffusers AutoencoderKL")
    problems = []
    if int(dcfg.get("norm_num_groups", 32)) != 32:
        problems.append(f"norm_num_groups={dcfg['norm_num_groups']} (ours: 32)")
    if dcfg.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn={dcfg['act_fn']!r} (ours: silu)")
    if not dcfg.get("mid_block_add_attention", True):
        problems.append("mid_block_add_attention=False (ours always has it)")
    boc = [int(c) for c in dcfg.get("block_out_channels", (64,))]
    down = list(dcfg.get("down_block_types", ["DownEncoderBlock2D"] * len(boc)))
    up = list(dcfg.get("up_block_types", ["UpDecoderBlock2D"] * len(boc)))
    ok_down, ok_up = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"), (
        "UpDecoderBlock2D", "AttnUpDecoderBlock2D")
    if len(down) != len(boc) or len(up) != len(boc):
        problems.append(f"{len(down)} down / {len(up)} up block types for {len(boc)} levels")
    if any(t not in ok_down for t in down) or any(t not in ok_up for t in up):
        problems.append(f"block types {down} / {up} (supported: {ok_down} / {ok_up})")
    if any(c % boc[0] for c in boc):
        problems.append(f"block_out_channels {boc} are not multiples of the first")
    enc = {i for i, t in enumerate(down) if t.startswith("Attn")}
    dec = {len(up) - 1 - i for i, t in enumerate(up) if t.startswith("Attn")}
    if enc != dec:
        problems.append(f"attention at encoder levels {sorted(enc)} but decoder levels {sorted(dec)}")
    if problems:
        raise ValueError("diffusers AutoencoderKL config not expressible by ldm_jax's "
                         "AutoencoderKL: " + "; ".join(problems))
    resolution = _sample_size(dcfg) or 256
    latent = int(dcfg.get("latent_channels", 4))
    return AutoencoderConfig(
        in_channels=int(dcfg.get("in_channels", 3)),
        out_channels=int(dcfg.get("out_channels", 3)),
        ch=boc[0],
        ch_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=int(dcfg.get("layers_per_block", 1)),
        attn_resolutions=tuple(sorted(resolution // 2**i for i in enc)),
        resolution=resolution,
        z_channels=latent,
        embed_dim=latent,
    )


def _attn_levels(cfg: AutoencoderConfig) -> set[int]:
    return {i for i in range(len(cfg.ch_mult)) if cfg.resolution // 2**i in cfg.attn_resolutions}


def _check_diffusers_compatible(cfg: AutoencoderConfig) -> None:
    problems = []
    if cfg.z_channels != cfg.embed_dim:
        problems.append(f"z_channels={cfg.z_channels} != embed_dim={cfg.embed_dim} (diffusers "
                        "has one latent_channels for both)")
    if cfg.ch_mult[0] != 1:
        problems.append(f"ch_mult[0]={cfg.ch_mult[0]} != 1 (diffusers' encoder conv_in outputs "
                        "block_out_channels[0] directly)")
    if problems:
        raise ValueError("this AutoencoderKL cannot be expressed as a diffusers AutoencoderKL: "
                         + "; ".join(problems))


def diffusers_config(cfg: AutoencoderConfig, *, scaling_factor: float = 0.18215,
                     sample_size: int | None = None, shift_factor: float | None = None) -> dict:
    """diffusers ``AutoencoderKL`` ``config.json`` contents for ``cfg``."""
    _check_diffusers_compatible(cfg)
    attn = _attn_levels(cfg)
    n = len(cfg.ch_mult)
    out = {
        "_class_name": "AutoencoderKL",
        "in_channels": int(cfg.in_channels),
        "out_channels": int(cfg.out_channels),
        "down_block_types": ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D"
                             for i in range(n)],
        "up_block_types": ["AttnUpDecoderBlock2D" if (n - 1 - k) in attn else "UpDecoderBlock2D"
                           for k in range(n)],
        "block_out_channels": [int(cfg.ch * m) for m in cfg.ch_mult],
        "layers_per_block": int(cfg.num_res_blocks),
        "act_fn": "silu",
        "latent_channels": int(cfg.z_channels),
        "norm_num_groups": 32,
        "sample_size": int(sample_size or cfg.resolution),
        "scaling_factor": float(scaling_factor),
    }
    if shift_factor is not None:
        out["shift_factor"] = float(shift_factor)
    return out


def config_dict(cfg: AutoencoderConfig) -> dict:
    """JSON-ready dict of ``cfg`` (what ``save_pretrained`` stores)."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ------------------------------------------------------------------------- files


def _need_safetensors():
    try:
        import safetensors  # noqa: F401
        import safetensors.numpy  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "reading/writing .safetensors needs the `safetensors` package: "
            "pip install safetensors") from e
    return safetensors


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_safetensors_raw(path: str, keys) -> dict[str, np.ndarray]:
    """Fallback for dtypes numpy lacks (BF16, F8): decode ``keys`` with ml_dtypes."""
    import ml_dtypes

    dtypes = dict(_ST_DTYPES, BF16=ml_dtypes.bfloat16, F8_E4M3=ml_dtypes.float8_e4m3fn,
                  F8_E5M2=ml_dtypes.float8_e5m2)
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for k in keys:
            info = header[k]
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            dt = np.dtype(dtypes[info["dtype"]])
            out[k] = np.frombuffer(f.read(end - start), dtype=dt).reshape(info["shape"]).copy()
    return out


def safe_open_np(path: str):
    """``safetensors.safe_open(path, framework="np")``; a file that is not a complete
    safetensors file raises a ValueError naming it (safetensors' own error type is not one)."""
    st = _need_safetensors()
    try:
        return st.safe_open(path, framework="np")
    except Exception as e:  # noqa: BLE001  (SafetensorError: truncated header, not safetensors, ...)
        raise ValueError(f"{path}: not a readable .safetensors file ({e}); is the download complete?") from None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of ``path``; of a full SD checkpoint only ``first_stage_model.*`` is read."""
    with safe_open_np(path) as f:
        keys = list(f.keys())
        wanted = [k for k in keys if k.startswith(SD_PREFIX)] or keys
        try:
            return {k: f.get_tensor(k) for k in wanted}
        except TypeError:  # e.g. "data type 'bfloat16' not understood"
            pass
    return _read_safetensors_raw(path, wanted)


def _unwrap(obj: Mapping[str, Any]) -> dict[str, Any]:
    from ldm_jax.convert.torch_pickle import unwrap_state_dict

    return {k: v for k, v in unwrap_state_dict(obj).items() if isinstance(v, np.ndarray)}


def diffusers_dir(path: str) -> str | None:
    """The diffusers AutoencoderKL folder at ``path`` (or its ``vae/`` for a whole
    pipeline), or None."""
    for d in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(d, "config.json")) and any(
                os.path.isfile(os.path.join(d, f)) for f in DIFFUSERS_WEIGHT_FILES):
            return d
    return None


def read_diffusers_config(path: str) -> dict | None:
    """``config.json`` of a diffusers model directory (or the file itself), else None."""
    if os.path.isdir(path):
        d = diffusers_dir(path)
        if d is None:
            return None
        path = os.path.join(d, "config.json")
    with open(path) as f:
        return json.load(f)


def load_torch_file(path: str | os.PathLike, *, find_dir=None, subfolder: str = "vae") -> dict[str, np.ndarray]:
    """State dict ``{key: np.ndarray}`` from a ``.safetensors``, a torch ``.ckpt/.pth/.pt/.bin``
    (read without torch; a ``state_dict`` wrapper is unwrapped) or a diffusers model
    directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` / ``.bin``), found
    by ``find_dir`` (default: the autoencoder's, a pipeline's ``vae/`` included)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        d = (find_dir or diffusers_dir)(path)
        if d is None:
            raise FileNotFoundError(
                f"{path} is a directory but not a diffusers model folder (config.json + one of "
                f"{', '.join(DIFFUSERS_WEIGHT_FILES)}), nor a pipeline with such a {subfolder}/ folder")
        path = next(os.path.join(d, f) for f in DIFFUSERS_WEIGHT_FILES
                    if os.path.isfile(os.path.join(d, f)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    from ldm_jax.convert.torch_pickle import load_torch_state_dict

    return _unwrap(load_torch_state_dict(path))


def import_autoencoder(
    src: str,
    layout: str = "auto",
    *,
    config: str | Mapping[str, Any] | AutoencoderConfig | None = None,
    resolution: int | None = None,
    ignore_prefixes: tuple[str, ...] = DEFAULT_IGNORE_PREFIXES,
) -> tuple[AutoencoderConfig, dict, dict]:
    """Read ``src`` (diffusers dir, .safetensors, .ckpt/.pth/.bin) -> ``(cfg, params, meta)``.

    ``config``: a diffusers ``config.json`` (path or dict) or an ``AutoencoderConfig``; by
    default the directory's own ``config.json``, else inferred from the weights. ``meta``
    holds ``layout``, ``source`` and, when the diffusers config gives them,
    ``scaling_factor`` / ``shift_factor``.
    """
    sd = load_torch_file(src)
    dcfg = None
    if isinstance(config, AutoencoderConfig):
        cfg = config
    else:
        if isinstance(config, (str, os.PathLike)):
            dcfg = read_diffusers_config(os.fspath(config))
            if dcfg is None:
                raise FileNotFoundError(f"no diffusers config.json at {config}")
        elif config is not None:
            dcfg = dict(config)
        elif os.path.isdir(src):
            dcfg = read_diffusers_config(src)
        cfg = config_from_diffusers(dcfg) if dcfg is not None else None
    sd, layout = _normalise(sd, layout, ignore_prefixes)
    if cfg is None:
        cfg = infer_config(sd, layout, resolution=resolution)
    elif resolution and not isinstance(config, AutoencoderConfig):
        cfg = dataclasses.replace(cfg, resolution=int(resolution), attn_resolutions=tuple(
            sorted(int(resolution) // 2**i for i in _attn_levels(cfg))))
    params = torch_state_dict_to_params(
        sd, cfg, layout, ignore_prefixes=(),
        identity_quant_conv=bool(dcfg is not None and dcfg.get("use_quant_conv") is False),
        identity_post_quant_conv=bool(dcfg is not None and dcfg.get("use_post_quant_conv") is False),
    )
    meta: dict[str, Any] = {"layout": layout, "source": os.path.abspath(src)}
    for k in ("scaling_factor", "shift_factor"):
        if dcfg is not None and dcfg.get(k) is not None:
            meta[k] = float(dcfg[k])
    return cfg, params, meta


def make_autoencoder(cfg: AutoencoderConfig, params: Any, **model_kwargs):
    """``AutoencoderKL(cfg, **model_kwargs)`` holding ``params`` (checked: one error lists
    every missing / unexpected / mis-shaped entry); no random initialisation is run."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.pretrained import fill_params

    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), **model_kwargs))
    nnx.update(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(model)))
    return fill_params(model, params, "(converted)")


def _save_tensors(sd: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    st = _need_safetensors()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        st.numpy.save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp,
                           metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_diffusers(params: Any, cfg: AutoencoderConfig, out_dir: str, *,
                     scaling_factor: float = 0.18215, sample_size: int | None = None,
                     shift_factor: float | None = None) -> str:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` loadable with
    ``diffusers.AutoencoderKL.from_pretrained(out_dir)``. Returns ``out_dir``."""
    dcfg = diffusers_config(cfg, scaling_factor=scaling_factor, sample_size=sample_size,
                            shift_factor=shift_factor)
    sd = params_to_torch_state_dict(params, cfg, "diffusers")
    os.makedirs(out_dir, exist_ok=True)
    _save_tensors(sd, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dcfg, f, indent=2)
    return out_dir


def export_compvis(params: Any, cfg: AutoencoderConfig, path: str, *, prefix: str = "") -> str:
    """Write CompVis-named weights to ``path``: ``.safetensors`` (no torch needed), or
    ``.ckpt`` / ``.pth`` / ``.pt`` (needs torch; saved as ``{"state_dict": ...}`` like
    CompVis checkpoints). ``prefix="first_stage_model."`` gives SD-checkpoint names."""
    return save_compvis_state_dict(params_to_torch_state_dict(params, cfg, "compvis", prefix=prefix), path)


def save_compvis_state_dict(sd: dict[str, np.ndarray], path: str) -> str:
    """Write a state dict as ``.safetensors`` (no torch needed) or as a CompVis-style
    ``{"state_dict": ...}`` ``.ckpt`` / ``.pth`` / ``.pt`` (needs torch)."""
    if path.endswith(".safetensors"):
        _save_tensors(sd, path, metadata={"format": "pt"})
        return path
    if not path.endswith((".ckpt", ".pth", ".pt")):
        raise ValueError(f"{path}: choose a .safetensors, .ckpt, .pth or .pt file name")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"writing {path} needs torch; write a .safetensors instead") from e
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    return path


# ------------------------------------------------------------------------- discriminator


def discriminator_from_compvis(sd: Mapping[str, Any], *, prefix: str = "loss.discriminator."
                               ) -> tuple[dict, dict]:
    """CompVis ``LPIPSWithDiscriminator`` PatchGAN weights -> ``(kwargs, state)``.

    ``sd`` is a CompVis autoencoder training checkpoint (``loss.discriminator.main.N.*``:
    conv, LeakyReLU, then per layer conv (no bias) + BatchNorm + LeakyReLU, final conv).
    ``kwargs`` (``in_channels``, ``ndf``, ``n_layers``) build the matching
    ``ldm_jax.models.discriminator.NLayerDiscriminator``; ``state`` is the pure dict of its
    whole ``nnx.state`` (Params and BatchNorm running statistics), for ``nnx.replace_by_pure_dict``.
    """
    sd = {k[len(prefix):]: _as_numpy(v) for k, v in _select(sd, ()).items() if k.startswith(prefix)}
    norms = sorted(int(m.group(1)) for k in sd if (m := re.match(r"^main\.(\d+)\.running_mean$", k)))
    if "main.0.weight" not in sd or not norms:
        raise ValueError(f"no CompVis NLayerDiscriminator weights under {prefix!r} "
                         "(expected main.0.weight and BatchNorm running stats)")
    n_layers = len(norms)
    w0 = sd["main.0.weight"]
    kwargs = {"in_channels": int(w0.shape[1]), "ndf": int(w0.shape[0]), "n_layers": n_layers}
    ndf, cin = kwargs["ndf"], kwargs["in_channels"]
    expected: dict[str, tuple] = {"main.0.weight": (ndf, cin, 4, 4), "main.0.bias": (ndf,)}
    spec: list[tuple[tuple, str, str]] = [(("conv_in", "kernel"), "main.0.weight", "conv"),
                                          (("conv_in", "bias"), "main.0.bias", "vec")]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        c, b = 2 + 3 * (n - 1), 3 + 3 * (n - 1)
        expected[f"main.{c}.weight"] = (ndf * mult, ndf * prev, 4, 4)
        spec.append((("convs", n - 1, "kernel"), f"main.{c}.weight", "conv"))
        for torch_name, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                                 ("running_var", "var")):
            expected[f"main.{b}.{torch_name}"] = (ndf * mult,)
            spec.append((("norms", n - 1, ours), f"main.{b}.{torch_name}", "vec"))
    last = 2 + 3 * n_layers
    expected[f"main.{last}.weight"] = (1, ndf * mult, 4, 4)
    expected[f"main.{last}.bias"] = (1,)
    spec += [(("conv_out", "kernel"), f"main.{last}.weight", "conv"),
             (("conv_out", "bias"), f"main.{last}.bias", "vec")]
    sd = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    check_keys(f"CompVis discriminator ({prefix}*)", sd, expected)
    flat = {}
    for path, key, kind in spec:
        v = sd[key].astype(np.float32)
        flat[path] = np.ascontiguousarray(kernel_from_torch(v) if kind == "conv" else v)
    return kwargs, _unflatten(flat)
