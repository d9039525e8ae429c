"""Encoded-latent cache of the LDM trainer, one per workdir, shared by all processes.

``config.latent.cache`` encodes the training set once (center crop, plus its mirror image
when ``data.random_flip``) and trains from the stored posterior moments, so the encoder
does not run every epoch. Layout of ``workdir/latent_cache/``::

    part_<p>-of-<P>.moments.npy   float16 [n_p, h, w, 2C] posterior moments (memory-mapped)
    part_<p>-of-<P>.index.npz     "records" int64 [n_p] (global record ids), "labels" int32 [n_p]
    meta.json                     written last, by process 0: the cache is complete

Record ``r = v * m + i`` is view ``v`` (0: center crop, 1: mirror image) of training image
``i`` (listing order, the first ``m = min(len(train), latent.cache_max_images)``). Process
``p`` of the run that builds the cache encodes the images of its slices of the ordered
batches and writes part ``p``; every process of any later run reads every part (the
workdir is on a shared filesystem), so the cache and the training stream over it
(``data.create_record_iterator``) do not depend on the process count: a run restored on
another number of hosts continues the same stream from the same cache.

``meta.json`` records what the latents were made from (autoencoder checkpoint, data
source, resolution, views); a run whose config differs stops with a message instead of
training on latents of another model or dataset.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import data, sharding
from ldm_jax.trainers.common import log_once
from ldm_jax.weights_cache import save_json_atomic

log = logging.getLogger("ldm_jax")

VERSION = 1


def cache_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "latent_cache")


def fingerprint(config: ml_collections.ConfigDict, autoencoder: str) -> dict:
    """What the cached latents depend on (compared on every later run)."""
    source = data.sources.make_source(config.data, "train")
    return {"autoencoder": autoencoder, "data": source.uid,
            "num_images": min(len(source), int(config.latent.cache_max_images)),
            "resolution": int(config.image_resolution),
            "views": 2 if config.data.random_flip else 1,
            "resize_short_side": int(config.data.get("resize_short_side", 0))}


class LatentCache:
    """Random-access records ``{"moments": float32 [h, w, 2C], "label": int32}`` over all
    parts of a complete cache (memory-mapped; a process reads only what it asks for)."""

    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, "meta.json")) as f:
            self.meta = json.load(f)
        n = int(self.meta["num_records"])
        self._moments, part_of, records, labels = [], [], [], []
        for p, name in enumerate(self.meta["parts"]):
            base = os.path.join(directory, name)
            self._moments.append(np.load(base + ".moments.npy", mmap_mode="r"))
            with np.load(base + ".index.npz") as f:
                records.append(f["records"])
                labels.append(f["labels"])
            if len(records[-1]) != len(self._moments[-1]):
                raise ValueError(f"latent cache {base}: {len(records[-1])} record ids for "
                                 f"{len(self._moments[-1])} latents; delete {directory} to rebuild it")
            part_of.append(np.full(len(records[-1]), p, np.int32))
        rec = np.concatenate(records)
        if not np.array_equal(np.sort(rec), np.arange(n)):
            raise ValueError(f"latent cache {directory} does not hold each of its {n} records exactly "
                             "once; delete it to rebuild it")
        order = np.argsort(rec)  # record id -> (part, row)
        self._part = np.concatenate(part_of)[order]
        self._row = np.concatenate([np.arange(len(r)) for r in records])[order]
        self.labels = np.concatenate(labels)[order]
        self.uid = f"latent_cache:{self.meta['fingerprint']['data']}:{n}"

    def __len__(self) -> int:
        return len(self._part)

    def __getitem__(self, r: int) -> dict:
        r = int(r)
        m = self._moments[self._part[r]][self._row[r]]
        return {"moments": np.asarray(m, np.float32), "label": np.int32(self.labels[r])}

    def moments(self) -> np.ndarray:
        """All moments in record order (float16; loads the whole cache)."""
        return np.stack([np.asarray(self._moments[self._part[r]][self._row[r]]) for r in range(len(self))])


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check(meta: dict, want: dict, directory: str) -> None:
    if meta.get("version") != VERSION:
        raise ValueError(f"latent cache {directory} has format version {meta.get('version')}, "
                         f"this ldm_jax writes {VERSION}; delete the directory to rebuild it")
    diff = {k: (meta["fingerprint"].get(k), v) for k, v in want.items() if meta["fingerprint"].get(k) != v}
    if diff:
        lines = "; ".join(f"{k}: cached {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"latent cache {directory} was built from other inputs ({lines}). "
                         "Delete the directory to re-encode, or train in a new workdir.")


def open_or_build(config: ml_collections.ConfigDict, workdir: str, encode: Callable, ae_state: Any,
                  mesh, autoencoder: str) -> LatentCache:
    """The complete cache of ``workdir``; encoded first (by all processes) if there is none.

    ``encode(ae_state, images)`` -> posterior moments, jitted with batch-sharded output."""
    directory = cache_dir(workdir)
    want = fingerprint(config, autoencoder)
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            _check(json.load(f), want, directory)
        return LatentCache(directory)

    p, num_proc = jax.process_index(), jax.process_count()
    m, views = want["num_images"], want["views"]
    cfg = ml_collections.ConfigDict(dict(config.data.to_dict(), random_crop=False, random_flip=False))
    b = config.eval_batch_size
    lb = b // num_proc
    batch_sh = sharding.batch_sharding(mesh)
    batches = data.ordered_batches(cfg, split="train", resolution=config.image_resolution, batch_size=b,
                                   num_images=m, keep_remainder=True)
    moments, records, labels = [], [], []
    for k, batch in enumerate(batches):
        images, valid = batch["image"], batch["num_valid"]
        positions = k * b + p * lb + np.arange(valid)  # the leading `valid` entries are real
        for v in range(views):
            x = images if v == 0 else images[:, :, ::-1]
            gb = sharding.global_batch({"image": np.ascontiguousarray(x)}, batch_sh)
            out = encode(ae_state, gb["image"])
            shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
            local = np.concatenate([np.asarray(s.data) for s in shards])
            moments.append(local[:valid].astype(np.float16))
            records.append(v * m + positions)
            labels.append(batch["label"][:valid])
    os.makedirs(directory, exist_ok=True)
    name = f"part_{p}-of-{num_proc}"
    base = os.path.join(directory, name)
    mom = np.concatenate(moments)
    np.save(base + ".moments.tmp.npy", mom)
    np.savez(base + ".index.tmp.npz", records=np.concatenate(records).astype(np.int64),
             labels=np.concatenate(labels).astype(np.int32))
    os.replace(base + ".moments.tmp.npy", base + ".moments.npy")
    os.replace(base + ".index.tmp.npz", base + ".index.npz")
    _barrier("latent_cache_parts_written")
    parts = [f"part_{i}-of-{num_proc}" for i in range(num_proc)]
    if p == 0:
        keep = {os.path.join(directory, nm + ext) for nm in parts for ext in (".moments.npy", ".index.npz")}
        stale = [f for f in glob.glob(os.path.join(directory, "part_*")) + glob.glob(os.path.join(directory, "process_*.npz"))
                 if f not in keep]
        for f in stale:  # an interrupted build with another process count, or the old layout
            os.remove(f)
        meta = {"version": VERSION, "fingerprint": want, "num_records": m * views, "parts": parts,
                "shape": list(mom.shape[1:]), "dtype": "float16"}
        save_json_atomic(meta, meta_path)
    _barrier("latent_cache_meta_written")
    cache = LatentCache(directory)
    nbytes = int(np.prod(cache.meta["shape"])) * 2 * len(cache)
    log_once(f"latent cache: {len(cache)} latents of {m} images x {views} view(s) "
             f"({nbytes / 2**20:.1f} MiB, {num_proc} part(s)) -> {directory}")
    return cache
