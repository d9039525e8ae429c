"""Config schema, loading and validation shared by ``configs/*.py`` and the trainers.

Every experiment file in ``configs/`` defines ``get_config(arg)`` on top of
:func:`vae_base_config`; :func:`validate_vae_config` rejects keys the schema does not know
and values that cannot work, with a message that names the key.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config (or the data it names) that cannot run: unknown keys, impossible values, a
    missing data folder. ``train.py`` prints the message alone, without a traceback."""


DTYPES = ("float32", "bfloat16", "float16")
# JAX's persistent compilation cache: the configs' default, and the command-line tools'.
DEFAULT_COMPILATION_CACHE_DIR = "~/.cache/ldm_jax/xla"


def vae_base_config() -> ml_collections.ConfigDict:
    """SD / CompVis KL-f8 VAE-GAN recipe (``autoencoder_kl_32x32x4``) at 256x256."""
    c = ml_collections.ConfigDict()
    c.trainer = "vae_gan"
    c.name = "vae_f8"
    c.seed = 0
    c.num_train_steps = 200_000
    c.global_batch_size = 8
    c.dtype = "bfloat16"  # activations; GroupNorm statistics, softmax and losses stay fp32
    c.param_dtype = "float32"
    # Start the autoencoder from these weights (fine-tuning): a converted pretrained
    # directory (python -m ldm_jax.convert autoencoder-import ...) or a VAE-GAN workdir.
    # Used only when the workdir has no checkpoint yet; the discriminator starts fresh.
    c.init_from = ""

    c.model = ml_collections.ConfigDict(
        dict(
            in_channels=3,
            out_channels=3,
            ch=128,
            ch_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attn_resolutions=(),
            dropout=0.0,
            resolution=256,
            z_channels=4,
            embed_dim=4,
            double_z=True,
            remat=False,  # rematerialise each ResnetBlock in the backward pass
            # what a rematerialised block keeps: "full" (nothing: least memory) or "minimal"
            # (conv outputs + GroupNorm statistics: recomputes only elementwise work)
            remat_policy="full",
        )
    )
    c.disc = ml_collections.ConfigDict(dict(in_channels=3, ndf=64, n_layers=3))
    c.loss = ml_collections.ConfigDict(
        dict(
            kl_weight=1e-6,
            perceptual_weight=1.0,
            logvar_init=0.0,
            disc_start=50_001,
            disc_factor=1.0,
            disc_weight=0.5,
            disc_loss="hinge",  # or "vanilla"
            gen_loss="hinge",  # CompVis -mean(D(x_hat)); or "non_saturating"
            max_adaptive_weight=1e4,
            # LPIPS weights: converted .npz path; "" looks in the cache dir (and converts /
            # downloads the PyTorch files there). What to do when none can be had:
            # "error" (default), or, only when asked for explicitly, "random" (random VGG
            # features) or "disable" (no perceptual term).
            lpips_weights="",
            lpips_missing="error",
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            base_lr=4.5e-6,
            scale_lr_by_batch=True,  # lr = base_lr * global_batch_size (CompVis)
            disc_lr_mult=1.0,
            b1=0.5,
            b2=0.9,
            warmup_steps=0,
            # after warm-up: "constant" (CompVis), "cosine" or "linear" decay to
            # min_lr_ratio * lr at num_train_steps
            lr_decay="constant",
            min_lr_ratio=0.0,
            grad_clip_norm=0.0,  # 0 disables
            # k > 1: each step runs the global batch as k microbatches, one after another,
            # and applies their mean gradient once (activation memory of global/k images)
            grad_accum_steps=1,
        )
    )
    # Mesh axis sizes; -1 takes the remaining devices. The batch is split over both axes.
    # num_devices: use only the first N devices (-1: all of them).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=-1))
    c.data = ml_collections.ConfigDict(
        dict(
            source="embedded",
            path="",
            tfds_name="",
            tfds_data_dir="",
            image_key="image",
            label_key="label",  # tfds class feature (class-conditional models); "" for none
            train_split="train",
            eval_split="validation",
            eval_holdout=0.01,
            resize_short_side=0,
            random_crop=True,
            random_flip=True,
            worker_count=0,
            prefetch=2,
        )
    )
    c.log_every_steps = 50
    c.eval_every_steps = 5_000
    c.num_eval_images = 64
    c.eval_batch_size = 8
    c.image_every_steps = 5_000
    c.num_image_samples = 8  # reconstructions in each grid; 0: no grids
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.compilation_cache_dir = DEFAULT_COMPILATION_CACHE_DIR
    return c


