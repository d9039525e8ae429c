"""Analytic FLOP counter (ldm_jax.flops) against hand counts, and the bench command's JSON.

Part (a) only traces (``jax.make_jaxpr``) except where a conv of ones is evaluated as an
independent count of multiply-accumulates. Part (b) runs the three bench workloads on the
tiny configs (two in-process, the sampler through the CLI) and checks the JSON schema, not
the timings.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax import bench
from ldm_jax.flops import conv_flops, count_flops, count_jaxpr_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = jnp.float32


def _s(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _conv(x, w, stride=1, padding="SAME", groups=1, rhs_dilation=None, lhs_dilation=None):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, feature_group_count=groups,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _taps_by_hand(out, k, in_size, stride, lo, lhs_dil, rhs_dil, valid):
    """Plain loops: (output, tap) pairs on the lhs-dilation lattice (and inside the input)."""
    n = 0
    for o in range(out):
        for t in range(k):
            p = o * stride + t * rhs_dil - lo
            if p % lhs_dil:
                continue
            if valid and not (0 <= p <= (in_size - 1) * lhs_dil):
                continue
            n += 1
    return n


def _conv_eqns(jaxpr):
    for e in jaxpr.eqns:
        if e.primitive.name == "conv_general_dilated":
            yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(sub, "eqns") or hasattr(sub, "consts"):
                    yield from _conv_eqns(getattr(sub, "jaxpr", sub))


def _macs_of_ones(eqn) -> int:
    """Independent count: a conv of all-ones operands sums to its number of real products."""
    lhs, rhs = (jnp.ones(v.aval.shape, F32) for v in eqn.invars)
    out = lax.conv_general_dilated_p.bind(lhs, rhs, **eqn.params)
    return int(np.asarray(out, np.float64).sum())


# ---------------------------------------------------------------------------------------
# (a) the counter against hand counts
# ---------------------------------------------------------------------------------------


def test_matmul_and_elementwise_bucket():
    m, k, n = 4, 8, 16
    c = count_flops(lambda a, b: a @ b, _s(m, k), _s(k, n))
    assert c["matmul"] == 2 * m * n * k and c["model_flops"] == 2 * m * n * k
    assert c["conv"] == c["attention"] == c["elementwise"] == 0
    c = count_flops(lambda a, b: jnp.tanh(a @ b) + 1.0, _s(m, k), _s(k, n))
    assert c["model_flops"] == 2 * m * n * k  # tanh and add are not model FLOPs
    assert c["elementwise"] == 2 * m * n
    assert c["total_flops"] == c["model_flops"] + c["elementwise"]


def test_batched_dot_general():
    b, m, k, n = 3, 5, 7, 11
    c = count_flops(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y), _s(b, m, k), _s(b, k, n))
    assert c["matmul"] == 2 * b * m * n * k
    # Two batch dims, two contracting dims, free dims on both sides.
    dn = (((3, 4), (3, 2)), ((0, 1), (0, 1)))
    c = count_flops(lambda x, y: lax.dot_general(x, y, dn), _s(2, 3, 5, 4, 6), _s(2, 3, 6, 4, 9))
    assert c["matmul"] == 2 * (2 * 3) * 5 * 9 * (4 * 6)
    assert c["dot_general_ops"] == 1


@pytest.mark.parametrize("mode", ["dense", "valid"])
def test_strided_padded_conv(mode):
    n, hw, cin, cout = 2, 10, 3, 5
    fn = lambda x, w: _conv(x, w, stride=2, padding=((1, 1), (1, 1)))  # noqa: E731
    c = count_flops(fn, _s(n, hw, hw, cin), _s(3, 3, cin, cout), conv_mode=mode)
    # Output 5x5. Dense: every tap, padding included (9 per output). Valid: along one axis
    # output 0 has its first tap on the padding, so 5*3 - 1 = 14 pairs per axis.
    per_axis = 15 if mode == "dense" else 14
    assert c["conv"] == 2 * n * cout * cin * per_axis ** 2
    assert c["model_flops"] == c["conv"] and c["conv_ops"] == 1
    x = jnp.ones((n, hw, hw, cin))
    w = jnp.ones((3, 3, cin, cout))
    if mode == "valid":  # a conv of ones counts the real products
        assert c["conv"] == 2 * float(fn(x, w).sum())
    else:  # ... and with the padding made of ones too, the dense taps
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
        assert c["conv"] == 2 * float(_conv(xp, w, stride=2, padding="VALID").sum())


def test_rhs_and_lhs_dilated_conv():
    # Atrous: 3-tap kernel dilated by 2 over 10 (VALID) -> 6 outputs, 3 taps each.
    c = count_flops(lambda x, w: _conv(x, w, padding="VALID", rhs_dilation=(2, 2)),
                    _s(1, 10, 10, 4), _s(3, 3, 4, 6))
    assert c["conv"] == 2 * 1 * 6 * 6 * 6 * 4 * 9
    # Transposed conv (lhs dilation 2): taps on the holes do not count, padding taps do.
    x, w = _s(2, 5, 5, 4), _s(3, 3, 4, 6)
    pad = ((2, 1), (2, 1))
    fn = lambda x, w: _conv(x, w, padding=pad, lhs_dilation=(2, 2))  # noqa: E731
    out = jax.eval_shape(fn, x, w).shape[1]  # dilated 9, padded 12, 3 taps -> 10
    assert out == 10
    for mode in ("dense", "valid"):
        taps = _taps_by_hand(out, 3, 5, 1, 2, 2, 1, valid=mode == "valid")
        c = count_flops(fn, x, w, conv_mode=mode)
        assert c["conv"] == 2 * 2 * 6 * 4 * taps ** 2, mode
    assert _taps_by_hand(out, 3, 5, 1, 2, 2, 1, valid=False) < out * 3  # holes were skipped
    vx = count_flops(fn, x, w, conv_mode="valid")["conv"]
    assert vx == 2 * float(fn(jnp.ones(x.shape), jnp.ones(w.shape)).sum())


def test_grouped_conv():
    n, hw, cin, cout, g = 2, 8, 8, 12, 4
    c = count_flops(lambda x, w: _conv(x, w, groups=g), _s(n, hw, hw, cin),
                    _s(3, 3, cin // g, cout))
    assert c["conv"] == 2 * n * hw * hw * cout * 9 * (cin // g)
    # Depthwise.
    c = count_flops(lambda x, w: _conv(x, w, groups=cin), _s(n, hw, hw, cin), _s(3, 3, 1, cin))
    assert c["conv"] == 2 * n * hw * hw * cin * 9


def _net(params, x, stride2=2, groups=4):
    w1, w2 = params
    h = jnp.tanh(_conv(x, w1))
    h = _conv(h, w2, stride=stride2, padding=((1, 1), (1, 1)), groups=groups)
    return jnp.sum(h ** 2)


@pytest.mark.parametrize("hw,mode", [(16, "dense"), (16, "valid"), (15, "valid")])
def test_grad_of_conv_net_is_three_forwards(hw, mode):
    """value_and_grad w.r.t. params and input: fwd + dgrad + wgrad per conv = 3x forward.

    Exact for every shape when only real products count (``valid``); with the dense
    convention exact when the stride divides the size (16), since the input gradient of a
    stride-2 conv is a conv with lhs_dilation 2 whose holes are skipped.
    """
    n, c0, c1, c2 = 2, 3, 8, 12
    params = (_s(3, 3, c0, c1), _s(3, 3, c1 // 4, c2))
    x = _s(n, hw, hw, c0)
    valid = mode == "valid"
    # By hand: conv 1 is 3x3 SAME stride 1, conv 2 is 3x3 pad 1 stride 2 with 4 groups.
    f1 = 2 * n * c1 * c0 * _taps_by_hand(hw, 3, hw, 1, 1, 1, 1, valid) ** 2
    out2 = (hw + 2 - 3) // 2 + 1
    f2 = 2 * n * c2 * (c1 // 4) * _taps_by_hand(out2, 3, hw, 2, 1, 1, 1, valid) ** 2
    if not valid:
        assert (f1, f2) == (2 * n * hw * hw * c1 * c0 * 9, 2 * n * out2 ** 2 * c2 * (c1 // 4) * 9)
    fwd = count_flops(_net, params, x, conv_mode=mode)
    assert fwd["conv"] == f1 + f2 and fwd["conv_ops"] == 2
    both = count_flops(jax.value_and_grad(_net, argnums=(0, 1)), params, x, conv_mode=mode)
    assert both["conv_ops"] == 6
    assert both["conv"] == 3 * (f1 + f2)
    # Params only: the first conv's input gradient is dead code (DCE, as XLA would).
    params_only = count_flops(jax.value_and_grad(_net), params, x, conv_mode=mode)
    assert params_only["conv_ops"] == 5
    assert params_only["conv"] == 2 * f1 + 3 * f2


def test_matches_xla_cost_analysis_on_cpu():
    """On CPU convs stay HLO, so XLA's own count is a cross-check: it skips padding taps."""
    params = (jnp.ones((3, 3, 3, 8)), jnp.ones((3, 3, 2, 12)))
    x = jnp.ones((2, 16, 16, 3))
    fn = jax.value_and_grad(_net, argnums=(0, 1))
    c = count_flops(fn, params, x)
    assert c["conv_dense"] == c["conv"] > c["conv_valid"]
    cost = jax.jit(fn).lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] == pytest.approx(c["conv_valid"] + c["elementwise"], rel=0.02)


