"""Convert torchvision VGG16 + LPIPS v0.1 linear heads into one ``.npz`` for our LPIPS.

Inputs (read without torch, via ``torch_pickle``):

* torchvision ``vgg16-397923af.pth``: keys ``features.{0,2,5,...,28}.{weight,bias}``
  (OIHW conv kernels); ``classifier.*`` is ignored.
* lpips ``weights/v0.1/vgg.pth``: keys ``lin{0..4}.model.1.weight`` of shape [1, C, 1, 1].

Output keys follow the module tree of ``ldm_jax.models.lpips.LPIPS``:
``vgg/conv{b}_{i}/kernel`` (HWIO), ``vgg/conv{b}_{i}/bias``, ``lin{k}/weight`` ([C]).

CLI::

    python -m ldm_jax.convert.lpips_weights --vgg16 vgg16-397923af.pth \\
        --heads vgg.pth [--out ~/.cache/ldm_jax/lpips_vgg16_v0.1.npz]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.convert.torch_pickle import load_torch_state_dict, unwrap_state_dict
from ldm_jax.weights_cache import default_cache_dir, save_npz_atomic

__all__ = [
    "VGG16_LAYERS",
    "HEAD_CHANNELS",
    "convert_vgg16",
    "convert_lpips_heads",
    "convert_lpips_files",
    "write_lpips_npz",
    "main",
]

# (our conv name, torchvision features index, in channels, out channels), in order.
VGG16_LAYERS: tuple[tuple[str, int, int, int], ...] = (
    ("conv1_1", 0, 3, 64),
    ("conv1_2", 2, 64, 64),
    ("conv2_1", 5, 64, 128),
    ("conv2_2", 7, 128, 128),
    ("conv3_1", 10, 128, 256),
    ("conv3_2", 12, 256, 256),
    ("conv3_3", 14, 256, 256),
    ("conv4_1", 17, 256, 512),
    ("conv4_2", 19, 512, 512),
    ("conv4_3", 21, 512, 512),
    ("conv5_1", 24, 512, 512),
    ("conv5_2", 26, 512, 512),
    ("conv5_3", 28, 512, 512),
)
# Input channels of the five LPIPS heads (relu1_2 ... relu5_3).
HEAD_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


def check_keys(
    what: str,
    arrays: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore_prefixes: tuple[str, ...] = (),
    partial: bool = False,
) -> None:
    """Raise one ValueError listing unknown, missing (unless ``partial``) and wrongly
    shaped keys of ``arrays`` against the ``expected`` shapes."""
    unknown = sorted(k for k in arrays if k not in expected and not k.startswith(ignore_prefixes))
    missing = [] if partial else sorted(k for k in expected if k not in arrays)
    mismatched = sorted(
        f"{k}: got {tuple(np.shape(arrays[k]))}, expected {tuple(shape)}"
        for k, shape in expected.items()
        if k in arrays and tuple(np.shape(arrays[k])) != tuple(shape)
    )
    if unknown or missing or mismatched:
        parts = []
        if unknown:
            parts.append(f"unknown keys {unknown}")
        if missing:
            parts.append(f"missing keys {missing}")
        if mismatched:
            parts.append(f"shape mismatches [{'; '.join(mismatched)}]")
        raise ValueError(f"{what}: " + ", ".join(parts))


def convert_vgg16(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchvision vgg16 state dict -> ``{'vgg/convB_I/kernel': HWIO, '.../bias': [O]}``."""
    sd = unwrap_state_dict(state_dict)
    expected: dict[str, tuple[int, ...]] = {}
    for _name, idx, cin, cout in VGG16_LAYERS:
        expected[f"features.{idx}.weight"] = (cout, cin, 3, 3)
        expected[f"features.{idx}.bias"] = (cout,)
    check_keys("torchvision VGG16 state dict", sd, expected, ignore_prefixes=("classifier.",))
    out: dict[str, np.ndarray] = {}
    for name, idx, _cin, _cout in VGG16_LAYERS:
        w = np.asarray(sd[f"features.{idx}.weight"], dtype=np.float32)
        out[f"vgg/{name}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        out[f"vgg/{name}/bias"] = np.asarray(sd[f"features.{idx}.bias"], dtype=np.float32)
    return out


def convert_lpips_heads(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """lpips v0.1 heads state dict -> ``{'lin{k}/weight': [C]}``."""
    sd = unwrap_state_dict(state_dict)
    expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(HEAD_CHANNELS)}
    check_keys("LPIPS heads state dict", sd, expected)
    out = {}
    for k in range(len(HEAD_CHANNELS)):
        w = np.asarray(sd[f"lin{k}.model.1.weight"], dtype=np.float32).reshape(-1)
        if np.any(w < 0):
            raise ValueError(f"LPIPS heads: lin{k} has negative weights; v0.1 heads are >= 0")
        out[f"lin{k}/weight"] = w
    return out


def convert_lpips_files(vgg16_pth: str, heads_pth: str) -> dict[str, np.ndarray]:
    """Read both ``.pth`` files (no torch needed) and return the combined arrays."""
    arrays = convert_vgg16(load_torch_state_dict(vgg16_pth))
    arrays.update(convert_lpips_heads(load_torch_state_dict(heads_pth)))
    return arrays


def write_lpips_npz(vgg16_pth: str, heads_pth: str, out_path: str) -> dict[str, np.ndarray]:
    """Convert both files and write them atomically to ``out_path``; returns the arrays."""
    arrays = convert_lpips_files(vgg16_pth, heads_pth)
    save_npz_atomic(arrays, out_path)
    return arrays


def main(argv: list[str] | None = None) -> int:
    from ldm_jax.models.lpips import LPIPS_NPZ_NAME

    default_out = os.path.join(default_cache_dir(), LPIPS_NPZ_NAME)
    parser = argparse.ArgumentParser(
        prog="python -m ldm_jax.convert.lpips_weights",
        description="Convert torchvision VGG16 + LPIPS v0.1 heads (.pth) to ldm_jax .npz.",
    )
    parser.add_argument("--vgg16", required=True, help="torchvision vgg16-397923af.pth")
    parser.add_argument("--heads", required=True, help="lpips weights/v0.1/vgg.pth")
    parser.add_argument("--out", default=default_out, help=f"output .npz (default {default_out})")
    args = parser.parse_args(argv)
    for flag, path in (("--vgg16", args.vgg16), ("--heads", args.heads)):
        if not os.path.isfile(path):
            parser.error(f"{flag}: no such file {path}")
    arrays = write_lpips_npz(args.vgg16, args.heads, args.out)
    n = sum(int(a.size) for a in arrays.values())
    print(f"wrote {args.out} ({len(arrays)} arrays, {n:,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
