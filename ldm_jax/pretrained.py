"""Model weights outside a training run: converted checkpoints and trained workdirs.

A *pretrained directory* is what ``python -m ldm_jax.convert`` writes and what the trainers
(``init_from``, ``autoencoder_path``) and ``sample.py`` accept::

    DIR/pretrained.json   {"format": "ldm_jax.pretrained/2", "kind": "autoencoder" | "unet",
                           "config": {architecture fields}, "source": "where it came from", ...}
    DIR/params/           orbax checkpoint of the model's ``nnx.Param`` values (a pure dict)

A *VAE-GAN workdir* (``config.json`` + ``checkpoints/``) is accepted wherever an autoencoder
is loaded: its latest checkpoint's autoencoder parameters are used. An *LDM workdir* is
accepted for the U-Net (EMA parameters unless asked otherwise). The model is built from the
settings recorded in that checkpoint (``recorded_config``).

Conv kernels are OHWI (``models.layers.CONV_LAYOUT``). Directories of format ``/1`` and
checkpoints whose metadata has no ``conv_layout`` hold HWIO kernels; they load as before,
transposed on the way in.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ldm_jax import checkpointing
from ldm_jax.models import layers
from ldm_jax.weights_cache import save_json_atomic

FORMAT = "ldm_jax.pretrained/2"  # /2: conv kernels OHWI (layers.CONV_LAYOUT); /1 had HWIO
_HWIO_FORMATS = ("ldm_jax.pretrained/1",)
KINDS = ("autoencoder", "unet")


class PretrainedError(ValueError):
    """A path that holds no usable weights, or weights that do not fit the model."""


def _to_pure(params: Any) -> Any:
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


def save_pretrained(directory: str, kind: str, config: dict, params: Any, *,
                    source: str = "", extra: dict | None = None) -> str:
    """Write ``params`` (``nnx.State`` of Params or its pure dict) and ``config`` to ``directory``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    params_dir = os.path.join(directory, "params")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(params_dir, _to_pure(params), force=True)
    ckptr.wait_until_finished()
    meta = {"format": FORMAT, "kind": kind, "config": _jsonable(config), "source": source}
    meta.update(extra or {})
    save_json_atomic(meta, os.path.join(directory, "pretrained.json"))  # written last: marks completeness
    return directory


def _jsonable(d: Any) -> Any:
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, np.generic):
        return d.item()
    return d


