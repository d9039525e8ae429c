"""Tests of the grain input pipelines (ldm_jax.data). CPU only, a few seconds."""

from __future__ import annotations

import io
import logging
import os
import re

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ldm_jax import config_lib
from ldm_jax import data as data_lib
from ldm_jax.data import sources, transforms

RES = 32


def _cfg(**kw):
    """The trainer's data config schema, embedded source, with test overrides."""
    base = config_lib.vae_base_config().data.to_dict()
    base.update(eval_holdout=0.3)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _colour(i: int) -> tuple[int, int, int]:
    """A distinct solid colour per image id (ids < 200), exactly representable after
    scaling to [-1, 1]."""
    return (i, 255 - i, (7 * i) % 256)


def _id_of(img: np.ndarray) -> int:
    """Image id of a solid-colour crop in [-1, 1]."""
    r = int(round((float(img[..., 0].mean()) + 1.0) * 127.5))
    assert np.ptp(img[..., 0]) < 1e-6, "expected a solid-colour image"
    return r


def _make_folder(root, n: int, *, size=(48, 40), textured: bool = False) -> list[str]:
    """n PNGs in nested folders; returns the relative paths. The red channel is a solid
    per-image colour (``_id_of``); ``textured`` fills green and blue with noise so that
    different crops and flips of an image differ."""
    rels = []
    rng = np.random.default_rng(n)
    for i in range(n):
        sub = f"class_{i % 3}"
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        rel = f"{sub}/img_{i:03d}.png"
        img = Image.new("RGB", size, _colour(i))
        if textured:
            a = np.asarray(img).copy()
            a[..., 1:] = rng.integers(0, 256, (size[1], size[0], 2), dtype=np.uint8)
            img = Image.fromarray(a)
        img.save(os.path.join(root, rel))
        rels.append(rel)
    return rels


def _take(it, n):
    return [next(it)["image"].copy() for _ in range(n)]


@pytest.fixture
def fake_processes(monkeypatch):
    """Fakes jax.process_index()/process_count() (grain's ShardByJaxProcess reads them)."""

    def set_(index: int, count: int):
        monkeypatch.setattr(jax, "process_index", lambda *a, **k: index)
        monkeypatch.setattr(jax, "process_count", lambda *a, **k: count)

    return set_


# ----------------------------------------------------------------------------------------
# Shapes, dtype, range.


def test_embedded_train_batches():
    it = data_lib.create_train_iterator(_cfg(), resolution=RES, global_batch_size=8, seed=0)
    for _ in range(3):  # 7 training photos < batch of 8: repetition fills the batches
        batch = next(it)
        assert set(batch) == {"image", "label"}
        x = batch["image"]
        assert x.shape == (8, RES, RES, 3) and x.dtype == np.float32
        assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05


def test_labels_embedded_and_folder(tmp_path):
    """Embedded photos are one class each; a folder's top-level sub-folders are classes
    (the same class index in both splits); a flat folder is unlabelled."""
    names = data_lib.class_names(_cfg())
    assert len(names) == 9 and names[0] == "astronaut"
    it = data_lib.create_train_iterator(_cfg(), resolution=RES, global_batch_size=8, seed=0)
    seen = set()
    for _ in range(4):
        b = next(it)
        assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
        seen |= set(b["label"].tolist())
    assert seen == set(range(7))  # the 7 training photos
    ev = data_lib.create_eval_batches(_cfg(), resolution=RES, batch_size=4, num_images=2)
    assert set(ev[0]["label"].tolist()) == {7, 8}

    rng = np.random.default_rng(0)
    for cls in ("dog", "cat"):
        os.makedirs(tmp_path / "lab" / cls / "sub")
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "lab" / cls / "sub" / f"{i}.png")
    src = sources.FolderSource(str(tmp_path / "lab"), "train", 0.3)
    assert src.class_names == ("cat", "dog")
    for k in range(len(src)):
        assert src[k]["label"] == (0 if "/cat/" in src.describe(k) else 1)
    ev_src = sources.FolderSource(str(tmp_path / "lab"), "eval", 0.3)
    assert ev_src.class_names == ("cat", "dog")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "lab" / "top.png")
    flat = sources.FolderSource(str(tmp_path / "lab"), "train", 0.3)
    assert flat.num_classes == 0 and flat[0]["label"] == 0


