"""KL-regularised autoencoder of Latent Diffusion (CompVis ``AutoencoderKL``), Flax NNX.

Module and attribute names mirror the CompVis layout (``encoder.down[i].block[j]``,
``decoder.mid.attn_1``, ``quant_conv``...) so that weight conversion is a renaming.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import (AttnBlock, Downsample, GroupNorm, ResnetBlock, Upsample, conv,
                                   remat_policy)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of an ``AutoencoderKL`` (defaults: SD / CompVis KL-f8)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    dropout: float = 0.0
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    remat: bool = False
    # what a rematerialised ResnetBlock keeps: "full" (nothing) or "minimal"
    # (ldm_jax.models.layers.remat_policy)
    remat_policy: str = "full"

    def __post_init__(self):
        remat_policy(self.remat_policy)  # raises for an unknown name

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: Any) -> "AutoencoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(d).items() if k in names}
        for k in ("ch_mult", "attn_resolutions"):
            if k in kwargs:
                kwargs[k] = tuple(int(v) for v in kwargs[k])
        return cls(**kwargs)


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) from encoder moments [..., 2*C] (mean, logvar).

    The log-variance is clamped to [-30, 20]; KL is taken against N(0, I), summed over
    all non-batch dimensions, in float32.
    """

    def __init__(self, moments: jax.Array):
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        self.mean = mean
        self.logvar = jnp.clip(logvar, -30.0, 20.0)
        self.std = jnp.exp(0.5 * self.logvar)
        self.var = jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.reparameterize(jax.random.normal(key, self.mean.shape, jnp.float32))

    def reparameterize(self, eps: jax.Array) -> jax.Array:
        """``mean + std * eps`` for standard normal noise ``eps`` of the latent shape."""
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)


def _maybe_remat(block: nnx.Module, x: jax.Array, remat: str | None) -> jax.Array:
    """``block(x)``, rematerialised under the policy named ``remat`` (None: not at all)."""
    if remat is None:
        return block(x)
    return nnx.remat(lambda m, h: m(h), policy=remat_policy(remat))(block, x)


class _Level(nnx.Module):
    """One resolution level: ResnetBlocks, optional attention after each, optional resampler."""

    def __init__(self, blocks, attns, resample):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        if resample is not None:
            # Attribute names follow CompVis: encoder levels "downsample", decoder "upsample".
            setattr(self, "downsample" if isinstance(resample, Downsample) else "upsample", resample)

    def __call__(self, h: jax.Array, remat: str | None) -> jax.Array:
        """ResnetBlocks (each followed by its attention, if any), then the resampler."""
        for j, block in enumerate(self.block):
            h = _maybe_remat(block, h, remat)
            if len(self.attn):
                h = self.attn[j](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class _Mid(nnx.Module):
    def __init__(self, ch: int, kw: dict, rngs: nnx.Rngs, dropout: float):
        self.block_1 = ResnetBlock(ch, ch, dropout=dropout, rngs=rngs, **kw)
        self.attn_1 = AttnBlock(ch, rngs=rngs, **kw)
        self.block_2 = ResnetBlock(ch, ch, dropout=dropout, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, remat: str | None) -> jax.Array:
        x = _maybe_remat(self.block_1, x, remat)
        x = self.attn_1(x)
        return _maybe_remat(self.block_2, x, remat)


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.remat = cfg.remat
        self.remat_policy = cfg.remat_policy
        self.conv_in = conv(cfg.in_channels, cfg.ch, 3, rngs=rngs, **kw)
        res = cfg.resolution
        in_mult = (1,) + tuple(cfg.ch_mult)
        levels = []
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_in = cfg.ch * in_mult[i]
            block_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=cfg.dropout, rngs=rngs, **kw))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, rngs=rngs, **kw))
            down = None
            if i != len(cfg.ch_mult) - 1:
                down = Downsample(block_in, rngs=rngs, **kw)
                res //= 2
            levels.append(_Level(blocks, attns, down))
        self.down = nnx.List(levels)
        self.mid = _Mid(block_in, kw, rngs, cfg.dropout)
        self.norm_out = GroupNorm(block_in, **kw)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = conv(block_in, z_out, 3, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        remat = self.remat_policy if self.remat else None
        for level in self.down:
            h = level(h, remat)
        h = self.mid(h, remat)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.remat = cfg.remat
        self.remat_policy = cfg.remat_policy
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = conv(cfg.z_channels, block_in, 3, rngs=rngs, **kw)
        self.mid = _Mid(block_in, kw, rngs, cfg.dropout)
        levels: list = [None] * len(cfg.ch_mult)
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=cfg.dropout, rngs=rngs, **kw))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, rngs=rngs, **kw))
            up = None
            if i != 0:
                up = Upsample(block_in, rngs=rngs, **kw)
                res *= 2
            levels[i] = _Level(blocks, attns, up)
        # up[i] is the level at downsampling factor 2**i, as in CompVis (run in reverse).
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, **kw)
        self.conv_out = conv(block_in, cfg.out_channels, 3, rngs=rngs, **kw)

    def features(self, z: jax.Array) -> jax.Array:
        """Everything up to (not including) ``conv_out``: the input of the last layer."""
        h = self.conv_in(z)
        remat = self.remat_policy if self.remat else None
        h = self.mid(h, remat)
        for level in reversed(self.up):
            h = level(h, remat)
        return jax.nn.silu(self.norm_out(h))

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(self.features(z))


class AutoencoderKL(nnx.Module):
    """Encoder -> 1x1 quant_conv -> diagonal Gaussian -> 1x1 post_quant_conv -> Decoder."""

    def __init__(self, cfg: AutoencoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not cfg.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (mean and log-variance)")
        if cfg.resolution % cfg.downsample_factor:
            raise ValueError(
                f"resolution {cfg.resolution} is not divisible by the downsampling factor "
                f"{cfg.downsample_factor} of ch_mult={tuple(cfg.ch_mult)}"
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.dtype = dtype
        self.encoder = Encoder(cfg, rngs=rngs, **kw)
        self.decoder = Decoder(cfg, rngs=rngs, **kw)
        self.quant_conv = conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, rngs=rngs, **kw)
        self.post_quant_conv = conv(cfg.embed_dim, cfg.z_channels, 1, rngs=rngs, **kw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x))

    def encode_moments(self, x: jax.Array) -> jax.Array:
        return self.quant_conv(self.encoder(x.astype(self.dtype)))

    def decode_features(self, z: jax.Array) -> jax.Array:
        return self.decoder.features(self.post_quant_conv(z.astype(self.dtype)))

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder.conv_out(self.decode_features(z))

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruct ``x``; samples the posterior when ``key`` is given, else uses its mode."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior
