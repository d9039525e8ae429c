"""Pieces shared by the trainers: dtypes, guarded updates, sharded abstract states."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

log = logging.getLogger("ldm_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
    return DTYPES[name]


global_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


def fresh(tree):
    """Rebuild a State's Variables in the current trace (NNX refuses to mutate Variables
    created by an outer trace, e.g. BatchNorm statistics closed over by ``jax.grad``)."""
    return jax.tree.map(lambda v: v, tree)


def tree_where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def finite_and_norm(loss, grads) -> tuple[jax.Array, jax.Array]:
    """``(loss and every gradient element finite, global gradient norm)`` from one reduction
    over the gradients: a NaN propagates into the sum of squares and an inf squares to inf,
    so the norm is finite exactly when every element is (and the squares do not overflow
    fp32: a gradient norm above ~1e19 counts as non-finite, a step to skip anyway). The
    clipping transform's identical norm computation is merged with this one by XLA."""
    norm = global_norm(grads)
    return jnp.isfinite(loss) & jnp.isfinite(norm), norm


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def log_once(msg: str) -> None:
    """Warning-level log from process 0 only (start-up facts users must see)."""
    if jax.process_index() == 0:
        log.warning(msg)


def param_count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def prepare_workdir(config: Any, workdir: str):
    """Create ``workdir``, set the compilation cache, write ``config.json`` (process 0) and
    open the metric writer; returns ``(is_main, writer)``."""
    import ml_collections

    from ldm_jax import metric_writers as mw

    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer = mw.create_writer(os.path.join(workdir, "tensorboard"), is_main=is_main)
    writer.write_hparams({k: v for k, v in config.items() if not isinstance(v, ml_collections.ConfigDict)})
    return is_main, writer
