"""PyTorch reference timings of the three ``python -m ldm_jax.bench`` workloads.

  python benchmarks/torch_reference.py vae    [--mode eager|compile] [--dtype auto|bf16|fp32] [--batch 8]
  python benchmarks/torch_reference.py unet   [--mode ...] [--batch 64] [--steps 20]
  python benchmarks/torch_reference.py sample [--mode ...] [--batch 16] [--steps 3]
  python benchmarks/torch_reference.py unet --tiny --device cpu      # seconds on a CPU (tests)

The same work as ``ldm_jax.bench``, with the models built from the same config files
(``configs/vae_f8.py``, ``configs/ldm_f8.py``, ``:tiny`` with ``--tiny``, and the same
``--set KEY=VALUE`` overrides):

* ``vae`` (``vae_gan_step``): a diffusers ``AutoencoderKL`` in the layout our converter
  exports for ``config.model`` (SD KL-f8 by default: block_out_channels (128, 256, 512, 512),
  2 layers per block, latent 4), ``lpips.LPIPS(net="vgg")`` with random VGG16 weights
  (``pnet_rand=True``: nothing is downloaded, same FLOPs; the v0.1 linear heads ship in the
  lpips wheel) and a PatchGAN (``PatchGAN`` below, ndf 64, 3 layers, BatchNorm). One step is
  the autoencoder forward (posterior sample), L1 + LPIPS, the learnable-logvar NLL, KL, the
  hinge generator term -mean(D(x_hat)), the CompVis adaptive weight (gradient norms of the
  NLL and of the generator term at the decoder's last conv weight, by
  ``torch.autograd.grad(..., retain_graph=True)``), one backward of the total, the
  discriminator on real and (detached) fake images, the hinge discriminator loss and its
  backward, and two Adam updates (betas 0.5, 0.9; lr = base_lr x batch). The discriminator
  is switched on (disc factor 1), as ldm_jax.bench does, and its parameters are frozen
  while the generator term is formed (as Lightning does with two optimizers).
* ``unet`` (``unet_step``): a diffusers ``UNet2DModel`` whose config is what
  ``ldm_jax.convert.unet_weights.diffusers_config`` exports for ``config.model`` (285.7M
  parameters by default, checked against our count), trained on random posterior moments as
  ldm_jax.bench does: z ~ q(z|x), t ~ U{0..T-1}, eps-MSE (or v), backward, global-norm
  clipping, AdamW, EMA update (LitEma warm-up decay).
* ``sample`` (``sample_ddim``): DDIM (eta 0, config.sampling.num_steps steps, leading
  spacing, last step to alpha_bar = 1, as ``ldm_jax.diffusion.sample``) with that U-Net,
  then ``AutoencoderKL.decode`` of the SD KL-f8 autoencoder (as ldm_jax.bench, whatever the
  config) to images in [-1, 1]; batch 16 at 256x256 by default.

Modes: ``--mode eager`` or ``--mode compile`` (``torch.compile`` of the autoencoder body,
LPIPS and discriminator / of the U-Net loss / of the U-Net and the decoder;
``--compile-mode`` passes e.g. ``max-autotune``). ``--dtype bf16`` is
``torch.autocast(bfloat16)`` with fp32 parameters; ``auto`` (default) takes the config's
``dtype`` as ldm_jax.bench does (bfloat16 for the full configs, float32 for ``:tiny``).

Timing: the first call (``compile_s``: compilation, autotuning and one step), ``--warmup``
more calls, then ``--steps`` timed calls, each ended by ``torch.cuda.synchronize()``;
``step_s_median`` is the median. ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated``
over the whole run (null on CPU). The JSON uses ldm_jax.bench's field names where they mean
the same thing.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
# ldm_jax is imported for the configs and our parameter counts only: keep JAX off the GPU.
os.environ["JAX_PLATFORMS"] = "cpu"

WORKLOADS = {"vae": ("vae_gan_step", "configs/vae_f8.py", 8, 20),
             "unet": ("unet_step", "configs/ldm_f8.py", 64, 20),
             "sample": ("sample_ddim", "configs/ldm_f8.py", 16, 3)}
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


# ------------------------------------------------------------------------------ configs


def load_config(workload: str, config: str | None, tiny: bool, overrides: dict):
    from ldm_jax import config_lib

    spec = config or WORKLOADS[workload][1]
    if tiny and ":" not in spec:
        spec += ":tiny"
    c = config_lib.load_config(os.path.join(REPO, spec) if not os.path.isabs(spec) else spec)
    config_lib.set_fields(c, overrides, parse=True)
    return spec, c


def config_lib_vae():
    """The autoencoder ldm_jax.bench uses for the LDM workloads (the SD KL-f8 layout)."""
    from ldm_jax import config_lib

    return config_lib.vae_base_config()


def our_vae_params(model_cfg, disc_cfg) -> tuple[int, int]:
    from flax import nnx

    from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm_jax.models.discriminator import NLayerDiscriminator
    from ldm_jax.trainers.common import param_count

    def count(make):
        return param_count(nnx.state(nnx.eval_shape(make), nnx.Param))

    ae = count(lambda: AutoencoderKL(AutoencoderConfig.from_dict(model_cfg), rngs=nnx.Rngs(0)))
    disc = count(lambda: NLayerDiscriminator(disc_cfg.in_channels, disc_cfg.ndf, disc_cfg.n_layers,
                                             rngs=nnx.Rngs(0)))
    return ae, disc


# ------------------------------------------------------------------------------ models


def _torch():
    import torch

    return torch


def make_autoencoder(model_cfg):
    """diffusers ``AutoencoderKL`` in the layout our converter exports for ``model_cfg``."""
    import diffusers

    from ldm_jax.convert import autoencoder_weights as aw
    from ldm_jax.models.autoencoder import AutoencoderConfig

    d = aw.diffusers_config(AutoencoderConfig.from_dict(model_cfg))
    return diffusers.AutoencoderKL(**{k: v for k, v in d.items() if not k.startswith("_")})


def make_unet(cfg, sample_size: int):
    """diffusers ``UNet2DModel`` with the config our converter exports for ``cfg``."""
    import diffusers

    from ldm_jax.convert import unet_weights as uw

    d = uw.diffusers_config(cfg, sample_size=sample_size)
    return diffusers.UNet2DModel(**{k: v for k, v in d.items() if not k.startswith("_")}), d


def make_lpips():
    """LPIPS v0.1 (VGG16 trunk with random weights: no download; heads from the wheel)."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    m.eval().requires_grad_(False)
    return m


