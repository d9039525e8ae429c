"""grain pipelines: the infinite training stream and the fixed eval batches.

Training (``create_train_iterator``) is defined globally, independent of the process count:

  * the stream of record keys is a seeded shuffle of the whole training source, reshuffled
    every epoch: ``MapDataset.range(n).seed(s).shuffle().repeat(None)``; position ``g`` of the
    stream holds key ``order[g]`` (O(1) random access);
  * global batch ``k`` is positions ``[k*G, (k+1)*G)`` (``G = global_batch_size``);
  * process ``p`` of ``P`` takes positions ``[k*G + p*b, k*G + (p+1)*b)``, ``b = G // P``.

The global batches therefore depend only on (seed, source, G), never on P: a run with
2 processes and one with 1 process see the same examples in the same batches, with the
same crops and flips (the augmentation rng is seeded by the stream position). Per
process::

    MapDataset.range(2**63 - 1)                  # local element index j
      .map(_LocalToGlobal)                       # j -> stream position g (above)
      .map(DecodeAt(source, order))              # g -> key -> RGB image; an unreadable record
                                                 #   is replaced by the one at g+1, g+2, ...
      .map(AugmentAt)                            # crop/flip with rng(seed, g)
      .batch(b, drop_remainder=True)             # local batch k = elements [k*b, (k+1)*b)
      .to_iter_dataset(ReadOptions)              # thread pool over batches
      [.mp_prefetch(worker_count, prefetch)]     # grain worker processes
      .map(_Finalize)                            # main process: skip accounting, strip "_bad"

wrapped in a ``TrainIterator`` whose state is the number of stream elements consumed
(``{"consumed": k*G, ...}``), the same JSON in every process. ``get_state()/set_state()``
and ``grain.checkpoint.CheckpointSave/CheckpointRestore`` work as for any grain iterator;
restoring rebuilds the pipeline at that position (O(1), no replay), so a state saved by a
run with P processes (or another global batch size that divides the position) restores in
a run with Q processes. ``checkpointing.Checkpointer`` also keeps the state in the
checkpoint's ``meta``, because grain's per-process files are named ``process_i-of-P``.

Eval batches (``create_eval_batches``) follow the same layout without shuffling: global
batch ``k`` is images ``[k*B, (k+1)*B)`` of the first ``num_images`` in listing order,
process ``p`` takes its ``B // P`` slice, so the eval set and batches do not depend on P.
"""

from __future__ import annotations

import logging
import numbers
import sys
from typing import Any

import grain
import numpy as np
from absl import flags

from ldm_jax.data import sources as sources_lib
from ldm_jax.data import transforms as tf_lib

log = logging.getLogger("ldm_jax")

_SOURCES = ("embedded", "folder", "tfds")
# Threads decoding whole local batches in each (main or worker) process.
_READ_THREADS = 8


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


def _pipeline_seed(seed: int) -> int:
    """32-bit pipeline seed (shuffle and augmentation), the same in every process: the
    stream must not depend on the process count."""
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    ss = np.random.SeedSequence([int(seed) % 2**63])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


class _LocalToGlobal(grain.transforms.Map):
    """Local element index -> global stream position (see the module docstring)."""

    def __init__(self, start: int, global_batch: int, local_batch: int, process_index: int):
        self._start, self._g, self._b, self._p = int(start), int(global_batch), int(local_batch), int(process_index)

    def map(self, j) -> int:
        k, i = divmod(int(j), self._b)
        return self._start + k * self._g + self._p * self._b + i


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


