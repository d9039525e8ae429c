"""Random-access image sources for the grain pipelines.

Every source is a grain ``RandomAccessDataSource`` (``__len__`` + ``__getitem__``) whose
records are ``{"key": int, "data": bytes | np.ndarray | None, "error": str, "label": int}``
(``label`` is the class index, 0 for unlabelled sources; ``num_classes`` is 0 for those and
``class_names`` lists the classes otherwise). Reading never
raises: a file that cannot be read comes back with ``data=None`` and the reason in
``error``, and the decode transform skips it (see ``transforms.py``). ``describe(key)``
names a record for warnings ("/data/imgs/a.jpg", "imagenette/320px-v2[train] #17").

Sources:
  * ``EmbeddedSource`` — the colour photographs shipped inside the scikit-image wheel
    (``skimage/data``), read straight from site-packages (no pooch download).
  * ``FolderSource`` — a list of image files under a root folder (recursive listing,
    sorted; train/eval split by a hash of the relative path).
  * ``TfdsSource`` — ``tfds.data_source`` (ArrayRecord; needs no TensorFlow) with the
    image feature left undecoded so corrupt records are skipped like corrupt files
    (``python -m ldm_jax.data.pack`` turns a folder into such a dataset).

This module must not import jax: grain worker processes unpickle these objects.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any, Sequence

import numpy as np

from ldm_jax.config_lib import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Real colour photographs in skimage/data (scikit-image 0.24–0.26 wheels). Grayscale
# images (camera, coins, moon, ...) and synthetic ones (color.png colour wheel, logo.png,
# chessboard_RGB.png, horse.png silhouette) are left out on purpose.
EMBEDDED_TRAIN_FILES = (
    "astronaut.png",  # Eileen Collins, NASA Great Images database; public domain.
    "chelsea.png",  # Chelsea the cat, Stefan van der Walt; CC0.
    "hubble_deep_field.jpg",  # Hubble eXtreme Deep Field, NASA/HubbleSite; public domain.
    "ihc.png",  # IHC-stained colonic glands, CMMI; no known copyright restrictions.
    "motorcycle_left.png",  # Middlebury 2014 stereo (Scharstein et al.), left view.
    "motorcycle_right.png",  # Same scene, right view (near-duplicate: both in train).
    "retina.jpg",  # Fundus photograph, Mikael Häggström / Wikimedia; CC0.
)
EMBEDDED_EVAL_FILES = (
    "coffee.png",  # Coffee cup, Rachel Michetti (Pikolo Espresso Bar); CC0.
    "rocket.jpg",  # DSCOVR launch on Falcon 9, SpaceX; public domain.
)


def _decode_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class FileListSource:
    """Image files given as paths relative to ``root``; records hold the raw bytes."""

    def __init__(self, root: str, relpaths: Sequence[str], *, uid: str,
                 labels: Sequence[int] | None = None, class_names: Sequence[str] = ()):
        self._root = os.fspath(root)
        self._relpaths = list(relpaths)
        self.uid = uid
        self._labels = [int(v) for v in labels] if labels is not None else None
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self._relpaths)

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        path = os.path.join(self._root, self._relpaths[key])
        try:
            with open(path, "rb") as f:
                return {"key": key, "data": f.read(), "error": "", "label": self._label(key)}
        except OSError as e:  # vanished file, permissions, I/O error ...
            return {"key": key, "data": None, "error": _decode_error(e), "label": self._label(key)}

    def _label(self, key: int) -> int:
        return self._labels[key] if self._labels is not None else 0

    def describe(self, key: int) -> str:
        return os.path.join(self._root, self._relpaths[int(key)])

    @property
    def relpaths(self) -> list[str]:
        return list(self._relpaths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uid={self.uid!r}, num_records={len(self)})"


class EmbeddedSource(FileListSource):
    """The scikit-image sample photographs: 7 for training, 2 held out for eval.

    Each photograph is its own class (9 classes named after the files, the eval ones
    included) so class-conditional models can be tried on it."""

    def __init__(self, split: str):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        root = embedded_data_dir()
        files = EMBEDDED_TRAIN_FILES if split == "train" else EMBEDDED_EVAL_FILES
        missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
        if missing:
            raise ConfigError(
                f"data_cfg.source='embedded': {missing} not found in {root}. This "
                "scikit-image install lacks its bundled sample images; reinstall it "
                "from the PyPI wheel (pip install --force-reinstall scikit-image) or use "
                "source='folder'/'tfds'."
            )
        names = tuple(os.path.splitext(f)[0] for f in EMBEDDED_TRAIN_FILES + EMBEDDED_EVAL_FILES)
        labels = [names.index(os.path.splitext(f)[0]) for f in files]
        super().__init__(root, files, uid=f"embedded:{split}", labels=labels, class_names=names)


def embedded_data_dir() -> str:
    """``site-packages/skimage/data`` without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data_cfg.source='embedded' reads the sample photographs shipped with "
            "scikit-image, which is not installed: pip install scikit-image "
            "(or use source='folder' / 'tfds')."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def list_image_files(root: str) -> list[str]:
    """Sorted relative paths (``/``-separated) of all images under ``root``.

    Recursive, follows directory symlinks (each real directory visited once), extension
    match is case-insensitive, hidden files and folders (``.name``, e.g. macOS ``._x.jpg``)
    are ignored.
    """
    out: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink loop / duplicate
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            out.append(rel.replace(os.sep, "/"))
    out.sort()
    return out


