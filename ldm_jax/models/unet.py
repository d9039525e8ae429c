"""ADM / CompVis-``openaimodel``-style diffusion U-Net in Flax NNX (NHWC throughout).

The network (``UNet``), for ``L = len(channel_mult)`` levels with widths
``w_i = model_channels * channel_mult[i]`` and downsampling factor ``ds = 2**i`` at level i::

    t --sinusoid(model_channels)--> Linear -> SiLU -> Linear  (= emb, 4*model_channels)
    y --Embed(num_classes + 1)--> added to emb                  (row num_classes = NULL class)
    x -> conv_in (3x3)
      -> level i = 0..L-1: num_res_blocks x [ResBlock (+ attention if ds in attention_resolutions)]
                           then Downsample (3x3 conv, stride 2, padding 1) unless i = L-1
      -> middle: ResBlock, attention, ResBlock
      -> level i = L-1..0: (num_res_blocks + 1) x [concat skip -> ResBlock (+ attention)]
                           then Upsample (nearest x2, 3x3 conv) unless i = 0
      -> GroupNorm -> SiLU -> conv_out (3x3)

Every intermediate output of the down path (conv_in, each ResBlock/attention pair, each
Downsample) is a skip connection, consumed last-in-first-out by the up path's ResBlocks.

ResBlock (``use_scale_shift_norm``): ``h = conv1(SiLU(GN(x)))``; ``e = Linear(SiLU(emb))``
with ``2*out`` features split into ``(scale, shift)`` (scale first); ``h = GN(h)*(1+scale)+shift``
then SiLU, dropout, ``conv2``; without scale-shift: ``h = GN(h + e)`` then SiLU, dropout,
``conv2``. A 1x1 ``conv_shortcut`` maps the input when the width changes. ``conv2``, the
attention output projection and ``conv_out`` start at zero (as in ADM), so a fresh U-Net
outputs exactly zero.

Attention: GroupNorm, separate q/k/v ``Linear(ch, ch)`` over the ``H*W`` tokens, heads of
``num_head_channels`` channels (or ``num_heads`` heads when ``num_head_channels == -1``),
``jax.nn.dot_product_attention`` (BTNH, ``implementation=None``; logits and softmax in
float32), output ``Linear``, residual add. In JAX 0.10/0.11 ``implementation=None`` always
takes the XLA path (cuDNN only when asked for by name): ``attention_impl`` ("auto",
"xla", "cudnn") picks it. For 32x32 latents on one H100 (jax 0.11.2, bf16, batch 64,
forward + backward of the 270M config) forcing "cudnn" changed nothing measurable (35.8
vs 36.0 ms), though compiled for an H100 it moves 25% fewer bytes per training step (the
float32 score gradients are not materialised) and needs 1.9 GB less memory; the switch
is there to measure it again, and for larger latents where attention costs more.

Numerics: ``dtype`` is the compute dtype (bf16 on accelerators) with ``param_dtype`` master
weights; GroupNorm statistics, the sinusoidal embedding and attention softmax run in float32.

Mapping to diffusers ``UNet2DModel``
------------------------------------
Attribute names follow diffusers, so converting weights is a renaming plus layout changes.
The matching diffusers configuration is::

    UNet2DModel(in_channels, out_channels,
                block_out_channels=[model_channels * m for m in channel_mult],
                layers_per_block=num_res_blocks,
                down_block_types=["AttnDownBlock2D" if 2**i in attention_resolutions
                                  else "DownBlock2D" for i in range(L)],
                up_block_types=reversed list with "AttnUpBlock2D" / "UpBlock2D",
                time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
                resnet_time_scale_shift="scale_shift" if use_scale_shift_norm else "default",
                attention_head_dim=num_head_channels, norm_num_groups=norm_groups,
                attn_norm_num_groups=norm_groups,   # see note (a)
                norm_eps=norm_eps, downsample_padding=1, dropout=dropout,
                num_class_embeds=num_classes + 1 (or None), act_fn="silu")

Parameter paths (ours -> diffusers ``state_dict`` keys)::

    conv_in.{kernel,bias}                           conv_in.{weight,bias}
    time_embedding.linear_{1,2}.{kernel,bias}       time_embedding.linear_{1,2}.{weight,bias}
    class_embedding.embedding                       class_embedding.weight
    down_blocks[i].resnets[j].<R>                   down_blocks.i.resnets.j.<R>
    down_blocks[i].attentions[j].<A>                down_blocks.i.attentions.j.<A>
    down_blocks[i].downsamplers[0].conv.*           down_blocks.i.downsamplers.0.conv.*
    mid_block.resnets[0|1].<R>, attentions[0].<A>   mid_block.resnets.0|1, mid_block.attentions.0
    up_blocks[k].resnets[j].<R>                     up_blocks.k.resnets.j.<R>   (k = L-1-level)
    up_blocks[k].attentions[j].<A>                  up_blocks.k.attentions.j.<A>
    up_blocks[k].upsamplers[0].conv.*               up_blocks.k.upsamplers.0.conv.*
    conv_norm_out.{scale,bias}                      conv_norm_out.{weight,bias}
    conv_out.*                                      conv_out.*
  <R>: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut (same names)
  <A>: group_norm, to_q, to_k, to_v, to_out        group_norm, to_q, to_k, to_v, to_out.0

Layouts: conv ``kernel`` is OHWI (torch OIHW: ``w.transpose(0, 2, 3, 1)``; see layers); ``Linear.kernel``
is (in, out) (torch (out, in): ``w.T``); GroupNorm ``scale`` is torch ``weight``. Like
diffusers, ``up_blocks[0]`` is the deepest (lowest-resolution) level.

Notes: (a) diffusers' ``UNetMidBlock2D`` drops the GroupNorm of its attention when
``resnet_time_scale_shift != "default"`` unless ``attn_norm_num_groups`` is set; ADM (and this
module) always normalises, so set ``attn_norm_num_groups=norm_groups``. (b) diffusers has a
single ``attention_head_dim``, so only ``num_head_channels > 0`` configs map 1:1.
(c) CompVis ``openaimodel`` checkpoints use ``input_blocks.N`` / ``middle_block`` /
``output_blocks.N`` numbering, a fused ``qkv`` 1x1 conv with the legacy per-head
[q|k|v] interleaving, ``emb_layers.1`` for ``time_emb_proj``, ``in_layers.{0,2}`` /
``out_layers.{0,3}`` for norm1/conv1/norm2/conv2 and ``skip_connection`` for
``conv_shortcut``; the same tensors, regrouped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax.config_lib import REMAT_POLICIES
from ldm_jax.models.layers import GroupNorm, Upsample, conv, remat_policy

Dtype = Any


# ------------------------------------------------------------------------------ config


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a ``UNet`` (defaults: the "~270M" ADM-style latent model, in fact
    285,714,020 parameters unconditional, +1001·896 for 1000 classes; ``count_params``).

    ``attention_resolutions`` holds downsampling *factors*: level i (``ds = 2**i``) gets
    self-attention after each ResBlock when ``2**i`` is listed; the middle block always has
    attention. ``num_classes=None`` (or 0 through ``from_dict``) is unconditional; an int N
    makes the model class-conditional with N + 1 label rows, row N being the NULL class of
    classifier-free guidance.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 224
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (2, 4, 8)
    num_head_channels: int = 32
    num_heads: int = -1
    dropout: float = 0.0
    num_classes: int | None = None
    use_scale_shift_norm: bool = True
    norm_eps: float = 1e-5
    norm_groups: int = 32
    remat: bool = False
    # what a rematerialised block keeps: "full" (nothing) or "minimal" (conv / projection
    # outputs and norm statistics: ldm_jax.models.layers.remat_policy)
    remat_policy: str = "full"
    # jax.nn.dot_product_attention implementation: "auto" (JAX picks: the XLA path on jax
    # 0.10-0.11), "xla", or "cudnn" (fused flash attention; CUDA GPUs only).
    attention_impl: str = "auto"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("channel_mult", tuple(int(m) for m in self.channel_mult))
        set_("attention_resolutions", tuple(int(a) for a in self.attention_resolutions))
        if self.num_classes is not None:
            set_("num_classes", int(self.num_classes) or None)
        self._validate()

    # -- derived quantities
    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def emb_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def null_label(self) -> int | None:
        """Label index of the NULL (unconditional) class, or None for unconditional models."""
        return self.num_classes

    def level_has_attention(self, level: int) -> bool:
        return 2**level in self.attention_resolutions

    def heads(self, ch: int) -> int:
        return ch // self.num_head_channels if self.num_head_channels > 0 else self.num_heads

    def _validate(self) -> None:
        errors = []
        if self.in_channels < 1 or self.out_channels < 1:
            errors.append(
                f"in_channels={self.in_channels} and out_channels={self.out_channels} must be "
                ">= 1 (resolve -1 = 'latent channels' before building the U-Net)")
        if self.model_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            errors.append(f"model_channels={self.model_channels} and channel_mult="
                          f"{self.channel_mult} must be positive and non-empty")
        if self.num_res_blocks < 1:
            errors.append(f"num_res_blocks={self.num_res_blocks} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 0:
            errors.append(f"num_classes={self.num_classes} must be >= 0 (0/None: unconditional)")
        if self.norm_eps <= 0:
            errors.append(f"norm_eps={self.norm_eps} must be > 0")
        if self.norm_groups < 1:
            errors.append(f"norm_groups={self.norm_groups} must be >= 1")
        if self.attention_impl not in ATTENTION_IMPLS:
            errors.append(f"attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            errors.append(f"remat_policy={self.remat_policy!r} must be one of {REMAT_POLICIES}")
        if errors:  # the checks below assume sane basics
            raise ValueError("invalid UNetConfig:\n  " + "\n  ".join(errors))
        levels = len(self.channel_mult)
        factors = [2**i for i in range(levels)]
        bad = [a for a in self.attention_resolutions if a not in factors]
        if bad:
            errors.append(
                f"attention_resolutions {self.attention_resolutions} are downsampling factors; "
                f"{bad} match no level (this channel_mult has factors {factors})")
        widths = (self.model_channels,) + self.widths
        if any(w % self.norm_groups for w in widths):
            errors.append(f"channel widths {sorted(set(widths))} must all be multiples of "
                          f"norm_groups={self.norm_groups}")
        attn_widths = sorted({w for i, w in enumerate(self.widths) if self.level_has_attention(i)}
                             | {self.widths[-1]})  # the middle block always attends
        if self.num_head_channels > 0:
            bad_w = [w for w in attn_widths if w % self.num_head_channels]
            if bad_w:
                errors.append(f"attention widths {bad_w} are not multiples of "
                              f"num_head_channels={self.num_head_channels}")
        elif self.num_head_channels == -1:
            if self.num_heads < 1:
                errors.append("num_head_channels=-1 needs num_heads >= 1")
            elif any(w % self.num_heads for w in attn_widths):
                errors.append(f"attention widths {attn_widths} are not divisible into "
                              f"num_heads={self.num_heads} heads")
        else:
            errors.append(f"num_head_channels={self.num_head_channels} must be > 0 or -1 "
                          "(then num_heads sets the head count)")
        if errors:
            raise ValueError("invalid UNetConfig:\n  " + "\n  ".join(errors))

    @classmethod
    def from_dict(cls, d: Any) -> "UNetConfig":
        """Build from a dict / ``ConfigDict``; keys that are not fields are ignored,
        sequences become tuples, ``num_classes`` 0 means unconditional."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(d).items() if k in names}
        for k in ("channel_mult", "attention_resolutions"):
            if k in kwargs:
                kwargs[k] = tuple(int(v) for v in kwargs[k])
        if kwargs.get("num_classes") is not None:
            kwargs["num_classes"] = int(kwargs["num_classes"]) or None
        return cls(**kwargs)


