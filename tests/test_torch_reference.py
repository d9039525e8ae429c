"""The PyTorch reference benchmark (benchmarks/torch_reference.py) and the side-by-side
runner (benchmarks/side_by_side.py) on the tiny configs, on the CPU.

Only the JSON is checked (fields present, finite positive timings, parameter counts equal to
our models'), never the timings themselves. torch.compile is not run by default: on two CPU
cores compiling even the tiny U-Net step took ~100 s; set LDM_JAX_TEST_TORCH_COMPILE=1 to
run that test too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import cpu_env

pytest.importorskip("torch", reason="the PyTorch reference needs torch")
pytest.importorskip("diffusers", reason="the PyTorch reference needs diffusers")
pytest.importorskip("lpips", reason="the PyTorch reference needs lpips")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(REPO, "benchmarks", "torch_reference.py")
SIDE_BY_SIDE = os.path.join(REPO, "benchmarks", "side_by_side.py")

COMMON = ("framework", "workload", "config", "batch", "dtype", "steps", "warmup", "device",
          "num_devices", "torch", "diffusers", "python", "mode", "compile_mode", "autocast_bf16",
          "channels_last", "fused_optim", "compile_s", "first_step_s", "warmup_s",
          "step_s_median", "step_s_mean", "step_s_all", "images_per_s", "peak_memory_bytes",
          "peak_memory_reserved_bytes")
EXTRA = {
    "vae_gan_step": ("resolution", "lpips", "last_loss", "last_d_loss", "d_weight", "params",
                     "params_ours", "disc_params", "disc_params_ours", "lpips_params"),
    "unet_step": ("input_shape", "params", "params_ours", "remat", "last_loss", "grad_norm",
                  "diffusers_config"),
    "sample_ddim": ("sampler", "sampler_steps", "cfg_scale", "output_shape", "finite", "decoded",
                    "params", "params_ours", "ae_params", "note", "diffusers_config"),
}
WORKLOAD = {"vae": "vae_gan_step", "unet": "unet_step", "sample": "sample_ddim"}


def _env():
    return cpu_env(PYTHONPATH=REPO)


def _strict_json(text: str) -> dict:
    def bad(c):
        raise ValueError(f"non-JSON number {c}")
    return json.loads(text, parse_constant=bad)


def _our_counts():
    """Our parameter counts for the tiny configs, computed here independently."""
    import jax
    import numpy as np
    from flax import nnx

    from ldm_jax import config_lib
    from ldm_jax.models.unet import count_params
    from ldm_jax.trainers import ldm, vae_gan

    def n(m):
        return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(m, nnx.Param))))

    v = config_lib.load_config(os.path.join(REPO, "configs/vae_f8.py:tiny"))
    ae, disc = nnx.eval_shape(lambda: vae_gan.build_models(v, nnx.Rngs(0)))
    c = config_lib.load_config(os.path.join(REPO, "configs/ldm_f8.py:tiny"))
    ae_full = config_lib.vae_base_config()
    unet = count_params(ldm.unet_config(c, ae_full.model.embed_dim))
    return {"ae": n(ae), "disc": n(disc), "unet": unet}


@pytest.fixture(scope="module")
def ours():
    return _our_counts()


def _check_torch_result(r: dict, workload: str, batch: int, steps: int, mode: str = "eager"):
    r = _strict_json(json.dumps(r))
    for k in COMMON + EXTRA[workload]:
        assert k in r, k
    assert r["framework"] == "torch" and r["workload"] == workload
    assert r["batch"] == batch and r["steps"] == steps and r["mode"] == mode
    assert r["device"] and r["num_devices"] == 1 and r["dtype"] == "float32"  # the tiny configs
    assert r["config"].endswith(":tiny")
    for k in ("compile_s", "first_step_s", "step_s_median", "step_s_mean", "images_per_s"):
        assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, k
    assert r["warmup_s"] >= 0 and len(r["step_s_all"]) == steps
    assert r["images_per_s"] == pytest.approx(batch / r["step_s_median"])
    assert r["peak_memory_bytes"] is None  # CPU: no allocator statistics
    assert r["params"] == r["params_ours"] > 0
    return r


def _torch_ref(workload: str, tmp_path, *extra, batch=8, steps=1):
    out = tmp_path / f"{workload}.json"
    p = subprocess.run([sys.executable, TORCH_REF, workload, "--tiny", "--device", "cpu",
                        "--batch", str(batch), "--steps", str(steps), "--warmup", "0",
                        f"--out={out}", *extra],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = _strict_json(out.read_text())
    assert r == _strict_json(p.stdout[p.stdout.index("{"):])
    return r


def test_vae_gan_step(tmp_path, ours):
    r = _check_torch_result(_torch_ref("vae", tmp_path), "vae_gan_step", 8, 1)
    assert r["params"] == ours["ae"] and r["disc_params"] == r["disc_params_ours"] == ours["disc"]
    assert r["resolution"] == 32 and "RANDOM" in r["lpips"] and r["lpips_params"] > 14_000_000
    assert math.isfinite(r["last_loss"]) and r["d_weight"] >= 0


def test_unet_step_two_steps(tmp_path, ours):
    r = _check_torch_result(_torch_ref("unet", tmp_path, steps=2), "unet_step", 8, 2)
    assert r["params"] == ours["unet"]  # = what ldm_jax.bench unet reports for this config
    assert r["input_shape"] == [4, 4, 4]  # 32x32 images through the f8 autoencoder
    assert r["last_loss"] > 0 and r["grad_norm"] > 0
    assert r["diffusers_config"]["block_out_channels"] == [32, 64]


def test_full_size_models_match_ours():
    """The full configs: the UNet2DModel our converter exports is 285.7M, as our U-Net."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import torch_reference as tr
    finally:
        sys.path.pop(0)
    from ldm_jax.models.unet import count_params

    _, c = tr.load_config("unet", None, False, {})
    cfg, shape, unet, dcfg, n, ours = tr.unet_setup(c, True)
    assert shape == (32, 32, 4) and cfg.in_channels == cfg.out_channels == 4
    assert n == ours == tr.count(unet) == count_params(cfg) == 285_714_020
    assert dcfg["block_out_channels"] == [224, 448, 672, 896]
    _, v = tr.load_config("vae", None, False, {})
    ae = tr.make_autoencoder(v.model)
    assert list(ae.config.block_out_channels) == [128, 256, 512, 512]
    assert ae.config.layers_per_block == 2 and ae.config.latent_channels == 4
    assert tr.count(ae) == tr.our_vae_params(v.model, v.disc)[0] == 83_653_863
    disc = tr._patchgan_cls()(3, 64, 3)
    assert tr.count(disc) == tr.our_vae_params(v.model, v.disc)[1]
    import torch

    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


