"""KL-f16 autoencoder (CompVis ``autoencoder_kl_16x16x16``): 256x256x3 -> 16x16x16.

Attention at resolution 16 in the encoder's last level and the decoder's first.
Variants: ``:tiny`` (tests), ``:demo`` (embedded photos on CPU).
"""

from ldm_jax import config_lib


def get_config(arg=None):
    c = config_lib.vae_base_config()
    c.name = "vae_f16"
    c.model.ch_mult = (1, 1, 2, 2, 4)
    c.model.z_channels = 16
    c.model.embed_dim = 16
    c.model.attn_resolutions = (16,)
    c = config_lib.with_variant(c, arg)
    if arg == "tiny":
        # 64x64 input (4x4 latents) with attention at the 8x8 level, as f16 has at 16x16.
        c.model.ch_mult = (1, 1, 1, 1, 2)
        c.model.resolution = 64
        c.model.attn_resolutions = (8,)
    elif arg == "demo":
        c.model.attn_resolutions = (8,)
    return c
