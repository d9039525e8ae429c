"""Orbax checkpoints of the whole training state plus the grain iterator position.

Layout: ``workdir/checkpoints/<step>/{state,data,meta}``. ``state`` is the train-state
pytree (models, optimizer states, step, RNG), ``data`` the grain iterator state (one file
per process, ``process_<i>-of-<P>.json``), ``meta`` a small JSON record (config name,
step, wall time, and ``data_state``: the iterator state again when it does not depend on
the process, as for ``data.TrainIterator``). Orbax writes into a temporary directory and
renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.

Every process takes part in ``save`` and ``restore`` (orbax coordinates them; arrays are
written shard by shard by the processes that hold them). Restores are onto the abstract
target's shardings, i.e. onto the mesh of the run that restores, whatever mesh shape or
process count wrote the checkpoint. The data iterator is restored from its own file when
the checkpoint was written with the current process count, else from ``meta["data_state"]``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from ldm_jax import config_lib
from ldm_jax.data.pipeline import TrainIterator
from ldm_jax.models import layers

log = logging.getLogger("ldm_jax")

# Orbax saves a replicated array "replica-parallel" (its default except on GPU): each
# replica writes a slice along a divisible axis, taken on its device by one eager slice
# op. For the hundreds of small arrays of a train state (biases, norm scales and their
# Adam moments) that is replicas x arrays dispatches, each new shape compiled once, for
# slices of a few hundred bytes. Arrays whose per-replica slice would be smaller than
# this are written whole by their first replica; large replicated arrays keep the
# parallel writes.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
    """Orbax's jax.Array handler with ``MIN_REPLICA_SLICE_BYTES`` (once per process; only
    the replica-parallel size floor differs from orbax's default handler)."""
    absl_log = logging.getLogger("absl")
    quiet = _DropMessage("Type handler registry type")  # the override is deliberate
    absl_log.addFilter(quiet)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
    finally:
        absl_log.removeFilter(quiet)


