"""LPIPS (VGG16, v0.1): parity with the `lpips` package, weight conversion, .pth reading,
and the weight-resolution behaviour of `create_lpips`.

Tests that need torch / torchvision / lpips skip (with the reason) when those are absent;
the rest run without torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import urllib.error
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ldm_jax import weights_cache
from ldm_jax.convert import lpips_weights as lw
from ldm_jax.convert.torch_pickle import (
    TorchPickleError,
    UnsafeCheckpointError,
    load_torch_state_dict,
)
from ldm_jax.models import lpips as L


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, y):
    return nnx.merge(graphdef, state)(x, y)


def _dist(model: L.LPIPS, x, y) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, jnp.asarray(x), jnp.asarray(y)))


def _images(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = rng.uniform(-1, 1, shape).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def random_lpips() -> L.LPIPS:
    return L.LPIPS(rngs=nnx.Rngs(0))


def _weights(model: L.LPIPS) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, L.FrozenWeight))
    return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


# ----------------------------------------------------------------------------- model


def test_identical_images_give_zero(random_lpips):
    x, y = _images(0, (2, 32, 32, 3))
    same = _dist(random_lpips, x, x)
    diff = _dist(random_lpips, x, y)
    assert same.shape == (2,) and same.dtype == np.float32
    np.testing.assert_allclose(same, 0.0, atol=1e-7)
    assert np.all(diff > 1e-4)


def test_vgg_pools_like_torch_on_odd_sizes(random_lpips):
    x = jax.ShapeDtypeStruct((1, 50, 70, 3), jnp.float32)
    feats = jax.eval_shape(random_lpips.vgg, x)
    assert [f.shape for f in feats] == [
        (1, 50, 70, 64),
        (1, 25, 35, 128),
        (1, 12, 17, 256),
        (1, 6, 8, 512),
        (1, 3, 4, 512),
    ]


def test_max_pool_and_its_gradient_match_reduce_window():
    """The reshape-max pool equals reduce_window's 2x2/2 max pool on odd and even sizes, and
    so does its gradient where the maximum is unique (continuous random input)."""
    def reference(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    rng = np.random.default_rng(0)
    for shape in ((2, 8, 6, 3), (1, 7, 5, 4)):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        w = jnp.asarray(rng.normal(size=reference(x).shape), jnp.float32)
        np.testing.assert_array_equal(L._max_pool_2x2(x), reference(x))
        g = jax.grad(lambda v: jnp.sum(L._max_pool_2x2(v) * w))(x)
        np.testing.assert_array_equal(g, jax.grad(lambda v: jnp.sum(reference(v) * w))(x))
        assert int((g != 0).sum()) == w.size  # one input per window receives the gradient


def test_frozen_weights_are_not_params(random_lpips):
    class WithLoss(nnx.Module):
        def __init__(self, lp: L.LPIPS):
            self.gain = nnx.Param(jnp.ones(()))
            self.lpips = lp

    outer = WithLoss(random_lpips)
    params = nnx.to_flat_state(nnx.state(outer, nnx.Param))
    assert [p for p, _ in params] == [("gain",)]
    frozen = nnx.to_flat_state(nnx.state(outer, L.FrozenWeight))
    assert len(frozen) == 13 * 2 + 5
    opt = nnx.Optimizer(outer, optax.adam(1e-3), wrt=nnx.Param)
    opt_leaves = jax.tree.leaves(nnx.state(opt.opt_state))
    assert sum(int(np.size(a)) for a in opt_leaves) < 10  # adam moments of `gain` + count


def test_input_gradient_is_finite(random_lpips):
    x, y = _images(1, (1, 16, 16, 3))
    graphdef, state = nnx.split(random_lpips)

    def loss(xx, st):  # weights as an argument: closing over them makes XLA fold them slowly
        return nnx.merge(graphdef, st)(xx, jnp.asarray(y)).sum()

    g = jax.jit(jax.grad(loss))(jnp.asarray(x), state)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    # The channel normalisation stays finite where a feature vector is all zero.
    g0 = jax.grad(lambda f: L._unit_normalize(f).sum())(jnp.zeros((1, 2, 2, 8)))
    assert bool(jnp.all(jnp.isfinite(g0)))


def test_bf16_compute_close_to_fp32(random_lpips):
    bf = nnx.eval_shape(lambda: L.LPIPS(dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    nnx.update(bf, nnx.state(random_lpips))
    x, y = _images(2, (2, 32, 32, 3))
    ref = _dist(random_lpips, x, y)
    out = _dist(bf, jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=5e-2)
    # A bf16 LPIPS stores its (frozen) VGG weights in bf16, loaded weights included, so a
    # step does not convert them at every call. ``bf`` above holds float32 weights converted
    # at the call; XLA:CPU, which computes bf16 convolutions in float32, may drop that
    # rounding (excess precision), hence a tolerance rather than equality.
    stored = nnx.eval_shape(lambda: L.LPIPS(dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    weights = {k: np.asarray(v.get_value()) for k, v in L.frozen_weights(random_lpips).items()}
    L.set_frozen_weights(stored, weights, "LPIPS")
    dtypes = {k: v.get_value().dtype for k, v in L.frozen_weights(stored).items()}
    vgg = {k for k in dtypes if k.startswith("vgg")}
    assert len(vgg) == 26 and all(dtypes[k] == jnp.bfloat16 for k in vgg)
    assert all(dtypes[k] == jnp.float32 for k in set(dtypes) - vgg)  # the heads
    np.testing.assert_allclose(
        _dist(stored, jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)), out, rtol=2e-3)


@pytest.mark.parametrize("hw", [(2, 2), (1, 3), (2, 1), (1, 1)])
def test_small_input_conv_equals_the_convolution(hw):
    """Inputs smaller than the 3x3 kernel (VGG's last stage on 32x32 images) take the
    matmul form; it equals the padded convolution."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *hw, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) / 12, jnp.float32)
    want = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(L._conv3x3_as_matmul(x, k), want, rtol=1e-5, atol=1e-5)


def test_batch_sharded_lpips_moves_no_data_between_devices(random_lpips):
    """With the batch sharded over 8 devices each device compares its own pairs: the
    compiled distance and its input gradient (the VAE-GAN step's) have no all-to-all and no
    collective permute, and give the single-device numbers."""
    from ldm_jax import sharding

    x, y = _images(4, (8, 32, 32, 3))
    sh = sharding.batch_sharding(sharding.make_mesh(dict(data=8, fsdp=1, num_devices=-1)))
    graphdef, state = nnx.split(random_lpips)

    def dist_and_grad(st, a, b):
        return jax.value_and_grad(lambda v: nnx.merge(graphdef, st)(v, b).sum())(a)

    fn = jax.jit(dist_and_grad, out_shardings=(None, sh))
    args = (state, jax.device_put(x, sh), jax.device_put(y, sh))
    hlo = fn.lower(*args).compile().as_text()
    assert "all-to-all" not in hlo and "collective-permute" not in hlo
    (d8, g8), (d1, g1) = fn(*args), jax.jit(dist_and_grad)(state, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(float(d8), float(d1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-4, atol=1e-6 * float(jnp.abs(g1).max()))


def test_load_is_strict(random_lpips, tmp_path):
    arrays = _weights(random_lpips)
    assert "vgg/conv1_1/kernel" in arrays and "lin4/weight" in arrays
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    target = nnx.eval_shape(lambda: L.LPIPS(rngs=nnx.Rngs(1)))
    L.load_lpips_params(target, good)
    np.testing.assert_array_equal(_weights(target)["lin2/weight"], arrays["lin2/weight"])

    bad = dict(arrays)
    bad["extra/key"] = np.zeros(3, np.float32)
    del bad["lin0/weight"]
    bad["vgg/conv2_1/bias"] = np.zeros(7, np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    with pytest.raises(ValueError) as e:
        L.load_lpips_params(L.LPIPS(rngs=nnx.Rngs(1)), path)
    msg = str(e.value)
    assert "extra/key" in msg and "lin0/weight" in msg and "vgg/conv2_1/bias" in msg


# ----------------------------------------------------------------------------- converter


def _fake_vgg16_state_dict() -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    for _name, idx, cin, cout in lw.VGG16_LAYERS:
        sd[f"features.{idx}.weight"] = np.zeros((cout, cin, 3, 3), np.float32)
        sd[f"features.{idx}.bias"] = np.zeros((cout,), np.float32)
    sd["classifier.6.bias"] = np.zeros((1000,), np.float32)  # ignored
    return sd


def test_convert_vgg16_layout():
    sd = _fake_vgg16_state_dict()
    w = np.random.default_rng(0).standard_normal((128, 64, 3, 3)).astype(np.float32)
    sd["features.5.weight"] = w
    out = lw.convert_vgg16(sd)
    assert len(out) == 26 and not any("classifier" in k for k in out)
    k = out["vgg/conv2_1/kernel"]
    assert k.shape == (3, 3, 64, 128)
    np.testing.assert_array_equal(k[1, 2, 5, 7], w[7, 5, 1, 2])
    assert lw.convert_vgg16({"state_dict": sd}).keys() == out.keys()


def test_converter_rejects_bad_keys():
    sd = _fake_vgg16_state_dict()
    sd["features.0.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    sd["features.99.weight"] = np.zeros((1,), np.float32)
    del sd["features.28.bias"]
    with pytest.raises(ValueError) as e:
        lw.convert_vgg16(sd)
    msg = str(e.value)
    assert "features.0.weight" in msg and "(64, 3, 5, 5)" in msg
    assert "features.99.weight" in msg and "features.28.bias" in msg

    heads = {f"lin{k}.model.1.weight": np.ones((1, c, 1, 1), np.float32)
             for k, c in enumerate(lw.HEAD_CHANNELS)}
    assert lw.convert_lpips_heads(heads)["lin3/weight"].shape == (512,)
    heads["lin2.model.1.weight"] = np.ones((1, 128, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight"):
        lw.convert_lpips_heads(heads)


def test_torch_pickle_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="mkdir"):
        load_torch_state_dict(path)
    assert not marker.exists()

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TorchPickleError):
        load_torch_state_dict(junk)


# ----------------------------------------------------------------------------- create_lpips


@pytest.fixture
def empty_env(tmp_path, monkeypatch):
    """Empty cache dir, no torch hub cache, offline, and no lpips package heads."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LDM_JAX_CACHE", str(cache))
    monkeypatch.setenv("LDM_JAX_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(L, "_lpips_package_heads", lambda: None)
    return cache


def test_missing_weights_error_names_files(empty_env):
    with pytest.raises(L.LPIPSWeightsMissingError) as e:
        L.create_lpips(missing="error", rngs=nnx.Rngs(0))
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    for needle in (L.VGG16_PTH_NAME, L.VGG16_URL, L.HEADS_PTH_NAME, L.HEADS_URL,
                   str(empty_env), "python -m ldm_jax.convert.lpips_weights --vgg16",
                   "LDM_JAX_OFFLINE"):
        assert needle in msg, needle


def test_missing_vgg_only_error_names_vgg(empty_env):
    empty_env.mkdir(parents=True)
    heads = empty_env / L.HEADS_PTH_NAME
    heads.write_bytes(b"found, never read")
    with pytest.raises(L.LPIPSWeightsMissingError) as e:
        L.create_lpips(rngs=nnx.Rngs(0))
    msg = str(e.value)
    assert L.VGG16_PTH_NAME in msg and L.VGG16_URL in msg and str(empty_env) in msg
    assert L.HEADS_URL not in msg
    assert f"--heads {heads}" in msg
    assert f"--vgg16 {empty_env / L.VGG16_PTH_NAME}" in msg


def test_missing_disable_random_and_bad_values(empty_env, tmp_path):
    model, msg = L.create_lpips(missing="disable", rngs=nnx.Rngs(0))
    assert model is None and "disabled" in msg

    model, msg = L.create_lpips(missing="random", rngs=nnx.Rngs(0))
    assert isinstance(model, L.LPIPS) and "RANDOM" in msg and "not meaningful" in msg
    np.testing.assert_array_equal(_weights(model)["lin1/weight"], np.ones(128, np.float32))

    with pytest.raises(L.LPIPSWeightsMissingError):
        L.create_lpips(str(tmp_path / "nope.npz"), missing="disable", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="missing"):
        L.create_lpips(missing="ignore", rngs=nnx.Rngs(0))


def test_random_uses_package_heads_when_available(tmp_path, monkeypatch):
    real = L._lpips_package_heads()
    if real is None:
        pytest.skip("the lpips package (with weights/v0.1/vgg.pth) is not installed")
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LDM_JAX_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model, msg = L.create_lpips(missing="random", rngs=nnx.Rngs(0))
    assert "RANDOM" in msg and real in msg
    want = lw.convert_lpips_heads(load_torch_state_dict(real))
    np.testing.assert_array_equal(_weights(model)["lin4/weight"], want["lin4/weight"])


def test_download_failures_are_reported(empty_env, monkeypatch):
    monkeypatch.delenv("LDM_JAX_OFFLINE")
    urls = []

    def no_network(url, dest, sha256_prefix=None):
        urls.append((url, sha256_prefix))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(weights_cache, "download", no_network)
    with pytest.raises(L.LPIPSWeightsMissingError, match="no network in tests"):
        L.create_lpips(rngs=nnx.Rngs(0))
    # each download is checked against the file's whole sha256
    assert urls == [(L.VGG16_URL, "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"),
                    (L.HEADS_URL, "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868")]
    assert L.VGG16_PTH_NAME.endswith(f"-{urls[0][1][:8]}.pth")  # torchvision's naming rule


def test_real_downloader_fails_cleanly(tmp_path):
    # A refused local connection: fails at once, reports why, leaves no partial file.
    notes: list[str] = []
    dest = tmp_path / "cache" / "x.pth"
    assert weights_cache.try_download("http://127.0.0.1:9/x.pth", str(dest), notes) is None
    assert len(notes) == 1 and "127.0.0.1:9" in notes[0]
    assert os.listdir(tmp_path / "cache") == []


def test_real_downloader_checks_and_renames_whole_files(tmp_path):
    """The downloader against a local HTTP server: a file arrives whole under its name; a
    wrong checksum or a connection that ends early reports why and leaves nothing (no file
    under the name, no temporary file)."""
    import http.server
    import threading

    payload = os.urandom(3 << 20)  # 3 MiB: several read chunks

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload if self.path == "/w.pth" else payload[: len(payload) // 2])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "cache"
    try:
        sha = hashlib.sha256(payload).hexdigest()
        dest = str(cache / "w.pth")
        assert weights_cache.download(f"{base}/w.pth", dest, sha) == dest  # a whole sha256, or a prefix
        with open(dest, "rb") as f:
            assert f.read() == payload
        assert os.listdir(cache) == ["w.pth"]
        os.remove(dest)
        notes: list[str] = []
        wrong = ("0" if sha[0] != "0" else "1") + sha[1:8]
        assert weights_cache.try_download(f"{base}/w.pth", dest, notes, wrong) is None
        assert weights_cache.try_download(f"{base}/short.pth", dest, notes) is None
        assert len(notes) == 2 and f"checksum mismatch for {base}/w.pth: sha256 {sha}, expected {wrong}..." in notes[0], notes
        assert f"short.pth ended after {len(payload) // 2} of {len(payload)} bytes" in notes[1], notes
        assert os.listdir(cache) == []
    finally:
        server.shutdown()
        server.server_close()


def test_weights_cache_env_and_offline_note(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "c"))
    assert weights_cache.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("LDM_JAX_CACHE")
    assert weights_cache.default_cache_dir() == os.path.expanduser("~/.cache/ldm_jax")
    for value, offline in (("1", True), ("yes", True), ("0", False), (" False ", False),
                           ("", False)):
        monkeypatch.setenv("LDM_JAX_OFFLINE", value)
        assert weights_cache.is_offline() is offline, value
    monkeypatch.setenv("LDM_JAX_OFFLINE", "1")
    monkeypatch.setattr(weights_cache, "download", lambda *a, **k: pytest.fail("downloaded offline"))
    notes: list[str] = []
    for name in ("a.pth", "b.pth"):
        dest = str(tmp_path / name)
        assert weights_cache.download_if_online(f"http://x/{name}", dest, notes) is None
    assert notes == [weights_cache.OFFLINE_NOTE]
    want = f"Automatic download: {weights_cache.OFFLINE_NOTE}."
    assert weights_cache.download_notes_lines(notes) == [want]
    assert weights_cache.download_notes_lines([]) == []


# ----------------------------------------------------------------------------- torch parity


@pytest.fixture(scope="module")
def torch_mods():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    lpips = pytest.importorskip("lpips")
    return torch, torchvision, lpips


@pytest.fixture(scope="module")
def torch_weights(torch_mods, tmp_path_factory):
    """A seeded random torchvision vgg16 (features only, to keep the file small) + real heads."""
    torch, torchvision, lpips = torch_mods
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    sd = {k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}
    sd["classifier.6.bias"] = vgg.state_dict()["classifier.6.bias"]  # the converter skips it
    path = tmp_path_factory.mktemp("vgg") / "vgg16_random.pth"
    torch.save(sd, path)
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    return sd, str(path), heads


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_pickle_matches_torch_load(torch_mods, tmp_path, zip_format):
    torch = torch_mods[0]
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 10, generator=g)
    sd = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(2, 5, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "transposed": shared.t(),
        "offset_view": shared[2:5, 1:9:3],
        "row": shared[4],
        "i64": torch.arange(-3, 9).reshape(3, 4),
        "scalar": torch.tensor(2.5),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    path = tmp_path / "t.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    got = load_torch_state_dict(path)
    assert list(got) == list(ref)
    for k, v in ref.items():
        want = v.detach().float().numpy() if k == "bf16" else v.detach().numpy()
        have = got[k].astype(np.float32) if k == "bf16" else got[k]
        assert have.dtype == want.dtype and have.shape == want.shape, k
        assert have.flags.c_contiguous, k
        np.testing.assert_array_equal(have, want, err_msg=k)


def test_reads_lpips_package_heads_without_torch(torch_weights):
    heads = load_torch_state_dict(torch_weights[2])  # legacy (non-zip) format file
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert heads["lin3.model.1.weight"].shape == (1, 512, 1, 1)


def _reference_lpips(torch_mods, vgg_sd):
    """lpips.LPIPS with real heads and our random VGG copied into its sliced trunk."""
    _torch, _tv, lpips = torch_mods
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    bounds = (4, 9, 16, 23, 30)  # torchvision features index ranges of slice1..slice5
    net_sd = {}
    for key, value in vgg_sd.items():
        if key.startswith("features."):
            _f, idx, leaf = key.split(".")
            s = next(i for i, b in enumerate(bounds) if int(idx) < b) + 1
            net_sd[f"slice{s}.{idx}.{leaf}"] = value
    ref.net.load_state_dict(net_sd, strict=True)
    return ref


@pytest.fixture(scope="module")
def converted(torch_mods, torch_weights, tmp_path_factory):
    """Our converted .npz (through the CLI), our model, and the lpips reference model."""
    vgg_sd, vgg_path, heads_path = torch_weights
    out = tmp_path_factory.mktemp("npz") / "lpips.npz"
    assert lw.main(["--vgg16", vgg_path, "--heads", heads_path, "--out", str(out)]) == 0
    model, msg = L.create_lpips(str(out), rngs=nnx.Rngs(0))
    assert str(out) in msg
    return model, _reference_lpips(torch_mods, vgg_sd)


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 50, 70), (2, 32, 32)])
def test_parity_with_lpips_package(torch_mods, converted, shape):
    torch = torch_mods[0]
    model, ref = converted

    x, y = _images(3, (shape[0], 3, *shape[1:]))  # NCHW for torch
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(y)).reshape(-1).numpy()
    got = _dist(model, x.transpose(0, 2, 3, 1), y.transpose(0, 2, 3, 1))
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_create_lpips_converts_then_caches(torch_weights, empty_env, monkeypatch):
    _sd, vgg_path, heads_path = torch_weights
    empty_env.mkdir(parents=True)
    shutil.copy(vgg_path, empty_env / L.VGG16_PTH_NAME)

    # VGG found but no heads anywhere: random mode keeps the real VGG, weight-1 heads.
    model, msg = L.create_lpips(missing="random", rngs=nnx.Rngs(0))
    assert "uncalibrated" in msg
    np.testing.assert_array_equal(_weights(model)["lin0/weight"], np.ones(64, np.float32))

    monkeypatch.setattr(L, "_lpips_package_heads", lambda: heads_path)
    model, msg = L.create_lpips(rngs=nnx.Rngs(0))
    npz = empty_env / L.LPIPS_NPZ_NAME
    assert npz.is_file() and f"converted to {npz}" in msg
    again, msg2 = L.create_lpips(rngs=nnx.Rngs(0))
    assert msg2 == f"LPIPS: loaded VGG16 + v0.1 heads from {npz}"
    a, b = _weights(model), _weights(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not [f for f in os.listdir(empty_env) if ".tmp" in f]


def test_create_lpips_downloads_missing_files(torch_weights, empty_env, monkeypatch):
    _sd, vgg_path, heads_path = torch_weights
    monkeypatch.delenv("LDM_JAX_OFFLINE")
    sources = {L.VGG16_URL: vgg_path, L.HEADS_URL: heads_path}
    fetched = []

    def fake_download(url, dest, sha256_prefix=None):
        fetched.append((url, os.path.basename(dest)))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(sources[url], dest)
        if url == L.HEADS_URL:  # the real heads file (the lpips wheel's) has the pinned sha256
            with open(dest, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == sha256_prefix
        return dest

    monkeypatch.setattr(weights_cache, "download", fake_download)
    model, msg = L.create_lpips(rngs=nnx.Rngs(0))
    assert fetched == [(L.VGG16_URL, L.VGG16_PTH_NAME), (L.HEADS_URL, L.HEADS_PTH_NAME)]
    assert model is not None and (empty_env / L.LPIPS_NPZ_NAME).is_file()