# ------------------------------------------------------------------------------ embedding


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` (shape (B,)) -> (B, dim).

    ``[cos(t*f), sin(t*f)]`` with ``f_k = exp(-log(max_period) * k / (dim // 2))``, float32;
    an odd ``dim`` gets one zero column. Identical to openaimodel's ``timestep_embedding`` and
    to diffusers' with ``flip_sin_to_cos=True, downscale_freq_shift=0``.
    """
    half = dim // 2
    t = jnp.asarray(t, jnp.float32).reshape(-1)
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout, functional: active only with a key and a positive rate."""
    if key is None or rate <= 0.0:
        return h
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / jnp.asarray(1.0 - rate, h.dtype), jnp.zeros((), h.dtype))


def _zeros_linear(din: int, dout: int, kw: dict, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, kernel_init=nnx.initializers.zeros_init(), rngs=rngs, **kw)


# ------------------------------------------------------------------------------ blocks


class TimestepEmbedding(nnx.Module):
    """``Linear(model_channels -> 4*mc)``, SiLU, ``Linear(4*mc -> 4*mc)``."""

    def __init__(self, din: int, dout: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = nnx.Linear(din, dout, rngs=rngs, **kw)
        self.linear_2 = nnx.Linear(dout, dout, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResBlock(nnx.Module):
    """Timestep-conditioned residual block (ADM ``ResBlock`` / diffusers ``ResnetBlock2D``)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, groups: int, eps: float,
                 dropout: float, scale_shift: bool, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.dropout = float(dropout)
        self.scale_shift = bool(scale_shift)
        self.norm1 = GroupNorm(in_ch, groups, epsilon=eps, **kw)
        self.conv1 = conv(in_ch, out_ch, 3, rngs=rngs, **kw)
        self.time_emb_proj = nnx.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch,
                                        rngs=rngs, **kw)
        self.norm2 = GroupNorm(out_ch, groups, epsilon=eps, **kw)
        self.conv2 = conv(out_ch, out_ch, 3, kernel_init=nnx.initializers.zeros_init(),
                          rngs=rngs, **kw)
        self.conv_shortcut = conv(in_ch, out_ch, 1, rngs=rngs, **kw) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        e = self.time_emb_proj(jax.nn.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = _dropout(jax.nn.silu(h), self.dropout, key)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nnx.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, num_heads: int, *, groups: int, eps: float, dtype=jnp.float32,
                 param_dtype=jnp.float32, impl: str = "auto", rngs: nnx.Rngs):
        if ch % num_heads:
            raise ValueError(f"attention width {ch} is not divisible into {num_heads} heads")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.num_heads = num_heads
        self.impl = None if impl == "auto" else impl
        self.group_norm = GroupNorm(ch, groups, epsilon=eps, **kw)
        self.to_q = nnx.Linear(ch, ch, rngs=rngs, **kw)
        self.to_k = nnx.Linear(ch, ch, rngs=rngs, **kw)
        self.to_v = nnx.Linear(ch, ch, rngs=rngs, **kw)
        self.to_out = _zeros_linear(ch, ch, kw, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        n = self.num_heads
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (m(tokens).reshape(b, h * w, n, c // n)
                   for m in (self.to_q, self.to_k, self.to_v))
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
        return x + self.to_out(out.reshape(b, h * w, c)).reshape(b, h, w, c)


class Downsample(nnx.Module):
    """3x3 conv with stride 2 and symmetric one-pixel zero padding (ADM / diffusers padding=1)."""

    def __init__(self, ch: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, stride=2, padding=((1, 1), (1, 1)), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class _Ctx:
    """Per-call state threaded through the blocks: embedding, remat policy (None: no remat),
    dropout keys."""

    def __init__(self, emb: jax.Array, remat: str | None, dropout_key: jax.Array | None):
        self.emb = emb
        self.remat = remat
        self.key = dropout_key
        self.count = 0

    def next_key(self) -> jax.Array | None:
        if self.key is None:
            return None
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def res(self, block: ResBlock, h: jax.Array) -> jax.Array:
        key = self.next_key()
        if self.remat is None:
            return block(h, self.emb, key)
        return nnx.remat(lambda m, x, e, k: m(x, e, k),
                         policy=remat_policy(self.remat))(block, h, self.emb, key)

    def attn(self, block: AttentionBlock, h: jax.Array) -> jax.Array:
        if self.remat is None:
            return block(h)
        return nnx.remat(lambda m, x: m(x), policy=remat_policy(self.remat))(block, h)


class DownBlock(nnx.Module):
    """One down level: ResBlocks (each followed by attention, if any), optional Downsample.

    ``__call__`` returns the level output and its skip tensors (one per ResBlock, and the
    Downsample output)."""

    def __init__(self, resnets, attentions, downsample):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions)
        self.downsamplers = nnx.List([downsample] if downsample is not None else [])

    def __call__(self, h: jax.Array, ctx: _Ctx) -> tuple[jax.Array, list]:
        skips = []
        for j, res in enumerate(self.resnets):
            h = ctx.res(res, h)
            if len(self.attentions):
                h = ctx.attn(self.attentions[j], h)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class MidBlock(nnx.Module):
    def __init__(self, resnets, attention):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([attention])

    def __call__(self, h: jax.Array, ctx: _Ctx) -> jax.Array:
        h = ctx.res(self.resnets[0], h)
        h = ctx.attn(self.attentions[0], h)
        return ctx.res(self.resnets[1], h)


class UpBlock(nnx.Module):
    """One up level: (num_res_blocks + 1) x [concat skip, ResBlock, attention?], Upsample?"""

    def __init__(self, resnets, attentions, upsample):
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attentions)
        self.upsamplers = nnx.List([upsample] if upsample is not None else [])

    def __call__(self, h: jax.Array, skips: list, ctx: _Ctx) -> jax.Array:
        for j, res in enumerate(self.resnets):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = ctx.res(res, h)
            if len(self.attentions):
                h = ctx.attn(self.attentions[j], h)
        for up in self.upsamplers:
            h = up(h)
        return h


# ------------------------------------------------------------------------------ U-Net


class UNet(nnx.Module):
    """Diffusion U-Net: ``(x NHWC, t (B,), y (B,) | None) -> output shaped like x``."""

    def __init__(self, cfg: UNetConfig, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        norm = dict(groups=cfg.norm_groups, eps=cfg.norm_eps)
        self.config = cfg
        self.dtype = dtype
        mc, emb_dim = cfg.model_channels, cfg.emb_dim
        levels = len(cfg.channel_mult)

        def resblock(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout=cfg.dropout,
                            scale_shift=cfg.use_scale_shift_norm, rngs=rngs, **norm, **kw)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.heads(ch), impl=cfg.attention_impl, rngs=rngs, **norm, **kw)

        self.time_embedding = TimestepEmbedding(mc, emb_dim, rngs=rngs, **kw)
        self.class_embedding = (
            nnx.Embed(cfg.num_classes + 1, emb_dim, rngs=rngs, **kw)
            if cfg.num_classes is not None else None
        )
        self.conv_in = conv(cfg.in_channels, mc, 3, rngs=rngs, **kw)

        ch = mc
        skip_chs = [ch]
        down_blocks = []
        for i, w in enumerate(cfg.widths):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(resblock(ch, w))
                ch = w
                if cfg.level_has_attention(i):
                    attns.append(attention(ch))
                skip_chs.append(ch)
            down = None
            if i != levels - 1:
                down = Downsample(ch, rngs=rngs, **kw)
                skip_chs.append(ch)
            down_blocks.append(DownBlock(resnets, attns, down))
        self.down_blocks = nnx.List(down_blocks)

        self.mid_block = MidBlock([resblock(ch, ch), resblock(ch, ch)], attention(ch))

        up_blocks = []
        for i in reversed(range(levels)):
            w = cfg.widths[i]
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(resblock(ch + skip_chs.pop(), w))
                ch = w
                if cfg.level_has_attention(i):
                    attns.append(attention(ch))
            up = Upsample(ch, rngs=rngs, **kw) if i != 0 else None
            up_blocks.append(UpBlock(resnets, attns, up))
        assert not skip_chs, skip_chs
        # up_blocks[0] is the deepest level, as in diffusers.
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = GroupNorm(ch, cfg.norm_groups, epsilon=cfg.norm_eps, **kw)
        self.conv_out = conv(ch, cfg.out_channels, 3, kernel_init=nnx.initializers.zeros_init(),
                             rngs=rngs, **kw)

    def embed(self, t: jax.Array, y: jax.Array | None, batch: int) -> jax.Array:
        """Timestep (+ class) embedding, (B, 4*model_channels) in the compute dtype."""
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (batch,))
        emb = self.time_embedding(timestep_embedding(t, cfg.model_channels).astype(self.dtype))
        if self.class_embedding is not None:
            if y is None:
                y = jnp.full((batch,), cfg.num_classes, jnp.int32)
            emb = emb + self.class_embedding(jnp.asarray(y, jnp.int32))
        elif y is not None:
            raise ValueError("labels y were given to an unconditional U-Net (num_classes=None)")
        return emb

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """``x`` (B, H, W, in_channels); ``t`` (B,) int or float timesteps (or a scalar);
        ``y`` (B,) int labels, or None: the NULL class on a class-conditional model.
        Dropout is applied only when ``dropout_key`` is given (and ``dropout > 0``)."""
        cfg = self.config
        b, hh, ww, _ = x.shape
        if hh % cfg.downsample_factor or ww % cfg.downsample_factor:
            raise ValueError(f"input {hh}x{ww} is not divisible by the U-Net's downsampling "
                             f"factor {cfg.downsample_factor}")
        ctx = _Ctx(self.embed(t, y, b), cfg.remat_policy if cfg.remat else None,
                   dropout_key if cfg.dropout > 0 else None)
        h = self.conv_in(x.astype(self.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, ctx)
            skips.extend(s)
        h = self.mid_block(h, ctx)
        for block in self.up_blocks:
            h = block(h, skips, ctx)
        h = jax.nn.silu(self.conv_norm_out(h))
        return self.conv_out(h)


def count_params(cfg: UNetConfig) -> int:
    """Number of parameters of ``UNet(cfg)``, computed abstractly (no memory, no FLOPs)."""
    model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


def attention_layout(cfg: UNetConfig) -> list[dict]:
    """Per down level: width, downsampling factor, whether it attends and with how many heads."""
    out = []
    for i, w in enumerate(cfg.widths):
        att = cfg.level_has_attention(i)
        out.append(dict(level=i, ds=2**i, width=w, attention=att,
                        heads=cfg.heads(w) if att else 0))
    out.append(dict(level="mid", ds=cfg.downsample_factor, width=cfg.widths[-1], attention=True,
                    heads=cfg.heads(cfg.widths[-1])))
    return out
