"""KL-f8 autoencoder (SD ``autoencoder_kl_32x32x4``): 256x256x3 -> 32x32x4, VAE-GAN recipe.

Variants: ``configs/vae_f8.py`` (full recipe), ``:tiny`` (seconds on CPU, tests),
``:demo`` (embedded photos, visible progress in minutes on CPU).
"""

from ldm_jax import config_lib


def get_config(arg=None):
    c = config_lib.vae_base_config()
    c.name = "vae_f8"
    return config_lib.with_variant(c, arg)
