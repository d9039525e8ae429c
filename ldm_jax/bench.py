"""Throughput benchmark of the compiled training step.

  python -m ldm_jax.bench vae    [--config=configs/vae_f8.py] [--batch=8]  [--steps=20] [--out=bench.json]
  python -m ldm_jax.bench unet   [--config=configs/ldm_f8.py] [--batch=64] [--steps=20]
  python -m ldm_jax.bench sample [--config=configs/ldm_f8.py] [--batch=16] [--steps=3]  (DDIM-50 + decode)
  python -m ldm_jax.bench unet --flops-only   # analytic FLOPs only: abstract inputs, nothing runs
  python -m ldm_jax.bench unet --breakdown    # also forward / forward+backward alone, update share
  python -m ldm_jax.bench unet --profile DIR  # also device time per kernel / phase / kind (profiler)
  python -m ldm_jax.bench unet --compile-only [--target h100 [--target-devices 8]] [--dump-hlo F]
      # compile only (for a GPU model without having one, with --target): XLA's memory
      # estimate per device, does it fit, and kernel launches / bytes moved per phase

Compiles once (timed), warms up, then times ``--steps`` steps, each synchronised, and
reports images/s, step time, compile time, peak device memory, FLOPs per step and MFU
against a table of bf16 peaks. The training steps are called as the trainers call them,
with the train state as flat leaves (``trainers.common.FlatState``; ``--tree-state``: as
the ``nnx.State`` tree instead); ``dispatch_s_median`` is the host time until a step call
returns (the step itself runs asynchronously on accelerators): the per-call host cost.
``images_per_s_pipelined`` times ``--steps`` more steps called back to back with one
wait at the end, as a training loop runs them (host and device work overlap); the
headline ``images_per_s`` (synchronised steps) is what the PyTorch comparison uses. Inputs are random images already on the device, so
the number is the step's own speed, not the input pipeline's. LPIPS uses random VGG
weights when the real ones are absent: the same FLOPs.

Every result also carries ``memory`` (XLA's buffer assignment: arguments, outputs,
temporaries, donated aliases, peak estimate per device) and ``kernels`` (launches and
estimated bytes moved of the optimized program, split into forward / backward / other:
ldm_jax.hlo_stats), so a timing can be read against the program that produced it.

``flops_per_step`` is the analytic count of ``ldm_jax.flops`` over the step's jaxpr, for
the whole step on all devices (dot_general + conv_general_dilated, 2 FLOPs per
multiply-accumulate, conv taps on zero padding included, loops multiplied out: the
sampler's 50 U-Net calls are all counted, rematerialised forwards too); ``mfu`` divides it
by step time x peak x devices. ``flops_breakdown`` splits it into matmul / attention / conv,
adds ``conv_valid`` (convs without the padding taps: XLA's cost-analysis convention) and
elementwise work (neither is in the MFU). XLA's own ``cost_analysis()`` figure stays as
``xla_cost_analysis_flops``: on GPU it misses the convolutions (cuDNN custom calls), so it
is far too low there, and under SPMD it is per device.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

# Dense bf16 peak FLOP/s per device (spec sheets; the H100 figure is SXM dense).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def _peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


FLOPS_SOURCE = ("analytic: ldm_jax.flops over the step's jaxpr (dot_general + "
                "conv_general_dilated, 2 per MAC, conv padding taps included, loops x trip "
                "count, remat recompute included, elementwise excluded; all devices)")


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


_COUNTED_KEYS = ("model_flops", "matmul", "attention", "conv", "conv_valid", "elementwise",
                 "unknown_trip_count_loops", "notes")


def _analytic_flops(fn, *args, strict: bool = False) -> dict:
    """Analytic FLOP count of ``fn(*args)`` (args may be abstract); see ldm_jax.flops.

    Unless ``strict``, a failure of the counter does not stop a timing run: the result says
    so (``failed``) and the report falls back to XLA's figure.
    """
    from ldm_jax import flops

    try:
        c = flops.count_flops(fn, *args)
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        print(f"warning: analytic FLOP count failed ({type(e).__name__}: {e}); "
              "reporting XLA's cost analysis instead", file=sys.stderr)
        return dict({k: None for k in _COUNTED_KEYS}, notes=[f"{type(e).__name__}: {e}"],
                    failed=True)
    return {k: c[k] for k in _COUNTED_KEYS}


def _abstract(tree, sharding=None):
    """ShapeDtypeStructs of a pytree of arrays (keeping each array's sharding)."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None),
        weak_type=getattr(x, "weak_type", False)), tree)


