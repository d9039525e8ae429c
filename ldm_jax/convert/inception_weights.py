"""Convert pytorch-fid's FID Inception weights to our ``.npz``; find/download/load them.

Source: ``pt_inception-2015-12-05-6726825d.pth``, the ``state_dict`` of pytorch-fid's
``fid_inception_v3()`` (torchvision ``Inception3(num_classes=1008, aux_logits=False)`` with
the FID blocks), read without torch by ``ldm_jax.convert.torch_pickle``. Keys such as
``Mixed_5b.branch1x1.conv.weight`` (OIHW), ``Mixed_5b.branch1x1.bn.{weight,bias,
running_mean,running_var}`` (``num_batches_tracked`` is ignored) and ``fc.{weight,bias}``
map onto the module tree of ``ldm_jax.models.inception.FIDInceptionV3``:
``Mixed_5b/branch1x1/conv/kernel`` (HWIO), ``Mixed_5b/branch1x1/bn/{scale,bias,mean,var}``,
``fc/kernel`` ([2048, 1008]) and ``fc/bias``.

``create_inception()`` looks for weights like ``ldm_jax.models.lpips.create_lpips`` (both use
``ldm_jax.weights_cache``): explicit path -> converted ``.npz`` in the cache dir
(``$LDM_JAX_CACHE`` or ``~/.cache/ldm_jax``) -> the ``.pth`` in the cache dir or torch hub's
checkpoint dir (where pytorch-fid itself downloads it) -> download (unless
``LDM_JAX_OFFLINE=1``) -> one error naming the file, its URL and where to put it.

CLI::

    python -m ldm_jax.convert.inception_weights pt_inception-2015-12-05-6726825d.pth \\
        [--out ~/.cache/ldm_jax/fid_inception_v3_2015-12-05.npz]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.convert.lpips_weights import check_keys
from ldm_jax.convert.torch_pickle import load_torch_state_dict, unwrap_state_dict
from ldm_jax.models.inception import FIDInceptionV3, inception_weights
from ldm_jax.models.lpips import set_frozen_weights
from ldm_jax.weights_cache import (
    default_cache_dir,
    download_if_online,
    download_notes_lines,
    find_weights_file,
    place_hint,
    save_npz_atomic,
    store_converted,
    torch_hub_checkpoints_dir,
)

__all__ = [
    "FID_WEIGHTS_URL",
    "INCEPTION_PTH_NAME",
    "INCEPTION_NPZ_NAME",
    "InceptionWeightsMissingError",
    "torch_key_shapes",
    "convert_inception",
    "convert_inception_file",
    "set_inception_params",
    "load_inception_params",
    "save_inception_npz",
    "create_inception",
    "main",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
# sha256 of that file (95,628,359 bytes), as several independent FID setups record it; its
# first 8 digits are the suffix of the name (torch hub's naming rule)
_FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_NPZ_NAME = "fid_inception_v3_2015-12-05.npz"

# our leaf name -> torch suffix (within the same module path)
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


class InceptionWeightsMissingError(FileNotFoundError):
    """The FID Inception weights could not be found, converted or downloaded."""


def _abstract_model() -> FIDInceptionV3:
    return nnx.eval_shape(lambda: FIDInceptionV3())


def _our_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in inception_weights(_abstract_model()).items()}


def _torch_key(ours: str) -> str:
    """``Mixed_5b/branch1x1/conv/kernel`` -> ``Mixed_5b.branch1x1.conv.weight`` etc."""
    parts = ours.split("/")
    leaf, mod = parts[-1], parts[:-1]
    if mod[-1] == "bn":
        return ".".join(mod + [_BN_LEAVES[leaf]])
    return ".".join(mod + ["weight" if leaf == "kernel" else leaf])


def _to_torch_shape(ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if ours.endswith("conv/kernel"):  # HWIO -> OIHW
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if ours == "fc/kernel":  # [in, out] -> [out, in]
        return (shape[1], shape[0])
    return shape


def torch_key_shapes() -> dict[str, tuple[int, ...]]:
    """The keys and shapes a pytorch-fid FID Inception state dict must have."""
    return {_torch_key(k): _to_torch_shape(k, s) for k, s in _our_shapes().items()}


def convert_inception(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """pytorch-fid FID Inception state dict -> ``{our key: float32 array}``.

    Raises one ValueError listing unknown, missing and mis-shaped keys.
    """
    sd = {k: v for k, v in unwrap_state_dict(state_dict).items() if not k.endswith("num_batches_tracked")}
    ours = _our_shapes()
    expected = {_torch_key(k): _to_torch_shape(k, s) for k, s in ours.items()}
    check_keys("FID Inception state dict (expected pytorch-fid's "
               f"{INCEPTION_PTH_NAME} layout)", sd, expected)
    out: dict[str, np.ndarray] = {}
    for k in ours:
        a = np.asarray(sd[_torch_key(k)], dtype=np.float32)
        if k.endswith("conv/kernel"):
            a = a.transpose(2, 3, 1, 0)
        elif k == "fc/kernel":
            a = a.T
        out[k] = np.ascontiguousarray(a)
    return out


def convert_inception_file(pth: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``pth`` (no torch needed) and convert it."""
    try:
        return convert_inception(load_torch_state_dict(pth))
    except ValueError as e:
        msg = str(e)  # (the reader's own errors already start with the path)
        raise ValueError(msg if msg.startswith(os.fspath(pth)) else f"{os.fspath(pth)}: {msg}") from None


