"""Latent diffusion trainer end to end on tiny configs (CPU, 8 fake devices): training on a
frozen autoencoder, scale factor, resume, latent cache, pixel baseline, sample.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import REPO_ROOT, cpu_env, rel_l2, save_test_autoencoder
from ldm_jax import config_lib, pretrained, sharding
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.trainers import ldm

AE_CFG = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32)  # f4: 8x8x4


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    return save_test_autoencoder(str(tmp_path_factory.mktemp("ae")), AE_CFG)


def tiny(spec="configs/ldm_f8.py:tiny", **overrides):
    c = config_lib.load_config(os.path.join(REPO_ROOT, spec))
    config_lib.set_fields(c, overrides)
    return c


@pytest.fixture(scope="module")
def trained(ae_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ldm"))
    config = tiny(autoencoder_path=ae_dir, **{"model.num_classes": 9})
    return workdir, config, ldm.train_and_evaluate(config, workdir)


def test_tiny_ldm_trains_on_8_devices(trained):
    workdir, config, result = trained
    assert jax.device_count() == 8
    hist = result["history"]
    assert sorted(hist) == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in hist.values())
    assert np.isfinite(result["eval"]["eval/loss_ema"])
    png = os.path.join(workdir, "images", "samples_00000004.png")
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size[0] > 32 * 8
        grid = np.asarray(im)
    # The grid draws one key per sample, as sample.py does: it shows the first images of
    # sample.py's --seed=config.seed+7 on the last checkpoint (within the float differences
    # of two compiled programs), whatever the number of devices.
    from ldm_jax import metric_writers as mw
    from ldm_jax import sampling

    imgs, _, _ = sampling.sample_images(workdir, num=config.num_image_samples, seed=config.seed + 7)
    diff = np.abs(mw.image_grid([imgs]).astype(int) - grid.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_scale_factor_is_one_over_latent_std(trained, ae_dir):
    workdir, config, _ = trained
    tr = ldm.load_trained(workdir)
    # Recompute 1/std of the first batch's latents independently.
    from ldm_jax import data

    first = next(data.create_train_iterator(config.data, resolution=32, global_batch_size=8,
                                            seed=config.seed))["image"]
    ae, _, _ = pretrained.load_autoencoder(ae_dir)
    from ldm_jax.models.autoencoder import DiagonalGaussian

    z = DiagonalGaussian(ae.encode_moments(jnp.asarray(first))).sample(jax.random.PRNGKey(config.seed))
    np.testing.assert_allclose(float(tr.scale_factor), 1.0 / float(jnp.std(z)), rtol=1e-3)
    assert tr.latent_shape == (8, 8, 4) and tr.step == 4


def test_loss_decreases_on_a_fixed_batch(ae_dir):
    """The step itself (no data pipeline): 40 steps on one batch lower the loss."""
    config = tiny(autoencoder_path=ae_dir, **{"optim.lr": 2e-3, "ema.decay": 0.9})
    mesh = sharding.make_mesh(config.mesh)
    ae_gd, ae_state, ae_cfg, _ = ldm.load_autoencoder(config)
    tx, lr_fn = ldm.make_optimizer(config)
    gd, state, state_sh = ldm.create_train_state(config, mesh, tx, 4, 1.0)
    models = ldm.Models(unet=gd, ae=ae_gd)
    step = jax.jit(ldm.make_train_step(models, config, tx, lr_fn, ldm.make_schedule(config)),
                   donate_argnums=(0,))
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3), minval=-1, maxval=1))
    batch = sharding.global_batch({"image": x, "label": np.zeros(8, np.int32)},
                                  sharding.batch_sharding(mesh))
    losses = []
    for _ in range(40):
        state, acc = step(state, ae_state, batch, ldm.TrainMetrics.empty())
        losses.append(float(acc.compute()["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def test_grad_accumulation_equals_whole_batch(ae_dir):
    """2 microbatches of 8 (one image per device each) give the step
    on all 16 images: posterior noise, t, diffusion noise and the label drop mask are drawn
    for the whole batch before it is split, and the split moves no data between devices.
    (The memory saving is checked on the VAE-GAN step, whose activations dominate at this
    size; the tiny U-Net's temporaries are mostly parameter-sized.)"""
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (16, 32, 32, 3), minval=-1, maxval=1))
    labels = np.arange(16, dtype=np.int32) % 9
    runs = {}
    for k in (1, 2):
        config = tiny(autoencoder_path=ae_dir, global_batch_size=16,
                      **{"model.num_classes": 9, "diffusion.label_dropout": 0.5,
                         "optim.grad_accum_steps": k})
        mesh = sharding.make_mesh(config.mesh)
        ae_gd, ae_state, _, _ = ldm.load_autoencoder(config)
        ae_state = jax.device_put(ae_state, sharding.replicated(mesh))
        tx, lr_fn = ldm.make_optimizer(config)
        gd, state, _ = ldm.create_train_state(config, mesh, tx, 4, 0.7)
        models = ldm.Models(unet=gd, ae=ae_gd)
        batch = sharding.global_batch({"image": x, "label": labels}, sharding.batch_sharding(mesh))
        args = (state, ae_state, batch, ldm.TrainMetrics.empty())
        compiled = jax.jit(ldm.make_train_step(models, config, tx, lr_fn,
                                               ldm.make_schedule(config))).lower(*args).compile()
        new_state, acc = compiled(*args)
        runs[k] = (jax.device_get(new_state.opt), acc.compute(), compiled)
    (o1, m1, _), (o2, m2, c2) = runs[1], runs[2]
    for name in ("loss", "grad_norm"):
        assert float(m2[name]) == pytest.approx(float(m1[name]), rel=1e-5), name
    assert rel_l2(o2, o1) < 1e-5  # AdamW's moments: the (clipped) gradient itself
    assert "all-to-all" not in c2.as_text() and "all-gather" not in c2.as_text()


