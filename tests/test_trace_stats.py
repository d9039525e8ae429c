"""Per-kernel device time from a profiler trace joined with the optimized HLO
(ldm_jax.trace_stats), on CPU-profiled programs: XLA:CPU reports each thunk with its
HLO instruction, as a GPU reports each kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import hlo_stats, trace_stats


def _profiled(fn, args, steps, directory):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    with jax.profiler.trace(str(directory)):
        for _ in range(steps):
            jax.block_until_ready(compiled(*args))
    return compiled, trace_stats.latest_trace(str(directory))


def test_training_like_program_split_by_phase_and_loop_counted(tmp_path):
    """A loss, its gradient (forward / backward) and an update ("other") inside a fori_loop
    of 4 iterations: every kernel is attributed, loop kernels run 4x per call, and the
    phases and kinds add up to the kernel time."""
    w = jnp.ones((128, 128)) * 0.01
    x = jnp.ones((64, 128))

    def step(w, x):
        def body(_, w):
            g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
            return w - 0.1 * g
        return jax.lax.fori_loop(0, 4, body, w)

    steps = 3
    compiled, path = _profiled(step, (w, x), steps, tmp_path)
    table, controls = hlo_stats.kernel_table(compiled.as_text())
    assert controls and all(name not in table for name in controls)  # the while loop
    s = trace_stats.summarize(path, compiled.as_text(), steps=steps, step_s=0.5)
    assert s["module"] == trace_stats.module_name(compiled.as_text()) == "jit_step"
    assert s["steps"] == steps and s["attributed_share"] == pytest.approx(1.0)
    assert {"forward", "backward"} <= set(s["by_phase"]) and "unattributed" not in s["by_phase"]
    assert sum(s["by_phase"].values()) == pytest.approx(s["kernel_s"], rel=1e-9)
    assert sum(s["by_kind"].values()) == pytest.approx(s["kernel_s"], rel=1e-9)
    assert 0 < s["busy_s"] <= s["kernel_s"] * (1 + 1e-9)
    assert s["idle_s"] == pytest.approx(0.5 - s["busy_s"])
    # Kernels inside the loop body ran 4 times per call, as the HLO's trip count says.
    for r in s["top_kernels"]:
        assert r["hlo_op"] in table and r["calls"] == table[r["hlo_op"]]["count"]
        assert r["phase"] == table[r["hlo_op"]]["phase"] and r["bytes_per_call"] > 0
    assert any(r["calls"] == 4 for r in s["top_kernels"])
    # (XLA:CPU evaluates the loop condition inside the while thunk, without an event.)
    assert s["kernels_per_step"] == sum(r["calls"] for r in s["top_kernels"]) <= sum(
        k["count"] for k in table.values())
    assert trace_stats.summary_lines(s)[0].startswith("profile of jit_step on ")


def test_other_programs_are_not_counted(tmp_path):
    """Only the summarized program's kernels count, and a trace without them is an error."""
    def first(x):
        return jnp.sin(x) * 2

    def second(x):
        return jnp.cos(x) @ x

    x = jnp.ones((64, 64))
    ca, cb = jax.jit(first).lower(x).compile(), jax.jit(second).lower(x).compile()
    jax.block_until_ready((ca(x), cb(x)))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready((ca(x), cb(x), cb(x)))
    path = trace_stats.latest_trace(str(tmp_path))
    sa = trace_stats.summarize(path, ca.as_text(), steps=2)
    table_a, _ = hlo_stats.kernel_table(ca.as_text())
    assert {r["hlo_op"] for r in sa["top_kernels"]} <= set(table_a)
    assert sa["kernels_per_step"] == pytest.approx(sum(k["count"] for k in table_a.values()))
    assert sa["module"] == "jit_first"
    with pytest.raises(ValueError, match="no kernels of jit_other"):
        trace_stats.summarize(path, ca.as_text().replace("HloModule jit_first", "HloModule jit_other", 1),
                              steps=2)
    # On a GPU, a trace without the device's plane (no CUPTI) is an error, not host times.
    with pytest.raises(ValueError, match="no /device:GPU:N plane"):
        trace_stats.summarize(path, ca.as_text(), steps=2, platform="gpu")
    with pytest.raises(FileNotFoundError, match="xplane"):
        trace_stats.latest_trace(str(tmp_path / "empty"))


def test_gpu_kernel_annotation_parsed():
    """On a GPU the profiler gives each kernel XLA's annotation stack as one string
    (module range, then the thunk's range); hlo_op and hlo_module are read out of it."""
    ann = {"annotation": "XlaModule:#prefix=jit(step_fn),hlo_module=jit_step_fn,program_id=7#::"
                         "Thunk:#name=transpose(jvp(UNet))/conv,hlo_op=custom-call.12#",
           "correlation_id": 42}
    assert trace_stats._stat_str(ann, "hlo_op", trace_stats._HLO_OP) == "custom-call.12"
    assert trace_stats._stat_str(ann, "hlo_module", trace_stats._HLO_MODULE) == "jit_step_fn"
    assert trace_stats._stat_str({"hlo_op": "fusion.3"}, "hlo_op", trace_stats._HLO_OP) == "fusion.3"
    assert trace_stats._stat_str({"kernel_details": "regs:32"}, "hlo_op", trace_stats._HLO_OP) is None
