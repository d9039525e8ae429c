"""Tiled decoding: exact where one tile covers the latent, exact blending for a local
decoder, and close to full decoding for a real (tiny) autoencoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldm_jax import tiling
from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL


def test_tile_starts_cover_with_overlap():
    assert tiling.tile_starts(8, 16, 4) == [0]
    s = tiling.tile_starts(40, 16, 4)
    assert s[0] == 0 and s[-1] == 24
    assert all(b - a <= 12 for a, b in zip(s, s[1:]))  # stride tile - overlap: overlap >= 4
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_starts(40, 16, 16)


def test_local_decoder_blends_exactly():
    """A decoder whose output pixel depends only on its own latent (nearest upsample of a
    1x1 map) must come out identical whatever the tiling: blend weights sum to one."""
    f = 4
    w = jax.random.normal(jax.random.PRNGKey(0), (4, 3))

    def dec(z):
        y = jnp.einsum("bhwc,cd->bhwd", z, w)
        return jnp.repeat(jnp.repeat(y, f, 1), f, 2)

    z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 21, 13, 4)))
    full = np.asarray(dec(jnp.asarray(z)))
    for tile, overlap in [(8, 2), (8, 4), (5, 1), (13, 3)]:
        tiled = tiling.decode_tiled(jax.jit(dec), z, factor=f, tile=tile, overlap=overlap, tiles_per_call=3)
        np.testing.assert_allclose(tiled, full, atol=1e-5)


def test_sharded_tiles_split_over_the_mesh_and_blend_the_same():
    """With a batch sharding every call's tiles are split over the 8 devices (tiles per call
    rounded up to a multiple of 8), and the blended result is the unsharded one."""
    from ldm_jax import sharding

    mesh = sharding.make_mesh(dict(data=-1, fsdp=1))
    batch_sh = sharding.batch_sharding(mesh)
    f = 2
    w = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    jitted = jax.jit(lambda z: jnp.repeat(jnp.repeat(jnp.einsum("bhwc,cd->bhwd", z, w), f, 1), f, 2))
    seen = []

    def dec(tiles):
        seen.append((tiles.shape[0], tiles.sharding))
        return jitted(tiles)

    z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 20, 14, 4)))
    plain = tiling.decode_tiled(jitted, z, factor=f, tile=8, overlap=2, tiles_per_call=3)
    split = tiling.decode_tiled(dec, z, factor=f, tile=8, overlap=2, tiles_per_call=3, sharding=batch_sh)
    np.testing.assert_array_equal(split, plain)
    n_tiles = 3 * len(tiling.tile_starts(20, 8, 2)) * len(tiling.tile_starts(14, 8, 2))
    assert len(seen) == -(-n_tiles // 8)
    for n, sh in seen:
        assert n == 8 and sh.is_equivalent_to(batch_sh, 4)
    assert tiling._shard_count(sharding.replicated(mesh)) == 1


@pytest.fixture(scope="module")
def tiny_ae():
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
    return AutoencoderKL(cfg, rngs=nnx.Rngs(0)), cfg


def test_real_decoder_single_tile_exact_and_multi_tile_close(tiny_ae):
    ae, cfg = tiny_ae
    gd, st = nnx.split(ae)
    dec = jax.jit(lambda z: nnx.merge(gd, st).decode(z))
    # A statistically stationary latent (what a trained encoder's latents look like to the
    # decoder's GroupNorms): per-tile statistics then match the whole image's.
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (1, 48, 48, 4)))
    full = np.asarray(dec(jnp.asarray(z)))
    one = tiling.decode_tiled(dec, z, factor=2, tile=48, overlap=4)
    np.testing.assert_allclose(one, full, atol=1e-5)
    tiled = tiling.decode_tiled(dec, z, factor=2, tile=24, overlap=8)
    assert tiled.shape == full.shape == (1, 96, 96, 3)
    err = np.abs(tiled - full).mean()
    # Not exact (each tile has its own GroupNorm statistics and attention context), but
    # far below the signal's spread; without overlap the seams double the error.
    assert err < 0.15 * np.abs(full - full.mean()).mean(), err
    hard = tiling.decode_tiled(dec, z, factor=2, tile=24, overlap=0)
    assert np.abs(hard - full).mean() > 1.5 * err