class _DropMessage(logging.Filter):
    """Drops log records whose format string starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class CheckpointMismatchError(config_lib.ConfigError):
    """A checkpoint whose arrays do not fit the train state of the run resuming from it
    (model or optimizer settings changed since it was written)."""


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 3, create: bool = True):
        _register_array_handler()
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict) -> None:
        """Save from every process (each writes its shards and its iterator file)."""
        meta = dict(meta, process_count=jax.process_count(), conv_layout=layers.CONV_LAYOUT)
        if _process_independent(data_iterator):
            meta["data_state"] = data_iterator.get_state()
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
                config: Any = None) -> tuple[Any, dict]:
        """Restore ``step`` onto ``abstract_state``'s shardings; resets ``data_iterator`` in place.

        Works across mesh shapes and process counts. The iterator comes from this process's
        grain file if the checkpoint has one for the current process count, otherwise from
        ``meta["data_state"]`` (process-independent iterators only).

        Before reading any array, the checkpoint's array shapes are compared with
        ``abstract_state``'s: if they differ (or arrays are missing or extra) it raises
        :class:`CheckpointMismatchError` naming them and, with ``config``, the settings
        changed since the checkpoint (``meta["config"]``, recorded by the trainers); a
        restore that fits logs the changed settings, if any, in one line."""
        step = int(step)
        meta = self.meta(step)  # first: it says which kernel layout the state has
        hwio = meta.get("conv_layout", "HWIO") != layers.CONV_LAYOUT
        target = _hwio_target(abstract_state) if hwio else abstract_state
        changes = (config_lib.config_changes(meta["config"], config)
                   if config is not None and isinstance(meta.get("config"), dict) else None)
        self._check_fits(step, target, changes)
        if changes and jax.process_index() == 0:
            log.warning("settings changed since checkpoint %d: %s", step, "; ".join(changes))
        items = dict(state=ocp.args.StandardRestore(target))
        from_file = data_iterator is not None and os.path.isfile(self._data_file(step))
        if from_file:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        if hwio:
            state = _kernels_from_hwio(state, abstract_state)
            if jax.process_index() == 0:
                log.warning("checkpoint %d has HWIO conv kernels (written before the OHWI "
                            "layout); transposed on load, the next save writes OHWI", step)
        if data_iterator is not None and not from_file:
            saved_by = meta.get("process_count", "?")
            if "data_state" in meta and _process_independent(data_iterator):
                data_iterator.set_state(meta["data_state"])
                if jax.process_index() == 0:
                    log.warning("checkpoint %d was written by %s process(es), this run has %d: data "
                                "stream continues at element %d of the global stream",
                                step, saved_by, jax.process_count(), int(meta["data_state"]["consumed"]))
            else:
                raise ValueError(
                    f"checkpoint {step} in {self.directory} has no data iterator state for "
                    f"{jax.process_count()} process(es) (written by {saved_by}), and this data "
                    "iterator's state is per process; resume with the original process count.")
        return state, meta

    def _check_fits(self, step: int, target: Any, changes: list[str] | None) -> None:
        """Raise :class:`CheckpointMismatchError` unless checkpoint ``step`` holds an array of
        the same shape for every array of ``target`` and nothing else."""
        saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
        have, want = array_shapes(getattr(saved, "tree", saved)), array_shapes(target)
        # (model parameters first, then optimizer moments and EMA copies of them)
        order = lambda k: ("opt" in k.split(".")[0] or k.startswith("ema"), k)  # noqa: E731
        differ, missing, extra = shape_differences(want, have, order)
        if not (differ or missing or extra):
            return

        def some(keys: list[str], fmt) -> str:
            shown = ", ".join(fmt(k) for k in keys[:3])
            return shown + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

        problems = []
        if differ:
            problems.append(f"{len(differ)} array(s) of another shape: " + some(
                differ, lambda k: f"{k} {have[k]} in the checkpoint, {want[k]} in this run"))
        if missing:
            problems.append(f"{len(missing)} array(s) of this run not in it: {some(missing, str)}")
        if extra:
            problems.append(f"{len(extra)} array(s) this run does not have: {some(extra, str)}")
        if changes is None:
            why = "the checkpoint does not record its settings"
        else:
            why = ("settings changed since it was written: " + "; ".join(changes) if changes
                   else "no setting changed, so the code that builds the model did")
        raise CheckpointMismatchError(
            f"checkpoint {step} in {self.directory} does not fit this run's train state ("
            + "; ".join(problems) + f"); {why}. Resume with the settings that wrote it, or "
            "start a new run in another --workdir.")

    def meta(self, step: int) -> dict:
        """The JSON metadata saved with ``step``."""
        return dict(self.manager.restore(int(step), args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])

    def _data_file(self, step: int) -> str:
        return os.path.join(self.directory, str(step), "data",
                            f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_meta(step_dir: str) -> dict:
    """The JSON metadata of a checkpoint step directory (``.../checkpoints/<step>``)."""
    step_dir = os.path.abspath(step_dir)
    ckpt = Checkpointer(os.path.dirname(os.path.dirname(step_dir)), create=False)
    try:
        return ckpt.meta(int(os.path.basename(step_dir)))
    except KeyError as e:
        raise ValueError(f"checkpoint {step_dir} has no metadata item ('meta'): it was not "
                         "written by the ldm_jax trainers") from e
    finally:
        ckpt.close()


def array_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"a.b.0.kernel": shape}`` for every array (or array metadata) leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value"):  # (NNX)
            tuple(int(d) for d in x.shape) for path, x in leaves if hasattr(x, "shape") and hasattr(x, "dtype")}


def shape_differences(want: dict[str, tuple], have: dict[str, tuple],
                      order: Any = None) -> tuple[list[str], list[str], list[str]]:
    """``(differ, missing, extra)``: the names of two :func:`array_shapes` maps whose shapes
    differ, those only in ``want`` and those only in ``have``, each sorted by ``order``
    (a sort key; default: by name). All three empty: the trees fit each other."""
    differ = sorted((k for k in have.keys() & want.keys() if have[k] != want[k]), key=order)
    return differ, sorted(want.keys() - have.keys(), key=order), sorted(have.keys() - want.keys(), key=order)


def _hwio_target(abstract_state: Any) -> Any:
    """``abstract_state`` with every conv kernel in the old HWIO shape (replicated)."""
    def one(path, x):
        if not layers.is_conv_kernel(path, x):
            return x
        o, kh, kw, i = x.shape
        sh = getattr(x, "sharding", None)
        rep = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec()) if hasattr(sh, "mesh") else sh
        return jax.ShapeDtypeStruct((kh, kw, i, o), x.dtype, sharding=rep)

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def _kernels_from_hwio(state: Any, abstract_state: Any) -> Any:
    """Restored HWIO kernels transposed to OHWI, on ``abstract_state``'s shardings."""
    def one(path, x, want):
        if not layers.is_conv_kernel(path, want):
            return x
        return jax.jit(layers.kernel_from_hwio, out_shardings=want.sharding)(x)

    return jax.tree_util.tree_map_with_path(one, state, abstract_state)


def _process_independent(data_iterator: Any) -> bool:
    """Whether the iterator's state means the same in every process and process count."""
    return isinstance(data_iterator, TrainIterator)


class PreemptionFlag:
    """Set by SIGTERM (TPU VM preemption, SLURM, ``kill``) or by a first Ctrl-C (SIGINT):
    the loop saves a checkpoint after the current step and exits cleanly. A second Ctrl-C
    raises ``KeyboardInterrupt`` at once (no save). ``reason`` names the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict = {}
        self.reason: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._event.is_set():
                raise KeyboardInterrupt
            log.warning("Ctrl-C: saving a checkpoint after this step and stopping "
                        "(Ctrl-C again stops at once, without saving)")
        else:
            log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.reason = self.reason or signal.Signals(signum).name
        self._event.set()

    def is_set(self) -> bool:
        """True if any process was asked to stop (agreed across hosts, so all save together)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(local).any())

    def should_stop(self, step: int, every: int) -> bool:
        """Whether the loop should save and stop after ``step``. One process checks its flag
        every step; with several processes the flags are agreed (a collective) only every
        ``every`` steps, so the check costs no host sync on the other steps and all
        processes stop at the same step."""
        if jax.process_count() > 1 and step % every:
            return False
        return self.is_set()

    def restore_handler(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
