"""FID: Fréchet distance, feature statistics, FID Inception parity with pytorch-fid, weights.

The parity test builds pytorch-fid's ``fid_inception_v3()`` network (its FID blocks on
torchvision's Inception3) without downloading weights, randomises every weight and
BatchNorm running statistic, saves the state dict to a .pth, converts it with our
torch-free converter and compares pool3 features (and logits) on the same images.
Tolerance: max |ours - torch| <= 1e-4 x max |torch feature| in float32 — both run ~95
convolutions in fp32 with different summation orders; measured ~3e-7 (64x80 input,
upsampled) and ~2e-7 (333x410, downsampled). The 299x299 resize itself agrees with
``F.interpolate`` to float32 rounding (weights bit-identical).
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from ldm_jax import fid
from ldm_jax.convert import inception_weights as iw
from ldm_jax.models import inception as inc



def _torch():
    """torch and pytorch-fid (test extras); tests that need them skip without them."""
    torch = pytest.importorskip("torch")
    pfi = pytest.importorskip("pytorch_fid.inception")  # pip install pytorch-fid
    return torch, pfi


# ----------------------------------------------------------------------------- distance


def _reference_fid(mu1, s1, mu2, s2):
    """Independent reference: Tr((S1 S2)^1/2) from the eigenvalues of S1 S2 (numpy eig)."""
    ev = np.linalg.eigvals(s1 @ s2)
    tr = np.sum(np.sqrt(np.clip(ev.real, 0, None)))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr)


def _gaussian_features(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_references(method):
    rng = np.random.default_rng(0)
    a = _gaussian_features(rng, 400, 24)
    b = _gaussian_features(rng, 300, 24, shift=0.3, scale=1.4)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-8)
    # Closed form for diagonal covariances: |mu1-mu2|^2 + sum (sigma1 - sigma2)^2.
    v1, v2 = rng.uniform(0.5, 2, 10), rng.uniform(0.5, 2, 10)
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fid.frechet_distance(m1, np.diag(v1), m2, np.diag(v2), method=method)
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_identical_statistics_give_zero(method):
    rng = np.random.default_rng(1)
    f = _gaussian_features(rng, 200, 32)
    mu, s = fid.feature_statistics(f)
    assert abs(fid.frechet_distance(mu, s, mu, s, method=method)) < 1e-8 * np.trace(s)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_near_singular_covariance(method):
    # 12 samples in 40 dimensions: rank-11 covariances, as FID on few images.
    rng = np.random.default_rng(2)
    a, b = _gaussian_features(rng, 12, 40), _gaussian_features(rng, 12, 40, 0.1, 1.2)
    mu1, s1 = fid.feature_statistics(a)
    mu2, s2 = fid.feature_statistics(b)
    got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert np.isfinite(got)
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-5)


def test_sqrtm_fallback_and_imaginary_check(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = _gaussian_features(rng, 100, 8), _gaussian_features(rng, 100, 8, 0.2)
    mu1, s1 = fid.feature_statistics(a)
    mu2, s2 = fid.feature_statistics(b)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky(m, *args, **kwargs):  # first call "fails" like a singular product
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky)
    with pytest.warns(RuntimeWarning, match="singular"):
        got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(8)) @ (s2 + 1e-6 * np.eye(8)))
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-4)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda m, *a, **k: real_sqrtm(m) + 0.5j * np.eye(8))
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(mu1, s1, mu2, s2)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


# ----------------------------------------------------------------------------- statistics


def test_stats_accumulate_like_one_shot():
    rng = np.random.default_rng(4)
    f = _gaussian_features(rng, 257, 16, shift=5.0).astype(np.float32)
    acc = fid.FeatureStats()
    for lo, hi in ((0, 1), (1, 50), (50, 50), (50, 200), (200, 257)):  # uneven, incl. empty
        acc.update(f[lo:hi])
    np.testing.assert_allclose(acc.mean, f.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.cov, np.cov(f.astype(np.float64), rowvar=False),
                               rtol=1e-10, atol=1e-12)
    assert acc.n == 257
    # Merging per-process statistics (through their array form) gives the same.
    p1, p2 = fid.FeatureStats().update(f[:100]), fid.FeatureStats().update(f[100:])
    merged = fid.FeatureStats().merge(fid.FeatureStats.from_arrays(**p1.to_arrays()))
    merged.merge(fid.FeatureStats.from_arrays(**p2.to_arrays()))
    np.testing.assert_allclose(merged.cov, acc.cov, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        _ = fid.FeatureStats().update(f[:1]).cov


def test_frechet_distance_or_eigh_falls_back_only_for_a_failed_sqrtm(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = (fid.feature_statistics(rng.normal(size=(30, 8)) + k) for k in (0.0, 0.5))
    want = fid.frechet_distance(*a, *b, method="eigh")
    assert fid.frechet_distance_or_eigh(*a, *b) == (pytest.approx(want, rel=1e-6), None)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda m: np.asarray(m) * (1 + 1j))
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(*a, *b)
    value, note = fid.frechet_distance_or_eigh(*a, *b, name="sFID")
    assert value == pytest.approx(want, rel=1e-12)
    assert note.startswith("sFID: FID: sqrtm has a significant imaginary component")
    assert "fid_method='eigh' instead" in note
    with pytest.raises(ValueError, match="different shapes"):  # other errors are not hidden
        fid.frechet_distance_or_eigh(a[0][:4], a[1][:4, :4], *b)


def test_stats_file_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    mu, s = fid.feature_statistics(rng.normal(size=(20, 6)))
    path = fid.save_stats(tmp_path / "ref.npz", mu, s, num_images=20)
    mu2, s2 = fid.load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(s, s2)
    np.savez(tmp_path / "pytorch_fid_style.npz", mu=mu, sigma=s)  # pytorch-fid's format
    np.testing.assert_array_equal(fid.load_stats(tmp_path / "pytorch_fid_style.npz")[1], s)
    assert fid.load_spatial_stats(path) is None  # no sFID statistics in either file
    assert fid.load_spatial_stats(tmp_path / "pytorch_fid_style.npz") is None
    mu_s, s_s = fid.feature_statistics(rng.normal(size=(20, 3)))
    path_s = fid.save_stats(tmp_path / "ref_s.npz", mu, s, num_images=20, mu_s=mu_s, sigma_s=s_s)
    np.testing.assert_array_equal(fid.load_stats(path_s)[1], s)
    for a, b in zip(fid.load_spatial_stats(path_s), (mu_s, s_s)):
        np.testing.assert_array_equal(a, b)
    np.savez(tmp_path / "adm_style.npz", mu=mu, sigma=s, mu_s=mu_s, sigma_s=s_s)  # ADM reference batch
    np.testing.assert_array_equal(fid.load_spatial_stats(tmp_path / "adm_style.npz")[1], s_s)
    with pytest.raises(ValueError, match="both mu_s and sigma_s"):
        fid.save_stats(tmp_path / "half.npz", mu, s, mu_s=mu_s)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_stats(tmp_path / "bad.npz")


class _ToyFeatures(nnx.Module):
    """Stands in for the Inception in fast tests: per-channel means and stds (6-d)."""

    def __call__(self, x):
        return jnp.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=-1)


def test_fid_of_samples_with_stats_and_images():
    rng = np.random.default_rng(6)
    samples = rng.integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
    ref = rng.integers(40, 200, (30, 16, 16, 3), dtype=np.uint8)
    toy = _ToyFeatures()
    x, y = samples.astype(np.float64) / 127.5 - 1, ref.astype(np.float64) / 127.5 - 1
    fx = np.concatenate([x.mean((1, 2)), x.std((1, 2))], -1)
    fy = np.concatenate([y.mean((1, 2)), y.std((1, 2))], -1)
    want = _reference_fid(fx.mean(0), np.cov(fx, rowvar=False), fy.mean(0), np.cov(fy, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few-sample warning
        by_images = fid.fid_of_samples(samples, ref, toy, batch_size=8)
        by_stats = fid.fid_of_samples(samples.astype(np.float32) / 127.5 - 1,
                                      fid.feature_statistics(fy), toy, batch_size=8)
    assert by_images == pytest.approx(want, rel=1e-4)
    assert by_stats == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fid.to_inception_input(np.full((1, 4, 4, 3), 3.0, np.float32))


# ----------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def torch_fid_net(tmp_path_factory):
    """pytorch-fid's FID Inception with random weights and BN statistics, and its .pth."""
    from unittest import mock

    torch, pfi = _torch()
    torch.manual_seed(0)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
        net = pfi.fid_inception_v3()  # architecture only: download and load are stubbed
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    net.eval()
    path = str(tmp_path_factory.mktemp("inception") / iw.INCEPTION_PTH_NAME)
    torch.save(net.state_dict(), path)
    return net, path


