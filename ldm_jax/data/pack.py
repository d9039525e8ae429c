"""Pack a folder of images into a TFDS dataset stored as ArrayRecord files.

    python -m ldm_jax.data.pack --src=/data/photos --name=photos --out=/data/tfds
    python train.py --config=configs/vae_f8.py --config.data.source=tfds \\
        --config.data.tfds_name=photos --config.data.tfds_data_dir=/data/tfds

On network filesystems and bucket mounts every small file costs a request of its own; a few
large ArrayRecord shards, read by index, do not. The result is an ordinary
TFDS dataset (``dataset_info.json``, ``features.json``, sharded ``.array_record`` files)
that the ``tfds`` source reads by name, and neither packing nor reading needs TensorFlow.

Splits and labels follow ``data.source=folder`` exactly: ``train`` and ``validation`` are the
hash-based split of ``--src`` by ``--eval_holdout`` (the same images ``source=folder`` holds
out at that fraction), or all of ``--src`` and all of ``--eval_src``; when every image lies in
a sub-folder, the sorted top-level sub-folder names are the classes (a ``label`` feature).
Each record keeps the file's encoded bytes as they are (no re-encoding) and its relative
path (``file_name``). Files that do not open as images are left out and listed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import logging
import os
import re
import sys
from typing import Any

from PIL import Image

from ldm_jax.config_lib import ConfigError
from ldm_jax.data.sources import folder_classes, image_files_under, in_holdout

log = logging.getLogger("ldm_jax")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def plan(src: str, eval_src: str = "", eval_holdout: float = 0.01) -> tuple[dict[str, list], tuple[str, ...]]:
    """``({"train": [(path, relpath, label)], "validation": [...]}, class_names)``: which file
    goes to which split with which label (0 and no classes for an unlabelled folder)."""
    files = image_files_under(src, "--src")
    classes = folder_classes(files)
    index = {c: i for i, c in enumerate(classes)}

    def items(root: str, rels: list[str]) -> list[tuple[str, str, int]]:
        return [(os.path.join(root, r), r, index[r.split("/", 1)[0]] if classes else 0) for r in rels]

    if eval_src:
        eval_files = image_files_under(eval_src, "--eval_src")
        if classes:
            unknown = sorted({r.split("/", 1)[0] for r in eval_files if "/" not in r or r.split("/", 1)[0] not in index})
            if unknown:
                raise ConfigError(
                    f"--eval_src {eval_src!r} has images outside the classes of --src ({len(classes)} "
                    f"sub-folders): {unknown[:10]}{' ...' if len(unknown) > 10 else ''}. Give it the same "
                    "<class>/... layout, or leave --eval_src out to hold out part of --src.")
        splits = {"train": items(src, files), "validation": items(eval_src, eval_files)}
    else:
        if not 0.0 < float(eval_holdout) < 1.0:
            raise ConfigError(f"--eval_holdout must be in (0, 1), got {eval_holdout!r}.")
        held = {f for f in files if in_holdout(f, eval_holdout)}  # (one hash per file)
        splits = {"train": items(src, [f for f in files if f not in held]),
                  "validation": items(src, [f for f in files if f in held])}
    for name, chosen in splits.items():
        if not chosen:
            raise ConfigError(f"the {name} split would be empty ({len(files)} images in {src!r}, "
                              f"--eval_holdout={eval_holdout}); change --eval_holdout or give --eval_src.")
    return splits, classes


def _read_image(path: str) -> tuple[bytes | None, str]:
    """The file's bytes if it opens as an image (header and structure checked, pixels not
    decoded), else ``(None, reason)``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        return data, ""
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported and left out
        return None, f"{type(e).__name__}: {e}"