def set_inception_params(model: FIDInceptionV3, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy converted arrays into ``model`` (strict: one error listing every mismatch)."""
    set_frozen_weights(model, arrays, "FID Inception")


def load_inception_params(model: FIDInceptionV3, path: str | os.PathLike) -> None:
    """Load a converted ``.npz`` strictly into ``model``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    try:
        set_inception_params(model, arrays)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None


def save_inception_npz(model: FIDInceptionV3, path: str | os.PathLike) -> str:
    """Write ``model``'s weights as a converted ``.npz`` (e.g. a random one for tests)."""
    arrays = {k: np.asarray(jax.device_get(v.get_value()), np.float32)
              for k, v in inception_weights(model).items()}
    save_npz_atomic(arrays, os.fspath(path))
    return os.fspath(path)


def _unloaded(dtype) -> FIDInceptionV3:
    """Zero placeholders (built from NumPy: no device computation), overwritten by a load."""
    return FIDInceptionV3(dtype=dtype)


def _from_arrays(arrays: Mapping[str, np.ndarray], dtype) -> FIDInceptionV3:
    model = _unloaded(dtype)
    set_inception_params(model, arrays)
    return model


def _missing_message(cache: str, notes: list[str]) -> str:
    pth = os.path.join(cache, INCEPTION_PTH_NAME)
    npz = os.path.join(cache, INCEPTION_NPZ_NAME)
    lines = [
        f"FID Inception weights not found. Download {INCEPTION_PTH_NAME} (pytorch-fid's port "
        f"of TensorFlow's inception-2015-12-05) from",
        f"  {FID_WEIGHTS_URL}",
        place_hint(f"it at {pth}")
        + "; the next run converts it automatically, or convert it yourself:",
        f"  python -m ldm_jax.convert.inception_weights {pth} --out {npz}",
        f"(A copy in torch hub's cache, {torch_hub_checkpoints_dir()}, is found too.)",
    ]
    lines.extend(download_notes_lines(notes))
    return "\n".join(lines)


def create_inception(weights: str | os.PathLike | None = None, *,
                     dtype=jnp.float32) -> tuple[FIDInceptionV3, str]:
    """The FID Inception with pretrained weights; returns ``(model, status line)``.

    ``weights``: a converted ``.npz`` or the original ``.pth`` (converted in memory); a path
    that does not exist raises ``InceptionWeightsMissingError``. Without it: the cache dir's
    ``.npz``, else the ``.pth`` from the cache dir or torch hub's cache (converted and cached
    as ``.npz``), else a download (skipped when ``LDM_JAX_OFFLINE=1``), else
    ``InceptionWeightsMissingError`` naming the file, URL and target path.
    """
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise InceptionWeightsMissingError(
                f"FID Inception weights file {path} does not exist. Get {INCEPTION_PTH_NAME} "
                f"from {FID_WEIGHTS_URL} and pass its path (a .pth is converted on the fly), or "
                f"convert it: python -m ldm_jax.convert.inception_weights {INCEPTION_PTH_NAME} "
                f"--out {path}")
        if path.endswith(".npz"):
            model = _unloaded(dtype)
            load_inception_params(model, path)
        else:
            model = _from_arrays(convert_inception_file(path), dtype)
        return model, f"FID Inception: loaded {path}"

    cache = default_cache_dir()
    npz = os.path.join(cache, INCEPTION_NPZ_NAME)
    if os.path.isfile(npz):
        model = _unloaded(dtype)
        load_inception_params(model, npz)
        return model, f"FID Inception: loaded {npz}"

    src = find_weights_file(INCEPTION_PTH_NAME, cache)
    notes: list[str] = []
    if src is None:
        src = download_if_online(
            FID_WEIGHTS_URL, os.path.join(cache, INCEPTION_PTH_NAME), notes, _FID_WEIGHTS_SHA256
        )
    if src is None:
        raise InceptionWeightsMissingError(_missing_message(cache, notes))
    arrays = convert_inception_file(src)
    model = _from_arrays(arrays, dtype)
    return model, f"FID Inception: loaded {src} ({store_converted(arrays, npz)})"


def main(argv: list[str] | None = None) -> int:
    default_out = os.path.join(default_cache_dir(), INCEPTION_NPZ_NAME)
    parser = argparse.ArgumentParser(
        prog="python -m ldm_jax.convert.inception_weights",
        description="Convert pytorch-fid's FID Inception weights (.pth) to ldm_jax .npz.",
    )
    parser.add_argument("src", help=f"{INCEPTION_PTH_NAME} (from {FID_WEIGHTS_URL})")
    parser.add_argument("--out", default=default_out, help=f"output .npz (default {default_out})")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.src):
        parser.error(f"no such file {args.src}")
    try:
        arrays = convert_inception_file(args.src)
    except ValueError as e:
        parser.error(str(e))
    save_npz_atomic(arrays, args.out)
    n = sum(int(a.size) for a in arrays.values())
    print(f"wrote {args.out} ({len(arrays)} arrays, {n:,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