def _torch_pool3_and_logits(net, x01):
    """pytorch-fid's InceptionV3 forward (resize_input, normalize_input) up to pool3, the
    fc logits, and the sFID spatial features: Mixed_6d's 1x1 branch (its own module, not
    a slice of the block output), first 7 channels, flattened in (H, W, C) order as the
    ADM evaluator flattens TensorFlow's NHWC ``mixed_6/conv``."""
    torch, _ = _torch()
    import torch.nn.functional as F

    with torch.no_grad():
        h = F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False)
        h = 2 * h - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            if name == "Mixed_6d":
                b1 = net.Mixed_6d.branch1x1(h)[:, :7]
                spatial = b1.permute(0, 2, 3, 1).reshape(b1.shape[0], -1).numpy()
            h = getattr(net, name)(h)
        pool = torch.flatten(net.avgpool(h), 1)
        return pool.numpy(), net.fc(pool).numpy(), spatial


def test_inception_matches_pytorch_fid(torch_fid_net):
    torch, _ = _torch()
    net, path = torch_fid_net
    model, status = iw.create_inception(path)
    assert "loaded" in status
    gd, state = nnx.split(model)
    # features() and __call__ in one program (one compile per input size)
    fwd = jax.jit(lambda st, x: (nnx.merge(gd, st).features(x), nnx.merge(gd, st)(x, logits=True)))
    g = torch.Generator().manual_seed(2)
    # Upsampled (as 256x256 crops are) and downsampled inputs exercise both resize paths.
    for shape in ((2, 3, 64, 80), (1, 3, 333, 410)):
        x01 = torch.rand(shape, generator=g)
        want = dict(zip(("pool", "logits", "spatial"), _torch_pool3_and_logits(net, x01)))
        x = jnp.asarray(x01.numpy().transpose(0, 2, 3, 1) * 2 - 1)
        got, (pool, logits) = fwd(state, x)
        assert got["pool"].shape == (shape[0], 2048)
        assert got["spatial"].shape == (shape[0], inc.SPATIAL_DIM) == (shape[0], 2023)
        for k in ("pool", "logits", "spatial"):
            err = np.abs(np.asarray(got[k]) - want[k]).max() / np.abs(want[k]).max()
            assert err <= 1e-4, f"{k} relative error {err:.2e} for input {shape}"
        np.testing.assert_allclose(pool, got["pool"], rtol=1e-6, atol=1e-6)  # __call__: the same
        np.testing.assert_allclose(logits, got["logits"], rtol=1e-6, atol=1e-6)