def _patchgan_cls():
    nn = _torch().nn

    class PatchGAN(nn.Module):
        """pix2pix / taming ``NLayerDiscriminator`` as DESIGN.md section 2 describes it.

        4x4 convs with padding 1: stride-2 conv (bias) -> LeakyReLU 0.2; for n = 1..n_layers
        a 4x4 conv without bias to ndf * min(2**n, 8) channels (stride 2, the last one stride
        1) -> BatchNorm -> LeakyReLU 0.2; a final 4x4 stride-1 conv to one logit per patch
        (30x30 at 256x256 with 3 layers). Conv weights ~ N(0, 0.02), BatchNorm scale
        ~ N(1, 0.02), biases 0. Same parameters as ``ldm_jax.models.discriminator``.
        """

        def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
            super().__init__()
            layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width = ndf
            for n in range(1, n_layers + 1):
                out = ndf * min(2 ** n, 8)
                stride = 2 if n < n_layers else 1
                layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
                width = out
            layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
            self.net = nn.Sequential(*layers)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.normal_(m.weight, 1.0, 0.02)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            return self.net(x).float()

    return PatchGAN


def _ae_body_cls():
    torch = _torch()
    nn = torch.nn

    class AEBody(nn.Module):
        """AutoencoderKL up to (not including) the decoder's last conv.

        ``x -> (h, kl)``: encoder + quant_conv -> (mean, logvar clamped to [-30, 20]),
        z = mean + std * noise, post_quant_conv + decoder up to its final GroupNorm + SiLU.
        The last conv stays outside so that the adaptive weight's two gradients at its
        weight only backpropagate through that one layer (and LPIPS / the discriminator),
        also when this body is compiled (a compiled region's backward runs whole).
        """

        def __init__(self, ae):
            super().__init__()
            self.ae = ae

        def forward(self, x):
            ae = self.ae
            moments = ae.quant_conv(ae.encoder(x)).float()
            mean, logvar = moments.chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            kl = 0.5 * torch.sum(mean.square() + logvar.exp() - 1.0 - logvar, dim=(1, 2, 3))
            d = ae.decoder
            h = d.conv_in(ae.post_quant_conv(z))
            h = d.mid_block(h)
            for block in d.up_blocks:
                h = block(h)
            h = d.conv_act(d.conv_norm_out(h))
            return h, kl

    return AEBody


