"""Test setup: 8 fake CPU devices so sharding code runs on a real mesh.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it at import
time (pytest imports conftest.py before any test module).
"""

import os

# XLA flags of every CPU program the tests compile, in this process and in the processes
# they start (through ``xla_flags``/``cpu_env``; worker scripts read the variable): LLVM
# optimisation level 1 instead of 3. Compiling dominates these tiny programs, and level 1
# compiles them 2-3x faster (tiny U-Net train-state init 10.9 -> 4.0 s, tiny autoencoder
# construction 15.4 -> 4.4 s) for slower execution; results are the same IEEE arithmetic.
# ``LDM_JAX_TEST_XLA_EXTRA=""`` runs the suite with XLA's default (the product's) level.
EXTRA_XLA_FLAGS = os.environ.setdefault("LDM_JAX_TEST_XLA_EXTRA", "--xla_backend_optimization_level=1")


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a test process with ``devices`` host CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {EXTRA_XLA_FLAGS}".strip()


def cpu_env(devices: int = 8, **extra: str) -> dict:
    """The environment of a command-line tool a test starts: CPU, ``devices`` host devices,
    the tests' XLA flags, offline."""
    return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
                LDM_JAX_OFFLINE="1", **extra)


for _flag in xla_flags(8).split():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def _offline_and_compile_cache(tmp_path_factory):
    """No network in tests; one persistent compilation cache for the whole run, shared by
    the xdist workers (the parent of their temp dirs) and, through the environment, by
    the command-line tools and worker processes tests start (train.py, sample.py, bench).
    An entry read while another process is still writing it fails to decompress; jax then
    warns and compiles instead."""
    os.environ["LDM_JAX_OFFLINE"] = "1"
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    cache = base / "xla_cache"
    cache.mkdir(exist_ok=True)
    min_compile_s = 0.5
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_compile_s)
    yield
