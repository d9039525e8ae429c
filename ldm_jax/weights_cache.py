"""The local cache of pretrained weights (LPIPS, FID Inception): where it is, how files get in.

Shared by ``ldm_jax.models.lpips.create_lpips`` and
``ldm_jax.convert.inception_weights.create_inception``, which both look for a converted
``.npz`` in ``default_cache_dir()``, then for the original ``.pth`` there or in torch hub's
checkpoint dir (``find_weights_file``), then download it (``download_if_online``), and
finally raise an error built with ``place_hint`` / ``download_notes_lines``.

Environment:

* ``LDM_JAX_CACHE``: the cache dir (default ``~/.cache/ldm_jax``).
* ``LDM_JAX_OFFLINE``: any value but ``""``, ``0``, ``false`` or ``no`` skips downloads.
* ``TORCH_HOME`` / ``XDG_CACHE_HOME``: locate torch hub's cache, as torch itself does.

Failures to download are not raised: they are appended, as one human-readable note each, to
a ``notes`` list the caller puts into its "weights not found" error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "OFFLINE_NOTE",
    "default_cache_dir",
    "is_offline",
    "torch_hub_checkpoints_dir",
    "find_weights_file",
    "download",
    "try_download",
    "download_if_online",
    "save_json_atomic",
    "save_npz_atomic",
    "store_converted",
    "place_hint",
    "download_notes_lines",
]

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0
OFFLINE_NOTE = "skipped (LDM_JAX_OFFLINE is set)"


def default_cache_dir() -> str:
    """``$LDM_JAX_CACHE`` if set, else ``~/.cache/ldm_jax``."""
    env = os.environ.get("LDM_JAX_CACHE")
    return os.path.abspath(os.path.expanduser(env if env else "~/.cache/ldm_jax"))


def is_offline() -> bool:
    """True when ``$LDM_JAX_OFFLINE`` asks not to download (set, and not ``0``/``false``/``no``)."""
    return os.environ.get("LDM_JAX_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def torch_hub_checkpoints_dir() -> str:
    """torch hub's checkpoint dir: ``$TORCH_HOME/hub/checkpoints`` (torch's own default rules)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return os.path.join(os.path.expanduser(torch_home), "hub", "checkpoints")


def find_weights_file(name: str, cache_dir: str, *, torch_hub: bool = True) -> str | None:
    """``cache_dir/name`` if it is a file, else (with ``torch_hub``) the copy in
    ``torch_hub_checkpoints_dir()``, else None."""
    dirs: Iterable[str] = (cache_dir, torch_hub_checkpoints_dir()) if torch_hub else (cache_dir,)
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    return None


def download(url: str, dest: str, sha256_prefix: str | None = None) -> str:
    """Fetch ``url`` to ``dest`` atomically; raises OSError (incl. URLError) on failure.

    The data goes to a host- and process-unique temporary file next to ``dest`` that is
    renamed onto ``dest`` only when complete (as many bytes as the server announced and, with
    ``sha256_prefix``, a sha256 that starts with it); the temporary file never outlives the
    call.
    """
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{socket.gethostname()}-{os.getpid()}"
    log.info("downloading %s -> %s", url, dest)
    try:
        digest, received = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
            expected = r.headers.get("Content-Length")
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
                received += len(chunk)
        # (a read of n bytes returns what came before the connection closed, without an error)
        if expected is not None and expected.isdigit() and received != int(expected):
            raise OSError(f"the connection for {url} ended after {received} of {expected} bytes")
        if sha256_prefix and not digest.hexdigest().startswith(sha256_prefix):
            raise OSError(f"checksum mismatch for {url}: sha256 {digest.hexdigest()}, "
                          f"expected {sha256_prefix}{'' if len(sha256_prefix) == 64 else '...'}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def try_download(
    url: str, dest: str, notes: list[str], sha256_prefix: str | None = None
) -> str | None:
    """``download`` that records the failure in ``notes`` and returns None instead."""
    try:
        return download(url, dest, sha256_prefix)
    except (urllib.error.URLError, OSError, ValueError, TimeoutError) as e:
        notes.append(f"download of {url} failed ({e})")
    except Exception as e:  # noqa: BLE001 - any network failure just means "not available"
        notes.append(f"download of {url} failed ({type(e).__name__}: {e})")
    return None


def download_if_online(
    url: str, dest: str, notes: list[str], sha256_prefix: str | None = None
) -> str | None:
    """``try_download`` unless ``is_offline()``; offline, adds ``OFFLINE_NOTE`` to ``notes``
    (once, however many files are skipped) and returns None."""
    if is_offline():
        if OFFLINE_NOTE not in notes:
            notes.append(OFFLINE_NOTE)
        return None
    return try_download(url, dest, notes, sha256_prefix)


def save_json_atomic(obj: Any, out_path: str) -> None:
    """Write ``obj`` as indented JSON to ``out_path`` via a temporary file and ``os.replace``:
    readers see the old file or the whole new one, never a partial write."""
    _write_atomic(out_path, "w", lambda f: json.dump(obj, f, indent=2))


def save_npz_atomic(arrays: Mapping[str, np.ndarray], out_path: str) -> None:
    """Write ``arrays`` to ``out_path`` via a temporary file and ``os.replace``."""
    _write_atomic(out_path, "wb", lambda f: np.savez(f, **arrays))


def _write_atomic(out_path: str, mode: str, write: Callable[[Any], None]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def store_converted(arrays: Mapping[str, np.ndarray], npz_path: str) -> str:
    """Cache freshly converted ``arrays`` at ``npz_path``; returns the note for a status line:
    ``"converted to <npz_path>"``, or ``"not cached (<error>)"`` if it could not be written."""
    try:
        save_npz_atomic(arrays, npz_path)
    except OSError as e:
        return f"not cached ({e})"
    return f"converted to {npz_path}"


def place_hint(target: str) -> str:
    """The "where to put the file" clause of a weights-not-found message:
    ``"and place <target> (set $LDM_JAX_CACHE to use another directory)"``, e.g. with
    ``target="it at /cache/x.pth"`` or ``"them in /cache"``."""
    return f"and place {target} (set $LDM_JAX_CACHE to use another directory)"


def download_notes_lines(notes: list[str]) -> list[str]:
    """``["Automatic download: <note>; <note>."]`` for a weights-not-found message, or ``[]``."""
    return ["Automatic download: " + "; ".join(notes) + "."] if notes else []
