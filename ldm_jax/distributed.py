"""Multi-process start-up on JAX's own runtime (``jax.distributed``)."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("ldm_jax")


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when the environment asks for several processes.

    Explicit coordinator flags win; otherwise Cloud TPU pods, SLURM (``SLURM_NTASKS`` > 1)
    and ``JAX_COORDINATOR_ADDRESS`` are auto-detected by JAX. Single-host runs do nothing.
    """
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS")
          or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0):
        jax.distributed.initialize()
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
