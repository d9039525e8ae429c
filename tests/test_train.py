"""End-to-end VAE-GAN training on the tiny config (CPU, 8 fake devices)."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT, build_numpy_init, cpu_env, rel_l2, restore_vae_gan_state
from ldm_jax import config_lib
from ldm_jax.checkpointing import Checkpointer
from ldm_jax.trainers import vae_gan


def tiny_config(**overrides):
    """The tiny config; the adaptive GAN weight is clipped at 1 so that float rounding
    differences between device layouts are not amplified ~1000x by the (random, untrained)
    tiny discriminator's near-zero gradients (d_weight ~3000 unclipped)."""
    c = config_lib.load_config(os.path.join(REPO_ROOT, "configs/vae_f8.py:tiny"))
    overrides = {"loss.max_adaptive_weight": 1.0, **overrides}
    config_lib.set_fields(c, overrides)
    return c


def _init_state(config) -> dict:
    gen_lr, disc_lr = vae_gan.learning_rates(config)
    _, state, _ = vae_gan.create_train_state(
        config, vae_gan.sharding.make_mesh(dict(data=1, fsdp=1, num_devices=1)),
        vae_gan.make_optimizer(gen_lr, config), vae_gan.make_optimizer(disc_lr, config))
    return jax.device_get(state.as_dict())


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sharded"))
    config = tiny_config()
    return workdir, config, vae_gan.train_and_evaluate(config, workdir)


def test_tiny_run_on_8_devices(sharded_run):
    workdir, config, result = sharded_run
    assert jax.device_count() == 8
    hist = result["history"]
    assert sorted(hist) == [1, 2, 3, 4]
    for step, m in hist.items():
        for k in ("loss", "nll_loss", "kl_loss", "g_loss", "d_loss"):
            assert np.isfinite(m[k]), (step, k, m[k])
        assert m["skipped"] == 0.0
    # Discriminator off before disc_start=2 (steps 0, 1), on from step index 2.
    assert hist[1]["disc_factor"] == 0.0 and hist[2]["disc_factor"] == 0.0
    assert hist[3]["disc_factor"] == 1.0 and hist[4]["disc_factor"] == 1.0
    assert hist[3]["d_loss"] > 0 and hist[3]["d_weight"] > 0
    # Eval metrics, image grid, TensorBoard events, checkpoint.
    assert 0 < result["eval"]["eval/psnr"] < 100 and -1 <= result["eval"]["eval/ssim"] <= 1
    assert glob.glob(os.path.join(workdir, "images", "recon_*.png"))
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents*"))
    assert Checkpointer(workdir).latest_step() == 4


def test_both_models_change(sharded_run):
    workdir, config, _ = sharded_run
    init = _init_state(config)
    final, meta = restore_vae_gan_state(workdir, config)
    assert meta["step"] == 4 and int(final["step"]) == 4

    def unchanged(a, b):
        flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
        return [jax.tree_util.keystr(p).removesuffix(".value")
                for (p, x), y in zip(flat_a, jax.tree.leaves(b))
                if np.allclose(x, y)]

    assert unchanged(final["gen_params"]["ae"], init["gen_params"]["ae"]) == []
    # The discriminator trains from step index 2 (disc_start) on and every weight moves,
    # except possibly the output bias: while all logits lie in (-1, 1) the hinge loss
    # gradient w.r.t. that bias is 0.5 * (-1 + 1) = 0 exactly (whether any logit leaves
    # that interval in two steps depends on the random init).
    assert set(unchanged(final["disc_params"], init["disc_params"])) <= {"['conv_out']['bias']"}
    assert float(final["gen_params"]["logvar"]) != float(init["gen_params"]["logvar"])
    assert not np.allclose(jax.tree.leaves(final["disc_stats"])[0], jax.tree.leaves(init["disc_stats"])[0])


