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


def _fail(msg: str) -> None:
    """A user's mistake: one ``error:`` message on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, with config mistakes reported as one ``error:`` message and exit
    status 2 instead of a traceback: a missing config file, an unknown ``:variant``, a value
    of the wrong type, an unknown ``--config.KEY`` (with the closest keys and the keys that
    exist there)."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.trainer  # noqa: B018 (a config file that failed to load raises here)
        return rest
    except OSError as e:  # ml_collections' "Failed loading config file ...", with the path tried
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        _fail(f"--config: cannot load the config file ({lines[-1] if lines else e})")
    except flags.Error as e:  # a value of the wrong type, or get_config raised (e.g. an unknown :variant)
        msg = str(e)
        if "Traceback (most recent call last)" in msg:  # config_flags embeds get_config's traceback
            last = [ln for ln in msg.splitlines() if ln.strip()][-1]
            msg = f"{msg.splitlines()[0].rstrip(':')}: {last.split(': ', 1)[-1]}"
        _fail(msg)
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
        _fail(msg or str(e))


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
    from ldm_jax.config_lib import ConfigError
    from ldm_jax.convert.inception_weights import InceptionWeightsMissingError
    from ldm_jax.models.lpips import LPIPSWeightsMissingError
    from ldm_jax.pretrained import PretrainedError

    try:
        trainer.train_and_evaluate(config, workdir)
    except (ConfigError, LPIPSWeightsMissingError, InceptionWeightsMissingError, PretrainedError) as e:
        _fail(str(e))  # what to change is in the message; the traceback would only bury it


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
