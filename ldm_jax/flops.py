"""Analytic FLOP count of a JAX function, from its jaxpr.

XLA's ``compiled.cost_analysis()`` on GPU leaves out every convolution (they become cuDNN
custom calls) and so undercounts a conv net by orders of magnitude. This module counts
FLOPs from the program itself instead: ``count_flops(fn, *args)`` traces ``fn`` with
``jax.make_jaxpr`` (arguments may be arrays or ``jax.ShapeDtypeStruct``; nothing runs),
removes dead code the way XLA would (``dce``), and walks every equation, recursing through
sub-jaxprs with the right multiplicity:

* ``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``: once.
* ``checkpoint``/``remat``: once per occurrence; under ``grad`` the rematerialised forward
  shows up again inside the backward's ``checkpoint`` equation, so recomputation counts.
* ``scan`` (and ``fori_loop`` with static bounds, which lowers to ``scan``): body x length.
* ``while``: when the loop has the ``fori_loop`` shape (a counter carried from ``lower``
  and increased by 1 while ``counter < upper``, ``upper`` loop-invariant) and both bounds
  are known constants, body x trip count (condition x trip count + 1). Otherwise the trip
  count is unknown: one iteration is counted and ``unknown_trip_count_loops`` says so.
* ``cond``/``switch``: the most expensive branch by default (``cond="max"``: an upper
  bound on what one execution costs); ``cond="sum"`` adds all branches.
* ``shard_map``: body (per-shard shapes) x the number of shards along its manual axes;
  ``xla_pmap``: body x axis size. FLOPs are the whole program's, over all devices.
* any other primitive with sub-jaxprs: each counted once, named in ``notes``.

What is counted (2 FLOPs per multiply-accumulate):

* ``dot_general``: ``2 * out_size * contracted_size`` (batch dimensions are in out_size).
  Products inside ``jax.nn.dot_product_attention`` (its XLA path: the Q·Kᵀ and P·V
  einsums and their gradients) go to ``attention``, the rest to ``matmul``. cuDNN fused
  attention primitives count ``4·B·N·T·S·H`` forward and ``2.5x`` that backward
  (no masking discount).
* ``conv_general_dilated``: ``2 * out_batch * out_features * (rhs in-features) * taps``,
  where ``taps`` is the product over spatial dimensions of the (output position, kernel
  tap) pairs that are computed. With ``conv_mode="dense"`` (default), every tap counts
  except those landing in the holes that ``lhs_dilation`` inserts (the structural zeros of
  a transposed convolution): for an ordinary conv this is the usual
  ``out_elems * kernel_size * C_in / groups`` with padding taps included, and the input
  gradient of a stride-s conv costs the same as its forward instead of s^2 times more.
  ``conv_mode="valid"`` also drops the taps on zero padding (only products with real
  input elements), under which forward + both gradients of a conv are exactly 3x the
  forward for any shape; this is also the convention of XLA's HLO cost analysis (it
  matches ``cost_analysis()`` on CPU, where convolutions stay HLO). Both are always
  returned (``conv_dense``, ``conv_valid``); ``conv_mode`` picks the one in ``conv``.
  ``batch_group_count`` (weight gradients of grouped convs) is handled by the output batch
  being ``lhs_batch / batch_group_count``.
* ``elementwise``: 1 FLOP per output element of floating-point arithmetic and
  transcendental primitives, 1 per input element of reductions. Reported separately and
  not part of ``model_flops``.

``model_flops = matmul + attention + conv`` is the figure for MFU (all four buckets are
disjoint). Complex arithmetic is counted like real arithmetic.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

import jax

_ATTN_EINSUMS = ("BTNH,BSNH->BNTS", "BNTS,BSNH->BTNH")
_ATTN_FUNCS = ("_dot_product_attention_core", "_dot_product_attention_xla")

_ELEMENTWISE = frozenset("""
add add_any sub mul div rem neg max min abs sign exp exp2 log log1p expm1 tanh logistic
sin cos tan asin acos atan sinh cosh asinh acosh atanh atan2 sqrt rsqrt cbrt pow
integer_pow square erf erfc erf_inv lgamma digamma igamma select_n clamp nextafter round
floor ceil logaddexp
""".split())
_REDUCTIONS = frozenset("""
reduce_sum reduce_max reduce_min reduce_prod argmax argmin cumsum cumprod cummax cummin
cumlogsumexp reduce_and reduce_or
""".split())
# Scalar integer ops folded to find fori-style while loop bounds.
_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "max": max, "min": min, "neg": lambda a: -a, "convert_element_type": lambda a: a}


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _inexact(aval) -> bool:
    dt = getattr(aval, "dtype", None)
    try:
        return dt is not None and bool(np.issubdtype(dt, np.inexact))
    except TypeError:  # extended dtypes (PRNG keys)
        return False


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
    """``2 * batch * lhs_free * rhs_free * contracted``."""
    (lc, rc), (lb, rb) = dimension_numbers
    contract = math.prod(lhs_shape[d] for d in lc)
    batch = math.prod(lhs_shape[d] for d in lb)
    lfree = math.prod(s for d, s in enumerate(lhs_shape) if d not in lc and d not in lb)
    rfree = math.prod(s for d, s in enumerate(rhs_shape) if d not in rc and d not in rb)
    return 2 * batch * lfree * rfree * contract


def _taps(out: int, k: int, in_size: int, stride: int, lo: int, lhs_dil: int,
          rhs_dil: int, mode: str) -> int:
    """(output position, kernel tap) pairs along one spatial dimension that are computed."""
    if out <= 0 or k <= 0 or in_size <= 0:
        return 0
    if lhs_dil == 1 and mode == "dense":
        return out * k
    # Position of each pair in the lhs-dilated (unpadded) coordinates.
    p = (np.arange(out)[:, None] * stride + np.arange(k)[None, :] * rhs_dil - lo)
    keep = (p % lhs_dil) == 0
    if mode == "valid":
        keep &= (p >= 0) & (p <= (in_size - 1) * lhs_dil)
    return int(keep.sum())


def conv_flops(lhs_shape, rhs_shape, out_shape, *, window_strides, padding, lhs_dilation,
               rhs_dilation, dimension_numbers, mode: str = "dense") -> int:
    """FLOPs of one ``conv_general_dilated`` (see the module docstring for ``mode``)."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    nsp = len(lhs_spec) - 2
    lhs_dilation = lhs_dilation or (1,) * nsp
    rhs_dilation = rhs_dilation or (1,) * nsp
    taps = 1
    for i in range(nsp):
        taps *= _taps(out_shape[out_spec[2 + i]], rhs_shape[rhs_spec[2 + i]],
                      lhs_shape[lhs_spec[2 + i]], window_strides[i], padding[i][0],
                      lhs_dilation[i], rhs_dilation[i], mode)
    return (2 * out_shape[out_spec[0]] * out_shape[out_spec[1]] * rhs_shape[rhs_spec[1]]
            * taps)


