"""Config files, variants, validation messages and the ``--config.key=value`` CLI overrides."""

from __future__ import annotations

import os
import re

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO_ROOT
from ldm_jax import config_lib
from ldm_jax.models.autoencoder import AutoencoderConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = ("vae_f4", "vae_f8", "vae_f16")


def _path(name: str) -> str:
    return os.path.join(CONFIGS, f"{name}.py")


def _load(name: str, variant: str = "") -> ml_collections.ConfigDict:
    return config_lib.load_config(f"{_path(name)}:{variant}" if variant else _path(name))


def _invalid(c, match: str, num_devices=None) -> str:
    with pytest.raises(ValueError, match=match) as e:
        config_lib.validate_vae_config(c, num_devices=num_devices)
    return str(e.value)


# ------------------------------------------------------------------ files and variants


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", ["", "tiny", "demo"])
def test_configs_and_variants_validate(name, variant):
    c = _load(name, variant)
    config_lib.validate_vae_config(c)
    config_lib.validate_vae_config(c, num_devices=8)
    assert c.name == (f"{name}_{variant}" if variant else name)
    mc = AutoencoderConfig.from_dict(c.model)
    assert mc.resolution % mc.downsample_factor == 0


def test_recipe_constants_of_full_configs():
    c = _load("vae_f8")
    m = c.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (128, (1, 2, 4, 4), 2, ())
    assert (m.z_channels, m.embed_dim, m.double_z, m.resolution) == (4, 4, True, 256)
    L = c.loss
    assert (L.kl_weight, L.perceptual_weight, L.logvar_init) == (1e-6, 1.0, 0.0)
    assert (L.disc_start, L.disc_factor, L.disc_weight, L.disc_loss) == (50_001, 1.0, 0.5, "hinge")
    assert (c.optim.base_lr, c.optim.b1, c.optim.b2) == (4.5e-6, 0.5, 0.9)
    assert (c.disc.ndf, c.disc.n_layers) == (64, 3)
    f4, f16 = _load("vae_f4").model, _load("vae_f16").model
    assert (tuple(f4.ch_mult), f4.z_channels, f4.embed_dim) == ((1, 2, 4), 3, 3)
    assert (tuple(f16.ch_mult), f16.z_channels, f16.embed_dim) == ((1, 1, 2, 2, 4), 16, 16)
    assert tuple(f16.attn_resolutions) == (16,)


def test_tiny_variants_are_small():
    for name in NAMES:
        c = _load(name, "tiny")
        assert c.model.ch == 32 and c.model.num_res_blocks == 1 and c.model.resolution <= 64
        assert c.dtype == "float32"
        assert c.num_train_steps <= 4


def test_unknown_variant_rejected():
    for name in NAMES:
        with pytest.raises(ValueError, match="huge"):
            _load(name, "huge")
    with pytest.raises(FileNotFoundError, match="nope"):
        config_lib.load_config(os.path.join(CONFIGS, "nope.py"))


# ------------------------------------------------------------------ validation


def test_unknown_top_level_key_rejected():
    c = _load("vae_f8", "tiny")
    c.num_train_stpes = 3
    msg = _invalid(c, "num_train_stpes")
    assert "unknown config key" in msg


def test_unknown_nested_keys_rejected_and_all_listed():
    c = _load("vae_f8", "tiny")
    c.loss.disc_strat = 3
    c.model.chmult = (1, 2)
    msg = _invalid(c, r"loss\.disc_strat")
    assert "model.chmult" in msg
    assert "disc_start" in msg  # suggests the close match


def test_group_replaced_by_scalar_rejected():
    c = _load("vae_f8", "tiny")
    del c["optim"]
    c.optim = 1.0
    _invalid(c, r"'optim' must be a group")


@pytest.mark.parametrize(
    "path,value,match",
    [
        ("dtype", "float8", "float8"),
        ("param_dtype", "int8", "int8"),
        ("loss.disc_loss", "foo", "disc_loss.*foo"),
        ("loss.gen_loss", "bar", "gen_loss.*bar"),
        ("loss.lpips_missing", "ignore", "lpips_missing.*ignore"),
        ("model.resolution", 33, r"model\.resolution=33.*factor 2"),  # tiny f8: ch_mult (1, 2)
        ("model.ch", 48, "multiples of 32"),
        ("model.double_z", False, "double_z"),
        ("model.remat_policy", "dots", "remat_policy.*dots"),
        ("data.source", "s3", "s3"),
        ("optim.b1", 1.0, "b1"),
        ("optim.lr_decay", "step", "lr_decay.*step"),
        ("optim.min_lr_ratio", 1.5, "min_lr_ratio"),
        ("num_image_samples", -1, r"num_image_samples must be >= 0 \(0: no image grids\)"),
        ("trainer", "ldm", "ldm"),
    ],
)
def test_bad_values_rejected(path, value, match):
    c = _load("vae_f8", "tiny")
    *groups, key = path.split(".")
    node = c
    for g in groups:
        node = node[g]
    node[key] = value
    _invalid(c, match)


