"""Throughput benchmark of the compiled training step.

  python -m ldm_jax.bench vae [--config=configs/vae_f8.py] [--batch=8] [--steps=20] [--out=bench.json]

Compiles once (timed), warms up, then times ``--steps`` steps with a device sync at the
end, and reports images/s, step time, compile time, peak device memory, XLA's FLOP
count per step and MFU against a table of bf16 peaks. Inputs are random images already
on the device, so the number is the step's own speed, not the input pipeline's. LPIPS
uses random VGG weights when the real ones are absent: the same FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# Dense bf16 peak FLOP/s per device (spec sheets; the H100 figure is SXM dense).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def _peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def bench_vae(config_spec: str, batch: int, steps: int, warmup: int, overrides: dict) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from ldm_jax import config_lib, sharding
    from ldm_jax.models.lpips import create_lpips
    from ldm_jax.trainers import common, vae_gan

    config = config_lib.load_config(config_spec)
    config.global_batch_size = batch
    for k, v in overrides.items():
        node = config
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = type(node[last])(v) if not isinstance(node[last], bool) else v in ("1", "true", "True")
    config.loss.lpips_missing = "random"
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate_vae_config(config, num_devices=mesh.size)
    lp, msg = create_lpips(config.loss.lpips_weights or None, missing="random",
                           dtype=common.dtype(config.dtype), rngs=nnx.Rngs(0))
    lp_gd, lp_state = nnx.split(lp)
    lp_state = jax.device_put(lp_state, sharding.replicated(mesh))
    gen_lr, disc_lr = vae_gan.learning_rates(config)
    gen_tx, disc_tx = vae_gan.make_optimizer(gen_lr, config), vae_gan.make_optimizer(disc_lr, config)
    (ae_gd, d_gd), state, state_sh = vae_gan.create_train_state(config, mesh, gen_tx, disc_tx)
    models = vae_gan.Models(ae=ae_gd, disc=d_gd, lpips=lp_gd)
    rep = sharding.replicated(mesh)
    metrics_sh = jax.tree.map(lambda _: rep, vae_gan.TrainMetrics.empty())
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(vae_gan.make_train_step(models, config, gen_tx, disc_tx),
                   in_shardings=(state_sh, rep, batch_sh, metrics_sh),
                   out_shardings=(state_sh, metrics_sh), donate_argnums=(0, 3))
    res = config.model.resolution
    rng = np.random.default_rng(0)
    images = [jax.device_put(rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32), batch_sh)
              for _ in range(2)]
    acc = jax.device_put(vae_gan.TrainMetrics.empty(), metrics_sh)
    # Disc on, so the full generator + discriminator work is timed.
    state = state.replace(step=jax.device_put(np.int32(config.loss.disc_start), rep))

    t0 = time.perf_counter()
    compiled = step.lower(state, lp_state, {"image": images[0]}, acc).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))

    for i in range(warmup):
        state, acc = compiled(state, lp_state, {"image": images[i % 2]}, acc)
    jax.block_until_ready(acc)
    times = []
    t_all = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        state, acc = compiled(state, lp_state, {"image": images[i % 2]}, acc)
        jax.block_until_ready(acc)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t_all
    m = jax.device_get(acc.compute())

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak_mem = (stats or {}).get("peak_bytes_in_use")
    step_s = statistics.median(times)
    peak = _peak_flops(dev)
    n_dev = mesh.size
    return dict(
        workload="vae_gan_step", config=config_spec, batch=batch, resolution=res,
        dtype=config.dtype, steps=steps, device=getattr(dev, "device_kind", str(dev)),
        num_devices=n_dev, jax=jax.__version__, python=platform.python_version(),
        compile_s=compile_s, step_s_median=step_s, step_s_mean=total / steps,
        images_per_s=batch / step_s, flops_per_step=flops,
        tflops_per_s=flops / step_s / 1e12 if flops == flops else None,
        mfu=(flops / step_s / (peak * n_dev)) if (peak and flops == flops) else None,
        peak_memory_bytes=peak_mem, lpips=msg or "pretrained",
        last_loss=float(m["loss"]), nan_skipped=float(m["skipped"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=["vae"])
    p.add_argument("--config", default="configs/vae_f8.py")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set dtype=float32 --set model.remat=true")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    a = p.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    result = bench_vae(a.config, a.batch, a.steps, a.warmup, overrides)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