class _Acc:
    def __init__(self, cond: str, conv_mode: str):
        self.cond, self.conv_mode = cond, conv_mode
        self.flops = {"matmul": 0.0, "attention": 0.0, "conv": 0.0, "elementwise": 0.0}
        self.conv_by_mode = {"dense": 0.0, "valid": 0.0}
        self.ops = {"dot_general": 0.0, "conv_general_dilated": 0.0}
        self.unknown_loops = 0
        self.notes: list[str] = []

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)


def _subjaxpr(obj):
    """(jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if hasattr(obj, "jaxpr") and hasattr(obj, "consts"):
        return obj.jaxpr, list(obj.consts)
    return obj, []


def _is_jaxpr(obj) -> bool:
    return hasattr(obj, "eqns") or (hasattr(obj, "jaxpr") and hasattr(obj, "consts"))


def _int_scalar(aval) -> bool:
    try:
        return aval.shape == () and bool(np.issubdtype(aval.dtype, np.integer))
    except TypeError:
        return False


def _scalar_int(v):
    try:
        a = np.asarray(v)
    except Exception:
        return None
    if a.ndim == 0 and np.issubdtype(a.dtype, np.integer):
        return int(a)
    return None


def _read(env: dict, v):
    if hasattr(v, "val"):  # Literal
        return _scalar_int(v.val)
    return env.get(v)


def _inner_env(jaxpr, consts, outer_vals) -> dict:
    env = {}
    for var, c in zip(jaxpr.constvars, consts):
        val = _scalar_int(c)
        if val is not None:
            env[var] = val
    for var, val in zip(jaxpr.invars, outer_vals):
        if val is not None:
            env[var] = val
    return env


def _is_attention(eqn) -> bool:
    stack = str(getattr(eqn.source_info, "name_stack", ""))
    if any(s in stack for s in _ATTN_EINSUMS):
        return True
    tb = getattr(eqn.source_info, "traceback", None)
    try:
        return tb is not None and any(f.function_name in _ATTN_FUNCS for f in tb.frames)
    except Exception:
        return False


def _fori_trip_count(eqn, env: dict) -> int | None:
    """Trip count of a ``while`` with the fori_loop shape and known bounds, else None."""
    p = eqn.params
    cj, cconsts = _subjaxpr(p["cond_jaxpr"])
    bj, _ = _subjaxpr(p["body_jaxpr"])
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    inits = eqn.invars[cn + bn:]
    carries_c = cj.invars[cn:]
    carries_b = bj.invars[bn:]
    if len(cj.eqns) != 1 or cj.eqns[0].primitive.name != "lt":
        return None
    lt = cj.eqns[0]
    if cj.outvars[0] is not lt.outvars[0] or lt.invars[0] not in carries_c:
        return None
    i = carries_c.index(lt.invars[0])
    cenv = _inner_env(cj, cconsts, [_read(env, v) for v in eqn.invars[:cn]] + [None] * len(inits))
    upper_var = lt.invars[1]
    if hasattr(upper_var, "val"):
        upper = _scalar_int(upper_var.val)
    elif upper_var in carries_c:
        j = carries_c.index(upper_var)
        if bj.outvars[j] is not carries_b[j]:  # the bound must be loop-invariant
            return None
        upper = _read(env, inits[j])
    else:
        upper = cenv.get(upper_var)
    # Body: counter_out = add(counter_in, 1).
    out_i = bj.outvars[i]
    step = None
    for e in bj.eqns:
        if e.outvars and e.outvars[0] is out_i and e.primitive.name == "add":
            a, b = e.invars
            if a is carries_b[i] and hasattr(b, "val"):
                step = _scalar_int(b.val)
            elif b is carries_b[i] and hasattr(a, "val"):
                step = _scalar_int(a.val)
    lower = _read(env, inits[i])
    if step != 1 or lower is None or upper is None:
        return None
    return max(0, upper - lower)


def _walk(jaxpr, env: dict, mult: float, acc: _Acc, attn: bool) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        p = eqn.params
        invals = [_read(env, v) for v in eqn.invars]

        if name == "dot_general":
            f = dot_general_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                                  p["dimension_numbers"])
            key = "attention" if (attn or _is_attention(eqn)) else "matmul"
            acc.flops[key] += mult * f
            acc.ops["dot_general"] += mult
        elif name == "conv_general_dilated":
            for mode in ("dense", "valid"):
                f = conv_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                               eqn.outvars[0].aval.shape, window_strides=p["window_strides"],
                               padding=p["padding"], lhs_dilation=p["lhs_dilation"],
                               rhs_dilation=p["rhs_dilation"],
                               dimension_numbers=p["dimension_numbers"], mode=mode)
                acc.conv_by_mode[mode] += mult * f
                if mode == acc.conv_mode:
                    acc.flops["conv"] += mult * f
            acc.ops["conv_general_dilated"] += mult
        elif name.startswith("dot_product_attention_"):
            _cudnn_attention(eqn, mult, acc)
        elif name in _ELEMENTWISE:
            if any(_inexact(v.aval) for v in eqn.outvars):
                acc.flops["elementwise"] += mult * sum(_size(v.aval) for v in eqn.outvars)
        elif name in _REDUCTIONS:
            if any(_inexact(v.aval) for v in eqn.invars):
                acc.flops["elementwise"] += mult * sum(_size(v.aval) for v in eqn.invars)
        elif name == "scan":
            j, c = _subjaxpr(p["jaxpr"])  # only the consts are loop-invariant
            _walk(j, _inner_env(j, c, invals[:p["num_consts"]]), mult * p["length"], acc, attn)
        elif name == "while":
            trips = _fori_trip_count(eqn, env)
            if trips is None:
                acc.unknown_loops += 1
                acc.note("while loop with unknown trip count: one iteration counted")
                trips, ctrips = 1, 1
            else:
                ctrips = trips + 1
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            bj, bc = _subjaxpr(p["body_jaxpr"])
            cj, cc = _subjaxpr(p["cond_jaxpr"])
            _walk(bj, _inner_env(bj, bc, invals[cn:cn + bn]), mult * trips, acc, attn)
            _walk(cj, _inner_env(cj, cc, invals[:cn]), mult * ctrips, acc, attn)
        elif name == "cond":
            subs = []
            for br in p["branches"]:
                sub = _Acc(acc.cond, acc.conv_mode)
                j, c = _subjaxpr(br)
                _walk(j, _inner_env(j, c, invals[1:]), mult, sub, attn)
                subs.append(sub)
            if acc.cond == "sum":
                chosen = subs
            else:
                chosen = [max(subs, key=lambda s: sum(s.flops.values()))]
            for s in chosen:
                for k in acc.flops:
                    acc.flops[k] += s.flops[k]
                for k in acc.conv_by_mode:
                    acc.conv_by_mode[k] += s.conv_by_mode[k]
                for k in acc.ops:
                    acc.ops[k] += s.ops[k]
            for s in subs:
                acc.unknown_loops += s.unknown_loops if s in chosen else 0
                for n in s.notes:
                    acc.note(n)
        elif name == "shard_map":
            mesh = p["mesh"]
            axes = p.get("newly_manual_axes", p.get("manual_axes", p.get("axis_names", ())))
            shape = dict(mesh.shape)
            shards = math.prod(shape[a] for a in axes) if axes else math.prod(shape.values())
            j, c = _subjaxpr(p["jaxpr"])
            _walk(j, _inner_env(j, c, invals), mult * shards, acc, attn)
        elif name == "xla_pmap":
            j, c = _subjaxpr(p["call_jaxpr"])
            _walk(j, _inner_env(j, c, [None] * len(invals)), mult * p["axis_size"], acc, attn)
        elif name in _FOLD and invals and all(v is not None for v in invals) \
                and _int_scalar(eqn.outvars[0].aval):
            try:
                env[eqn.outvars[0]] = int(_FOLD[name](*invals))
            except Exception:
                pass
        else:
            subs = [(k, v) for k, v in p.items() if _is_jaxpr(v)]
            subs += [(k, x) for k, v in p.items() if isinstance(v, (tuple, list))
                     for x in v if _is_jaxpr(x)]
            if not subs:
                continue
            inner_attn = attn or "dot_product_attention" in str(p.get("name", ""))
            known = name in ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
                             "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                             "custom_lin", "remat2")
            if not known:
                acc.note(f"sub-jaxprs of '{name}' counted once each")
            for k, sub in subs:
                if k in ("jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd"):
                    continue
                j, c = _subjaxpr(sub)
                vals = invals if len(j.invars) == len(invals) else [None] * len(j.invars)
                _walk(j, _inner_env(j, c, vals), mult, acc, inner_attn)


def _cudnn_attention(eqn, mult: float, acc: _Acc) -> None:
    p = eqn.params
    q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    layout = p.get("layout", 0)
    layout = getattr(layout, "value", layout)
    s = k[2] if layout == 1 else k[1]
    fwd = 4 * math.prod(q) * s  # Q·Kᵀ and P·V (value width taken equal to the q width)
    if eqn.primitive.name.endswith("_bwd"):
        acc.flops["attention"] += mult * 2.5 * fwd
    elif eqn.primitive.name.endswith("_fwd"):
        acc.flops["attention"] += mult * fwd
    else:
        acc.note(f"'{eqn.primitive.name}' not counted")


def count_jaxpr_flops(closed_jaxpr, *, cond: str = "max", conv_mode: str = "dense",
                      dce: bool = True) -> dict:
    """Count FLOPs of a ``ClosedJaxpr`` (see ``count_flops``)."""
    if cond not in ("max", "sum"):
        raise ValueError(f"cond must be 'max' or 'sum', got {cond!r}")
    if conv_mode not in ("dense", "valid"):
        raise ValueError(f"conv_mode must be 'dense' or 'valid', got {conv_mode!r}")
    jaxpr, consts = _subjaxpr(closed_jaxpr)
    env = _inner_env(jaxpr, consts, [])
    if dce:
        try:
            from jax._src.interpreters import partial_eval as pe
            jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
        except Exception:  # private API moved: count without dead-code elimination
            pass
    acc = _Acc(cond, conv_mode)
    _walk(jaxpr, env, 1.0, acc, False)
    out = dict(acc.flops)
    out["model_flops"] = out["matmul"] + out["attention"] + out["conv"]
    out["total_flops"] = out["model_flops"] + out["elementwise"]
    out["conv_dense"] = acc.conv_by_mode["dense"]
    out["conv_valid"] = acc.conv_by_mode["valid"]
    out["dot_general_ops"] = acc.ops["dot_general"]
    out["conv_ops"] = acc.ops["conv_general_dilated"]
    out["unknown_trip_count_loops"] = acc.unknown_loops
    out["cond"] = cond
    out["conv_mode"] = conv_mode
    out["notes"] = acc.notes
    return out


def count_flops(fn: Callable, *args: Any, cond: str = "max", conv_mode: str = "dense",
                dce: bool = True, **kwargs: Any) -> dict:
    """Trace ``fn(*args, **kwargs)`` with ``jax.make_jaxpr`` and count its FLOPs.

    Arguments may be arrays or ``jax.ShapeDtypeStruct``s (nothing is executed). Returns a
    dict: ``matmul``, ``attention``, ``conv``, ``elementwise`` (disjoint buckets, FLOPs),
    ``model_flops`` (matmul + attention + conv: the MFU numerator), ``total_flops``
    (model + elementwise), ``conv_dense`` / ``conv_valid`` (the conv bucket under either
    ``conv_mode``; ``conv`` is one of them), ``dot_general_ops`` / ``conv_ops`` (executions,
    loop trips included), ``unknown_trip_count_loops``, ``cond``, ``conv_mode``, ``notes``.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return count_jaxpr_flops(closed, cond=cond, conv_mode=conv_mode, dce=dce)