def test_embedded_files_are_real_colour_photos():
    root = sources.embedded_data_dir()
    assert not set(sources.EMBEDDED_TRAIN_FILES) & set(sources.EMBEDDED_EVAL_FILES)
    for f in sources.EMBEDDED_TRAIN_FILES + sources.EMBEDDED_EVAL_FILES:
        with Image.open(os.path.join(root, f)) as im:
            assert im.mode == "RGB" and min(im.size) >= 256, f


def test_embedded_eval_batches():
    ev = data_lib.create_eval_batches(_cfg(), resolution=RES, batch_size=4, num_images=100)
    assert len(ev) == 1 and ev[0]["image"].shape == (4, RES, RES, 3)
    # 2 held-out photos cycled to fill one batch of 4.
    np.testing.assert_array_equal(ev[0]["image"][0], ev[0]["image"][2])
    assert not np.array_equal(ev[0]["image"][0], ev[0]["image"][1])


def test_folder_train_batches_mixed_formats(tmp_path):
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)  # noqa: E731
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(noise(50, 70, 3)).save(tmp_path / "rgb.JPG")  # upper-case extension
    Image.fromarray(noise(64, 40, 0)).save(tmp_path / "a" / "gray.png")
    Image.fromarray(noise(40, 40, 4)).save(tmp_path / "a" / "rgba.png")
    Image.fromarray(noise(30, 45, 3)).convert("P").save(tmp_path / "a" / "b" / "palette.png")
    Image.fromarray((noise(40, 36, 0).astype(np.uint16) * 257)).save(tmp_path / "a" / "b" / "g16.png")
    Image.fromarray(noise(20, 24, 3)).save(tmp_path / "small.webp")  # smaller than the crop
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = _cfg(source="folder", path=str(tmp_path), eval_holdout=0.01)
    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=1)
    for _ in range(4):
        x = next(it)["image"]
        assert x.shape == (4, RES, RES, 3) and x.dtype == np.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
    # resize_short_side=-1: crop directly (upscale only the image smaller than the crop).
    it = data_lib.create_train_iterator(
        _cfg(source="folder", path=str(tmp_path), eval_holdout=0.01, resize_short_side=-1),
        resolution=RES, global_batch_size=4, seed=1,
    )
    assert next(it)["image"].shape == (4, RES, RES, 3)


def test_listing_and_holdout_are_stable(tmp_path):
    rels = _make_folder(tmp_path, 30)
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "._junk.png")
    assert sources.list_image_files(str(tmp_path)) == sorted(rels)
    held = {r for r in rels if sources.in_holdout(r, 0.3)}
    assert 0 < len(held) < 30
    _make_folder(tmp_path / "more", 10)  # adding files never moves existing ones
    assert {r for r in rels if sources.in_holdout(r, 0.3)} == held


