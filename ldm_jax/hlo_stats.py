"""Kernel-level statistics of a compiled XLA program, read off its optimized HLO text.

``kernel_stats(compiled.as_text())`` walks the entry computation (and, through ``while``,
``call`` and ``conditional``, the computations they run) and counts every instruction that
becomes a device kernel: each ``fusion`` is one kernel, each ``custom-call`` one library
call (cuDNN convolution, cuBLAS gemm, ...), each unfused op (``copy``, ``transpose``,
``reduce``, ...) one kernel; bookkeeping ops (``parameter``, ``get-tuple-element``,
``tuple``, ``bitcast``, ``constant``) and collectives' ``-done`` halves are free. A ``while``
body counts ``known_trip_count`` times when XLA annotated one, once otherwise (reported).

For each kernel it estimates the bytes moved as the sum of its operands' and results'
sizes (an operand that is only sliced counts as the slices), the memory traffic when each
is read or written once, which is what a fused
elementwise kernel does and the minimum for a convolution or gemm. Kernels are split by
phase from the JAX ``op_name`` metadata: ``backward`` (inside ``transpose(jvp(...))``),
``forward`` (inside ``jvp(...)``) and ``other`` — for a training step the last is the
optimizer, EMA and guard; for a sampler it is everything.

This is the tool for work without a GPU: ``python -m ldm_jax.bench unet --compile-only
--target h100`` compiles the step for an H100 on a machine without one (the CUDA plugin
must be installed) and reports these counts. They are estimates of launch count and
traffic, not timings; an extra ``copy`` of a parameter-sized array or a second pass over
the optimizer state shows up here exactly.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
# "%name = <shape> opcode(operands), attrs" ; the shape may be a tuple "(a, b)".
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(")
FREE_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
                      "after-all", "partition-id", "replica-id", "opt-barrier",
                      "all-reduce-done", "all-gather-done", "collective-permute-done",
                      "copy-done", "send-done", "recv-done", "async-done", "add-dependency",
                      "domain"})
CONTROL_OPS = frozenset({"while", "call", "conditional"})
PHASES = ("forward", "backward", "other")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays and tuples of arrays; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return int(total)


def _split_operands(rest: str) -> tuple[str, str]:
    """``rest`` after ``opcode(``: (the operand list, the attributes after it)."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                return rest[:i], rest[i + 1:]
    return rest, ""


def parse_computations(hlo_text: str) -> tuple[dict[str, list[dict]], str]:
    """``({computation name: [instruction]}, entry name)``; each instruction is a dict with
    ``name``, ``shape``, ``op``, ``operands`` (names) and ``attrs`` (the raw attribute text),
    and parameters their ``index``."""
    comps: dict[str, list[dict]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        operands, attrs = _split_operands(m.group(4))
        instr = dict(name=m.group(1), shape=m.group(2), op=m.group(3),
                     operands=re.findall(r"%([^\s,)]+)", operands), attrs=attrs)
        if instr["op"] == "parameter":
            instr["index"] = int(operands.strip() or 0)
        comps[current].append(instr)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
    return comps, entry


def _phase(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    name = m.group(1) if m else ""
    if "transpose(" in name:
        return "backward"
    if "jvp(" in name:
        return "forward"
    return "other"


def _kind(instr: dict) -> str:
    op, attrs = instr["op"], instr["attrs"]
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', attrs)
        t = (target.group(1) if target else "").lower()
        if "conv" in t:
            return "conv"
        if "gemm" in t or "matmul" in t or "cublas" in t:
            return "gemm"
        if "fmha" in t or "attention" in t:
            return "attention"
        return "custom-call"
    if op == "fusion":
        if "kind=kCustom" in attrs and (instr["name"].startswith("gemm_fusion")
                                         or '"kind":"__triton_gemm' in attrs
                                         or '"kind":"__cublas' in attrs):
            return "gemm"
        if "kind=kCustom" in attrs and '"kind":"__cudnn' in attrs:
            return "conv" if "conv" in attrs else "custom-call"
        return "fusion"
    return op


_SLICES = ("slice", "dynamic-slice")
_UNARY = frozenset({"bitcast", "convert", "reshape", "copy", "negate", "abs", "exponential",
                    "log", "tanh", "logistic", "sqrt", "rsqrt"})


def _sliced_params(body: list[dict]) -> dict[int, int]:
    """``{parameter index: bytes read}`` of a fused computation's parameters that are only
    sliced (directly, or after unary conversions): they cost the slices' sizes."""
    uses: dict = collections.defaultdict(list)
    for f in body:
        for o in f["operands"]:
            uses[o].append(f)

    def slice_read(name: str, depth: int = 0) -> int | None:
        if not uses[name] or depth > 8:
            return None
        total = 0
        for u in uses[name]:
            if u["op"] in _SLICES and u["operands"][0] == name:
                total += shape_bytes(u["shape"])
            elif u["op"] in _UNARY and len(u["operands"]) == 1:
                inner = slice_read(u["name"], depth + 1)
                if inner is None:
                    return None
                total += inner
            else:
                return None
        return total

    out = {}
    for f in body:
        if f["op"] == "parameter" and (read := slice_read(f["name"])) is not None:
            out[f["index"]] = read
    return out


def _operand_bytes(ins: dict, sizes: dict, comps: dict, sliced_cache: dict) -> int:
    """Bytes a kernel reads: each operand's size, except an operand that is only sliced
    (a ``slice`` op, or a fusion parameter whose every use is a slice, possibly after
    unary conversions), which costs the slices' sizes."""
    if ins["op"] in _SLICES:  # reads what it returns (plus scalar offsets)
        return shape_bytes(ins["shape"]) + sum(sizes.get(o, 0) for o in ins["operands"][1:])
    sliced = {}
    if ins["op"] == "fusion":
        callee = re.search(r"calls=%?([\w.\-]+)", ins["attrs"])
        if callee:
            name = callee.group(1)
            if name not in sliced_cache:
                sliced_cache[name] = _sliced_params(comps.get(name, []))
            sliced = sliced_cache[name]
    return sum(sliced.get(i, sizes.get(o, 0)) for i, o in enumerate(ins["operands"]))


def _callees(ins: dict) -> list[str]:
    """Computations a ``while`` / ``call`` / ``conditional`` runs."""
    attrs = ins["attrs"]
    if ins["op"] == "while":
        return re.findall(r"(?:condition|body)=%?([\w.\-]+)", attrs)
    if ins["op"] == "call":
        return re.findall(r"to_apply=%?([\w.\-]+)", attrs)
    branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if branches:
        return re.findall(r"%?([\w.\-]+)", branches.group(1))
    return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", attrs)


_LAST_KERNELS: list = [None, None]  # (hlo text, _walk_kernels of it): the last program walked


def _kernels(hlo_text: str) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """``(kernels, loops, notes, controls)``: every kernel instruction of the program, as
    ``{"name", "op", "kind", "phase", "bytes", "count"}`` (``bytes`` moved per execution,
    ``count`` executions per program run: the product of the enclosing loops' trip counts).
    ``loops`` lists the ``while`` loops; ``call`` / ``conditional`` / ``while`` themselves
    launch nothing (their computations' kernels are listed).

    The last program's walk is kept, so ``kernel_stats`` and ``kernel_table`` of the same
    text (bench ``--profile``) parse a large program once; callers get fresh copies."""
    if _LAST_KERNELS[0] is not hlo_text and _LAST_KERNELS[0] != hlo_text:
        _LAST_KERNELS[:] = [hlo_text, _walk_kernels(hlo_text)]
    kernels, loops, notes, controls = _LAST_KERNELS[1]
    return ([dict(k) for k in kernels], [dict(x) for x in loops], list(notes), list(controls))


def _walk_kernels(hlo_text: str) -> tuple[list[dict], list[dict], list[str], list[str]]:
    comps, entry = parse_computations(hlo_text)
    kernels: list[dict] = []
    notes: list[str] = []
    loops: list[dict] = []
    controls: list[str] = []
    sliced_cache: dict = {}

    def walk(comp: str, mult: int, depth: int) -> None:
        if depth > 32:
            raise ValueError("HLO computations nest deeper than 32 levels")
        sizes = {}
        for ins in comps.get(comp, []):
            sizes[ins["name"]] = shape_bytes(ins["shape"])
            op = ins["op"]
            if op in CONTROL_OPS:
                n = 1
                if op == "while":
                    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins["attrs"])
                    if trip:
                        n = int(trip.group(1))
                    else:
                        notes.append(f"while {ins['name']}: unknown trip count, body counted once")
                    loops.append({"name": ins["name"], "trip_count": n if trip else None})
                controls.append(ins["name"])
                for callee in dict.fromkeys(_callees(ins)):
                    walk(callee, mult * n, depth + 1)
                continue
            if op in FREE_OPS:
                continue
            kernels.append(dict(name=ins["name"], op=op, kind=_kind(ins), phase=_phase(ins["attrs"]),
                                bytes=sizes[ins["name"]] + _operand_bytes(ins, sizes, comps, sliced_cache),
                                count=mult))

    walk(entry, 1, 0)
    return kernels, loops, notes, controls


def kernel_table(hlo_text: str) -> tuple[dict[str, dict], set[str]]:
    """``({instruction name: {"op", "kind", "phase", "bytes", "count"}}, control names)``:
    the program's kernels, which a profiler's per-kernel times (``hlo_op``) are joined with
    (ldm_jax.trace_stats), and its ``while`` / ``call`` / ``conditional`` instructions
    (a profiler may report these around their kernels). A name that occurs in several
    computations keeps its first entry."""
    kernels, _, _, controls = _kernels(hlo_text)
    table: dict[str, dict] = {}
    for k in kernels:
        table.setdefault(k["name"], {key: v for key, v in k.items() if key != "name"})
    return table, set(controls)


def kernel_stats(hlo_text: str) -> dict[str, Any]:
    """Launch counts and estimated bytes moved by kind and phase (see the module doc)."""
    kernels, loops, notes, _ = _kernels(hlo_text)
    by_kind: dict = collections.defaultdict(lambda: [0, 0])
    by_phase: dict = collections.defaultdict(lambda: [0, 0])
    for k in kernels:
        for table, key in ((by_kind, k["kind"]), (by_phase, k["phase"])):
            table[key][0] += k["count"]
            table[key][1] += k["count"] * k["bytes"]
    launches = sum(v[0] for v in by_kind.values())
    moved = sum(v[1] for v in by_kind.values())

    def table(t):
        return {k: {"launches": v[0], "bytes": v[1]}
                for k, v in sorted(t.items(), key=lambda kv: -kv[1][1])}

    return dict(launches=launches, bytes_moved=moved, by_kind=table(by_kind),
                by_phase={p: {"launches": by_phase[p][0], "bytes": by_phase[p][1]}
                          for p in PHASES},
                loops=loops, notes=notes)


def memory_stats(compiled) -> dict[str, Any]:
    """XLA's buffer assignment for a compiled program: argument, output, temporary and
    aliased (donated) bytes per device, and the resulting peak estimate."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    if isinstance(ma, (list, tuple)):
        ma = ma[0]
    get = lambda k: int(getattr(ma, k, 0) or 0)  # noqa: E731
    arg, out, temp, alias = (get(k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "temp_size_in_bytes", "alias_size_in_bytes"))
    gen = get("generated_code_size_in_bytes")
    return dict(argument_bytes=arg, output_bytes=out, temp_bytes=temp, alias_bytes=alias,
                generated_code_bytes=gen, peak_bytes_estimate=arg + out - alias + temp + gen)


def summary_line(stats: dict) -> str:
    phases = ", ".join(f"{p} {v['launches']} / {v['bytes'] / 1e9:.2f} GB"
                       for p, v in stats["by_phase"].items() if v["launches"])
    return f"{stats['launches']} kernels, {stats['bytes_moved'] / 1e9:.2f} GB moved ({phases})"


if __name__ == "__main__":  # python -m ldm_jax.hlo_stats FILE.hlo.txt
    import sys

    with open(sys.argv[1]) as f:
        print(json.dumps(kernel_stats(f.read()), indent=2))
