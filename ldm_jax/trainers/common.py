"""Pieces shared by the trainers: dtypes, guarded updates, sharded abstract states."""

from __future__ import annotations

import logging
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


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def log_once(msg: str) -> None:
    """Warning-level log from process 0 only (start-up facts users must see)."""
    if jax.process_index() == 0:
        log.warning(msg)


def param_count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
