"""One process of a real multi-process run on this machine (used by tests/test_multihost.py).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT SPEC_JSON

Starts ``jax.distributed`` through ``ldm_jax.distributed.maybe_initialize`` on a 127.0.0.1
coordinator with 4 CPU devices per process (gloo collectives), runs the tiny VAE-GAN's
``train_and_evaluate`` with the config overrides in the spec, and writes
``{"history", "batches", "process_index", "process_count", "device_count"}`` to
``<spec["out"]>.<process id>.json``. ``batches`` records, per training step, the stream
positions and an md5 of every image this process fed to the step.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["LDM_JAX_OFFLINE"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402


def main() -> None:
    pid, nproc, port, spec = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    from ldm_jax import config_lib, distributed

    assert distributed.maybe_initialize(f"127.0.0.1:{port}", nproc, pid)
    jax.config.update("jax_threefry_partitionable", True)  # as tests/conftest.py
    if spec.get("cache"):
        jax.config.update("jax_compilation_cache_dir", spec["cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    logging.basicConfig(level=logging.WARNING)

    from ldm_jax.data import pipeline
    from ldm_jax.trainers import vae_gan

    batches = []
    next_batch = pipeline.TrainIterator.__next__

    def recording_next(self):
        positions = self.positions().tolist()
        batch = next_batch(self)
        batches.append({"positions": positions,
                        "md5": [hashlib.md5(x.tobytes()).hexdigest() for x in batch["image"]]})
        return batch

    pipeline.TrainIterator.__next__ = recording_next

    config = config_lib.load_config(os.path.join(REPO, "configs/vae_f8.py:tiny"))
    for key, value in spec["overrides"].items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    result = vae_gan.train_and_evaluate(config, spec["workdir"])
    out = dict(history={str(k): v for k, v in result["history"].items()}, batches=batches,
               process_index=jax.process_index(), process_count=jax.process_count(),
               device_count=jax.device_count(), final_step=result["final_step"])
    with open(f"{spec['out']}.{pid}.json", "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
