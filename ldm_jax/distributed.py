"""Multi-process start-up on JAX's own runtime (``jax.distributed``).

One call, :func:`maybe_initialize`, before anything touches a device:

* explicit ``--coordinator_address host:port --num_processes N --process_id i`` (or the
  environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``) - any machines that can reach ``host:port``, CPU included;
* SLURM: inside an ``srun`` step with more than one task (JAX reads ``SLURM_JOB_ID``,
  ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``; with
  several tasks per node JAX gives task ``SLURM_LOCALID`` the GPU of that index, so run one
  task per GPU without per-task GPU binding, or one task per node with
  ``JAX_LOCAL_DEVICE_IDS=0,1,...``);
* Open MPI (``mpirun``, ``OMPI_COMM_WORLD_SIZE`` > 1; JAX reads ``OMPI_MCA_orte_hnp_uri``);
* Cloud TPU VMs (libtpu installed and TPU chips present): JAX finds the workers of the
  slice from the TPU metadata (a single-host TPU VM initialises as 1 process);
* ``LDM_JAX_DISTRIBUTED=1`` forces ``jax.distributed.initialize()`` with JAX's own
  auto-detection (other clusters JAX knows, e.g. Kubernetes JobSets).

Anything else is a single-process run and nothing happens. On CPU (``JAX_PLATFORMS=cpu``)
cross-process collectives use gloo.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

import jax

log = logging.getLogger("ldm_jax")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name, "").strip()
    return int(v) if v else None


def slurm_multi_task() -> bool:
    """Inside an ``srun`` step with more than one task (what JAX's SLURM detection reads).
    A batch script itself (``sbatch``, no ``srun``) is one process even if it asked for
    several tasks, so it does not count."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in os.environ for k in needed) and (_env_int("SLURM_NTASKS") or 1) > 1


def cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: TPU chips present and libtpu installed (checked without starting a
    backend). JAX then reads the slice's workers from the TPU metadata server."""
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and (importlib.util.find_spec("libtpu") is not None
                            or bool(os.environ.get("TPU_LIBRARY_PATH")))


def detect() -> str | None:
    """Which start-up applies: "explicit", "slurm", "mpi", "tpu", "forced" or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if slurm_multi_task():
        return "slurm"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "mpi"
    if cloud_tpu_vm():
        return "tpu"
    if os.environ.get("LDM_JAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return "forced"
    return None


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when flags or the environment ask for it.

    Returns whether JAX now runs distributed (also True if it already was)."""
    if jax.distributed.is_initialized():
        return True
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    how = "explicit" if coordinator else detect()
    if how is None:
        return False
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
    else:
        if how == "explicit":
            # JAX reads JAX_COORDINATOR_ADDRESS itself; the count and index come from our
            # variables, or from a cluster environment JAX detects.
            jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                                       process_id=_env_int("JAX_PROCESS_ID"))
        else:
            jax.distributed.initialize()
    log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
