"""U-Net weight conversion: parity with diffusers.UNet2DModel, the CompVis openaimodel
layout (fused legacy-order qkv) against a hand-written PyTorch openaimodel forward,
export/import round trips, error reporting and the ``unet-import`` / ``unet-export`` CLI.

Parity tolerance (fp32, CPU): ``max|ours - torch| <= 1e-4 * max(1, max|torch|)``. Measured
errors are printed (``pytest -s``).

There is no CompVis package here: ``_openaimodel_forward`` re-implements openaimodel's
``UNetModel.forward`` (TimestepEmbedSequential blocks, ResBlock, AttentionBlock with
``QKVAttentionLegacy`` / ``QKVAttention``) directly from a state dict's key names, and
diffusers' own single-file converter (``convert_ldm_unet_checkpoint``) cross-checks the
non-attention CompVis names.
"""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close_to_reference, assert_same_param_trees
from ldm_jax.convert import unet_weights as uw
from ldm_jax.models.unet import UNetConfig

torch = pytest.importorskip("torch", reason="torch is needed for parity with PyTorch models")
diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for UNet2DModel parity")
pytest.importorskip("safetensors")

SIZE = 16
TINY = dict(sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16)
CASES = {
    # unconditional, additive time embedding, 32 groups (CompVis' GroupNorm32)
    "uncond": dict(norm_num_groups=32),
    # class-conditional, scale-shift ResBlocks, 8 groups (attn_norm_num_groups keeps the
    # mid-block attention's GroupNorm, as ours has)
    "class_scale_shift": dict(norm_num_groups=8, attn_norm_num_groups=8,
                              resnet_time_scale_shift="scale_shift", num_class_embeds=5),
}


def _make_diffusers(extra: dict, seed: int):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**TINY, **extra).eval()
    with torch.no_grad():  # norms start at 1/0: perturb every 1-D tensor; all weights a bit
        for p in model.parameters():
            p.add_((0.2 if p.ndim == 1 else 0.05) * torch.randn_like(p))
    return model


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, SIZE, SIZE, generator=g)
    t = torch.tensor([10, 733])
    n = model.config.num_class_embeds
    y = torch.tensor([0, n - 1]) if n else None
    return x, t, y


def _ours(cfg: UNetConfig, params, x, t, y) -> np.ndarray:
    from flax import nnx

    model = uw.make_unet(cfg, params)
    fn = nnx.jit(lambda m, a, b, c: m(a, b, c))
    out = fn(model, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
             None if y is None else jnp.asarray(y.numpy()))
    return np.asarray(out).transpose(0, 3, 1, 2)


