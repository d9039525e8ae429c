"""Sample images from a trained latent (or pixel) diffusion model.

  python sample.py --workdir=workdirs/ldm_f8 [--num=64] [--steps=50] [--sampler=ddim]
                   [--eta=0] [--cfg_scale=1.5] [--class=3 | --class=0,5,7] [--seed=0]
                   [--size=512] [--out=DIR]

Uses the EMA weights of the workdir's latest checkpoint (``--noema`` for the raw ones),
batched over all devices. ``--size`` larger than the training resolution samples a larger
latent (the U-Net is convolutional) and decodes it with overlapping tiles
(``ldm_jax.tiling.decode_tiled``). Writes ``samples_<step>_<sampler><steps>_s<seed>.png``
(a grid) and a ``.npz`` with the uint8 images and their labels.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "LDM training workdir.")
_NUM = flags.DEFINE_integer("num", 16, "Number of images.")
_BATCH = flags.DEFINE_integer("batch", 0, "Images per device call (0: num rounded up to the device count, at most 64).")
_STEPS = flags.DEFINE_integer("steps", 0, "Sampler steps (0: the config's sampling.num_steps).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm", "dpmpp_2m"], "Sampler (default: the config's).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: the config's).")
_CFG = flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (class-conditional models).")
_CLASS = flags.DEFINE_string("class", "", "Class index or comma-separated list (default: all classes in turn).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_SIZE = flags.DEFINE_integer("size", 0, "Image side in pixels (0: the training resolution).")
_TILE = flags.DEFINE_integer("tile_overlap", 8, "Latent overlap of decoding tiles (with --size).")
_OUT = flags.DEFINE_string("out", "", "Output directory (default: WORKDIR/samples).")
_NOEMA = flags.DEFINE_bool("noema", False, "Use the raw instead of the EMA weights.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import numpy as np

    from ldm_jax import metric_writers as mw

    from ldm_jax.sampling import sample_images

    try:
        images, labels, tr = sample_images(
            _WORKDIR.value, num=_NUM.value, seed=_SEED.value, steps=_STEPS.value, sampler=_SAMPLER.value,
            eta=_ETA.value, cfg_scale=_CFG.value, classes=_CLASS.value, size=_SIZE.value,
            batch=_BATCH.value, tile_overlap=_TILE.value, use_ema=not _NOEMA.value)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    out_dir = _OUT.value or os.path.join(_WORKDIR.value, "samples")
    os.makedirs(out_dir, exist_ok=True)
    s = tr.config.sampling
    tag = f"{tr.step:08d}_{_SAMPLER.value or s.sampler}{_STEPS.value or s.num_steps}_s{_SEED.value}"
    png = os.path.join(out_dir, f"samples_{tag}.png")
    mw.save_png(png, mw.square_grid(images))
    npz = os.path.join(out_dir, f"samples_{tag}.npz")
    np.savez(npz, images=images, labels=labels)
    logging.info("wrote %s and %s (%d images %s)", png, npz, len(images), images.shape[1:])


if __name__ == "__main__":
    app.run(main)