@functools.cache
def _cache_hits() -> list[int]:
    """A counter of persistent-cache hits in this process (registered on first use)."""
    import jax

    hits = [0]

    def on_event(event: str, **_kw) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits[0] += 1

    jax.monitoring.register_event_listener(on_event)
    return hits


def _compile(fn, *args):
    """``(compiled, compile_s, compile_cache)`` of ``fn.lower(*args).compile()``.

    ``compile_cache`` says where the executable came from: ``"off"`` (no persistent
    compilation cache configured: ``compile_s`` is a full compile, autotuning included on
    GPU), ``"miss"`` (compiled, then written to the cache) or ``"hit"`` (loaded from the
    cache: ``compile_s`` is the lookup, not a compile; ``side_by_side.py --prewarm``
    reports the cold figure of its warm-up run instead).
    """
    import jax

    counter = _cache_hits()
    before = counter[0]
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    if not jax.config.jax_compilation_cache_dir:
        cache = "off"
    else:
        cache = "hit" if counter[0] > before else "miss"
    return compiled, compile_s, cache


def _flops_only(workload: str, config_spec: str, config, batch: int, n_dev: int,
                counted: dict, **extra) -> dict:
    import jax

    return dict(workload=workload, config=config_spec, batch=batch, dtype=config.dtype,
                num_devices=n_dev, jax=jax.__version__, flops_per_step=counted["model_flops"],
                flops_source=FLOPS_SOURCE, flops_breakdown=_breakdown(counted), **extra)


def _abstract_only(workload: str, config_spec: str, config, batch: int, mesh, fn, args,
                   compile_only: bool, **extra) -> dict:
    """The result of ``--flops-only`` (trace) or ``--compile-only`` (trace and compile for
    the mesh's devices, which may be compile-only devices of a GPU model: ``--target``)."""
    counted = _analytic_flops(fn, *args, strict=True)
    if compile_only:
        compiled, compile_s, cache = _compile(fn, *args)
        extra.update(_compiled_stats(compiled, mesh), compile_s=compile_s, compile_cache=cache,
                     mode="compile-only: nothing ran")
    return _flops_only(workload, config_spec, config, batch, mesh.size, counted, **extra)


_LAST_HLO: list = [None, ""]  # (compiled, its optimized HLO text): printed once per program


def _hlo_text(compiled) -> str:
    """``compiled.as_text()``, kept for the last program (the statistics and ``--profile``
    both read it; printing a large program takes seconds)."""
    if _LAST_HLO[0] is not compiled:
        _LAST_HLO[:] = [compiled, compiled.as_text()]
    return _LAST_HLO[1]


def _compiled_stats(compiled, mesh) -> dict:
    """Kernel launches / bytes moved (ldm_jax.hlo_stats) and XLA's memory estimate of a
    compiled step, per device, and the device it was compiled for."""
    from ldm_jax import hlo_stats

    text = _hlo_text(compiled)
    if _DUMP_HLO:
        os.makedirs(os.path.dirname(os.path.abspath(_DUMP_HLO)) or ".", exist_ok=True)
        with open(_DUMP_HLO, "w") as f:
            f.write(text)
    dev = mesh.devices.flat[0]
    out = dict(compiled_for=getattr(dev, "device_kind", str(dev)),
               memory=hlo_stats.memory_stats(compiled))
    try:
        out["kernels"] = hlo_stats.kernel_stats(text)
    except Exception as e:  # noqa: BLE001  (statistics must not fail a timing run)
        out["kernels"] = {"failed": f"{type(e).__name__}: {e}"}
    return out


_DUMP_HLO: str | None = None  # set by --dump-hlo
_FLAT_STATE = True  # --tree-state: pass the train state to the step as its NNX tree instead


