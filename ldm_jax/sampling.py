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
        try:
            classes = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(f"--class={spec!r}: give a class index or comma-separated indices, "
                             f"e.g. --class=0,3 (0..{num_classes - 1}; {num_classes} = unconditional)") from None
        bad = [c for c in classes if not 0 <= c <= num_classes]
        if bad:
            raise ValueError(f"--class {bad} out of range [0, {num_classes}] ({num_classes} = unconditional)")
    else:
        classes = list(range(num_classes))
    return np.asarray([classes[i % len(classes)] for i in range(num)], np.int32)


def settings_tag(tr, *, num: int, seed: int = 0, steps: int = 0, sampler: str | None = None,
                 eta: float | None = None, cfg_scale: float | None = None, classes: str = "",
                 size: int = 0, use_ema: bool = True) -> str:
    """A file-name tag of the settings that decide a set of samples from the trained LDM
    ``tr`` (``ldm.load_trained``), so that runs with other settings (a guidance-scale
    sweep, other classes, another size) never overwrite each other's files:
    ``<step>_<sampler><steps>[_eta<eta>][_cfg<scale>][_c<classes>][_<size>px][_raw]_s<seed>_n<num>``.
    Settings left unset resolve to the config's, so naming a default gives the same tag.
    ``eta`` appears for DDIM when it is not 0, the guidance scale for class-conditional
    models, the classes when given (joined by ``-``; a hash when that is long), the size
    when it is not the training resolution, ``raw`` without the EMA weights."""
    import hashlib

    r = sampler_settings(tr, batch=0, seed=seed, steps=steps, sampler=sampler, eta=eta,
                         cfg_scale=cfg_scale, classes=classes)
    parts = [f"{int(tr.step):08d}", f"{r['name']}{r['steps']}"]
    if r["name"] == "ddim" and r["eta"] != 0:
        parts.append(f"eta{r['eta']:g}")
    if r["cfg_scale"] is not None:  # class-conditional
        parts.append(f"cfg{r['cfg_scale']:g}")
        if classes:
            joined = "-".join(str(int(c)) for c in classes.split(","))
            parts.append("c" + (joined if len(joined) <= 24 else hashlib.sha1(joined.encode()).hexdigest()[:10]))
    if size and size != tr.latent_shape[0] * tr.ae_factor:
        parts.append(f"{int(size)}px")
    if not use_ema:
        parts.append("raw")
    parts += [f"s{r['seed']}", f"n{int(num)}"]
    return "_".join(parts)


def sampler_settings(tr, *, batch: int, seed: int = 0, steps: int = 0, sampler: str | None = None,
                     eta: float | None = None, cfg_scale: float | None = None, classes: str = "") -> dict:
    """The sampler settings resolved against ``tr``'s config, as recorded beside samples and
    in generation metrics: name, steps, eta, cfg_scale (None for unconditional models),
    classes, seed and the global batch (which does not change the images: each sample draws
    its noise from its own key, see :class:`BatchSampler`)."""
    s = tr.config.sampling
    conditional = int(tr.config.model.num_classes) > 0
    return {"name": sampler or s.sampler, "steps": int(steps or s.num_steps),
            "eta": float(s.eta if eta is None else eta),
            "cfg_scale": float(s.cfg_scale if cfg_scale is None else cfg_scale) if conditional else None,
            "classes": classes or ("all, in turn" if conditional else None),
            "seed": int(seed), "batch": int(batch)}


