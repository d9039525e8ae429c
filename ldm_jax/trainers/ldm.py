"""Latent diffusion trainer: a U-Net on the latents of a frozen autoencoder.

The autoencoder comes from ``config.autoencoder_path`` (a VAE-GAN workdir or a converted
pretrained directory) and is never trained; its parameters live beside the train state,
sharded by the same rule. Each step encodes the batch (or reads cached posterior moments),
samples z ~ q(z|x), scales it by ``scale_factor`` (fixed by config, or 1/std of the first
batch's latents, stored in the checkpoint), and takes one jitted, donated, sharded step of
the diffusion loss with an EMA of the U-Net weights. ``space="pixel"`` trains the same
U-Net on images (the baseline of the latent-vs-pixel comparison).

Checkpoints hold the U-Net parameters, EMA, optimizer state, step, RNG, scale factor and
the data iterator; a run restarted with the same workdir continues exactly.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.experimental import multihost_utils

from ldm_jax import checkpointing, config_lib, data, diffusion, pretrained, sampling, sharding
from ldm_jax import metric_writers as mw
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.models.layers import cast_to_compute_dtype
from ldm_jax.models.unet import UNet, UNetConfig
from ldm_jax.trainers import latent_cache
from ldm_jax.trainers.common import (FlatState, check_workdir, clip_by_global_norm, dtype, finite_and_norm,
                                     flat_step, init_sharded, log_once, lr_schedule, microbatch_mean, param_count,
                                     params_sharded, prepare_workdir, run_training_loop, tree_where,
                                     use_compilation_cache)


METRIC_NAMES = ("loss", "grad_norm", "lr", "ema_decay", "skipped")
TrainMetrics = clu_metrics.Collection.create(
    **{n: clu_metrics.Average.from_output(n) for n in METRIC_NAMES})


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any  # U-Net nnx.Param state
    rest: Any  # non-Param U-Net state (normally empty)
    ema_params: Any
    opt: Any
    rng: jax.Array
    scale_factor: jax.Array  # latent scale (1.0 in pixel space)
    nan_skips: jax.Array

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class Models(flax.struct.PyTreeNode):
    unet: Any = flax.struct.field(pytree_node=False)
    ae: Any = flax.struct.field(pytree_node=False)  # None in pixel space


# ----------------------------------------------------------------------------------------
# Models, schedule, optimizer
# ----------------------------------------------------------------------------------------


def unet_config(config: ml_collections.ConfigDict, channels: int) -> UNetConfig:
    m = config.model.to_dict()
    m["in_channels"] = channels if m["in_channels"] == -1 else m["in_channels"]
    m["out_channels"] = channels if m["out_channels"] == -1 else m["out_channels"]
    m["num_classes"] = m["num_classes"] or None
    return UNetConfig.from_dict(m)


def make_schedule(config: ml_collections.ConfigDict) -> diffusion.Schedule:
    d = config.diffusion
    return diffusion.Schedule.create(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
    o = config.optim
    lr = lr_schedule(o.lr, o, config.num_train_steps)
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(clip_by_global_norm(o.grad_clip_norm, sharded=params_sharded(config)))
    parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    return optax.chain(*parts), lr


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """LDM's LitEma: min(decay, (1 + n) / (10 + n)) with warmup, else the constant decay."""
    decay = jnp.float32(config.ema.decay)
    if config.ema.warmup:
        n = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return decay


def load_autoencoder(config: ml_collections.ConfigDict):
    """(graphdef, state, AutoencoderConfig, description) of the frozen autoencoder."""
    ae, cfg, where = pretrained.load_autoencoder(
        os.path.abspath(os.path.expanduser(config.autoencoder_path)), dtype=dtype(config.dtype),
        param_dtype=dtype(config.param_dtype))
    gd, state = nnx.split(ae)
    return gd, state, cfg, where


