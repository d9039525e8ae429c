"""Compile for an NVIDIA GPU on a machine without one (deviceless ahead-of-time compile).

``topology_devices("h100", n)`` returns ``n`` compile-only devices of that GPU model, from
the CUDA PJRT plugin and an XLA target description built here (SM count, shared memory,
HBM size and bandwidth, L2, clock, compute capability, cuDNN version): a ``Mesh`` over
them compiles a ``jax.jit`` program exactly as XLA would for that GPU, minus autotuning
(cuDNN/Triton algorithm choice needs the device). Nothing can run on these devices; the
compiled program's HLO (kernels, layouts, fusions, copies) and buffer assignment (memory)
are real. Used by ``python -m ldm_jax.bench ... --compile-only --target h100``.

Requires the CUDA plugin (``pip install "jax[cuda12]"``); no GPU or driver is needed.
"""

from __future__ import annotations

import os

# name: (description string, compute capability, SMs, shared mem per SM, opt-in shared mem
#        per block, HBM bytes, HBM bytes/s, L2 bytes, clock GHz, cuDNN (major, minor))
_SPECS = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 233472, 232448, 84929347584,
             3352320000000, 52428800, 1.98, (9, 8)),
    "h200": ("NVIDIA H200 141GB HBM3e", (9, 0), 132, 233472, 232448, 151397597184,
             4800000000000, 52428800, 1.98, (9, 8)),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 167936, 166912, 85100068864,
             2039040000000, 41943040, 1.41, (9, 8)),
}
TARGETS = tuple(_SPECS)


def target_config(name: str) -> str:
    """The ``stream_executor.GpuTargetConfigProto`` text for a GPU model in ``TARGETS``."""
    if name not in _SPECS:
        raise ValueError(f"unknown GPU target {name!r}; known: {', '.join(TARGETS)}")
    desc, (cc_major, cc_minor), sms, smem_sm, smem_optin, mem, bw, l2, clock, (dnn_ma, dnn_mi) = _SPECS[name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {128 if cc_major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bw}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {mem}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{
    major: {cc_major}
    minor: {cc_minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {dnn_ma}
  minor: {dnn_mi}
}}
runtime_version {{
  major: 12
  minor: 9
}}
device_description_str: "{desc}"
"""


def device_memory_bytes(name: str) -> int:
    return int(_SPECS[name][5])


def prepare_environment() -> None:
    """Call before jax initialises its backends: lets the CUDA plugin load without a driver
    (its version check would otherwise fail and the plugin would not register)."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def topology_devices(name: str, num_devices: int = 1) -> list:
    """``num_devices`` compile-only devices of GPU model ``name`` on one host."""
    import jax  # noqa: F401  (initialises the plugins)
    from jax.experimental import topologies

    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    cfg = target_config(name)
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=cfg,
                                            topology=f"1x1x{num_devices}")
    except (NotImplementedError, RuntimeError) as e:
        raise RuntimeError(
            f"cannot build a compile-only {name} topology: the JAX CUDA plugin is not "
            f"installed or did not load ({type(e).__name__}: {e}). Install it with "
            f"`pip install \"jax[cuda12]=={jax.__version__}\"` (no GPU needed) and set "
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before jax is imported on a machine "
            "without a CUDA driver") from e
    return list(topo.devices)
