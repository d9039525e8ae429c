"""Test setup: 8 fake CPU devices so sharding code runs on a real mesh.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it at import
time (pytest imports conftest.py before any test module).
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(**extra: str) -> dict:
    """The environment of a command-line tool a test starts: CPU with 8 host devices, offline."""
    return dict(os.environ, XLA_FLAGS=_flag, JAX_PLATFORMS="cpu", LDM_JAX_OFFLINE="1", **extra)


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
