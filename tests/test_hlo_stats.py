"""Kernel statistics of compiled programs (ldm_jax.hlo_stats) and the deviceless GPU
targets (ldm_jax.gpu_targets), on CPU-compiled programs with known answers."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import gpu_targets, hlo_stats


def _stats(fn, *args, **jit_kw):
    compiled = jax.jit(fn, **jit_kw).lower(*args).compile()
    return hlo_stats.kernel_stats(compiled.as_text()), compiled


def test_shape_bytes():
    assert hlo_stats.shape_bytes("f32[2,3]{1,0}") == 24
    assert hlo_stats.shape_bytes("(f32[2,3]{1,0}, bf16[4]{0}, pred[])") == 24 + 8 + 1
    assert hlo_stats.shape_bytes("s32[]") == 4 and hlo_stats.shape_bytes("u8[0]{0}") == 0


def test_one_fused_elementwise_kernel_in_place():
    s, _ = _stats(lambda x: x * 2 + 1, jnp.zeros(1000), donate_argnums=0)
    # One fused kernel that reads 1000 floats and writes 1000: no copy for the donation.
    assert s["launches"] == 1 and s["bytes_moved"] == 8000
    assert "copy" not in s["by_kind"]
    assert s["by_phase"]["other"] == {"launches": 1, "bytes": 8000}


def test_sliced_operand_counts_only_the_slice():
    # sin(float(x)[:10]) of 1000 bf16 values reads 10 of them (as float32 after the
    # conversion: 40 bytes) and writes 10 floats, not the whole input.
    s, _ = _stats(lambda x: jnp.sin(x.astype(jnp.float32)[:10]), jnp.zeros(1000, jnp.bfloat16))
    assert s["launches"] == 1 and s["bytes_moved"] == 80


def test_loop_body_counted_trip_count_times():
    def loop(n):
        return lambda x: jax.lax.fori_loop(0, n, lambda i, v: jnp.sin(v) * 2, x)

    s7, _ = _stats(loop(7), jnp.zeros(1000))
    s14, _ = _stats(loop(14), jnp.zeros(1000))
    assert s7["loops"][0]["trip_count"] == 7 and s14["loops"][0]["trip_count"] == 14
    per_iter = (s14["launches"] - s7["launches"]) / 7
    assert per_iter >= 1 and per_iter == int(per_iter)
    assert s7["launches"] == pytest.approx(s14["launches"] - 7 * per_iter)
    # Each iteration reads and writes the 1000-float carry at least once.
    assert (s14["bytes_moved"] - s7["bytes_moved"]) / 7 >= 8000


def test_stats_and_table_of_one_program_parse_it_once(monkeypatch):
    """bench --profile reads the same program twice (statistics, trace join): one parse,
    and what the callers get are copies."""
    text = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, v: jnp.sin(v), x)).lower(
        jnp.zeros(64)).compile().as_text()
    calls = []
    real = hlo_stats.parse_computations
    monkeypatch.setattr(hlo_stats, "parse_computations", lambda t: calls.append(1) or real(t))
    first = hlo_stats.kernel_stats(text)
    first["loops"][0]["trip_count"] = -1
    table, _ = hlo_stats.kernel_table(text)
    again = hlo_stats.kernel_stats(text)
    assert len(calls) == 1
    assert again["loops"][0]["trip_count"] == 3 and sum(k["count"] for k in table.values()) == again["launches"]
    hlo_stats.kernel_stats(text.replace("HloModule", "HloModule ", 1))  # another text: parsed
    assert len(calls) == 2


def test_conditional_branches_are_walked():
    f = lambda p, x: jax.lax.cond(p, lambda v: jnp.sin(v) * 2, lambda v: jnp.cos(v) + 1, x)  # noqa: E731
    s, _ = _stats(f, True, jnp.zeros(1000))
    # The predicate's conversion, then one fused kernel per branch (each reads and writes
    # 1000 floats): both branches are counted, since either may run.
    assert s["launches"] == 3 and s["bytes_moved"] >= 2 * 8000


def test_forward_backward_phases_of_a_gradient():
    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    s, compiled = _stats(jax.grad(loss), jnp.zeros((16, 16)), jnp.zeros((8, 16)))
    assert s["by_phase"]["forward"]["launches"] >= 1
    assert s["by_phase"]["backward"]["launches"] >= 1
    m = hlo_stats.memory_stats(compiled)
    assert m["argument_bytes"] == 4 * (16 * 16 + 8 * 16) and m["output_bytes"] == 4 * 16 * 16
    assert m["peak_bytes_estimate"] >= m["argument_bytes"] + m["output_bytes"]
    assert "kernels" in hlo_stats.summary_line(s)


def test_not_hlo_text():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_stats.kernel_stats("module foo\n")


def test_gpu_target_configs():
    for name in gpu_targets.TARGETS:
        text = gpu_targets.target_config(name)
        assert 'platform_name: "CUDA"' in text and "core_count:" in text
        assert f"device_memory_size: {gpu_targets.device_memory_bytes(name)}" in text
    assert "H100" in gpu_targets.target_config("h100")
    with pytest.raises(ValueError, match="known: h100"):
        gpu_targets.target_config("h900")


def _have_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


HAVE_CUDA_PLUGIN = _have_cuda_plugin()


@pytest.mark.skipif(HAVE_CUDA_PLUGIN, reason="the CUDA plugin is installed here")
def test_gpu_target_without_plugin_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"pip install \"jax\[cuda12\]"):
        gpu_targets.topology_devices("h100")


@pytest.mark.skipif(not HAVE_CUDA_PLUGIN, reason="needs the JAX CUDA plugin (no GPU needed)")
def test_compile_for_h100_without_a_gpu(tmp_path):
    """The bench CLI compiles the tiny U-Net step for an H100 on this machine."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "ldm_jax.bench", "unet", "--config",
                        "configs/ldm_f8.py:tiny", "--batch", "8", "--compile-only", "--target",
                        "h100", "--target-devices", "2", f"--out={out}"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["compiled_for"] == "NVIDIA H100 80GB HBM3" and r["num_devices"] == 2
    assert r["fits_in_device_memory"] and r["memory"]["peak_bytes_estimate"] > 0
    assert r["kernels"]["by_kind"].get("conv", {}).get("launches", 0) > 0  # cuDNN convs