def test_resume_reproduces_uninterrupted_run(trained, ae_dir, tmp_path):
    full_dir, config, full = trained  # 4 uninterrupted steps
    part = str(tmp_path / "part")
    first = ldm.train_and_evaluate(tiny(autoencoder_path=ae_dir, num_train_steps=2, **{"model.num_classes": 9}), part)
    assert first["final_step"] == 2
    second = ldm.train_and_evaluate(tiny(autoencoder_path=ae_dir, **{"model.num_classes": 9}), part)
    assert second["start_step"] == 2
    for s in (3, 4):
        np.testing.assert_allclose(second["history"][s]["loss"], full["history"][s]["loss"], rtol=1e-5)
    a, b = ldm.load_trained(full_dir), ldm.load_trained(part)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # another class count changes the label table: a clear error, not orbax's
    from ldm_jax.checkpointing import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=r"params.class_embedding.embedding \(10, .*\(11, .*model.num_classes 9 -> 10"):
        ldm.train_and_evaluate(tiny(autoencoder_path=ae_dir, **{"model.num_classes": 10}), part)


def test_latent_cache_is_built_and_used_with_a_fixed_scale(ae_dir, tmp_path):
    from ldm_jax.trainers import latent_cache

    config = tiny(autoencoder_path=ae_dir, **{"latent.cache": True, "latent.scale_factor": 0.18215})
    result = ldm.train_and_evaluate(config, str(tmp_path))
    cache = latent_cache.LatentCache(latent_cache.cache_dir(str(tmp_path)))
    # 7 embedded training photos, each also mirrored (data.random_flip): records 0-6 are the
    # center crops in listing order, 7-13 their mirror images.
    assert len(cache) == 14 and cache.meta["parts"] == ["part_0-of-1"]
    assert cache.labels.tolist() == list(range(7)) * 2
    moments = cache.moments()
    assert moments.shape == (14, 8, 8, 8) and moments.dtype == np.float16
    # The cached moments are the frozen encoder's, on the center crops and their mirrors.
    ae, _, _ = pretrained.load_autoencoder(ae_dir)
    from ldm_jax import data

    images = np.concatenate([b["image"] for b in data.ordered_batches(
        config.data, split="train", resolution=32, batch_size=8, num_images=7, keep_remainder=True)])[:7]
    both = jnp.asarray(np.concatenate([images, images[:, :, ::-1]]))
    want = np.asarray(nnx.jit(lambda m, x: m.encode_moments(x))(ae, both))
    np.testing.assert_allclose(moments.astype(np.float32), want, atol=2e-2, rtol=2e-3)
    assert all(np.isfinite(m["loss"]) for m in result["history"].values())
    assert float(ldm.load_trained(str(tmp_path)).scale_factor) == pytest.approx(0.18215)
    part = os.path.join(cache.directory, "part_0-of-1.moments.npy")
    mtime = os.path.getmtime(part)
    again = ldm.train_and_evaluate(
        tiny(autoencoder_path=ae_dir, num_train_steps=6, **{"latent.cache": True, "latent.scale_factor": 0.18215}),
        str(tmp_path))
    assert again["start_step"] == 4 and again["final_step"] == 6
    assert os.path.getmtime(part) == mtime  # reused, not rebuilt
    # A cache of other inputs is refused, not silently trained on.
    with pytest.raises(ValueError, match="latent cache .* was built from other inputs .*resolution"):
        ldm.train_and_evaluate(
            tiny(autoencoder_path=ae_dir, num_train_steps=7, image_resolution=64,
                 **{"latent.cache": True, "latent.scale_factor": 0.18215}), str(tmp_path))


