"""ldm-jax: Latent Diffusion in JAX/Flax NNX."""

__version__ = "0.1.0"


def quiet_library_logs() -> None:
    """For the command-line tools, which log at INFO: libraries that log their internals at
    INFO (orbax's checkpoint manager through absl, jax probing for a TPU) log only
    warnings and errors."""
    import logging

    for name in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
