"""Test setup: 8 fake CPU devices so sharding code runs on a real mesh.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it at import
time (pytest imports conftest.py before any test module).
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_numpy_init(ctor, seed: int = 0):
    """``ctor()`` (an NNX module constructor) built abstractly, then filled with numpy
    random values.

    Eager random initialisation compiles one threefry kernel per parameter shape (seconds
    each on a small CPU); tests that need the architecture, not the initialiser, take
    their values from numpy instead: kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1),
    scales ~ 1 + N(0, 0.1), embeddings ~ N(0, 1), BatchNorm running statistics (0, 1).
    Any other state is an error, so a new kind of variable is not filled by accident.
    """
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = [n for n in (getattr(p, "key", getattr(p, "name", None)) for p in path) if n != "value"][-1]
        if name == "kernel":
            v = rng.normal(0.0, 1.0 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
        elif name == "bias":
            v = rng.normal(0.0, 0.1, s.shape)
        elif name == "scale":
            v = 1.0 + rng.normal(0.0, 0.1, s.shape)
        elif name == "embedding":
            v = rng.normal(0.0, 1.0, s.shape)
        elif name == "mean":
            v = np.zeros(s.shape)
        elif name == "var":
            v = np.ones(s.shape)
        else:
            raise AssertionError(f"unexpected state {path}")
        return jax.numpy.asarray(v, s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def save_test_autoencoder(directory: str, cfg) -> str:
    """``AutoencoderKL(cfg)`` with its own random initialisation (seed 0), saved as a
    pretrained directory (what the LDM trainer and the evaluation load); returns
    ``directory``. (Not ``build_numpy_init``: the LDM tests' thresholds assume the
    initialiser's latent statistics, zero biases and unit norm scales.) The initialiser runs
    as one program compiled like the trainers' init (3 s instead of ~15 s eagerly)."""
    from flax import nnx

    from ldm_jax import pretrained
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.trainers.common import one_shot_compiler_options

    def init():
        return nnx.state(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    params = jax.jit(init, compiler_options=one_shot_compiler_options(jax.eval_shape(init)))()
    fields = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    pretrained.save_pretrained(directory, "autoencoder", fields, params, source="test")
    return directory


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two pytrees, in float64 on the host."""
    import numpy as np

    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return float(np.sqrt(num / den))


def restore_vae_gan_state(workdir: str, config) -> tuple:
    """(state, metadata) of a VAE-GAN workdir's latest checkpoint, restored onto one device
    through the abstract train state (no init program) and fetched to the host."""
    from ldm_jax import sharding
    from ldm_jax.checkpointing import Checkpointer
    from ldm_jax.trainers import vae_gan

    gen_lr, disc_lr = vae_gan.learning_rates(config)
    _, abstract, _ = vae_gan.create_train_state(
        config, sharding.make_mesh(dict(data=1, fsdp=1, num_devices=1)),
        vae_gan.make_optimizer(gen_lr, config), vae_gan.make_optimizer(disc_lr, config), abstract=True)
    ck = Checkpointer(workdir)
    try:
        restored, meta = ck.restore(ck.latest_step(), abstract.as_dict(), None)
    finally:
        ck.close()
    return jax.device_get(restored), meta


def assert_close_to_reference(name: str, ours, ref, rtol: float = 1e-4) -> float:
    """Max |ours - ref| <= rtol * max(1, max |ref|) (a parity check against a PyTorch
    reference output); prints and returns the error."""
    import numpy as np

    ref = np.asarray(ref)
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    print(f"  {name}: max abs err {err:.2e} (max |ref| {float(np.max(np.abs(ref))):.2f})")
    assert err <= rtol * scale, f"{name}: max abs err {err} > {rtol} * {scale}"
    return err


def assert_same_param_trees(a, b) -> None:
    """Two nested parameter dicts with the same keys and bit-identical float32 arrays."""
    import numpy as np

    from ldm_jax.convert.autoencoder_weights import _flatten

    fa, fb = _flatten(a), _flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == np.float32
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def cpu_env(**extra: str) -> dict:
    """The environment of a command-line tool a test starts: CPU with 8 host devices, offline."""
    return dict(os.environ, XLA_FLAGS=_flag, JAX_PLATFORMS="cpu", LDM_JAX_OFFLINE="1", **extra)


@pytest.fixture(scope="session", autouse=True)
def _offline_and_compile_cache(tmp_path_factory):
    """No network in tests; one persistent compilation cache for the whole run, shared by
    the xdist workers (the parent of their temp dirs) and, through the environment, by
    the command-line tools and worker processes tests start (train.py, sample.py, bench).
    An entry read while another process is still writing it fails to decompress; jax then
    warns and compiles instead."""
    os.environ["LDM_JAX_OFFLINE"] = "1"
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    cache = base / "xla_cache"
    cache.mkdir(exist_ok=True)
    min_compile_s = 0.5
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_compile_s)
    yield