def test_to_rgb_modes():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white
    assert np.asarray(transforms._to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    g16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(transforms._to_rgb(g16))[0, 0].tolist() == [255, 255, 255]
    g16 = Image.fromarray(np.full((4, 4), 257 * 100, np.uint16))
    assert np.asarray(transforms._to_rgb(g16))[0, 0].tolist() == [100, 100, 100]
    pal = Image.new("RGB", (4, 4), (200, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.asarray(transforms._to_rgb(pal))[0, 0].tolist() == [200, 0, 0]
    pal.info["transparency"] = 0  # palette index 0 transparent -> white
    assert np.asarray(transforms._to_rgb(pal))[0, 0].tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------------------
# Sharding across (faked) processes.


def _global_batches(cfg, count: int, k: int, fake_processes, *, seed=3, g=8, state=None):
    """``k`` global batches assembled from ``count`` faked processes (slices concatenated)."""
    per = []
    for index in range(count):
        fake_processes(index, count)
        it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=g, seed=seed)
        if state is not None:
            it.set_state(state)
        per.append([next(it) for _ in range(k)])
        it.close()
    fake_processes(0, 1)
    return [{key: np.concatenate([per[p][i][key] for p in range(count)]) for key in ("image", "label")}
            for i in range(k)]


def test_global_stream_is_independent_of_process_count(tmp_path, fake_processes):
    """The training stream is defined globally (issue "Scale-out"; before it, each process
    shuffled its own contiguous shard of the source, so the data order depended on the
    process count and processes never shared a record). Now: a seeded per-epoch shuffle of
    the whole source, global batches of G consecutive elements, process p of P takes
    elements [p*G/P, (p+1)*G/P) of each. So the P-process slices of a global batch are
    disjoint and concatenate to exactly the 1-process batch (same records, crops, flips,
    labels) for any P; each epoch visits every readable record; a corrupt record's
    position is filled by the next readable position, the same for every P."""
    transforms._reset_for_tests()
    _make_folder(tmp_path, 21, textured=True)
    (tmp_path / "class_0" / "zz_corrupt.png").write_bytes(b"not a png")
    cfg = _cfg(source="folder", path=str(tmp_path), eval_holdout=1e-9)  # all files train
    n = len(sources.FolderSource(str(tmp_path), "train", 1e-9))
    assert n == 22
    ref = _global_batches(cfg, 1, 6, fake_processes)  # 48 elements: > 2 epochs
    for count in (2, 4, 8):
        got = _global_batches(cfg, count, 6, fake_processes)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    ids = [_id_of(img) for b in ref for img in b["image"]]
    for epoch in range(2):  # every good record once per epoch, plus one repeat for the bad one
        part = ids[epoch * n:(epoch + 1) * n]
        assert set(part) == set(range(21)) and len(part) - len(set(part)) == 1, part
    assert ids[:n] != ids[n:2 * n]  # reshuffled each epoch
    crops = {}
    for b in ref:  # random crops/flips: the same photo differs between its appearances
        for img, i in zip(b["image"], [_id_of(x) for x in b["image"]]):
            crops.setdefault(i, []).append(img)
    assert any(not np.array_equal(v[0], v[1]) for v in crops.values() if len(v) > 1)


def test_state_restores_across_process_counts(tmp_path, fake_processes):
    """An iterator state is the number of global-stream elements consumed, the same JSON in
    every process: a state saved with 2 processes restores with 4 (or 1) and continues with
    the next global batch; a different global batch size continues at the same element."""
    _make_folder(tmp_path, 15, textured=True)
    cfg = _cfg(source="folder", path=str(tmp_path), eval_holdout=1e-9)
    ref = _global_batches(cfg, 1, 5, fake_processes)
    fake_processes(1, 2)
    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=8, seed=3)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state["consumed"] == 24 and it.positions().tolist() == [28, 29, 30, 31]
    for count in (4, 1):
        got = _global_batches(cfg, count, 2, fake_processes, state=state)
        for a, b in zip(got, ref[3:]):
            np.testing.assert_array_equal(a["image"], b["image"])
    half = _global_batches(cfg, 2, 2, fake_processes, g=4, state=state)  # elements 24..31
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in half]), ref[3]["image"])
    with pytest.raises(ValueError, match="seed"):
        data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=8, seed=4).set_state(state)


