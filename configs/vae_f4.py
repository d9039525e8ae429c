"""KL-f4 autoencoder (CompVis ``autoencoder_kl_64x64x3``): 256x256x3 -> 64x64x3.

Variants: ``:tiny`` (tests), ``:demo`` (embedded photos on CPU).
"""

from ldm_jax import config_lib


def get_config(arg=None):
    c = config_lib.vae_base_config()
    c.name = "vae_f4"
    c.model.ch_mult = (1, 2, 4)
    c.model.z_channels = 3
    c.model.embed_dim = 3
    c = config_lib.with_variant(c, arg)
    if arg == "tiny":
        c.model.ch_mult = (1, 2, 2)
    return c