def _decode_cls():
    nn = _torch().nn

    class Decode(nn.Module):
        def __init__(self, ae):
            super().__init__()
            self.ae = ae

        def forward(self, z):
            return self.ae.decode(z).sample

    return Decode


def count(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ------------------------------------------------------------------------------ timing


class Runner:
    """Device, autocast and compile settings shared by the three workloads."""

    def __init__(self, a, dtype: str):
        torch = _torch()
        self.torch = torch
        self.device = torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = dtype
        self.autocast = dtype == "bfloat16"
        self.mode = a.mode
        self.compile_mode = a.compile_mode
        self.channels_last = a.channels_last
        self.fused = a.fused_optim
        torch.manual_seed(a.seed)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = a.tf32
            torch.backends.cudnn.allow_tf32 = a.tf32
            torch.cuda.reset_peak_memory_stats()

    def amp(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.autocast)

    def compile(self, fn):
        if self.mode != "compile":
            return fn
        kw = {} if self.compile_mode in (None, "", "default") else {"mode": self.compile_mode}
        return self.torch.compile(fn, **kw)

    def to(self, module):
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=self.torch.channels_last)
        return module

    def images(self, x):
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=self.torch.channels_last)
        return x

    def optim_kw(self) -> dict:
        return {"fused": True} if self.fused else {}

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time(self, run, steps: int, warmup: int) -> dict:
        """First call (compile), ``warmup`` more, then ``steps`` timed calls, each synced."""
        t0 = time.perf_counter()
        run()
        self.sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(warmup):
            run()
            self.sync()
        warm = time.perf_counter() - t0
        times = []
        t_all = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            run()
            self.sync()
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t_all
        return dict(first_step_s=first, warmup_s=warm, step_s_median=statistics.median(times),
                    step_s_mean=total / steps, step_s_all=times)

    def report(self, workload: str, spec: str, batch: int, steps: int, warmup: int, t: dict,
               images_per_call: int, **extra) -> dict:
        torch = self.torch
        import diffusers

        dev = torch.cuda.get_device_name(self.device) if self.cuda else (platform.processor() or "cpu")
        step = t["step_s_median"]
        return dict(
            framework="torch", workload=workload, config=spec, batch=batch, dtype=self.dtype,
            steps=steps, warmup=warmup, device=dev, num_devices=1,
            torch=torch.__version__, diffusers=diffusers.__version__,
            python=platform.python_version(), mode=self.mode,
            compile_mode=(self.compile_mode or "default") if self.mode == "compile" else None,
            autocast_bf16=self.autocast, channels_last=self.channels_last,
            fused_optim=self.fused,
            tf32=bool(torch.backends.cuda.matmul.allow_tf32) if self.cuda else None,
            # compile_s: the first call (compilation / autotuning + one step), as the
            # compile time of ldm_jax.bench (which compiles ahead of the first call).
            compile_s=t["first_step_s"], first_step_s=t["first_step_s"], warmup_s=t["warmup_s"],
            step_s_median=step, step_s_mean=t["step_s_mean"], step_s_all=t["step_s_all"],
            images_per_s=images_per_call / step,
            peak_memory_bytes=int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None,
            peak_memory_reserved_bytes=(int(torch.cuda.max_memory_reserved(self.device))
                                        if self.cuda else None),
            **extra)


def _check(name: str, ours: int, theirs: int, strict: bool) -> None:
    print(f"{name}: torch {theirs:,} params, ldm_jax {ours:,}", file=sys.stderr)
    if ours != theirs and strict:
        raise SystemExit(f"{name}: the PyTorch model has {theirs:,} parameters, ours {ours:,}: "
                         "the reference would not be the same model (--no-param-check to go on)")


# ------------------------------------------------------------------------------ workloads