def test_eval_batches_sharded_and_disjoint_from_train(tmp_path, fake_processes):
    rels = _make_folder(tmp_path, 40)
    # Eval ids in listing order (sorted relative paths).
    eval_ids = [i for r, i in sorted((r, i) for i, r in enumerate(rels)) if sources.in_holdout(r, 0.3)]
    cfg = _cfg(source="folder", path=str(tmp_path), eval_holdout=0.3)
    ev1 = data_lib.create_eval_batches(cfg, resolution=RES, batch_size=2, num_images=1000)
    ev2 = data_lib.create_eval_batches(cfg, resolution=RES, batch_size=2, num_images=1000)
    assert len(ev1) == len(eval_ids) // 2
    for a, b in zip(ev1, ev2):
        np.testing.assert_array_equal(a["image"], b["image"])
    got = [_id_of(img) for batch in ev1 for img in batch["image"]]
    assert got == eval_ids[: len(got)]  # listing order, no shuffle
    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=8, seed=0)
    train_seen = {_id_of(img) for _ in range(6) for img in next(it)["image"]}
    assert train_seen and not train_seen & set(eval_ids)
    # Two processes: each gets its half of every global eval batch (since "Scale-out";
    # before, each process took a contiguous half of the images), so the global batches
    # are those of one process: images [4k, 4k+4) of the first num_images.
    parts = []
    for index in range(2):
        fake_processes(index, 2)
        ev = data_lib.create_eval_batches(cfg, resolution=RES, batch_size=4, num_images=8)
        assert len(ev) == 2 and ev[0]["image"].shape == (2, RES, RES, 3)
        parts.append([[_id_of(img) for img in b["image"]] for b in ev])
    assert [i for k in range(2) for p in range(2) for i in parts[p][k]] == eval_ids[:8]
    # Fewer images than one batch: cycled to fill exactly one batch.
    fake_processes(0, 1)
    ev = data_lib.create_eval_batches(cfg, resolution=RES, batch_size=4, num_images=1)
    assert len(ev) == 1 and [_id_of(i) for i in ev[0]["image"]] == [eval_ids[0]] * 4


# ----------------------------------------------------------------------------------------
# Corrupt files.


def _folder_with_corrupt_files(root) -> tuple[list[str], list[str]]:
    rels = _make_folder(root, 6)
    bad_jpg = os.path.join(root, "x.jpg")
    with open(bad_jpg, "wb") as f:
        f.write(np.random.default_rng(0).bytes(2000))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = os.path.join(root, "class_0", "truncated.png")
    with open(truncated, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    return rels, [bad_jpg, truncated]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_files_are_skipped_counted_and_warned(tmp_path, caplog, workers):
    transforms._reset_for_tests()
    _, bad = _folder_with_corrupt_files(tmp_path)
    # eval_holdout tiny: every file is in the training split.
    cfg = _cfg(source="folder", path=str(tmp_path), eval_holdout=1e-9, worker_count=workers)
    assert len(sources.FolderSource(str(tmp_path), "train", 1e-9)) == 8
    caplog.set_level(logging.WARNING)
    bad_abs = {os.path.abspath(p) for p in bad}

    def skipped_here():  # another test's background readers may still be registering skips
        return {f for f in data_lib.skipped_files() if f.startswith(str(tmp_path))}

    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=0)
    ids = set()
    for step in range(60):  # 6 good images, local batch 4: many epochs
        x = next(it)["image"]
        assert x.shape == (4, RES, RES, 3)
        ids |= {_id_of(img) for img in x}
        # With workers a skip reaches this process with a later batch (prefetch lag).
        if step >= 12 and skipped_here() == bad_abs:
            break
    it.close()  # stops background decoding (it would keep registering skips)
    assert ids == set(range(6))
    assert skipped_here() == bad_abs
    assert data_lib.skipped_count() >= len(bad)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in bad:
        assert sum(os.path.abspath(path) in m for m in warned) == 1, warned  # once per file


def test_all_files_corrupt_raises_instead_of_hanging(tmp_path):
    transforms._reset_for_tests()
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"not a png")
    cfg = _cfg(source="folder", path=str(tmp_path), eval_holdout=1e-9)
    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="unreadable"):
        next(it)
    it.close()


# ----------------------------------------------------------------------------------------
# Determinism and checkpointing.