def _random_params(cfg: UNetConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in uw._param_shapes(cfg).items():
        if path[-1] == "kernel":
            v = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            v = (path[-1] == "scale") + 0.2 * rng.normal(size=shape)
        flat[path] = v.astype(np.float32)
    return uw.aw._unflatten(flat)


# ----------------------------------------------------------------------------- openaimodel


def _openaimodel_forward(sd, x, t, y, *, head_channels: int, scale_shift: bool, groups: int = 32,
                         order: str = "legacy"):
    """CompVis ``openaimodel.UNetModel.forward``, written against the CompVis key names of
    ``sd`` (no key map of the library is used): each ``input_blocks.N`` / ``middle_block`` /
    ``output_blocks.N`` is a TimestepEmbedSequential whose children are recognised by their
    parameters. ``order`` picks QKVAttentionLegacy ("legacy") or QKVAttention ("new")."""
    F = torch.nn.functional
    W = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}

    def gn(h, p):  # GroupNorm32: statistics in float32
        return F.group_norm(h.float(), groups, W[f"{p}.weight"], W[f"{p}.bias"], eps=1e-5)

    def conv(h, p, **kw):
        return F.conv2d(h, W[f"{p}.weight"], W[f"{p}.bias"], **kw)

    def lin(h, p):
        return F.linear(h, W[f"{p}.weight"], W[f"{p}.bias"])

    mc = W["time_embed.0.weight"].shape[1]
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "time_embed.0")),
              "time_embed.2")
    if "label_emb.weight" in W:
        emb = emb + W["label_emb.weight"][y]

    def resblock(h, p):
        out = conv(F.silu(gn(h, f"{p}.in_layers.0")), f"{p}.in_layers.2", padding=1)
        e = lin(F.silu(emb), f"{p}.emb_layers.1")[:, :, None, None]
        if scale_shift:
            scale, shift = e.chunk(2, dim=1)
            out = gn(out, f"{p}.out_layers.0") * (1 + scale) + shift
        else:
            out = gn(out + e, f"{p}.out_layers.0")
        out = conv(F.silu(out), f"{p}.out_layers.3", padding=1)
        skip = conv(h, f"{p}.skip_connection") if f"{p}.skip_connection.weight" in W else h
        return skip + out

    def qkv_attention(qkv, heads):
        bs, width, length = qkv.shape
        ch = width // (3 * heads)
        scale = 1 / math.sqrt(math.sqrt(ch))
        if order == "legacy":  # QKVAttentionLegacy
            q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
        else:  # QKVAttention
            q, k, v = (a.reshape(bs * heads, ch, length) for a in qkv.chunk(3, dim=1))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
        return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)

    def attention(h, p):
        b, c, hh, ww = h.shape
        xf = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(xf, f"{p}.norm"), W[f"{p}.qkv.weight"], W[f"{p}.qkv.bias"])
        a = qkv_attention(qkv, c // head_channels)
        out = F.conv1d(a, W[f"{p}.proj_out.weight"], W[f"{p}.proj_out.bias"])
        return (xf + out).reshape(b, c, hh, ww)

    def sequential(h, p):
        i = 0
        while any(k.startswith(f"{p}.{i}.") for k in W):
            q = f"{p}.{i}"
            if f"{q}.op.weight" in W:  # Downsample
                h = conv(h, f"{q}.op", stride=2, padding=1)
            elif f"{q}.conv.weight" in W:  # Upsample
                h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"{q}.conv", padding=1)
            elif f"{q}.qkv.weight" in W:
                h = attention(h, q)
            elif f"{q}.in_layers.0.weight" in W:
                h = resblock(h, q)
            else:  # input_blocks.0.0: the input conv
                h = conv(h, q, padding=1)
            i += 1
        return h

    def count(name):
        return len({k.split(".")[1] for k in W if k.startswith(f"{name}.")})

    hs, h = [], x
    for n in range(count("input_blocks")):
        h = sequential(h, f"input_blocks.{n}")
        hs.append(h)
    h = sequential(h, "middle_block")
    for n in range(count("output_blocks")):
        h = sequential(torch.cat([h, hs.pop()], dim=1), f"output_blocks.{n}")
    assert not hs
    return conv(F.silu(gn(h, "out.0")), "out.2", padding=1)


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    model = _make_diffusers(CASES[name], seed=len(name))
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = model(x, t, y).sample.numpy()
    sd = _state_dict(model)
    cfg = uw.config_from_diffusers(dict(model.config))
    return dict(name=name, model=model, sd=sd, cfg=cfg, x=x, t=t, y=y, ref=ref,
                params=uw.torch_state_dict_to_params(sd, cfg, "diffusers"))


