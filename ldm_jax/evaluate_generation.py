"""Sample quality of a trained latent (or pixel) diffusion model: FID, sFID, Inception
Score, precision and recall of generated images against a reference set.

    python -m ldm_jax.evaluate --workdir=LDM_WORKDIR [--data=train|eval|SPEC] [--num_samples=50000]
        [--sampler=ddim --steps=50 --eta=0 --cfg_scale=1.5 --class=...] [--ref_stats=FILE]

(``ldm_jax.evaluate`` sends LDM workdirs here; autoencoders get reconstruction metrics.)

Samples are drawn with the EMA weights of the latest checkpoint (``--noema``: the raw
ones), in fixed global batches sharded over every device and process, with the config's
sampler unless overridden; class-conditional models cycle through all classes (balanced)
unless ``--class`` names some. Each batch goes straight from the sampler to the FID
Inception on the device (rounded to 8 bits first, as saved PNGs would be), and only its
pool3 features, logits and sFID spatial features come back, so 50k samples need no host
memory for images.

The reference set is ``--data``: ``train`` (default: the data the LDM was trained on,
training split), ``eval`` (its held-out split) or any spec of the autoencoder evaluation
(``embedded``, ``folder:/path[:eval|:all]``, ``tfds:name[:split]``), each image resized
(shorter side) and center-cropped to the sample resolution. Its statistics are cached in
``WORKDIR/eval/reference_stats`` (shared by evaluations with any sampler settings), or
``cache_dir`` (``reference_<key>.npz``: ``mu``, ``sigma``, the
spatial ``mu_s``, ``sigma_s`` and the features kept for precision / recall; the key covers
the data, resolution, image count and Inception weights), and ``--ref_stats FILE`` uses a
precomputed file instead (ours, pytorch-fid's ``mu`` / ``sigma`` npz, or an ADM reference
batch: ``mu_s`` / ``sigma_s`` too, and its images ``arr_0``, whose first ``--pr_num`` are
scored for precision / recall; without spatial statistics in it sFID is skipped, without
features or images precision / recall are).

Reported in ``metrics.json`` (output dir default ``WORKDIR/eval/samples_<data>_<tag>``,
or ``samples_<stats file name>_<tag>`` with ``--ref_stats``; the tag names the checkpoint
step and every sampler setting, ``ldm_jax.sampling.settings_tag``, so evaluations with
other settings, e.g. a guidance-scale sweep, keep their own results):
``fid``; ``sfid`` (the Fréchet distance of the 2023-d spatial features of
``FIDInceptionV3.features``, as in the ADM evaluator); ``inception_score`` and its std over
10 splits (``ldm_jax.gen_metrics``);
``precision`` / ``recall`` (k = 3) on the first ``--pr_num`` (10k) samples and reference
images; the sampler settings, checkpoint step, image counts, ``images_per_s`` (sampling,
decoding and Inception features together, after the first, compiling, batch), versions
and warnings (small-sample FID bias). ``samples.png`` shows the first samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ldm_jax import evaluate as ev
from ldm_jax import gen_metrics, sharding
from ldm_jax import metric_writers as mw
from ldm_jax.data import sources as sources_lib
from ldm_jax.fid import (FeatureStats, frechet_distance_or_eigh, load_spatial_stats, load_stats,
                         small_sample_warning, to_inception_input)
from ldm_jax.models.inception import FEATURE_DIM, SPATIAL_DIM
from ldm_jax.weights_cache import save_json_atomic, save_npz_atomic

log = logging.getLogger(__name__)

__all__ = ["evaluate_generation"]


def _inception_fns(inc_gd, mesh):
    """Jitted ``(state, images [-1, 1]) -> (pool3 [B, 2048], unbiased logits [B, 1008],
    spatial [B, 2023])``, batch-sharded in and out; the ``q8`` variant rounds the images to
    8 bits first."""
    batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def feats(st, x):
        inc = nnx.merge(inc_gd, st)
        f = inc.features(x)
        logits = jnp.dot(f["pool"], inc.fc.kernel[...].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        return f["pool"], logits, f["spatial"]

    kw = dict(in_shardings=(rep, batch_sh), out_shardings=(batch_sh, batch_sh, batch_sh))
    return jax.jit(feats, **kw), jax.jit(lambda st, x: feats(st, ev._q8(x)), **kw)


def _array_features(images: np.ndarray, n: int, batch: int, mesh, feat_fn, inc_st) -> np.ndarray:
    """pool3 features of the first ``n`` images of an NHWC array that every process holds
    (an ADM reference batch's ``arr_0``); each process scores its share, in global batches."""
    count, index = jax.process_count(), jax.process_index()
    per = math.ceil(n / count)
    keys = np.arange(min(index * per, n), min((index + 1) * per, n))
    lb = batch // count
    batch_sh = sharding.batch_sharding(mesh)
    rows = []
    for b in range(max(1, math.ceil(per / lb))):
        these = keys[b * lb:(b + 1) * lb]
        x = np.zeros((lb, *images.shape[1:]), np.float32)
        if len(these):
            x[:len(these)] = to_inception_input(images[these])
        pool, _, _ = ev._to_local(feat_fn(inc_st, sharding.global_batch({"image": x}, batch_sh)["image"]), mesh)
        rows.append(pool[:len(these)])
    return _gather_rows(rows, per, FEATURE_DIM)


def _fingerprint(inc) -> str:
    """Identifies the Inception weights (a digest of the fc layer and the first conv)."""
    h = hashlib.sha1()
    for w in (inc.fc.kernel[...], inc.Conv2d_1a_3x3.conv.kernel[...]):
        h.update(np.ascontiguousarray(np.asarray(w, np.float32)).tobytes())
    return h.hexdigest()[:16]


def _gather_rows(rows: list[np.ndarray], cap: int, dim: int) -> np.ndarray:
    """Concatenate every process's (at most ``cap``) feature rows, in process order."""
    local = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    local = local[:cap]
    buf = np.zeros((cap, dim), np.float32)
    buf[:len(local)] = local
    g = ev._allgather({"rows": buf, "n": np.asarray(len(local), np.int64)})
    return np.concatenate([g["rows"][p, :int(g["n"][p])] for p in range(g["n"].shape[0])])


# ----------------------------------------------------------------------------- reference


def _reference_source(data: str, tr, tfds_data_dir: str):
    """``(source, description, identity dict)`` of the reference images."""
    if data in ("train", "eval"):
        cfg = ml_collections.ConfigDict(tr.config.data.to_dict())
        if tfds_data_dir:
            cfg.tfds_data_dir = tfds_data_dir
        source = sources_lib.make_source(cfg, data)
        split = "training split" if data == "train" else "held-out split"
        desc = f"the LDM's {'training' if data == 'train' else 'held-out'} data ({cfg.source}, {split})"
        ident = {"data": data, "cfg": cfg.to_dict()}
        return source, desc, ident
    data_cfg, mode, desc = ev.parse_data_spec(data, tr.config.to_dict(), tfds_data_dir)
    return ev._open_source(data_cfg, mode), desc, {"data": data, "cfg": data_cfg.to_dict(), "mode": mode}


def _reference_pass(source, n: int, resolution: int, batch: int, mesh, feat_fn, inc_st,
                    pr_num: int) -> tuple[FeatureStats, FeatureStats, np.ndarray, list[int]]:
    """Statistics of ``n`` reference images (every process reads its share): of the pool3
    and of the spatial features, the pool3 features of (up to) ``pr_num`` of them for
    precision / recall, and the keys of this process's unreadable images."""
    count, index = jax.process_count(), jax.process_index()
    per = math.ceil(n / count)
    keys = range(min(index * per, n), min((index + 1) * per, n))
    lb = batch // count
    batch_sh = sharding.batch_sharding(mesh)
    reader = ev._Reader(source, keys, resolution, full_size=False)
    stats, stats_s, kept, n_kept, share = FeatureStats(), FeatureStats(), [], 0, math.ceil(pr_num / count)
    skipped: list[int] = []
    try:
        for these, x, valid in ev._read_batches(reader, keys, lb, max(1, math.ceil(per / lb)), resolution):
            skipped += [k for k, ok in zip(these, valid) if not ok]
            gx = sharding.global_batch({"image": x}, batch_sh)["image"]
            pool, _, spatial = ev._to_local(feat_fn(inc_st, gx), mesh)
            stats.update(pool[valid])
            stats_s.update(spatial[valid])
            if n_kept < share:
                kept.append(pool[valid][:share - n_kept])
                n_kept += len(kept[-1])
    finally:
        reader.close()
    stats, stats_s = ev._gather_stats(stats, pool.shape[1]), ev._gather_stats(stats_s, spatial.shape[1])
    return stats, stats_s, _gather_rows(kept, share, pool.shape[1]), skipped


# ----------------------------------------------------------------------------- main entry


def evaluate_generation(
    workdir: str,
    data: str = "train",
    *,
    num_samples: int = 50_000,
    batch_size: int = 64,
    seed: int = 0,
    steps: int = 0,
    sampler: str | None = None,
    eta: float | None = None,
    cfg_scale: float | None = None,
    classes: str = "",
    use_ema: bool = True,
    reference_stats: str | None = None,
    num_reference: int = 50_000,
    inception_weights: str | None = None,
    precision_recall: bool = True,
    pr_num: int = 10_000,
    pr_k: int = 3,
    is_splits: int = 10,
    num_grid: int = 64,
    out_dir: str | None = None,
    cache_dir: str | None = None,
    fid_method: str = "sqrtm",
    tfds_data_dir: str = "",
    mesh=None,
) -> dict:
    """Sample ``num_samples`` images from the LDM at ``workdir`` and score them against the
    reference ``data``; writes ``metrics.json`` and ``samples.png`` to ``out_dir`` and
    returns the metrics. See the module docstring."""
    from ldm_jax.convert.inception_weights import create_inception
    from ldm_jax.sampling import BatchSampler, labels_for, padded_labels, sampler_settings, settings_tag
    from ldm_jax.trainers import ldm

    t0 = time.time()
    if num_samples < 2 or batch_size < 1:
        raise ValueError(f"need num_samples >= 2 (FID needs a covariance) and batch_size >= 1, "
                         f"got {num_samples} and {batch_size}")
    if fid_method not in ("sqrtm", "eigh"):
        raise ValueError(f"fid_method must be 'sqrtm' or 'eigh', got {fid_method!r}")
    if is_splits < 1 or is_splits > num_samples:
        raise ValueError(f"is_splits must lie in [1, num_samples={num_samples}], got {is_splits}")
    if precision_recall and (pr_k < 1 or pr_num <= pr_k):
        raise ValueError(f"precision/recall need pr_k >= 1 and pr_num > pr_k, got {pr_k}, {pr_num}")
    is_main = jax.process_index() == 0
    warnings_out: list[str] = []

    # ---- model, Inception, reference (fail fast, before any sampling) ----------------------
    tr = ldm.load_trained(workdir, use_ema=use_ema)
    resolution = tr.latent_shape[0] * tr.ae_factor
    inc, inc_status = create_inception(inception_weights)
    log.info("%s", inc_status)
    if mesh is None:
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    want = min(batch_size, num_samples)  # fewer samples than a batch: no padding samples
    bs = BatchSampler(tr, batch=want, steps=steps, sampler=sampler, eta=eta,
                      cfg_scale=cfg_scale, mesh=mesh)
    if bs.batch != want:
        warnings_out.append(f"batch size {want} rounded up to {bs.batch} (a multiple of "
                            f"the {mesh.size} devices)")
    labels = labels_for(classes, num_samples, int(tr.config.model.num_classes))
    rep = sharding.replicated(mesh)
    inc_gd, inc_st = nnx.split(inc)
    inc_st = jax.device_put(inc_st, rep)
    feat_fn, feat_q8_fn = _inception_fns(inc_gd, mesh)
    # named after what the samples are scored against: the data, or the statistics file
    ref_name = (os.path.splitext(os.path.basename(reference_stats))[0] if reference_stats else data)
    tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in ref_name).strip("_") or "data"
    settings = settings_tag(tr, num=num_samples, seed=seed, steps=steps, sampler=sampler, eta=eta,
                            cfg_scale=cfg_scale, classes=classes, use_ema=use_ema)
    out_dir = out_dir or os.path.join(workdir, "eval", f"samples_{tag}_{settings}")
    os.makedirs(out_dir, exist_ok=True)

    ref_features = None
    if reference_stats:
        if not os.path.isfile(reference_stats):
            raise FileNotFoundError(f"--ref_stats {reference_stats} does not exist")
        mu_r, sigma_r = load_stats(reference_stats)
        ref_spatial = load_spatial_stats(reference_stats)
        for what, mu, dim in (("mu / sigma", mu_r, FEATURE_DIM),
                              ("mu_s / sigma_s", None if ref_spatial is None else ref_spatial[0], SPATIAL_DIM)):
            if mu is not None and mu.shape != (dim,):
                raise ValueError(f"--ref_stats {reference_stats}: {what} have {mu.shape[0]} dimensions, "
                                 f"expected {dim} (the FID Inception's pool3 and 17x17x7 mixed_6/conv "
                                 "features)")
        if ref_spatial is None:
            warnings_out.append("sFID skipped: the statistics file has no spatial statistics "
                                "(mu_s, sigma_s)")
        with np.load(reference_stats, allow_pickle=False) as z:
            n_ref = int(z["num_images"]) if "num_images" in z.files else None
            if "features" in z.files:
                ref_features = np.asarray(z["features"], np.float32)
            elif "arr_0" in z.files and precision_recall:  # an ADM reference batch's images
                imgs = z["arr_0"]
                if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != np.uint8 or len(imgs) < 2:
                    raise ValueError(f"--ref_stats {reference_stats}: arr_0 should hold uint8 NHWC RGB "
                                     f"images (an ADM reference batch), got {imgs.dtype} {imgs.shape}")
                n_pr_ref = min(pr_num, len(imgs))
                log.info("precision/recall reference: Inception features of %d images of arr_0", n_pr_ref)
                ref_features = _array_features(imgs, n_pr_ref, bs.batch, mesh, feat_fn, inc_st)
                del imgs
        ref_desc, ref_cache = f"precomputed statistics {os.path.abspath(reference_stats)}", None
    else:
        source, ref_desc, ident = _reference_source(data, tr, tfds_data_dir)
        n_ref = min(int(num_reference), len(source))
        if n_ref < 2:
            raise ValueError(f"the reference data ({ref_desc}) has {len(source)} images; FID needs >= 2")
        ident.update(resolution=resolution, num=n_ref, pr_num=pr_num if precision_recall else 0,
                     inception=_fingerprint(inc), spatial="mixed_6/conv:7")
        key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
        ref_cache = os.path.join(cache_dir or os.path.join(workdir, "eval", "reference_stats"),
                                 f"reference_{key}.npz")
        if os.path.isfile(ref_cache):
            mu_r, sigma_r = load_stats(ref_cache)
            ref_spatial = load_spatial_stats(ref_cache)
            with np.load(ref_cache, allow_pickle=False) as z:
                n_ref = int(z["num_images"])
                ref_features = np.asarray(z["features"], np.float32) if z["features"].size else None
            log.info("reference statistics from the cache %s (%d images)", ref_cache, n_ref)
        else:
            log.info("reference: %d images of %s at %dx%d", n_ref, ref_desc, resolution, resolution)
            stats, stats_s, ref_features, skipped = _reference_pass(
                source, n_ref, resolution, bs.batch, mesh, feat_fn, inc_st,
                pr_num if precision_recall else 0)
            if n_ref > stats.n:  # all processes' count; the names are this process's
                warnings_out.append(f"{n_ref - stats.n} unreadable reference images skipped: "
                                    f"{[source.describe(k) for k in skipped[:5]]}")
            n_ref = stats.n
            if n_ref < 2:
                raise ValueError(f"only {n_ref} readable reference images; FID needs >= 2")
            mu_r, sigma_r = stats.mean, stats.cov
            ref_spatial = stats_s.mean, stats_s.cov
            if is_main:
                save_npz_atomic(dict(mu=mu_r, sigma=sigma_r, num_images=np.asarray(n_ref),
                                 mu_s=ref_spatial[0], sigma_s=ref_spatial[1],
                                 features=(ref_features if ref_features is not None
                                           else np.zeros((0, mu_r.shape[0]), np.float32)),
                                 meta=np.asarray(json.dumps(ident, sort_keys=True, default=str))),
                                ref_cache)
    if precision_recall and (ref_features is None or len(ref_features) <= pr_k):
        warnings_out.append("precision/recall skipped: the reference statistics hold no features "
                            f"(or <= {pr_k})")
        precision_recall = False

    # ---- samples -------------------------------------------------------------------------
    count, index = jax.process_count(), jax.process_index()
    b_local = bs.batch // count
    num_batches = math.ceil(num_samples / bs.batch)
    is_acc = gen_metrics.InceptionScore(num_samples, is_splits)
    stats, stats_s, kept, grid = FeatureStats(), FeatureStats(), [], []
    t_first = None
    log.info("sampling %d images in %d batches of %d", num_samples, num_batches, bs.batch)
    for i in range(num_batches):
        images = bs(i, padded_labels(labels, i, bs.batch), seed)
        pool, logits, spatial = ev._to_local(feat_q8_fn(inc_st, images), mesh)
        idx = i * bs.batch + index * b_local + np.arange(b_local)
        valid = idx < num_samples
        stats.update(pool[valid])
        stats_s.update(spatial[valid])
        is_acc.update(logits[valid], idx[valid])
        if precision_recall:
            keep = valid & (idx < pr_num)
            if keep.any():
                kept.append(pool[keep])
        if sum(len(g) for g in grid) < num_grid:
            grid.append(mw.to_uint8(np.asarray(multihost_utils.process_allgather(images, tiled=True))))
        if i == 0:
            t_first = time.time()
        if is_main and (i + 1) % 10 == 0:
            log.info("  %d / %d batches", i + 1, num_batches)
    t_end = time.time()
    stats, stats_s = ev._gather_stats(stats, pool.shape[1]), ev._gather_stats(stats_s, spatial.shape[1])
    g = ev._allgather(is_acc.to_arrays())
    is_total = gen_metrics.InceptionScore(num_samples, is_splits)
    for p in range(g["count"].shape[0]):
        is_total.merge(gen_metrics.InceptionScore.from_arrays(
            num_samples, g["count"][p], g["sum_p"][p], g["sum_plogp"][p]))
    if stats.n != num_samples:  # guard: every sample exactly once
        raise RuntimeError(f"internal error: scored {stats.n} samples, expected {num_samples}")

    # ---- metrics -------------------------------------------------------------------------
    def distance(name, mu, sigma, mu_ref, sigma_ref):
        value, note = frechet_distance_or_eigh(mu, sigma, mu_ref, sigma_ref, fid_method, name)
        if note:
            warnings_out.append(note)
        return value

    fid_value = distance("FID", stats.mean, stats.cov, mu_r, sigma_r)
    sfid_value = None
    if ref_spatial is not None:
        sfid_value = distance("sFID", stats_s.mean, stats_s.cov, *ref_spatial)
    is_mean, is_std = is_total.result()
    for n_, what in ((num_samples, "samples"), (n_ref, "reference images")):
        note = small_sample_warning(n_) if n_ is not None else None
        if note:
            warnings_out.append(f"{what}: {note}")
    precision = recall = None
    n_pr_s = n_pr_r = 0
    if precision_recall:
        fake = _gather_rows(kept, min(pr_num, num_samples), pool.shape[1])
        real = ref_features[:pr_num]
        n_pr_s, n_pr_r = len(fake), len(real)
        if n_pr_s <= pr_k:
            warnings_out.append(f"precision/recall skipped: {n_pr_s} samples (need > {pr_k})")
        else:
            precision, recall = gen_metrics.precision_recall(real, fake, k=pr_k)
    result: dict[str, Any] = {
        "kind": "generation",
        "workdir": os.path.abspath(workdir),
        "checkpoint_step": int(tr.step),
        "weights": "ema" if use_ema else "raw",
        "space": tr.config.space,
        "resolution": int(resolution),
        "sampler": sampler_settings(tr, batch=bs.batch, seed=seed, steps=steps, sampler=sampler,
                                    eta=eta, cfg_scale=cfg_scale, classes=classes),
        "num_samples": int(num_samples),
        "reference": ref_desc,
        "num_reference": n_ref,
        "reference_cache": ref_cache,
        "fid": float(fid_value),
        "sfid": None if sfid_value is None else float(sfid_value),
        "fid_method": fid_method,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_splits": int(is_splits),
        "precision": precision,
        "recall": recall,
        "pr_k": int(pr_k) if precision_recall else None,
        "pr_num_samples": n_pr_s,
        "pr_num_reference": n_pr_r,
        "inception": inc_status,
        "images_per_s": ((num_samples - bs.batch) / (t_end - t_first)
                         if num_batches > 1 and t_end > t_first else None),
        "devices": int(mesh.size),
        "processes": int(count),
        "wall_s": time.time() - t0,
        "warnings": warnings_out,
        "versions": ev._versions(),
        "out_dir": os.path.abspath(out_dir),
    }
    if is_main:
        imgs = np.concatenate(grid)[:min(num_grid, num_samples)] if grid else ()
        if len(imgs):
            mw.save_png(os.path.join(out_dir, "samples.png"), mw.square_grid(imgs))
        save_json_atomic(ev._jsonable(result), os.path.join(out_dir, "metrics.json"))
    return result


def print_summary(r: dict) -> None:
    def f(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    print(f"{r['workdir']} step {r['checkpoint_step']} ({r['weights']} weights), "
          f"{r['sampler']['name']}-{r['sampler']['steps']}, {r['num_samples']} samples at "
          f"{r['resolution']}x{r['resolution']} vs {r['num_reference']} reference images "
          f"({r['reference']})")
    print(f"FID {f(r['fid'])}, sFID {f(r.get('sfid'))}, "
          f"IS {f(r['inception_score'])} ± {f(r['inception_score_std'])}, "
          f"precision {f(r['precision'])}, recall {f(r['recall'])}")
    for w in r["warnings"]:
        print(f"note: {w}")
    print(f"wrote {os.path.join(r['out_dir'], 'metrics.json')}")
