"""Inception Score and k-NN precision / recall (ldm_jax.gen_metrics) against direct
NumPy / SciPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special

from ldm_jax import gen_metrics as gm


def _is_reference(logits, splits):
    """The Inception Score written out with scipy (softmax, KL to the split marginal)."""
    p = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
    out = []
    for part in np.array_split(p, splits):  # equal-as-possible consecutive splits
        py = part.mean(axis=0)
        out.append(np.exp(np.mean(scipy.special.rel_entr(part, py[None]).sum(axis=1))))
    return float(np.mean(out)), float(np.std(out))


@pytest.mark.parametrize("n, splits", [(100, 10), (37, 4), (5, 5)])
def test_streaming_inception_score_equals_one_shot(n, splits):
    rng = np.random.default_rng(n)
    logits = rng.normal(size=(n, 1008)) * 3
    ref = _is_reference(logits, splits) if n % splits == 0 else None
    one = gm.inception_score(logits, splits)
    if ref is not None:  # np.array_split and our k*n//splits boundaries agree for equal splits
        np.testing.assert_allclose(one, ref, rtol=1e-10)
    acc = gm.InceptionScore(n, splits)
    order = rng.permutation(n)
    for chunk in np.array_split(order, 7):  # any batching, any order, any process split
        if len(chunk):
            acc.update(logits[chunk], chunk)
    np.testing.assert_allclose(acc.result(), one, rtol=1e-9)
    # two "processes" merged
    a, b = gm.InceptionScore(n, splits), gm.InceptionScore(n, splits)
    a.update(logits[order[: n // 2]], order[: n // 2])
    b.update(logits[order[n // 2:]], order[n // 2:])
    sent = [a.to_arrays(), b.to_arrays()]  # what each process all-gathers
    np.testing.assert_allclose(a.merge(b).result(), one, rtol=1e-9)
    rebuilt = gm.InceptionScore(n, splits)
    for arrays in sent:
        rebuilt.merge(gm.InceptionScore.from_arrays(n, **arrays))
    np.testing.assert_allclose(rebuilt.result(), one, rtol=1e-9)


def test_inception_score_extremes():
    # identical predictions: p(y|x) = p(y), score 1
    assert gm.inception_score(np.zeros((20, 1008)), 2)[0] == pytest.approx(1.0)
    # confident and uniformly spread over K classes: score K
    k = 8
    logits = np.full((80, 1008), -1e4)
    logits[np.arange(80), np.arange(80) % k] = 0.0
    mean, std = gm.InceptionScore(80, 1).update(logits, np.arange(80)).result()
    assert mean == pytest.approx(k, rel=1e-6) and std == 0.0


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="inconsistent Inception Score arrays"):
        gm.InceptionScore.from_arrays(10, np.zeros(2), np.zeros((3, 1008)), np.zeros(2))
    with pytest.raises(ValueError, match="need at least 10 samples"):
        gm.InceptionScore(5, 10)
    acc = gm.InceptionScore(10, 2)
    with pytest.raises(ValueError, match=r"sample indices must lie in \[0, 10\)"):
        acc.update(np.zeros((1, 1008)), [10])
    acc.update(np.zeros((3, 1008)), [0, 1, 2])
    with pytest.raises(ValueError, match="splits without samples"):
        acc.result()


def _pr_reference(real, fake, k):
    d_rr = scipy.spatial.distance.cdist(real, real)
    d_ff = scipy.spatial.distance.cdist(fake, fake)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    prec = np.mean(np.any(scipy.spatial.distance.cdist(fake, real) <= r_real[None], axis=1))
    rec = np.mean(np.any(scipy.spatial.distance.cdist(real, fake) <= r_fake[None], axis=1))
    return prec, rec


def test_precision_recall_match_brute_force():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    # a narrower, shifted generator: high precision, lower recall
    fake = (0.5 * rng.normal(size=(250, 16)) + 0.3).astype(np.float32)
    got = gm.precision_recall(real, fake, k=3, block=64)  # several blocks, padded last one
    want = _pr_reference(real.astype(np.float64), fake.astype(np.float64), 3)
    np.testing.assert_allclose(got, want, atol=1 / 250)  # at most one borderline point
    assert got[0] > got[1]
    np.testing.assert_allclose(gm.knn_radii(real, 3, block=50),
                               np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, 3] ** 2,
                               rtol=1e-3, atol=1e-3)


def test_precision_recall_extremes():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(64, 8)).astype(np.float32)
    assert gm.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert gm.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="need more than 3 feature vectors"):
        gm.knn_radii(real[:3], 3)
    with pytest.raises(ValueError, match="feature shapes differ"):
        gm.precision_recall(real, real[:, :4])
