"""KL autoencoder weight conversion: parity with diffusers.AutoencoderKL, CompVis/diffusers
import and export round trips, error reporting, loaders and the ``python -m ldm_jax.convert`` CLI.

Parity tolerance (fp32, CPU): ``max|ours - torch| <= 1e-4 * max(1, max|torch|)``, i.e.
1e-4 absolute for O(1) activations, relative for larger ones. Measured errors are printed
(``pytest -s``); they are around 1e-6 to 1e-5.

Tests needing torch / diffusers / safetensors skip (with the reason) when those are absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_to_reference, assert_same_param_trees
from ldm_jax.convert import autoencoder_weights as aw
from ldm_jax.models.autoencoder import AutoencoderConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=32)
SD_F8 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
             sample_size=64)
# CompVis KL-f4 (embed_dim 3) and KL-f16 (embed_dim 16, attention at resolution 16 = the
# last level of 256 // 2**4) at tiny widths; diffusers expresses per-level attention with
# the Attn*Block2D types.
F4 = dict(block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=3, sample_size=256)
F16 = dict(block_out_channels=(32, 32, 64, 64, 128), layers_per_block=1, latent_channels=16,
           sample_size=256, attn_levels=(4,))


def _torch():
    return pytest.importorskip("torch", reason="torch is needed for parity with PyTorch models")


def _diffusers():
    _torch()
    return pytest.importorskip("diffusers", reason="diffusers is needed for AutoencoderKL parity")


def _make_diffusers(layout: dict, seed: int, **extra):
    torch = _torch()
    diffusers = _diffusers()
    layout = dict(layout)
    attn = set(layout.pop("attn_levels", ()))
    n = len(layout["block_out_channels"])
    down = ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(n)]
    up = ["AttnUpDecoderBlock2D" if n - 1 - k in attn else "UpDecoderBlock2D" for k in range(n)]
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(down_block_types=tuple(down), up_block_types=tuple(up),
                                    norm_num_groups=32, **layout, **extra).eval()
    with torch.no_grad():  # GroupNorm scale 1 / bias 0 at init: perturb every 1-D tensor
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _compvis_by_hand(sd: dict[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """diffusers names -> CompVis names, written independently of the library's map."""
    out = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.",
                   lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.resnets\.", r"decoder.up.\1.block.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.attentions\.", r"decoder.up.\1.attn.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        attn = re.match(r"^(.*\.(?:attn_1|attn\.\d+))\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if attn:
            head, mod, leaf = attn.groups()
            mod = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[mod]
            k = f"{head}.{mod}.{leaf}"
            if leaf == "weight" and mod != "norm":
                value = value[:, :, None, None]  # Linear -> 1x1 conv
        out[k] = value
    return out


def _nhwc(t) -> jnp.ndarray:
    return jnp.asarray(t.detach().cpu().numpy().transpose(0, 2, 3, 1))


def _nchw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)


class _Reference:
    """Torch reference outputs of one diffusers model on fixed inputs."""

    def __init__(self, model, size: int, seed: int = 1):
        torch = _torch()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(2, model.config.in_channels, size, size, generator=g) * 2 - 1
        f = 2 ** (len(model.config.block_out_channels) - 1)
        self.z = torch.randn(2, model.config.latent_channels, size // f, size // f, generator=g)
        with torch.no_grad():
            post = model.encode(self.x).latent_dist
            self.mean, self.logvar = post.mean.numpy(), post.logvar.numpy()
            self.dec = model.decode(self.z).sample.numpy()
            self.full = model(self.x, sample_posterior=False).sample.numpy()

    def check(self, cfg: AutoencoderConfig, params, what: str) -> None:
        print(f"\n{what}:")
        model = aw.make_autoencoder(cfg, params)
        post = model.encode(_nhwc(self.x))
        assert_close_to_reference("encoder mean", _nchw(post.mean), self.mean)
        assert_close_to_reference("encoder logvar", _nchw(post.logvar), self.logvar)
        assert_close_to_reference("decoder", _nchw(model.decode(_nhwc(self.z))), self.dec)
        recon, _ = model(_nhwc(self.x))
        assert_close_to_reference("forward (posterior mode)", _nchw(recon), self.full)


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def tiny():
    model = _make_diffusers(TINY, seed=0)
    return model, _state_dict(model), _Reference(model, 32)


def test_tiny_parity_diffusers_and_compvis(tiny):
    model, sd, ref = tiny
    cfg = aw.infer_config(sd)
    assert cfg == AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                                    embed_dim=4, resolution=256)
    assert aw.detect_layout(sd) == "diffusers"
    ref.check(cfg, aw.torch_state_dict_to_params(sd, cfg, "diffusers"), "tiny, diffusers layout")

    cv = _compvis_by_hand(sd, 2)
    # An SD .ckpt: first_stage_model.* plus U-Net / text-encoder keys (ignored), and the
    # CompVis training loss keys (ignored).
    ckpt = {aw.SD_PREFIX + k: v for k, v in cv.items()}
    ckpt.update({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((2, 2)),
                 "cond_stage_model.transformer.x": np.zeros(3),
                 aw.SD_PREFIX + "loss.logvar": np.zeros(()),
                 aw.SD_PREFIX + "loss.discriminator.main.0.weight": np.zeros((64, 3, 4, 4))})
    assert aw.detect_layout(aw._select(ckpt, aw.DEFAULT_IGNORE_PREFIXES)) == "compvis"
    assert aw.infer_config(ckpt) == cfg
    params_cv = aw.torch_state_dict_to_params(ckpt)  # layout and config inferred
    ref.check(cfg, params_cv, "tiny, CompVis layout (SD .ckpt names)")
    # The library's CompVis names are the test's hand-written ones.
    assert aw.params_to_torch_state_dict(params_cv, cfg, "compvis").keys() == cv.keys()