def image_files_under(root: str, setting: str, context: str = "") -> list[str]:
    """``list_image_files(root)``; a :class:`ConfigError` naming ``setting`` (the flag or
    config field that gave ``root``; ``context`` follows it in the message) when ``root`` is
    not a folder or holds no images."""
    if not os.path.isdir(root):
        raise ConfigError(f"{setting}={root!r} is not an existing folder{context}.")
    files = list_image_files(root)
    if not files:
        raise ConfigError(f"{setting}={root!r} contains no images (looked recursively for "
                          f"{', '.join(IMAGE_EXTENSIONS)}, case-insensitive).")
    return files


def folder_classes(relpaths: Sequence[str]) -> tuple[str, ...]:
    """The classes of a folder's images (``list_image_files``): when every image lies in a
    sub-folder, the sorted top-level sub-folder names (the ImageFolder convention,
    ``root/<class>/.../x.jpg``); otherwise none (unlabelled)."""
    if not relpaths or not all("/" in f for f in relpaths):
        return ()
    return tuple(sorted({f.split("/", 1)[0] for f in relpaths}))


def in_holdout(relpath: str, fraction: float) -> bool:
    """Whether a file belongs to the eval split: a hash of its relative path, so the
    split of existing files never changes when files are added or removed."""
    h = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


class FolderSource(FileListSource):
    """Images under a folder; ``split`` picks the hash-based train or eval part.

    When every image lies in a sub-folder, the top-level sub-folder names (sorted) are the
    classes (the ImageFolder convention: ``root/<class>/.../x.jpg``); otherwise the folder
    is unlabelled."""

    def __init__(self, root: str, split: str, eval_holdout: float):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not root:
            raise ConfigError("data_cfg.path is empty; set it to a folder of images for source='folder'.")
        files = image_files_under(root, "data_cfg.path", " (source='folder')")
        want_eval = split == "eval"
        chosen = [f for f in files if in_holdout(f, eval_holdout) == want_eval]
        if not chosen:
            raise ConfigError(
                f"The {split} split of {root!r} is empty: {len(files)} images with "
                f"data_cfg.eval_holdout={eval_holdout}. "
                + ("Increase eval_holdout or add images." if want_eval
                   else "Decrease eval_holdout or add images.")
            )
        labels, classes = None, folder_classes(files)
        if classes:
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[f.split("/", 1)[0]] for f in chosen]
        super().__init__(os.path.abspath(root), chosen, uid=f"folder:{split}:{os.path.abspath(root)}",
                         labels=labels, class_names=classes)