def test_backward_convs_against_conv_of_ones():
    """Each conv of a gradient (lhs dilation, batch_group_count, ...) vs. a direct count."""
    params = (_s(3, 3, 3, 8), _s(3, 3, 2, 12))
    x = _s(2, 11, 11, 3)
    closed = jax.make_jaxpr(jax.value_and_grad(_net, argnums=(0, 1)))(params, x)
    eqns = list(_conv_eqns(closed.jaxpr))
    assert len(eqns) == 6
    assert any(e.params["batch_group_count"] > 1 for e in eqns)  # grouped weight gradient
    assert any(any(d > 1 for d in e.params["lhs_dilation"]) for e in eqns)  # strided dgrad
    for e in eqns:
        p = e.params
        f = conv_flops(e.invars[0].aval.shape, e.invars[1].aval.shape, e.outvars[0].aval.shape,
                       window_strides=p["window_strides"], padding=p["padding"],
                       lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
                       dimension_numbers=p["dimension_numbers"], mode="valid")
        assert f == 2 * _macs_of_ones(e)


def test_scan_fori_while():
    m = 8
    body = lambda c: jnp.tanh(c @ c)  # noqa: E731
    one = 2 * m ** 3
    x = _s(m, m)

    def scanned(x):
        return lax.scan(lambda c, _: (body(c), None), x, None, length=7)[0]

    assert count_flops(scanned, x)["matmul"] == 7 * one
    # fori_loop with static bounds (lowers to scan).
    fori = lambda x: lax.fori_loop(2, 9, lambda i, c: body(c), x)  # noqa: E731
    assert count_flops(fori, x)["matmul"] == 7 * one
    # while_loop in the fori shape with known bounds: trip count derived.
    wl = lambda x: lax.while_loop(lambda c: c[0] < 5,  # noqa: E731
                                  lambda c: (c[0] + 1, body(c[1])), (0, x))[1]
    c = count_flops(wl, x)
    assert c["matmul"] == 5 * one and c["unknown_trip_count_loops"] == 0
    wl2 = lambda x: lax.while_loop(lambda c: c[0] < c[1],  # noqa: E731
                                   lambda c: (c[0] + 1, c[1], body(c[2])), (3, 7, x))[2]
    assert count_flops(wl2, x)["matmul"] == 4 * one
    # Traced bound: one iteration counted and flagged.
    traced = lambda x, n: lax.fori_loop(0, n, lambda i, c: body(c), x)  # noqa: E731
    c = count_flops(traced, x, _s(dtype=jnp.int32))
    assert c["matmul"] == one and c["unknown_trip_count_loops"] == 1 and c["notes"]
    # A bound carried by an enclosing loop is not a constant: flagged, not guessed.
    def outer(c, _):
        i, y = c
        y = lax.while_loop(lambda d: d[0] < i, lambda d: (d[0] + 1, body(d[1])), (0, y))[1]
        return (i + 1, y), None

    c = count_flops(lambda x: lax.scan(outer, (1, x), None, length=3)[0][1], x)
    assert c["matmul"] == 3 * one and c["unknown_trip_count_loops"] == 1
    # Nested: scan of a scan.
    nested = lambda x: lax.scan(lambda c, _: (scanned(c), None), x, None, length=3)[0]  # noqa: E731
    assert count_flops(nested, x)["matmul"] == 21 * one