@pytest.mark.skipif(os.environ.get("LDM_JAX_TEST_TORCH_COMPILE") != "1",
                    reason="torch.compile of the tiny step takes ~100 s on 2 CPU cores; "
                           "set LDM_JAX_TEST_TORCH_COMPILE=1")
def test_unet_step_compiled(tmp_path, ours):
    r = _check_torch_result(_torch_ref("unet", tmp_path, "--mode", "compile"), "unet_step", 8, 1,
                            mode="compile")
    assert r["compile_mode"] == "default" and r["params"] == ours["unet"]


def test_side_by_side_tiny_and_merge(tmp_path, ours):
    """JAX and the torch reference (eager, CPU) on the tiny DDIM + decode; then a merge."""
    out = tmp_path / "sbs"
    p = subprocess.run([sys.executable, SIDE_BY_SIDE, "--tiny", "--workloads", "sample",
                        "--modes", "eager", "--steps", "1", "--warmup", "0",
                        "--torch-args=--device cpu", f"--out-dir={out}"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    rep = _strict_json((out / "side_by_side.json").read_text())
    md = (out / "side_by_side.md").read_text()
    assert md == rep["markdown"] and "| DDIM + decode | 8 |" in md and md in p.stdout
    assert rep["tiny"] and rep["targets_apply"] is False
    assert set(rep["runs"]) == {"jax:sample", "torch:sample:eager"}
    j, t = rep["runs"]["jax:sample"], rep["runs"]["torch:sample:eager"]
    assert j["workload"] == t["workload"] == "sample_ddim" and j["batch"] == t["batch"] == 8
    assert j["config"] == t["config"] == "configs/ldm_f8.py:tiny"
    assert j["dtype"] == t["dtype"] == "float32"
    for k in ("sampler", "sampler_steps", "cfg_scale", "output_shape", "finite", "decoded"):
        assert j[k] == t[k], k
    # The torch run itself: torch_reference.py sample --config=configs/ldm_f8.py:tiny --device cpu.
    _check_torch_result(t, "sample_ddim", 8, 1)
    assert t["params"] == ours["unet"]
    assert t["ae_params"] == 83_653_863  # the SD KL-f8 autoencoder, as ldm_jax.bench decodes with
    assert t["sampler_steps"] == 4 and t["decoded"] and t["finite"]
    assert t["output_shape"] == [8, 32, 32, 3]
    (row,) = rep["rows"]
    assert row["workload"] == "sample" and row["batch"] == 8
    assert row["params"]["torch"] == row["params"]["ldm_jax_count"] == ours["unet"]
    assert row["params_match"] is True
    for k in ("jax", "eager"):
        assert row["images_per_s"][k] > 0 and math.isfinite(row["images_per_s"][k])
    assert row["images_per_s"]["compile"] is None and row["ratio_jax_over_compile"] is None
    assert row["ratio_jax_over_eager"] == pytest.approx(j["images_per_s"] / t["images_per_s"])
    assert row["speed_target_met"] is None and row["target_speed_vs_compile"] == 1.3
    assert row["failed"] == []
    # Merge: nothing is run again, the same rows come back.
    p2 = subprocess.run([sys.executable, SIDE_BY_SIDE, "--report-only",
                         f"--from-report={out / 'side_by_side.json'}", f"--out-dir={tmp_path / 'm'}"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p2.returncode == 0, p2.stderr[-3000:]
    merged = _strict_json((tmp_path / "m" / "side_by_side.json").read_text())
    assert merged["runs"] == rep["runs"] and merged["rows"] == rep["rows"]


def test_target_verdicts():
    """The met / not met logic on hand-made run records (pure function, nothing timed)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import side_by_side as sbs
    finally:
        sys.path.pop(0)

    def run(ips, mem, **kw):
        return dict(images_per_s=ips, peak_memory_bytes=mem, batch=8, step_s_median=8 / ips,
                    compile_s=1.0, **kw)

    runs = {"jax:vae": run(150.0, 9e9), "torch:vae:eager": run(50.0, 12e9),
            "torch:vae:compile": run(100.0, 10e9),
            "jax:unet": run(1200.0, 1e10, params=5), "torch:unet:eager": run(800.0, 2e10, params=5,
                                                                               params_ours=5),
            "torch:unet:compile": run(1000.0, 2e10, params=5, params_ours=5),
            "jax:sample": run(60.0, 1e9), "torch:sample:compile": {"error": "exit status 1"}}
    rows = {r["workload"]: r for r in sbs.build_rows(runs, True)}
    assert rows["vae"]["ratio_jax_over_compile"] == pytest.approx(1.5)
    assert rows["vae"]["speed_target_met"] is True and rows["vae"]["memory_target_met"] is True
    assert rows["vae"]["all_targets_met"] is True
    assert rows["unet"]["ratio_jax_over_compile"] == pytest.approx(1.2)
    assert rows["unet"]["speed_target_met"] is False and rows["unet"]["all_targets_met"] is False
    assert rows["unet"]["params_match"] is True
    assert rows["sample"]["speed_target_met"] is None and rows["sample"]["failed"] == ["compile"]
    runs["jax:vae"] = run(150.0, 11e9)  # above the smaller torch peak (10 GB)
    assert sbs.build_rows(runs, True)[0]["memory_target_met"] is False