def test_compvis_names_agree_with_diffusers_own_converter(tiny):
    """diffusers' single-file loader maps our (hand-written) CompVis names back exactly."""
    _diffusers()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model, sd, _ = tiny
    back = convert_ldm_vae_checkpoint({aw.SD_PREFIX + k: v for k, v in _compvis_by_hand(sd, 2).items()},
                                      dict(model.config))
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(np.asarray(back[k]).reshape(sd[k].shape), sd[k])


@pytest.mark.parametrize("name,layout,size", [("f4", F4, 32), ("f16", F16, 64)])
def test_f4_f16_parity(name, layout, size):
    model = _make_diffusers(layout, seed=3)
    sd = _state_dict(model)
    ref = _Reference(model, size)
    cfg = aw.config_from_diffusers(dict(model.config))
    assert cfg == aw.infer_config(sd, resolution=256)
    if name == "f16":
        assert cfg.ch_mult == (1, 1, 2, 2, 4) and cfg.attn_resolutions == (16,)
        assert cfg.embed_dim == cfg.z_channels == 16
        assert any(".down.4.attn.0." in k for k in aw.expected_torch_shapes(cfg, "compvis"))
    else:
        assert cfg.ch_mult == (1, 2, 4) and cfg.embed_dim == 3 and cfg.attn_resolutions == ()
    ref.check(cfg, aw.torch_state_dict_to_params(sd, cfg, "diffusers"), f"{name}, diffusers layout")
    n = len(layout["block_out_channels"])
    params_cv = aw.torch_state_dict_to_params(_compvis_by_hand(sd, n), None, "compvis")
    ref.check(cfg, params_cv, f"{name}, CompVis layout")
    # Diffusers export of the per-level-attention layout reproduces the original exactly.
    assert aw.diffusers_config(cfg)["down_block_types"] == list(model.config.down_block_types)
    assert aw.diffusers_config(cfg)["up_block_types"] == list(model.config.up_block_types)
    back = aw.params_to_torch_state_dict(params_cv, cfg, "diffusers")
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_sd_kl_f8_parity():
    """The Stable Diffusion VAE layout (~84M parameters) at 64x64."""
    model = _make_diffusers(SD_F8, seed=2)
    sd = _state_dict(model)
    ref = _Reference(model, 64)
    cfg = aw.infer_config(sd)
    assert cfg == AutoencoderConfig()  # DESIGN.md: the KL-f8 defaults
    params = aw.torch_state_dict_to_params(sd, cfg, "diffusers")
    ref.check(cfg, params, "SD KL-f8, diffusers layout")
    # CompVis import gives bit-identical parameters (so the same outputs).
    params_cv = aw.torch_state_dict_to_params(_compvis_by_hand(sd, 4), cfg, "compvis")
    flat, flat_cv = aw._flatten(params), aw._flatten(params_cv)
    assert flat.keys() == flat_cv.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], flat_cv[k])