class TrainIterator(grain.DatasetIterator):
    """Local batches of the global training stream; checkpointable across process counts.

    State (JSON): ``{"consumed": stream elements consumed by all processes together,
    "global_batch_size", "seed", "num_records", "source"}`` - identical in every process.
    ``set_state`` rebuilds the grain pipeline at ``consumed`` (lazily, on the next
    ``__next__``); no batches are replayed.
    """

    def __init__(self, build, *, global_batch_size: int, local_batch_size: int, process_index: int,
                 seed: int, num_records: int, source_uid: str):
        super().__init__()
        self._build = build
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = int(local_batch_size)
        self.process_index = int(process_index)
        self._seed, self._n, self._uid = int(seed), int(num_records), str(source_uid)
        self._consumed = 0
        self._inner = None

    @property
    def consumed(self) -> int:
        """Elements of the global stream consumed so far (all processes together)."""
        return self._consumed

    def positions(self) -> np.ndarray:
        """Stream positions of this process's next batch (before replacement of unreadable
        records)."""
        return self._consumed + self.process_index * self.local_batch_size + np.arange(self.local_batch_size)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._inner is None:
            self._inner = self._build(self._consumed)
        batch = next(self._inner)
        self._consumed += self.global_batch_size
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"consumed": self._consumed, "global_batch_size": self.global_batch_size,
                "seed": self._seed, "num_records": self._n, "source": self._uid}

    def set_state(self, state: dict[str, Any]) -> None:
        if "consumed" not in state:
            raise ValueError(
                f"data iterator state {state} comes from the per-process pipeline of older "
                "ldm_jax versions; the global stream cannot continue from it. Resume with the "
                "version that wrote the checkpoint, or start a new workdir.")
        consumed = int(state["consumed"])
        if int(state.get("seed", self._seed)) != self._seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self._seed}.")
        if int(state.get("num_records", self._n)) != self._n or state.get("source", self._uid) != self._uid:
            raise ValueError(
                f"data state was saved for {state.get('source')} with {state.get('num_records')} "
                f"records; this run reads {self._uid} with {self._n}. The stream would differ.")
        if consumed % self.global_batch_size:
            log.warning(
                "data state: %d elements consumed is not a multiple of the global batch size %d "
                "(it was saved with %s); batches now start mid-way through the saved ones.",
                consumed, self.global_batch_size, state.get("global_batch_size"))
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        self._consumed = consumed

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = self._build(self._consumed)
        self._inner.start_prefetch()

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        super().close()

    def __str__(self) -> str:
        return (f"TrainIterator(global_batch_size={self.global_batch_size}, "
                f"process={self.process_index}, consumed={self._consumed})")


def create_train_iterator(data_cfg, *, resolution: int, global_batch_size: int, seed: int) -> TrainIterator:
    """Infinite, shuffled (reshuffled each epoch) stream, this process's part of each batch.

    Yields ``{"image": np.ndarray float32 [b, resolution, resolution, 3] in [-1, 1],
    "label": int32 [b]}`` (class indices; zeros for unlabelled sources) with
    ``b = global_batch_size // jax.process_count()``: elements ``[p*b, (p+1)*b)`` of each
    global batch, which depends only on (seed, source, global_batch_size) - see the module
    docstring. The iterator supports ``get_state()``/``set_state()`` and
    ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``, across process counts.
    Corrupt files are skipped (see ``skipped_count()``) and replaced by the next readable
    record of the stream; a dataset smaller than one batch still yields full batches.
    """
    cfg = _validate(data_cfg, resolution)
    source = sources_lib.make_source(data_cfg, "train")

    def local_batches(positions, order, pseed: int, b: int):
        ds = positions.map(tf_lib.DecodeAt(source, order, resolution, cfg["resize"]))
        ds = ds.map(tf_lib.AugmentAt(resolution, cfg["random_crop"], cfg["random_flip"], pseed))
        # Batch before leaving MapDataset land: grain worker processes then take whole local
        # batches (worker w: batches w, w+W, ...), which keeps batch k = elements
        # [k*b, (k+1)*b) for any worker_count and makes a restart at `start` exact.
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                                  prefetch_buffer_size=max(_READ_THREADS, cfg["prefetch"])))
        if cfg["workers"] > 0:
            # grain's worker start-up reads absl flags; outside absl.app.run (notebooks,
            # pytest) they are unparsed, which would make it fail. Defaults are fine.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=cfg["workers"],
                                             per_worker_buffer_size=cfg["prefetch"]))
        return iter(ds.map(_Finalize(source)))

    return _global_stream(len(source), source.uid, global_batch_size, seed, local_batches)


def _global_stream(n: int, uid: str, global_batch_size: int, seed: int, local_batches) -> TrainIterator:
    """The process-count-independent stream over ``n`` records (module docstring): a seeded
    per-epoch shuffle ``order`` (position -> record) and this process's positions of every
    global batch. ``local_batches(positions, order, pseed, b)`` turns the ``MapDataset`` of
    positions, starting where the iterator (re)starts, into an iterator of local batches of
    ``b = global_batch_size / process_count`` elements."""
    b = _local_batch(global_batch_size, "global_batch_size")
    index, _ = _process_index_count()
    pseed = _pipeline_seed(seed)
    order = grain.MapDataset.range(n).seed(pseed).shuffle().repeat(None)

    def build(start: int):
        positions = grain.MapDataset.range(sys.maxsize).map(_LocalToGlobal(start, global_batch_size, b, index))
        return local_batches(positions, order, pseed, b)

    return TrainIterator(build, global_batch_size=global_batch_size, local_batch_size=b,
                         process_index=index, seed=pseed, num_records=n, source_uid=uid)