class _Convention(NamedTuple):
    """How the bench hands the train state to the step (see ``_state_convention``)."""
    wrap: Callable  # step function -> the function to jit
    to_step: Callable  # train-state tree -> the step's state argument
    from_step: Callable  # the step's state argument -> train-state tree
    shardings: Any  # the state's shardings in the step's form
    label: str  # "flat" or "tree", written to the result as state_convention


def _state_convention(state_sh) -> _Convention:
    """The trainers' calling convention (``trainers.common.flat_step``: the state as flat
    leaves) or, with ``--tree-state``, the train-state tree of ``nnx.State`` nodes itself
    (what the trainers passed before; its per-call host cost is what the flat form removes)."""
    from ldm_jax.trainers.common import FlatState, flat_step

    if _FLAT_STATE:
        return _Convention(flat_step, FlatState.of, FlatState.tree, FlatState.of(state_sh), "flat")
    ident = lambda s: s  # noqa: E731
    return _Convention(ident, ident, ident, state_sh, "tree")


def _breakdown(counted: dict) -> dict:
    return {k: counted[k] for k in ("matmul", "attention", "conv", "conv_valid", "elementwise",
                                    "unknown_trip_count_loops", "notes")}


def _time(run, steps: int, warmup: int) -> tuple[list[float], float]:
    """Call ``run()`` (which must block until its result is ready) warmup + steps times."""
    for _ in range(warmup):
        run()
    times = []
    t_all = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times, time.perf_counter() - t_all


def _time_pipelined(run, sync, steps: int) -> float:
    """Seconds per call of ``steps`` calls of ``run(block=False)`` back to back with one
    ``sync()`` at the end: the rate of a training loop, whose host work for the next step
    overlaps the device's work on this one."""
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        run(block=False)
    sync()
    return (time.perf_counter() - t) / steps


_PROFILE: dict = {}  # set by --profile: {"dir": trace directory, "steps": profiled calls}


def _profile(run, compiled, result: dict) -> dict:
    """With ``--profile``: ``result`` plus ``profile``, the per-kernel device time of
    ``steps`` more calls of ``run`` under ``jax.profiler.trace`` (ldm_jax.trace_stats),
    joined with the compiled program. A failed trace or summary is reported in the field,
    it does not fail the timing run (the trace stays in the directory)."""
    if not _PROFILE:
        return result
    import jax

    from ldm_jax import trace_stats

    directory, n = _PROFILE["dir"], _PROFILE["steps"]
    try:
        with jax.profiler.trace(directory):
            t0 = time.perf_counter()
            for _ in range(n):
                run()
            profiled_s = (time.perf_counter() - t0) / n
        summary = trace_stats.summarize(trace_stats.latest_trace(directory), _hlo_text(compiled),
                                        steps=n, step_s=result["step_s_median"],
                                        platform=jax.devices()[0].platform)
        summary["profiled_step_s"] = profiled_s  # under the profiler: its overhead included
    except Exception as e:  # noqa: BLE001
        print(f"warning: --profile failed ({type(e).__name__}: {e})", file=sys.stderr)
        return dict(result, profile={"failed": f"{type(e).__name__}: {e}", "dir": directory})
    for line in trace_stats.summary_lines(summary):
        print(line, file=sys.stderr)
    return dict(result, profile=summary)


def _pipelined_fields(run, sync, steps: int, batch: int, dispatch: list) -> dict:
    """``dispatch_s_median`` of the timed (synchronised) calls, then ``steps`` more calls
    back to back: ``step_s_pipelined`` and ``images_per_s_pipelined``."""
    out = {"dispatch_s_median": statistics.median(dispatch[-steps:])}
    out["step_s_pipelined"] = _time_pipelined(run, sync, steps)
    out["images_per_s_pipelined"] = batch / out["step_s_pipelined"]
    return out


def _remat_fields(config) -> dict:
    """``remat`` (on / off) and the policy it runs under (``model.remat_policy``; None off)."""
    on = bool(config.model.remat)
    return {"remat": on, "remat_policy": str(config.model.remat_policy) if on else None}