def test_jit_nested_and_cond():
    m = 8
    one = 2 * m ** 3
    inner = jax.jit(lambda a: a @ a)
    outer = jax.jit(lambda a: inner(inner(a)) @ a)
    assert count_flops(lambda a: outer(a) + inner(a), _s(m, m))["matmul"] == 4 * one
    # cond: the dearer branch by default, both with cond="sum".
    fn = lambda p, a: lax.cond(p, lambda a: (a @ a) @ a, lambda a: a @ a, a)  # noqa: E731
    args = (_s(dtype=jnp.bool_), _s(m, m))
    assert count_flops(fn, *args)["matmul"] == 2 * one
    assert count_flops(fn, *args, cond="sum")["matmul"] == 3 * one


def test_remat_recompute_counted():
    b, k, n = 4, 8, 16
    w1, w2, x = _s(k, n), _s(n, k), _s(b, k)
    mm = 2 * b * k * n

    def loss(w1, w2, x, remat):
        layer = lambda w, x: jnp.tanh(x @ w)  # noqa: E731
        if remat:
            layer = jax.checkpoint(layer)
        return jnp.sum(layer(w1, x) @ w2)

    for remat, expected in ((False, 6 * mm), (True, 7 * mm)):
        # 2 forward matmuls, 2 gradients each, + the first layer's forward recomputed.
        vg = jax.value_and_grad(lambda *a: loss(*a, remat), argnums=(0, 1, 2))
        c = count_flops(vg, w1, w2, x)
        assert c["matmul"] == expected, remat


