"""Scale-out: FSDP and data parallelism on 8 CPU devices, a real 2-process run, and
checkpoints restored onto another mesh shape and process count.

All runs are the tiny VAE-GAN (``configs/vae_f8.py:tiny``) for 4 steps, without the LPIPS
term (it does not touch sharding and costs compile time). Reference: the uninterrupted
8-device single-process data-parallel run ``dp``.

Tolerances: losses per step within rel 1e-4 for steps 1-2 and 1e-3 for steps 3-4 (observed
on CPU: <= 1e-6 everywhere), final parameters within relative L2 3e-3 (generator) and 1e-2
(discriminator) (observed: 4.6e-4 and 7e-7). Different meshes only reorder float
reductions. Steps 1-2 see the initial parameters and one update; from step 3 on, the
discriminator starts and Adam's first updates are ~lr * sign(grad), so parameters whose
gradient is at rounding level move by +-lr depending on summation order - that is why the
parameter distance is larger than the loss distance, and why later steps get more room.
These are the only mesh-equivalence tests of the VAE-GAN step; the LPIPS term they leave
out is a replicated network applied to the data-sharded batch like the autoencoder. A
sharding error (a per-device BatchNorm, a wrong batch split, a missing gradient reduction,
a batch read twice after a restore) changes these numbers by 10-100%.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, rel_l2, restore_vae_gan_state, save_test_autoencoder
from ldm_jax import config_lib, data, sharding
from ldm_jax.checkpointing import Checkpointer
from ldm_jax.trainers import vae_gan

DP = dict(data=8, fsdp=1, num_devices=-1)
FSDP = dict(data=2, fsdp=4, num_devices=-1)
SINGLE = dict(data=1, fsdp=1, num_devices=1)
KEYS = ("loss", "nll_loss", "kl_loss", "g_loss", "d_loss", "d_weight", "logits_real")
TOL = {1: 1e-4, 2: 1e-4, 3: 1e-3, 4: 1e-3}


def overrides(mesh: dict, **kw) -> dict:
    """Flat ``key: value`` overrides of the tiny config (also sent to the worker processes)."""
    out = {"loss.max_adaptive_weight": 1.0, "loss.lpips_missing": "disable",
           **{f"mesh.{k}": v for k, v in mesh.items()}}
    out.update(kw)
    return out


def config(mesh: dict, **kw):
    c = config_lib.load_config(os.path.join(REPO_ROOT, "configs/vae_f8.py:tiny"))
    config_lib.set_fields(c, overrides(mesh, **kw))
    return c


def loss_mismatches(hist: dict, ref: dict, steps) -> list:
    bad, worst = [], {}
    for step in steps:
        for k in KEYS:
            a, b = hist[step][k], ref[step][k]
            worst[step] = max(worst.get(step, 0.0), abs(a - b) / max(abs(b), 1e-5))
            if a != pytest.approx(b, rel=TOL[step], abs=1e-5):
                bad.append((step, k, a, b))
    print("largest relative loss differences per step:", {s: f"{v:.1e}" for s, v in worst.items()})
    return bad


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 4-step runs: 8-device data parallel, (2, 4) FSDP, one device."""
    out = {}
    for name, mesh in (("dp", DP), ("fsdp", FSDP), ("single", SINGLE)):
        workdir = str(tmp_path_factory.mktemp(name))
        out[name] = (workdir, vae_gan.train_and_evaluate(config(mesh), workdir))
    return out


@pytest.mark.parametrize("name", ["dp", "fsdp"])
def test_parallel_runs_match_single_device(runs, name):
    workdir, result = runs[name]
    single_dir, single = runs["single"]
    assert sorted(result["history"]) == [1, 2, 3, 4]
    bad = loss_mismatches(result["history"], single["history"], (1, 2, 3, 4))
    assert not bad, bad
    c = config(SINGLE)
    (got, _), (want, _) = restore_vae_gan_state(workdir, c), restore_vae_gan_state(single_dir, c)
    d_gen, d_disc = rel_l2(got["gen_params"], want["gen_params"]), rel_l2(got["disc_params"], want["disc_params"])
    print(f"{name}: relative L2 parameter difference to one device: gen {d_gen:.2e}, disc {d_disc:.2e}")
    assert d_gen < 3e-3 and d_disc < 1e-2


