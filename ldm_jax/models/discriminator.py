"""PatchGAN discriminator (``NLayerDiscriminator`` of pix2pix / taming-transformers), NNX.

4x4 convolutions with padding 1: a stride-2 input conv + LeakyReLU(0.2), ``n_layers - 1``
more stride-2 convs and one stride-1 conv, each without bias and followed by BatchNorm
and LeakyReLU, then a stride-1 conv to one logit per patch (30x30 at 256x256 input with
3 layers). Conv kernels ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02).

BatchNorm uses batch statistics in training mode. Inside a jitted step over a batch
sharded across the mesh these statistics are global (XLA inserts the reductions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import conv


def _normal_init(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


class NLayerDiscriminator(nnx.Module):
    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        pad = ((1, 1), (1, 1))
        kinit = _normal_init(0.0, 0.02)
        kw = dict(dtype=dtype, param_dtype=param_dtype, padding=pad, kernel_init=kinit)
        self.dtype = dtype
        self.conv_in = conv(in_channels, ndf, 4, stride=2, rngs=rngs, **kw)
        convs, norms = [], []
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            convs.append(conv(ndf * prev, ndf * mult, 4, stride=stride, use_bias=False,
                              rngs=rngs, **kw))
            norms.append(
                nnx.BatchNorm(
                    ndf * mult,
                    momentum=0.9,  # = PyTorch BatchNorm2d momentum 0.1
                    epsilon=1e-5,
                    dtype=jnp.float32,
                    param_dtype=param_dtype,
                    scale_init=_normal_init(1.0, 0.02),
                    rngs=rngs,
                )
            )
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.conv_out = conv(ndf * mult, 1, 4, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Patch logits [B, h, w, 1] in float32."""
        h = jax.nn.leaky_relu(self.conv_in(x.astype(self.dtype)), 0.2)
        for c, n in zip(self.convs, self.norms):
            h = jax.nn.leaky_relu(n(c(h)).astype(self.dtype), 0.2)
        return self.conv_out(h).astype(jnp.float32)