def test_attention_bucket():
    b, t, nh, h = 2, 16, 4, 8
    q = _s(b, t, nh, h)
    fwd = count_flops(lambda q, k, v: jax.nn.dot_product_attention(q, k, v), q, q, q)
    assert fwd["attention"] == 2 * (2 * b * nh * t * t * h) and fwd["matmul"] == 0
    loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v) ** 2)  # noqa: E731
    both = count_flops(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, q, q)
    assert both["attention"] == 3 * fwd["attention"]
    assert both["model_flops"] == both["matmul"] + both["attention"] + both["conv"]


def test_shard_map_counts_all_shards():
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.shard_map(lambda a, w: a @ w, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
    c = count_flops(f, _s(64, 16), _s(16, 32))
    assert c["matmul"] == 2 * 64 * 16 * 32  # 8 shards of 8 rows


def test_closed_jaxpr_entry_and_bad_options():
    closed = jax.make_jaxpr(lambda a: a @ a)(jnp.ones((4, 4)))
    assert count_jaxpr_flops(closed)["matmul"] == 2 * 4 ** 3
    with pytest.raises(ValueError):
        count_jaxpr_flops(closed, cond="min")
    with pytest.raises(ValueError):
        count_jaxpr_flops(closed, conv_mode="exact")


# ---------------------------------------------------------------------------------------
# (b) the bench command's JSON
# ---------------------------------------------------------------------------------------

COMMON_KEYS = ("workload", "config", "batch", "dtype", "steps", "device", "num_devices", "jax",
               "python", "compile_s", "compile_cache", "step_s_median", "step_s_mean", "images_per_s",
               "flops_per_step", "tflops_per_s", "mfu", "peak_bf16_flops_per_device",
               "peak_memory_bytes", "flops_source", "flops_breakdown", "xla_cost_analysis_flops")
EXTRA_KEYS = {
    "vae_gan_step": ("resolution", "lpips", "last_loss", "nan_skipped", "grad_accum_steps",
                     "remat", "remat_policy", "state_convention", "dispatch_s_median",
                     "step_s_pipelined", "images_per_s_pipelined"),
    "unet_step": ("input_shape", "params", "remat", "remat_policy", "last_loss", "nan_skipped",
                  "grad_accum_steps", "state_convention", "dispatch_s_median", "step_s_pipelined",
                  "images_per_s_pipelined"),
    "sample_ddim": ("sampler", "sampler_steps", "cfg_scale", "output_shape", "finite", "decoded",
                    "note"),
}
BREAKDOWN_KEYS = ("matmul", "attention", "conv", "conv_valid", "elementwise",
                  "unknown_trip_count_loops", "notes")
# Numbers that may be None: no bf16 peak known for the CPU, memory stats absent.
MAY_BE_NONE = ("mfu", "peak_bf16_flops_per_device", "peak_memory_bytes", "xla_cost_analysis_flops")


def _no_nan(text: str) -> dict:
    def bad(c):
        raise ValueError(f"non-JSON number {c}")
    return json.loads(text, parse_constant=bad)


def _check_result(r: dict, workload: str, batch: int, steps: int) -> None:
    r = _no_nan(json.dumps(r))  # valid JSON: no NaN/Infinity
    for k in COMMON_KEYS + EXTRA_KEYS[workload]:
        assert k in r, k
    assert r["workload"] == workload and r["batch"] == batch and r["steps"] == steps
    assert r["num_devices"] == 8
    for k, v in r.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert math.isfinite(v), k
    for k in ("compile_s", "step_s_median", "step_s_mean", "images_per_s", "flops_per_step",
              "tflops_per_s"):
        assert isinstance(r[k], (int, float)) and r[k] > 0, k
    for k in MAY_BE_NONE:
        assert r[k] is None or (isinstance(r[k], (int, float)) and r[k] >= 0), k
    assert r["compile_cache"] in ("off", "miss", "hit")
    if "dispatch_s_median" in r:  # each call returns before its step is waited for
        assert r["state_convention"] in ("flat", "tree")
        assert 0 < r["dispatch_s_median"] <= r["step_s_median"]
        assert r["images_per_s_pipelined"] == pytest.approx(r["batch"] / r["step_s_pipelined"])
    if "remat" in r:  # the policy is recorded exactly when remat is on
        assert r["remat_policy"] in ((None,) if r["remat"] is False else ("full", "minimal")), r
    b = r["flops_breakdown"]
    assert set(b) == set(BREAKDOWN_KEYS)
    assert r["flops_per_step"] == b["matmul"] + b["attention"] + b["conv"]
    assert 0 < b["conv_valid"] <= b["conv"] and b["unknown_trip_count_loops"] == 0
    assert r["flops_source"].startswith("analytic")
    _check_compiled(r)
    if r["mfu"] is not None:
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_s_median"]
                                         / (r["peak_bf16_flops_per_device"] * r["num_devices"]))