def test_fsdp_parameter_shardings():
    """Born-sharded state on the (2, 4) mesh: big kernels (and their Adam moments) split
    along ``fsdp`` on their largest evenly divisible dimension, small arrays replicated."""
    c = config(FSDP)
    mesh = sharding.make_mesh(c.mesh)
    gen_lr, disc_lr = vae_gan.learning_rates(c)
    _, state, _ = vae_gan.create_train_state(c, mesh, vae_gan.make_optimizer(gen_lr, c),
                                             vae_gan.make_optimizer(disc_lr, c))
    # the abstract state (a resume's restore target) describes exactly these arrays
    _, abstract, _ = vae_gan.create_train_state(c, mesh, vae_gan.make_optimizer(gen_lr, c),
                                                vae_gan.make_optimizer(disc_lr, c), abstract=True)
    described = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state.as_dict())
    assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), abstract.as_dict()) == described
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.as_dict()))
    ae = state.gen_params["ae"]
    mid = ae["decoder"]["mid"]["block_1"]["conv1"]["kernel"][...]  # (64, 3, 3, 64): 36864 elements
    assert mid.shape == (64, 3, 3, 64)
    assert mid.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None, None)
    assert {s.data.shape for s in mid.addressable_shards} == {(16, 3, 3, 64)}
    norm = ae["decoder"]["mid"]["block_1"]["norm1"]["scale"][...]  # (64,): replicated
    assert norm.sharding.is_fully_replicated and norm.addressable_shards[0].data.shape == (64,)
    # Every leaf of the models and optimizer states follows the rule.
    n_split = 0
    for path, x in jax.tree_util.tree_flatten_with_path(state.as_dict())[0]:
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        if x.size < sharding.MIN_FSDP_SIZE:
            assert x.sharding.is_fully_replicated, jax.tree_util.keystr(path)
            continue
        dims = [d for d in range(x.ndim) if x.shape[d] % 4 == 0]
        want = max(dims, key=lambda d: (x.shape[d], -d)) if dims else None
        assert spec == tuple("fsdp" if d == want else None for d in range(x.ndim)), (jax.tree_util.keystr(path), spec)
        n_split += want is not None
    assert n_split >= 12  # the 64-channel kernels of the autoencoder and both Adam moments
    # ldm_jax.scaling (docs/scaling.md) computes the same per-device bytes from shard shapes.
    from ldm_jax import scaling

    dev = mesh.devices.flat[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves(state.as_dict())
               for s in x.addressable_shards if s.device == dev)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.as_dict())
    assert scaling.per_device_bytes(abstract, mesh, scaling.VAE_GROUPS)["total"] == held