class TfdsSource:
    """``tfds.data_source`` with the image feature kept as encoded bytes.

    ``download=False``: prepare the dataset beforehand (``tfds build NAME
    --file_format=array_record``) so that many hosts never race to download it.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str = "image",
                 label_key: str = "label"):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ConfigError(
                "data_cfg.source='tfds' needs tensorflow-datasets: pip install tensorflow-datasets"
            ) from e
        self._name, self._split, self._image_key = name, split, image_key
        self.uid = f"tfds:{name}:{split}:{data_dir or ''}"
        try:
            self._ds = tfds.data_source(
                name,
                split=split,
                data_dir=data_dir or None,
                download=False,
                decoders={image_key: tfds.decode.SkipDecoding()},
            )
        except Exception as e:
            raise ConfigError(
                f"Could not open tfds dataset {name!r} split {split!r} (data_dir="
                f"{data_dir or 'default'}): {_decode_error(e)}. Prepare it as ArrayRecord "
                f"first, e.g. `tfds build {name.split('/')[0]} --file_format=array_record"
                + (f" --data_dir={data_dir}`" if data_dir else "`")
                + ", and check tfds_name / train_split / eval_split / tfds_data_dir."
            ) from e
        if len(self._ds) == 0:
            raise ConfigError(f"tfds dataset {name!r} split {split!r} is empty.")
        first = self._ds[0]
        if image_key not in first:
            raise ConfigError(
                f"data_cfg.image_key={image_key!r} is not a feature of tfds dataset "
                f"{name!r}; features: {sorted(first)}."
            )
        self._label_key = label_key if label_key and label_key in first else ""
        self._has_file_name = "file_name" in first
        self.class_names: tuple[str, ...] = ()
        if self._label_key:
            try:
                feature = self._ds.dataset_info.features[self._label_key]
                self.class_names = tuple(feature.names)
            except Exception:  # noqa: BLE001 - not a ClassLabel: unlabelled for our purposes
                self._label_key = ""
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        try:
            record = self._ds[key]
            data = record[self._image_key]
            if not isinstance(data, (bytes, np.ndarray)):
                data = bytes(data)
            label = int(record[self._label_key]) if self._label_key else 0
            return {"key": key, "data": data, "error": "", "label": label}
        except Exception as e:  # corrupt record / deserialization error
            return {"key": key, "data": None, "error": _decode_error(e), "label": 0}

    def describe(self, key: int) -> str:
        """``name[split] #key``, with the record's ``file_name`` feature when it has one
        (datasets from ``python -m ldm_jax.data.pack``)."""
        base = f"{self._name}[{self._split}] #{int(key)}"
        if self._has_file_name:
            try:
                name = self._ds[int(key)]["file_name"]
                return f"{base} ({name.decode() if isinstance(name, bytes) else name})"
            except Exception:  # noqa: BLE001 - a record that does not read: the index alone
                pass
        return base

    def __repr__(self) -> str:
        return f"TfdsSource(uid={self.uid!r}, num_records={len(self)})"


def make_source(data_cfg, split: str):
    """The train or eval source named by ``data_cfg.source``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    kind = data_cfg.get("source", None)
    if kind == "embedded":
        return EmbeddedSource(split)
    if kind == "folder":
        holdout = data_cfg.get("eval_holdout", 0.05)
        if not isinstance(holdout, (int, float)) or not 0.0 < float(holdout) < 1.0:
            raise ConfigError(f"data_cfg.eval_holdout must be a float in (0, 1), got {holdout!r}.")
        return FolderSource(data_cfg.get("path", ""), split, float(holdout))
    if kind == "tfds":
        name = data_cfg.get("tfds_name", "")
        if not name:
            raise ConfigError("data_cfg.tfds_name is empty; set it, e.g. 'imagenette/320px-v2'.")
        field = "train_split" if split == "train" else "eval_split"
        tfds_split = data_cfg.get(field, "train" if split == "train" else "validation")
        if not tfds_split:
            raise ConfigError(f"data_cfg.{field} is empty; set a tfds split such as 'train'.")
        return TfdsSource(
            name, tfds_split, data_cfg.get("tfds_data_dir", "") or None,
            data_cfg.get("image_key", "image") or "image",
            data_cfg.get("label_key", "label") or "",
        )
    raise ConfigError(
        f"Unknown data_cfg.source={kind!r}; expected one of 'embedded', 'folder', 'tfds'."
    )