def _report(workload: str, config_spec: str, config, batch: int, steps: int, times, total,
            compile_s: float, counted: dict, xla_flops: float, n_dev: int,
            images_per_call: int, **extra) -> dict:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    step_s = statistics.median(times)
    peak = _peak_flops(dev)
    if counted.get("failed"):
        flops, source = xla_flops, "xla_cost_analysis (analytic count failed; see flops_breakdown)"
    else:
        flops, source = float(counted["model_flops"]), FLOPS_SOURCE
    return dict(
        workload=workload, config=config_spec, batch=batch, dtype=config.dtype, steps=steps,
        device=getattr(dev, "device_kind", str(dev)), num_devices=n_dev, jax=jax.__version__,
        python=platform.python_version(), compile_s=compile_s, step_s_median=step_s,
        step_s_mean=total / steps, images_per_s=images_per_call / step_s,
        flops_per_step=flops if flops == flops else None,
        tflops_per_s=flops / step_s / 1e12 if flops == flops else None,
        mfu=(flops / step_s / (peak * n_dev)) if (peak and flops == flops) else None,
        peak_bf16_flops_per_device=peak, flops_source=source,
        flops_breakdown=_breakdown(counted),
        xla_cost_analysis_flops=xla_flops if xla_flops == xla_flops else None,
        peak_memory_bytes=(stats or {}).get("peak_bytes_in_use"), **extra)


def bench_vae(config_spec: str, batch: int, steps: int, warmup: int, overrides: dict,
              flops_only: bool = False, compile_only: bool = False, devices=None) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from ldm_jax import config_lib, sharding
    from ldm_jax.models.lpips import create_lpips
    from ldm_jax.trainers import common, vae_gan

    config = config_lib.load_config(config_spec)
    config.global_batch_size = batch
    config_lib.set_fields(config, overrides, parse=True)
    config.loss.lpips_missing = "random"
    mesh = sharding.make_mesh(config.mesh, devices)
    flops_only = flops_only or compile_only
    config_lib.validate_vae_config(config, num_devices=mesh.size)
    rep = sharding.replicated(mesh)
    made = {}

    def make_lpips():
        lp, made["msg"] = create_lpips(config.loss.lpips_weights or None, missing="random",
                                       dtype=common.dtype(config.dtype), rngs=nnx.Rngs(0))
        return lp

    gen_lr, disc_lr = vae_gan.learning_rates(config)
    gen_tx, disc_tx = vae_gan.make_optimizer(gen_lr, config), vae_gan.make_optimizer(disc_lr, config)
    # flops_only: shapes and shardings only, nothing is initialised
    (ae_gd, d_gd), state, state_sh = vae_gan.create_train_state(config, mesh, gen_tx, disc_tx,
                                                                abstract=flops_only)
    if flops_only:
        lp_gd, lp_state = nnx.split(nnx.eval_shape(make_lpips))
        lp_state = _abstract(lp_state, rep)
    else:
        lp_gd, lp_state = nnx.split(make_lpips())
        lp_state = jax.device_put(lp_state, rep)
    msg = made["msg"]
    models = vae_gan.Models(ae=ae_gd, disc=d_gd, lpips=lp_gd)
    metrics_sh = jax.tree.map(lambda _: rep, vae_gan.TrainMetrics.empty())
    batch_sh = sharding.batch_sharding(mesh)
    conv = _state_convention(state_sh)
    step = jax.jit(conv.wrap(vae_gan.make_train_step(models, config, gen_tx, disc_tx)),
                   in_shardings=(conv.shardings, rep, batch_sh, metrics_sh),
                   out_shardings=(conv.shardings, metrics_sh), donate_argnums=(0, 3))
    res = config.model.resolution
    if flops_only:
        image = jax.ShapeDtypeStruct((batch, res, res, 3), np.float32, sharding=batch_sh)
        acc = _abstract(vae_gan.TrainMetrics.empty(), rep)
        return _abstract_only("vae_gan_step", config_spec, config, batch, mesh, step,
                              (conv.to_step(state), lp_state, {"image": image}, acc), compile_only,
                              resolution=res, grad_accum_steps=int(config.optim.grad_accum_steps),
                              **_remat_fields(config))
    rng = np.random.default_rng(0)
    images = [jax.device_put(rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32), batch_sh)
              for _ in range(2)]
    acc = jax.device_put(vae_gan.TrainMetrics.empty(), metrics_sh)
    # Disc on, so the full generator + discriminator work is timed.
    state = conv.to_step(state.replace(step=jax.device_put(np.int32(config.loss.disc_start), rep)))

    counted = _analytic_flops(step, state, lp_state, {"image": images[0]}, acc)
    compiled, compile_s, cache = _compile(step, state, lp_state, {"image": images[0]}, acc)
    carry = {"state": state, "acc": acc, "i": 0}
    dispatch: list[float] = []

    def run(block=True):
        t = time.perf_counter()
        carry["state"], carry["acc"] = compiled(carry["state"], lp_state,
                                                {"image": images[carry["i"] % 2]}, carry["acc"])
        dispatch.append(time.perf_counter() - t)
        carry["i"] += 1
        if block:
            jax.block_until_ready(carry["acc"])

    times, total = _time(run, steps, warmup)
    pipelined = _pipelined_fields(run, lambda: jax.block_until_ready(carry["acc"]), steps, batch, dispatch)
    m = jax.device_get(carry["acc"].compute())
    result = _report("vae_gan_step", config_spec, config, batch, steps, times, total, compile_s,
                     counted, _cost_flops(compiled), mesh.size, batch, resolution=res,
                     compile_cache=cache, **_compiled_stats(compiled, mesh), lpips=msg or "pretrained",
                     last_loss=float(m["loss"]), nan_skipped=float(m["skipped"]),
                     grad_accum_steps=int(config.optim.grad_accum_steps), **_remat_fields(config),
                     state_convention=conv.label, **pipelined)
    return _profile(run, compiled, result)