class BatchSampler:
    """Jitted sampling of fixed-size global batches from a trained LDM (``ldm.load_trained``),
    sharded over all devices (and processes).

    ``sampler(i, labels, seed)`` draws global batch ``i`` for ``labels`` (int [batch], the
    same on every process) and returns the batch-sharded global array: images in [-1, 1], or
    the latents when ``latent_hw`` differs from the training latent size (``self.tiled``:
    decode them with ``ldm_jax.tiling``). Sample ``n = i·batch + j`` draws all its noise
    from its own key ``fold_in(PRNGKey(seed), n)`` (:func:`sample_keys`), so the images of a
    seed do not depend on the batch size or the number of devices (up to the model's
    numerics), and the first ``k`` of ``num`` samples are those of ``num = k``.
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
        n, batch_sh = self.batch, self.batch_sh

        def fn_at(params, rest, ae_state, seed_key, start, labels, scale):
            keys = jax.lax.with_sharding_constraint(sample_keys(seed_key, start, n), batch_sh)
            return fn(params, rest, ae_state, keys, labels, scale)

        self._fn = jax.jit(fn_at, out_shardings=self.batch_sh)
        self._state = jax.device_put((tr.params, tr.rest, tr.ae_state), rep)

    def __call__(self, i: int, labels, seed: int):
        import jax
        import numpy as np

        from ldm_jax import sharding

        labels = np.asarray(labels, np.int32)
        if labels.shape != (self.batch,):
            raise ValueError(f"labels must have shape ({self.batch},), got {labels.shape}")
        # Each process contributes its slice of the global label batch.
        b_local = self.batch // jax.process_count()
        p = jax.process_index()
        glab = sharding.global_batch({"label": labels[p * b_local:(p + 1) * b_local]}, self.batch_sh)["label"]
        params, rest, ae_state = self._state
        return self._fn(params, rest, ae_state, jax.random.PRNGKey(seed), np.uint32(i * self.batch), glab,
                        self.tr.scale_factor)


def sample_keys(seed_key, start, n: int):
    """The keys of samples ``start .. start + n - 1``: ``fold_in(seed_key, index)``, [n, ...]."""
    import jax
    import jax.numpy as jnp

    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed_key, start + jnp.arange(n, dtype=jnp.uint32))


def padded_labels(labels, i: int, batch: int):
    """Labels of global batch ``i``; the last, partial batch repeats its last label."""
    import numpy as np

    lab = labels[i * batch:(i + 1) * batch]
    return np.concatenate([lab, np.repeat(lab[-1:], batch - len(lab))]) if len(lab) < batch else lab


def sample_stream(workdir: str, *, num: int, seed: int = 0, steps: int = 0, sampler: str | None = None,
                  eta: float | None = None, cfg_scale: float | None = None, classes: str = "",
                  size: int = 0, batch: int = 0, tile_overlap: int | None = None, use_ema: bool = True):
    """``(trained, batches, info)``: ``batches`` yields ``(uint8 images [n, H, W, 3], labels
    [n])`` global batch by global batch (on every process), ``num`` images in all, so any
    number of samples can be written out without holding them in host memory. Sample ``n``
    draws with ``fold_in(seed, n)``: the images depend neither on how they are consumed nor on
    the batch size or device count.
    ``info`` describes the samples: checkpoint step, weights, sampler settings
    (:func:`sampler_settings`), image size, decoding, scale factor and ``tag``
    (:func:`settings_tag`, for file names).

    A ``size`` other than the training resolution is decoded in tiles of the training
    latent size that overlap by ``tile_overlap`` latents (default: a quarter of a tile),
    four tiles per device per call, split over all devices."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from ldm_jax import metric_writers as mw
    from ldm_jax import tiling
    from ldm_jax.trainers import ldm

    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    tr = ldm.load_trained(workdir, use_ema=use_ema)
    config = tr.config
    T = int(config.diffusion.num_timesteps)
    if not 0 <= steps <= T:
        raise ValueError(f"--steps={steps} must be in [1, {T}] (0: the config's {config.sampling.num_steps})")
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
    th = tr.latent_shape[0]
    overlap = th // 4 if tile_overlap is None else int(tile_overlap)
    if bs.tiled:
        if not 0 <= overlap < th:
            raise ValueError(f"--tile_overlap must be in [0, {th}) (the decoding tile is the training "
                             f"latent size, {th}), got {tile_overlap}")
        jitted = jax.jit(lambda st, z: ldm.decode(tr.models, config, st, z, 1.0))
        decode_tile = lambda z: jitted(bs._state[2], z)  # noqa: E731

    def batches():
        for i in range(math.ceil(num / bs.batch)):
            res = bs(i, padded_labels(labels, i, bs.batch), seed)
            # gathered on every process (one process: a plain device_get)
            res = np.asarray(multihost_utils.process_allgather(res, tiled=True))
            if bs.tiled:
                res = tiling.decode_tiled(decode_tile, res / float(tr.scale_factor), factor=f, tile=th,
                                          overlap=overlap, tiles_per_call=4 * bs.mesh.size,
                                          sharding=bs.batch_sh)
            n = min(bs.batch, num - i * bs.batch)
            yield mw.to_uint8(res[:n]), labels[i * bs.batch:i * bs.batch + n]

    hw = hw or tuple(tr.latent_shape[:2])
    info = dict(
        checkpoint_step=int(tr.step), weights="ema" if use_ema else "raw",
        sampler=sampler_settings(tr, batch=bs.batch, seed=seed, steps=steps, sampler=sampler, eta=eta,
                                 cfg_scale=cfg_scale, classes=classes),
        num=int(num), image_size=[int(hw[0] * f), int(hw[1] * f)], space=config.space,
        decoding=(f"tiled: {th}x{th} latent tiles, overlap {overlap}" if bs.tiled
                  else "whole" if config.space == "latent" else None),
        scale_factor=float(tr.scale_factor),
        tag=settings_tag(tr, num=num, seed=seed, steps=steps, sampler=sampler, eta=eta,
                         cfg_scale=cfg_scale, classes=classes, size=size, use_ema=use_ema))
    return tr, batches(), info


