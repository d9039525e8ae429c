"""Latent diffusion on a frozen KL-f8 autoencoder: 32x32x4 latents of 256x256 images.

  python train.py --config=configs/ldm_f8.py --config.autoencoder_path=workdirs/vae_f8
  python train.py --config=configs/ldm_f8.py:demo   # after configs/vae_f8.py:demo has run

The autoencoder comes from a VAE-GAN workdir or a converted checkpoint (e.g. the SD VAE:
``python -m ldm_jax.convert autoencoder-import ...``; then set latent.scale_factor=0.18215).
Variants: ``:tiny`` (tests; needs autoencoder_path), ``:demo`` (embedded photos, uses
``workdirs/vae_f8_demo`` by default, class-conditional on the 9 photos).
"""

from ldm_jax import config_lib


def get_config(arg=None):
    c = config_lib.ldm_base_config()
    c.name = "ldm_f8"
    c = config_lib.with_variant(c, arg, config_lib.LDM_VARIANTS)
    if arg == "demo":
        c.autoencoder_path = "workdirs/vae_f8_demo"
    return c