def test_resume_reproduces_uninterrupted_run(sharded_run, tmp_path, caplog):
    _, _, full = sharded_run
    workdir = str(tmp_path)
    first = vae_gan.train_and_evaluate(tiny_config(num_train_steps=2), workdir)
    assert first["final_step"] == 2 and Checkpointer(workdir).latest_step() == 2
    with caplog.at_level("WARNING", logger="ldm_jax"):
        second = vae_gan.train_and_evaluate(tiny_config(), workdir)
    assert second["start_step"] == 2 and sorted(second["history"]) == [3, 4]
    # the settings that differ from the checkpoint's are named in one line
    assert "settings changed since checkpoint 2: num_train_steps 2 -> 4" in caplog.text
    for step in (3, 4):
        for k, v in full["history"][step].items():
            if k in ("images_per_sec",):
                continue
            assert second["history"][step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
    # A model that no longer fits the checkpoint stops before anything is read or written,
    # naming the arrays and the settings that changed; config.json stays that of the run.
    from ldm_jax.checkpointing import CheckpointMismatchError

    saved = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(CheckpointMismatchError) as e:
        vae_gan.train_and_evaluate(tiny_config(num_train_steps=6, **{"model.ch": 64}), workdir)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint 4 in {os.path.join(workdir, 'checkpoints')} does not fit"), msg
    assert "gen_params.ae.decoder.conv_in.bias (64,) in the checkpoint, (128,) in this run" in msg
    assert "settings changed since it was written: model.ch 32 -> 64; num_train_steps 4 -> 6." in msg
    assert open(os.path.join(workdir, "config.json")).read() == saved
    assert Checkpointer(workdir).latest_step() == 4
    # an LDM config pointed at this VAE-GAN workdir (as its autoencoder, too)
    from ldm_jax.trainers import ldm

    ldm_cfg = config_lib.load_config(os.path.join(REPO_ROOT, "configs/ldm_f8.py:tiny"))
    ldm_cfg.autoencoder_path = workdir
    with pytest.raises(config_lib.ConfigError, match="holds a 'vae_gan' run; this config trains 'ldm': "
                                                     "use another --workdir"):
        ldm.train_and_evaluate(ldm_cfg, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == saved


def test_nan_guard_skips_step(tmp_path):
    """A batch that produces non-finite losses leaves the whole state untouched."""
    config = tiny_config()
    mesh = vae_gan.sharding.make_mesh(config.mesh)
    gen_lr, disc_lr = vae_gan.learning_rates(config)
    gen_tx, disc_tx = vae_gan.make_optimizer(gen_lr, config), vae_gan.make_optimizer(disc_lr, config)
    (ae_gd, d_gd), state, _ = vae_gan.create_train_state(config, mesh, gen_tx, disc_tx)
    models = vae_gan.Models(ae=ae_gd, disc=d_gd, lpips=None)
    step = jax.jit(vae_gan.make_train_step(models, config, gen_tx, disc_tx))
    bad = np.full((8, 32, 32, 3), np.nan, np.float32)
    before = jax.device_get(state.as_dict())
    new_state, acc = step(state, None, {"image": bad}, vae_gan.TrainMetrics.empty())
    after = jax.device_get(new_state.as_dict())
    assert int(after["nan_skips"]) == 1 and int(after["step"]) == 1
    for k in ("gen_params", "disc_params", "disc_stats", "gen_opt", "disc_opt"):
        for x, y in zip(jax.tree.leaves(after[k]), jax.tree.leaves(before[k])):
            np.testing.assert_array_equal(x, y)
    assert float(acc.compute()["skipped"]) == 1.0
    good = np.random.RandomState(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    new_state, _ = step(new_state, None, {"image": good}, vae_gan.TrainMetrics.empty())
    assert int(new_state.nan_skips) == 1
    moved = jax.device_get(new_state.gen_params["ae"])
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(moved), jax.tree.leaves(before["gen_params"]["ae"])))


def _one_step(config, batch_np):
    """(state after one step as host arrays, metrics, compiled step) from a fresh state."""
    mesh = vae_gan.sharding.make_mesh(config.mesh)
    gen_lr, disc_lr = vae_gan.learning_rates(config)
    gen_tx, disc_tx = vae_gan.make_optimizer(gen_lr, config), vae_gan.make_optimizer(disc_lr, config)
    (ae_gd, d_gd), state, _ = vae_gan.create_train_state(config, mesh, gen_tx, disc_tx)
    models = vae_gan.Models(ae=ae_gd, disc=d_gd, lpips=None)
    batch = vae_gan.sharding.global_batch({"image": batch_np}, vae_gan.sharding.batch_sharding(mesh))
    args = (state, None, batch, vae_gan.TrainMetrics.empty())
    compiled = jax.jit(vae_gan.make_train_step(models, config, gen_tx, disc_tx)).lower(*args).compile()
    new_state, acc = compiled(*args)
    return jax.device_get(new_state.as_dict()), acc.compute(), compiled


def test_grad_accumulation_equals_whole_batch(tmp_path):
    """Before the discriminator starts, 2 microbatches of 8 give the step on all 16 images
    (the posterior noise is drawn for the whole batch), in about half the temporary
    memory, and the split moves no data between the 8 devices."""
    x = np.random.RandomState(0).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
    runs = {}
    for k in (1, 2):
        config = tiny_config(global_batch_size=16, **{"optim.grad_accum_steps": k, "loss.disc_start": 100})
        runs[k] = _one_step(config, x)
    (s1, m1, c1), (s2, m2, c2) = runs[1], runs[2]
    for name in ("loss", "nll_loss", "kl_loss", "gen_grad_norm"):
        assert float(m2[name]) == pytest.approx(float(m1[name]), rel=1e-5), name
    # Adam's moments after one step are linear / quadratic in the gradient itself. (The
    # parameters are not compared: Adam's first update is ~lr * sign(gradient), and biases
    # in front of a GroupNorm have a gradient of exactly zero up to rounding.)
    assert rel_l2(s2["gen_opt"], s1["gen_opt"]) < 1e-5
    mem1, mem2 = (c.memory_analysis().temp_size_in_bytes for c in (c1, c2))
    assert mem2 < 0.7 * mem1, (mem1, mem2)
    hlo = c2.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo


def test_grad_accumulation_with_the_discriminator_on(tmp_path):
    """With the GAN term on, both optimizers step on the mean of the microbatches'
    gradients; the adaptive weight is each microbatch's own (as Lightning's accumulation)."""
    x = np.random.RandomState(1).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
    config = tiny_config(global_batch_size=16, **{"optim.grad_accum_steps": 2, "loss.disc_start": 0})
    init = _init_state(config)
    state, m, _ = _one_step(config, x)
    assert all(np.isfinite(float(v)) for v in m.values()) and float(m["skipped"]) == 0
    assert float(m["disc_factor"]) == 1.0 and float(m["d_loss"]) > 0
    assert rel_l2(state["disc_params"], init["disc_params"]) > 0
    assert int(state["step"]) == 1


def test_grad_accumulation_config_errors(tmp_path):
    with pytest.raises(ValueError, match="4 images per microbatch, not divisible by the 8 devices"):
        vae_gan.train_and_evaluate(tiny_config(**{"optim.grad_accum_steps": 2}), str(tmp_path))
    with pytest.raises(ValueError, match="not divisible by optim.grad_accum_steps=3"):
        vae_gan.train_and_evaluate(tiny_config(**{"optim.grad_accum_steps": 3}), str(tmp_path))
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1"):
        vae_gan.train_and_evaluate(tiny_config(**{"optim.grad_accum_steps": 0}), str(tmp_path))


def test_batch_not_divisible_by_devices(tmp_path):
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        vae_gan.train_and_evaluate(tiny_config(global_batch_size=12), str(tmp_path))


def test_missing_lpips_weights_stop_full_recipe(tmp_path, monkeypatch):
    """Outside tiny/demo, a missing VGG file stops the run before any work, naming the file."""
    from ldm_jax.models.lpips import LPIPSWeightsMissingError

    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LDM_JAX_OFFLINE", "1")
    config = tiny_config()
    config.loss.lpips_missing = "error"
    with pytest.raises(LPIPSWeightsMissingError, match="vgg16-397923af.pth") as e:
        vae_gan.train_and_evaluate(config, str(tmp_path / "wd"))
    assert "--config.loss.lpips_missing=disable" in str(e.value)  # the trainer's way around
    assert not os.path.exists(os.path.join(tmp_path, "wd"))  # no config.json, tensorboard, checkpoints


def test_sigterm_saves_and_resumes(tmp_path):
    """A SIGTERM'd train.py saves a checkpoint at the step it reached and exits cleanly;
    the same command then resumes from that step."""
    import signal
    import subprocess
    import sys
    import time

    workdir = str(tmp_path / "wd")
    cache = jax.config.jax_compilation_cache_dir or ""
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train.py"),
           f"--config={os.path.join(REPO_ROOT, 'configs/vae_f8.py')}:tiny",
           f"--workdir={workdir}", "--config.num_train_steps=1000",
           "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000",
           "--config.image_every_steps=1000", f"--config.compilation_cache_dir={cache}"]
    env = cpu_env(PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    deadline = time.time() + 400
    try:
        for line in proc.stderr:
            lines.append(line)
            if "step 3/1000" in line:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "".join(lines[-20:])
        _, rest = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log_text = "".join(lines) + rest
    assert proc.returncode == 0, log_text[-3000:]
    assert "stopped by SIGTERM" in log_text
    saved = Checkpointer(workdir).latest_step()
    assert saved is not None and 3 <= saved < 1000
    resumed = subprocess.run(cmd[:3] + [f"--workdir={workdir}", f"--config.num_train_steps={saved + 1}",
                                        f"--config.compilation_cache_dir={cache}"],
                             env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint at step {saved}" in resumed.stderr
    assert Checkpointer(workdir).latest_step() == saved + 1


def test_first_ctrl_c_asks_for_a_save_second_stops_at_once():
    """SIGINT sets the same flag as SIGTERM (the loop saves after the step and stops); a
    second one raises KeyboardInterrupt; the previous handlers come back afterwards."""
    import subprocess
    import sys

    from conftest import cpu_env

    script = """
import signal
from ldm_jax.checkpointing import PreemptionFlag
f = PreemptionFlag()
assert not f.is_set()
signal.raise_signal(signal.SIGINT)
print("first", f.is_set(), f.reason)
try:
    signal.raise_signal(signal.SIGINT)
    print("second: no interrupt")
except KeyboardInterrupt:
    print("second: KeyboardInterrupt")
f.restore_handler()
print("restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler,
      signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=cpu_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:3] == ["first True SIGINT", "second: KeyboardInterrupt", "restored True True"]
    assert "Ctrl-C: saving a checkpoint after this step and stopping" in r.stderr


def test_init_from_pretrained_autoencoder(tmp_path):
    """config.init_from starts the autoencoder from a converted/pretrained directory (the
    fine-tuning path); weights of another architecture fail with the list of mismatches.
    (With num_image_samples=0 the run writes no reconstruction grids.)"""
    from ldm_jax import pretrained
    from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL

    config = tiny_config(num_train_steps=1, num_image_samples=0, **{"optim.base_lr": 1e-12})
    ae = build_numpy_init(
        lambda: AutoencoderKL(AutoencoderConfig.from_dict(config.model), rngs=nnx.Rngs(0)), seed=123)
    src = str(tmp_path / "pre")
    pretrained.save_pretrained(src, "autoencoder", config.model.to_dict(), nnx.state(ae, nnx.Param))
    config.init_from = src
    vae_gan.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "images")
    restored, _ = restore_vae_gan_state(str(tmp_path / "run"), config)
    want = nnx.to_pure_dict(nnx.state(ae, nnx.Param))
    got = restored["gen_params"]["ae"]
    got = got.to_pure_dict() if hasattr(got, "to_pure_dict") else nnx.to_pure_dict(got)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    other = tiny_config(num_train_steps=1)
    other.model.ch = 64
    ae64 = build_numpy_init(lambda: AutoencoderKL(AutoencoderConfig.from_dict(other.model), rngs=nnx.Rngs(0)))
    pretrained.save_pretrained(str(tmp_path / "pre64"), "autoencoder", other.model.to_dict(),
                               nnx.state(ae64, nnx.Param))
    config.init_from = str(tmp_path / "pre64")
    with pytest.raises(pretrained.PretrainedError, match="shape mismatch"):
        vae_gan.train_and_evaluate(config, str(tmp_path / "run64"))


def test_hwio_checkpoints_and_pretrained_dirs_still_load(sharded_run, tmp_path):
    """Checkpoints and pretrained directories written before the OHWI kernel layout (HWIO
    kernels, no ``conv_layout`` in the metadata / format ``/1``) restore and load to the
    same values as their OHWI equivalents: resume, workdir weights and converted dirs."""
    import json
    import shutil

    import orbax.checkpoint as ocp

    from ldm_jax import pretrained
    from ldm_jax.models import layers

    workdir, config, _ = sharded_run
    state, meta = restore_vae_gan_state(workdir, config)
    to_hwio = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, x: np.transpose(x, (1, 2, 3, 0)) if layers.is_conv_kernel(p, x) else x, tree)
    n_kernels = sum(layers.is_conv_kernel(p, x) for p, x in
                    jax.tree_util.tree_flatten_with_path(state)[0])
    assert n_kernels > 3 * 20  # params, both Adam moments: every conv of AE and D
    old = str(tmp_path / "old")
    os.makedirs(old)
    shutil.copy(os.path.join(workdir, "config.json"), old)
    ck = Checkpointer(old)
    src = Checkpointer(workdir)
    step = src.latest_step()
    src.close()
    old_meta = {k: v for k, v in meta.items() if k != "conv_layout"}
    ck.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(to_hwio(state)),
                                                  meta=ocp.args.JsonSave(old_meta)), force=True)
    ck.manager.wait_until_finished()
    ck.close()
    # Resume: the HWIO checkpoint restores onto the OHWI abstract state, same values.
    got, got_meta = restore_vae_gan_state(old, config)
    assert "conv_layout" not in got_meta
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(state)):
        assert np.shape(a) == np.shape(b), jax.tree_util.keystr(p)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Workdir weights (sample.py, autoencoder_path, init_from) from both checkpoints.
    _, new_ae, _ = pretrained.load_params(workdir, "autoencoder")
    _, old_ae, _ = pretrained.load_params(old, "autoencoder")
    for a, b in zip(jax.tree.leaves(old_ae), jax.tree.leaves(new_ae)):
        np.testing.assert_array_equal(a, b)
    # A pretrained directory of format /1 (HWIO).
    pre = str(tmp_path / "pre1")
    pretrained.save_pretrained(pre, "autoencoder", config.model.to_dict(), to_hwio(new_ae))
    with open(os.path.join(pre, "pretrained.json")) as f:
        info = json.load(f)
    assert info["format"] == "ldm_jax.pretrained/2"
    info["format"] = "ldm_jax.pretrained/1"
    with open(os.path.join(pre, "pretrained.json"), "w") as f:
        json.dump(info, f)
    _, pre_ae, _ = pretrained.load_params(pre, "autoencoder")
    for a, b in zip(jax.tree.leaves(pre_ae), jax.tree.leaves(new_ae)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_writes_small_replicated_arrays_whole(tmp_path, monkeypatch):
    """Replicated arrays round-trip through Checkpointer; only those whose per-replica
    slice reaches MIN_REPLICA_SLICE_BYTES are split across replicas (one device slice op
    per replica), the small ones are written whole by their first replica."""
    from ldm_jax import checkpointing, sharding

    mesh = sharding.make_mesh(dict(data=8, fsdp=1, num_devices=-1))
    rep = sharding.replicated(mesh)
    big_rows = 8 * checkpointing.MIN_REPLICA_SLICE_BYTES // (4 * 256)  # 1 MiB per replica slice
    state = {"small": {f"b{i}": jax.device_put(np.full((64,), i, np.float32), rep) for i in range(20)},
             "mid": jax.device_put(np.arange(64 * 3 * 3 * 64, dtype=np.float32).reshape(64, 3, 3, 64), rep),
             "big": jax.device_put(np.arange(big_rows * 256, dtype=np.float32).reshape(big_rows, 256), rep)}
    ck = Checkpointer(str(tmp_path))
    slices = []
    real = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda x, *a, **k: (slices.append(x.shape), real(x, *a, **k))[1])
    ck.save(1, state, None, {})
    monkeypatch.undo()
    assert slices == [(big_rows, 256)] * 8  # the big array only, one slice per replica
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, _ = ck.restore(1, abstract, None)
    ck.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_reads_log_no_warnings(tmp_path, caplog, monkeypatch):
    """Loading a trainer checkpoint's state tree (what ``pretrained.load_params`` does with
    a workdir) and registering our array handler log no orbax warnings: orbax warned about
    the step metadata file missing from ``<step>/state`` on every load and about the
    handler override once per process. Arrays come back as host numpy arrays, also from
    a sharded state, and a restore of some top-level entries reads only those."""
    import logging

    from ldm_jax import checkpointing, pretrained

    mesh = jax.make_mesh((8,), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {"w": jax.device_put(jax.numpy.arange(16.0).reshape(8, 2), rows),
             "b": {"x": jax.numpy.ones((4,), jax.numpy.bfloat16)}, "step": jax.numpy.int32(5)}
    ck = Checkpointer(str(tmp_path))
    ck.save(5, state, None, {})
    ck.close()
    path = os.path.join(str(tmp_path), "checkpoints", "5", "state")
    with caplog.at_level(logging.INFO):
        checkpointing._register_array_handler.__wrapped__()
        tree = pretrained._restore_tree(path)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert set(tree) == {"w", "b", "step"}
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(jax.device_get(state))):
        assert type(a) is np.ndarray and a.dtype == b.dtype  # on the host, not on a device
        np.testing.assert_array_equal(a, b)

    # only some top-level entries (what sampling reads of an LDM checkpoint): only those
    # are requested from orbax
    requested = []
    real, partial = pretrained.ocp.args.PyTreeRestore, pretrained._PARTIAL_RESTORE

    def spy(**kw):
        requested.append(sorted(kw["item"]))
        return real(**kw)

    monkeypatch.setattr(pretrained.ocp.args, "PyTreeRestore", spy)
    part = pretrained._restore_tree(path, ["b", "step"])
    assert set(part) == {"b", "step"} and int(part["step"]) == 5
    np.testing.assert_array_equal(part["b"]["x"], np.ones(4, jax.numpy.bfloat16))
    assert requested == ([["b", "step"]] if partial else [["b", "step", "w"]])
    with pytest.raises(pretrained.PretrainedError, match=r"has no \['ema_params'\]; it holds \['b', 'step', 'w'\]"):
        pretrained._restore_tree(path, ["ema_params"])