def test_diffusers_parity(case):
    cfg, sd = case["cfg"], case["sd"]
    if case["name"] == "uncond":
        assert cfg == UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_resolutions=(2,), num_head_channels=16,
                                 use_scale_shift_norm=False, norm_groups=32)
    else:
        assert cfg.num_classes == 4 and cfg.use_scale_shift_norm and cfg.norm_groups == 8
    assert uw.detect_layout(sd) == "diffusers"
    assert uw.infer_config(sd, num_head_channels=16, norm_groups=cfg.norm_groups) == cfg
    print(f"\n{case['name']}:")
    assert_close_to_reference("diffusers UNet2DModel vs ours", _ours(cfg, case["params"], case["x"], case["t"],
                                                  case["y"]), case["ref"])
    # Our diffusers export is the original state dict, bit for bit.
    back = uw.params_to_torch_state_dict(case["params"], cfg, "diffusers")
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_compvis_layout_against_openaimodel_reference(case):
    """CompVis export -> the hand-written openaimodel forward reproduces diffusers' output
    (legacy and new qkv order); import is exact; diffusers' own LDM converter maps every
    non-attention CompVis name back to the original key and finds the attention blocks
    where diffusers has them."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg, params, sd = case["cfg"], case["params"], case["sd"]
    print(f"\n{case['name']}:")
    for order in ("legacy", "new"):
        cv = uw.params_to_torch_state_dict(params, cfg, "compvis", attention_order=order)
        assert uw.detect_layout(cv) == "compvis"
        assert cv["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
        assert cv["middle_block.1.qkv.weight"].shape == (192, 64, 1)
        with torch.no_grad():
            out = _openaimodel_forward(cv, case["x"], case["t"], case["y"], head_channels=16,
                                       scale_shift=cfg.use_scale_shift_norm,
                                       groups=cfg.norm_groups, order=order).numpy()
        assert_close_to_reference(f"openaimodel reference ({order} qkv) vs diffusers", out, case["ref"])
        assert_same_param_trees(uw.torch_state_dict_to_params(cv, cfg, "compvis",
                                                          attention_order=order), params)
        if order == "legacy":
            legacy = cv
    # 4 heads: the two orders store qkv differently (same q/k/v, different interleaving).
    assert not np.array_equal(legacy["middle_block.1.qkv.weight"], cv["middle_block.1.qkv.weight"])
    assert uw.infer_config(legacy, num_head_channels=16, norm_groups=cfg.norm_groups) == cfg

    back = convert_ldm_unet_checkpoint({uw.LDM_PREFIX + k: v for k, v in legacy.items()},
                                       dict(case["model"].config))
    attn_names = {"norm": "group_norm", "qkv": None, "proj_out": None}
    for k, v in back.items():
        mod = k.split(".")[-2]
        if ".attentions." in k and mod in attn_names:  # openaimodel attention, left as is
            if attn_names[mod]:
                np.testing.assert_array_equal(v, sd[k.replace(f".{mod}.", f".{attn_names[mod]}.")])
            continue
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    assert {k for k in sd if ".attentions." not in k} <= set(back)


# ----------------------------------------------------------------------------- round trips


def test_diffusers_export_round_trip(tmp_path):
    """One head per block (attention_head_dim None) with scale-shift ResBlocks: the export
    keeps the mid-block attention's GroupNorm (attn_norm_num_groups)."""
    cfg = UNetConfig(in_channels=3, out_channels=6, model_channels=32, channel_mult=(1, 1, 2),
                     num_res_blocks=2, attention_resolutions=(1, 4), num_head_channels=-1,
                     num_heads=1, use_scale_shift_norm=True, num_classes=3)
    params = _random_params(cfg, seed=3)
    out = uw.export_diffusers(params, cfg, str(tmp_path / "dif"), sample_size=SIZE)
    model, info = diffusers.UNet2DModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                     "error_msgs")), info
    assert model.config.attention_head_dim is None and model.config.num_class_embeds == 4
    assert model.mid_block.attentions[0].group_norm is not None
    sd = _state_dict(model)
    assert_same_param_trees(uw.torch_state_dict_to_params(sd, cfg), params)
    assert uw.infer_config(sd, num_heads=1) == cfg
    legacy = {}  # pre-0.14 diffusers attention names load too
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert "mid_block.attentions.0.proj_attn.weight" in legacy
    assert_same_param_trees(uw.torch_state_dict_to_params(legacy, cfg), params)
    cfg2, back, meta = uw.import_unet(out)  # via the folder's config.json
    assert cfg2 == cfg and meta == {"layout": "diffusers", "source": os.path.abspath(out),
                                    "sample_size": SIZE}
    assert_same_param_trees(back, params)
    g = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(1, 3, 8, 8, generator=g), torch.tensor([999]), torch.tensor([3])
    with torch.no_grad():
        ref = model.eval()(x, t, y).sample.numpy()
    print()
    assert_close_to_reference("exported diffusers model vs ours", _ours(cfg, params, x, t, y), ref)