def bench_vae(a, r: Runner, spec: str, config) -> dict:
    torch = r.torch
    F = torch.nn.functional
    m, L = config.model, config.loss
    ae = make_autoencoder(m)
    disc = _patchgan_cls()(config.disc.in_channels, config.disc.ndf, config.disc.n_layers)
    lp = make_lpips()
    n_ae, n_disc = count(ae), count(disc)
    ours_ae, ours_disc = our_vae_params(m, config.disc)
    _check("autoencoder", ours_ae, n_ae, a.param_check)
    _check("discriminator", ours_disc, n_disc, a.param_check)
    ae, disc, lp = r.to(ae.train()), r.to(disc.train()), r.to(lp)
    logvar = torch.nn.Parameter(torch.full((), float(L.logvar_init), device=r.device))
    lr = config.optim.base_lr * (a.batch if config.optim.scale_lr_by_batch else 1)
    betas = (config.optim.b1, config.optim.b2)
    gen_opt = torch.optim.Adam(list(ae.parameters()) + [logvar], lr=lr, betas=betas, **r.optim_kw())
    disc_opt = torch.optim.Adam(disc.parameters(), lr=lr * config.optim.disc_lr_mult, betas=betas,
                                **r.optim_kw())
    body = r.compile(r.to(_ae_body_cls()(ae)))
    lpips_fn, disc_fn = r.compile(lp), r.compile(disc)
    last = ae.decoder.conv_out
    disc_params = list(disc.parameters())
    res = m.resolution
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = [r.images((torch.rand(a.batch, 3, res, res, generator=gen) * 2 - 1).to(r.device))
              for _ in range(2)]
    factor = float(L.disc_factor)  # disc on, as ldm_jax.bench (step = disc_start)
    state = {"i": 0}

    def step():
        x = images[state["i"] % 2]
        state["i"] += 1
        for p in disc_params:  # generator phase: D frozen (as Lightning toggles it)
            p.requires_grad_(False)
        with r.amp():
            h, kl = body(x)
            recon = last(h).float()
            p_loss = lpips_fn(x, recon).float() if L.perceptual_weight > 0 else None
            rec = (x - recon).abs()
            if p_loss is not None:
                rec = rec + L.perceptual_weight * p_loss
            nll = torch.sum(rec / torch.exp(logvar) + logvar) / rec.shape[0]
            kl_loss = kl.sum() / kl.shape[0]
            logits_fake = disc_fn(recon)
            g_loss = -logits_fake.mean()
        g_nll = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
        g_g = torch.autograd.grad(g_loss, last.weight, retain_graph=True)[0]
        d_weight = torch.clamp(g_nll.norm() / (g_g.norm() + 1e-4), 0.0,
                               float(L.max_adaptive_weight)).detach() * L.disc_weight
        total = nll + L.kl_weight * kl_loss + d_weight * factor * g_loss
        total.backward()
        for p in disc_params:
            p.requires_grad_(True)
        with r.amp():
            logits_real = disc_fn(x)
            logits_fake_d = disc_fn(recon.detach())
            d_loss = factor * 0.5 * (F.relu(1.0 - logits_real).mean()
                                     + F.relu(1.0 + logits_fake_d).mean())
        d_loss.backward()
        gen_opt.step()
        disc_opt.step()
        gen_opt.zero_grad(set_to_none=True)
        disc_opt.zero_grad(set_to_none=True)
        state.update(loss=total.detach(), d_loss=d_loss.detach(), d_weight=d_weight)

    t = r.time(step, a.steps, a.warmup)
    return r.report(
        "vae_gan_step", spec, a.batch, a.steps, a.warmup, t, a.batch, resolution=res,
        lpips="RANDOM VGG16 (lpips.LPIPS net='vgg', pnet_rand=True); v0.1 heads",
        last_loss=float(state["loss"]), last_d_loss=float(state["d_loss"]),
        d_weight=float(state["d_weight"]), params=n_ae, params_ours=ours_ae,
        disc_params=n_disc, disc_params_ours=ours_disc, lpips_params=count(lp),
        adaptive_weight="torch.autograd.grad(nll|g, decoder.conv_out.weight, retain_graph=True)")


def _alphas_cumprod(config):
    """alpha_bar_t of the config's beta schedule (float64 numpy, ldm_jax.diffusion's betas)."""
    import numpy as np

    from ldm_jax.diffusion import make_betas

    d = config.diffusion
    return np.cumprod(1.0 - make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end))


def unet_setup(config, strict: bool):
    """The U-Net of an LDM config: ``(our UNetConfig, latent shape, diffusers UNet2DModel,
    its config, its parameter count, ours)``; the counts are checked (``_check``). The
    latents are those of the SD KL-f8 autoencoder ldm_jax.bench uses."""
    from ldm_jax.models.autoencoder import AutoencoderConfig
    from ldm_jax.models.unet import count_params
    from ldm_jax.trainers import ldm

    shape = ldm.latent_shape(config, AutoencoderConfig.from_dict(config_lib_vae().model.to_dict()))
    ucfg = ldm.unet_config(config, shape[-1])
    unet, dcfg = make_unet(ucfg, shape[0])
    n, ours = count(unet), int(count_params(ucfg))
    _check("U-Net", ours, n, strict)
    return ucfg, shape, unet, dcfg, n, ours