class _RecordAt(grain.transforms.Map):
    """Stream position -> the record of a random-access source at ``order[position]``."""

    def __init__(self, records, order):
        self._records, self._order = records, order

    def map(self, position) -> dict[str, Any]:
        return self._records[int(self._order[int(position)])]


def create_record_iterator(records, *, global_batch_size: int, seed: int, uid: str) -> TrainIterator:
    """The global training stream of ``create_train_iterator`` over ready-made records.

    ``records`` is any random-access source (``len``, ``records[i]`` -> dict of numpy
    arrays), e.g. a cache of encoded latents; ``uid`` names its content (checked on
    restore). Positions, shuffling and the per-process slices are exactly those of
    ``create_train_iterator`` (no decoding or augmentation), so the state restores onto any
    process count and this process only touches the records of its slice.
    """
    if len(records) == 0:
        raise ValueError(f"{uid}: no records to train on")

    def local_batches(positions, order, pseed: int, b: int):
        ds = positions.map(_RecordAt(records, order)).batch(b, drop_remainder=True)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

    return _global_stream(len(records), uid, global_batch_size, seed, local_batches)


def create_eval_batches(data_cfg, *, resolution: int, batch_size: int, num_images: int) -> list[dict]:
    """Deterministic held-out batches: center crop, no flip, no shuffle.

    Global batch ``k`` holds images ``[k*B, (k+1)*B)`` (``B = batch_size``) of the first
    ``m = min(num_images, len(eval split))`` eval images in listing order, ``max(1, m // B)``
    batches (remainder dropped; if ``m < B`` the images repeat cyclically to fill one batch).
    This process gets its slice ``[p*B/P, (p+1)*B/P)`` of each, so the evaluated images do not
    depend on ``jax.process_count()``. An unreadable image is replaced by the next readable
    one (cyclically).
    """
    return ordered_batches(data_cfg, split="eval", resolution=resolution, batch_size=batch_size,
                           num_images=num_images)


def ordered_batches(data_cfg, *, split: str, resolution: int, batch_size: int, num_images: int,
                    keep_remainder: bool = False) -> list[dict]:
    """Center-cropped batches of ``split`` in file order (see ``create_eval_batches``).

    ``keep_remainder``: ``ceil(m / B)`` global batches, the last one filled up by repeating
    images; each local batch then carries ``num_valid``, the number of its leading entries
    that are real positions ``< m`` (each of the ``m`` images is real in exactly one process)."""
    cfg = _validate(data_cfg, resolution)
    lb = _local_batch(batch_size, "eval batch_size")
    if not _is_int(num_images) or num_images <= 0:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}.")
    index, _ = _process_index_count()
    source = sources_lib.make_source(data_cfg, split)
    m = min(int(num_images), len(source))
    num_batches = max(1, -(-m // batch_size) if keep_remainder else m // batch_size)
    positions = np.concatenate([k * batch_size + index * lb + np.arange(lb) for k in range(num_batches)])

    keys = grain.MapDataset.range(m)  # position -> key, cyclic over the first m records
    ds = grain.MapDataset.source(positions)
    ds = ds.map(tf_lib.DecodeAt(source, keys, resolution, cfg["resize"], num_keys=m))
    ds = ds.map(tf_lib.CenterCrop(resolution))
    els = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=16)))
    out = []
    for k in range(num_batches):
        part = els[k * lb:(k + 1) * lb]
        b = {"image": np.stack([el["image"] for el in part]),
             "label": np.asarray([el["label"] for el in part], np.int32)}
        if keep_remainder:
            b["num_valid"] = int(np.sum(positions[k * lb:(k + 1) * lb] < m))
        out.append(b)
    return out


def class_names(data_cfg) -> tuple[str, ...]:
    """Class names of the training source (empty for unlabelled data)."""
    return tuple(sources_lib.make_source(data_cfg, "train").class_names)