def _ldm_setup(config_spec: str, batch: int, overrides: dict, devices=None):
    import jax

    from ldm_jax import config_lib, sharding
    from ldm_jax.models.autoencoder import AutoencoderConfig

    config = config_lib.load_config(config_spec)
    config.global_batch_size = batch
    config.eval_batch_size = batch
    config_lib.set_fields(config, overrides, parse=True)
    mesh = sharding.make_mesh(config.mesh, devices)
    # The autoencoder is built with random weights (same FLOPs), so no path is needed.
    ae_spec = dict(config_lib.vae_base_config().model.to_dict())
    if config.space == "latent":
        config_lib.validate_ldm_config(_with_path(config), num_devices=mesh.size)
    else:
        config_lib.validate_ldm_config(config, num_devices=mesh.size)
    return config, mesh, AutoencoderConfig.from_dict(ae_spec), jax


def _with_path(config):
    c = config.copy_and_resolve_references()
    c.autoencoder_path = c.autoencoder_path or "<random>"
    return c


def bench_unet(config_spec: str, batch: int, steps: int, warmup: int, overrides: dict,
               flops_only: bool = False, breakdown: bool = False, compile_only: bool = False,
               devices=None) -> dict:
    import jax
    import numpy as np

    from ldm_jax import sharding
    from ldm_jax.trainers import common, ldm

    config, mesh, ae_cfg, _ = _ldm_setup(config_spec, batch, overrides, devices)
    if breakdown and config.optim.grad_accum_steps > 1:
        raise ValueError("--breakdown times forward and backward on the whole batch at once; "
                         "it cannot be compared with a step of optim.grad_accum_steps > 1 microbatches")
    flops_only = flops_only or compile_only
    shape = ldm.latent_shape(config, ae_cfg if config.space == "latent" else None)
    tx, lr_fn = ldm.make_optimizer(config)
    gd, state, state_sh = ldm.create_train_state(config, mesh, tx, shape[-1], 1.0, abstract=flops_only)
    models = ldm.Models(unet=gd, ae=None)
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    metrics_sh = jax.tree.map(lambda _: rep, ldm.TrainMetrics.empty())
    conv = _state_convention(state_sh)
    step = jax.jit(conv.wrap(ldm.make_train_step(models, config, tx, lr_fn, ldm.make_schedule(config))),
                   in_shardings=(conv.shardings, None, batch_sh, metrics_sh),
                   out_shardings=(conv.shardings, metrics_sh), donate_argnums=(0, 3))
    key = "image" if config.space == "pixel" else "moments"
    width = shape[-1] if config.space == "pixel" else 2 * shape[-1]
    if flops_only:
        b = {key: jax.ShapeDtypeStruct((batch, *shape[:2], width), np.float32, sharding=batch_sh),
             "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=batch_sh)}
        return _abstract_only("unet_step", config_spec, config, batch, mesh, step,
                              (conv.to_step(state), None, b, _abstract(ldm.TrainMetrics.empty(), rep)),
                              compile_only, input_shape=list(shape),
                              grad_accum_steps=int(config.optim.grad_accum_steps),
                              params=common.param_count(state.params),
                              **_remat_fields(config))
    rng = np.random.default_rng(0)
    batches = [{key: jax.device_put(rng.normal(size=(batch, *shape[:2], width)).astype(np.float32), batch_sh),
                "label": jax.device_put(rng.integers(0, max(config.model.num_classes, 1), batch).astype(np.int32),
                                        batch_sh)} for _ in range(2)]
    acc = jax.device_put(ldm.TrainMetrics.empty(), metrics_sh)
    state = conv.to_step(state)
    counted = _analytic_flops(step, state, None, batches[0], acc)
    compiled, compile_s, cache = _compile(step, state, None, batches[0], acc)
    carry = {"state": state, "acc": acc, "i": 0}
    dispatch: list[float] = []

    def run(block=True):
        t = time.perf_counter()
        carry["state"], carry["acc"] = compiled(carry["state"], None, batches[carry["i"] % 2], carry["acc"])
        dispatch.append(time.perf_counter() - t)
        carry["i"] += 1
        if block:
            jax.block_until_ready(carry["acc"])

    times, total = _time(run, steps, warmup)
    pipelined = _pipelined_fields(run, lambda: jax.block_until_ready(carry["acc"]), steps, batch, dispatch)
    m = jax.device_get(carry["acc"].compute())
    n_params = common.param_count(conv.from_step(carry["state"]).params)
    result = _report("unet_step", config_spec, config, batch, steps, times, total, compile_s,
                     counted, _cost_flops(compiled), mesh.size, batch, input_shape=list(shape),
                     compile_cache=cache, **_compiled_stats(compiled, mesh), params=int(n_params),
                     **_remat_fields(config), last_loss=float(m["loss"]),
                     nan_skipped=float(m["skipped"]),
                     grad_accum_steps=int(config.optim.grad_accum_steps),
                     state_convention=conv.label, **pipelined)
    result = _profile(run, compiled, result)
    if breakdown:  # after the report, so the step's peak memory is its own
        final = conv.from_step(carry["state"])  # after --profile's steps
        result["breakdown"] = _unet_breakdown(models, config, final, batches[0], state_sh,
                                              batch_sh, rep, steps, warmup, result["step_s_median"])
    return result


def _unet_breakdown(models, config, state, batch, state_sh, batch_sh, rep, steps: int, warmup: int,
                    step_s: float) -> dict:
    """Median times of the step's parts on the same inputs, each its own jitted call: the
    loss (forward), the loss and its gradients (forward + backward; the gradients are
    outputs, as in the step), and, by difference with the whole step, the update (clipping,
    AdamW, EMA, non-finite guard)."""
    import jax

    from ldm_jax.trainers import ldm

    loss_fn = ldm.make_loss_fn(models, config, ldm.make_schedule(config))
    keys = tuple(jax.random.split(jax.random.PRNGKey(0), 4))
    p_sh, r_sh = state_sh.params, state_sh.rest
    params = state.params
    if _FLAT_STATE:  # parameters in and gradients out as flat leaves, as in the step
        from ldm_jax.trainers.common import FlatState

        tree_loss = loss_fn
        loss_fn = lambda fp, *a: tree_loss(fp.tree(), *a)  # noqa: E731
        params, p_sh = FlatState.of(params), FlatState.of(p_sh)
    args = (params, state.rest, None, batch, state.scale_factor, keys)
    in_sh = (p_sh, r_sh, None, batch_sh, rep, rep)
    fwd = jax.jit(loss_fn, in_shardings=in_sh, out_shardings=rep)
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn), in_shardings=in_sh, out_shardings=(rep, p_sh))
    out = {"step_s": step_s}
    for name, fn in (("forward_s", fwd), ("forward_backward_s", fwd_bwd)):
        compiled, _, out[name[:-2] + "_compile_cache"] = _compile(fn, *args)
        res = {}

        def run(compiled=compiled, res=res):
            res["x"] = compiled(*args)
            jax.block_until_ready(res["x"])

        t, _ = _time(run, steps, warmup)
        out[name] = statistics.median(t)
        res.clear()
    out["update_s"] = step_s - out["forward_backward_s"]
    out["update_share"] = out["update_s"] / step_s
    return out