def _read_ahead(chosen: list, threads: int, chunk: int = 256):
    """``_read_image`` of every path in ``chosen``, in order, read by ``threads`` threads a
    chunk at a time (a network filesystem answers many requests at once; at most ``chunk``
    files are held in memory ahead of the writer)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(chosen), chunk):
            yield from pool.map(_read_image, [path for path, _, _ in chosen[start:start + chunk]])


def pack(src: str, name: str, out: str, *, eval_src: str = "", eval_holdout: float = 0.01,
         version: str = "1.0.0", read_threads: int = 16) -> dict[str, Any]:
    """Write the TFDS dataset ``name`` (``version``) under ``out``, reading the files with
    ``read_threads`` threads; returns a summary:
    ``{"path", "splits": {split: records}, "class_names", "skipped": [(path, reason)]}``."""
    if not _NAME.match(name):
        raise ConfigError(f"--name={name!r}: use lower-case letters, digits and '_', starting with a letter.")
    import tensorflow_datasets as tfds

    target = os.path.join(out, name, version)
    if os.path.exists(target):
        raise ConfigError(f"{target} already exists; give another --version or remove it first.")
    splits, classes = plan(src, eval_src, eval_holdout)
    features: dict[str, Any] = {"image": tfds.features.Image(shape=(None, None, 3)),
                                "file_name": tfds.features.Text()}
    if classes:
        features["label"] = tfds.features.ClassLabel(names=list(classes))
    described = f"Images of {os.path.abspath(src)}" + (
        f", validation: {os.path.abspath(eval_src)}" if eval_src else f", validation: hash holdout {eval_holdout}")
    skipped: list[tuple[str, str]] = []
    dataset_name, dataset_version = name, version

    class Packed(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        # A one-part module name: tfds then looks for no download-checksums file beside this
        # code (for a dotted module it resolves the package through `importlib_resources`,
        # which tfds uses without depending on it).
        __module__ = "ldm_jax_data_pack"
        VERSION = tfds.core.Version(dataset_version)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=described + " (python -m ldm_jax.data.pack)",
                                         features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(chosen) for split, chosen in splits.items()}

        def _generate_examples(self, chosen):
            for (path, rel, label), (data, reason) in zip(chosen, _read_ahead(chosen, read_threads)):
                if data is None:
                    log.warning("skipped %s (%s)", path, reason)
                    skipped.append((path, reason))
                    continue
                record = {"image": data, "file_name": rel}
                if classes:
                    record["label"] = label
                yield rel, record

    builder = Packed(data_dir=out, file_format="array_record")
    builder.download_and_prepare()
    counts = {split: int(info.num_examples) for split, info in builder.info.splits.items()}
    return {"path": target, "splits": counts, "class_names": list(classes), "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_jax.data.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="folder of images (recursive; <class>/... sub-folders = labels)")
    p.add_argument("--name", required=True, help="dataset name (data.tfds_name), e.g. my_photos")
    p.add_argument("--out", required=True, help="TFDS data dir to write into (data.tfds_data_dir)")
    p.add_argument("--eval_src", default="", help="folder for the validation split (default: hold out part of --src)")
    p.add_argument("--eval_holdout", type=float, default=0.01,
                   help="fraction of --src held out for validation, by path hash as source=folder (default 0.01)")
    p.add_argument("--version", default="1.0.0", help="dataset version (default 1.0.0)")
    p.add_argument("--read_threads", type=int, default=16, help="files read at once (default 16)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = pack(args.src, args.name, args.out, eval_src=args.eval_src,
                       eval_holdout=args.eval_holdout, version=args.version, read_threads=args.read_threads)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['path']}: " + ", ".join(f"{k} {v} images" for k, v in summary["splits"].items())
          + (f", {len(summary['class_names'])} classes" if summary["class_names"] else ", unlabelled")
          + (f"; {len(summary['skipped'])} unreadable file(s) left out" if summary["skipped"] else ""))
    print(f"train on it: --config.data.source=tfds --config.data.tfds_name={args.name} "
          f"--config.data.tfds_data_dir={os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