def test_compvis_files_round_trip(tmp_path):
    """.safetensors (plain and LDM-prefixed), an LDM .ckpt with VAE/EMA/schedule extras (EMA
    copy selectable), and a CompVis YAML config carrying the head layout."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_heads=2, num_head_channels=-1)
    params = _random_params(cfg, seed=1)
    ema = _random_params(cfg, seed=2)
    path = uw.export_compvis(params, cfg, str(tmp_path / "unet.safetensors"))
    sd = uw.load_unet_file(path)
    assert "input_blocks.1.1.qkv.weight" not in sd and "input_blocks.2.0.op.weight" in sd
    assert "output_blocks.1.2.conv.weight" in sd  # level with attention: upsample at index 2
    with pytest.raises(ValueError, match="head layout is not stored"):
        uw.import_unet(path)
    got_cfg, got, meta = uw.import_unet(path, num_heads=2)
    assert got_cfg == cfg and meta["layout"] == "compvis" and meta["attention_order"] == "legacy"
    assert_same_param_trees(got, params)
    # Conv1d projections stored as Linear (out, in) / 1x1 Conv2d (out, in, 1, 1) load too.
    sd["middle_block.1.proj_out.weight"] = sd["middle_block.1.proj_out.weight"][:, :, 0]
    sd["middle_block.1.qkv.weight"] = sd["middle_block.1.qkv.weight"][..., None]
    assert_same_param_trees(uw.torch_state_dict_to_params(sd, cfg), params)

    # An LDM checkpoint: U-Net, its LitEma copy (dots removed), VAE and schedule buffers.
    full = uw.params_to_torch_state_dict(params, cfg, "compvis", prefix=uw.LDM_PREFIX)
    for k, v in uw.params_to_torch_state_dict(ema, cfg, "compvis").items():
        full["model_ema.diffusion_model" + k.replace(".", "")] = v
    full["model_ema.num_updates"] = np.array(7)
    full["first_stage_model.decoder.conv_out.weight"] = np.zeros((3, 8, 3, 3), np.float32)
    full["betas"] = np.zeros(1000)
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in full.items()},
                "global_step": 5}, str(tmp_path / "ldm.ckpt"))
    yaml = pytest.importorskip("yaml")
    ycfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
            "num_heads": 2, "use_scale_shift_norm": True}}}}}
    (tmp_path / "ldm.yaml").write_text(yaml.safe_dump(ycfg))
    for use_ema, want in ((False, params), (True, ema)):
        got_cfg, got, meta = uw.import_unet(str(tmp_path / "ldm.ckpt"),
                                            config=str(tmp_path / "ldm.yaml"), use_ema=use_ema)
        assert got_cfg == cfg and meta["sample_size"] == 16 and meta.get("ema", False) == use_ema
        assert_same_param_trees(got, want)
    # Saved with the "new" order: the YAML's use_new_attention_order selects it.
    uw.export_compvis(params, cfg, str(tmp_path / "new.safetensors"), uw.LDM_PREFIX,
                      attention_order="new")
    ycfg["model"]["params"]["unet_config"]["params"]["use_new_attention_order"] = True
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(ycfg))
    got_cfg, got, meta = uw.import_unet(str(tmp_path / "new.safetensors"),
                                        config=str(tmp_path / "new.yaml"))
    assert meta["attention_order"] == "new"
    assert_same_param_trees(got, params)


# ----------------------------------------------------------------------------- errors


def test_errors_are_listed_together():
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_head_channels=16)
    sd = uw.params_to_torch_state_dict(_random_params(cfg), cfg, "diffusers")
    del sd["mid_block.attentions.0.to_q.weight"]
    sd["up_blocks.1.resnets.0.conv1.weight"] = sd["up_blocks.1.resnets.0.conv1.weight"][:, :8]
    sd["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        uw.torch_state_dict_to_params(sd, cfg)
    msg = str(e.value)
    for part in ("unknown keys ['down_blocks.0.resnets.0.extra.weight']",
                 "missing keys ['mid_block.attentions.0.to_q.weight']",
                 "up_blocks.1.resnets.0.conv1.weight: got (32, 8, 3, 3), expected (32, 96, 3, 3)"):
        assert part in msg, msg
    with pytest.raises(ValueError, match="missing keys"):  # our side too
        uw.params_to_torch_state_dict({"conv_in": {"kernel": np.zeros((3, 3, 4, 32))}}, cfg)

    base = dict(TINY, norm_num_groups=8)
    with pytest.raises(ValueError) as e:
        uw.config_from_diffusers(dict(base, flip_sin_to_cos=False, freq_shift=1,
                                      resnet_time_scale_shift="scale_shift",
                                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")))
    for part in ("flip_sin_to_cos=False", "freq_shift=1", "attn_norm_num_groups=None",
                 "CrossAttnDownBlock2D"):
        assert part in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="not a diffusers UNet2DModel"):
        uw.config_from_diffusers({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="channel_mult\\[0\\]=2 != 1"):
        uw.diffusers_config(UNetConfig(model_channels=32, channel_mult=(2, 4),
                                       attention_resolutions=(1,)))
    with pytest.raises(ValueError, match="cannot tell the layout"):
        uw.torch_state_dict_to_params({"encoder.conv_in.weight": np.zeros(1)}, cfg)
    # diffusers scale-shift model without the mid attention GroupNorm, seen from its weights
    no_norm = {k: v for k, v in sd.items() if not k.startswith("mid_block.attentions.0.group_norm")}
    with pytest.raises(ValueError, match="mid-block attention has no GroupNorm"):
        uw.infer_config(no_norm, num_head_channels=16)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("case", ["class_scale_shift"], indirect=True)
def test_cli_import_export(tmp_path, case):
    from ldm_jax.convert.__main__ import main
    from ldm_jax.pretrained import load_params

    case["model"].save_pretrained(str(tmp_path / "torch"))
    out = tmp_path / "pre"
    assert main(["unet-import", "--src", str(tmp_path / "torch"), "--out", str(out)]) == 0
    cfg_dict, params, _ = load_params(str(out), "unet")
    cfg = UNetConfig.from_dict(cfg_dict)
    assert cfg == case["cfg"]
    print()
    assert_close_to_reference("CLI import vs torch", _ours(cfg, params, case["x"], case["t"], case["y"]), case["ref"])

    assert main(["unet-export", "--src", str(out), "--format", "diffusers",
                 "--out", str(tmp_path / "dif")]) == 0
    with open(tmp_path / "dif" / "config.json") as f:
        assert json.load(f)["sample_size"] == SIZE  # carried through pretrained.json
    model, info = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "dif"),
                                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for k, v in _state_dict(model).items():
        np.testing.assert_array_equal(v, case["sd"][k], err_msg=k)
    with pytest.warns(UserWarning, match="GroupNorm\\(32"):  # 8 groups: not a stock openaimodel
        assert main(["unet-export", "--src", str(out), "--format", "compvis", "--prefix",
                     "--out", str(tmp_path / "cv.safetensors")]) == 0
    assert_same_param_trees(uw.import_unet(str(tmp_path / "cv.safetensors"), config=cfg)[1],
                        case["params"])
    # ... and back through the CLI, the head layout and groups given as flags.
    assert main(["unet-import", "--src", str(tmp_path / "cv.safetensors"), "--num-head-channels",
                 "16", "--norm-groups", "8", "--out", str(tmp_path / "pre2")]) == 0
    cfg_dict2, params2, _ = load_params(str(tmp_path / "pre2"), "unet")
    assert UNetConfig.from_dict(cfg_dict2) == cfg
    assert_same_param_trees(params2, case["params"])

    # An LDM workdir (in/out channels -1 = latent): EMA weights unless --raw.
    from ldm_jax.checkpointing import Checkpointer

    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    model_cfg = dict(uw.config_dict(cfg), in_channels=-1, out_channels=-1, num_classes=4)
    (work / "config.json").write_text(json.dumps({"trainer": "ldm", "model": model_cfg}))
    raw = _random_params(cfg, seed=9)
    ckptr = Checkpointer(str(work))
    ckptr.save(3, {"ema_params": uw.aw._unflatten(uw.aw._flatten(case["params"])), "params": raw,
                   "step": np.int32(3)}, None, {})
    ckptr.close()
    for flag, want in (([], case["params"]), (["--raw"], raw)):
        dst = tmp_path / f"ldm{len(flag)}.safetensors"
        with pytest.warns(UserWarning, match="GroupNorm"):
            assert main(["unet-export", "--src", str(work), "--format", "compvis", "--out",
                         str(dst), *flag]) == 0
        assert_same_param_trees(uw.import_unet(str(dst), config=cfg)[1], want)
    assert main(["unet-import", "--src", str(tmp_path / "nope.ckpt"),
                 "--out", str(tmp_path / "x")]) == 2
