"""benchmarks/side_by_side.py's scheduling for short GPU sessions: --prewarm (concurrent
one-step runs into persistent compilation caches, then timed runs that load from them),
--jax-variant rows, --deadline. JAX side only (no torch needed), tiny U-Net step, CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE_BY_SIDE = os.path.join(REPO, "benchmarks", "side_by_side.py")


def _env():
    env = cpu_env(PYTHONPATH=REPO)
    for k in ("JAX_COMPILATION_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        env.pop(k, None)  # the runner's own cache dir must be the one used
    return env


def _run(args, timeout=900):
    return subprocess.run([sys.executable, SIDE_BY_SIDE, *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_prewarm_then_timed_runs_load_from_the_cache(tmp_path):
    out = tmp_path / "sbs"
    variant_args = f"--breakdown --profile {tmp_path / 'trace'} --profile-steps 1"
    p = _run(["--tiny", "--workloads", "unet", "--skip-torch", "--steps", "1", "--warmup", "0",
              "--prewarm", "--jobs", "2", "--jax-variant", f"unet:bd:{variant_args}",
              f"--out-dir={out}"])
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    rep = json.loads((out / "side_by_side.json").read_text())
    assert set(rep["warm"]) == {"jax:unet", "jax:unet:bd"}
    assert set(rep["runs"]) == {"jax:unet", "jax:unet:bd"}
    for key in rep["warm"]:
        # The one-step warm runs compiled into the empty cache; the timed runs, the same
        # commands but for --steps / --warmup, found their programs there.
        assert rep["warm"][key]["compile_cache"] == "miss", key
        assert rep["runs"][key]["compile_cache"] == "hit", key
        assert rep["runs"][key]["steps"] == 1
    assert rep["runs"]["jax:unet:bd"]["breakdown"]["forward_backward_compile_cache"] == "hit"
    assert any(f.startswith("jit_step_fn-") for f in os.listdir(out / "cache" / "jax"))
    (row,) = rep["rows"]
    assert row["cold_compile_s"]["jax"] == rep["warm"]["jax:unet"]["compile_s"]
    assert row["compile_s"]["jax"] == rep["runs"]["jax:unet"]["compile_s"]
    assert row["jax_compile_cache"] == "hit"
    (v,) = rep["variant_rows"]
    assert v["label"] == "bd" and v["args"] == variant_args and not v["failed"]
    assert v["ratio_over_default_jax"] == pytest.approx(
        rep["runs"]["jax:unet:bd"]["images_per_s"] / rep["runs"]["jax:unet"]["images_per_s"])
    assert v["breakdown"]["update_s"] is not None
    # --profile in the variant: the headline of the trace summary in the row and the table.
    prof = v["profile"]
    assert prof["kernels_per_step"] > 0 and prof["step_s"] == v["step_s_median"]
    assert {"forward", "backward", "other"} <= set(prof["by_phase"]) and 0 < len(prof["top_kernels"]) <= 8
    assert rep["runs"]["jax:unet:bd"]["profile"]["steps"] == 1
    md = (out / "side_by_side.md").read_text()
    assert f"| U-Net step | bd | `{variant_args}` |" in md and "cold figures of the `--prewarm` runs" in md
    assert "Profile of U-Net step `bd` (device 0, profiled steps):" in md
    # The cold compile shows in the table, not the cache lookup.
    assert f"{row['cold_compile_s']['jax']:.1f} s" in md


def test_deadline_skips_and_reports(tmp_path):
    out = tmp_path / "d"
    p = _run(["--tiny", "--workloads", "unet,sample", "--skip-torch", "--deadline", "1",
              f"--out-dir={out}"], timeout=120)
    assert p.returncode == 1  # an incomplete report is not a success
    rep = json.loads((out / "side_by_side.json").read_text())
    assert set(rep["runs"]) == {"jax:unet", "jax:sample"}
    assert all(r["error"].startswith("skipped: deadline") for r in rep["runs"].values())
    assert "Failed runs:" in rep["markdown"] and "skipped: deadline" in rep["markdown"]


@pytest.mark.parametrize("spec", ["unet:cudnn", "vae:x:--batch 2", "unet:eager:--breakdown",
                                  "nope:x:--breakdown"])
def test_bad_jax_variant_is_a_usage_error(tmp_path, spec):
    p = _run(["--tiny", "--workloads", "unet", "--jax-variant", spec, f"--out-dir={tmp_path}"],
             timeout=120)
    assert p.returncode == 2 and "--jax-variant" in p.stderr, p.stderr[-2000:]


def test_plan_order(tmp_path):
    """JAX and torch.compile of every workload first, then eager, then JAX variants."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import side_by_side as sbs
    finally:
        sys.path.pop(0)

    a = argparse.Namespace(jax_variant=["unet:cudnn:--set model.attention_impl=cudnn"],
                           batch=None, steps=None, tiny=False, set=["model.remat=false"],
                           jax_args="", torch_args="--fused-optim", skip_jax=False, skip_torch=False)
    plan = sbs._plan(a, ["vae", "unet"], ["eager", "compile"], 2)
    assert [r["key"] for r in plan] == ["jax:vae", "torch:vae:compile", "jax:unet",
                                        "torch:unet:compile", "torch:vae:eager",
                                        "torch:unet:eager", "jax:unet:cudnn"]
    assert [r["warmable"] for r in plan] == [True, True, True, True, False, False, True]
    cmd = plan[-1]["cmd"](1, 0)
    assert cmd[1:4] == ["-m", "ldm_jax.bench", "unet"] and "--config=configs/ldm_f8.py" in cmd
    assert cmd[cmd.index("--steps") + 1] == "1" and cmd[cmd.index("--warmup") + 1] == "0"
    assert cmd[-4:] == ["--set", "model.remat=false", "--set", "model.attention_impl=cudnn"]
    tcmd = plan[1]["cmd"](20, 2)
    assert "--fused-optim" in tcmd and tcmd[tcmd.index("--mode") + 1] == "compile"
    assert tcmd[tcmd.index("--batch") + 1] == "8" and tcmd[tcmd.index("--steps") + 1] == "20"
