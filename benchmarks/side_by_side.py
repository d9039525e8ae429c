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
import time

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


def run_one(cmd: list[str], out_json: str, log: str, timeout: float, env: dict) -> dict:
    """Run ``cmd`` in its own process group; its JSON result, or an error record."""
    if os.path.exists(out_json):
        os.remove(out_json)
    print("+ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
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
    print(f"  failed ({why}); log {log}:\n{_tail(log, 2000)}", file=sys.stderr, flush=True)
    return {"error": why, "wall_s": wall, "command": cmd, "log_tail": _tail(log)}


def _ok(r: dict | None) -> bool:
    return bool(r) and "error" not in r


def _ips(r):
    return r.get("images_per_s") if _ok(r) else None


def _mem(r):
    return r.get("peak_memory_bytes") if _ok(r) else None


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def build_rows(runs: dict, applicable: bool) -> list[dict]:
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
    for r in rows:
        st, cs = r["step_s_median"], r["compile_s"]
        ms = lambda v: _f(None if v is None else 1e3 * v, "{:.1f} ms")  # noqa: E731
        sec = lambda v: _f(v, "{:.1f} s")  # noqa: E731
        n = r["params"]["torch"]
        same = {True: "yes", False: "NO", None: "?"}[r["params_match"]]
        lines.append(f"| {r['name']} | {ms(st['jax'])} / {ms(st['eager'])} / {ms(st['compile'])} | "
                     f"{sec(cs['jax'])} / {sec(cs['eager'])} / {sec(cs['compile'])} | "
                     f"{_f(None if n is None else n / 1e6, '{:.2f}M')} ({same}) |")
    failed = {k: v for k, v in runs.items() if not _ok(v)}
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"`{k}` ({v.get('error')})" for k, v in failed.items())]
    if not applicable:
        lines += ["", ("Targets apply to the full configs on a GPU; verdicts in parentheses are "
                       "informational only (tiny configs and/or CPU).")]
    lines += ["", ("JAX compile = ahead-of-time compile; torch = the first call (compilation or "
                   "autotuning + one step). Peak memory: JAX `peak_bytes_in_use`, torch "
                   "`torch.cuda.max_memory_allocated` ('–' where the backend reports none).")]
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


def write_report(runs: dict, a, prefix: str) -> dict:
    tiny = bool(a.tiny) or any(str(r.get("config", "")).endswith(":tiny")
                               for r in runs.values() if _ok(r))
    applicable = not tiny and _on_gpu(runs)
    report = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tiny=tiny, targets=TARGETS, targets_apply=applicable,
        environment=_environment(runs), rows=build_rows(runs, applicable), runs=runs,
        arguments={k: v for k, v in vars(a).items()})
    report["markdown"] = markdown(report)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(prefix + ".md", "w") as f:
        f.write(report["markdown"])
    return report


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
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--out-dir", default=os.path.join(tempfile.gettempdir(), "ldm_jax_side_by_side"),
                   help="per-run JSON and logs (default: %(default)s)")
    p.add_argument("--report", default=None, help="report path prefix (default OUT_DIR/side_by_side)")
    p.add_argument("--from-report", action="append", default=[], metavar="JSON",
                   help="take the runs of an earlier report (not run again)")
    p.add_argument("--report-only", action="store_true", help="only merge --from-report files")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    a = p.parse_args(argv)
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [w for w in workloads if w not in ORDER] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown workload/mode {bad}")
    warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    prefix = a.report or os.path.join(a.out_dir, "side_by_side")
    os.makedirs(a.out_dir, exist_ok=True)

    runs: dict = {}
    for path in a.from_report:
        with open(path) as f:
            runs.update({k: v for k, v in json.load(f)["runs"].items() if _ok(v)})

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env.setdefault("PYTHONUNBUFFERED", "1")
    ok = True
    if not a.report_only:
        for w in workloads:
            batch, steps = _defaults(w)
            batch = a.batch or (8 if a.tiny else batch)
            steps = a.steps or (2 if a.tiny else steps)
            config = CONFIGS[w] + (":tiny" if a.tiny else "")
            common = ["--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]
            for kv in a.set:
                common += ["--set", kv]
            todo = []
            if not a.skip_jax:
                todo.append((run_key("jax", w), [sys.executable, "-m", "ldm_jax.bench", w,
                                                 f"--config={config}"] + common + shlex.split(a.jax_args)))
            if not a.skip_torch:
                for m in modes:
                    todo.append((run_key("torch", w, m),
                                 [sys.executable, os.path.join(HERE, "torch_reference.py"), w,
                                  "--mode", m, f"--config={config}"] + common + shlex.split(a.torch_args)))
            for key, cmd in todo:
                if key in runs:
                    print(f"{key}: taken from an earlier report", file=sys.stderr)
                    continue
                stem = os.path.join(a.out_dir, key.replace(":", "_"))
                r = run_one(cmd + [f"--out={stem}.json"], stem + ".json", stem + ".log", a.timeout, env)
                runs[key] = r
                ok &= _ok(r)
                write_report(runs, a, prefix)
    report = write_report(runs, a, prefix)
    print(report["markdown"])
    print(f"report: {prefix}.md, {prefix}.json", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