def test_config_errors_are_clear(ae_dir, tmp_path):
    with pytest.raises(ValueError, match="autoencoder_path is empty"):
        ldm.train_and_evaluate(tiny(), str(tmp_path))
    with pytest.raises(ValueError, match="unknown config key 'diffusion.schedul'"):
        c = tiny(autoencoder_path=ae_dir)
        c.diffusion.schedul = "x"
        ldm.train_and_evaluate(c, str(tmp_path))
    with pytest.raises(ValueError, match="sampling.sampler"):
        ldm.train_and_evaluate(tiny(autoencoder_path=ae_dir, **{"sampling.sampler": "euler"}), str(tmp_path))
    with pytest.raises(ValueError, match="model.remat_policy must be one of"):
        ldm.train_and_evaluate(tiny(autoencoder_path=ae_dir, **{"model.remat_policy": "dots"}), str(tmp_path))
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible"):
        ldm.train_and_evaluate(tiny(autoencoder_path=ae_dir, global_batch_size=6), str(tmp_path))


def test_sample_py_writes_png_and_npz(trained, tmp_path):
    """sample.py's files; and ``--compilation_cache_dir`` (over $JAX_COMPILATION_CACHE_DIR):
    the first run writes its compiled programs there, a second run compiles nothing."""
    workdir, _, _ = trained
    cache = tmp_path / "xla"
    env = cpu_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = str(tmp_path / "out")
    args = [sys.executable, os.path.join(REPO_ROOT, "sample.py"), f"--workdir={workdir}", "--num=10",
            "--steps=3", "--class=1,2", "--cfg_scale=2", "--batch=8", f"--compilation_cache_dir={cache}"]
    r = subprocess.run(args + [f"--out={out}", "--pngs"], env=env, check=True, capture_output=True,
                       text=True, timeout=600)
    log = r.stdout + r.stderr
    assert len(list(cache.glob("*-cache"))) >= 2, log[-3000:]  # sampler, decoder, ...
    again = subprocess.run(args + [f"--out={tmp_path / 'again'}", "--grid=0"], check=True, capture_output=True,
                           text=True, timeout=600, env=dict(env, JAX_EXPLAIN_CACHE_MISSES="1", JAX_LOG_COMPILES="1"))
    again_log = again.stdout + again.stderr
    assert "PERSISTENT COMPILATION CACHE MISS" not in again_log, again_log[-3000:]
    assert again_log.count("Persistent compilation cache hit") >= 2
    assert "10 / 10 images" in log and "wrote " in log
    # INFO lines are sample.py's progress only, not orbax's or jax's internals
    info_from = set(re.findall(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", log, re.MULTILINE))
    assert info_from == {"sample.py"}, log[-3000:]
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    npzs = [f for f in os.listdir(out) if f.endswith(".npz")]
    assert len(pngs) == 1 and len(npzs) == 1 and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # named after the settings (the tiny config's sampler is DDIM), which are recorded beside
    tag = "00000004_ddim3_cfg2_c1-2_s0_n10"
    assert npzs == [f"samples_{tag}.npz"] and pngs == [f"samples_{tag}.png"]
    with open(os.path.join(out, f"samples_{tag}.json")) as f:
        info = json.load(f)
    assert info["tag"] == tag and info["workdir"] == os.path.abspath(workdir) and info["weights"] == "ema"
    assert info["checkpoint_step"] == 4 and info["num"] == 10 and info["image_size"] == [32, 32]
    assert info["sampler"] == {"name": "ddim", "steps": 3, "eta": 0.0, "cfg_scale": 2.0, "classes": "1,2",
                               "seed": 0, "batch": 8}
    assert info["decoding"] == "whole" and info["scale_factor"] > 0
    with np.load(os.path.join(out, npzs[0])) as f:
        images = f["images"]
        assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
        assert f["labels"].tolist() == [1, 2] * 5
    with Image.open(os.path.join(out, pngs[0])) as im:
        grid = np.asarray(im.convert("RGB"))
    # 10 images: 4 columns x 3 rows of 32 px cells with 2 px white borders, the last row
    # padded with white cells
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)
    for i in range(12):
        cell = grid[2 + (i // 4) * 34:][:32, 2 + (i % 4) * 34:][:, :32]
        np.testing.assert_array_equal(cell, images[i] if i < 10 else 255)
    # --pngs: every image on its own (written over two batches of 8), the same pixels
    png_dir = os.path.join(out, npzs[0][:-4])
    assert sorted(os.listdir(png_dir)) == [f"{i:06d}.png" for i in range(10)]
    with np.load(tmp_path / "again" / npzs[0]) as f:  # the cached programs: the same images
        np.testing.assert_array_equal(f["images"], images)
    for i in range(10):
        with Image.open(os.path.join(png_dir, f"{i:06d}.png")) as im:
            np.testing.assert_array_equal(np.asarray(im), images[i])


def test_sampler_loop_uses_weights_converted_once():
    """In the sampler's loop the U-Net's conv, dense and embedding weights arrive already in
    the compute dtype (bf16): the float32 parameters are converted once, before the loop.
    Converted inside it, every step re-read all parameters and wrote bf16 copies, one kernel
    per array; XLA does not move them out (the ~270M U-Net's DDIM-50: 9300 of 31070 kernel
    launches). Same samples either way (``test_cast_to_compute_dtype_same_outputs``)."""
    config = tiny("configs/pixel.py:tiny", dtype="bfloat16", **{"model.num_classes": 3})
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: ldm.build_unet(config, 3, 0)), nnx.Param, ...)
    fn = ldm.make_sample_fn(ldm.Models(unet=graphdef, ae=None), config, ldm.make_schedule(config),
                            (2, 16, 16, 3), num_steps=3, cfg_scale=2.0)
    jaxpr = jax.make_jaxpr(fn)(params, rest, None, jax.random.PRNGKey(0), jnp.zeros((2,), jnp.int32), 1.0)
    loops = [e for e in jaxpr.eqns if e.primitive.name in ("while", "scan")]
    assert len(loops) == 1
    (loop,) = loops
    if loop.primitive.name == "while":
        body, n_consts = loop.params["body_jaxpr"].jaxpr, loop.params["body_nconsts"]
    else:
        body, n_consts = loop.params["jaxpr"].jaxpr, loop.params["num_consts"]
    consts = set(body.invars[:n_consts])
    converted = [e for e in body.eqns if e.primitive.name == "convert_element_type"
                 and any(v in consts for v in e.invars if not isinstance(v, jax.extend.core.Literal))]
    assert not converted, [str(e) for e in converted[:3]]
    bf16_consts = [v for v in consts if v.aval.dtype == jnp.bfloat16 and v.aval.ndim >= 1]
    assert len(bf16_consts) >= 10  # conv kernels and biases, dense kernels, the label table


def test_settings_tag_names_every_setting_that_changes_the_samples():
    """Sample files and evaluation folders are named by ``settings_tag``: other guidance
    scales, classes, sizes, seeds, counts or weights give other names; settings left unset
    resolve to the config's (the same name as naming the default)."""
    from types import SimpleNamespace

    import ml_collections

    from ldm_jax.sampling import settings_tag

    def trained(num_classes):
        config = ml_collections.ConfigDict(dict(
            sampling=dict(sampler="ddim", num_steps=50, eta=0.0, cfg_scale=1.5),
            model=dict(num_classes=num_classes)))
        return SimpleNamespace(config=config, step=1234, latent_shape=(32, 32, 4), ae_factor=8)

    cond = trained(1000)
    assert settings_tag(cond, num=64) == "00001234_ddim50_cfg1.5_s0_n64"
    assert settings_tag(cond, num=64, sampler="ddim", steps=50, eta=0.0, cfg_scale=1.5, size=256) == \
        settings_tag(cond, num=64)
    assert settings_tag(cond, num=64, cfg_scale=3, classes="207,360", size=512, seed=2, use_ema=False) == \
        "00001234_ddim50_cfg3_c207-360_512px_raw_s2_n64"
    assert settings_tag(cond, num=8, eta=1.0) == "00001234_ddim50_eta1_cfg1.5_s0_n8"
    assert settings_tag(cond, num=8, sampler="dpmpp_2m", steps=20, eta=1.0) == "00001234_dpmpp_2m20_cfg1.5_s0_n8"
    many = ",".join(str(c) for c in range(100))
    long_tag = settings_tag(cond, num=8, classes=many)
    assert len(long_tag) < 60 and long_tag != settings_tag(cond, num=8, classes=many[:-1])
    tags = {settings_tag(cond, num=64, cfg_scale=c) for c in (1.0, 1.5, 2.0, 3.0, 7.5)}
    assert len(tags) == 5
    # an unconditional model has no guidance scale to name
    assert settings_tag(trained(0), num=16, cfg_scale=3) == "00001234_ddim50_s0_n16"


def test_npz_stream_writes_whole_files_or_none(tmp_path):
    from ldm_jax.sampling import NpzStream

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int32) * 3
    path = str(tmp_path / "s.npz")
    with NpzStream(path, 7) as w:
        for a, b in ((0, 3), (3, 6), (6, 7)):
            w.write(images[a:b], labels[a:b])
    with np.load(path) as f:
        assert sorted(f.files) == ["images", "labels"]
        np.testing.assert_array_equal(f["images"], images)
        np.testing.assert_array_equal(f["labels"], labels)
    # too few images, a wrong shape, an interrupted run: no file at all
    bad = str(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="wrote 3 of the announced 7"):
        with NpzStream(bad, 7) as w:
            w.write(images[:3], labels[:3])
    with pytest.raises(ValueError, match="does not fit"):  # the first batch fixes the image shape
        with NpzStream(bad, 7) as w:
            w.write(images[:3], labels[:3])
            w.write(images[3:, :2], labels[3:])
    with pytest.raises(ValueError, match="wrote 0 of the announced 7"):
        with NpzStream(bad, 7):
            pass
    with pytest.raises(KeyboardInterrupt):
        with NpzStream(bad, 7) as w:
            w.write(images[:3], labels[:3])
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


