"""Image metrics against scikit-image, MS-SSIM, and the autoencoder evaluation end to end.

The end-to-end tests use a tiny KL-f8 autoencoder saved with ``save_pretrained``, a
random-weight LPIPS (``lpips='random'``, reported as ``lpips_random_vgg``) and a
randomly initialised FID Inception written to an .npz here, on the embedded photos
(2 held-out images, padded to a batch of 8 over the 8 fake devices) or a small folder.
f8 keeps the full-size pass light: the encoder's mid attention spans all latent
positions (56x80 for the 448x640 padded photos).
"""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import save_test_autoencoder
from ldm_jax import evaluate, metrics, pretrained
from ldm_jax.convert.inception_weights import InceptionWeightsMissingError, save_inception_npz
from ldm_jax.data import sources as sources_lib
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.inception import FIDInceptionV3
from ldm_jax.models.lpips import LPIPS, LPIPSWeightsMissingError

AE_CFG = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=32)


# ----------------------------------------------------------------------------- metrics


def _skimage_psnr_ssim(x, y):
    """Reference values on [0, 1] images (float64), dm-pix's SSIM settings."""
    a, b = (np.asarray(x, np.float64) + 1) / 2, (np.asarray(y, np.float64) + 1) / 2
    p = [peak_signal_noise_ratio(u, v, data_range=1.0) for u, v in zip(a, b)]
    s = [structural_similarity(u, v, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                               sigma=1.5, use_sample_covariance=False) for u, v in zip(a, b)]
    return np.asarray(p), np.asarray(s)


