"""Sampling from a trained LDM workdir (the library side of ``sample.py``)."""

from __future__ import annotations

import math


def labels_for(spec: str, num: int, num_classes: int):
    import numpy as np

    if not num_classes:
        if spec:
            raise ValueError("--class given but the model is unconditional")
        return np.zeros((num,), np.int32)
    if spec:
        classes = [int(c) for c in spec.split(",")]
        bad = [c for c in classes if not 0 <= c <= num_classes]
        if bad:
            raise ValueError(f"--class {bad} out of range [0, {num_classes}] ({num_classes} = unconditional)")
    else:
        classes = list(range(num_classes))
    return np.asarray([classes[i % len(classes)] for i in range(num)], np.int32)


def sample_images(workdir: str, *, num: int, seed: int = 0, steps: int = 0, sampler: str | None = None,
                  eta: float | None = None, cfg_scale: float | None = None, classes: str = "",
                  size: int = 0, batch: int = 0, tile_overlap: int = 8, use_ema: bool = True):
    """Returns ``(uint8 images [num, H, W, 3], labels [num], trained)``."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ldm_jax import metric_writers as mw
    from ldm_jax import sharding, tiling
    from ldm_jax.trainers import ldm

    tr = ldm.load_trained(workdir, use_ema=use_ema)
    config = tr.config
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1))
    n_dev = mesh.size
    batch = batch or min(64, num)
    batch = -(-batch // n_dev) * n_dev
    h, w, c = tr.latent_shape
    f = tr.ae_factor
    if size:
        if size % f:
            raise ValueError(f"--size={size} must be a multiple of the autoencoder factor {f}")
        h = w = size // f
    tiled = config.space == "latent" and (h, w) != tuple(tr.latent_shape[:2])
    sched = ldm.make_schedule(config)
    fn = ldm.make_sample_fn(tr.models, config, sched, (batch, h, w, c), sampler=sampler,
                            num_steps=steps or None, eta=eta, cfg_scale=cfg_scale,
                            decode_images=not tiled)
    batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    sample_fn = jax.jit(fn, out_shardings=batch_sh)
    params, rest, ae_state = jax.device_put((tr.params, tr.rest, tr.ae_state), rep)
    labels = labels_for(classes, num, int(config.model.num_classes))
    decode_tile = None
    if tiled:
        th, tw = tr.latent_shape[:2]
        jitted = jax.jit(lambda st, z: ldm.decode(tr.models, config, st, z, 1.0))
        decode_tile = lambda z: jitted(ae_state, z)  # noqa: E731
    out = []
    for i in range(math.ceil(num / batch)):
        lab = labels[i * batch:(i + 1) * batch]
        lab = np.concatenate([lab, np.repeat(lab[-1:], batch - len(lab))]) if len(lab) < batch else lab
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        # Each process contributes its slice of the global label batch; results are gathered
        # on every process (one process: a plain device_put / device_get).
        b_local = batch // jax.process_count()
        p = jax.process_index()
        glab = sharding.global_batch({"label": lab[p * b_local:(p + 1) * b_local]}, batch_sh)["label"]
        res = sample_fn(params, rest, ae_state, key, glab, tr.scale_factor)
        res = np.asarray(multihost_utils.process_allgather(res, tiled=True))
        if tiled:
            res = tiling.decode_tiled(decode_tile, res / float(tr.scale_factor), factor=f, tile=th,
                                      overlap=min(tile_overlap, th - 1))
        out.append(mw.to_uint8(res))
    return np.concatenate(out)[:num], labels, tr
