"""Weight conversion CLI: ``python -m ldm_jax.convert <command> ...``.

Commands::

    autoencoder-import  PyTorch KL autoencoder (diffusers dir / .safetensors / SD .ckpt) -> pretrained dir
    autoencoder-export  pretrained dir or VAE-GAN workdir -> diffusers dir or CompVis weights
    unet-import         PyTorch U-Net (diffusers UNet2DModel dir / CompVis LDM .ckpt) -> pretrained dir
    unet-export         pretrained dir or LDM workdir (EMA) -> diffusers dir or CompVis weights
    lpips               torchvision VGG16 + LPIPS heads -> .npz (= python -m ldm_jax.convert.lpips_weights)

Adding a command is one decorated function::

    @command("unet-import", "what it does", arg("--src", required=True), arg("--out", required=True))
    def unet_import(args) -> int:
        ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable

PROG = "python -m ldm_jax.convert"


@dataclasses.dataclass
class Command:
    name: str
    help: str
    arguments: tuple
    run: Callable
    passthrough: bool = False  # hand the raw remaining argv to ``run`` (own parser)


COMMANDS: dict[str, Command] = {}


def arg(*flags, **kwargs) -> tuple:
    """One ``parser.add_argument(*flags, **kwargs)`` for ``command``."""
    return flags, kwargs


def command(name: str, help: str, *arguments: tuple, passthrough: bool = False):
    """Register ``fn(args: argparse.Namespace) -> int`` as subcommand ``name``
    (``passthrough``: ``fn(argv: list[str]) -> int`` parses its own arguments)."""

    def deco(fn):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = Command(name, help, arguments, fn, passthrough)
        return fn

    return deco


# ----------------------------------------------------------------------------- autoencoder


@command(
    "autoencoder-import",
    "PyTorch KL autoencoder (CompVis/SD or diffusers) -> ldm_jax pretrained directory",
    arg("--src", required=True,
        help="diffusers AutoencoderKL folder (or a pipeline folder with vae/), .safetensors, "
             "or .ckpt/.pth/.bin (full SD checkpoints: first_stage_model.* is used)"),
    arg("--out", required=True, help="pretrained directory to write"),
    arg("--layout", default="auto", choices=("auto", "compvis", "diffusers"),
        help="key naming of --src (default: detected)"),
    arg("--config", default=None,
        help="diffusers config.json describing --src (default: the folder's own, else the "
             "architecture is inferred from the weights)"),
    arg("--resolution", type=int, default=None,
        help="image resolution the attention levels refer to (default: config sample_size or 256)"),
    arg("--ignore-prefix", action="append", default=[],
        help="also ignore state-dict keys starting with this (repeatable)"),
)
def autoencoder_import(args: argparse.Namespace) -> int:
    from ldm_jax.convert import autoencoder_weights as aw
    from ldm_jax.pretrained import save_pretrained

    cfg, params, meta = aw.import_autoencoder(
        args.src, args.layout, config=args.config, resolution=args.resolution,
        ignore_prefixes=aw.DEFAULT_IGNORE_PREFIXES + tuple(args.ignore_prefix))
    extra = {k: meta[k] for k in ("layout", "scaling_factor", "shift_factor") if k in meta}
    save_pretrained(args.out, "autoencoder", aw.config_dict(cfg), params,
                    source=f"{meta['layout']}: {meta['source']}", extra=extra)
    n = sum(int(v.size) for v in aw._flatten(params).values())
    print(f"wrote {args.out}: AutoencoderKL ({meta['layout']} layout, {n:,} parameters)")
    print(f"  config: {json.dumps(aw.config_dict(cfg))}")
    if "scaling_factor" in meta:
        print(f"  latent scaling factor {meta['scaling_factor']}: train an LDM on it with "
              f"--config.autoencoder_path={args.out} --config.latent.scale_factor={meta['scaling_factor']}")
    if "shift_factor" in meta:
        print(f"  note: this VAE's latents also use shift_factor {meta['shift_factor']}, which "
              "ldm_jax's latent scaling does not apply")
    return 0


@command(
    "autoencoder-export",
    "ldm_jax autoencoder (pretrained dir or VAE-GAN workdir) -> diffusers folder or CompVis weights",
    arg("--src", required=True, help="pretrained directory or VAE-GAN training workdir"),
    arg("--format", required=True, choices=("diffusers", "compvis")),
    arg("--out", required=True,
        help="diffusers: output folder; compvis: .safetensors (or .ckpt/.pth, needs torch)"),
    arg("--prefix", action="store_true",
        help="compvis: name keys first_stage_model.* as in SD checkpoints"),
    arg("--scaling-factor", type=float, default=None,
        help="diffusers config scaling_factor (default: the imported one, else 0.18215)"),
    arg("--sample-size", type=int, default=None,
        help="diffusers config sample_size (default: the config's resolution)"),
)
def autoencoder_export(args: argparse.Namespace) -> int:
    from ldm_jax.convert import autoencoder_weights as aw
    from ldm_jax.models.autoencoder import AutoencoderConfig
    from ldm_jax.pretrained import load_params

    cfg_dict, params, where = load_params(args.src, "autoencoder")
    cfg = AutoencoderConfig.from_dict(cfg_dict)
    if args.format == "diffusers":
        meta = {}
        meta_file = os.path.join(args.src, "pretrained.json")
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                meta = json.load(f)
        scaling = args.scaling_factor if args.scaling_factor is not None else meta.get(
            "scaling_factor", 0.18215)
        aw.export_diffusers(params, cfg, args.out, scaling_factor=scaling,
                            sample_size=args.sample_size, shift_factor=meta.get("shift_factor"))
        print(f"wrote {args.out} from {where}: diffusers AutoencoderKL (scaling_factor {scaling}); "
              "load with diffusers.AutoencoderKL.from_pretrained")
    else:
        aw.export_compvis(params, cfg, args.out, prefix=aw.SD_PREFIX if args.prefix else "")
        print(f"wrote {args.out} from {where}: CompVis-named weights")
    return 0


# ----------------------------------------------------------------------------- unet


@command(
    "unet-import",
    "PyTorch diffusion U-Net (diffusers UNet2DModel or CompVis openaimodel) -> ldm_jax "
    "pretrained directory",
    arg("--src", required=True,
        help="diffusers UNet2DModel folder (or a pipeline folder with unet/), .safetensors, or "
             ".ckpt/.pth/.bin (LDM checkpoints: model.diffusion_model.* is used)"),
    arg("--out", required=True, help="pretrained directory to write"),
    arg("--layout", default="auto", choices=("auto", "compvis", "diffusers"),
        help="key naming of --src (default: detected)"),
    arg("--config", default=None,
        help="architecture: a diffusers config.json, a CompVis LDM .yaml (model.params."
             "unet_config), or an ldm_jax pretrained.json (default: the folder's own "
             "config.json, else inferred from the weights plus --num-head-channels/--num-heads)"),
    arg("--ema", action="store_true",
        help="LDM .ckpt: read the EMA copy (model_ema.*) instead of model.diffusion_model.*"),
    arg("--attention-order", default=None, choices=("legacy", "new"),
        help="CompVis fused qkv order (default: the CompVis config's use_new_attention_order, "
             "else legacy = QKVAttentionLegacy)"),
    arg("--num-head-channels", type=int, default=None,
        help="channels per attention head, when no --config says it"),
    arg("--num-heads", type=int, default=None,
        help="attention heads per block, when no --config says it"),
    arg("--norm-groups", type=int, default=32,
        help="GroupNorm groups, when no --config says it (CompVis: always 32)"),
)
def unet_import(args: argparse.Namespace) -> int:
    from ldm_jax.convert import autoencoder_weights as aw
    from ldm_jax.convert import unet_weights as uw
    from ldm_jax.pretrained import save_pretrained

    cfg, params, meta = uw.import_unet(
        args.src, args.layout, config=args.config, use_ema=args.ema,
        attention_order=args.attention_order, num_head_channels=args.num_head_channels,
        num_heads=args.num_heads, norm_groups=args.norm_groups)
    extra = {k: meta[k] for k in ("layout", "sample_size", "attention_order", "ema") if k in meta}
    save_pretrained(args.out, "unet", uw.config_dict(cfg), params,
                    source=f"{meta['layout']}: {meta['source']}", extra=extra)
    n = sum(int(v.size) for v in aw._flatten(params).values())
    print(f"wrote {args.out}: UNet ({meta['layout']} layout{', EMA' if args.ema else ''}, "
          f"{n:,} parameters)")
    print(f"  config: {json.dumps(uw.config_dict(cfg))}")
    if cfg.num_classes is not None:
        print(f"  class-conditional: {cfg.num_classes} labels + row {cfg.num_classes} used as the "
              "NULL class (pass labels explicitly if the source model had no null class)")
    return 0


@command(
    "unet-export",
    "ldm_jax U-Net (pretrained dir or LDM workdir) -> diffusers UNet2DModel folder or CompVis "
    "openaimodel weights",
    arg("--src", required=True, help="pretrained directory or LDM training workdir"),
    arg("--format", required=True, choices=("diffusers", "compvis")),
    arg("--out", required=True,
        help="diffusers: output folder; compvis: .safetensors (or .ckpt/.pth, needs torch)"),
    arg("--raw", action="store_true",
        help="LDM workdir: export the raw training weights instead of the EMA weights"),
    arg("--prefix", action="store_true",
        help="compvis: name keys model.diffusion_model.* as in LDM checkpoints"),
    arg("--attention-order", default="legacy", choices=("legacy", "new"),
        help="compvis: fused qkv order (legacy = QKVAttentionLegacy, openaimodel's default)"),
    arg("--sample-size", type=int, default=None,
        help="diffusers config sample_size (default: the imported one, else unset)"),
)
def unet_export(args: argparse.Namespace) -> int:
    from ldm_jax.convert import unet_weights as uw
    from ldm_jax.pretrained import load_params

    cfg_dict, params, where = load_params(args.src, "unet", use_ema=not args.raw)
    cfg = uw.config_for_params(cfg_dict, params)
    if args.format == "diffusers":
        meta = {}
        meta_file = os.path.join(args.src, "pretrained.json")
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                meta = json.load(f)
        size = args.sample_size or meta.get("sample_size")
        uw.export_diffusers(params, cfg, args.out, sample_size=size)
        print(f"wrote {args.out} from {where}: diffusers UNet2DModel (sample_size {size}); load "
              "with diffusers.UNet2DModel.from_pretrained")
    else:
        uw.export_compvis(params, cfg, args.out, prefix=uw.LDM_PREFIX if args.prefix else "",
                          attention_order=args.attention_order)
        print(f"wrote {args.out} from {where}: CompVis openaimodel-named weights "
              f"({args.attention_order} qkv order)")
    return 0


# ----------------------------------------------------------------------------- lpips


@command("lpips", "torchvision VGG16 + LPIPS v0.1 heads (.pth) -> .npz "
         "(arguments as python -m ldm_jax.convert.lpips_weights)", passthrough=True)
def lpips(argv: list[str]) -> int:
    from ldm_jax.convert.lpips_weights import main as lpips_main

    return lpips_main(argv)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Convert model weights to and "
                                     "from ldm_jax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                           add_help=not cmd.passthrough)
        for flags, kwargs in cmd.arguments:
            p.add_argument(*flags, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].passthrough:
        return int(COMMANDS[argv[0]].run(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        return int(cmd.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"{PROG} {cmd.name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