def sample_images(workdir: str, **kwargs):
    """Returns ``(uint8 images [num, H, W, 3], labels [num], trained)`` (arguments as
    :func:`sample_stream`)."""
    import numpy as np

    tr, batches, _ = sample_stream(workdir, **kwargs)
    images, labels = zip(*batches)
    return np.concatenate(images), np.concatenate(labels), tr


class NpzStream:
    """Writes ``images`` (uint8 [num, H, W, C], the shape of the first batch) and ``labels``
    (int32 [num]) into an ``.npz`` (what ``np.load`` reads) batch by batch, so memory stays
    at one batch. The file appears under its name only when complete (written as
    ``path.tmp``, renamed by :meth:`close`)."""

    def __init__(self, path: str, num: int):
        import numpy as np

        self.path, self.num, self._tmp = path, int(num), path + ".tmp"
        self._labels = np.zeros((num,), np.int32)
        self._n = 0
        self._zip = self._member = self._shape = None

    def _open(self, image_shape: tuple[int, ...]) -> None:
        import zipfile

        import numpy as np

        self._shape = tuple(image_shape)
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("images.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self._member, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
            "shape": (self.num, *self._shape)})

    def write(self, images, labels) -> None:
        import numpy as np

        images = np.ascontiguousarray(images, np.uint8)
        if self._zip is None:
            self._open(images.shape[1:])
        if images.shape[1:] != self._shape or len(images) != len(labels):
            raise ValueError(f"batch of shape {images.shape} with {len(labels)} labels does not fit "
                             f"images {self._shape}")
        if self._n + len(images) > self.num:
            raise ValueError(f"more than the announced {self.num} images")
        self._member.write(images.tobytes())
        self._labels[self._n:self._n + len(images)] = labels
        self._n += len(images)

    def close(self) -> None:
        import os

        import numpy as np

        if self._n != self.num:
            self._abort()
            raise ValueError(f"wrote {self._n} of the announced {self.num} images; {self.path} not written")
        self._member.close()
        with self._zip.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, self._labels)
        self._zip.close()
        os.replace(self._tmp, self.path)

    def _abort(self) -> None:
        import os

        if self._zip is not None:
            self._member.close()
            self._zip.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> "NpzStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # a failed run leaves no partial file behind
            self._abort()
