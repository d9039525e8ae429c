"""grain pipelines: the infinite sharded training iterator and the fixed eval batches.

Training (``create_train_iterator``), per JAX process::

    MapDataset.source(src)[shard]            # ShardByJaxProcess(drop_remainder=True) slice
      .seed(s).shuffle().repeat(None)        # global shuffle of the shard, new order each epoch
      .map(DecodeImage)                      # bytes -> RGB, resize; None (dropped) if corrupt
      .random_map(RandomCropFlip)            # per-record rng from grain: deterministic
      .to_iter_dataset(ReadOptions)          # thread pool; drops the None records
      .batch(b, drop_remainder=True)
      [.mp_prefetch(worker_count, prefetch)] # grain worker processes
      .map(_Finalize)                        # main process: skip accounting, strip "_bad"

The ``MapDataset`` API is used rather than ``DataLoader`` + ``IndexSampler`` because it
allows a stage after ``mp_prefetch`` that runs in the main process (``_Finalize``), which is
how skips detected in worker processes reach ``skipped_count()``. Sharding semantics are the
same as ``IndexSampler(shard_options=ShardByJaxProcess(drop_remainder=True))``: an even,
contiguous split of the record keys, one part per process. The returned iterator is a
``grain.DatasetIterator``: ``get_state()``/``set_state()`` and
``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` inside ``ocp.args.Composite``.
A restored state must be used with the same data config, global batch size, seed,
process count and worker_count.
"""

from __future__ import annotations

import numbers
from typing import Any

import grain
import numpy as np
from absl import flags

from ldm_jax.data import sources as sources_lib
from ldm_jax.data import transforms as tf_lib

_SOURCES = ("embedded", "folder", "tfds")


def skipped_count() -> int:
    """How many unreadable/corrupt files this process has skipped so far."""
    return tf_lib.skipped_count()


def skipped_files() -> list[str]:
    """Names of the unreadable/corrupt files this process has skipped so far."""
    return tf_lib.skipped_files()


def _process_index_count() -> tuple[int, int]:
    opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return opts.shard_index, opts.shard_count


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _validate(data_cfg, resolution: int) -> dict[str, Any]:
    """Checks the fields this module reads; returns them with defaults filled in."""
    source = data_cfg.get("source", None)
    if source not in _SOURCES:
        raise ValueError(
            f"Unknown data_cfg.source={source!r}; expected one of {', '.join(map(repr, _SOURCES))}."
        )
    if not _is_int(resolution) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}.")
    resize = data_cfg.get("resize_short_side", 0)
    if not _is_int(resize) or resize < -1:
        raise ValueError(
            "data_cfg.resize_short_side must be an int: 0 (resize the shorter side to the "
            "model resolution), -1 (never resize; crop directly) or a positive size, got "
            f"{resize!r}."
        )
    if resize > 0 and resize < resolution:
        raise ValueError(
            f"data_cfg.resize_short_side={resize} is smaller than the crop resolution "
            f"{resolution}; use >= {resolution}, or 0 to resize to the resolution."
        )
    workers = data_cfg.get("worker_count", 0)
    if not _is_int(workers) or workers < 0:
        raise ValueError(f"data_cfg.worker_count must be an int >= 0 (0 = in-process), got {workers!r}.")
    prefetch = data_cfg.get("prefetch", 2)
    if not _is_int(prefetch) or prefetch < 1:
        raise ValueError(f"data_cfg.prefetch must be an int >= 1 (batches per worker), got {prefetch!r}.")
    flags = {}
    for name, default in (("random_crop", True), ("random_flip", True)):
        v = data_cfg.get(name, default)
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"data_cfg.{name} must be a bool, got {v!r}.")
        flags[name] = bool(v)
    return dict(source=source, resize=int(resize), workers=int(workers),
                prefetch=int(prefetch), **flags)


def _local_batch(batch_size: int, what: str) -> int:
    _, count = _process_index_count()
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"{what} must be a positive int, got {batch_size!r}.")
    if batch_size % count:
        raise ValueError(
            f"{what}={batch_size} is not divisible by jax.process_count()={count}; "
            f"use a multiple of {count}."
        )
    return batch_size // count