# ----------------------------------------------------------------------------------------
# Real processes.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int, spec: dict, timeout: float = 400) -> list[dict]:
    """``n`` worker processes of tests/multihost_worker.py; their results."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    worker = os.path.join(REPO_ROOT, "tests", "multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(n), str(port), json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(n)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, logs):
        assert p.returncode == 0, out[-4000:]
    results = []
    for i in range(n):
        with open(f"{spec['out']}.{i}.json") as f:
            results.append(json.load(f))
    return results


def test_two_processes_then_resume_in_one(runs, tmp_path):
    """2 processes x 4 CPU devices (FSDP (2, 4) mesh: fsdp inside a process, data across)
    train 2 steps and save; one 8-device process restores onto a (8, 1) mesh and finishes.
    Each process fed its own half of every global batch (disjoint stream positions, images
    identical to the 1-process stream's), both saw the same global losses, and the whole
    run matches the uninterrupted 8-device run. The 2 processes also evaluate the
    checkpoint (model resolution and full size, a folder with a corrupt file): the same
    per-image numbers as one 8-device process, every image once."""
    from PIL import Image

    from ldm_jax import evaluate

    _, dp = runs["dp"]
    workdir = str(tmp_path / "wd")
    folder = tmp_path / "eval_imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(7):  # 36-44 x 40-48 px: one padded full-size shape
        Image.fromarray(rng.integers(0, 256, (36 + 4 * (i % 3), 40 + 8 * (i % 2), 3), np.uint8)).save(
            folder / f"img_{i}.png")
    (folder / "zz_broken.png").write_bytes(b"not a png")
    # full size on 2 devices per process: each device compiles its own programs
    ev_args = dict(data=f"folder:{folder}", batch_size=8, full_size=True, lpips="none", fid=False,
                   full_size_devices=2)
    spec = dict(workdir=workdir, out=str(tmp_path / "result"),
                cache=jax.config.jax_compilation_cache_dir or "",
                overrides=overrides(FSDP, num_train_steps=2),
                evaluate=dict(ev_args, out_dir=str(tmp_path / "eval2")))
    t0 = time.time()
    r0, r1 = run_processes(2, spec)
    print(f"2-process run: {time.time() - t0:.0f}s")
    assert (r0["process_count"], r0["device_count"], r1["process_index"]) == (2, 8, 1)
    hist2 = {int(k): v for k, v in r0["history"].items()}
    for k, v in r1["history"].items():  # one global loss, fetched by both processes
        assert {m: x for m, x in v.items() if m != "images_per_sec"} == \
            {m: x for m, x in hist2[int(k)].items() if m != "images_per_sec"}
    assert sorted(hist2) == [1, 2]
    assert not loss_mismatches(hist2, dp["history"], (1, 2))

    it = data.create_train_iterator(config(DP).data, resolution=32, global_batch_size=8, seed=0)
    ref = [[hashlib.md5(x.tobytes()).hexdigest() for x in next(it)["image"]] for _ in range(2)]
    it.close()
    for k in range(2):
        b0, b1 = r0["batches"][k], r1["batches"][k]
        assert b0["positions"] == list(range(8 * k, 8 * k + 4))
        assert b1["positions"] == list(range(8 * k + 4, 8 * k + 8))
        assert b0["md5"] + b1["md5"] == ref[k]

    assert Checkpointer(workdir).latest_step() == 2
    data_files = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", "2", "data"))
                        if f.endswith(".json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    assert os.path.isfile(os.path.join(workdir, "config.json"))  # process 0 wrote it

    # Evaluation on 2 processes (keys split between them, full size on each one's devices)
    # against one process on the same checkpoint.
    two = json.loads((tmp_path / "result.evaluate.json").read_text())
    one = evaluate.evaluate_autoencoder(workdir, **ev_args, out_dir=str(tmp_path / "eval1"))
    assert two["devices"]["processes"] == 2 and one["devices"]["processes"] == 1
    assert two["full_size"]["devices_per_process"] == one["full_size"]["devices_per_process"] == 2
    for r in (one, two):
        assert r["data"]["num_evaluated"] == 7 and r["full_size"]["num_images"] == 7
        assert [os.path.basename(f) for f in r["data"]["skipped_files"]] == ["zz_broken.png"]
    rows = {}
    for name in ("eval1", "eval2"):
        with open(tmp_path / name / "per_image.csv") as fh:
            rows[name] = list(csv.DictReader(fh))
    assert [r["image"] for r in rows["eval1"]] == [r["image"] for r in rows["eval2"]]
    for a, b in zip(rows["eval1"], rows["eval2"]):
        for c in ("psnr", "ssim", "l1", "full_psnr", "full_ssim", "full_l1"):
            assert float(a[c]) == pytest.approx(float(b[c]), rel=1e-4, abs=1e-5), (a["image"], c)

    resumed = vae_gan.train_and_evaluate(config(DP), workdir)
    assert resumed["start_step"] == 2 and sorted(resumed["history"]) == [3, 4]
    bad = loss_mismatches(resumed["history"], dp["history"], (3, 4))
    assert not bad, bad


def test_restore_data_parallel_checkpoint_onto_fsdp_mesh(runs, tmp_path):
    """The step-2 checkpoint of the (8, 1) run continues on a (2, 4) mesh like it does on
    (8, 1)."""
    dp_dir, dp = runs["dp"]
    workdir = tmp_path / "wd"
    shutil.copytree(os.path.join(dp_dir, "checkpoints", "2"), workdir / "checkpoints" / "2")
    resumed = vae_gan.train_and_evaluate(config(FSDP), str(workdir))
    assert resumed["start_step"] == 2 and sorted(resumed["history"]) == [3, 4]
    bad = loss_mismatches(resumed["history"], dp["history"], (3, 4))
    assert not bad, bad


# ----------------------------------------------------------------------------------------
# Start-up detection (no processes started).


def test_distributed_detection(monkeypatch):
    """Which environments start ``jax.distributed`` (ldm_jax/distributed.py)."""
    from ldm_jax import distributed

    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "LDM_JAX_DISTRIBUTED", "TPU_")):
            monkeypatch.delenv(k)
    assert distributed.detect() is None  # plain single-host run (this machine has no TPU)
    # An sbatch script (no srun step) that asked for 4 tasks is still one process.
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detect() is None
    # Inside `srun`: JAX's SLURM variables are all present.
    for k, v in dict(SLURM_STEP_NODELIST="node[01-02]", SLURM_PROCID="1", SLURM_LOCALID="1").items():
        monkeypatch.setenv(k, v)
    assert distributed.detect() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # srun with a single task: nothing to initialise
    assert distributed.detect() is None
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.detect() == "explicit"
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("LDM_JAX_DISTRIBUTED", "1")
    assert distributed.detect() == "forced"
    with pytest.raises(ValueError, match="num_processes"):
        distributed.maybe_initialize("127.0.0.1:1", None, 0)


# ----------------------------------------------------------------------------------------
# The LDM trainer and sampling across processes.

LDM_AE = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32)  # f4: 8x8x4 latents


def ldm_overrides(mesh: dict, ae_dir: str, **kw) -> dict:
    """Tiny class-conditional LDM from the latent cache, scale factor from the data."""
    out = {"autoencoder_path": ae_dir, "latent.cache": True, "latent.scale_factor": 0.0,
           "model.num_classes": 9, **{f"mesh.{k}": v for k, v in mesh.items()}}
    out.update(kw)
    return out


def ldm_config(mesh: dict, ae_dir: str, **kw):
    c = config_lib.load_config(os.path.join(REPO_ROOT, "configs/ldm_f8.py:tiny"))
    config_lib.set_fields(c, ldm_overrides(mesh, ae_dir, **kw))
    return c


@pytest.fixture(scope="module")
def ldm_reference(tmp_path_factory):
    """A tiny autoencoder and the uninterrupted 4-step 8-device LDM run on its latents."""
    from ldm_jax.models.autoencoder import AutoencoderConfig
    from ldm_jax.trainers import ldm

    ae_dir = save_test_autoencoder(str(tmp_path_factory.mktemp("ae")), AutoencoderConfig(**LDM_AE))
    ref_dir = str(tmp_path_factory.mktemp("ldm_ref"))
    return ae_dir, ref_dir, ldm.train_and_evaluate(ldm_config(DP, ae_dir), ref_dir)


def test_ldm_two_processes_with_cache_and_sampling_then_resume_in_one(ldm_reference, tmp_path):
    """2 processes x 4 devices (FSDP (2, 4)) build the latent cache together, train 2 LDM
    steps on it, save, and sample; one 8-device process then samples the same images from
    that checkpoint, reuses the 2-part cache and continues. Both processes fed disjoint
    halves of each global batch of the process-count-independent cache stream, and the
    whole run matches the uninterrupted 8-device run. Tiled decoding split over both
    processes' devices blends to the whole decode."""
    from ldm_jax.sampling import sample_images
    from ldm_jax.trainers import latent_cache, ldm

    ae_dir, ref_dir, ref = ldm_reference
    workdir = str(tmp_path / "wd")
    sample = dict(num=8, steps=3, seed=3)
    spec = dict(trainer="ldm", workdir=workdir, out=str(tmp_path / "result"),
                cache=jax.config.jax_compilation_cache_dir or "",
                overrides=ldm_overrides(FSDP, ae_dir, num_train_steps=2), sample=sample, tiled=True)
    t0 = time.time()
    r0, r1 = run_processes(2, spec, timeout=600)
    print(f"2-process LDM run: {time.time() - t0:.0f}s")
    hist2 = {int(k): v for k, v in r0["history"].items()}
    for k, v in r1["history"].items():  # one global loss, fetched by both processes
        assert {m: x for m, x in v.items() if m != "images_per_sec"} == \
            {m: x for m, x in hist2[int(k)].items() if m != "images_per_sec"}
    assert sorted(hist2) == [1, 2]
    for s in (1, 2):
        for k in ("loss", "grad_norm"):
            assert hist2[s][k] == pytest.approx(ref["history"][s][k], rel=1e-4), (s, k)

    # The cache: one part per process, each record once, the same latents as the
    # 1-process reference built (encoded on another mesh: float rounding only).
    cache = latent_cache.LatentCache(latent_cache.cache_dir(workdir))
    ref_cache = latent_cache.LatentCache(latent_cache.cache_dir(ref_dir))
    assert cache.meta["parts"] == ["part_0-of-2", "part_1-of-2"] and len(cache) == len(ref_cache) == 14
    assert cache.labels.tolist() == ref_cache.labels.tolist()
    np.testing.assert_allclose(cache.moments().astype(np.float32), ref_cache.moments().astype(np.float32),
                               atol=1e-2, rtol=1e-2)
    # Each process's halves of global batches 0 and 1 of the stream one process reads.
    it = data.create_record_iterator(cache, global_batch_size=8, seed=0, uid=cache.uid)
    ref_md5 = [[hashlib.md5(x.tobytes()).hexdigest() for x in next(it)["moments"]] for _ in range(2)]
    it.close()
    # (The scale factor's first image batch comes from the image stream; skip it.)
    fed0, fed1 = ([b for b in r["batches"] if b["key"] == "moments"] for r in (r0, r1))
    assert len(fed0) == len(fed1) == 2
    for k in range(2):
        b0, b1 = fed0[k], fed1[k]
        assert b0["positions"] == list(range(8 * k, 8 * k + 4))
        assert b1["positions"] == list(range(8 * k + 4, 8 * k + 8))
        assert b0["md5"] + b1["md5"] == ref_md5[k]

    # Sampling on 2 processes gave what one process gives from the same checkpoint.
    two = np.load(str(tmp_path / "result.samples.npy"))
    one, _, _ = sample_images(workdir, **sample)
    assert two.shape == one.shape == (8, 32, 32, 3)
    assert np.abs(two.astype(int) - one.astype(int)).max() <= 1
    # Tiled decoding with the tiles split over both processes' devices (the worker's
    # per-latent decoder): the same image as decoding the whole latent at once.
    z = np.random.default_rng(0).normal(size=(3, 20, 14, 4)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    whole = np.repeat(np.repeat(np.einsum("bhwc,cd->bhwd", z, w), 2, 1), 2, 2)
    np.testing.assert_allclose(np.load(str(tmp_path / "result.tiled.npy")), whole, atol=1e-5)

    part = os.path.join(cache.directory, "part_1-of-2.moments.npy")
    mtime = os.path.getmtime(part)
    resumed = ldm.train_and_evaluate(ldm_config(DP, ae_dir), workdir)
    assert resumed["start_step"] == 2 and sorted(resumed["history"]) == [3, 4]
    for s in (3, 4):
        for k in ("loss", "grad_norm"):
            assert resumed["history"][s][k] == pytest.approx(ref["history"][s][k], rel=1e-3), (s, k)
    assert os.path.getmtime(part) == mtime  # the 2-process cache is reused by 1 process
