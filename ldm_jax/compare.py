"""Latent vs pixel diffusion for the same budget: throughput, memory and sample quality.

  python -m ldm_jax.compare --autoencoder_path=workdirs/vae_f8 --steps=20000 \
      [--latent_config=configs/ldm_f8.py] [--pixel_config=configs/pixel.py] \
      [--set global_batch_size=64 ...] [--num_samples=1000 --sample_batch=64] \
      [--workdir=workdirs/compare] \
      [--out=docs/latent_vs_pixel.md]

Trains the same U-Net (same width, depth, attention factors, optimiser, batch and step
budget) once on the autoencoder's latents and once on pixels, each in its own workdir
(re-running resumes; a finished run reports the training figures it recorded), then
samples ``--num_samples`` images from each with the config's sampler and scores them
against the held-out images (``ldm_jax.evaluate_generation``: FID,
Inception Score, precision / recall; the reference statistics computed once for both).
Writes a markdown table: training images/s and step time (from the trainers' progress
log), peak device memory, sampling images/s, and the sample-quality metrics. Without the
FID Inception weights, ``--random_inception`` scores with a randomly initialised Inception
(clearly labelled; only for smoke runs). The runs write no sample grids of their own
(``num_image_samples=0``; ``--set num_image_samples=16`` turns them back on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _peak_memory() -> int | None:
    import jax

    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return (stats or {}).get("peak_bytes_in_use")


TRAIN_RECORD = "compare_train.json"  # per run workdir: the training figures of the report


def run_one(name: str, config_spec: str, workdir: str, steps: int, overrides: dict,
            autoencoder_path: str) -> dict:
    """Train (or resume, or find finished) one run; its row's training figures. A re-run
    that trains no further reports the figures recorded by the invocation that trained
    (``TRAIN_RECORD``); one that resumes a partial run reports those of the steps it ran."""
    import jax

    from ldm_jax import config_lib
    from ldm_jax.trainers import ldm
    from ldm_jax.weights_cache import save_json_atomic

    config = config_lib.load_config(config_spec)
    config.num_train_steps = steps
    if config.space == "latent":
        config.autoencoder_path = autoencoder_path
    config_lib.set_fields(config, overrides, parse=True)
    t0 = time.perf_counter()
    result = ldm.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - t0
    if int(result["final_step"]) < steps:  # stopped by SIGTERM / Ctrl-C: a report would mislead
        raise SystemExit(f"the {name} run stopped at step {result['final_step']} of {steps} (its "
                         "checkpoint is saved); run the same command again to resume it and finish "
                         "the comparison")
    hist = result["history"]
    record = os.path.join(workdir, TRAIN_RECORD)
    if hist:  # this invocation trained: its figures, kept for re-runs that only re-score
        ips = [m["images_per_sec"] for s, m in sorted(hist.items()) if m.get("images_per_sec", 0) > 0]
        ips = ips[1:] or ips  # the first interval includes compilation
        train = dict(train_images_per_s=statistics.median(ips) if ips else None, train_wall_s=wall,
                     peak_memory_bytes=_peak_memory(), final_loss=hist[max(hist)]["loss"],
                     trained_steps=[int(result["start_step"]) + 1, int(max(hist))])
        if jax.process_index() == 0:
            save_json_atomic(train, record)
    elif os.path.isfile(record):  # finished earlier: the figures of the run that trained
        with open(record) as f:
            train = json.load(f)
    else:
        train = dict(train_images_per_s=None, train_wall_s=wall, peak_memory_bytes=_peak_memory(),
                     final_loss=None, trained_steps=None)
    tr = ldm.load_trained(workdir)
    n_params = sum(x.size for x in jax.tree.leaves(tr.params))
    return dict(name=name, config=config_spec, space=config.space, workdir=workdir,
                input_shape=list(tr.latent_shape), params=int(n_params), steps=int(tr.step),
                batch=int(config.global_batch_size), **train)


def sample_and_score(row: dict, num: int, num_reference: int, inception_weights: str | None,
                     seed: int, cache_dir: str, batch_size: int = 64) -> None:
    """Samples of the run scored against its held-out data (``ldm_jax.evaluate_generation``:
    FID, sFID, Inception Score, precision / recall); both runs share the reference statistics."""
    from ldm_jax.evaluate_generation import evaluate_generation

    m = evaluate_generation(row["workdir"], "eval", num_samples=num, batch_size=batch_size, seed=seed,
                            num_reference=num_reference, inception_weights=inception_weights,
                            is_splits=min(10, max(1, num // 500)), pr_num=min(10_000, num), fid_method="eigh",
                            out_dir=os.path.join(row["workdir"], "eval", "compare"),
                            cache_dir=cache_dir)
    row.update(fid=m["fid"], sfid=m["sfid"], inception_score=m["inception_score"], precision=m["precision"],
               recall=m["recall"], num_samples=m["num_samples"], num_reference=m["num_reference"],
               sample_images_per_s=m["images_per_s"], sample_wall_s=m["wall_s"],
               sampler=m["sampler"], eval_warnings=m["warnings"])


def markdown(rows: list[dict], meta: dict) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "# Latent vs pixel diffusion, same U-Net and step budget",
        "",
        f"Generated by `python -m ldm_jax.compare` on {meta['date']} — device {meta['device']}, "
        f"jax {meta['jax']}. Budget: {meta['steps']} steps at global batch {meta['batch']}. "
        f"FID: {meta['num_samples']} samples vs {meta['num_reference']} held-out images"
        + (" with a RANDOMLY initialised Inception (smoke run: not a quality figure)"
           if meta["random_inception"] else " (FID Inception, pytorch-fid weights)") + ".",
        "",
        "| run | space | U-Net input | params | train img/s | train wall | peak memory | sampling img/s | FID | sFID | IS | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**30
        lines.append(
            f"| {r['name']} | {r['space']} | {'x'.join(map(str, r['input_shape']))} | "
            f"{r['params'] / 1e6:.1f}M | {fmt(r['train_images_per_s'], '.3g')} | {r['train_wall_s']:.0f} s | "
            f"{fmt(mem, '.2f')}{' GiB' if mem is not None else ''} | {fmt(r['sample_images_per_s'], '.3g')} | "
            f"{r['fid']:.2f} | {fmt(r.get('sfid'), '.2f')} | {fmt(r['inception_score'], '.2f')} | {fmt(r['precision'], '.3f')} | "
            f"{fmt(r['recall'], '.3f')} |")
    ratios = [f"{what} throughput ratio {rows[0]['name']}/{rows[1]['name']}: "
              f"{rows[0][key] / rows[1][key]:.2f}x."
              for what, key in (("Training", "train_images_per_s"), ("Sampling", "sample_images_per_s"))
              if len(rows) == 2 and rows[0].get(key) and rows[1].get(key)]
    if ratios:
        lines += ["", " ".join(ratios)]
    lines += ["", "Peak memory is the device's peak over the whole process (training, then sampling), "
                  "read after each run; on CPU it is not available. Sampling img/s covers sampling, "
                  "decoding and Inception features, after the first (compiling) batch "
                  f"({rows[0]['sampler']['name']}-{rows[0]['sampler']['steps']}, batch "
                  f"{rows[0]['sampler']['batch']}; n/a with a single batch). IS: Inception Score; "
                  "precision / recall: k-NN manifolds (k = 3) of Inception features "
                  "(`python -m ldm_jax.evaluate` on an LDM workdir)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autoencoder_path", required=True)
    p.add_argument("--latent_config", default="configs/ldm_f8.py")
    p.add_argument("--pixel_config", default="configs/pixel.py")
    p.add_argument("--steps", type=int, required=True, help="training steps for each run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for BOTH configs, e.g. --set global_batch_size=64")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--num_reference", type=int, default=1000, help="held-out images for FID")
    p.add_argument("--sample_batch", type=int, default=64,
                   help="sampling batch (global); sampling img/s needs >= 2 batches of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="workdirs/compare")
    p.add_argument("--out", default="latent_vs_pixel.md")
    p.add_argument("--inception_weights", default=None)
    p.add_argument("--random_inception", action="store_true",
                   help="score with a random Inception (smoke runs without the weights file)")
    a = p.parse_args(argv)

    import jax
    from flax import nnx

    from ldm_jax.convert.inception_weights import (InceptionWeightsMissingError, create_inception,
                                                   save_inception_npz)
    from ldm_jax.models.inception import FIDInceptionV3

    # The runs' own sample grids would add a sampler compile and a sampling pass to each
    # run's wall time; this command samples and scores on its own (``--set`` may turn them on).
    overrides = {"num_image_samples": "0", **dict(kv.split("=", 1) for kv in a.set)}
    inception_weights = a.inception_weights
    if a.random_inception:
        os.makedirs(a.workdir, exist_ok=True)
        inception_weights = save_inception_npz(FIDInceptionV3(rngs=nnx.Rngs(0)),
                                               os.path.join(a.workdir, "random_inception.npz"))
    else:  # fail before training when the weights are missing
        try:
            create_inception(inception_weights)
        except InceptionWeightsMissingError as e:
            raise InceptionWeightsMissingError(
                f"{e}\nFor a smoke run without them: --random_inception (a random Inception; its "
                "scores mean nothing).") from None

    rows = [run_one("latent", a.latent_config, os.path.join(a.workdir, "latent"), a.steps, overrides,
                    a.autoencoder_path),
            run_one("pixel", a.pixel_config, os.path.join(a.workdir, "pixel"), a.steps, overrides, "")]
    for r in rows:
        sample_and_score(r, a.num_samples, a.num_reference, inception_weights, a.seed,
                         os.path.join(a.workdir, "reference_stats"), a.sample_batch)
    meta = dict(date=time.strftime("%Y-%m-%d"), device=jax.devices()[0].device_kind, jax=jax.__version__,
                steps=a.steps, batch=rows[0]["batch"], num_samples=a.num_samples,
                num_reference=rows[0]["num_reference"], random_inception=a.random_inception)
    text = markdown(rows, meta)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(text)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
