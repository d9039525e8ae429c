"""Parity of our AutoencoderKL with diffusers' at the full SD KL-f8 size, on one device.

  python benchmarks/parity_sd_vae.py [--res 256] [--batch 4] [--out parity.json]

Builds a randomly initialised diffusers ``AutoencoderKL`` with the SD layout (with
GroupNorm affine parameters and biases perturbed so nothing is trivially zero), converts
it with ``ldm_jax.convert.autoencoder_weights``, and compares encoder moments, decoder
output and the full forward (posterior mode) on the same images, in fp32 (PyTorch with
TF32 off, JAX with highest matmul precision) and in bf16 compute (PyTorch autocast bf16
vs our dtype=bfloat16), each against the fp32 PyTorch reference. Needs torch + diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    from ldm_jax.convert import autoencoder_weights as aw

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tm = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.no_grad():
        for name, prm in tm.named_parameters():
            if "norm" in name and name.endswith("weight"):
                prm.add_(0.1 * torch.randn_like(prm))
            elif name.endswith("bias"):
                prm.add_(0.02 * torch.randn_like(prm))
    tm = tm.to(dev).eval()
    sd = {k: v.detach().cpu().numpy() for k, v in tm.state_dict().items()}
    cfg = aw.infer_config(sd, "diffusers", resolution=a.res)
    params = aw.torch_state_dict_to_params(sd, cfg, "diffusers")

    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 0.5, (a.batch, a.res, a.res, 3)), -1, 1).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(dev)

    def torch_run(autocast: bool):
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            post = tm.encode(xt).latent_dist
            mean, logvar = post.mean.float(), post.logvar.float()
            dec = tm.decode(mean).sample.float()
        to = lambda t: t.permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
        return dict(mean=to(mean), logvar=to(logvar), decode=to(dec), forward=to(dec))

    ref = torch_run(False)
    z_ref = jnp.asarray(ref["mean"])
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "torch": torch.__version__,
               "diffusers": diffusers.__version__, "res": a.res, "batch": a.batch}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        with jax.default_matmul_precision("highest" if name == "fp32" else "default"):
            m = aw.make_autoencoder(cfg, params, dtype=dtype)
            from flax import nnx

            gd, st = nnx.split(m)
            enc = jax.jit(lambda s, v: nnx.merge(gd, s).encode_moments(v))
            dec = jax.jit(lambda s, z: nnx.merge(gd, s).decode(z))
            moments = np.asarray(enc(st, jnp.asarray(x)), np.float32)
            mean, logvar = np.split(moments, 2, axis=-1)
            ours = dict(mean=mean, logvar=np.clip(logvar, -30, 20),
                        decode=np.asarray(dec(st, z_ref), np.float32),
                        forward=np.asarray(dec(st, jnp.asarray(mean)), np.float32))
        r = {}
        for k in ("mean", "logvar", "decode", "forward"):
            err = np.abs(ours[k] - ref[k])
            r[k] = dict(max_abs=float(err.max()), mean_abs=float(err.mean()),
                        ref_max_abs=float(np.abs(ref[k]).max()))
        results[f"jax_{name}_vs_torch_fp32"] = r
    tb = torch_run(True)
    results["torch_bf16_autocast_vs_torch_fp32"] = {
        k: dict(max_abs=float(np.abs(tb[k] - ref[k]).max()), mean_abs=float(np.abs(tb[k] - ref[k]).mean()))
        for k in ("mean", "logvar", "decode", "forward")}
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