def test_same_seed_same_batches_different_seed_different():
    cfg = _cfg()
    a = _take(data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=5), 4)
    b = _take(data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=5), 4)
    c = _take(data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=6), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_get_state_set_state_resumes_exactly():
    cfg = _cfg()
    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=2)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    it2 = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=2)
    it2.set_state(state)
    for x, y in zip(expected, _take(it2, 2)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("workers", [0, 2])
def test_orbax_checkpoint_roundtrip(tmp_path, workers):
    data_dir = tmp_path / "imgs"
    _make_folder(data_dir, 12)
    cfg = _cfg(source="folder", path=str(data_dir), eval_holdout=0.2, worker_count=workers)
    make = lambda: data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=9)  # noqa: E731
    it = make()
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 2)
    it2 = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    got = _take(it2, 2)
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x, y)
    # grain worker processes take whole local batches: the stream does not depend on them.
    same = _take(data_lib.create_train_iterator(_cfg(source="folder", path=str(data_dir), eval_holdout=0.2),
                                                resolution=RES, global_batch_size=4, seed=9), 5)[3:]
    for x, y in zip(same, got):
        np.testing.assert_array_equal(x, y)
    if workers:
        it.close()
        it2.close()


# ----------------------------------------------------------------------------------------
# TFDS: a small in-memory fake of tfds.data_source (corrupt records, the calls made), and a
# real ArrayRecord dataset that tfds builds without TensorFlow.


class _FakeTfdsSource:
    def __init__(self, n: int, corrupt: int | None = None):
        self._records = []
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (40, 36), _colour(i)).save(buf, "PNG")
            data = b"garbage" if i == corrupt else buf.getvalue()
            self._records.append({"image": data, "label": i})

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


def test_tfds_source_with_fake_data_source(monkeypatch, caplog):
    import tensorflow_datasets as tfds

    transforms._reset_for_tests()
    calls = []

    def fake_data_source(name, *, split, data_dir=None, download=True, decoders=None, **kw):
        calls.append((name, split, data_dir, download, sorted(decoders or {})))
        return _FakeTfdsSource(6 if split == "train" else 3, corrupt=2 if split == "train" else None)

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    cfg = _cfg(source="tfds", tfds_name="fake_ds/v1", train_split="train", eval_split="validation")
    caplog.set_level(logging.WARNING)
    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=0)
    ids = {_id_of(img) for _ in range(5) for img in next(it)["image"]}
    assert ids == {0, 1, 3, 4, 5}
    assert any("fake_ds/v1[train] #2" in r.getMessage() for r in caplog.records)
    ev = data_lib.create_eval_batches(cfg, resolution=RES, batch_size=2, num_images=10)
    assert [_id_of(i) for i in ev[0]["image"]] == [0, 1]
    assert calls[0] == ("fake_ds/v1", "train", None, False, ["image"])
    assert calls[-1][1] == "validation"
    with pytest.raises(ValueError, match="image_key"):
        data_lib.create_train_iterator(
            _cfg(source="tfds", tfds_name="fake_ds/v1", image_key="img"),
            resolution=RES, global_batch_size=4, seed=0,
        )


