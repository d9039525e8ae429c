"""Orbax checkpoints of the whole training state plus the grain iterator position.

Layout: ``workdir/checkpoints/<step>/{state,data,meta}``. ``state`` is the train-state
pytree (models, optimizer states, step, RNG), ``data`` the per-process grain iterator
state, ``meta`` a small JSON record (config name, step, wall time). Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint intact. Restores are onto the abstract target's shardings, i.e. onto
the mesh of the run that restores.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger("ldm_jax")


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict) -> None:
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, dict]:
        """Restore ``step`` onto ``abstract_state``'s shardings; resets ``data_iterator`` in place."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (TPU VM preemption, SLURM, ``kill``); the loop saves and exits cleanly."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self._event.set()

    def is_set(self) -> bool:
        """True if any process was asked to stop (agreed across hosts, so all save together)."""
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(local).any())

    def restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