def bench_unet(a, r: Runner, spec: str, config) -> dict:
    torch = r.torch
    _, shape, unet, dcfg, n, ours = unet_setup(config, a.param_check)
    unet = r.to(unet.train())
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    live = [p.detach() for p in params]  # views: they follow the in-place optimizer updates
    o, d = config.optim, config.diffusion
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), weight_decay=o.weight_decay,
                            **r.optim_kw())
    ac = torch.tensor(_alphas_cumprod(config), dtype=torch.float32, device=r.device)
    sqrt_ac, sqrt_1m = ac.sqrt(), (1.0 - ac).sqrt()
    T = int(d.num_timesteps)
    num_classes = int(config.model.num_classes)
    latent = config.space == "latent"
    scale = 1.0  # as ldm_jax.bench's U-Net step
    # Plain Python constants for the (possibly compiled) loss, not ConfigDict look-ups.
    prediction, min_snr, p_drop = str(d.prediction), float(d.min_snr_gamma), float(d.label_dropout)
    if prediction not in ("eps", "v"):
        raise SystemExit(f"prediction {prediction!r}: only eps and v are implemented here")

    def loss_fn(batch, y):
        if latent:  # z ~ q(z|x) from the posterior moments, as ldm_jax.trainers.ldm.to_latent
            mean, logvar = batch.chunk(2, dim=1)
            x0 = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)) * scale
        else:
            x0 = batch
        b = x0.shape[0]
        t = torch.randint(0, T, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        a_t, s_t = sqrt_ac[t].view(b, 1, 1, 1), sqrt_1m[t].view(b, 1, 1, 1)
        xt = a_t * x0 + s_t * noise
        if num_classes:
            drop = torch.rand(b, device=x0.device) < p_drop
            y = torch.where(drop, torch.full_like(y, num_classes), y)
        with r.amp():
            out = unet(xt, t, class_labels=y if num_classes else None).sample
        target = noise if prediction == "eps" else a_t * noise - s_t * x0
        per_example = (out.float() - target).square().mean(dim=(1, 2, 3))
        if min_snr > 0:
            snr = (a_t / s_t).square().view(b)
            w = torch.clamp(snr, max=min_snr)
            w = w / snr if prediction == "eps" else w / (snr + 1.0)
            per_example = w * per_example
        return per_example.mean()

    loss_c = r.compile(loss_fn)
    gen = torch.Generator(device="cpu").manual_seed(0)
    width = shape[-1] if not latent else 2 * shape[-1]
    batches = [r.images(torch.randn(a.batch, width, shape[0], shape[1], generator=gen).to(r.device))
               for _ in range(2)]
    labels = [torch.randint(0, max(num_classes, 1), (a.batch,), generator=gen).to(r.device)
              for _ in range(2)]
    state = {"i": 0, "n": 0}

    def step():
        i = state["i"]
        state["i"] += 1
        loss = loss_c(batches[i % 2], labels[i % 2])
        loss.backward()
        gn = (torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm) if o.grad_clip_norm > 0
              else None)
        lr = o.lr * min(1.0, state["n"] / o.warmup_steps) if o.warmup_steps > 0 else o.lr
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = float(config.ema.decay)
        if config.ema.warmup:
            decay = min(decay, (1.0 + state["n"]) / (10.0 + state["n"]))
        with torch.no_grad():
            torch._foreach_lerp_(ema, live, 1.0 - decay)
        state["n"] += 1
        state.update(loss=loss.detach(), grad_norm=gn)

    t = r.time(step, a.steps, a.warmup)
    return r.report(
        "unet_step", spec, a.batch, a.steps, a.warmup, t, a.batch, input_shape=list(shape),
        params=n, params_ours=ours, remat=False, last_loss=float(state["loss"]),
        grad_norm=float(state["grad_norm"]) if state["grad_norm"] is not None else None,
        diffusers_config=dcfg)