def test_identity_quant_convs_and_legacy_attention_names(tmp_path):
    """diffusers use_quant_conv=False / use_post_quant_conv=False (SD3/FLUX-style VAEs) load
    with identity 1x1 convs; pre-0.14 attention names (query/key/value/proj_attn) load too."""
    model = _make_diffusers(TINY, seed=4, use_quant_conv=False, use_post_quant_conv=False)
    ref = _Reference(model, 32)
    model.save_pretrained(str(tmp_path / "vae"))
    cfg, params, meta = aw.import_autoencoder(str(tmp_path / "vae"))
    ref.check(cfg, params, "tiny without quant convs")
    assert meta["layout"] == "diffusers" and meta["scaling_factor"] == pytest.approx(0.18215)

    model = _make_diffusers(TINY, seed=5)
    sd = _state_dict(model)
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v[:, :, None, None] if k.endswith(("query.weight", "proj_attn.weight")) else v
    assert any(".query.weight" in k for k in legacy)
    a, b = aw._flatten(aw.torch_state_dict_to_params(legacy)), aw._flatten(aw.torch_state_dict_to_params(sd))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------- round trips


def _random_params(cfg: AutoencoderConfig, seed: int = 0) -> dict:
    """Random weights at realistic scales (kernels ~ N(0, 1/fan_in), norms ~ 1 + N(0, .2))."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in aw._param_shapes(cfg).items():
        if path[-1] == "kernel":
            v = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            v = (path[-1] == "scale") + 0.2 * rng.normal(size=shape)
        flat[path] = v.astype(np.float32)
    return aw._unflatten(flat)


@pytest.mark.parametrize("cfg", [
    AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, attn_resolutions=(16,)),
    AutoencoderConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, embed_dim=3, z_channels=3),
], ids=["attn", "f4"])
def test_diffusers_export_round_trip(tmp_path, cfg):
    _diffusers()
    pytest.importorskip("safetensors")
    import diffusers
    import torch

    params = _random_params(cfg)
    out = aw.export_diffusers(params, cfg, str(tmp_path / "dif"), scaling_factor=0.5)
    model, info = diffusers.AutoencoderKL.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert model.config.scaling_factor == 0.5
    back = aw.torch_state_dict_to_params(_state_dict(model))
    assert aw.infer_config(_state_dict(model), resolution=cfg.resolution) == cfg
    assert_same_param_trees(back, params)
    cfg2, back2, _ = aw.import_autoencoder(out)  # via the folder's config.json
    assert cfg2 == cfg
    assert_same_param_trees(back2, params)
    # ... and it computes what ours computes.
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = model(x, sample_posterior=False).sample.numpy()
    recon, _ = aw.make_autoencoder(cfg, params)(_nhwc(x))
    assert_close_to_reference(f"exported diffusers model forward ({cfg.ch_mult})", _nchw(recon), ref)


def test_compvis_export_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32,
                            attn_resolutions=(32,), embed_dim=3, z_channels=4)
    params = _random_params(cfg, seed=1)
    path = aw.export_compvis(params, cfg, str(tmp_path / "vae.safetensors"))
    sd = aw.load_torch_file(path)
    assert "encoder.down.0.attn.0.q.weight" in sd and sd["encoder.down.0.attn.0.q.weight"].ndim == 4
    assert "decoder.up.1.upsample.conv.weight" in sd
    assert aw.infer_config(sd, resolution=32) == cfg
    assert_same_param_trees(aw.torch_state_dict_to_params(sd, cfg, "compvis"), params)
    # SD-style names, in a torch .ckpt read back by the torch-free reader.
    path = aw.export_compvis(params, cfg, str(tmp_path / "vae.safetensors"), prefix=aw.SD_PREFIX)
    assert all(k.startswith(aw.SD_PREFIX) for k in aw.load_torch_file(path))
    assert_same_param_trees(aw.import_autoencoder(path, "compvis", resolution=32)[1], params)
    # z_channels != embed_dim (CompVis allows it) cannot be a diffusers AutoencoderKL.
    with pytest.raises(ValueError, match="z_channels=4 != embed_dim=3"):
        aw.export_diffusers(params, cfg, str(tmp_path / "dif"))


def test_compvis_ckpt_via_torch(tmp_path):
    """.ckpt files (torch.save) are read by the torch-free reader; an SD-style checkpoint
    with a step counter and U-Net weights next to first_stage_model.* works."""
    torch = _torch()
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    params = _random_params(cfg, seed=2)
    path = aw.export_compvis(params, cfg, str(tmp_path / "vae.ckpt"), prefix=aw.SD_PREFIX)
    assert_same_param_trees(aw.torch_state_dict_to_params(aw.load_torch_file(path)), params)
    sd = {k: torch.from_numpy(v).half() for k, v in
          aw.params_to_torch_state_dict(params, cfg, "compvis", prefix=aw.SD_PREFIX).items()}
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
    sd["betas"] = torch.zeros(1000, dtype=torch.float64)
    torch.save({"state_dict": sd, "global_step": 840000, "epoch": 3}, str(tmp_path / "sd.ckpt"))
    cfg2, got, meta = aw.import_autoencoder(str(tmp_path / "sd.ckpt"))
    assert cfg2 == cfg and meta["layout"] == "compvis"
    want = aw._flatten(params)
    for k, v in aw._flatten(got).items():
        np.testing.assert_array_equal(v, want[k].astype(np.float16).astype(np.float32))


def test_half_precision_sources(tmp_path):
    """fp16 / bf16 tensors (safetensors has no numpy bf16) load, converted to float32."""
    torch = _torch()
    st = pytest.importorskip("safetensors.torch")
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    sd = aw.params_to_torch_state_dict(_random_params(cfg, seed=3), cfg, "compvis")
    for dtype in (torch.float16, torch.bfloat16):
        tsd = {k: torch.from_numpy(v).to(dtype) for k, v in sd.items()}
        path = str(tmp_path / f"{dtype}.safetensors")
        st.save_file(tsd, path)
        loaded = aw.load_torch_file(path)
        params = aw.torch_state_dict_to_params(loaded)
        for p, v in aw._flatten(params).items():
            assert v.dtype == np.float32
        want = aw.torch_state_dict_to_params({k: v.float().numpy() for k, v in tsd.items()})
        assert_same_param_trees(params, want)
        assert_same_param_trees(aw.torch_state_dict_to_params(tsd), want)  # torch tensors directly


def test_compvis_discriminator_import():
    """loss.discriminator.* of a CompVis autoencoder checkpoint -> our NLayerDiscriminator."""
    torch = _torch()
    from flax import nnx

    from ldm_jax.models.discriminator import NLayerDiscriminator

    nn = torch.nn
    ndf, n_layers = 8, 3
    layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers + 1):  # taming-transformers' NLayerDiscriminator layout
        prev, mult = mult, min(2 ** n, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
    layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
    torch.manual_seed(7)
    main = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in main:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    sd = {f"loss.discriminator.main.{k}": v.numpy() for k, v in main.state_dict().items()}
    sd["loss.logvar"] = np.zeros(())
    sd["encoder.conv_in.weight"] = np.zeros((1,))
    kwargs, state = aw.discriminator_from_compvis(sd)
    assert kwargs == {"in_channels": 3, "ndf": 8, "n_layers": 3}
    disc = NLayerDiscriminator(**kwargs, rngs=nnx.Rngs(0))
    st = nnx.state(disc)
    nnx.replace_by_pure_dict(st, state)
    nnx.update(disc, st)
    disc.eval()  # running statistics, like torch's eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = main(x).numpy()
    print()
    assert_close_to_reference("discriminator logits (eval)", _nchw(disc(_nhwc(x))), ref)
    del sd["loss.discriminator.main.6.running_var"]
    with pytest.raises(ValueError, match="main.6.running_var"):
        aw.discriminator_from_compvis(sd)


# ----------------------------------------------------------------------------- errors


def test_one_error_names_missing_extra_and_misshaped_keys():
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    for layout, missing, bad in [
        ("compvis", "decoder.up.0.block.1.conv2.bias", "encoder.mid.attn_1.q.weight"),
        ("diffusers", "decoder.up_blocks.1.resnets.1.conv2.bias", "encoder.mid_block.attentions.0.to_q.weight"),
    ]:
        sd = aw.params_to_torch_state_dict(_random_params(cfg), cfg, layout)
        del sd[missing]
        sd["encoder.down.7.bogus.weight"] = np.zeros(3, np.float32)
        sd[bad] = np.zeros((64, 32), np.float32)
        with pytest.raises(ValueError) as e:
            aw.torch_state_dict_to_params(sd, cfg, layout)
        msg = str(e.value)
        assert "unknown keys ['encoder.down.7.bogus.weight']" in msg
        assert f"missing keys ['{missing}']" in msg
        assert bad in msg and "(64, 32)" in msg
    # Our side: a params tree that does not fit the config.
    params = _random_params(cfg)
    params["decoder"]["conv_out"]["bias"] = np.zeros(4, np.float32)
    del params["quant_conv"]["bias"]
    with pytest.raises(ValueError, match=r"missing keys \['quant_conv/bias'\].*decoder/conv_out/bias"):
        aw.params_to_torch_state_dict(params, cfg, "compvis")


def test_config_errors():
    with pytest.raises(ValueError, match="cannot tell the layout"):
        aw.torch_state_dict_to_params({"foo.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="layout must be"):
        aw.torch_state_dict_to_params({"encoder.down.0.block.0.norm1.weight": np.zeros(3)},
                                      layout="ldm")
    with pytest.raises(ValueError, match="ch_mult\\[0\\]=2 != 1"):
        aw.diffusers_config(AutoencoderConfig(ch=32, ch_mult=(2, 2)))
    with pytest.raises(ValueError, match="norm_num_groups=16"):
        aw.config_from_diffusers({"block_out_channels": [32, 64], "norm_num_groups": 16,
                                  "down_block_types": ["DownEncoderBlock2D"] * 2,
                                  "up_block_types": ["UpDecoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="block types"):
        aw.config_from_diffusers({"block_out_channels": [32], "down_block_types": ["DownBlock2D"],
                                  "up_block_types": ["UpDecoderBlock2D"]})
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        aw.load_torch_file(REPO + "/tests")



def test_truncated_weight_files_are_named(tmp_path):
    """A damaged .safetensors (or .ckpt) is a ValueError naming the file, which the CLIs
    print as one line, not safetensors' own exception type."""
    from ldm_jax.convert import inception_weights, unet_weights

    bad = tmp_path / "vae.safetensors"
    bad.write_bytes(b"\x10\x00junk")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: not a readable .safetensors file"):
        aw.load_torch_file(str(bad))
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        unet_weights._load_safetensors(str(bad))
    ckpt = tmp_path / "fid.pth"
    ckpt.write_bytes(b"junk" * 100)
    with pytest.raises(SystemExit):  # argparse error: one line on stderr
        inception_weights.main([str(ckpt), "--out", str(tmp_path / "o.npz")])
    with pytest.raises(ValueError) as e:
        inception_weights.convert_inception_file(str(ckpt))
    assert str(e.value).count(str(ckpt)) == 1, str(e.value)


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "ldm_jax.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_import_export(tmp_path, capsys):
    torch = _torch()
    pytest.importorskip("safetensors")
    from ldm_jax.convert.__main__ import main
    from ldm_jax.pretrained import load_autoencoder

    model = _make_diffusers(TINY, seed=6, scaling_factor=0.13025)
    pipeline = tmp_path / "pipeline"
    model.save_pretrained(str(pipeline / "vae"))  # a pipeline folder: its vae/ is used
    out = tmp_path / "pre"
    r = _cli("autoencoder-import", "--src", str(pipeline), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "diffusers layout" in r.stdout and "scale_factor=0.13025" in r.stdout
    meta = json.loads((out / "pretrained.json").read_text())
    assert meta["kind"] == "autoencoder" and meta["scaling_factor"] == pytest.approx(0.13025)
    ae, cfg, _ = load_autoencoder(str(out))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.decode(z).sample.numpy()
    print()
    assert_close_to_reference("CLI-imported decoder", _nchw(ae.decode(_nhwc(z))), ref)

    # Export (in-process main): the scaling factor travels along.
    assert main(["autoencoder-export", "--src", str(out), "--format", "diffusers",
                 "--out", str(tmp_path / "dif")]) == 0
    dcfg = json.loads((tmp_path / "dif" / "config.json").read_text())
    assert dcfg["scaling_factor"] == pytest.approx(0.13025) and dcfg["block_out_channels"] == [32, 64]
    assert main(["autoencoder-export", "--src", str(out), "--format", "compvis", "--prefix",
                 "--out", str(tmp_path / "vae.safetensors")]) == 0
    assert main(["autoencoder-import", "--src", str(tmp_path / "vae.safetensors"),
                 "--out", str(tmp_path / "pre2"), "--resolution", "32"]) == 0
    a, b = load_autoencoder(str(tmp_path / "pre2")), load_autoencoder(str(out))
    assert a[1] == b[1]
    from flax import nnx
    assert_same_param_trees(nnx.to_pure_dict(nnx.state(a[0], nnx.Param)),
                        nnx.to_pure_dict(nnx.state(b[0], nnx.Param)))

    # Errors: one line on stderr, exit status 2.
    capsys.readouterr()
    assert main(["autoencoder-import", "--src", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    # `lpips` hands its arguments to the LPIPS converter's own CLI.
    with pytest.raises(SystemExit) as e:
        main(["lpips", "--help"])
    assert e.value.code == 0 and "--vgg16" in capsys.readouterr().out