def apply_tiny(c: ml_collections.ConfigDict) -> None:
    """A few-second CPU run used by the tests: 32x32 images, narrow model."""
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.resolution = 32
    c.model.attn_resolutions = ()
    c.disc.ndf = 8
    c.disc.n_layers = 2
    c.dtype = "float32"
    c.global_batch_size = 8
    c.num_train_steps = 4
    c.loss.disc_start = 2
    c.loss.lpips_missing = "random"
    c.optim.base_lr = 1e-4
    c.log_every_steps = 1
    c.eval_every_steps = 4
    c.num_eval_images = 8
    c.eval_batch_size = 8
    c.image_every_steps = 4
    c.num_image_samples = 4
    c.checkpoint_every_steps = 2
    c.compilation_cache_dir = ""


def apply_demo(c: ml_collections.ConfigDict) -> None:
    """Embedded photos at 64x64 with a narrow model: visible progress in minutes on CPU."""
    c.model.ch = 32
    c.model.num_res_blocks = 1
    c.model.resolution = 64
    c.disc.ndf = 32
    c.dtype = "float32"
    c.global_batch_size = 8
    c.num_train_steps = 600
    c.loss.disc_start = 301
    c.loss.lpips_missing = "disable"
    c.optim.base_lr = 2e-5
    c.data.source = "embedded"
    c.data.resize_short_side = 128
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.image_every_steps = 100
    c.num_eval_images = 16
    c.checkpoint_every_steps = 100


VARIANTS = {"": None, "tiny": apply_tiny, "demo": apply_demo}


def with_variant(c: ml_collections.ConfigDict, arg: str | None,
                 variants: dict | None = None) -> ml_collections.ConfigDict:
    variants = VARIANTS if variants is None else variants
    arg = (arg or "").strip()
    if arg not in variants:
        raise ConfigError(f"unknown config variant {arg!r}; choose one of {sorted(k for k in variants if k)}")
    if variants[arg] is not None:
        variants[arg](c)
        c.name = f"{c.name}_{arg}"
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:arg]`` the way ``--config=`` does (for tests and tools)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec_ = importlib.util.spec_from_file_location("_ldm_jax_config", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config(arg or None)


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str | None:
    """``None`` if the dotted ``key`` names a field of ``config``; else what is wrong with it:
    the first part that does not exist, the closest names and the keys that do exist there."""
    import difflib

    node, done = config, []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"unknown config key {key!r}: {'.'.join(done)} is a value, not a group"
        if part not in node:
            where = f"in {'.'.join(done)}" if done else "at the top level"
            names = sorted(node.keys())
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr('.'.join(done + [c])) for c in close)}?" if close else ""
            return f"unknown config key {key!r}{hint} (keys {where}: {', '.join(names)})"
        node = node[part]
        done.append(part)
    return None


# Second names of fields (ml_collections FieldReferences): listed once, under the first name.
ALIASES = {"autoencoder_workdir": "autoencoder_path"}


def as_plain(config: ml_collections.ConfigDict) -> dict:
    """The config as JSON-compatible nested dicts (what checkpoints record of their run)."""
    import json

    return json.loads(config.to_json_best_effort())


def config_changes(saved: dict, config: ml_collections.ConfigDict, *, limit: int = 12) -> list[str]:
    """``"key old -> new"`` for every dotted field whose value differs between ``saved`` (an
    earlier run's :func:`as_plain`) and ``config``, fields only one of them has included
    (at most ``limit`` entries, then ``"... and N more"``)."""
    def flat(d: Any, prefix: str = "") -> dict:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    absent = object()

    def show(v: Any) -> str:
        if v is absent:
            return "(absent)"
        text = repr(tuple(v) if isinstance(v, list) else v)
        return text if len(text) <= 40 else text[:37] + "..."

    old, new = flat(saved), flat(as_plain(config))
    changes = []
    for key in sorted((set(old) | set(new)) - set(ALIASES)):
        a, b = old.get(key, absent), new.get(key, absent)
        if a != b:
            changes.append(f"{key} {show(a)} -> {show(b)}")
    if len(changes) > limit:
        changes = changes[:limit] + [f"... and {len(changes) - limit} more"]
    return changes


