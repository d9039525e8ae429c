"""Config schema, loading and validation shared by ``configs/*.py`` and the trainers.

Every experiment file in ``configs/`` defines ``get_config(arg)`` on top of
:func:`vae_base_config`; :func:`validate_vae_config` rejects keys the schema does not know
and values that cannot work, with a message that names the key.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")


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
            remat=False,
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
            grad_clip_norm=0.0,  # 0 disables
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
    c.num_image_samples = 8
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.compilation_cache_dir = "~/.cache/ldm_jax/xla"
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


def with_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    arg = (arg or "").strip()
    if arg not in VARIANTS:
        raise ValueError(f"unknown config variant {arg!r}; choose one of {sorted(k for k in VARIANTS if k)}")
    if VARIANTS[arg] is not None:
        VARIANTS[arg](c)
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


def validate_vae_config(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ``ValueError`` listing every unknown key and impossible value."""
    errors = _check_keys(c, vae_base_config(), "")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

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
    for k in ("log_every_steps", "eval_every_steps", "image_every_steps", "checkpoint_every_steps"):
        need(c[k] >= 1, f"{k} must be >= 1")
    need(c.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    need(c.data.source in ("embedded", "folder", "tfds"),
         f"data.source must be 'embedded', 'folder' or 'tfds', got {c.data.source!r}")
    if c.data.source == "folder":
        need(bool(c.data.path), "data.source='folder' needs data.path (a directory of images)")
    if c.data.source == "tfds":
        need(bool(c.data.tfds_name), "data.source='tfds' needs data.tfds_name, e.g. 'imagenette/320px-v2'")
    if num_devices is not None:
        need(c.global_batch_size % num_devices == 0,
             f"global_batch_size={c.global_batch_size} is not divisible by the {num_devices} devices "
             f"of the mesh; use a multiple of {num_devices}")
        need(c.eval_batch_size % num_devices == 0,
             f"eval_batch_size={c.eval_batch_size} is not divisible by the {num_devices} devices; "
             f"use a multiple of {num_devices}")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))