def _check_compiled(r: dict) -> None:
    """The compiled program's statistics every result carries (ldm_jax.hlo_stats)."""
    m, k = r["memory"], r["kernels"]
    assert r["compiled_for"] == "cpu"
    assert m["peak_bytes_estimate"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
                                        + m["temp_bytes"] + m["generated_code_bytes"])
    assert m["argument_bytes"] > 0 and 0 <= m["alias_bytes"] <= m["argument_bytes"]
    assert k["launches"] == sum(v["launches"] for v in k["by_kind"].values()) > 0
    assert k["bytes_moved"] == sum(v["bytes"] for v in k["by_phase"].values()) > 0


def test_counter_failure_falls_back_to_xla(monkeypatch):
    from ldm_jax import flops

    def boom(*a, **k):
        raise NotImplementedError("no rule")

    monkeypatch.setattr(flops, "count_flops", boom)
    c = bench._analytic_flops(lambda x: x, 1.0)
    assert c["failed"] and c["model_flops"] is None and "no rule" in c["notes"][0]
    with pytest.raises(NotImplementedError):
        bench._analytic_flops(lambda x: x, 1.0, strict=True)


def test_bench_vae_in_process():
    r = bench.bench_vae("configs/vae_f8.py:tiny", 8, 1, 0, {})
    _check_result(r, "vae_gan_step", 8, 1)