def bench_sample(config_spec: str, batch: int, steps: int, warmup: int, overrides: dict,
                 flops_only: bool = False, compile_only: bool = False, devices=None) -> dict:
    """Time DDIM-N (config.sampling) + decode of ``batch`` images: one jitted call each."""
    import jax
    import numpy as np
    from flax import nnx

    from ldm_jax import sharding
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.trainers import common, ldm

    config, mesh, ae_cfg, _ = _ldm_setup(config_spec, batch, overrides, devices)
    flops_only = flops_only or compile_only
    latent = config.space == "latent"
    shape = ldm.latent_shape(config, ae_cfg if latent else None)
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    ae_gd = ae_state = None
    if latent:
        def make_ae():
            return AutoencoderKL(ae_cfg, dtype=common.dtype(config.dtype), rngs=nnx.Rngs(0))

        ae_gd, ae_shapes = nnx.split(nnx.eval_shape(make_ae))
        ae_state = ae_shapes if flops_only else jax.jit(
            lambda: nnx.split(make_ae())[1], out_shardings=rep,
            compiler_options=common.one_shot_compiler_options(ae_shapes))()
    tx, _ = ldm.make_optimizer(config)
    # (flops_only: the train state's shapes and shardings (FSDP), as in the timing run)
    gd, state, _ = ldm.create_train_state(config, mesh, tx, shape[-1], 0.18215, abstract=flops_only)
    models = ldm.Models(unet=gd, ae=ae_gd)
    fn = jax.jit(ldm.make_sample_fn(models, config, ldm.make_schedule(config), (batch, *shape)),
                 out_shardings=batch_sh)
    s = config.sampling
    if flops_only:  # the whole chain: the sampler's fori_loop is num_steps U-Net calls
        args = (state.ema_params, state.rest, _abstract(ae_state, rep),
                jax.ShapeDtypeStruct((2,), np.uint32, sharding=rep),
                jax.ShapeDtypeStruct((batch,), np.int32, sharding=batch_sh),
                _abstract(state.scale_factor, rep))
        return _abstract_only("sample_" + s.sampler, config_spec, config, batch, mesh, fn, args,
                              compile_only, sampler=s.sampler, sampler_steps=int(s.num_steps),
                              cfg_scale=float(s.cfg_scale), decoded=latent)
    labels = jax.device_put(np.arange(batch, dtype=np.int32) % max(config.model.num_classes, 1), batch_sh)
    args = (state.ema_params, state.rest, ae_state, jax.random.PRNGKey(0), labels, state.scale_factor)
    counted = _analytic_flops(fn, *args)
    compiled, compile_s, cache = _compile(fn, *args)
    out = {}

    def run():
        out["x"] = compiled(*args)
        jax.block_until_ready(out["x"])

    times, total = _time(run, steps, warmup)
    x = np.asarray(jax.device_get(out["x"]))
    result = _report("sample_" + s.sampler, config_spec, config, batch, steps, times, total, compile_s,
                     counted, _cost_flops(compiled), mesh.size, batch, sampler=s.sampler,
                     sampler_steps=int(s.num_steps), cfg_scale=float(s.cfg_scale),
                     compile_cache=cache, **_compiled_stats(compiled, mesh), output_shape=list(x.shape),
                     finite=bool(np.isfinite(x).all()), decoded=latent, note="random weights: timing only")
    return _profile(run, compiled, result)


