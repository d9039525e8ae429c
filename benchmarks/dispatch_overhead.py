"""Host cost of one jitted train-step call, by train-state calling convention.

    python benchmarks/dispatch_overhead.py [--calls 50] [--out dispatch.json]

For the default full-size configs (the SD KL-f8 VAE-GAN and the 285.7M U-Net), builds the
train state's *structure* with tiny (2-element) arrays, so the device work is negligible,
and times a jitted step that adds 1 to every leaf (donated, outputs in place), called:

- ``tree``: with the train state itself (``nnx.State`` / ``nnx.Variable`` nodes), as the
  trainers did before ``trainers.common.FlatState``;
- ``flat``: as ``FlatState`` (one pytree node, the leaves as children), as the trainers
  and ``ldm_jax.bench`` call their steps now;
- ``dict``: the same leaves in plain nested dicts (reference: JAX's C++ pytree path).

Per convention: ``dispatch_ms`` (median time until a call returns: with asynchronous
dispatch, the host cost), ``sync_ms`` (median call + wait) and ``pipelined_ms`` (calls back
to back, one wait at the end, per call). All numbers are host work plus, on accelerators,
the launch of the tiny update; the real step's device time comes on top (synchronised
timings) or overlaps it (pipelined training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _structures():
    """{name: abstract train state} of the default bench workloads (nothing allocated)."""
    from ldm_jax import config_lib, sharding
    from ldm_jax.trainers import ldm, vae_gan

    mesh = sharding.make_mesh(dict(data=1, fsdp=1, num_devices=1))
    out = {}
    c = config_lib.load_config(os.path.join(REPO, "configs/vae_f8.py"))
    g, d = vae_gan.learning_rates(c)
    _, st, _ = vae_gan.create_train_state(c, mesh, vae_gan.make_optimizer(g, c),
                                          vae_gan.make_optimizer(d, c), abstract=True)
    out["vae_gan_step (configs/vae_f8.py)"] = st
    c = config_lib.load_config(os.path.join(REPO, "configs/ldm_f8.py"))
    tx, _ = ldm.make_optimizer(c)
    _, st, _ = ldm.create_train_state(c, mesh, tx, 4, 1.0, abstract=True)
    out["unet_step (configs/ldm_f8.py)"] = st
    return out


def _time_calls(fn, state, calls: int) -> dict:
    import jax

    for _ in range(3):
        state = fn(state)
    jax.block_until_ready(state)
    dispatch, sync = [], []
    for _ in range(calls):
        t = time.perf_counter()
        state = fn(state)
        dispatch.append(time.perf_counter() - t)
        jax.block_until_ready(state)
        sync.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(calls):
        state = fn(state)
    jax.block_until_ready(state)
    pipelined = (time.perf_counter() - t) / calls
    return {"dispatch_ms": 1e3 * statistics.median(dispatch), "sync_ms": 1e3 * statistics.median(sync),
            "pipelined_ms": 1e3 * pipelined}


def measure(calls: int = 50) -> dict:
    import jax
    import jax.numpy as jnp

    from ldm_jax.trainers.common import FlatState

    def tiny(abstract):
        return jax.tree.map(lambda s: jnp.zeros((2,), s.dtype), abstract)

    def add_one(tree):
        return jax.tree.map(lambda x: x + jnp.ones((), x.dtype), tree)

    results = {}
    for name, abstract in _structures().items():
        leaves = jax.tree.leaves(abstract)
        step = jax.jit(add_one, donate_argnums=0)
        flat = jax.jit(lambda f: FlatState.of(add_one(f.tree())), donate_argnums=0)
        as_dict = {f"leaf{i:05d}": x for i, x in enumerate(jax.tree.leaves(tiny(abstract)))}
        results[name] = {
            "leaves": len(leaves),
            "tree": _time_calls(step, tiny(abstract), calls),
            "flat": _time_calls(flat, FlatState.of(tiny(abstract)), calls),
            "dict": _time_calls(step, as_dict, calls),
        }
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "jax": jax.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "host_cpus": os.cpu_count(),
            "calls": calls, "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    r = measure(a.calls)
    text = json.dumps(r, indent=2)
    print(text)
    for name, v in r["results"].items():
        print(f"{name}: {v['leaves']} leaves; " + "; ".join(
            f"{k} dispatch {v[k]['dispatch_ms']:.2f} / sync {v[k]['sync_ms']:.2f} / pipelined "
            f"{v[k]['pipelined_ms']:.2f} ms" for k in ("tree", "flat", "dict")), file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