def test_pack_folder_into_tfds_array_record_and_read_it(tmp_path):
    """``python -m ldm_jax.data.pack`` turns a folder into a TFDS ArrayRecord dataset (tfds
    writes it without TensorFlow) that the tfds source reads by name from its files: the
    same train / validation images and labels as ``source=folder`` at the same holdout, the
    class names, unreadable files left out and listed; existing datasets and bad names stop."""
    from ldm_jax.data import pack

    rels = _make_folder(tmp_path / "src", 12)
    (tmp_path / "src" / "class_1" / "broken.png").write_bytes(b"not an image")
    out = str(tmp_path / "tfds")
    assert pack.main([f"--src={tmp_path / 'src'}", "--name=tiny_photos", f"--out={out}", "--eval_holdout=0.3"]) == 0
    transforms._reset_for_tests()
    folder = _cfg(source="folder", path=str(tmp_path / "src"), eval_holdout=0.3)
    cfg = _cfg(source="tfds", tfds_name="tiny_photos", tfds_data_dir=out, train_split="train",
               eval_split="validation")
    for split in ("train", "eval"):  # ("eval": the tfds "validation" split)
        want = sources.make_source(folder, split)
        got = sources.make_source(cfg, split)
        assert got.class_names == want.class_names == ("class_0", "class_1", "class_2")
        want_ids = {(int(r.rsplit("_", 1)[1][:3]), want[k]["label"]) for k, r in enumerate(want.relpaths)
                    if r.endswith(".png") and "broken" not in r}
        got_ids = set()
        for k in range(len(got)):
            rec = got[k]
            img = np.asarray(Image.open(io.BytesIO(rec["data"])), np.float32) / 127.5 - 1.0
            got_ids.add((_id_of(img), rec["label"]))
        assert got_ids == want_ids and len(got) == len(want_ids), (split, got_ids, want_ids)
    assert sum(len(sources.make_source(cfg, s)) for s in ("train", "eval")) == len(rels)  # broken one out
    assert re.fullmatch(r"tiny_photos\[validation\] #0 \(class_\d/img_\d{3}\.png\)", got.describe(0))
    it = data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=0)
    b = next(it)
    assert b["image"].shape == (4, RES, RES, 3) and b["label"].dtype == np.int32
    assert {(_id_of(i), int(lab)) for i, lab in zip(b["image"], b["label"])} <= {(i, i % 3) for i in range(12)}
    ev = data_lib.create_eval_batches(cfg, resolution=RES, batch_size=2, num_images=10)
    assert all(_id_of(i) % 3 == lab for e in ev for i, lab in zip(e["image"], e["label"]))

    with pytest.raises(ValueError, match="already exists"):
        pack.pack(str(tmp_path / "src"), "tiny_photos", out)
    with pytest.raises(ValueError, match="lower-case letters"):
        pack.pack(str(tmp_path / "src"), "Tiny-Photos", out)
    one = pack.pack(str(tmp_path / "src"), "one_thread", out, eval_holdout=0.3, read_threads=1)
    assert one["splits"] == {"train": len(sources.make_source(cfg, "train")), "validation": len(got)}
    seq = sources.make_source(_cfg(source="tfds", tfds_name="one_thread", tfds_data_dir=out), "eval")
    assert [seq[k]["data"] for k in range(len(seq))] == [got[k]["data"] for k in range(len(got))]
    _make_folder(tmp_path / "val", 3)
    summary = pack.pack(str(tmp_path / "src"), "with_val", out, eval_src=str(tmp_path / "val"))
    assert summary["splits"] == {"train": 12, "validation": 3} and len(summary["skipped"]) == 1
    assert summary["skipped"][0][0].endswith("broken.png") and summary["class_names"] == ["class_0", "class_1", "class_2"]
    _make_folder(tmp_path / "val2" / "dogs", 2)  # "dogs" is not a class of src
    with pytest.raises(ValueError, match=r"outside the classes of --src .*\['dogs'\]"):
        pack.pack(str(tmp_path / "src"), "other", out, eval_src=str(tmp_path / "val2"))