WORKLOADS = {"vae": (bench_vae, "configs/vae_f8.py", 8, 20),
             "unet": (bench_unet, "configs/ldm_f8.py", 64, 20),
             "sample": (bench_sample, "configs/ldm_f8.py", 16, 3)}


def main(argv=None) -> None:
    from ldm_jax import gpu_targets  # jax-free until a topology is asked for

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--config", default=None, help="config file[:variant] (default per workload)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default per workload)")
    p.add_argument("--steps", type=int, default=None, help="timed calls (default per workload)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set dtype=float32 --set model.remat=true")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    p.add_argument("--flops-only", action="store_true",
                   help="only trace with abstract inputs and report the analytic FLOPs per step "
                        "(no initialisation, compilation or timing)")
    p.add_argument("--breakdown", action="store_true",
                   help="unet only: also time the forward and forward + backward alone, and "
                        "report the update's share of the step")
    p.add_argument("--compile-only", action="store_true",
                   help="trace and compile with abstract inputs, report XLA's memory estimate "
                        "and the kernel statistics of the optimized program (nothing runs)")
    p.add_argument("--target", default=None, choices=gpu_targets.TARGETS,
                   help="with --compile-only: compile for this GPU model without having one "
                        "(needs the JAX CUDA plugin)")
    p.add_argument("--target-devices", type=int, default=1,
                   help="with --target: number of GPUs on the (one) host to compile for")
    p.add_argument("--dump-hlo", default=None, metavar="FILE",
                   help="write the optimized HLO text of the compiled step here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, run --profile-steps more steps under the JAX profiler "
                        "(trace written to DIR, viewable in TensorBoard / Perfetto) and report "
                        "device time per kernel, phase and kind (ldm_jax.trace_stats)")
    p.add_argument("--profile-steps", type=int, default=3, metavar="N")
    p.add_argument("--tree-state", action="store_true",
                   help="vae / unet: pass the train state to the step as its nnx.State tree (the "
                        "trainers' old calling convention) instead of flat leaves, to measure the "
                        "per-call host cost that the flat form removes (see dispatch_s_median)")
    a = p.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    fn, config, batch, steps = WORKLOADS[a.workload]
    kw = {}
    if a.breakdown:
        if a.workload != "unet":
            p.error("--breakdown is for the unet workload")
        if a.compile_only or a.flops_only:
            p.error("--breakdown times the step: not with --compile-only / --flops-only")
        kw["breakdown"] = True
    if a.target:
        if not a.compile_only:
            p.error("--target compiles for a GPU this machine may not have: use it with "
                    "--compile-only")
        gpu_targets.prepare_environment()
        try:
            kw["devices"] = gpu_targets.topology_devices(a.target, a.target_devices)
        except RuntimeError as e:
            p.exit(2, f"error: {e}\n")
    if a.profile and (a.compile_only or a.flops_only):
        p.error("--profile runs the step: not with --compile-only / --flops-only")
    if a.profile_steps < 1:
        p.error("--profile-steps must be >= 1")
    global _DUMP_HLO, _FLAT_STATE
    _DUMP_HLO = a.dump_hlo
    if a.tree_state and a.workload == "sample":
        p.error("--tree-state is for the training steps (vae, unet)")
    _FLAT_STATE = not a.tree_state
    _PROFILE.clear()
    if a.profile:
        _PROFILE.update(dir=os.path.abspath(a.profile), steps=a.profile_steps)
    from ldm_jax.config_lib import ConfigError

    try:
        result = fn(a.config or config, a.batch or batch, a.steps or steps, a.warmup, overrides,
                    flops_only=a.flops_only, compile_only=a.compile_only, **kw)
    except (ConfigError, FileNotFoundError) as e:  # --config / --set mistakes, missing files
        p.exit(2, f"error: {e}\n")
    if a.target:
        need = result["memory"].get("peak_bytes_estimate")
        have = gpu_targets.device_memory_bytes(a.target)
        result["device_memory_bytes"] = have
        result["fits_in_device_memory"] = bool(need is not None and need <= have)
    print_json(result, a.out)


def print_json(result: dict, out: str | None) -> None:
    """Print a benchmark result as indented JSON, and write it to ``out`` too if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
