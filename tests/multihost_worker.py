"""One process of a real multi-process run on this machine (used by tests/test_multihost.py).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT SPEC_JSON

Starts ``jax.distributed`` through ``ldm_jax.distributed.maybe_initialize`` on a 127.0.0.1
coordinator with 4 CPU devices per process (gloo collectives), runs ``train_and_evaluate``
of ``spec["trainer"]`` (``vae_gan``, default, on ``configs/vae_f8.py:tiny``, or ``ldm`` on
``configs/ldm_f8.py:tiny``) with the config overrides in the spec, and writes
``{"history", "batches", "process_index", "process_count", "device_count"}`` to
``<spec["out"]>.<process id>.json``. ``batches`` records, per training step, the stream
positions and an md5 of every image (or cached latent) this process fed to the step.
With ``spec["sample"] = {"num", "steps", "seed"}`` it then samples from the trained LDM
with ``ldm_jax.sampling.sample_images`` on all processes and process 0 saves the images
to ``<spec["out"]>.samples.npy``. With ``spec["tiled"]`` it decodes a seeded random latent
[3, 20, 14, 4] with ``ldm_jax.tiling.decode_tiled`` and a per-latent decoder (a fixed
4 -> 3 channel map, upsampled 2x), the tiles split over the global mesh, and process 0
saves the result to ``<spec["out"]>.tiled.npy``. With ``spec["evaluate"]`` (keyword
arguments of ``ldm_jax.evaluate.evaluate_autoencoder``) it evaluates the trained
autoencoder on all processes; process 0 writes the outputs and
``<spec["out"]>.evaluate.json``.
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
    from ldm_jax.trainers import ldm, vae_gan

    batches = []
    next_batch = pipeline.TrainIterator.__next__

    def recording_next(self):
        positions = self.positions().tolist()
        batch = next_batch(self)
        key = "moments" if "moments" in batch else "image"
        batches.append({"positions": positions, "key": key,
                        "md5": [hashlib.md5(x.tobytes()).hexdigest() for x in batch[key]]})
        return batch

    pipeline.TrainIterator.__next__ = recording_next

    trainer = spec.get("trainer", "vae_gan")
    config_file = {"vae_gan": "configs/vae_f8.py:tiny", "ldm": "configs/ldm_f8.py:tiny"}[trainer]
    config = config_lib.load_config(os.path.join(REPO, config_file))
    config_lib.set_fields(config, spec["overrides"])
    result = {"vae_gan": vae_gan, "ldm": ldm}[trainer].train_and_evaluate(config, spec["workdir"])
    if spec.get("sample"):
        import numpy as np

        from ldm_jax.sampling import sample_images

        images, _, _ = sample_images(spec["workdir"], **spec["sample"])
        if jax.process_index() == 0:
            np.save(f"{spec['out']}.samples.npy", images)
    if spec.get("tiled"):
        import jax.numpy as jnp
        import numpy as np

        from ldm_jax import sharding, tiling

        z = np.random.default_rng(0).normal(size=(3, 20, 14, 4)).astype(np.float32)
        w = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
        dec = jax.jit(lambda t: jnp.repeat(jnp.repeat(jnp.einsum("bhwc,cd->bhwd", t, w), 2, 1), 2, 2))
        mesh = sharding.make_mesh(dict(data=-1, fsdp=1))
        tiled = tiling.decode_tiled(dec, z, factor=2, tile=8, overlap=2, tiles_per_call=3,
                                    sharding=sharding.batch_sharding(mesh))
        if jax.process_index() == 0:
            np.save(f"{spec['out']}.tiled.npy", tiled)
    if spec.get("evaluate"):
        from ldm_jax import evaluate

        r = evaluate.evaluate_autoencoder(spec["workdir"], **spec["evaluate"])
        if jax.process_index() == 0:
            with open(f"{spec['out']}.evaluate.json", "w") as f:
                json.dump(r, f)
    out = dict(history={str(k): v for k, v in result["history"].items()}, batches=batches,
               process_index=jax.process_index(), process_count=jax.process_count(),
               device_count=jax.device_count(), final_step=result["final_step"])
    with open(f"{spec['out']}.{pid}.json", "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