def test_tfds_missing_dataset_message(tmp_path):
    cfg = _cfg(source="tfds", tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        data_lib.create_train_iterator(cfg, resolution=RES, global_batch_size=4, seed=0)


# ----------------------------------------------------------------------------------------
# Bad configuration.


def test_bad_config_messages(tmp_path, fake_processes):
    kw = dict(resolution=RES, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="Unknown data_cfg.source='bogus'"):
        data_lib.create_train_iterator(_cfg(source="bogus"), **kw)
    with pytest.raises(ValueError, match="not an existing folder"):
        data_lib.create_train_iterator(_cfg(source="folder", path=str(tmp_path / "nope")), **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        data_lib.create_train_iterator(_cfg(source="folder", path=str(tmp_path / "empty")), **kw)
    _make_folder(tmp_path / "two", 2)
    with pytest.raises(ValueError, match="eval split .* is empty|Increase eval_holdout"):
        data_lib.create_eval_batches(
            _cfg(source="folder", path=str(tmp_path / "two"), eval_holdout=1e-9),
            resolution=RES, batch_size=2, num_images=4,
        )
    with pytest.raises(ValueError, match="eval_holdout"):
        data_lib.create_train_iterator(_cfg(source="folder", path=str(tmp_path / "two"), eval_holdout=1.5), **kw)
    with pytest.raises(ValueError, match="resize_short_side"):
        data_lib.create_train_iterator(_cfg(resize_short_side=16), **kw)
    with pytest.raises(ValueError, match="worker_count"):
        data_lib.create_train_iterator(_cfg(worker_count=-1), **kw)
    fake_processes(0, 3)
    with pytest.raises(ValueError, match="global_batch_size=8 is not divisible by jax.process_count\\(\\)=3"):
        data_lib.create_train_iterator(_cfg(), **kw)
    with pytest.raises(ValueError, match="eval batch_size=4 is not divisible"):
        data_lib.create_eval_batches(_cfg(), resolution=RES, batch_size=4, num_images=4)
    # More processes than training images is fine now (the stream is global): each of 8
    # processes takes one of the 7 photos' stream positions per batch of 8.
    fake_processes(0, 8)
    it = data_lib.create_train_iterator(_cfg(), **kw)
    assert next(it)["image"].shape == (1, RES, RES, 3)
    it.close()


# ----------------------------------------------------------------------------------------
# Real multi-process run (two JAX processes on this machine, gloo collectives).

_TWO_PROCESS_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[4])
import jax

def main():
    pid, port, d = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import grain, ml_collections, numpy as np, orbax.checkpoint as ocp
    from ldm_jax import data as D
    cfg = ml_collections.ConfigDict(dict(source="folder", path=d, eval_holdout=0.25))
    it = D.create_train_iterator(cfg, resolution=16, global_batch_size=8, seed=0)
    ids = lambda x: [int(round((float(v[..., 0].mean()) + 1) * 127.5)) for v in x]
    train = [ids(next(it)["image"]) for _ in range(6)]
    ev = D.create_eval_batches(cfg, resolution=16, batch_size=4, num_images=100)
    with ocp.CheckpointManager(os.path.join(d, os.pardir, "ckpt")) as m:
        m.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        m.wait_until_finished()
    out = dict(train=train, eval=[ids(b["image"]) for b in ev], n_eval=len(ev),
               shape=list(ev[0]["image"].shape))
    print("RESULT" + json.dumps(out), flush=True)

if __name__ == "__main__":
    main()
"""


def test_two_real_processes_split_each_global_batch(tmp_path):
    """Two real JAX processes: process p's batches are exactly its halves of the global
    batches a single process reads (train and eval), so within each global batch the two
    processes' examples are disjoint (since "Scale-out"; before, each process read its own
    contiguous shard). Their checkpointed iterator states are the same JSON."""
    import json
    import socket
    import subprocess
    import sys

    imgs = tmp_path / "imgs"
    rels = _make_folder(imgs, 24)
    eval_ids = {i for i, r in enumerate(rels) if sources.in_holdout(r, 0.25)}
    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(imgs), repo],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(out.split("RESULT", 1)[1].splitlines()[0]))
    cfg = ml_collections.ConfigDict(dict(source="folder", path=str(imgs), eval_holdout=0.25))
    it = data_lib.create_train_iterator(cfg, resolution=16, global_batch_size=8, seed=0)
    ref = [[_id_of(x) for x in next(it)["image"]] for _ in range(6)]
    for k in range(6):
        assert results[0]["train"][k] + results[1]["train"][k] == ref[k]
        assert not set(ref[k]) & eval_ids
    ev_ref = data_lib.create_eval_batches(cfg, resolution=16, batch_size=4, num_images=100)
    for k, b in enumerate(ev_ref):
        assert results[0]["eval"][k] + results[1]["eval"][k] == [_id_of(x) for x in b["image"]]
    assert results[0]["n_eval"] == results[1]["n_eval"] == len(ev_ref)
    assert results[0]["shape"] == [2, 16, 16, 3]
    files = sorted(f for f in os.listdir(tmp_path / "ckpt" / "1" / "data") if f.endswith(".json"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
    states = [json.loads((tmp_path / "ckpt" / "1" / "data" / f).read_text()) for f in files]
    assert states[0] == states[1] and states[0]["consumed"] == 48