def test_bench_unet_in_process_and_flops_only(tmp_path, monkeypatch):
    monkeypatch.setitem(bench._PROFILE, "dir", str(tmp_path / "trace"))  # as --profile DIR
    monkeypatch.setitem(bench._PROFILE, "steps", 2)
    r = bench.bench_unet("configs/ldm_f8.py:tiny", 8, 2, 1, {}, breakdown=True)
    _check_result(r, "unet_step", 8, 2)
    # --profile: two more steps traced; their kernels joined with the compiled step's HLO.
    prof = r["profile"]
    assert prof["module"] == "jit_step_fn" and prof["steps"] == 2, prof
    assert prof["trace"].startswith(str(tmp_path / "trace")) and prof["trace"].endswith(".xplane.pb")
    assert prof["attributed_share"] > 0.99 and {"forward", "backward", "other"} <= set(prof["by_phase"])
    assert 0 < prof["kernels_per_step"] <= r["kernels"]["launches"]
    assert prof["step_s"] == r["step_s_median"] and 0 < prof["busy_s"] <= prof["kernel_s"] * (1 + 1e-9)
    assert prof["profiled_step_s"] >= prof["busy_s"]
    assert prof["top_kernels"][0]["time_s"] >= prof["top_kernels"][-1]["time_s"] > 0
    assert r["flops_breakdown"]["attention"] > 0  # the tiny U-Net has an attention level
    # --breakdown: forward and forward + backward timed alone, the update by difference.
    parts = r["breakdown"]
    assert set(parts) == {"step_s", "forward_s", "forward_backward_s", "update_s", "update_share",
                          "forward_compile_cache", "forward_backward_compile_cache"}
    assert parts["step_s"] == r["step_s_median"]
    assert all(np.isfinite(v) for k, v in parts.items() if k.endswith("_s") or k == "update_share")
    assert parts["forward_s"] > 0
    assert parts["update_s"] == pytest.approx(parts["step_s"] - parts["forward_backward_s"])
    # The trainers' flat train state and the nnx.State tree (--tree-state): the same steps.
    assert r["state_convention"] == "flat"
    monkeypatch.setattr(bench, "_FLAT_STATE", False)
    t = bench.bench_unet("configs/ldm_f8.py:tiny", 8, 2, 1, {})
    assert t["state_convention"] == "tree" and t["last_loss"] == r["last_loss"]
    monkeypatch.setattr(bench, "_FLAT_STATE", True)
    # Abstract inputs only: the same count, no timing fields.
    f = bench.bench_unet("configs/ldm_f8.py:tiny", 8, 2, 1, {}, flops_only=True)
    assert f["flops_per_step"] == r["flops_per_step"]
    assert f["flops_breakdown"] == r["flops_breakdown"]
    assert "step_s_median" not in f and f["flops_source"] == r["flops_source"]
    # Compile only: the same program compiled, its memory and kernels, nothing run.
    c = bench.bench_unet("configs/ldm_f8.py:tiny", 8, 2, 1, {}, compile_only=True)
    assert c["flops_per_step"] == r["flops_per_step"] and "step_s_median" not in c
    _check_compiled(c)
    assert c["memory"] == r["memory"] and c["kernels"]["launches"] == r["kernels"]["launches"]
    # A training step has all three phases; the update ("other") reads and writes the
    # parameters and both Adam moments (fp32 here), EMA too: at least 7 parameter sizes.
    phases = c["kernels"]["by_phase"]
    assert all(phases[p]["launches"] > 0 for p in ("forward", "backward", "other"))
    assert phases["other"]["bytes"] >= 7 * 4 * c["params"]