def latent_shape(config: ml_collections.ConfigDict, ae_cfg) -> tuple[int, int, int]:
    r = config.image_resolution
    if config.space == "pixel":
        return (r, r, 3)
    f = ae_cfg.downsample_factor
    if r % f:
        raise config_lib.ConfigError(f"image_resolution={r} is not divisible by the autoencoder's factor {f}")
    return (r // f, r // f, ae_cfg.embed_dim)


def encode(models: Models, ae_state: Any, images: jax.Array) -> jax.Array:
    """Posterior moments [B, h, w, 2C] of images (no gradient)."""
    ae = nnx.merge(models.ae, ae_state)
    return jax.lax.stop_gradient(ae.encode_moments(images))


def to_latent(models: Models, config, ae_state, batch: dict, key, scale, eps=None) -> jax.Array:
    """The diffusion model's data x0 for this batch (scaled latents, or pixels). A sampled
    posterior uses the standard normal ``eps`` of the latent shape when given, else draws
    it from ``key``."""
    if config.space == "pixel":
        return batch["image"].astype(jnp.float32)
    moments = batch["moments"] if "moments" in batch else encode(models, ae_state, batch["image"])
    post = DiagonalGaussian(moments)
    if not config.latent.sample_posterior:
        z = post.mode()
    else:
        z = post.reparameterize(eps) if eps is not None else post.sample(key)
    return z * scale


def decode(models: Models, config, ae_state, z: jax.Array, scale) -> jax.Array:
    if config.space == "pixel":
        return jnp.clip(z.astype(jnp.float32), -1.0, 1.0)
    ae = nnx.merge(models.ae, ae_state)
    return jnp.clip(ae.decode(z / scale).astype(jnp.float32), -1.0, 1.0)


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------


def data_shape(models: Models, config, ae_state, batch: dict) -> tuple[int, ...]:
    """Shape of the diffusion data x0 of ``batch`` (latents or pixels), without computing it."""
    if config.space == "pixel":
        return tuple(batch["image"].shape)
    if "moments" in batch:
        m = batch["moments"].shape
    else:
        m = jax.eval_shape(lambda st, x: encode(models, st, x), ae_state, batch["image"]).shape
    return (*m[:-1], m[-1] // 2)


def draw_batch_noise(models: Models, config, sched: diffusion.Schedule, ae_state, batch: dict,
                     keys) -> dict:
    """Every random draw of the training loss for the whole batch: posterior noise, ``t``,
    diffusion noise and the classifier-free-guidance label drop mask. Drawn before the
    batch is split into microbatches, so ``optim.grad_accum_steps`` does not change them
    (only U-Net dropout masks, drawn inside the network, differ)."""
    k_post, k_loss, _, k_lab = keys
    shape = data_shape(models, config, ae_state, batch)
    out = {}
    if config.space == "latent" and config.latent.sample_posterior:
        out["eps_post"] = jax.random.normal(k_post, shape, jnp.float32)
    out["t"], out["noise"] = diffusion.draw_t_noise(sched, k_loss, shape)
    if int(config.model.num_classes):
        out["drop"] = jax.random.bernoulli(k_lab, config.diffusion.label_dropout, (shape[0],))
    return out


def make_noised_loss_fn(models: Models, config: ml_collections.ConfigDict,
                        sched: diffusion.Schedule) -> Callable:
    """``(params, rest, ae_state, batch, scale, noise, dropout_key) -> loss`` with the
    draws of ``draw_batch_noise`` (for this batch or microbatch) in ``noise``."""
    d = config.diffusion
    num_classes = int(config.model.num_classes)
    use_dropout = config.model.dropout > 0

    def loss_fn(params, rest, ae_state, batch, scale, noise, k_drop):
        x0 = to_latent(models, config, ae_state, batch, None, scale, eps=noise.get("eps_post"))
        y = None
        if num_classes:
            y = jnp.where(noise["drop"], num_classes, batch["label"].astype(jnp.int32))
        unet = nnx.merge(models.unet, params, rest)
        fn = lambda xt, t: unet(xt, t, y, dropout_key=k_drop if use_dropout else None)  # noqa: E731
        loss, _ = diffusion.diffusion_loss(sched, fn, x0, None, prediction=d.prediction,
                                           min_snr_gamma=d.min_snr_gamma,
                                           t=noise["t"], noise=noise["noise"])
        return loss

    return loss_fn


def make_loss_fn(models: Models, config: ml_collections.ConfigDict, sched: diffusion.Schedule) -> Callable:
    """``(params, rest, ae_state, batch, scale, keys) -> loss``: the training loss of one
    batch, ``keys = (posterior, loss, dropout, label-dropout)`` PRNG keys."""
    noised = make_noised_loss_fn(models, config, sched)

    def loss_fn(params, rest, ae_state, batch, scale, keys):
        noise = draw_batch_noise(models, config, sched, ae_state, batch, keys)
        return noised(params, rest, ae_state, batch, scale, noise, keys[2])

    return loss_fn


def make_train_step(models: Models, config: ml_collections.ConfigDict, tx, lr_fn,
                    sched: diffusion.Schedule) -> Callable:
    """The pure step ``(state, ae_state, batch, metrics) -> (state, metrics)``. With
    ``optim.grad_accum_steps = k > 1`` the batch runs as ``k`` microbatches in one jitted
    step and their mean gradient is applied once (``common.microbatch_mean``)."""
    noised = make_noised_loss_fn(models, config, sched)
    n_micro = int(config.optim.grad_accum_steps)
    sharded = params_sharded(config)

    def step_fn(state: TrainState, ae_state: Any, batch: dict, acc: Any):
        rng, *keys = jax.random.split(state.rng, 5)
        noise = draw_batch_noise(models, config, sched, ae_state, batch, keys)
        k_drop = keys[2]

        def microbatch(mb, i, _):
            key = k_drop if n_micro == 1 else jax.random.fold_in(k_drop, i)
            loss, grads = jax.value_and_grad(noised)(state.params, state.rest, ae_state, mb["batch"],
                                                     state.scale_factor, mb["noise"], key)
            return (loss, grads), None

        (loss, grads), _ = microbatch_mean(microbatch, {"batch": batch, "noise": noise}, n_micro)
        updates, opt = tx.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(config, state.step)
        ema = jax.tree.map(lambda e, p: (decay * e.astype(jnp.float32)
                                         + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype),
                           state.ema_params, params)
        finite, gnorm = finite_and_norm(loss, grads, sharded=sharded)
        new = tree_where(finite, dict(params=params, opt=opt, ema_params=ema),
                         dict(params=state.params, opt=state.opt, ema_params=state.ema_params))
        new_state = state.replace(**new, step=state.step + 1, rng=rng,
                                  nan_skips=state.nan_skips + (~finite).astype(jnp.int32))
        out = dict(loss=loss, grad_norm=gnorm, lr=lr_fn(state.step), ema_decay=decay,
                   skipped=(~finite).astype(jnp.float32))
        out = {k: jnp.where(jnp.isfinite(v), v, 0.0).astype(jnp.float32) for k, v in out.items()}
        return new_state, acc.merge(TrainMetrics.single_from_model_output(**out))

    return step_fn


def make_eval_step(models: Models, config: ml_collections.ConfigDict, sched) -> Callable:
    """Validation loss with fixed noise/timesteps (comparable across evals)."""
    d = config.diffusion
    num_classes = int(config.model.num_classes)

    def eval_fn(params, rest, ae_state, batch, scale, key):
        k_post, k_loss = jax.random.split(key)
        x0 = to_latent(models, config, ae_state, batch, k_post, scale)
        y = batch["label"].astype(jnp.int32) if num_classes else None
        unet = nnx.merge(models.unet, params, rest)
        loss, _ = diffusion.diffusion_loss(sched, lambda xt, t: unet(xt, t, y), x0, k_loss,
                                           prediction=d.prediction, min_snr_gamma=d.min_snr_gamma)
        return loss

    return eval_fn


def make_sample_fn(models: Models, config: ml_collections.ConfigDict, sched, shape: tuple,
                   *, sampler: str | None = None, num_steps: int | None = None,
                   eta: float | None = None, cfg_scale: float | None = None,
                   decode_images: bool = True) -> Callable:
    """``(params, rest, ae_state, key, labels, scale) -> images in [-1, 1]`` (or latents).

    ``shape`` is the per-call latent batch shape [n, h, w, c]; labels [n] int (ignored for
    unconditional models; the null class means unconditional). Jit it (with shardings).
    """
    s, d = config.sampling, config.diffusion
    sampler = sampler or s.sampler
    num_steps = int(num_steps or s.num_steps)
    eta = float(s.eta if eta is None else eta)
    cfg_scale = float(s.cfg_scale if cfg_scale is None else cfg_scale)
    num_classes = int(config.model.num_classes)

    def sample_fn(params, rest, ae_state, key, labels, scale):
        # Converted to the compute dtype once, not at each of the sampler's steps.
        unet = cast_to_compute_dtype(nnx.merge(models.unet, params, rest))
        if num_classes:
            model_fn = diffusion.classifier_free_guidance(
                lambda x, t, y: unet(x, t, y), labels, num_classes, cfg_scale)
        else:
            model_fn = lambda x, t: unet(x, t)  # noqa: E731
        z = diffusion.sample(model_fn, sched, tuple(shape), key, sampler=sampler,
                             num_steps=num_steps, eta=eta, prediction=d.prediction)
        return decode(models, config, ae_state, z, scale) if decode_images else z

    return sample_fn


# ----------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------


def build_unet(config, channels: int, seed: int) -> UNet:
    return UNet(unet_config(config, channels), dtype=dtype(config.dtype),
                param_dtype=dtype(config.param_dtype), rngs=nnx.Rngs(params=seed))


def create_train_state(config, mesh, tx, channels: int, scale_factor: float, *, abstract: bool = False):
    """U-Net, EMA and optimizer state born sharded on ``mesh``; ``abstract``: only its
    shapes, dtypes and shardings (``jax.ShapeDtypeStruct``s, the target of a checkpoint
    restore), nothing compiled or computed. The scale factor is an argument of the init
    program, so one compiled init serves every scale."""

    graphdef = []

    def init(scale) -> TrainState:
        unet = build_unet(config, channels, config.seed)
        graphdef[:] = [nnx.graphdef(unet)]  # static: safe to keep from the trace
        _, params, rest = nnx.split(unet, nnx.Param, ...)
        return TrainState(
            step=jnp.int32(0), params=params, rest=rest,
            ema_params=jax.tree.map(lambda p: p, params), opt=tx.init(params),
            rng=jax.random.PRNGKey(config.seed + 1), scale_factor=scale, nan_skips=jnp.int32(0))

    state, shardings = init_sharded(init, jnp.float32(scale_factor), mesh=mesh, abstract=abstract)
    return graphdef[0], state, shardings


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) in ``workdir``; returns {"history", "eval", "start_step", "final_step"}."""
    # ---- setup ---------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate_ldm_config(config, num_devices=mesh.size)
    check_workdir(config, workdir)
    use_compilation_cache(config)
    batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    # ---- frozen autoencoder ----------------------------------------------------------------
    ae_gd = ae_state = ae_cfg = None
    if config.space == "latent":
        ae_gd, ae_state, ae_cfg, where = load_autoencoder(config)
        ae_state = jax.device_put(ae_state, sharding.state_shardings(ae_state, mesh))
        log_once(f"frozen autoencoder from {where}: {param_count(ae_state) / 1e6:.2f}M params, "
                 f"factor {ae_cfg.downsample_factor}, {ae_cfg.embed_dim} latent channels")
    shape = latent_shape(config, ae_cfg)
    sched = make_schedule(config)

    # ---- data ------------------------------------------------------------------------------
    num_classes = int(config.model.num_classes)
    if num_classes:
        names = data.class_names(config.data)
        if not names:
            raise config_lib.ConfigError(
                f"model.num_classes={num_classes} but the training data has no class labels (use a "
                "folder with one sub-folder per class, a tfds dataset with a label feature, or "
                "model.num_classes=0)")
        if len(names) > num_classes:
            raise config_lib.ConfigError(
                f"the data has {len(names)} classes but model.num_classes={num_classes}")
    models = Models(unet=None, ae=ae_gd)
    res = config.image_resolution
    if config.latent.cache and config.space == "latent":
        enc = jax.jit(lambda st, x: encode(models, st, x), out_shardings=batch_sh)
        cache = latent_cache.open_or_build(config, workdir, enc, ae_state, mesh, where)
        train_iter = data.create_record_iterator(cache, global_batch_size=config.global_batch_size,
                                                 seed=config.seed, uid=cache.uid)
    else:
        train_iter = data.create_train_iterator(config.data, resolution=res,
                                                global_batch_size=config.global_batch_size,
                                                seed=config.seed)
    eval_batches = data.create_eval_batches(config.data, resolution=res,
                                            batch_size=config.eval_batch_size,
                                            num_images=config.num_eval_images)

    # ---- latent scale ------------------------------------------------------------------------
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    scale = 1.0
    if config.space == "latent":
        scale = float(config.latent.scale_factor)
        if scale == 0.0 and latest is None:
            first = data.create_train_iterator(config.data, resolution=res,
                                               global_batch_size=config.global_batch_size,
                                               seed=config.seed)
            gb = sharding.global_batch({"image": next(first)["image"]}, batch_sh)
            z = jax.jit(lambda st, x: to_latent(models, config, st, {"image": x},
                                                jax.random.PRNGKey(config.seed), 1.0))(ae_state, gb["image"])
            std = float(jnp.std(z.astype(jnp.float32)))
            scale = 1.0 / max(std, 1e-8)
            log_once(f"latent scale factor 1/std of the first batch's latents: {scale:.5f} (std {std:.4f})")

    # ---- model and optimizer init (born sharded) ----------------------------------------------
    tx, lr_fn = make_optimizer(config)
    # (resuming: shapes and shardings only, the checkpoint fills them)
    unet_gd, state, state_sh = create_train_state(config, mesh, tx, shape[-1], scale,
                                                  abstract=latest is not None)
    models = Models(unet=unet_gd, ae=ae_gd)
    log_once(f"U-Net {param_count(state.params) / 1e6:.2f}M params on {shape} "
             f"({config.space}); mesh {dict(mesh.shape)}; lr {config.optim.lr:g}")

    # ---- checkpoint restore (or initial weights) ----------------------------------------------
    if latest is None and config.init_from:
        _, pure, where = pretrained.load_params(os.path.expanduser(config.init_from), "unet")
        params = pretrained.params_like(state.params, pure, where)
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        log_once(f"U-Net initialised from {where}")
    if latest is not None:
        restored, meta = ckpt.restore(latest, state.as_dict(), train_iter, config)
        state = TrainState(**restored)
        log_once(f"resumed from checkpoint at step {latest} ({ckpt.directory}); "
                 f"scale factor {float(state.scale_factor):.5f}")
    start_step = int(jax.device_get(state.step))
    # config.json and TensorBoard once the run is set to go: a run stopped by a bad setting,
    # missing weights or a checkpoint that does not fit leaves the workdir as it was
    is_main, writer = prepare_workdir(config, workdir)
    if is_main:
        with open(os.path.join(workdir, "latent.json"), "w") as f:
            json.dump({"scale_factor": float(jax.device_get(state.scale_factor)),
                       "latent_shape": list(shape), "space": config.space,
                       "autoencoder_path": os.path.abspath(os.path.expanduser(config.autoencoder_path))
                       if config.autoencoder_path else ""}, f, indent=2)

    # ---- compiled functions ---------------------------------------------------------------------
    metrics_sh = jax.tree.map(lambda _: rep, TrainMetrics.empty())
    ae_sh = jax.tree.map(lambda a: a.sharding, ae_state) if ae_state is not None else None
    flat_sh = FlatState.of(state_sh)
    train_step = jax.jit(flat_step(make_train_step(models, config, tx, lr_fn, sched)),
                         in_shardings=(flat_sh, ae_sh, batch_sh, metrics_sh),
                         out_shardings=(flat_sh, metrics_sh), donate_argnums=(0, 3))
    eval_step = jax.jit(make_eval_step(models, config, sched), out_shardings=rep)
    if config.num_image_samples > 0:  # 0: no sample grids (nothing compiled for them)
        n_img = -(-config.num_image_samples // mesh.size) * mesh.size
        grid_fn = make_sample_fn(models, config, sched, (n_img, *shape))

        def sample_grid(params, rest, ae_state, seed_key, labels, scale):
            # one key per sample, as sample.py: the grid does not depend on the device count
            # and shows the first images of sample.py --seed=<config.seed + 7>
            keys = jax.lax.with_sharding_constraint(sampling.sample_keys(seed_key, 0, n_img), batch_sh)
            return grid_fn(params, rest, ae_state, keys, labels, scale)

        sample_step = jax.jit(sample_grid, out_shardings=batch_sh)
        sample_labels = jax.device_put(np.arange(n_img, dtype=np.int32) % max(num_classes, 1), batch_sh)

    def run_eval(state: TrainState, step: int) -> dict:
        losses = []
        for i, b in enumerate(eval_batches):
            gb = sharding.global_batch(b, batch_sh)
            losses.append(eval_step(state.ema_params, state.rest, ae_state, gb, state.scale_factor,
                                    jax.random.PRNGKey(10_000 + i)))
        result = {"eval/loss_ema": float(np.mean(jax.device_get(losses)))}
        writer.write_scalars(step, result)
        return result

    def write_samples(state: TrainState, step: int) -> None:
        imgs = sample_step(state.ema_params, state.rest, ae_state,
                           jax.random.PRNGKey(config.seed + 7), sample_labels, state.scale_factor)
        imgs = multihost_utils.process_allgather(imgs, tiled=True)[:config.num_image_samples]
        grid = mw.image_grid([mw.to_uint8(imgs)])
        writer.write_images(step, {"samples": grid[None]})
        if is_main:
            mw.save_png(os.path.join(workdir, "images", f"samples_{step:08d}.png"), grid)

    run_config = config_lib.as_plain(config)  # recorded in every checkpoint (checked on resume)

    def save(state: TrainState, step: int) -> None:
        meta = dict(step=step, name=config.name, time=time.time(), config=run_config,
                    skipped_files=data.skipped_count(), scale_factor=float(jax.device_get(state.scale_factor)))
        ckpt.save(step, state.as_dict(), train_iter, meta)

    # ---- training loop ---------------------------------------------------------------------------
    def next_batch():
        raw = next(train_iter)
        return sharding.global_batch({k: v for k, v in raw.items() if k in ("image", "moments", "label")},
                                     batch_sh)

    return run_training_loop(
        config, state=state, start_step=start_step,
        train_step=lambda st, batch, acc: train_step(st, ae_state, batch, acc), next_batch=next_batch,
        empty_metrics=TrainMetrics.empty, metrics_sharding=metrics_sh, writer=writer, ckpt=ckpt,
        is_main=is_main, progress_keys=("loss",), run_eval=run_eval, save=save,
        write_images=write_samples if config.num_image_samples > 0 else None)


# ----------------------------------------------------------------------------------------
# Loading a trained LDM (sample.py, evaluation)
# ----------------------------------------------------------------------------------------


class Trained(flax.struct.PyTreeNode):
    config: Any = flax.struct.field(pytree_node=False)
    models: Any = flax.struct.field(pytree_node=False)
    params: Any = None
    rest: Any = None
    ae_state: Any = None
    scale_factor: Any = None
    step: int = flax.struct.field(pytree_node=False, default=0)
    latent_shape: tuple = flax.struct.field(pytree_node=False, default=())
    ae_factor: int = flax.struct.field(pytree_node=False, default=1)


def load_trained(workdir: str, *, use_ema: bool = True, dtype_name: str | None = None) -> Trained:
    """The latest checkpoint of an LDM workdir with its frozen autoencoder, on the host."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{workdir} has no config.json: not an LDM training workdir")
    with open(cfg_path) as f:
        trainer = json.load(f).get("trainer")
    if trainer != "ldm":
        raise ValueError(f"{workdir} holds a {trainer!r} run, not an LDM (trainer 'ldm')")
    step_dir = pretrained._latest_step_dir(workdir)
    # the settings of the run that wrote the checkpoint (recorded in it)
    config = ml_collections.ConfigDict(pretrained.recorded_config(workdir, step_dir)[0])
    if dtype_name:
        config.dtype = dtype_name
    ae_gd = ae_state = ae_cfg = None
    if config.space == "latent":
        latent_json = os.path.join(workdir, "latent.json")
        if not os.path.exists(os.path.expanduser(config.autoencoder_path)) and os.path.isfile(latent_json):
            with open(latent_json) as f:  # the absolute path recorded at training time
                config.autoencoder_path = json.load(f)["autoencoder_path"] or config.autoencoder_path
        ae_gd, ae_state, ae_cfg, _ = load_autoencoder(config)
    shape = latent_shape(config, ae_cfg)
    which = "ema_params" if use_ema else "params"
    raw = pretrained._restore_tree(os.path.join(step_dir, "state"), [which, "scale_factor", "step"])
    unet = nnx.eval_shape(lambda: build_unet(config, shape[-1], config.seed))
    pretrained._materialise(unet)
    pretrained.fill_params(unet, raw[which], f"({step_dir})")
    unet_gd, params, rest = nnx.split(unet, nnx.Param, ...)
    return Trained(config=config, models=Models(unet=unet_gd, ae=ae_gd), params=params, rest=rest,
                   ae_state=ae_state, scale_factor=jnp.float32(np.asarray(raw["scale_factor"])),
                   step=int(np.asarray(raw["step"])), latent_shape=shape,
                   ae_factor=ae_cfg.downsample_factor if ae_cfg else 1)