def set_fields(config: ml_collections.ConfigDict, overrides: dict, *, parse: bool = False):
    """Set dotted fields (``{"model.remat": True, "mesh.fsdp": 4}``) in place; returns ``config``.

    With ``parse``, values are strings (``--set key=value``) converted to the type of the
    field they replace (bools from 1/true, tuples from "1,2,4", else the field's type)."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        try:
            for p in path:
                node = node[p]
            if parse:
                cur = node[last]
        except (KeyError, AttributeError) as e:
            raise ConfigError(unknown_key_message(config, key) or f"unknown config key {key!r}") from e
        if parse:
            if isinstance(cur, bool):
                value = str(value) in ("1", "true", "True")
            elif isinstance(cur, (tuple, list)):
                value = tuple(int(x) for x in str(value).strip("()[]").split(",") if x.strip())
            else:
                value = type(cur)(value)
        node[last] = value
    return config


def _check_keys(cfg: Any, ref: Any, prefix: str) -> list[str]:
    errors = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in ref:
            close = [k for k in ref.keys() if k[:3] == key[:3]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            errors.append(f"unknown config key '{name}'{hint}")
        elif isinstance(ref[key], ml_collections.ConfigDict):
            if not isinstance(cfg[key], ml_collections.ConfigDict):
                errors.append(f"config key '{name}' must be a group of settings")
            else:
                errors.extend(_check_keys(cfg[key], ref[key], name + "."))
    return errors


INTERVAL_KEYS = (
    "log_every_steps", "eval_every_steps", "image_every_steps", "checkpoint_every_steps"
)
DATA_SOURCES = ("embedded", "folder", "tfds")
LR_DECAYS = ("constant", "cosine", "linear")
# model.remat_policy: what a rematerialised block keeps (ldm_jax.models.layers.remat_policy)
REMAT_POLICIES = ("full", "minimal")


def _raise_if_invalid(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _start_validation(c: ml_collections.ConfigDict, ref: ml_collections.ConfigDict,
                      errors: list[str]) -> Callable[[bool, str], None]:
    """Raise for unknown keys of ``c`` (vs ``ref``); else return ``need(cond, msg)``, which
    records ``msg`` in ``errors`` when ``cond`` is false."""
    errors.extend(_check_keys(c, ref, ""))
    _raise_if_invalid(errors)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    return need


def _check_run_settings(c: ml_collections.ConfigDict, need: Callable[[bool, str], None],
                        num_devices: int | None, counts: tuple[str, ...] = ()) -> None:
    """The checks every trainer's config shares, so that all report them alike, in order:

    * each ``INTERVAL_KEYS`` interval, then each key in ``counts``, is >= 1, and
      ``num_image_samples`` >= 0;
    * ``data.source`` is one of ``DATA_SOURCES``; a ``folder`` source needs ``data.path``
      and a ``tfds`` one ``data.tfds_name``;
    * with ``num_devices``, ``global_batch_size`` and ``eval_batch_size`` are divisible by it;
    * ``optim.lr_decay`` / ``min_lr_ratio`` are valid and a decay has steps after warm-up;
    * ``optim.grad_accum_steps`` is >= 1 and divides ``global_batch_size`` into microbatches
      that are divisible by ``num_devices``.
    """
    for k in INTERVAL_KEYS + tuple(counts):
        need(c[k] >= 1, f"{k} must be >= 1")
    need(c.num_image_samples >= 0, "num_image_samples must be >= 0 (0: no image grids)")
    need(c.data.source in DATA_SOURCES,
         f"data.source must be 'embedded', 'folder' or 'tfds', got {c.data.source!r}")
    if c.data.source == "folder":
        need(bool(c.data.path), "data.source='folder' needs data.path (a directory of images)")
    if c.data.source == "tfds":
        need(bool(c.data.tfds_name), "data.source='tfds' needs data.tfds_name, e.g. 'imagenette/320px-v2'")
    if num_devices is not None:
        for k in ("global_batch_size", "eval_batch_size"):
            need(c[k] % num_devices == 0,
                 f"{k}={c[k]} is not divisible by the {num_devices} devices of the mesh; "
                 f"use a multiple of {num_devices}")
    need(c.optim.lr_decay in LR_DECAYS,
         f"optim.lr_decay must be one of {LR_DECAYS}, got {c.optim.lr_decay!r}")
    need(0.0 <= c.optim.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {c.optim.min_lr_ratio}")
    if c.optim.lr_decay != "constant":
        need(c.optim.warmup_steps < c.num_train_steps,
             f"optim.lr_decay={c.optim.lr_decay!r} decays after the warm-up, but warmup_steps="
             f"{c.optim.warmup_steps} >= num_train_steps={c.num_train_steps}")
    accum = c.optim.grad_accum_steps
    accum_ok = isinstance(accum, int) and accum >= 1
    need(accum_ok, f"optim.grad_accum_steps must be an integer >= 1, got {accum!r}")
    if accum_ok and accum > 1:
        micro, rem = divmod(c.global_batch_size, accum)
        need(rem == 0, f"global_batch_size={c.global_batch_size} is not divisible by "
             f"optim.grad_accum_steps={accum}")
        if num_devices is not None and rem == 0:
            need(micro % num_devices == 0,
                 f"global_batch_size={c.global_batch_size} / optim.grad_accum_steps={accum} = {micro} "
                 f"images per microbatch, not divisible by the {num_devices} devices of the mesh; "
                 f"use a global_batch_size that is a multiple of {accum * num_devices}")


def validate_vae_config(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ``ConfigError`` listing every unknown key and impossible value."""
    errors: list[str] = []
    need = _start_validation(c, vae_base_config(), errors)

    need(c.trainer == "vae_gan", f"trainer must be 'vae_gan' for this config, got {c.trainer!r}")
    need(c.num_train_steps >= 1, "num_train_steps must be >= 1")
    need(c.global_batch_size >= 1, "global_batch_size must be >= 1")
    need(c.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {c.dtype!r}")
    need(c.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {c.param_dtype!r}")
    m = c.model
    need(len(m.ch_mult) >= 1, "model.ch_mult must not be empty")
    factor = 2 ** (len(m.ch_mult) - 1)
    need(m.resolution % factor == 0,
         f"model.resolution={m.resolution} must be divisible by the downsampling factor {factor}")
    widths = [m.ch] + [m.ch * k for k in m.ch_mult]
    need(all(w % 32 == 0 for w in widths),
         f"model channel widths {widths} must be multiples of 32 (GroupNorm with 32 groups)")
    need(m.z_channels >= 1 and m.embed_dim >= 1, "model.z_channels and model.embed_dim must be >= 1")
    need(bool(m.double_z), "model.double_z must be True for the KL autoencoder")
    need(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    need(m.remat_policy in REMAT_POLICIES,
         f"model.remat_policy must be one of {REMAT_POLICIES}, got {m.remat_policy!r}")
    need(c.disc.n_layers >= 1 and c.disc.ndf >= 1, "disc.n_layers and disc.ndf must be >= 1")
    L = c.loss
    need(L.disc_loss in ("hinge", "vanilla"), f"loss.disc_loss must be 'hinge' or 'vanilla', got {L.disc_loss!r}")
    need(L.gen_loss in ("hinge", "non_saturating"),
         f"loss.gen_loss must be 'hinge' or 'non_saturating', got {L.gen_loss!r}")
    need(L.lpips_missing in ("error", "random", "disable"),
         f"loss.lpips_missing must be 'error', 'random' or 'disable', got {L.lpips_missing!r}")
    need(L.kl_weight >= 0 and L.perceptual_weight >= 0 and L.disc_weight >= 0,
         "loss weights must be >= 0")
    need(L.max_adaptive_weight > 0, "loss.max_adaptive_weight must be > 0")
    need(c.optim.base_lr > 0, "optim.base_lr must be > 0")
    need(0 <= c.optim.b1 < 1 and 0 <= c.optim.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
    need(c.optim.warmup_steps >= 0 and c.optim.grad_clip_norm >= 0,
         "optim.warmup_steps and optim.grad_clip_norm must be >= 0")
    _check_run_settings(c, need, num_devices, ("keep_checkpoints",))
    _raise_if_invalid(errors)


# ----------------------------------------------------------------------------------------
# Latent diffusion (second stage)
# ----------------------------------------------------------------------------------------

LDM_PREDICTIONS = ("eps", "v")
LDM_SCHEDULES = ("linear", "scaled_linear", "cosine")
LDM_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
LDM_SPACES = ("latent", "pixel")


def ldm_base_config() -> ml_collections.ConfigDict:
    """Latent diffusion on a frozen KL-f8 autoencoder (32x32x4 latents of 256x256 images).

    U-Net: the ~270M ADM-style model (224 channels, mult (1,2,3,4), attention at factors
    2/4/8, 32-channel heads); SD-style scaled-linear betas 0.00085 -> 0.012; eps prediction.
    """
    c = ml_collections.ConfigDict()
    c.trainer = "ldm"
    c.name = "ldm_f8"
    c.seed = 0
    c.num_train_steps = 400_000
    c.global_batch_size = 64
    c.dtype = "bfloat16"
    c.param_dtype = "float32"
    # "latent": diffusion on the autoencoder's latents; "pixel": the same U-Net on pixels
    # (the baseline of the latent-vs-pixel comparison; no autoencoder).
    c.space = "latent"
    # A VAE-GAN workdir (its latest checkpoint) or a converted pretrained directory
    # (`python -m ldm_jax.convert autoencoder-import ...`). Required for space="latent".
    c.autoencoder_path = ""
    c.autoencoder_workdir = c.get_ref("autoencoder_path")  # the same field under a second name
    c.image_resolution = 256  # images fed to the encoder (and decoded samples)
    # Start the U-Net from these weights: a converted pretrained directory
    # (python -m ldm_jax.convert unet-import ...) or an LDM workdir (its EMA weights).
    # Used only when the workdir has no checkpoint yet.
    c.init_from = ""
    c.latent = ml_collections.ConfigDict(dict(
        scale_factor=0.0,  # 0: 1/std of the first batch's latents (LDM scale_by_std); SD VAE: 0.18215
        sample_posterior=True,  # z ~ q(z|x) (CompVis) rather than its mean
        cache=False,  # encode the (center-cropped, and flipped) training set once, then train from the cache
        cache_max_images=100_000,
    ))
    c.model = ml_collections.ConfigDict(dict(
        in_channels=-1,  # -1: the latent channels (or 3 for pixels)
        out_channels=-1,
        model_channels=224,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=2,
        attention_resolutions=(2, 4, 8),
        num_head_channels=32,
        num_heads=-1,
        dropout=0.0,
        num_classes=0,  # 0: unconditional; N: class-conditional with a null class for CFG
        use_scale_shift_norm=True,
        norm_eps=1e-5,
        norm_groups=32,
        remat=False,  # rematerialise each ResBlock / attention block in the backward pass
        remat_policy="full",  # or "minimal": keep conv / projection outputs (see vae_base_config)
        attention_impl="auto",  # "auto" | "xla" | "cudnn" (flash attention, CUDA GPUs)
    ))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="scaled_linear",
        num_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        prediction="eps",
        min_snr_gamma=0.0,  # > 0: min-SNR-gamma loss weighting (e.g. 5.0)
        label_dropout=0.1,  # classifier-free guidance training: p(label -> null class)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4,
        b1=0.9,
        b2=0.999,
        weight_decay=0.0,
        warmup_steps=1_000,
        lr_decay="constant",  # or "cosine" / "linear" to min_lr_ratio * lr at num_train_steps
        min_lr_ratio=0.0,
        grad_clip_norm=1.0,  # 0 disables
        grad_accum_steps=1,  # k > 1: the global batch as k sequential microbatches per step
    ))
    c.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=True))  # warmup: min(decay, (1+n)/(10+n))
    c.sampling = ml_collections.ConfigDict(dict(
        sampler="ddim", num_steps=50, eta=0.0, cfg_scale=1.5,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=-1))
    c.data = vae_base_config().data
    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.num_eval_images = 256
    c.eval_batch_size = 64
    c.image_every_steps = 5_000
    c.num_image_samples = 16  # samples in each grid; 0: no grids
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.compilation_cache_dir = DEFAULT_COMPILATION_CACHE_DIR
    return c