def _int_keys(tree: Any) -> Any:
    """A restored tree as an NNX pure dict: list indices (stored as strings) become ints and
    ``{"value": array}`` nodes (``nnx.State`` Variables saved by the trainers) become arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


# orbax >= 0.12 restores a subset of a saved tree's entries (older versions read it all)
_PARTIAL_RESTORE = "partial_restore" in getattr(ocp.args.PyTreeRestore, "__dataclass_fields__", {})


def _restore_tree(path: str, keys: list[str] | tuple[str, ...] | None = None) -> Any:
    """A saved pytree, or only its top-level entries ``keys``, as host numpy arrays, whatever
    mesh and process count wrote it.

    Arrays are read straight into host memory (nothing is placed on a device, so a state
    larger than one device's memory loads too). With ``keys`` the other entries are not
    read: sampling from an LDM checkpoint reads its EMA parameters, not the raw parameters
    and the optimizer moments beside them (a quarter of the bytes). Orbax versions without
    partial restores read everything and the entries are picked afterwards."""
    path = os.path.abspath(path)
    # The handler's metadata, not the checkpointer's: a trainer checkpoint's item
    # directory (``<step>/state``) has no step metadata file of its own (that sits in
    # ``<step>/``), and the checkpointer warns about it on every load.
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
    meta = getattr(meta, "tree", meta)
    if keys is not None:
        if not isinstance(meta, dict) or set(keys) - set(meta):
            have = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise PretrainedError(f"{path} has no {sorted(set(keys) - set(meta or {}))}; it holds {have}")
    partial = keys is not None and _PARTIAL_RESTORE
    if partial:
        meta = {k: meta[k] for k in keys}
    is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")  # noqa: E731
    restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray) if is_array(m) else ocp.RestoreArgs(),
        meta, is_leaf=is_array)
    item = jax.tree.map(lambda m: 0, meta, is_leaf=is_array)  # the structure to fill
    args = dict(item=item, restore_args=restore_args, **({"partial_restore": True} if partial else {}))
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(**args))
    if keys is not None:
        tree = {k: tree[k] for k in keys}
    return _int_keys(jax.tree.map(np.asarray, tree))


def _latest_step_dir(workdir: str) -> str:
    ckdir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckdir) if s.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise PretrainedError(f"{workdir} has no finished checkpoint under {ckdir}")
    return os.path.join(ckdir, str(steps[-1]))


def describe(path: str) -> str:
    """'pretrained' or 'vae_gan' / 'ldm' workdir, or raise a clear error."""
    if os.path.isfile(os.path.join(path, "pretrained.json")):
        return "pretrained"
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            return json.load(f).get("trainer", "vae_gan")
    raise PretrainedError(
        f"{path!r} is neither a pretrained directory (with pretrained.json, written by "
        "`python -m ldm_jax.convert`) nor a training workdir (with config.json and checkpoints/).")


def load_params(path: str, kind: str, *, use_ema: bool = True) -> tuple[dict, Any, str]:
    """Returns ``(model config dict, pure param dict, description)`` of ``kind`` at ``path``."""
    what = describe(path)
    if what == "pretrained":
        with open(os.path.join(path, "pretrained.json")) as f:
            meta = json.load(f)
        if meta.get("kind") != kind:
            raise PretrainedError(f"{path} holds a {meta.get('kind')!r} model, not a {kind!r}")
        params = _restore_tree(os.path.join(path, "params"))
        if meta.get("format") in _HWIO_FORMATS:
            params = layers.kernels_from_hwio(params)
        return meta["config"], params, f"pretrained {path}"
    if kind == "autoencoder" and what == "ldm":
        # An LDM workdir records where its autoencoder came from.
        return load_params(recorded_config(path, _latest_step_dir(path))[0]["autoencoder_path"], kind)
    if kind == "autoencoder" and what == "vae_gan":
        key, sub, desc = "gen_params", "ae", "VAE-GAN checkpoint {}"  # gen_params: {ae, logvar}
    elif kind == "unet" and what == "ldm":
        key, sub = ("ema_params" if use_ema else "params"), None
        desc = f"LDM checkpoint {{}} ({'EMA' if use_ema else 'raw'})"
    else:
        raise PretrainedError(f"{path} is a {what!r} workdir; it has no {kind!r} weights")
    step_dir = _latest_step_dir(path)
    run_cfg, meta = recorded_config(path, step_dir)
    params = _restore_tree(os.path.join(step_dir, "state"), [key])[key]
    if meta.get("conv_layout", "HWIO") != layers.CONV_LAYOUT:
        params = layers.kernels_from_hwio(params)
    return run_cfg["model"], params if sub is None else params[sub], desc.format(step_dir)


def recorded_config(workdir: str, step_dir: str) -> tuple[dict, dict]:
    """``(settings, metadata)`` of training checkpoint ``step_dir`` of ``workdir``: the
    settings of the run that wrote it, as its metadata records them (the workdir's
    ``config.json`` for checkpoints written before they did)."""
    meta = checkpointing.read_meta(step_dir)
    if isinstance(meta.get("config"), dict):
        return meta["config"], meta
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f), meta


def _check_fits(state: nnx.State, pure: Any, where: str) -> None:
    want = checkpointing.array_shapes(nnx.to_pure_dict(state))
    have = checkpointing.array_shapes(
        jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.result_type(v)), pure))
    differ, missing, unexpected = checkpointing.shape_differences(want, have)
    shapes = [f"{k}: model {want[k]} vs weights {have[k]}" for k in differ]
    if missing or unexpected or shapes:
        parts = [f"weights {where} do not fit the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise PretrainedError("\n".join(parts))


def fill_params(model: nnx.Module, pure: Any, where: str = "") -> nnx.Module:
    """Put ``pure`` into ``model``'s Params, checking names and shapes first (one error listing
    every missing, unexpected and mis-shaped entry)."""
    state = nnx.state(model, nnx.Param)
    _check_fits(state, pure, where)
    dtypes = jax.tree.map(lambda v: v.dtype, nnx.to_pure_dict(state))
    cast = jax.tree.map(lambda v, d: jnp.asarray(v, d), _int_keys(pure), dtypes)
    nnx.replace_by_pure_dict(state, cast)
    nnx.update(model, state)
    return model


def params_like(target: nnx.State, pure: Any, where: str = "") -> nnx.State:
    """``pure`` as a State shaped, typed and sharded like ``target`` (a train state's Params),
    after the same name/shape check as ``fill_params``."""
    pure = _int_keys(pure)
    _check_fits(target, pure, where)
    out = jax.tree.map(lambda x: x, target)
    leaves = jax.tree.map(lambda t, v: jax.device_put(np.asarray(v, t.dtype), t.sharding),
                          nnx.to_pure_dict(target), pure)
    nnx.replace_by_pure_dict(out, leaves)
    return out


def load_autoencoder(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """``(AutoencoderKL, AutoencoderConfig, description)`` from a pretrained dir or workdir."""
    from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL

    cfg_dict, pure, where = load_params(path, "autoencoder")
    cfg = AutoencoderConfig.from_dict(cfg_dict)
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=param_dtype,
                                                 rngs=nnx.Rngs(0)))
    _materialise(model)
    return fill_params(model, pure, where), cfg, where


def _materialise(model: nnx.Module) -> None:
    """Give an ``nnx.eval_shape`` model concrete zero arrays (filled right after)."""
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