def bench_sample(a, r: Runner, spec: str, config) -> dict:
    torch = r.torch
    _, shape, unet, dcfg, n, ours = unet_setup(config, a.param_check)
    latent = config.space == "latent"
    ae = make_autoencoder(config_lib_vae().model) if latent else None
    n_ae = count(ae) if latent else None
    unet = r.to(unet.eval())
    unet_fn = r.compile(unet)
    decode = r.compile(r.to(_decode_cls()(ae).eval())) if latent else None
    s = config.sampling
    if s.sampler != "ddim":
        raise SystemExit(f"only the DDIM sampler is implemented here, the config asks for {s.sampler!r}")
    steps_n, eta = int(s.num_steps), float(s.eta)
    if eta != 0:
        raise SystemExit("only eta = 0 (deterministic DDIM) is implemented here")
    ac = _alphas_cumprod(config)
    T = int(config.diffusion.num_timesteps)
    ts = [i * (T // steps_n) for i in range(steps_n)][::-1]  # leading spacing, no offset
    a_t = [float(ac[t]) for t in ts]
    a_prev = a_t[1:] + [1.0]  # the last step goes to alpha_bar = 1
    b = a.batch
    num_classes, cfg_scale = int(config.model.num_classes), float(s.cfg_scale)
    guided = bool(num_classes) and cfg_scale != 1.0
    y = (torch.arange(b, device=r.device) % max(num_classes, 1)) if num_classes else None
    y_in = torch.cat([y, torch.full_like(y, num_classes)]) if guided else y
    t_in = [torch.full((2 * b if guided else b,), t, device=r.device, dtype=torch.long) for t in ts]
    z_shape = (b, shape[2], shape[0], shape[1])
    scale = 0.18215  # as ldm_jax.bench's sampler
    pred = config.diffusion.prediction
    out = {}

    @torch.no_grad()
    def call():
        x = torch.randn(z_shape, device=r.device)
        for i in range(steps_n):
            xin = torch.cat([x, x]) if guided else x
            with r.amp():
                o = unet_fn(r.images(xin), t_in[i], class_labels=y_in).sample
            o = o.float()
            if guided:
                cond, uncond = o.chunk(2)
                o = uncond + cfg_scale * (cond - uncond)
            sa, ss = math.sqrt(a_t[i]), math.sqrt(1.0 - a_t[i])
            if pred == "eps":
                x0, eps = (x - ss * o) / sa, o
            else:  # v
                x0, eps = sa * x - ss * o, ss * x + sa * o
            x = math.sqrt(a_prev[i]) * x0 + math.sqrt(1.0 - a_prev[i]) * eps
        if latent:
            with r.amp():
                x = decode(r.images(x / scale))
        out["x"] = x.float().clamp(-1.0, 1.0)

    t = r.time(call, a.steps, a.warmup)
    x = out["x"].permute(0, 2, 3, 1)
    return r.report(
        "sample_ddim", spec, b, a.steps, a.warmup, t, b, sampler="ddim", sampler_steps=steps_n,
        cfg_scale=cfg_scale, output_shape=list(x.shape), finite=bool(torch.isfinite(x).all()),
        decoded=latent, params=n, params_ours=ours, ae_params=n_ae,
        note="random weights: timing only", diffusers_config=dcfg)


BENCH = {"vae": bench_vae, "unet": bench_unet, "sample": bench_sample}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--mode", choices=("eager", "compile"), default="eager")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, reduce-overhead, max-autotune, ...")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="bf16: torch.autocast(bfloat16), fp32 params; auto: the config's dtype")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--config", default=None, help="config file[:variant] (default per workload)")
    p.add_argument("--tiny", action="store_true", help="the configs' :tiny variants (CPU tests)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as ldm_jax.bench --set")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="calls after the first (compiling) one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for convs")
    p.add_argument("--fused-optim", action="store_true", help="fused Adam/AdamW (default: foreach)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="fp32 matmuls/convs without TF32 (matters for --dtype fp32 only)")
    p.add_argument("--no-param-check", dest="param_check", action="store_false",
                   help="go on when the PyTorch and ldm_jax parameter counts differ")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    a = p.parse_args(argv)
    _, _, batch, steps = WORKLOADS[a.workload]
    a.batch, a.steps = a.batch or batch, a.steps or steps
    if a.steps < 1 or a.batch < 1 or a.warmup < 0:
        p.error("--steps and --batch must be >= 1, --warmup >= 0")
    torch = _torch()
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = dict(kv.split("=", 1) for kv in a.set)
    spec, config = load_config(a.workload, a.config, a.tiny, overrides)
    dtype = config.dtype if a.dtype == "auto" else DTYPES[a.dtype]
    if dtype not in ("bfloat16", "float32"):
        p.error(f"dtype {dtype!r}: only bfloat16 (autocast) and float32 are supported")
    runner = Runner(a, dtype)
    result = BENCH[a.workload](a, runner, spec, config)
    from ldm_jax.bench import print_json

    print_json(result, a.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