def _image_pairs():
    rng = np.random.default_rng(0)
    noise_x = rng.uniform(-1, 1, (2, 48, 40, 3))
    noise_y = np.clip(noise_x + rng.normal(0, 0.3, noise_x.shape), -1, 1)
    astro = skdata.astronaut()[100:196:2, 150:230:2].astype(np.float64) / 127.5 - 1  # 48x40
    yy, xx = np.mgrid[0:48, 0:40]
    ramp = np.stack([yy / 47.0, xx / 39.0, ((yy // 8 + xx // 8) % 2).astype(float)], -1) * 2 - 1
    struct_x = np.stack([astro, ramp])
    struct_y = np.clip(np.stack([np.roll(astro, 1, axis=1) * 0.9, ramp * 0.7 + 0.1]), -1, 1)
    return [("random", noise_x, noise_y), ("structured", struct_x, struct_y)]


@jax.jit  # (as the evaluation runs them; one program for both cases, not one per eager op)
def _all_metrics(x, y, h, w):
    return metrics.psnr(x, y), metrics.ssim(x, y), metrics.region_metrics(x, y, h, w)


@pytest.mark.parametrize("kind,x,y", _image_pairs(), ids=lambda v: v if isinstance(v, str) else "")
def test_psnr_ssim_match_skimage(kind, x, y):
    want_p, want_s = _skimage_psnr_ssim(x, y)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    hw = jnp.asarray([x.shape[1]] * len(x)), jnp.asarray([x.shape[2]] * len(x))
    psnr, ssim, r = _all_metrics(xj, yj, *hw)
    np.testing.assert_allclose(np.asarray(psnr), want_p, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ssim), want_s, atol=1e-4, rtol=0)
    # The masked variant used for full-size images gives the same on unpadded images.
    np.testing.assert_allclose(np.asarray(r["psnr"]), want_p, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(r["ssim"]), want_s, atol=1e-4, rtol=0)


def test_region_metrics_equal_metrics_of_the_crop():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (1, 200, 190, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    pad = ((0, 0), (0, 56), (0, 66), (0, 0))
    xp, yp = np.pad(x, pad, mode="reflect"), np.pad(y, pad)  # padding differs on purpose
    region = jax.jit(metrics.region_metrics)
    r = region(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray([200]), jnp.asarray([190]))
    whole = jax.jit(lambda a, b: dict(psnr=metrics.psnr(a, b), ssim=metrics.ssim(a, b),
                                      ms_ssim=metrics.ms_ssim(a, b)))(jnp.asarray(x), jnp.asarray(y))
    for name in ("psnr", "ssim", "ms_ssim"):
        np.testing.assert_allclose(np.asarray(r[name]), np.asarray(whole[name]), rtol=1e-5, err_msg=name)
    small = region(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray([120]), jnp.asarray([190]))
    assert np.isnan(np.asarray(small["ms_ssim"])).all()  # below 176 px: no MS-SSIM


def test_ms_ssim_sanity():
    x = jnp.asarray(skdata.astronaut()[:256, :256].astype(np.float32) / 127.5 - 1)[None]
    assert float(metrics.ms_ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(2)
    scores = []
    for sigma in (0.02, 0.1, 0.3):
        y = jnp.clip(x + jnp.asarray(rng.normal(0, sigma, x.shape), jnp.float32), -1, 1)
        scores.append(float(metrics.ms_ssim(x, y)[0]))
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0
    # The finest-scale SSIM of the MS-SSIM code is dm-pix's SSIM.
    y = jnp.clip(x + 0.1, -1, 1)
    full, _ = metrics._ssim_and_cs((x + 1) / 2, (y + 1) / 2)
    np.testing.assert_allclose(np.asarray(full.mean(-1)), np.asarray(metrics.ssim(x, y)), atol=1e-4)
    assert metrics.ms_ssim_supported(176, 300) and not metrics.ms_ssim_supported(175, 300)
    with pytest.raises(ValueError, match="at least 176"):
        metrics.ms_ssim(x[:, :64, :64], x[:, :64, :64])


def test_lpips_region_equals_lpips_on_the_whole_image():
    lp = LPIPS(rngs=nnx.Rngs(0))  # (its VGG init is one random draw)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 40, 48, 3)), jnp.float32)
    y = jnp.asarray(np.clip(np.asarray(x) + 0.3 * rng.normal(size=x.shape), -1, 1), jnp.float32)
    h, w = jnp.asarray([40, 40]), jnp.asarray([48, 48])
    region, whole = nnx.jit(lambda m, *a: (evaluate._lpips_region(m, *a), m(*a[:2])))(lp, x, y, h, w)
    np.testing.assert_allclose(np.asarray(region), np.asarray(whole), rtol=1e-5)


# ----------------------------------------------------------------------------- data specs


def test_parse_data_spec(tmp_path):
    cfg, mode, _ = evaluate.parse_data_spec("embedded")
    assert cfg.source == "embedded" and mode == "eval"
    cfg, mode, _ = evaluate.parse_data_spec(f"folder:{tmp_path}")
    assert (cfg.source, cfg.path, mode) == ("folder", str(tmp_path), "all")
    train = {"data": {"source": "folder", "path": str(tmp_path), "eval_holdout": 0.2}}
    cfg, mode, desc = evaluate.parse_data_spec(f"folder:{tmp_path}", train)
    assert mode == "eval" and cfg.eval_holdout == 0.2 and "held-out" in desc
    assert evaluate.parse_data_spec(f"folder:{tmp_path}:all", train)[1] == "all"
    cfg, _, _ = evaluate.parse_data_spec("tfds:imagenette/320px-v2")
    assert (cfg.tfds_name, cfg.eval_split) == ("imagenette/320px-v2", "validation")
    cfg, _, _ = evaluate.parse_data_spec("tfds:imagenet2012:5.1.0:validation[:1000]")
    assert (cfg.tfds_name, cfg.eval_split) == ("imagenet2012:5.1.0", "validation[:1000]")
    for bad in ("imagenet", "folder:", "tfds:", "tfds:a:b:c"):
        with pytest.raises(ValueError):
            evaluate.parse_data_spec(bad)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    return save_test_autoencoder(str(tmp_path_factory.mktemp("ae")), AE_CFG)


@pytest.fixture(scope="module")
def inception_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("inc") / "random_fid_inception.npz"
    return save_inception_npz(FIDInceptionV3(rngs=nnx.Rngs(0)), path)


@pytest.fixture()
def no_weights(tmp_path, monkeypatch):
    """An empty weights cache and torch hub, offline: nothing pretrained can be found."""
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    monkeypatch.setenv("LDM_JAX_OFFLINE", "1")


def _finite_numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_evaluate_autoencoder_end_to_end(ae_dir, inception_npz, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="FID on 2 images"):
        r = evaluate.evaluate_autoencoder(
            ae_dir, "embedded", batch_size=8, full_size=True, out_dir=str(out), lpips="random",
            inception_weights=inception_npz, num_best_worst=2, fid_method="eigh")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == r
    m, f = r["metrics"], r["full_size"]
    # Every image exactly once, although the batch of 8 held 6 pad slots.
    assert r["data"]["num_evaluated"] == 2 and m["num_images"] == 2 and f["num_images"] == 2
    assert r["data"]["skipped_files"] == [] and r["batch_size"] == 8
    for block in (m, f):
        for k in ("psnr", "ssim", "l1", "lpips_random_vgg", "rfid"):
            assert isinstance(block[k], float) and np.isfinite(block[k]), k
            assert block.get(f"{k}_count", 2) == 2
        assert "lpips" not in block and block["rfid"] >= 0 and block["rfid_warning"]
    assert m["ms_ssim"] is None and "176" in m["ms_ssim_note"]  # 32x32 crops
    assert 0 < f["ms_ssim"] <= 1 and f["ms_ssim_count"] == 2  # 400x600 and 427x640 photos
    assert r["resolution"] == 32 and "decode_tiled" in f["decoding"]
    assert "RANDOM" in r["lpips"]["status"] and r["fid"]["method"] == "eigh"
    assert r["model"]["config"]["ch_mult"] == [1, 2, 2, 2] and r["model"]["downsample_factor"] == 8
    for key in ("jax", "flax", "numpy", "scipy", "python"):
        assert r["versions"][key]
    assert r["devices"]["count"] == 8
    assert all(np.isfinite(v) for _, v in _finite_numbers(r))

    png = Image.open(out / "recon_best_worst.png")
    png.load()
    assert png.mode == "RGB" and png.size == (2 + 2 * (32 + 2), 2 + 4 * (32 + 2))
    assert r["best_worst"]["best"][0] == r["best_worst"]["worst"][-1]  # 2 images, k=2

    with open(out / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [os.path.basename(row["image"]) for row in rows] == list(sources_lib.EMBEDDED_EVAL_FILES)
    assert np.mean([float(row["psnr"]) for row in rows]) == pytest.approx(m["psnr"], rel=1e-5)

    # Independent check of one per-image value: reconstruct coffee.png by hand.
    from ldm_jax import data

    batch = data.create_eval_batches(r_cfg := evaluate.parse_data_spec("embedded")[0],
                                     resolution=32, batch_size=1, num_images=1)[0]
    del r_cfg
    ae, _, _ = pretrained.load_autoencoder(ae_dir)
    x = jnp.asarray(batch["image"])
    psnr = nnx.jit(lambda m, x: metrics.psnr(x, evaluate._q8(m.decode(m.encode(x).mode()))))(ae, x)
    assert float(psnr[0]) == pytest.approx(float(rows[0]["psnr"]), abs=1e-3)


def _write_folder(root, n_good: int):
    rng = np.random.default_rng(4)
    os.makedirs(root, exist_ok=True)
    for i in range(n_good):
        h, w = 36 + 4 * (i % 3), 40 + 8 * (i % 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f"{root}/img_{i:02d}.png")
    with open(f"{root}/zz_broken.png", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n not really a png")


def test_folder_every_image_counted_once(ae_dir, tmp_path):
    root = str(tmp_path / "imgs")
    _write_folder(root, 11)  # 12 files, 1 corrupt: 2 batches of 8 with 5 pad slots
    r = evaluate.evaluate_autoencoder(ae_dir, f"folder:{root}", batch_size=8, lpips="none",
                                      fid=False, out_dir=str(tmp_path / "out"), num_best_worst=3)
    assert r["data"]["num_read"] == 12 and r["data"]["num_evaluated"] == 11
    assert [os.path.basename(p) for p in r["data"]["skipped_files"]] == ["zz_broken.png"]
    assert r["metrics"]["psnr_count"] == 11 and r["metrics"]["rfid"] is None
    assert "lpips" not in r["metrics"] and "lpips_random_vgg" not in r["metrics"]
    with open(tmp_path / "out" / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["index"]) for row in rows] == list(range(11))
    psnrs = [float(row["psnr"]) for row in rows]
    assert max(psnrs) > min(psnrs)
    # num_images caps what is read; a batch that is not a multiple of the devices is rounded up.
    r = evaluate.evaluate_autoencoder(ae_dir, f"folder:{root}", batch_size=3, num_images=5,
                                      lpips="none", fid=False, out_dir=str(tmp_path / "out5"))
    assert r["data"]["num_evaluated"] == 5 and r["batch_size"] == 8 and r["notes"]


def test_full_size_on_several_devices_equals_one_device(ae_dir, tmp_path):
    """The full-size pass scores image by image on several local devices at once (one
    worker each, every k-th image): every image once, the same per-image numbers as on
    one device, and a corrupt file still skipped."""
    root = str(tmp_path / "imgs")
    _write_folder(root, 7)  # 8 files, 1 corrupt; 36-44 x 40-48 px, all padded to 64x64
    runs = {}
    for k in (1, 3):
        out = tmp_path / f"out{k}"
        # (3 workers: as on GPUs with the compilation cache, the first image of each size alone)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(evaluate, "_compiles_shared_across_devices", lambda: k > 1)
            r = evaluate.evaluate_autoencoder(ae_dir, f"folder:{root}", batch_size=8, full_size=True,
                                              lpips="none", fid=False, out_dir=str(out), full_size_devices=k)
        assert r["full_size"]["devices_per_process"] == k and r["full_size"]["num_images"] == 7
        assert [os.path.basename(p) for p in r["data"]["skipped_files"]] == ["zz_broken.png"]
        with open(out / "per_image.csv") as fh:
            runs[k] = list(csv.DictReader(fh))
    full_cols = ["full_psnr", "full_ssim", "full_l1"]
    assert len(runs[1]) == len(runs[3]) == 7
    for a, b in zip(runs[1], runs[3]):
        assert a["image"] == b["image"]
        for c in full_cols:
            assert float(a[c]) == pytest.approx(float(b[c]), rel=1e-6, abs=1e-7), (a["image"], c)
    assert len({row["full_psnr"] for row in runs[3]}) > 1
    with pytest.raises(ValueError, match="full_size_devices must be >= 0"):
        evaluate.evaluate_autoencoder(ae_dir, f"folder:{root}", full_size=True, lpips="none", fid=False,
                                      out_dir=str(tmp_path / "bad"), full_size_devices=-1)


def test_first_image_of_each_size_runs_alone():
    """The full-size pass's gate: enabled, the first image of a size runs alone (the others of
    that size wait for it, other sizes do not); then the size is open to all at once; a
    failed first image passes the turn on. Disabled, nothing waits."""
    import threading

    gate = evaluate._FirstOfEachSize(True)
    inside, release, order = threading.Event(), threading.Event(), []

    def first():
        with gate((64, 64)):
            inside.set()
            release.wait(10)
            order.append("first")

    def second():
        with gate((64, 64)):
            order.append("second")

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    with gate((128, 64)):  # another size: its own first image, no wait
        order.append("other")
    t2.join(0.3)
    assert t2.is_alive() and order == ["other"]  # waits for the first 64x64 image
    release.set()
    t1.join(10)
    t2.join(10)
    assert order == ["other", "first", "second"]
    gate._locks[(64, 64)].acquire()  # a done size takes no lock
    with gate((64, 64)):
        pass
    gate._locks[(64, 64)].release()
    with pytest.raises(RuntimeError, match="decode failed"):
        with gate((32, 32)):
            raise RuntimeError("decode failed")
    assert (32, 32) not in gate._done and not gate._locks[(32, 32)].locked()
    off = evaluate._FirstOfEachSize(False)
    with off((64, 64)), off((64, 64)):  # (enabled, this would wait for itself)
        pass
    assert not off._locks


def test_reference_pass_reports_its_own_unreadable_images(tmp_path):
    """The generation evaluation's reference pass returns the keys it could not read, every
    time: a second pass in the same process (where the file registry already knows the file)
    reports it again, and the statistics count only readable images."""
    import jax

    from ldm_jax import evaluate_generation, sharding

    root = str(tmp_path / "imgs")
    _write_folder(root, 5)  # 6 files, the last one corrupt
    source = evaluate._open_source(evaluate.parse_data_spec(f"folder:{root}:all")[0], "all")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})

    @jax.jit
    def feat_fn(_, x):  # stand-in for the Inception: (pool, logits, spatial) per image
        m = x.mean(axis=(1, 2))
        return m, m, jnp.concatenate([m, m], axis=1)

    for _ in range(2):
        stats, stats_s, kept, skipped = evaluate_generation._reference_pass(
            source, len(source), 16, 8, mesh, feat_fn, None, pr_num=4)
        assert [os.path.basename(source.describe(k)) for k in skipped] == ["zz_broken.png"]
        assert stats.n == stats_s.n == 5 and kept.shape == (4, 3)


def test_missing_weights_stop_with_clear_errors(ae_dir, tmp_path, no_weights, capsys):
    with pytest.raises(LPIPSWeightsMissingError, match="vgg16-397923af.pth"):
        evaluate.evaluate_autoencoder(ae_dir, "embedded", batch_size=8, fid=False,
                                      out_dir=str(tmp_path / "a"))
    with pytest.raises(InceptionWeightsMissingError, match="pt_inception-2015-12-05"):
        evaluate.evaluate_autoencoder(ae_dir, "embedded", batch_size=8, lpips="none",
                                      out_dir=str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # The CLI prints the same message and exits with status 2.
    assert evaluate.main(["--workdir", ae_dir, "--no_lpips", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "FID Inception weights not found" in err and "--no_fid skips rFID" in err
    assert evaluate.main(["--workdir", ae_dir, "--no_fid", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "LPIPS pretrained weights not found" in err and "--no_lpips skips LPIPS" in err


def test_cli_smoke(ae_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = evaluate.main(["--workdir", ae_dir, "--data=embedded", "--batch", "8", "--no_fid",
                        "--random_lpips", "--out", str(out), "--k", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "psnr" in printed and "lpips_random_vgg" in printed and "metrics.json" in printed
    r = json.loads((out / "metrics.json").read_text())
    assert r["metrics"]["num_images"] == 2 and r["fid"]["method"] is None
    assert (out / "recon_best_worst.png").is_file()
