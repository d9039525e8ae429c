"""Train a model from an ml_collections config.

  python train.py --config=configs/vae_f8.py[:tiny|:demo] [--workdir=DIR] [--config.key=value ...]
  python train.py --config=configs/ldm_f8.py --config.autoencoder_path=workdirs/vae_f8

Re-running with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: workdirs/<config name>).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs without a cluster environment "
    "(TPU pods, SLURM srun steps and Open MPI are detected automatically; see "
    "ldm_jax/distributed.py).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config"])


def _parse_flags(argv):
    """absl's flag parsing, with an unknown ``--config.KEY`` reported in one line (the
    closest keys, the keys that exist) instead of ml_collections' traceback."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        from ldm_jax import config_lib

        spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
        msg = None
        if spec:
            config = config_lib.load_config(spec)
            for a in argv[1:]:
                if a.startswith("--config.") and (msg := config_lib.unknown_key_message(
                        config, a[len("--config."):].split("=", 1)[0])):
                    msg = f"{a.split('=', 1)[0]}: {msg}"
                    break
        print(f"error: {msg or e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import jax

    import ldm_jax
    from ldm_jax import distributed

    ldm_jax.quiet_library_logs()
    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() != 0:  # one log for the whole job: other processes only warn/err
        logging.getLogger().setLevel(logging.WARNING)
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    if config.trainer == "vae_gan":
        from ldm_jax.trainers import vae_gan as trainer
    elif config.trainer == "ldm":
        from ldm_jax.trainers import ldm as trainer
    else:
        raise app.UsageError(f"unknown trainer {config.trainer!r} in config (known: vae_gan, ldm)")
    if jax.process_index() == 0:
        logging.info("workdir: %s", os.path.abspath(workdir))
    trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
