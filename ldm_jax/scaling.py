"""Per-device memory of parameters + optimizer state under FSDP, and bytes communicated per step.

    python -m ldm_jax.scaling            # markdown tables for docs/scaling.md

Memory comes from the real train states: ``jax.eval_shape`` of each trainer's
``create_train_state`` (the SD KL-f8 VAE-GAN of ``configs/vae_f8.py``: autoencoder + LPIPS
log-variance, PatchGAN discriminator and its BatchNorm statistics, two Adam states; the
~270M U-Net of ``configs/ldm_f8.py``: parameters, AdamW moments, EMA), the shardings of
``sharding.state_shardings`` (the FSDP rule the trainers use) on meshes of 8, 16 and 64
devices, and each leaf's ``NamedSharding.shard_shape``. Run as a script it fakes 64 CPU
devices (``--xla_force_host_platform_device_count``) so the meshes are concrete device
meshes; imported elsewhere it uses ``jax.sharding.AbstractMesh`` when there are too few
devices (same shard shapes).

Communication is the standard volume per device per step for ring collectives on the
trainable parameters' fp32 gradients/weights (see docs/scaling.md for the formulas).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=64").strip()

import argparse  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AbstractMesh, Mesh  # noqa: E402

from ldm_jax import config_lib, sharding  # noqa: E402

GB = 1e9
DEVICE_COUNTS = (8, 16, 64)

# Groups of train-state fields: (label, fields).
VAE_GROUPS = (("params", ("gen_params", "disc_params", "disc_stats", "ae_rest")),
              ("optimizer", ("gen_opt", "disc_opt")),
              ("other", ("step", "rng", "nan_skips")))
UNET_GROUPS = (("params", ("params", "rest")), ("optimizer", ("opt",)), ("EMA", ("ema_params",)),
               ("other", ("step", "rng", "scale_factor", "nan_skips")))


def abstract_vae_state() -> tuple[dict, int]:
    """(abstract train state as a dict, trainable parameter count) of the SD KL-f8 VAE-GAN."""
    from ldm_jax.trainers import vae_gan

    c = config_lib.vae_base_config()
    mesh1 = sharding.make_mesh(dict(data=1, fsdp=1, num_devices=1))
    gen_lr, disc_lr = vae_gan.learning_rates(c)
    gen_tx, disc_tx = vae_gan.make_optimizer(gen_lr, c), vae_gan.make_optimizer(disc_lr, c)
    state = jax.eval_shape(lambda: vae_gan.create_train_state(c, mesh1, gen_tx, disc_tx)[1].as_dict())
    n = _count(state["gen_params"]) + _count(state["disc_params"])
    return state, n


def abstract_unet_state() -> tuple[dict, int]:
    """(abstract train state as a dict, trainable parameter count) of the configs/ldm_f8.py U-Net."""
    from ldm_jax.trainers import ldm

    c = config_lib.ldm_base_config()
    mesh1 = sharding.make_mesh(dict(data=1, fsdp=1, num_devices=1))
    tx, _ = ldm.make_optimizer(c)
    state = jax.eval_shape(lambda: ldm.create_train_state(c, mesh1, tx, 4, 0.18215)[1].as_dict())
    return state, _count(state["params"])


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def _bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def make_mesh(data: int, fsdp: int) -> Mesh | AbstractMesh:
    """A concrete (data, fsdp) mesh when there are enough devices, else an abstract one."""
    if jax.device_count() >= data * fsdp:
        return sharding.make_mesh(dict(data=data, fsdp=fsdp, num_devices=data * fsdp))
    return AbstractMesh((data, fsdp), sharding.MESH_AXES)


def per_device_bytes(state: dict, mesh, groups) -> dict[str, int]:
    """Bytes one device holds of each group of the state, from the FSDP rule's shard shapes
    (the largest over devices: shards are equal, or the array is replicated)."""
    shardings = sharding.state_shardings(state, mesh)
    out = {}
    for label, fields in groups:
        total = 0
        for f in fields:
            for x, s in zip(jax.tree.leaves(state[f]), jax.tree.leaves(shardings[f])):
                total += int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize
        out[label] = total
    out["total"] = sum(out.values())
    return out


def meshes(device_counts=DEVICE_COUNTS) -> list[tuple[int, int]]:
    """(data, fsdp) per device count: pure DP, fsdp=8 (one 8-GPU node), fsdp=n/2, full FSDP."""
    out = []
    for n in device_counts:
        for f in (1, 8, n // 2, n):
            if n % f == 0 and (n // f, f) not in out:
                out.append((n // f, f))
    return out


def memory_table(name: str, state: dict, groups, device_counts=DEVICE_COUNTS) -> str:
    labels = [g[0] for g in groups]
    full = {label: sum(_bytes(state[f]) for f in fields) for label, fields in groups}
    full_total = sum(full.values())
    head = "| mesh (data x fsdp) | " + " | ".join(labels) + " | total per device | / unsharded |"
    rows = [f"**{name}** — unsharded: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in full.items())
            + f", total {full_total / GB:.3f} GB", "", head, "|" + "---|" * (len(labels) + 3)]
    for d, f in meshes(device_counts):
        b = per_device_bytes(state, make_mesh(d, f), groups)
        rows.append(f"| {d} x {f} ({d * f} devices) | " + " | ".join(f"{b[k] / GB:.3f}" for k in labels)
                    + f" | **{b['total'] / GB:.3f} GB** | {b['total'] / full_total:.3f} |")
    return "\n".join(rows)


def comm_bytes(n_params: int, data: int, fsdp: int, bytes_per: int = 4) -> dict[str, float]:
    """Bytes each device sends (= receives) per step with ring collectives.

    DP: all-reduce of the gradients over ``data``: 2 (d-1)/d * G. FSDP over ``fsdp``:
    all-gather of the weights before use, (f-1)/f * W, once when XLA keeps the gathered
    weights for the backward pass, twice when it gathers again there (remat); reduce-scatter
    of the gradients, (f-1)/f * G; then the all-reduce over ``data`` is of a 1/f shard."""
    g = n_params * bytes_per
    d, f = data, fsdp
    ag = (f - 1) / f * g
    rs = (f - 1) / f * g
    ar = 2 * (d - 1) / d * g / f
    return {"all_gather": ag, "reduce_scatter": rs, "all_reduce": ar,
            "total_min": ag + rs + ar, "total_regather": 2 * ag + rs + ar}


def comm_table(models: list[tuple[str, int]], device_counts=DEVICE_COUNTS) -> str:
    rows = ["| model (trainable params) | mesh (data x fsdp) | all-gather W | reduce-scatter G "
            "| all-reduce G | total per device per step |", "|---|---|---|---|---|---|"]
    for name, n in models:
        for d, f in meshes(device_counts):
            c = comm_bytes(n, d, f)
            total = (f"{c['total_min'] / GB:.3f} GB" if f == 1 else
                     f"{c['total_min'] / GB:.3f}–{c['total_regather'] / GB:.3f} GB")
            rows.append(f"| {name} ({n / 1e6:.1f}M) | {d} x {f} | {c['all_gather'] / GB:.3f} GB "
                        f"| {c['reduce_scatter'] / GB:.3f} GB | {c['all_reduce'] / GB:.3f} GB | {total} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------
# Estimates from the H100 measurements in docs/benchmarks.md (jax 0.11.2, bf16 activations,
# fp32 parameters). These are linear fits of two or three measured points, not measurements.

VAE_MEASURED = {"batch8": 8.87, "batch16": 16.39, "batch8_remat": 4.79}  # GB peak, 256x256
UNET_MEASURED = {"batch64": 9.95}  # GB peak, 32x32x4 latents, 285.7M params
USABLE_GB = 76.0  # of the 80 GB H100 (79.6 GiB-ish visible, minus cuDNN/XLA workspace headroom)


def estimates(vae_state_gb: float, unet_state_gb: float, unet_params: int) -> dict[str, float]:
    """Linear memory models fitted to the measurements (all figures GB or images)."""
    per_img = (VAE_MEASURED["batch16"] - VAE_MEASURED["batch8"]) / 8
    fixed = VAE_MEASURED["batch8"] - 8 * per_img
    per_img_remat = (VAE_MEASURED["batch8_remat"] - fixed) / 8
    out = dict(vae_per_image=per_img, vae_fixed=fixed, vae_per_image_remat=per_img_remat,
               vae_max_batch=(USABLE_GB - fixed) / per_img,
               vae_max_batch_remat=(USABLE_GB - fixed) / per_img_remat,
               vae_state=vae_state_gb)
    # U-Net: fp32 params + grads + 2 AdamW moments + EMA = 20 bytes/param; the rest of the
    # measured peak is activations (+ workspace), taken as proportional to the batch.
    state20 = 20 * unet_params / GB
    act64 = UNET_MEASURED["batch64"] - state20
    out.update(unet_state=unet_state_gb, unet_state_with_grads=state20, unet_act_per_image=act64 / 64,
               unet_max_batch=(USABLE_GB - state20) / (act64 / 64))
    # Largest U-Net of this family at batch 64 (width x k: params x k^2, activations x k).
    p0 = unet_params / GB

    def k_max(bytes_per_param: float) -> float:
        a, b, c = bytes_per_param * p0, act64, -USABLE_GB
        return (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)

    for label, bpp in (("single", 20.0), ("fsdp8_gather_all", 20.0 / 8 + 4.0), ("fsdp8_layerwise", 20.0 / 8)):
        k = k_max(bpp)
        out[f"unet_max_params_{label}"] = k * k * unet_params
    return out


def estimates_text(e: dict[str, float]) -> str:
    b = lambda x: f"{x / 1e9:.1f}B"  # noqa: E731
    return "\n".join([
        f"- VAE-GAN (SD KL-f8, 256², bf16): fixed ≈ {e['vae_fixed']:.2f} GB + {e['vae_per_image']:.3f} GB/image "
        f"(fit of 8.87 GB @ 8, 16.39 GB @ 16); with remat ≈ {e['vae_per_image_remat']:.3f} GB/image "
        f"(4.79 GB @ 8, same fixed part assumed). Largest batch in {USABLE_GB:.0f} GB: "
        f"≈ {e['vae_max_batch']:.0f} without remat, ≈ {e['vae_max_batch_remat']:.0f} with remat. "
        f"Params + Adam states are {e['vae_state']:.2f} GB, so FSDP frees at most that much per GPU.",
        f"- U-Net (285.7M, 32×32×4 latents): params + grads + AdamW + EMA = "
        f"{e['unet_state_with_grads']:.2f} GB; the rest of the 9.95 GB @ 64 ≈ "
        f"{e['unet_act_per_image'] * 1000:.0f} MB/image. Largest batch ≈ {e['unet_max_batch']:.0f} without FSDP.",
        f"- Largest U-Net of this family (width scaled, batch 64 per GPU, no remat): "
        f"≈ {b(e['unet_max_params_single'])} params on one GPU; FSDP over 8 GPUs ≈ "
        f"{b(e['unet_max_params_fsdp8_gather_all'])} if XLA gathers all fp32 weights at once, "
        f"≈ {b(e['unet_max_params_fsdp8_layerwise'])} if it gathers layer by layer.",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default=",".join(map(str, DEVICE_COUNTS)),
                        help="comma-separated device counts (default 8,16,64)")
    args = parser.parse_args(argv)
    counts = tuple(int(x) for x in args.devices.split(","))
    vae, n_vae = abstract_vae_state()
    unet, n_unet = abstract_unet_state()
    kind = "concrete CPU device meshes" if jax.device_count() >= max(counts) else "abstract meshes"
    print(f"<!-- python -m ldm_jax.scaling: {kind}, jax {jax.__version__} -->\n")
    print("### Per-device memory of parameters and optimizer state (measured from shard shapes)\n")
    print(memory_table("SD KL-f8 VAE-GAN (configs/vae_f8.py)", vae, VAE_GROUPS, counts))
    print()
    print(memory_table("U-Net (configs/ldm_f8.py)", unet, UNET_GROUPS, counts))
    print("\n### Communication per step (computed from the parameter counts, fp32)\n")
    print(comm_table([("VAE-GAN ae+disc", n_vae), ("U-Net", n_unet)], counts))
    vae_gb = sum(_bytes(vae[f]) for f in ("gen_params", "disc_params", "disc_stats", "gen_opt", "disc_opt")) / GB
    unet_gb = sum(_bytes(unet[f]) for f in ("params", "ema_params", "opt")) / GB
    print("\n### Estimates for one 80 GB H100 (from the measurements; not measured)\n")
    print(estimates_text(estimates(vae_gb, unet_gb, n_unet)))


if __name__ == "__main__":
    main()