def test_bench_counts_accumulated_microbatches():
    """A step of 2 microbatches of 8 has the FLOPs of one pass over all 16 images (the
    scan's trip count is counted); --breakdown cannot split such a step."""
    whole = bench.bench_unet("configs/ldm_f8.py:tiny", 16, 2, 1, {}, flops_only=True)
    accum = bench.bench_unet("configs/ldm_f8.py:tiny", 16, 2, 1, {"optim.grad_accum_steps": 2},
                             flops_only=True)
    assert accum["flops_per_step"] == pytest.approx(whole["flops_per_step"], rel=1e-6)
    assert accum["flops_breakdown"]["unknown_trip_count_loops"] == 0
    assert accum["grad_accum_steps"] == 2 and whole["grad_accum_steps"] == 1
    with pytest.raises(ValueError, match="grad_accum_steps"):
        bench.bench_unet("configs/ldm_f8.py:tiny", 16, 2, 1, {"optim.grad_accum_steps": 2},
                         breakdown=True)


def test_bench_cli_target_needs_compile_only():
    p = subprocess.run([sys.executable, "-m", "ldm_jax.bench", "unet", "--target", "h100"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--compile-only" in p.stderr


def test_bench_sample_cli(tmp_path):
    """The CLI end to end; the sampler's loop is counted num_steps times."""
    out = tmp_path / "sample.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", LDM_JAX_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "ldm_jax.bench", "sample",
                        "--config=configs/ldm_f8.py:tiny", "--batch", "8", "--steps", "1",
                        "--warmup", "0", f"--out={out}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = _no_nan(out.read_text())
    assert r == _no_nan(p.stdout[p.stdout.index("{"):])
    _check_result(r, "sample_ddim", 8, 1)
    assert r["sampler_steps"] == 4 and r["finite"] and r["decoded"]
    # FLOPs(n steps) = decode + n * U-Net: linear in the step count.
    f = {n: bench.bench_sample("configs/ldm_f8.py:tiny", 8, 1, 0,
                               {"sampling.num_steps": str(n)}, flops_only=True)["flops_per_step"]
         for n in (1, 2)}
    unet = f[2] - f[1]
    assert unet > 0 and r["flops_per_step"] == pytest.approx(f[1] + 3 * unet, rel=1e-12)


def test_bench_cli_config_mistakes_are_one_error(capsys):
    """A mistyped --set key or a missing --config file: status 2 and one error line."""
    with pytest.raises(SystemExit) as e:
        bench.main(["unet", "--config", "configs/ldm_f8.py:tiny", "--set", "model.remmat=1", "--flops-only"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unknown config key 'model.remmat'; did you mean ")
    with pytest.raises(SystemExit) as e:
        bench.main(["unet", "--config", "configs/no_such.py", "--flops-only"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: config file 'configs/no_such.py' does not exist\n"


@pytest.mark.parametrize("args", [["--compile-only"], ["--flops-only"], ["--profile-steps", "0"]])
def test_bench_cli_profile_needs_a_timed_run(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["unet", "--profile", "trace_dir", *args])
    assert e.value.code == 2 and "--profile" in capsys.readouterr().err