def apply_ldm_tiny(c: ml_collections.ConfigDict) -> None:
    """Seconds on CPU (tests): 32x32 images, 8x8x4 latents of a tiny autoencoder, tiny U-Net."""
    c.image_resolution = 32
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (2,)
    c.model.num_head_channels = 16
    c.dtype = "float32"
    c.global_batch_size = 8
    c.num_train_steps = 4
    c.optim.warmup_steps = 0
    c.optim.lr = 1e-3
    c.sampling.num_steps = 4
    c.log_every_steps = 1
    c.eval_every_steps = 4
    c.num_eval_images = 8
    c.eval_batch_size = 8
    c.image_every_steps = 4
    c.num_image_samples = 8
    c.checkpoint_every_steps = 2
    c.compilation_cache_dir = ""


def apply_ldm_demo(c: ml_collections.ConfigDict) -> None:
    """Embedded photos, 64x64 images: a small U-Net that visibly learns in minutes on CPU."""
    c.image_resolution = 64
    c.model.model_channels = 64
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (2,)
    c.model.num_head_channels = 32
    c.model.num_classes = 9  # each embedded photo is a class
    c.dtype = "float32"
    c.global_batch_size = 8
    c.num_train_steps = 2_000
    c.optim.warmup_steps = 100
    c.optim.lr = 2e-4
    c.ema.decay = 0.999
    c.sampling.num_steps = 25
    c.sampling.cfg_scale = 3.0
    c.data.resize_short_side = 128
    c.log_every_steps = 20
    c.eval_every_steps = 250
    c.num_eval_images = 16
    c.eval_batch_size = 8
    c.image_every_steps = 250
    c.num_image_samples = 8
    c.checkpoint_every_steps = 250