def test_resolution_not_divisible_by_downsampling_factor():
    c = _load("vae_f16")
    c.model.resolution = 264  # divisible by 8, not by 16
    _invalid(c, r"resolution=264.*factor 16")
    c.model.resolution = 272
    config_lib.validate_vae_config(c)


def test_batch_not_divisible_by_devices():
    c = _load("vae_f8", "tiny")
    c.global_batch_size = 12
    _invalid(c, r"global_batch_size=12.*8 devices", num_devices=8)
    config_lib.validate_vae_config(c, num_devices=4)  # fine on 4
    c.global_batch_size = 16
    c.eval_batch_size = 4
    _invalid(c, r"eval_batch_size=4", num_devices=8)


def test_lr_schedules():
    """Warm-up then constant / cosine / linear decay to min_lr_ratio at num_train_steps;
    the LDM trainer's lr_fn is that schedule."""
    import math

    from ldm_jax.trainers import common, ldm

    o = ml_collections.ConfigDict(dict(warmup_steps=10, lr_decay="constant", min_lr_ratio=0.1))
    lr = lambda s: float(common.lr_schedule(2.0, o, 110)(s))  # noqa: E731
    assert [lr(s) for s in (0, 5, 10, 50, 110, 500)] == pytest.approx([0, 1, 2, 2, 2, 2])
    o.lr_decay = "cosine"
    for s in (10, 35, 60, 85, 110, 500):
        u = min(s - 10, 100) / 100
        assert lr(s) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * u))), rel=1e-5), s
    assert lr(5) == pytest.approx(1.0)
    o.lr_decay = "linear"
    assert [lr(s) for s in (10, 60, 110, 500)] == pytest.approx([2.0, 1.1, 0.2, 0.2], rel=1e-5)
    o.warmup_steps = 0
    assert lr(0) == pytest.approx(2.0) and lr(110) == pytest.approx(0.2)

    c = config_lib.load_config(os.path.join(CONFIGS, "ldm_f8.py:tiny"))
    c.autoencoder_path = "unused"
    c.num_train_steps, c.optim.warmup_steps, c.optim.lr_decay = 20, 4, "cosine"
    config_lib.validate_ldm_config(c)
    _, lr_fn = ldm.make_optimizer(c)
    assert float(lr_fn(4)) == pytest.approx(c.optim.lr) and float(lr_fn(20)) == pytest.approx(0.0, abs=1e-12)
    c.optim.warmup_steps = 20
    with pytest.raises(ValueError, match="warmup_steps=20 >= num_train_steps=20"):
        config_lib.validate_ldm_config(c)


def test_folder_source_needs_path():
    c = _load("vae_f8", "tiny")
    c.data.source = "folder"
    _invalid(c, r"data\.path")
    c.data.path = "/some/images"
    config_lib.validate_vae_config(c)


# ------------------------------------------------------------------ CLI overrides


def _parse(*args: str) -> flags.FlagValues:
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv


def test_cli_override():
    fv = _parse(f"--config={_path('vae_f8')}:tiny", "--config.loss.disc_start=7",
                "--config.model.ch_mult=(1,2,2)", "--config.dtype=bfloat16")
    c = fv.config
    assert c.loss.disc_start == 7
    assert tuple(c.model.ch_mult) == (1, 2, 2)
    assert c.dtype == "bfloat16"
    # The rest of the tiny variant is intact.
    assert c.name == "vae_f8_tiny" and c.model.ch == 32 and c.model.resolution == 32
    config_lib.validate_vae_config(c, num_devices=8)


def test_cli_override_of_unknown_key_fails():
    with pytest.raises(Exception, match="disc_strat"):
        _parse(f"--config={_path('vae_f8')}:tiny", "--config.loss.disc_strat=7")
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(f"--config={_path('vae_f8')}:tiny", "--config.loss.disc_start=abc")
    with pytest.raises(flags.IllegalFlagValueError, match="huge"):
        _parse(f"--config={_path('vae_f8')}:huge")


def test_cli_autoencoder_workdir_is_autoencoder_path():
    """``--config.autoencoder_workdir`` (the issue's name) sets ``autoencoder_path``, and
    the other way round: one field under two names."""
    c = _parse(f"--config={_path('ldm_f8')}:demo", "--config.autoencoder_workdir=/runs/vae").config
    assert c.autoencoder_path == "/runs/vae" == c.autoencoder_workdir
    c = _parse(f"--config={_path('ldm_f8')}:demo", "--config.autoencoder_path=/runs/vae2").config
    assert c.autoencoder_workdir == "/runs/vae2"
    config_lib.validate_ldm_config(c, num_devices=8)


def _train_py_error(tmp_path, *args: str, script: str = "train.py", workdir=None) -> str:
    """``SCRIPT ARGS --workdir=WORKDIR`` (default ``tmp_path/wd``) must stop with status 2
    and an ``error:`` message, no traceback; a train.py run leaves no workdir behind."""
    workdir = workdir or tmp_path / "wd"
    import subprocess
    import sys

    from conftest import cpu_env

    r = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args,
                        f"--workdir={workdir}"],
                       cwd=REPO_ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    log_line = re.compile(r"^[IW]\d{4} \d\d:\d\d:|.* (INFO|WARNING) ")  # absl / logging lines
    err = "\n".join(ln for ln in r.stderr.splitlines() if not log_line.match(ln)).strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    if script == "train.py":  # no config.json, tensorboard or checkpoints of a run that never began
        assert not os.path.exists(workdir), os.listdir(workdir)
    return err


