"""Per-kernel device time of a profiled program, joined with its optimized HLO.

``python -m ldm_jax.bench WORKLOAD --profile DIR`` runs a few steps under
``jax.profiler.trace(DIR)`` and calls ``summarize``: it reads the trace (the
``*.xplane.pb`` file, with ``jax.profiler.ProfileData``: no TensorBoard needed), takes the
kernels of the benchmarked program on the first device, and attributes each to its HLO
instruction (the profiler's ``hlo_op``), hence to a phase (forward / backward / other:
the optimizer update for a training step) and a kind (conv, gemm, fusion, ...) from
``ldm_jax.hlo_stats.kernel_table``. With that table's bytes-moved estimate, each kernel
also gets an achieved bandwidth, so a kernel far below the memory roofline stands out.

The HLO instruction of a kernel is its ``hlo_op`` stat (XLA:CPU's thunks), or the
``hlo_op=`` field of the annotation a GPU kernel carries (XLA opens a profiler range per
module, ``XlaModule:#hlo_module=...#``, and one per thunk, ``Thunk:#name=...,hlo_op=...#``;
the profiler records the stack of both with each CUDA kernel).

``busy_s`` is the union of the kernels' intervals (kernels on several streams overlap),
``kernel_s`` their plain sum; a step time well above ``busy_s`` means the device waited
(kernel launch gaps, host work, synchronisation). ``step_s`` is the unprofiled step
time; the bench also reports ``profiled_step_s``, the wall time of the traced steps, so the
profiler's own overhead (on a GPU XLA also stops using CUDA graphs while profiling, so
launches cost more) can be told from the step's. On a GPU the kernels are the CUDA
kernels of the device plane's stream lines, on a TPU the "XLA Ops" line; on the CPU (the
tests) they are XLA:CPU's thunks on the host plane, device 0 only.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from typing import Any

from ldm_jax import hlo_stats

_HLO_OP = re.compile(r"hlo_op=([^,#\s]+)")
_HLO_MODULE = re.compile(r"hlo_module=([^,#\s]+)")


def latest_trace(directory: str) -> str:
    """The newest ``*.xplane.pb`` under ``directory`` (jax writes
    ``plugins/profile/<timestamp>/<host>.xplane.pb``)."""
    files = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb profiler trace under {directory}")
    return max(files, key=os.path.getmtime)


def module_name(hlo_text: str) -> str:
    m = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
    if not m:
        raise ValueError("not optimized HLO text: no 'HloModule' header (pass compiled.as_text())")
    return m.group(1)


def _stat_str(stats: dict, key: str, pattern: re.Pattern) -> str | None:
    """``stats[key]``, or the value of ``key=`` inside another (annotation) stat string."""
    if key in stats:
        return str(stats[key])
    for v in stats.values():
        if isinstance(v, str) and (m := pattern.search(v)):
            return m.group(1)
    return None


def _kernel_lines(plane) -> list:
    lines = list(plane.lines)
    ops = [ln for ln in lines if ln.name == "XLA Ops"]
    if ops:
        return ops
    streams = [ln for ln in lines if ln.name.startswith("Stream")]
    return streams or lines


def _device_planes(data) -> list:
    planes = [p for p in data.planes if re.match(r"/device:(GPU|TPU):\d+$", p.name)]
    return sorted(planes, key=lambda p: int(p.name.rsplit(":", 1)[1]))


def kernel_events(path: str, module: str | None = None,
                  platform: str | None = None) -> tuple[str, list[tuple[str, float, float]]]:
    """``(plane name, [(hlo_op, start_ns, duration_ns)])`` of the kernels of ``module``
    (all modules if None) on the first device of the trace at ``path``. Programs are told
    apart by module name (``jit_<function name>``): two programs of one name in one trace
    would be counted together. A device kernel without an ``hlo_op`` annotation keeps its
    kernel name (XLA names its own kernels after their instruction, ``.`` -> ``_``; library
    kernels such as cuDNN's stay unattributed). ``platform`` ("gpu", "tpu") makes a trace
    without that device's plane an error instead of falling back to the host's events."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    devices = _device_planes(data)
    if not devices and platform not in (None, "cpu"):
        raise ValueError(f"the trace {path} has no /device:{platform.upper()}:N plane: the profiler "
                         "recorded no device activity (on a GPU it needs CUPTI, "
                         "libcupti from the CUDA toolkit or the nvidia-cuda-cupti package)")
    planes = devices[:1] if devices else [p for p in data.planes if p.name == "/host:CPU"]
    out: list[tuple[str, float, float]] = []
    for plane in planes:
        for line in _kernel_lines(plane) if devices else plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                op = _stat_str(stats, "hlo_op", _HLO_OP)
                if op is None:
                    if not devices:
                        continue  # host plane: only XLA:CPU's thunks carry hlo_op
                    op = e.name
                if not devices and stats.get("device_ordinal", 0) != 0:
                    continue  # CPU: every fake device runs the same thunks; keep device 0
                mod = _stat_str(stats, "hlo_module", _HLO_MODULE)
                if module is not None and mod is not None and mod != module:
                    continue
                out.append((op, float(e.start_ns), float(e.duration_ns)))
    return (planes[0].name if planes else ""), out


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, d in sorted(intervals):
        e = s + d
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(path: str, hlo_text: str, *, steps: int, step_s: float | None = None,
              top: int = 25, platform: str | None = None) -> dict[str, Any]:
    """Device time per step of the program ``hlo_text`` profiled ``steps`` times in the
    trace at ``path``: total, by phase and kind, and the ``top`` kernels by time."""
    module = module_name(hlo_text)
    table, controls = hlo_stats.kernel_table(hlo_text)
    alias = {name.replace(".", "_"): name for name in table}
    plane, events = kernel_events(path, module, platform)
    events = [(op if op in table else alias.get(op, op), s, d) for op, s, d in events
              if op not in controls]  # a loop's event spans its body's
    if not events:
        raise ValueError(f"no kernels of {module} in the trace {path} (plane {plane or 'none'})")
    per_op: dict = collections.defaultdict(lambda: [0, 0.0])
    for op, _, dur in events:
        per_op[op][0] += 1
        per_op[op][1] += dur
    by_phase: dict = collections.defaultdict(float)
    by_kind: dict = collections.defaultdict(float)
    kernels = []
    for op, (calls, ns) in per_op.items():
        info = table.get(op)
        s = ns * 1e-9 / steps
        row = dict(hlo_op=op, time_s=s, calls=calls / steps)
        if info is None:  # a kernel the HLO does not name (a library's own, or another program's)
            by_phase["unattributed"] += s
            by_kind["unattributed"] += s
        else:
            by_phase[info["phase"]] += s
            by_kind[info["kind"]] += s
            row.update(phase=info["phase"], kind=info["kind"], bytes_per_call=info["bytes"])
            if ns > 0:
                row["achieved_gb_per_s"] = info["bytes"] * calls / ns  # bytes per ns = GB/s
        kernels.append(row)
    kernels.sort(key=lambda r: -r["time_s"])
    kernel_s = sum(d for _, _, d in events) * 1e-9 / steps
    busy_s = _union_ns([(s, d) for _, s, d in events]) * 1e-9 / steps
    out = dict(trace=path, plane=plane, module=module, steps=steps,
               kernels_per_step=len(events) / steps, kernel_s=kernel_s, busy_s=busy_s,
               by_phase=dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
               by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
               attributed_share=1.0 - by_phase.get("unattributed", 0.0) / kernel_s if kernel_s > 0 else 0.0,
               top_kernels=kernels[:top])
    if step_s is not None:
        out["step_s"] = step_s
        out["idle_s"] = max(step_s - busy_s, 0.0)
    return out


def summary_lines(summary: dict) -> list[str]:
    """A short human-readable version (the bench prints it to stderr)."""
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    head = (f"profile of {summary['module']} on {summary['plane']}: {summary['kernels_per_step']:.0f} "
            f"kernels/step, busy {ms(summary['busy_s'])}")
    if "step_s" in summary:
        head += f" of a {ms(summary['step_s'])} step (idle {ms(summary['idle_s'])})"
    lines = [head, "  by phase: " + ", ".join(f"{k} {ms(v)}" for k, v in summary["by_phase"].items()),
             "  by kind: " + ", ".join(f"{k} {ms(v)}" for k, v in summary["by_kind"].items())]
    for r in summary["top_kernels"][:10]:
        bw = f", {r['achieved_gb_per_s']:.0f} GB/s" if "achieved_gb_per_s" in r else ""
        lines.append(f"  {ms(r['time_s']):>10}  {r['calls']:.0f}x {r['hlo_op']} "
                     f"({r.get('phase', '?')}, {r.get('kind', '?')}{bw})")
    return lines