def test_bilinear_resize_matches_torch_interpolate():
    torch, _ = _torch()
    import torch.nn.functional as F

    rng = np.random.default_rng(7)
    for (h, w), (oh, ow) in (((7, 9), (299, 299)), ((333, 410), (299, 299)), ((5, 5), (5, 5)),
                             ((40, 31), (17, 50))):
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(oh, ow),
                             mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(inc.bilinear_resize(jnp.asarray(x), (oh, ow))),
                                   want, atol=2e-6)
        np.testing.assert_allclose(inc.bilinear_resize_np(x, (oh, ow)), want, atol=2e-6)


def test_weights_are_frozen_not_params():
    model = inc.FIDInceptionV3()
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))
    n = sum(int(np.prod(v.get_value().shape)) for v in inc.inception_weights(model).values())
    assert n == sum(int(np.prod(s)) for k, s in iw.torch_key_shapes().items())


def test_converter_lists_every_key_problem():
    shapes = iw.torch_key_shapes()
    sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
    assert len(iw.convert_inception(sd)) == len(shapes)
    del sd["Mixed_6e.branch_pool.conv.weight"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's 1000 classes
    with pytest.raises(ValueError) as e:
        iw.convert_inception(sd)
    msg = str(e.value)
    assert "unknown keys ['AuxLogits.fc.weight']" in msg
    assert "missing keys ['Mixed_6e.branch_pool.conv.weight']" in msg
    assert "fc.weight: got (1000, 2048), expected (1008, 2048)" in msg


def test_missing_weights_error_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("LDM_JAX_OFFLINE", "1")
    with pytest.raises(iw.InceptionWeightsMissingError) as e:
        iw.create_inception()
    msg = str(e.value)
    assert iw.INCEPTION_PTH_NAME in msg and iw.FID_WEIGHTS_URL in msg
    assert os.path.join(str(tmp_path / "cache"), iw.INCEPTION_PTH_NAME) in msg
    assert "python -m ldm_jax.convert.inception_weights" in msg
    assert "--no_fid" not in msg  # a command-line flag: evaluate's message adds it where it applies
    with pytest.raises(iw.InceptionWeightsMissingError, match="does not exist"):
        iw.create_inception(str(tmp_path / "nope.npz"))
    # online, the download is checked against the file's whole sha256; a failure is named
    from ldm_jax import weights_cache

    calls = []

    def refuse(url, dest, sha256_prefix=None):
        calls.append((url, dest, sha256_prefix))
        raise OSError("no route to host")

    monkeypatch.setenv("LDM_JAX_OFFLINE", "0")
    monkeypatch.setattr(weights_cache, "download", refuse)
    with pytest.raises(iw.InceptionWeightsMissingError, match="no route to host"):
        iw.create_inception()
    assert calls == [(iw.FID_WEIGHTS_URL, os.path.join(str(tmp_path / "cache"), iw.INCEPTION_PTH_NAME),
                      "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2")]
    assert iw.INCEPTION_PTH_NAME.endswith(f"-{calls[0][2][:8]}.pth")  # torch hub's naming rule


def test_cache_conversion_and_cli(torch_fid_net, tmp_path, monkeypatch):
    _, pth = torch_fid_net
    cache = tmp_path / "cache"
    monkeypatch.setenv("LDM_JAX_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache.mkdir()
    os.symlink(pth, cache / iw.INCEPTION_PTH_NAME)  # user placed the .pth in the cache dir
    model, status = iw.create_inception()
    npz = cache / iw.INCEPTION_NPZ_NAME
    assert npz.is_file() and f"converted to {npz}" in status
    again, status2 = iw.create_inception()
    assert status2 == f"FID Inception: loaded {npz}"
    a = inc.inception_weights(model)["Mixed_7c/branch_pool/bn/var"].get_value()
    b = inc.inception_weights(again)["Mixed_7c/branch_pool/bn/var"].get_value()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # CLI writes the same arrays.
    out = tmp_path / "cli.npz"
    assert iw.main([pth, "--out", str(out)]) == 0
    with np.load(out) as z, np.load(npz) as ref:
        assert sorted(z.files) == sorted(ref.files)
        np.testing.assert_array_equal(z["fc/kernel"], ref["fc/kernel"])
    # A converted file that does not fit raises one listing error.
    with np.load(out) as z:
        bad = {k: z[k] for k in z.files if k != "fc/bias"}
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match=r"missing keys \['fc/bias'\]"):
        iw.create_inception(str(tmp_path / "bad.npz"))
