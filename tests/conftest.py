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
