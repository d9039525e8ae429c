"""Sample images from a trained latent (or pixel) diffusion model.

  python sample.py --workdir=workdirs/ldm_f8 [--num=64] [--steps=50] [--sampler=ddim]
                   [--eta=0] [--cfg_scale=1.5] [--class=3 | --class=0,5,7] [--seed=0]
                   [--size=512] [--out=DIR] [--grid=64] [--pngs] [--compilation_cache_dir=DIR]

Uses the EMA weights of the workdir's latest checkpoint (``--noema`` for the raw ones),
batched over all devices. ``--size`` larger than the training resolution samples a larger
latent (the U-Net is convolutional) and decodes it with overlapping tiles
(``ldm_jax.tiling.decode_tiled``). Writes ``samples_<tag>.npz`` (``images``: uint8
[num, H, W, 3], ``labels``: int32 [num]), a PNG grid of the first ``--grid`` images,
``samples_<tag>.json`` (the checkpoint, sampler settings, size, decoding and scale factor
that made them), and with ``--pngs`` every image as ``samples_<tag>/<index>.png`` (the
folder layout FID tools such as pytorch-fid and clean-fid read). The tag names every
setting that changes the images (``ldm_jax.sampling.settings_tag``, e.g.
``00050000_ddim50_cfg3_c207-360_s1_n64``), so a sweep over guidance scales, classes or
sizes never overwrites earlier files. Images are written batch by batch, so
``--num=50000`` needs no more host memory than one batch; files appear complete or not
at all. Compiled programs go to JAX's persistent compilation cache
(``--compilation_cache_dir``), so the next run with the same shapes starts sampling at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

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
_TILE = flags.DEFINE_integer("tile_overlap", None, "Latent overlap of decoding tiles (with --size; default: a quarter of the tile, the training latent size).")
_OUT = flags.DEFINE_string("out", "", "Output directory (default: WORKDIR/samples).")
_NOEMA = flags.DEFINE_bool("noema", False, "Use the raw instead of the EMA weights.")
_GRID = flags.DEFINE_integer("grid", 64, "Images in the PNG grid (the first ones; 0: no grid).")
_PNGS = flags.DEFINE_bool("pngs", False, "Also write every image as its own PNG.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "JAX persistent compilation cache: a second run with the same shapes loads the sampler "
    "instead of compiling it (default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/ldm_jax/xla; '' : off).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _GRID.value < 0:
        raise app.UsageError(f"--grid must be >= 0, got {_GRID.value}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import jax
    import numpy as np

    import ldm_jax
    from ldm_jax import metric_writers as mw
    from ldm_jax.sampling import NpzStream, sample_stream
    from ldm_jax.trainers.common import cli_compilation_cache
    from ldm_jax.weights_cache import save_json_atomic

    ldm_jax.quiet_library_logs()
    cli_compilation_cache(_CACHE.value)

    try:
        tr, batches, info = sample_stream(
            _WORKDIR.value, num=_NUM.value, seed=_SEED.value, steps=_STEPS.value, sampler=_SAMPLER.value,
            eta=_ETA.value, cfg_scale=_CFG.value, classes=_CLASS.value, size=_SIZE.value,
            batch=_BATCH.value, tile_overlap=_TILE.value, use_ema=not _NOEMA.value)
    except (ValueError, FileNotFoundError) as e:  # a wrong workdir or setting: the message says which
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    is_main = jax.process_index() == 0  # every process samples; the first one writes
    out_dir = _OUT.value or os.path.join(_WORKDIR.value, "samples")
    tag = info["tag"]
    npz = os.path.join(out_dir, f"samples_{tag}.npz")
    png_dir = os.path.join(out_dir, f"samples_{tag}")
    if is_main:
        os.makedirs(png_dir if _PNGS.value else out_dir, exist_ok=True)
    grid, done = [], 0
    with NpzStream(npz, _NUM.value) if is_main else contextlib.nullcontext() as writer:
        for images, labels in batches:  # every process runs the sampler (collectives inside)
            if not is_main:
                continue
            writer.write(images, labels)
            if _PNGS.value:
                for j, im in enumerate(images):
                    mw.save_png(os.path.join(png_dir, f"{done + j:06d}.png"), im)
            grid.extend(images[:max(_GRID.value - len(grid), 0)])
            done += len(images)
            logging.info("%d / %d images", done, _NUM.value)
    if not is_main:
        return
    written = [npz]
    if grid:
        png = os.path.join(out_dir, f"samples_{tag}.png")
        mw.save_png(png, mw.square_grid(np.stack(grid)))
        written.append(png)
    if _PNGS.value:
        written.append(f"{png_dir}/ ({done} PNGs)")
    settings = os.path.join(out_dir, f"samples_{tag}.json")
    save_json_atomic({"workdir": os.path.abspath(_WORKDIR.value), **info}, settings)
    written.append(settings)
    logging.info("wrote %s (%d images of %s)", ", ".join(written), done, images.shape[1:])


if __name__ == "__main__":
    app.run(main)