LDM_VARIANTS = {"": None, "tiny": apply_ldm_tiny, "demo": apply_ldm_demo}


def validate_ldm_config(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ``ConfigError`` listing every unknown key and impossible value of an LDM config."""
    errors: list[str] = []
    need = _start_validation(c, ldm_base_config(), errors)

    need(c.trainer == "ldm", f"trainer must be 'ldm' for this config, got {c.trainer!r}")
    need(c.space in LDM_SPACES, f"space must be one of {LDM_SPACES}, got {c.space!r}")
    if c.space == "latent":
        need(bool(c.autoencoder_path),
             "autoencoder_path is empty: set --config.autoencoder_path to a VAE-GAN workdir "
             "(python train.py --config=configs/vae_f8.py ...) or a converted autoencoder "
             "(python -m ldm_jax.convert autoencoder-import ...)")
    need(c.num_train_steps >= 1 and c.global_batch_size >= 1,
         "num_train_steps and global_batch_size must be >= 1")
    need(c.dtype in DTYPES and c.param_dtype in DTYPES, f"dtype and param_dtype must be in {DTYPES}")
    m = c.model
    need(len(m.channel_mult) >= 1 and m.num_res_blocks >= 1, "model.channel_mult and num_res_blocks must be non-empty/>= 1")
    widths = [m.model_channels * k for k in m.channel_mult]
    need(all(w % m.norm_groups == 0 for w in widths),
         f"model widths {widths} must be multiples of model.norm_groups={m.norm_groups}")
    if m.num_head_channels > 0:
        need(all(w % m.num_head_channels == 0 for w in widths),
             f"model widths {widths} must be multiples of model.num_head_channels={m.num_head_channels}")
    need(m.num_classes >= 0, "model.num_classes must be >= 0 (0 = unconditional)")
    need(0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)")
    need(m.remat_policy in REMAT_POLICIES,
         f"model.remat_policy must be one of {REMAT_POLICIES}, got {m.remat_policy!r}")
    d = c.diffusion
    need(d.schedule in LDM_SCHEDULES, f"diffusion.schedule must be one of {LDM_SCHEDULES}, got {d.schedule!r}")
    need(d.prediction in LDM_PREDICTIONS, f"diffusion.prediction must be one of {LDM_PREDICTIONS}, got {d.prediction!r}")
    need(d.num_timesteps >= 2, "diffusion.num_timesteps must be >= 2")
    need(0.0 <= d.label_dropout < 1.0, "diffusion.label_dropout must be in [0, 1)")
    need(d.min_snr_gamma >= 0, "diffusion.min_snr_gamma must be >= 0")
    s = c.sampling
    need(s.sampler in LDM_SAMPLERS, f"sampling.sampler must be one of {LDM_SAMPLERS}, got {s.sampler!r}")
    need(1 <= s.num_steps <= d.num_timesteps, "sampling.num_steps must be in [1, diffusion.num_timesteps]")
    need(s.cfg_scale >= 0, "sampling.cfg_scale must be >= 0")
    need(0.0 < c.ema.decay < 1.0, "ema.decay must be in (0, 1)")
    need(c.latent.scale_factor >= 0, "latent.scale_factor must be >= 0 (0 = estimate from data)")
    need(c.optim.lr > 0 and c.optim.warmup_steps >= 0 and c.optim.grad_clip_norm >= 0,
         "optim.lr must be > 0, warmup_steps and grad_clip_norm >= 0")
    _check_run_settings(c, need, num_devices,
                        ("keep_checkpoints", "num_eval_images"))
    _raise_if_invalid(errors)
