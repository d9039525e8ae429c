"""VAE-GAN trainer for the KL autoencoder: one jitted step updates two optimizers.

The step does one autoencoder forward, then
  * the reconstruction NLL (L1 + LPIPS, learnable log-variance) and its gradient at the
    reconstruction (one LPIPS backward),
  * the generator loss and its gradient at the reconstruction (one discriminator backward),
  * the CompVis adaptive weight from both gradients taken at the decoder's last conv
    kernel (a vjp through that one layer only),
  * one backward pass through the autoencoder with the combined cotangent,
  * the discriminator loss on real images and the (stop-gradient) reconstructions,
and applies both optax updates. A step whose losses or gradients are not finite leaves
every parameter, optimizer and normalisation state unchanged and is counted.

Real and fake images go through the discriminator in separate calls, as in CompVis, so
BatchNorm statistics are those of each batch (global across the mesh inside ``jit``).

With ``optim.grad_accum_steps = k > 1`` the global batch is split into ``k`` microbatches
that run one after another inside the same jitted step (``common.microbatch_mean``): both
optimizers then apply the mean of the microbatches' gradients once, so activations need
the memory of ``global_batch_size / k`` images. As with gradient accumulation in PyTorch
Lightning (CompVis' ``accumulate_grad_batches``), the adaptive weight and the
discriminator's BatchNorm statistics are those of each microbatch; before the
discriminator starts, the step equals the step on the whole batch.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils
from flax import nnx

from ldm_jax import checkpointing, config_lib, data, losses, metrics, pretrained, sharding
from ldm_jax import metric_writers as mw
from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.layers import CONV_DIMENSION_NUMBERS
from ldm_jax.models.lpips import LPIPSWeightsMissingError, create_lpips
from ldm_jax.trainers.common import (FlatState, check_workdir, clip_by_global_norm, dtype as _dtype,
                                     finite_and_norm, flat_step, fresh as _fresh, init_sharded, lr_schedule,
                                     microbatch_mean, log_once as _log_once, params_sharded, prepare_workdir,
                                     run_training_loop, tree_where as _tree_where, use_compilation_cache)


METRIC_NAMES = (
    "loss", "nll_loss", "rec_loss", "p_loss", "kl_loss", "g_loss", "d_loss", "d_weight",
    "disc_factor", "logvar", "logits_real", "logits_fake", "gen_grad_norm", "disc_grad_norm",
    "skipped",
)
TrainMetrics = clu_metrics.Collection.create(
    **{n: clu_metrics.Average.from_output(n) for n in METRIC_NAMES}
)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    gen_params: Any  # {"ae": autoencoder Params, "logvar": scalar} - trained by gen_opt
    ae_rest: Any  # non-Param autoencoder state (dropout RNG streams), usually empty
    disc_params: Any
    disc_stats: Any  # BatchNorm running statistics
    gen_opt: Any
    disc_opt: Any
    rng: jax.Array  # raw uint32[2] key
    nan_skips: jax.Array  # steps skipped for non-finite loss/grads

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class Models(flax.struct.PyTreeNode):
    """Graph definitions (static) of the three networks."""

    ae: Any = flax.struct.field(pytree_node=False)
    disc: Any = flax.struct.field(pytree_node=False)
    lpips: Any = flax.struct.field(pytree_node=False)


def build_models(config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    kw = dict(dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype))
    ae = AutoencoderKL(AutoencoderConfig.from_dict(config.model), rngs=rngs, **kw)
    disc = NLayerDiscriminator(config.disc.in_channels, config.disc.ndf, config.disc.n_layers,
                               rngs=rngs, **kw)
    return ae, disc


def learning_rates(config: ml_collections.ConfigDict) -> tuple[float, float]:
    lr = config.optim.base_lr * (config.global_batch_size if config.optim.scale_lr_by_batch else 1)
    return lr, lr * config.optim.disc_lr_mult


def make_optimizer(lr: float, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    schedule = lr_schedule(lr, o, config.num_train_steps)
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(clip_by_global_norm(o.grad_clip_norm, sharded=params_sharded(config)))
    parts.append(optax.adam(schedule, b1=o.b1, b2=o.b2))
    return optax.chain(*parts)


def _last_layer_head(h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        h.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1), "SAME",
        dimension_numbers=CONV_DIMENSION_NUMBERS)
    return y + bias.astype(jnp.float32)


def make_train_step(models: Models, config: ml_collections.ConfigDict,
                    gen_tx: optax.GradientTransformation,
                    disc_tx: optax.GradientTransformation) -> Callable:
    """The pure step ``(state, lpips_state, batch, metrics) -> (state, metrics)``."""
    L = config.loss
    d_loss_fn = losses.D_LOSSES[L.disc_loss]

    ae_cfg = AutoencoderConfig.from_dict(config.model)
    n_micro = int(config.optim.grad_accum_steps)
    sharded = params_sharded(config)

    def step_fn(state: TrainState, lpips_state: Any, batch: dict, acc: Any):
        images = batch["image"]
        rng, k_sample = jax.random.split(state.rng)
        factor = losses.disc_factor(state.step, L.disc_start, L.disc_factor)
        # The posterior noise of the whole batch is drawn before it is split into
        # microbatches, so grad_accum_steps changes memory, not the samples.
        f = ae_cfg.downsample_factor
        b, hgt, wid = images.shape[:3]
        eps = jax.random.normal(k_sample, (b, hgt // f, wid // f, ae_cfg.embed_dim), jnp.float32)
        ae_params = state.gen_params["ae"]

        def microbatch(mb, _, carry):
            x = mb["image"]
            disc_stats, ae_rest = carry

            # --- autoencoder forward (kept for one backward pass) -----------------------
            def ae_forward(ae_params):
                ae = nnx.merge(models.ae, ae_params, _fresh(ae_rest))
                moments = ae.encode_moments(x)
                z = DiagonalGaussian(moments).reparameterize(mb["eps"])
                h = ae.decode_features(z)
                recon = ae.decoder.conv_out(h)
                return (recon, h, moments), nnx.split(ae, nnx.Param, ...)[2]

            (recon, h, moments), ae_vjp, ae_rest = jax.vjp(ae_forward, ae_params, has_aux=True)
            recon32 = recon.astype(jnp.float32)

            # --- reconstruction NLL, gradient at the reconstruction ----------------------
            def nll_fn(r, logvar):
                p = None
                if models.lpips is not None and L.perceptual_weight > 0:
                    p = nnx.merge(models.lpips, lpips_state)(x, r)
                rec = losses.reconstruction_loss(x, r, p, L.perceptual_weight)
                pl = jnp.mean(p) if p is not None else jnp.float32(0.0)
                return losses.nll_loss(rec, logvar), (jnp.mean(rec), pl)

            (nll, (rec_mean, p_mean)), (g_r_nll, g_logvar) = jax.value_and_grad(
                nll_fn, argnums=(0, 1), has_aux=True)(recon32, state.gen_params["logvar"])

            # --- generator loss through the discriminator --------------------------------
            def g_fn(r):
                disc = nnx.merge(models.disc, _fresh(state.disc_params), _fresh(disc_stats))
                logits = disc(r)
                return losses.generator_loss(logits, L.gen_loss), nnx.split(disc, nnx.Param, ...)[2]

            (g_loss, disc_stats), g_r_g = jax.value_and_grad(g_fn, has_aux=True)(recon32)

            # --- KL on the posterior moments ----------------------------------------------
            kl_fn = lambda m: losses.kl_loss(DiagonalGaussian(m).kl())  # noqa: E731
            kl, g_moments = jax.value_and_grad(kl_fn)(moments)

            # --- adaptive weight at the decoder's last layer (per microbatch) -------------
            conv_out = ae_params["decoder"]["conv_out"]
            _, head_vjp = jax.vjp(lambda k: _last_layer_head(h, k, conv_out["bias"][...]),
                                  conv_out["kernel"][...])
            d_weight = losses.adaptive_weight(head_vjp(g_r_nll)[0], head_vjp(g_r_g)[0],
                                              L.disc_weight, L.max_adaptive_weight)
            g_scale = d_weight * factor
            total = nll + L.kl_weight * kl + g_scale * g_loss

            (g_ae,) = ae_vjp((
                (g_r_nll + g_scale * g_r_g).astype(recon.dtype),
                jnp.zeros_like(h),
                (L.kl_weight * g_moments).astype(moments.dtype),
            ))

            # --- discriminator -------------------------------------------------------------
            fake = jax.lax.stop_gradient(recon32)

            def disc_loss_fn(params, stats):
                disc = nnx.merge(models.disc, params, _fresh(stats))
                lr_, lf_ = disc(x), disc(fake)
                return factor * d_loss_fn(lr_, lf_), (nnx.split(disc, nnx.Param, ...)[2], lr_, lf_)

            (d_loss, (disc_stats, logits_real, logits_fake)), disc_grads = jax.value_and_grad(
                disc_loss_fn, has_aux=True)(state.disc_params, disc_stats)
            scalars = dict(loss=total, nll_loss=nll, rec_loss=rec_mean, p_loss=p_mean, kl_loss=kl,
                           g_loss=g_loss, d_loss=d_loss, d_weight=d_weight,
                           logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
            out = dict(gen={"ae": g_ae, "logvar": g_logvar}, disc=disc_grads, scalars=scalars)
            return out, (disc_stats, ae_rest)

        out, (disc_stats, ae_rest) = microbatch_mean(
            microbatch, {"image": images, "eps": eps}, n_micro, (state.disc_stats, state.ae_rest))
        gen_grads, disc_grads, scalars = out["gen"], out["disc"], out["scalars"]

        # --- updates, guarded ---------------------------------------------------------------
        gen_upd, gen_opt = gen_tx.update(gen_grads, state.gen_opt, state.gen_params)
        disc_upd, disc_opt = disc_tx.update(disc_grads, state.disc_opt, state.disc_params)
        candidate = dict(
            gen_params=optax.apply_updates(state.gen_params, gen_upd),
            disc_params=optax.apply_updates(state.disc_params, disc_upd),
            gen_opt=gen_opt, disc_opt=disc_opt, disc_stats=disc_stats, ae_rest=ae_rest)
        gen_ok, gen_norm = finite_and_norm(scalars["loss"], gen_grads, sharded=sharded)
        disc_ok, disc_norm = finite_and_norm(scalars["d_loss"], disc_grads, sharded=sharded)
        finite = gen_ok & disc_ok
        old = {k: getattr(state, k) for k in candidate}
        new_state = state.replace(
            **_tree_where(finite, candidate, old),
            step=state.step + 1, rng=rng,
            nan_skips=state.nan_skips + (~finite).astype(jnp.int32))

        out = dict(
            scalars, disc_factor=factor, logvar=state.gen_params["logvar"],
            gen_grad_norm=gen_norm, disc_grad_norm=disc_norm,
            skipped=(~finite).astype(jnp.float32))
        # Keep non-finite values out of the running averages; `skipped` counts them.
        out = {k: jnp.where(jnp.isfinite(v), v, 0.0).astype(jnp.float32) for k, v in out.items()}
        return new_state, acc.merge(TrainMetrics.single_from_model_output(**out))

    return step_fn


def make_eval_step(models: Models) -> Callable:
    """``(gen_params, ae_rest, lpips_state, batch) -> (sums, recon)`` with posterior mode."""

    def eval_fn(gen_params, ae_rest, lpips_state, batch):
        x = batch["image"]
        ae = nnx.merge(models.ae, gen_params["ae"], ae_rest)
        ae.eval()
        recon, _ = ae(x)
        recon = jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)
        sums = dict(psnr=jnp.sum(metrics.psnr(x, recon)), ssim=jnp.sum(metrics.ssim(x, recon)),
                    l1=jnp.sum(jnp.mean(jnp.abs(x - recon), axis=(1, 2, 3))),
                    count=jnp.float32(x.shape[0]))
        if models.lpips is not None:
            sums["lpips"] = jnp.sum(nnx.merge(models.lpips, lpips_state)(x, recon))
        return sums, recon

    return eval_fn


# ----------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------


def create_train_state(config, mesh, gen_tx, disc_tx, *,
                       abstract: bool = False) -> tuple[tuple, TrainState, Any]:
    """Build models and optimizer states directly sharded on ``mesh`` (never whole on one
    device); ``abstract``: only their shapes, dtypes and shardings (``jax.ShapeDtypeStruct``s,
    the target of a checkpoint restore), nothing compiled or computed."""

    def models(seed: int):
        return build_models(config, nnx.Rngs(params=seed, dropout=seed + 1))

    graphdefs = []

    def init() -> TrainState:
        ae, disc = models(config.seed)
        graphdefs[:] = [nnx.graphdef(ae), nnx.graphdef(disc)]  # static: safe to keep from the trace
        _, ae_params, ae_rest = nnx.split(ae, nnx.Param, ...)
        _, d_params, d_stats = nnx.split(disc, nnx.Param, ...)
        gen_params = {"ae": ae_params, "logvar": jnp.float32(config.loss.logvar_init)}
        return TrainState(
            step=jnp.int32(0), gen_params=gen_params, ae_rest=ae_rest, disc_params=d_params,
            disc_stats=d_stats, gen_opt=gen_tx.init(gen_params), disc_opt=disc_tx.init(d_params),
            rng=jax.random.PRNGKey(config.seed + 2), nan_skips=jnp.int32(0))

    state, shardings = init_sharded(init, mesh=mesh, abstract=abstract)
    return tuple(graphdefs), state, shardings


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) in ``workdir``; returns {"history": {step: metrics}, "eval": {...}}."""
    # ---- setup ---------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate_vae_config(config, num_devices=mesh.size)
    check_workdir(config, workdir)
    use_compilation_cache(config)

    # ---- LPIPS ---------------------------------------------------------------------------
    try:
        lp_model, lp_msg = create_lpips(
            config.loss.lpips_weights or None, missing=config.loss.lpips_missing,
            dtype=_dtype(config.dtype), rngs=nnx.Rngs(config.seed + 3))
    except LPIPSWeightsMissingError as e:
        raise LPIPSWeightsMissingError(
            f"{e}\nWithout them (not for a real run): --config.loss.lpips_missing=disable trains "
            "without the perceptual term (the demo configs do), =random with random VGG features "
            "(the tiny configs do).") from None
    if lp_msg:
        _log_once(lp_msg)
    lpips_pretrained = lp_model is not None and "RANDOM" not in lp_msg
    lp_gd, lpips_state = (nnx.split(lp_model) if lp_model is not None else (None, None))
    if lpips_state is not None:
        lpips_state = jax.device_put(lpips_state, sharding.replicated(mesh))

    # ---- data (before any model work: a bad data setting stops the run at once) -----------
    res = config.model.resolution
    train_iter = data.create_train_iterator(
        config.data, resolution=res, global_batch_size=config.global_batch_size, seed=config.seed)
    eval_batches = data.create_eval_batches(
        config.data, resolution=res, batch_size=config.eval_batch_size,
        num_images=config.num_eval_images)
    batch_sh = sharding.batch_sharding(mesh)

    # ---- model and optimizer init (born sharded) ------------------------------------------
    gen_lr, disc_lr = learning_rates(config)
    gen_tx, disc_tx = make_optimizer(gen_lr, config), make_optimizer(disc_lr, config)
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    # (resuming: shapes and shardings only, the checkpoint fills them)
    (ae_gd, d_gd), state, state_sh = create_train_state(config, mesh, gen_tx, disc_tx,
                                                        abstract=latest is not None)
    models = Models(ae=ae_gd, disc=d_gd, lpips=lp_gd)
    n_params = sum(x.size for x in jax.tree.leaves(state.gen_params["ae"]))
    n_disc = sum(x.size for x in jax.tree.leaves(state.disc_params))
    _log_once(f"autoencoder {n_params / 1e6:.2f}M params, discriminator {n_disc / 1e6:.2f}M; "
              f"mesh {dict(mesh.shape)}; lr {gen_lr:.3g} (disc {disc_lr:.3g})")

    # ---- checkpoint restore (or initial weights) -------------------------------------------
    if latest is None and config.init_from:
        _, pure, where = pretrained.load_params(os.path.expanduser(config.init_from), "autoencoder")
        ae = pretrained.params_like(state.gen_params["ae"], pure, where)
        state = state.replace(gen_params={**state.gen_params, "ae": ae})
        _log_once(f"autoencoder initialised from {where}")
    if latest is not None:
        restored, meta = ckpt.restore(latest, state.as_dict(), train_iter, config)
        state = TrainState(**restored)
        _log_once(f"resumed from checkpoint at step {latest} ({ckpt.directory})")
    start_step = int(jax.device_get(state.step))
    # config.json and TensorBoard once the run is set to go: a run stopped by a bad setting,
    # missing weights or a checkpoint that does not fit leaves the workdir as it was
    is_main, writer = prepare_workdir(config, workdir)

    # ---- compiled functions ----------------------------------------------------------------
    rep = sharding.replicated(mesh)
    metrics_sh = jax.tree.map(lambda _: rep, TrainMetrics.empty())
    flat_sh = FlatState.of(state_sh)
    train_step = jax.jit(
        flat_step(make_train_step(models, config, gen_tx, disc_tx)),
        in_shardings=(flat_sh, rep if lpips_state is not None else None, batch_sh, metrics_sh),
        out_shardings=(flat_sh, metrics_sh),
        donate_argnums=(0, 3))
    eval_step = jax.jit(make_eval_step(models))

    def run_eval(state: TrainState, step: int) -> dict:
        sums: dict = {}
        first = None
        for b in eval_batches:
            gb = sharding.global_batch(b, batch_sh)
            s, recon = eval_step(state.gen_params, state.ae_rest, lpips_state, gb)
            sums = {k: sums.get(k, 0.0) + v for k, v in s.items()}
            if first is None:
                first = (gb["image"], recon)
        sums = jax.device_get(sums)
        n = max(float(sums.pop("count")), 1.0)
        result = {f"eval/{k}": float(v) / n for k, v in sums.items()}
        if "eval/lpips" in result and not lpips_pretrained:
            result["eval/lpips_random_vgg"] = result.pop("eval/lpips")
        writer.write_scalars(step, result)
        if first is not None and config.num_image_samples > 0 and (
                step % config.image_every_steps == 0 or step == config.num_train_steps):
            k = config.num_image_samples
            orig, rec = (multihost_utils.process_allgather(a, tiled=True)[:k] for a in first)
            grid = mw.image_grid([mw.to_uint8(orig), mw.to_uint8(rec)])
            writer.write_images(step, {"reconstructions": grid[None]})
            if is_main:
                mw.save_png(os.path.join(workdir, "images", f"recon_{step:08d}.png"), grid)
        return result

    run_config = config_lib.as_plain(config)  # recorded in every checkpoint (checked on resume)

    def save(state: TrainState, step: int) -> None:
        meta = dict(step=step, name=config.name, time=time.time(), config=run_config,
                    skipped_files=data.skipped_count())
        ckpt.save(step, state.as_dict(), train_iter, meta)

    # ---- training loop ---------------------------------------------------------------------
    return run_training_loop(
        config, state=state, start_step=start_step,
        train_step=lambda st, batch, acc: train_step(st, lpips_state, batch, acc),
        next_batch=lambda: sharding.global_batch(next(train_iter), batch_sh),
        empty_metrics=TrainMetrics.empty, metrics_sharding=metrics_sh, writer=writer, ckpt=ckpt,
        is_main=is_main, progress_keys=("loss", "rec_loss", "d_loss"), run_eval=run_eval, save=save,
        extra_scalars=lambda: {"skipped_files": float(data.skipped_count())})
