"""Device mesh, parameter/batch shardings and global batch assembly.

The mesh has two named axes, ``data`` and ``fsdp``. The batch is split over both; a
parameter (or optimizer moment) is split along ``fsdp`` on its largest dimension that
divides evenly, unless it is small, and replicated otherwise. With ``fsdp=1`` (default)
this is pure data parallelism.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.config_lib import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Arrays with fewer elements than this stay replicated under FSDP (norm scales, biases...).
MIN_FSDP_SIZE = 2**14


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int]:
    """Resolve ``{data: -1, fsdp: k}``-style sizes against the device count."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices: "
            f"{known} does not divide {num_devices}"
        )
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} uses {int(np.prod(sizes))} devices but "
            f"{num_devices} are available; set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = int(mesh_cfg.get("num_devices", -1)) if hasattr(mesh_cfg, "get") else -1
    if n > len(devices):
        raise ConfigError(f"mesh.num_devices={n} but only {len(devices)} devices are available")
    if n > 0:
        devices = devices[:n]
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def interleave_pairs(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a0, b0, a1, b1, ...``: one batch of ``2n`` from two batches of ``n``.

    For running one network on two batches whose outputs are then combined per sample (the
    two images of an LPIPS pair; a sample and its unconditional twin under classifier-free
    guidance). Concatenating ``[a; b]`` instead puts, with the batch sharded over devices,
    ``a`` on the first half of the devices and ``b`` on the second: XLA then moves the
    inputs with an all-to-all and every per-sample combination with collective permutes.
    Interleaved, both members of a pair sit on the same device. Undo with ``split_pairs``.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"interleave_pairs needs batches of equal size, got {a.shape} and {b.shape}")
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def split_pairs(ab: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of ``interleave_pairs``: ``(a, b)`` from ``a0, b0, a1, b1, ...``."""
    if ab.shape[0] % 2:
        raise ValueError(f"split_pairs needs an even batch, got {ab.shape}")
    ab = ab.reshape((ab.shape[0] // 2, 2) + ab.shape[1:])
    return ab[:, 0], ab[:, 1]


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Split the largest evenly divisible dimension over ``fsdp``; replicate small arrays."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of an (abstract) pytree by the FSDP rule."""
    fsdp = mesh.shape["fsdp"]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, param_spec(tuple(shape), fsdp))

    return jax.tree.map(one, abstract_tree)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble per-process numpy batches into global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
