"""Pixel-space diffusion baseline: the LDM U-Net on 3-channel images (no autoencoder).

Same U-Net and optimiser as ``configs/ldm_f8.py`` (DDPM's linear schedule); the comparison
of the two (throughput, memory, sample quality for the same budget) is
``python -m ldm_jax.compare`` (README, *Evaluate*). At 256x256 the attention
factors (2, 4, 8) mean 128x128-token attention: that cost is the point of the comparison.
Variants: ``:tiny`` (tests), ``:demo`` (embedded photos at 32x32 on CPU).
"""

from ldm_jax import config_lib


def get_config(arg=None):
    c = config_lib.ldm_base_config()
    c.name = "pixel"
    c.space = "pixel"
    c.diffusion.schedule = "linear"  # DDPM's 1e-4 -> 0.02, the usual pixel-space schedule
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c = config_lib.with_variant(c, arg, config_lib.LDM_VARIANTS)
    if arg == "demo":
        c.image_resolution = 32
    return c