def _fold_seed(seed: int, process_index: int) -> int:
    """32-bit pipeline seed, distinct per process (so hosts do not draw identical crops)."""
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    ss = np.random.SeedSequence([int(seed) % 2**63, int(process_index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


class _Finalize(grain.transforms.Map):
    """Main-process stage after batching/mp_prefetch: registers skips reported by worker
    processes (once per file, with the reason found by re-reading it here) and removes the
    bookkeeping field."""

    def __init__(self, source):
        self._source = source

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bad = batch.pop("_bad")
        for key in np.unique(bad[bad >= 0]):
            name = self._source.describe(int(key))
            if not tf_lib.is_skipped(name):
                tf_lib.register_skip(name, self._reason(int(key)) + "; detected in a grain worker")
        return batch

    def _reason(self, key: int) -> str:
        rec = self._source[key]
        if rec["data"] is None:
            return rec["error"]
        try:
            tf_lib.decode_image(rec["data"])
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"
        return "unreadable"


def create_train_iterator(data_cfg, *, resolution: int, global_batch_size: int, seed: int):
    """Infinite, shuffled (reshuffled each epoch), per-process-sharded grain iterator.

    Yields ``{"image": np.ndarray float32 [b, resolution, resolution, 3] in [-1, 1],
    "label": int32 [b]}`` (class indices; zeros for unlabelled sources) with
    ``b = global_batch_size // jax.process_count()``. The iterator supports
    ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave`` /
    ``CheckpointRestore``. Corrupt files are skipped (see ``skipped_count()``); a dataset
    smaller than one batch still yields full batches (the data repeats).
    """
    cfg = _validate(data_cfg, resolution)
    b = _local_batch(global_batch_size, "global_batch_size")
    index, count = _process_index_count()
    pipeline_seed = _fold_seed(seed, index)

    source = sources_lib.make_source(data_cfg, "train")
    n = len(source)
    per = n // count
    if per == 0:
        raise ValueError(
            f"The training split of {source!r} has {n} images, fewer than "
            f"jax.process_count()={count}: every process needs at least one."
        )
    start, end = index * per, (index + 1) * per

    ds = grain.MapDataset.source(source)[start:end]
    ds = ds.seed(pipeline_seed).shuffle().repeat(None)
    ds = ds.map(tf_lib.DecodeImage(source, resolution, cfg["resize"], (start, end)))
    ds = ds.random_map(tf_lib.RandomCropFlip(resolution, cfg["random_crop"], cfg["random_flip"]))
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=16, prefetch_buffer_size=max(16, cfg["prefetch"] * b))
    )
    ds = ds.batch(b, drop_remainder=True)
    if cfg["workers"] > 0:
        # grain's worker start-up reads absl flags; outside absl.app.run (notebooks,
        # pytest) they are unparsed, which would make it fail. Defaults are fine.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg["workers"], per_worker_buffer_size=cfg["prefetch"]
            )
        )
    ds = ds.map(_Finalize(source))
    return iter(ds)


def create_eval_batches(data_cfg, *, resolution: int, batch_size: int, num_images: int) -> list[dict]:
    """Deterministic held-out batches: center crop, no flip, no shuffle.

    The first ``min(num_images, len(eval split))`` eval images are split evenly (contiguous,
    remainder dropped) over ``jax.process_count()`` processes; this process's part is grouped
    into batches of ``batch_size // process_count`` (last partial batch dropped). If the part
    is smaller than one batch, or corrupt files shrink it, images repeat cyclically so every
    process returns the same number of batches (at least one).
    """
    return ordered_batches(data_cfg, split="eval", resolution=resolution, batch_size=batch_size,
                           num_images=num_images)


def ordered_batches(data_cfg, *, split: str, resolution: int, batch_size: int, num_images: int,
                    keep_remainder: bool = False) -> list[dict]:
    """Center-cropped batches of ``split`` in file order (see ``create_eval_batches``).

    ``keep_remainder``: keep the last partial batch, filled up by repeating images; the
    number of real images of the process's part is then ``batches[-1]["num_valid"]``
    summed over batches (each batch carries ``num_valid``)."""
    cfg = _validate(data_cfg, resolution)
    lb = _local_batch(batch_size, "eval batch_size")
    if not _is_int(num_images) or num_images <= 0:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}.")
    index, count = _process_index_count()

    source = sources_lib.make_source(data_cfg, split)
    n = min(int(num_images), len(source))
    if n >= count:
        per = n // count
        start, end = index * per, (index + 1) * per
    else:  # fewer images than processes: each process takes one (shared) image
        start = index % n
        end = start + 1
    if keep_remainder:
        num_batches = max(1, -(-(end - start) // lb))
    else:
        num_batches = max(1, (end - start) // lb)

    ds = grain.MapDataset.source(source)[start:end]
    ds = ds.map(tf_lib.DecodeImage(source, resolution, cfg["resize"], (start, end)))
    ds = ds.map(tf_lib.CenterCrop(resolution))
    els = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=16)))
    images = [el["image"] for el in els]
    labels = [el["label"] for el in els]
    if not images:  # DecodeImage raises first; kept as a guard
        raise ValueError(f"No readable {split} images in {source!r} [{start}, {end}).")
    real = len(images)
    needed = num_batches * lb
    images = [images[i % len(images)] for i in range(needed)]
    labels = [labels[i % len(labels)] for i in range(needed)]
    out = []
    for i in range(num_batches):
        b = {"image": np.stack(images[i * lb:(i + 1) * lb]),
             "label": np.asarray(labels[i * lb:(i + 1) * lb], np.int32)}
        if keep_remainder:
            b["num_valid"] = int(min(lb, max(real - i * lb, 0)))
        out.append(b)
    return out


def class_names(data_cfg) -> tuple[str, ...]:
    """Class names of the training source (empty for unlabelled data)."""
    return tuple(sources_lib.make_source(data_cfg, "train").class_names)
