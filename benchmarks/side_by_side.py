"""ldm_jax against the PyTorch reference, workload by workload, in one command.

  python benchmarks/side_by_side.py                                  # all three, full configs, GPU
  python benchmarks/side_by_side.py --workloads vae --out-dir /tmp/sbs --report $OUT/side_by_side
  python benchmarks/side_by_side.py --tiny --modes eager             # CPU smoke run (tests)
  python benchmarks/side_by_side.py --report-only --from-report a.json --from-report b.json

For each workload (``vae``: VAE-GAN step, ``unet``: U-Net training step, ``sample``: DDIM-50
+ decode) this runs, one after another and each in its own process (so JAX and PyTorch
never hold GPU memory at the same time and every peak-memory figure is that run's own):

  1. ``python -m ldm_jax.bench WORKLOAD`` (compiled JAX step),
  2. ``python benchmarks/torch_reference.py WORKLOAD --mode eager``,
  3. ``python benchmarks/torch_reference.py WORKLOAD --mode compile`` (torch.compile),

with the same config, batch, timed steps, warm-up and ``--set`` overrides, then writes a
Markdown table and a JSON report (``--report PREFIX`` -> PREFIX.md, PREFIX.json) holding
every run's full JSON, the img/s ratios JAX / eager and JAX / compile, the peak memory of
each run, and the issue's targets with met / not met:

  VAE-GAN step        JAX >= 1.5x torch.compile img/s, and JAX peak memory <= PyTorch's
  U-Net step          JAX >= 1.3x torch.compile img/s
  DDIM-50 + decode    JAX >= 1.3x torch.compile img/s

"PyTorch's" peak memory is the smaller of the eager and compile runs' peaks. The targets are
for the full configs on a GPU; on ``--tiny`` / CPU the verdicts are printed but marked as not
applicable. The report is rewritten after every run, so a run cut short still leaves
everything finished so far; ``--from-report`` takes runs from earlier reports (they are not
run again), which lets one spread the runs over several commands and merge them.

For a short GPU session (one device command of a few minutes) the compiles are the cost:
``--prewarm`` first runs every JAX run and every ``torch.compile`` run once (one step, no
warm-up) ``--jobs`` at a time, concurrently, with persistent caches (JAX's compilation cache
and Inductor's, under ``--cache-dir``); the timed runs then follow one after another and load
their programs from the caches. A run's cold compile time is its warm-up run's figure
(``cold_compile_s`` in the report; measured while other compiles ran beside it). XLA
autotunes on the device during that concurrent phase, so its algorithm choices were timed
with other processes on the GPU; ``--jobs 1`` keeps the compiles apart (slower).
``--deadline`` (seconds for the whole command) skips runs that would start too late and
caps each run's timeout, so the report is complete before an outer time limit; the timed
runs go in order of importance: each workload's JAX and torch.compile runs, then the eager
runs, then the ``--jax-variant`` runs (extra JAX configurations of one workload, e.g.
``unet:cudnn:--set model.attention_impl=cudnn``, reported against the default JAX run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

ORDER = ("vae", "unet", "sample")
LABELS = {"vae": "VAE-GAN step", "unet": "U-Net step", "sample": "DDIM + decode"}
CONFIGS = {"vae": "configs/vae_f8.py", "unet": "configs/ldm_f8.py", "sample": "configs/ldm_f8.py"}
# Issue 8: JAX img/s >= speed x torch.compile img/s; VAE-GAN also peak memory <= PyTorch's.
TARGETS = {"vae": {"speed": 1.5, "memory": True}, "unet": {"speed": 1.3, "memory": False},
           "sample": {"speed": 1.3, "memory": False}}
MODES = ("eager", "compile")


def _defaults(workload: str) -> tuple[int, int]:
    from ldm_jax.bench import WORKLOADS  # stdlib-only module top: no JAX import here

    _, _, batch, steps = WORKLOADS[workload]
    return batch, steps


def run_key(framework: str, workload: str, mode: str | None = None) -> str:
    return f"{framework}:{workload}" + (f":{mode}" if mode else "")


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


_PRINT = threading.Lock()


def _say(msg: str) -> None:
    with _PRINT:
        print(msg, file=sys.stderr, flush=True)


def run_one(cmd: list[str], out_json: str, log: str, timeout: float, env: dict) -> dict:
    """Run ``cmd`` in its own process group; its JSON result, or an error record."""
    if os.path.exists(out_json):
        os.remove(out_json)
    _say("+ " + " ".join(shlex.quote(c) for c in cmd))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its compile workers
            proc.wait()
            rc = None
    wall = time.perf_counter() - t0
    if rc == 0 and os.path.exists(out_json):
        with open(out_json) as f:
            result = json.load(f)
        result["wall_s"] = wall
        return result
    why = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
    _say(f"  failed ({why}); log {log}:\n{_tail(log, 2000)}")
    return {"error": why, "wall_s": wall, "command": cmd, "log_tail": _tail(log)}


def _ok(r: dict | None) -> bool:
    return bool(r) and "error" not in r


def _ips(r):
    return r.get("images_per_s") if _ok(r) else None


def _mem(r):
    return r.get("peak_memory_bytes") if _ok(r) else None


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def build_rows(runs: dict, applicable: bool, warm: dict | None = None) -> list[dict]:
    warm = warm or {}
    rows = []
    for w in ORDER:
        j = runs.get(run_key("jax", w))
        te, tc = runs.get(run_key("torch", w, "eager")), runs.get(run_key("torch", w, "compile"))
        if j is None and te is None and tc is None:
            continue
        tgt = TARGETS[w]
        ips = {"jax": _ips(j), "eager": _ips(te), "compile": _ips(tc)}
        mem = {"jax": _mem(j), "eager": _mem(te), "compile": _mem(tc)}
        vs_compile = _ratio(ips["jax"], ips["compile"])
        speed_met = None if vs_compile is None else vs_compile >= tgt["speed"]
        row = dict(
            workload=w, name=LABELS[w],
            batch=next((r["batch"] for r in (j, te, tc) if _ok(r)), None),
            images_per_s=ips, peak_memory_bytes=mem,
            step_s_median={k: (r.get("step_s_median") if _ok(r) else None)
                           for k, r in (("jax", j), ("eager", te), ("compile", tc))},
            compile_s={k: (r.get("compile_s") if _ok(r) else None)
                       for k, r in (("jax", j), ("eager", te), ("compile", tc))},
            # From --prewarm's one-step runs (empty caches, other compiles beside them).
            cold_compile_s={k: (warm[key].get("compile_s") if _ok(warm.get(key)) else None)
                            for k, key in (("jax", run_key("jax", w)),
                                           ("compile", run_key("torch", w, "compile")))},
            jax_compile_cache=j.get("compile_cache") if _ok(j) else None,
            ratio_jax_over_eager=_ratio(ips["jax"], ips["eager"]),
            ratio_jax_over_compile=vs_compile,
            target_speed_vs_compile=tgt["speed"], speed_target_met=speed_met,
            failed=[k for k, r in (("jax", j), ("eager", te), ("compile", tc))
                    if r is not None and not _ok(r)],
            targets_apply=applicable)
        # Same model on both sides: the U-Net JSON of ldm_jax.bench reports its count; every
        # torch run also carries ldm_jax's count for the model it built (params_ours).
        t_any = next((r for r in (tc, te) if _ok(r)), None)
        row["params"] = {"jax": j.get("params") if _ok(j) else None,
                         "torch": t_any.get("params") if t_any else None,
                         "ldm_jax_count": t_any.get("params_ours") if t_any else None}
        known = [v for v in row["params"].values() if v is not None]
        row["params_match"] = (len(set(known)) == 1) if len(known) >= 2 else None
        if tgt["memory"]:
            torch_mems = [m for m in (mem["eager"], mem["compile"]) if m is not None]
            ref = min(torch_mems) if torch_mems else None
            row["memory_target"] = "JAX peak <= min(torch eager, torch compile) peak"
            row["memory_target_met"] = (None if (mem["jax"] is None or ref is None)
                                        else mem["jax"] <= ref)
        met = [row["speed_target_met"]] + ([row["memory_target_met"]] if tgt["memory"] else [])
        row["all_targets_met"] = None if any(m is None for m in met) else all(met)
        rows.append(row)
    return rows


def build_variant_rows(runs: dict) -> list[dict]:
    """Extra JAX runs (``--jax-variant``): ``jax:WORKLOAD:LABEL`` against ``jax:WORKLOAD``
    (and against torch.compile where that ran)."""
    rows = []
    for key, r in runs.items():
        parts = key.split(":")
        if parts[0] != "jax" or len(parts) != 3 or parts[1] not in ORDER:
            continue
        w, label = parts[1], parts[2]
        base, tc = runs.get(run_key("jax", w)), runs.get(run_key("torch", w, "compile"))
        rows.append(dict(
            workload=w, name=LABELS[w], label=label, args=r.get("variant_args"),
            batch=r.get("batch") if _ok(r) else None, images_per_s=_ips(r),
            step_s_median=r.get("step_s_median") if _ok(r) else None, peak_memory_bytes=_mem(r),
            ratio_over_default_jax=_ratio(_ips(r), _ips(base)),
            ratio_over_compile=_ratio(_ips(r), _ips(tc)),
            breakdown=r.get("breakdown") if _ok(r) else None,
            profile=_profile_brief(r.get("profile")) if _ok(r) else None,
            failed=not _ok(r), error=None if _ok(r) else r.get("error")))
    return rows


def _profile_brief(p: dict | None) -> dict | None:
    """The headline of a ``--profile`` summary (the full one stays in ``runs``)."""
    if not p:
        return None
    if "failed" in p:
        return {"failed": p["failed"]}
    return {k: p.get(k) for k in ("kernels_per_step", "busy_s", "step_s", "idle_s", "by_phase", "by_kind")} | {
        "top_kernels": (p.get("top_kernels") or [])[:8]}


def _f(x, fmt="{:.1f}", none="–"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _gb(x):
    return _f(None if x is None else x / 1e9, "{:.2f}")


def _verdict(m, applicable):
    s = "n/a" if m is None else ("met" if m else "not met")
    return s if applicable or m is None else f"({s})"


def markdown(report: dict) -> str:
    rows, runs = report["rows"], report["runs"]
    applicable = report["targets_apply"]
    lines = ["# ldm_jax vs PyTorch reference", ""]
    env = report["environment"]
    lines.append(f"{report['created']}; device {env.get('device') or '?'}; jax {env.get('jax') or '?'}, "
                 f"torch {env.get('torch') or '?'}, diffusers {env.get('diffusers') or '?'}; "
                 f"dtype {env.get('dtype') or '?'}; configs {'tiny' if report['tiny'] else 'full'}.")
    lines.append("")
    lines.append("| workload | batch | JAX img/s | torch eager img/s | torch compile img/s | "
                 "JAX / eager | JAX / compile | target (vs compile) | speed | peak memory GB "
                 "JAX / eager / compile | memory (JAX <= torch) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ips, mem = r["images_per_s"], r["peak_memory_bytes"]
        memv = _verdict(r.get("memory_target_met"), applicable) if "memory_target" in r else ""
        lines.append(
            f"| {r['name']} | {_f(r['batch'], '{}')} | {_f(ips['jax'])} | {_f(ips['eager'])} | "
            f"{_f(ips['compile'])} | {_f(r['ratio_jax_over_eager'], '{:.2f}x')} | "
            f"{_f(r['ratio_jax_over_compile'], '{:.2f}x')} | >= {r['target_speed_vs_compile']}x | "
            f"{_verdict(r['speed_target_met'], applicable)} | "
            f"{_gb(mem['jax'])} / {_gb(mem['eager'])} / {_gb(mem['compile'])} | {memv} |")
    lines += ["", ("| workload | step (median) JAX / eager / compile | compile or first call JAX / "
                   "eager / compile | params (torch model; same count in ldm_jax?) |"), "|---|---|---|---|"]
    ms = lambda v: _f(None if v is None else 1e3 * v, "{:.1f} ms")  # noqa: E731
    sec = lambda v: _f(v, "{:.1f} s")  # noqa: E731
    for r in rows:
        st = r["step_s_median"]
        cold = r.get("cold_compile_s") or {}
        cs = {k: (cold.get(k) if cold.get(k) is not None else v) for k, v in r["compile_s"].items()}
        n = r["params"]["torch"]
        same = {True: "yes", False: "NO", None: "?"}[r["params_match"]]
        lines.append(f"| {r['name']} | {ms(st['jax'])} / {ms(st['eager'])} / {ms(st['compile'])} | "
                     f"{sec(cs['jax'])} / {sec(cs['eager'])} / {sec(cs['compile'])} | "
                     f"{_f(None if n is None else n / 1e6, '{:.2f}M')} ({same}) |")
    vrows = report.get("variant_rows") or []
    if vrows:
        lines += ["", "JAX variants (`--jax-variant`), against the default JAX run of the same workload:",
                  "", "| workload | variant | arguments | img/s | step (median) | peak memory GB | "
                  "vs default JAX | vs torch.compile |", "|---|---|---|---|---|---|---|---|"]
        for v in vrows:
            lines.append(f"| {v['name']} | {v['label']} | `{v['args'] or ''}` | {_f(v['images_per_s'])} | "
                         f"{ms(v['step_s_median'])} | {_gb(v['peak_memory_bytes'])} | "
                         f"{_f(v['ratio_over_default_jax'], '{:.2f}x')} | "
                         f"{_f(v['ratio_over_compile'], '{:.2f}x')} |")
        for v in vrows:
            p = v.get("profile")
            if not p:
                continue
            if "failed" in p:
                lines += ["", f"Profile of {v['name']} `{v['label']}` failed: {p['failed']}"]
                continue
            phases = ", ".join(f"{k} {ms(t)}" for k, t in (p.get("by_phase") or {}).items())
            kinds = ", ".join(f"{k} {ms(t)}" for k, t in (p.get("by_kind") or {}).items())
            lines += ["", f"Profile of {v['name']} `{v['label']}` (device 0, profiled steps): "
                      f"{_f(p.get('kernels_per_step'), '{:.0f}')} kernels per step, busy "
                      f"{ms(p.get('busy_s'))} of {ms(p.get('step_s'))} (idle {ms(p.get('idle_s'))}); "
                      f"by phase: {phases}; by kind: {kinds}. Top kernels:", ""]
            for k in p.get("top_kernels") or []:
                bw = _f(k.get("achieved_gb_per_s"), "{:.0f} GB/s")
                lines.append(f"- {_f(1e3 * k['time_s'], '{:.3f} ms')} {k['hlo_op']} x{_f(k.get('calls'), '{:.0f}')} "
                             f"({k.get('phase', '?')}, {k.get('kind', '?')}, {bw})")
    failed = {k: v for k, v in runs.items() if not _ok(v)}
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"`{k}` ({v.get('error')})" for k, v in failed.items())]
    if not applicable:
        lines += ["", ("Targets apply to the full configs on a GPU; verdicts in parentheses are "
                       "informational only (tiny configs and/or CPU).")]
    lines += ["", ("JAX compile = ahead-of-time compile; torch = the first call (compilation or "
                   "autotuning + one step). Peak memory: JAX `peak_bytes_in_use`, torch "
                   "`torch.cuda.max_memory_allocated` ('–' where the backend reports none).")]
    if report.get("warm"):
        lines += ["", ("Compile times are the cold figures of the `--prewarm` runs (empty caches, "
                       f"{report['arguments'].get('jobs')} at a time); the timed runs loaded their "
                       "programs from the persistent caches.")]
    return "\n".join(lines) + "\n"


def _environment(runs: dict) -> dict:
    env = {}
    for k, r in runs.items():
        if not _ok(r):
            continue
        if k.startswith("jax:"):
            env.setdefault("jax", r.get("jax"))
            env.setdefault("device", r.get("device"))
            env.setdefault("dtype", r.get("dtype"))
        else:
            env.setdefault("torch", r.get("torch"))
            env.setdefault("diffusers", r.get("diffusers"))
            env.setdefault("torch_device", r.get("device"))
            env.setdefault("dtype", r.get("dtype"))
    env.setdefault("device", env.get("torch_device"))
    env["python"] = platform.python_version()
    return env


def _on_gpu(runs: dict) -> bool:
    devs = [str(r.get("device", "")).lower() for r in runs.values() if _ok(r)]
    return bool(devs) and all(any(s in d for s in ("nvidia", "h100", "h200", "a100", "gpu", "tpu"))
                              for d in devs)


def write_report(runs: dict, a, prefix: str, warm: dict | None = None) -> dict:
    tiny = bool(a.tiny) or any(str(r.get("config", "")).endswith(":tiny")
                               for r in runs.values() if _ok(r))
    applicable = not tiny and _on_gpu(runs)
    report = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tiny=tiny, targets=TARGETS, targets_apply=applicable,
        environment=_environment(runs), rows=build_rows(runs, applicable, warm),
        variant_rows=build_variant_rows(runs), runs=runs, warm=warm or {},
        arguments={k: v for k, v in vars(a).items()})
    report["markdown"] = markdown(report)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(prefix + ".md", "w") as f:
        f.write(report["markdown"])
    return report


def _plan(a, workloads: list[str], modes: list[str], warmup: int) -> list[dict]:
    """The runs to do, in order of importance: per workload JAX then torch.compile, then
    the eager runs, then the JAX variants. Each: key, priority, warmable, cmd(steps, warmup)."""
    plan = []
    variants = [spec.split(":", 2) for spec in a.jax_variant]  # checked in main()
    for w in workloads:
        batch, steps = _defaults(w)
        batch = a.batch or (8 if a.tiny else batch)
        steps = a.steps or (2 if a.tiny else steps)
        config = CONFIGS[w] + (":tiny" if a.tiny else "")
        sets = [x for kv in a.set for x in ("--set", kv)]

        def jax_cmd(extra, st, wu, w=w, config=config, batch=batch):
            return ([sys.executable, "-m", "ldm_jax.bench", w, f"--config={config}", "--batch",
                     str(batch), "--steps", str(st), "--warmup", str(wu)] + sets
                    + shlex.split(a.jax_args) + shlex.split(extra))

        def torch_cmd(mode, st, wu, w=w, config=config, batch=batch):
            return ([sys.executable, os.path.join(HERE, "torch_reference.py"), w, "--mode", mode,
                     f"--config={config}", "--batch", str(batch), "--steps", str(st), "--warmup",
                     str(wu)] + sets + shlex.split(a.torch_args))

        if not a.skip_jax:
            plan.append(dict(key=run_key("jax", w), priority=0, warmable=True, steps=steps,
                             cmd=lambda st, wu, f=jax_cmd: f("", st, wu)))
        if not a.skip_torch:
            for m in modes:
                plan.append(dict(key=run_key("torch", w, m), priority=0 if m == "compile" else 1,
                                 warmable=m == "compile", steps=steps,
                                 cmd=lambda st, wu, m=m, f=torch_cmd: f(m, st, wu)))
        if not a.skip_jax:
            for vw, label, args in variants:
                if vw == w:
                    plan.append(dict(key=run_key("jax", w, label), priority=2, warmable=True,
                                     steps=steps, variant_args=args,
                                     cmd=lambda st, wu, args=args, f=jax_cmd: f(args, st, wu)))
    plan.sort(key=lambda r: r["priority"])  # stable: workload order within a priority
    return plan


def _cache_env(env: dict, cache_dir: str) -> dict:
    """Persistent compilation caches for every run: JAX's (every executable, however fast it
    compiled) and Inductor's (torch.compile), unless the caller's environment sets them."""
    env = dict(env)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache_dir, "jax"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(ORDER), help="comma list of vae,unet,sample")
    p.add_argument("--modes", default=",".join(MODES), help="torch modes: eager,compile")
    p.add_argument("--tiny", action="store_true", help="the :tiny configs (CPU smoke run)")
    p.add_argument("--batch", type=int, default=None, help="one batch for every workload "
                   "(default: ldm_jax.bench's per workload; 8 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed calls (default: bench's; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2; 1 with --tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to both frameworks")
    p.add_argument("--jax-args", default="", help="extra arguments for python -m ldm_jax.bench")
    p.add_argument("--torch-args", default="",
                   help="extra arguments for torch_reference.py, e.g. '--device cpu' or "
                        "'--compile-mode max-autotune --fused-optim --channels-last'")
    p.add_argument("--jax-variant", action="append", default=[], metavar="WORKLOAD:LABEL:ARGS",
                   help="an extra JAX run of WORKLOAD with ldm_jax.bench arguments ARGS, reported "
                        "as LABEL against the default JAX run (repeatable), e.g. "
                        "'unet:cudnn:--set model.attention_impl=cudnn' or 'unet:breakdown:--breakdown'")
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--out-dir", default=os.path.join(tempfile.gettempdir(), "ldm_jax_side_by_side"),
                   help="per-run JSON and logs (default: %(default)s)")
    p.add_argument("--report", default=None, help="report path prefix (default OUT_DIR/side_by_side)")
    p.add_argument("--from-report", action="append", default=[], metavar="JSON",
                   help="take the runs of an earlier report (not run again)")
    p.add_argument("--report-only", action="store_true", help="only merge --from-report files")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    p.add_argument("--prewarm", action="store_true",
                   help="first compile every JAX and torch.compile run concurrently (one step each) "
                        "into persistent caches, then time the runs one by one from the caches")
    p.add_argument("--jobs", type=int, default=4, help="concurrent --prewarm runs (default %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="persistent JAX / Inductor compilation caches for all runs (default with "
                        "--prewarm: OUT_DIR/cache; without: none unless given)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget of this whole command: runs that cannot start with "
                        "--min-run seconds left are skipped (reported), timeouts are capped")
    p.add_argument("--min-run", type=float, default=45.0,
                   help="with --deadline: the least time left to start a run (default %(default)s)")
    a = p.parse_args(argv)
    t_start = time.monotonic()
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [w for w in workloads if w not in ORDER] + [m for m in modes if m not in MODES]
    for spec in a.jax_variant:
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[0] not in ORDER or not parts[1] or parts[1] in MODES or ":" in parts[1]:
            p.error(f"--jax-variant {spec!r}: expected WORKLOAD:LABEL:ARGS with WORKLOAD one of "
                    f"{', '.join(ORDER)} and a LABEL other than {', '.join(MODES)}")
        if parts[0] not in workloads:
            p.error(f"--jax-variant {spec!r}: workload {parts[0]!r} is not in --workloads")
    if bad:
        p.error(f"unknown workload/mode {bad}")
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    prefix = a.report or os.path.join(a.out_dir, "side_by_side")
    os.makedirs(a.out_dir, exist_ok=True)

    runs: dict = {}
    warm: dict = {}
    for path in a.from_report:
        with open(path) as f:
            earlier = json.load(f)
        runs.update({k: v for k, v in earlier["runs"].items() if _ok(v)})
        warm.update({k: v for k, v in earlier.get("warm", {}).items() if k in runs and _ok(v)})

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env.setdefault("PYTHONUNBUFFERED", "1")
    cache_dir = a.cache_dir or (os.path.join(a.out_dir, "cache") if a.prewarm else None)
    if cache_dir:
        env = _cache_env(env, os.path.abspath(cache_dir))

    def left() -> float:
        return math.inf if a.deadline is None else a.deadline - (time.monotonic() - t_start)

    def skipped(why: str) -> dict:
        _say(f"  skipped: {why}")
        return {"error": f"skipped: {why}", "wall_s": 0.0}

    ok = True
    if not a.report_only:
        plan = [r for r in _plan(a, workloads, modes, warmup) if r["key"] not in runs]
        for k in sorted(runs):
            _say(f"{k}: taken from an earlier report")
        if a.prewarm:
            # Concurrent processes on one GPU: JAX must not preallocate most of its memory.
            warm_env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")

            def one(r):
                if left() < a.min_run:
                    return r["key"], skipped("deadline (prewarm)")
                stem = os.path.join(a.out_dir, r["key"].replace(":", "_") + "_warm")
                res = run_one(r["cmd"](1, 0) + [f"--out={stem}.json"], stem + ".json", stem + ".log",
                              min(a.timeout, left()), warm_env)
                return r["key"], res

            todo = [r for r in plan if r["warmable"]]
            _say(f"prewarm: {len(todo)} runs, {a.jobs} at a time, caches in {cache_dir}")
            with ThreadPoolExecutor(max_workers=a.jobs) as pool:
                for key, res in pool.map(one, todo):
                    warm[key] = {k: res.get(k) for k in ("compile_s", "compile_cache", "wall_s",
                                                         "error", "log_tail") if k in res}
            write_report(runs, a, prefix, warm)
        for r in plan:
            key = r["key"]
            if left() < a.min_run:
                res = skipped(f"deadline ({a.deadline:.0f} s) reached")
            else:
                stem = os.path.join(a.out_dir, key.replace(":", "_"))
                res = run_one(r["cmd"](r["steps"], warmup) + [f"--out={stem}.json"], stem + ".json",
                              stem + ".log", min(a.timeout, left()), env)
            if "variant_args" in r:
                res["variant_args"] = r["variant_args"]
            runs[key] = res
            ok &= _ok(res)
            write_report(runs, a, prefix, warm)
    report = write_report(runs, a, prefix, warm)
    print(report["markdown"])
    print(f"report: {prefix}.md, {prefix}.json", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