def test_sampling_is_seeded_and_tiled_for_large_sizes(trained):
    from ldm_jax import sampling as sample

    workdir, _, _ = trained
    a, _, _ = sample.sample_images(workdir, num=8, seed=3, steps=3)
    b, _, _ = sample.sample_images(workdir, num=8, seed=3, steps=3)
    c, _, _ = sample.sample_images(workdir, num=8, seed=4, steps=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Each sample has its own key: a batch of 16 (padded) and a shorter run give the same
    # images, up to the float differences between batch shapes (a level or two of uint8).
    d, _, _ = sample.sample_images(workdir, num=8, seed=3, steps=3, batch=16)
    e, _, _ = sample.sample_images(workdir, num=5, seed=3, steps=3)
    for other in (d, e):
        diff = np.abs(a[:len(other)].astype(int) - other.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5
    big, _, _ = sample.sample_images(workdir, num=8, seed=3, steps=3, size=64)
    assert big.shape == (8, 64, 64, 3)
    with pytest.raises(ValueError, match=r"--tile_overlap must be in \[0, 8\)"):
        sample.sample_images(workdir, num=8, seed=3, steps=3, size=64, tile_overlap=8)
    with pytest.raises(ValueError, match=r"--steps=-3 must be in \[1, 1000\] \(0: the config's 4\)"):
        sample.sample_images(workdir, num=8, steps=-3)
    with pytest.raises(ValueError, match=r"--class='a': give a class index or comma-separated indices"):
        sample.sample_images(workdir, num=8, steps=3, classes="a")


def test_generation_evaluation_without_inception_weights_says_what_to_fetch(trained, tmp_path, monkeypatch,
                                                                             capsys):
    """An LDM evaluation needs the FID Inception: it stops before sampling with the file to
    fetch, and without the autoencoder evaluation's --no_fid way around (FID is the point)."""
    from ldm_jax import evaluate

    workdir, _, _ = trained
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    assert evaluate.main(["--workdir", workdir, "--num_samples", "4", "--is_splits", "2",
                          "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "FID Inception weights not found" in err and "pt_inception-2015-12-05" in err
    assert "--no_fid" not in err and not (tmp_path / "o" / "metrics.json").exists()


def test_init_from_a_trained_ldm(trained, ae_dir, tmp_path):
    """init_from=<LDM workdir> starts the U-Net (and its EMA) from that run's EMA weights."""
    workdir, _, _ = trained
    config = tiny(autoencoder_path=ae_dir, num_train_steps=1, init_from=workdir,
                  **{"model.num_classes": 9, "optim.lr": 1e-12})
    ldm.train_and_evaluate(config, str(tmp_path))
    src, new = ldm.load_trained(workdir), ldm.load_trained(str(tmp_path), use_ema=False)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(src.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_loading_uses_the_settings_recorded_in_the_checkpoint(trained, tmp_path):
    """sample.py / evaluate build the model from the settings stored with the checkpoint, not
    from the workdir's config.json (which a later run in the same workdir rewrites)."""
    import shutil

    workdir, _, _ = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    with open(os.path.join(copy, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["model_channels"] *= 2
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump(cfg, f)
    a, b = ldm.load_trained(workdir), ldm.load_trained(copy)
    assert b.config.model.model_channels == a.config.model.model_channels
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_compare_stops_when_a_run_was_interrupted(tmp_path, monkeypatch):
    """A run stopped early (SIGTERM / Ctrl-C: checkpoint saved, final step short of the
    budget) ends the comparison with a message instead of a report on a partial run."""
    from ldm_jax import compare

    def stopped(config, workdir):
        return {"history": {}, "eval": {}, "start_step": 0, "final_step": 7}

    monkeypatch.setattr(ldm, "train_and_evaluate", stopped)
    with pytest.raises(SystemExit, match="the pixel run stopped at step 7 of 20 .* run the same command again"):
        compare.run_one("pixel", os.path.join(REPO_ROOT, "configs/pixel.py:tiny"), str(tmp_path), 20, {}, "")


def test_latent_vs_pixel_report(ae_dir, tmp_path):
    """The comparison command trains both tiny models for the same budget (the pixel-space
    baseline through the same trainer), samples, scores (random Inception: a smoke run)
    and writes the markdown table and JSON."""
    from ldm_jax import compare

    out = str(tmp_path / "cmp.md")
    res = compare.main([f"--autoencoder_path={ae_dir}", "--latent_config", os.path.join(REPO_ROOT, "configs/ldm_f8.py:tiny"),
                        "--pixel_config", os.path.join(REPO_ROOT, "configs/pixel.py:tiny"), "--steps=2",
                        "--num_samples=16", "--sample_batch=8", "--num_reference=8",
                        f"--workdir={tmp_path / 'wd'}", f"--out={out}", "--random_inception",
                        "--set", "image_every_steps=100"])
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["latent"]["input_shape"] == [8, 8, 4] and rows["pixel"]["input_shape"] == [32, 32, 3]
    assert rows["latent"]["params"] < rows["pixel"]["params"] * 1.01  # same U-Net, in/out convs differ
    for r in rows.values():
        assert r["steps"] == 2 and np.isfinite(r["final_loss"]) and r["num_samples"] == 16
        assert r["sampler"]["batch"] == 8 and r["sample_images_per_s"] > 0  # timed: 2nd batch
        assert np.isfinite(r["fid"]) and r["fid"] >= 0
        assert r["inception_score"] >= 1.0 - 1e-9 and r["num_reference"] == 2  # the held-out photos
        assert r["precision"] is None  # 2 reference images: too few for k = 3 manifolds
    assert len(os.listdir(tmp_path / "wd" / "reference_stats")) == 1  # computed once for both runs
    for run in ("latent", "pixel"):  # the runs' own sample grids are off (num_image_samples=0)
        assert not os.path.exists(tmp_path / "wd" / run / "images")
    text = open(out).read()
    assert "| sampling img/s | FID | sFID | IS | precision | recall |" in text
    assert "| latent | latent | 8x8x4 |" in text and "| pixel | pixel | 32x32x3 |" in text
    assert "RANDOMLY initialised Inception" in text
    assert "Training throughput ratio latent/pixel: " in text and "Sampling throughput ratio latent/pixel: " in text
    assert os.path.isfile(str(tmp_path / "cmp.json"))
    # Re-run on the finished workdir: nothing to train; the row keeps the training figures
    # recorded by the invocation that trained.
    assert rows["latent"]["trained_steps"] == [1, 2] and rows["latent"]["train_images_per_s"] > 0
    again = compare.run_one("latent", os.path.join(REPO_ROOT, "configs/ldm_f8.py:tiny"),
                            str(tmp_path / "wd" / "latent"), 2, {"image_every_steps": "100"}, ae_dir)
    for k in ("train_images_per_s", "train_wall_s", "final_loss", "trained_steps", "steps"):
        assert again[k] == rows["latent"][k], k


def test_generation_evaluation_matches_direct_computation(trained, tmp_path_factory, capsys, monkeypatch):
    """``python -m ldm_jax.evaluate`` on an LDM workdir: the streamed, sharded FID / IS /
    precision-recall equal the same metrics computed directly from ``sample_images`` and
    the reference images; the reference statistics are cached and reused."""
    from ldm_jax import evaluate, fid, gen_metrics, sampling
    from ldm_jax.convert.inception_weights import create_inception, save_inception_npz
    from ldm_jax.data import sources
    from ldm_jax.models.inception import FIDInceptionV3

    workdir, _, _ = trained
    tmp = tmp_path_factory.mktemp("geneval")
    inc_path = save_inception_npz(FIDInceptionV3(rngs=nnx.Rngs(0)), tmp / "inc.npz")
    out = str(tmp / "out")
    args = ["--workdir", workdir, "--num_samples", "12", "--batch", "8", "--steps", "3",
            "--class", "1,4,7", "--seed", "5", "--inception_weights", inc_path, "--pr_k", "2",
            "--is_splits", "3", "--fid_method", "eigh", "--out", out]
    assert evaluate.main(args) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["kind"] == "generation" and m["num_samples"] == 12 and m["checkpoint_step"] == 4
    assert m["num_reference"] == 7  # the embedded training photos the tiny LDM trained on
    assert m["sampler"]["steps"] == 3 and m["sampler"]["classes"] == "1,4,7"
    with Image.open(os.path.join(out, "samples.png")) as im:
        im.verify()

    # the same samples and reference images, scored directly
    images, labels, _ = sampling.sample_images(workdir, num=12, seed=5, steps=3, classes="1,4,7", batch=8)
    assert labels.tolist() == [1, 4, 7] * 4
    inc, _ = create_inception(inc_path)
    reader = evaluate._Reader(sources.EmbeddedSource("train"), range(7), 32, full_size=False)
    ref = np.stack([f.result() for f in reader.submit(range(7))])
    reader.close()
    # one direct pass over the samples, the reference photos and those photos as uint8
    # (an ADM reference batch's arr_0, below): pool3 and the sFID spatial features
    ref_u8 = np.asarray(np.round((np.asarray(ref, np.float32) + 1) * 127.5), np.uint8)
    inc_gd, inc_st = nnx.split(inc)
    direct = jax.jit(lambda x: nnx.merge(inc_gd, inc_st).features(x))(
        np.concatenate([fid.to_inception_input(a) for a in (images, ref, ref_u8)]))
    pool, spat = np.asarray(direct["pool"], np.float32), np.asarray(direct["spatial"])
    f_s, f_r, f_u8 = pool[:12], pool[12:19], pool[19:]
    sp_s, sp_r = spat[:12], spat[12:19]
    want_fid = fid.frechet_distance(*fid.feature_statistics(f_s), *fid.feature_statistics(f_r), method="eigh")
    np.testing.assert_allclose(m["fid"], want_fid, rtol=1e-4)
    assert sp_s.shape == (12, 2023)
    want_sfid = fid.frechet_distance(*fid.feature_statistics(sp_s), *fid.feature_statistics(sp_r),
                                     method="eigh")
    np.testing.assert_allclose(m["sfid"], want_sfid, rtol=1e-4)
    assert abs(want_sfid - want_fid) > 1e-3 * want_fid  # a different feature space
    logits = f_s @ np.asarray(inc.fc.kernel[...], np.float64)
    np.testing.assert_allclose([m["inception_score"], m["inception_score_std"]],
                               gen_metrics.inception_score(logits, 3), rtol=1e-4)
    np.testing.assert_allclose([m["precision"], m["recall"]],
                               gen_metrics.precision_recall(f_r, f_s, k=2))
    assert m["pr_num_samples"] == 12 and m["pr_num_reference"] == 7

    # second run: the cached reference statistics, the same numbers; and sqrtm failing
    # (a significant imaginary part) after the sampling: the eigh form, with a warning
    cache = m["reference_cache"]
    assert os.path.isfile(cache)
    assert os.path.dirname(cache) == os.path.join(workdir, "eval", "reference_stats")  # shared, not in --out
    stamp = os.stat(cache).st_mtime_ns
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.asarray(a) * (1 + 1j))
    assert evaluate.main([a if a != "eigh" else "sqrtm" for a in args]) == 0
    monkeypatch.undo()
    with open(os.path.join(out, "metrics.json")) as f:
        m2 = json.load(f)
    assert os.stat(cache).st_mtime_ns == stamp
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-9) and m2["precision"] == m["precision"]
    assert m2["sfid"] == pytest.approx(m["sfid"], rel=1e-9)
    assert sum("computed with fid_method='eigh' instead" in w for w in m2["warnings"]) == 2
    # precomputed statistics without features (pytorch-fid's keys): FID only
    stats = fid.save_stats(tmp / "ref.npz", *fid.feature_statistics(f_r), num_images=7)
    assert evaluate.main(args[:-2] + ["--ref_stats", stats]) == 0  # default --out: the file and settings
    with open(os.path.join(workdir, "eval", "samples_ref_00000004_ddim3_cfg1.5_c1-4-7_s5_n12", "metrics.json")) as f:
        m3 = json.load(f)
    np.testing.assert_allclose(m3["fid"], want_fid, rtol=1e-4)
    assert m3["precision"] is None and any("precision/recall skipped" in w for w in m3["warnings"])
    assert m3["sfid"] is None and any("sFID skipped" in w for w in m3["warnings"])
    # an ADM reference batch: mu / sigma, the spatial mu_s / sigma_s (sFID) and the images
    # arr_0 (uint8), whose Inception features give precision / recall
    np.savez(tmp / "adm_ref.npz", arr_0=ref_u8, mu=fid.feature_statistics(f_r)[0],
             sigma=fid.feature_statistics(f_r)[1], mu_s=fid.feature_statistics(sp_r)[0],
             sigma_s=fid.feature_statistics(sp_r)[1])
    assert evaluate.main(args[:-1] + [str(tmp / "out_s"), "--ref_stats", str(tmp / "adm_ref.npz")]) == 0
    with open(tmp / "out_s" / "metrics.json") as f:
        m4 = json.load(f)
    np.testing.assert_allclose([m4["fid"], m4["sfid"]], [want_fid, want_sfid], rtol=1e-4)
    np.testing.assert_allclose([m4["precision"], m4["recall"]],
                               gen_metrics.precision_recall(f_u8, f_s, k=2))
    assert m4["pr_num_reference"] == 7
    # statistics of other features: refused before any sampling
    bad = fid.save_stats(tmp / "bad.npz", np.zeros(64), np.eye(64))
    capsys.readouterr()
    assert evaluate.main(args + ["--ref_stats", bad]) == 2
    assert "mu / sigma have 64 dimensions, expected 2048" in capsys.readouterr().err
    np.savez(tmp / "adm_float.npz", arr_0=ref.astype(np.float32), mu=fid.feature_statistics(f_r)[0],
             sigma=fid.feature_statistics(f_r)[1])
    assert evaluate.main(args + ["--ref_stats", str(tmp / "adm_float.npz")]) == 2
    assert "arr_0 should hold uint8 NHWC RGB images" in capsys.readouterr().err

    # autoencoder-only flags on an LDM workdir: a clear usage error
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--workdir", workdir, "--full_size", "--no_lpips"])
    assert e.value.code == 2
    assert "is an LDM workdir: --full_size, --no_lpips do not apply" in capsys.readouterr().err