def test_train_py_config_mistakes_are_clear_errors(tmp_path):
    """Mistakes in train.py's config flags stop it with status 2 and a message saying what
    to change, not a traceback: a mistyped key (one line: the closest keys and the keys that
    exist there), a missing file, an unknown variant, a value of the wrong type, a value the
    validation rejects, a data folder that does not exist."""
    err = _train_py_error(tmp_path, f"--config={_path('ldm_f8')}:demo", "--config.latent.scale=0.2")
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --config.latent.scale: unknown config key 'latent.scale'; did you mean ")
    assert "'latent.scale_factor'" in err and "(keys in latent: cache, " in err
    err = _train_py_error(tmp_path, "--config=configs/no_such_config.py")
    assert err == ("error: --config: cannot load the config file ([Errno 2] No such file or directory: "
                   "'configs/no_such_config.py')")
    err = _train_py_error(tmp_path, f"--config={_path('vae_f8')}:huge")
    assert err.endswith("unknown config variant 'huge'; choose one of ['demo', 'tiny']"), err
    err = _train_py_error(tmp_path, f"--config={_path('vae_f8')}:tiny", "--config.model.ch=abc")
    assert "--config.model.ch=abc" in err and "invalid literal for int()" in err
    err = _train_py_error(tmp_path, f"--config={_path('vae_f8')}:tiny", "--config.num_train_steps=0")
    assert err == "error: invalid config:\n  num_train_steps must be >= 1"
    err = _train_py_error(tmp_path, f"--config={_path('vae_f8')}:tiny", "--config.data.source=folder",
                          f"--config.data.path={tmp_path / 'missing'}")
    assert err == f"error: data_cfg.path={str(tmp_path / 'missing')!r} is not an existing folder (source='folder')."
    # sample.py: a workdir that is no LDM run, in one line instead of the usage text
    vae_wd = tmp_path / "vae"
    vae_wd.mkdir()
    (vae_wd / "config.json").write_text(config_lib.load_config(f"{_path('vae_f8')}:tiny").to_json())
    err = _train_py_error(tmp_path, script="sample.py", workdir=vae_wd)
    assert err == f"error: {vae_wd} holds a 'vae_gan' run, not an LDM (trainer 'ldm')"
    msg = config_lib.unknown_key_message(config_lib.load_config(f"{_path('ldm_f8')}:demo"), "model.remat.x")
    assert msg == "unknown config key 'model.remat.x': model.remat is a value, not a group"


def test_cli_locked_config_rejects_new_attributes():
    c = _parse(f"--config={_path('vae_f8')}:tiny").config
    with pytest.raises(AttributeError):
        c.loss.disc_strat = 3


def test_set_fields_dotted_typed_and_unknown():
    c = config_lib.load_config(os.path.join(REPO_ROOT, "configs/ldm_f8.py:tiny"))
    config_lib.set_fields(c, {"model.remat": True, "mesh.fsdp": 4, "image_resolution": 64})
    assert c.model.remat is True and c.mesh.fsdp == 4 and c.image_resolution == 64
    # --set strings take the type of the field they replace.
    config_lib.set_fields(c, {"model.remat": "false", "model.channel_mult": "1,2,4",
                              "optim.lr": "3e-4", "global_batch_size": "16"}, parse=True)
    assert c.model.remat is False and tuple(c.model.channel_mult) == (1, 2, 4)
    assert c.optim.lr == 3e-4 and c.global_batch_size == 16
    with pytest.raises(ValueError, match="unknown config key 'modle.remat'"):
        config_lib.set_fields(c, {"modle.remat": True})
    with pytest.raises(ValueError, match="unknown config key 'model.remmat'"):
        config_lib.set_fields(c, {"model.remmat": "1"}, parse=True)


def test_config_changes_name_each_changed_field_once():
    """What a resume logs (and a checkpoint mismatch error names): dotted keys with the old
    and new values, an aliased field once, fields only one side has, and a length limit."""
    c = config_lib.load_config(f"{_path('ldm_f8')}:tiny")
    saved = config_lib.as_plain(c)
    assert config_lib.config_changes(saved, c) == []
    c.autoencoder_workdir = "/runs/vae"  # the alias sets autoencoder_path too
    c.model.channel_mult = (1, 3)
    saved["model"]["old_field"] = 1
    assert config_lib.config_changes(saved, c) == [
        "autoencoder_path '' -> '/runs/vae'", "model.channel_mult (1, 2) -> (1, 3)",
        "model.old_field 1 -> (absent)"]
    assert config_lib.config_changes(saved, c, limit=1) == [
        "autoencoder_path '' -> '/runs/vae'", "... and 2 more"]
