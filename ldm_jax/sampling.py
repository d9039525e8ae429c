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


class BatchSampler:
    """Jitted sampling of fixed-size global batches from a trained LDM (``ldm.load_trained``),
    sharded over all devices (and processes).

    ``sampler(i, labels, seed)`` draws global batch ``i`` (its key is ``fold_in(seed, i)``)
    for ``labels`` (int [batch], the same on every process) and returns the batch-sharded
    global array: images in [-1, 1], or the latents when ``latent_hw`` differs from the
    training latent size (``self.tiled``: decode them with ``ldm_jax.tiling``).
    """

    def __init__(self, tr, *, batch: int, steps: int = 0, sampler: str | None = None,
                 eta: float | None = None, cfg_scale: float | None = None,
                 latent_hw: tuple[int, int] | None = None, mesh=None):
        import jax

        from ldm_jax import sharding
        from ldm_jax.trainers import ldm

        self.tr = tr
        config = tr.config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(dict(data=-1, fsdp=1))
        n_dev = self.mesh.size
        self.batch = -(-max(int(batch), 1) // n_dev) * n_dev
        if self.batch % jax.process_count():
            raise ValueError(f"batch {self.batch} is not divisible by the {jax.process_count()} processes")
        h, w = latent_hw or tuple(tr.latent_shape[:2])
        c = tr.latent_shape[2]
        self.tiled = config.space == "latent" and (h, w) != tuple(tr.latent_shape[:2])
        fn = ldm.make_sample_fn(tr.models, config, ldm.make_schedule(config), (self.batch, h, w, c),
                                sampler=sampler, num_steps=steps or None, eta=eta,
                                cfg_scale=cfg_scale, decode_images=not self.tiled)
        self.batch_sh, rep = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        self._fn = jax.jit(fn, out_shardings=self.batch_sh)
        self._state = jax.device_put((tr.params, tr.rest, tr.ae_state), rep)

    def __call__(self, i: int, labels, seed: int):
        import jax
        import numpy as np

        from ldm_jax import sharding

        labels = np.asarray(labels, np.int32)
        if labels.shape != (self.batch,):
            raise ValueError(f"labels must have shape ({self.batch},), got {labels.shape}")
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        # Each process contributes its slice of the global label batch.
        b_local = self.batch // jax.process_count()
        p = jax.process_index()
        glab = sharding.global_batch({"label": labels[p * b_local:(p + 1) * b_local]}, self.batch_sh)["label"]
        params, rest, ae_state = self._state
        return self._fn(params, rest, ae_state, key, glab, self.tr.scale_factor)


def padded_labels(labels, i: int, batch: int):
    """Labels of global batch ``i``; the last, partial batch repeats its last label."""
    import numpy as np

    lab = labels[i * batch:(i + 1) * batch]
    return np.concatenate([lab, np.repeat(lab[-1:], batch - len(lab))]) if len(lab) < batch else lab


def sample_images(workdir: str, *, num: int, seed: int = 0, steps: int = 0, sampler: str | None = None,
                  eta: float | None = None, cfg_scale: float | None = None, classes: str = "",
                  size: int = 0, batch: int = 0, tile_overlap: int = 8, use_ema: bool = True):
    """Returns ``(uint8 images [num, H, W, 3], labels [num], trained)``."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ldm_jax import metric_writers as mw
    from ldm_jax import tiling
    from ldm_jax.trainers import ldm

    tr = ldm.load_trained(workdir, use_ema=use_ema)
    config = tr.config
    f = tr.ae_factor
    hw = None
    if size:
        if size % f:
            raise ValueError(f"--size={size} must be a multiple of the autoencoder factor {f}")
        hw = (size // f, size // f)
    bs = BatchSampler(tr, batch=batch or min(64, num), steps=steps, sampler=sampler, eta=eta,
                      cfg_scale=cfg_scale, latent_hw=hw)
    labels = labels_for(classes, num, int(config.model.num_classes))
    decode_tile = None
    if bs.tiled:
        th = tr.latent_shape[0]
        jitted = jax.jit(lambda st, z: ldm.decode(tr.models, config, st, z, 1.0))
        decode_tile = lambda z: jitted(bs._state[2], z)  # noqa: E731
    out = []
    for i in range(math.ceil(num / bs.batch)):
        res = bs(i, padded_labels(labels, i, bs.batch), seed)
        # gathered on every process (one process: a plain device_get)
        res = np.asarray(multihost_utils.process_allgather(res, tiled=True))
        if bs.tiled:
            res = tiling.decode_tiled(decode_tile, res / float(tr.scale_factor), factor=f, tile=th,
                                      overlap=min(tile_overlap, th - 1))
        out.append(mw.to_uint8(res))
    return np.concatenate(out)[:num], labels, tr
