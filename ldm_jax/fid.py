"""Fréchet Inception Distance: feature statistics, the distance, stats files, helpers.

``FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians fitted to the
2048-d pool3 features of ``ldm_jax.models.inception.FIDInceptionV3`` (Heusel et al.
2017), computed as pytorch-fid does: mean and *unbiased* covariance (``np.cov``) in
float64, ``scipy.linalg.sqrtm`` of the product, and if that is not finite the product of
the covariances each offset by ``eps * I``; an imaginary part is dropped when it is
numerically zero on the diagonal and an error otherwise.

Statistics accumulate over batches (``FeatureStats.update``) with the pairwise
mean/co-moment merge of Chan et al., in float64, so any batch split gives the same result
as one pass over all features; ``merge`` combines the statistics of several processes.

Stats files are ``.npz`` with ``mu`` and ``sigma`` (the keys pytorch-fid uses, so its
precomputed reference files load) plus ``num_images`` when known, and optionally
``mu_s`` / ``sigma_s``: the statistics of the 2023-d spatial features for sFID (the keys
of the ADM evaluator's reference batches).

FID is strongly biased upwards for small sample sizes (and the 2048x2048 covariance is
singular below 2049 images); only compare FIDs computed with the same number of images,
50k for published numbers.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np
import scipy.linalg

from ldm_jax.weights_cache import save_npz_atomic

__all__ = [
    "FeatureStats",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_or_eigh",
    "save_stats",
    "load_stats",
    "load_spatial_stats",
    "to_inception_input",
    "make_feature_fn",
    "inception_features",
    "fid_of_samples",
    "small_sample_warning",
]


class FeatureStats:
    """Running mean and covariance of feature vectors (float64)."""

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.dim = dim
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations

    def update(self, features: Any) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {f.shape}")
        if f.shape[0] == 0:
            return self
        other = FeatureStats(f.shape[1])
        other.n = f.shape[0]
        other._mean = f.mean(axis=0)
        d = f - other._mean
        other._m2 = d.T @ d
        return self.merge(other)

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold ``other`` into ``self`` (Chan et al.'s pairwise update); returns ``self``."""
        if other.n == 0:
            return self
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"feature dims differ: {self.dim} vs {other.dim}")
        if self.n == 0:
            self.n, self.dim = other.n, other.dim
            self._mean, self._m2 = other._mean.copy(), other._m2.copy()
            return self
        n = self.n + other.n
        delta = other._mean - self._mean
        self._mean = self._mean + delta * (other.n / n)
        self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.n = n
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features accumulated")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (``np.cov(f, rowvar=False)``); needs at least 2 features."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 feature vectors, have {self.n}")
        return self._m2 / (self.n - 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``n``, ``mean``, ``m2`` as arrays (to all-gather across processes)."""
        dim = self.dim or 0
        mean = self._mean if self._mean is not None else np.zeros(dim)
        m2 = self._m2 if self._m2 is not None else np.zeros((dim, dim))
        return {"n": np.asarray(self.n, np.int64), "mean": mean, "m2": m2}

    @classmethod
    def from_arrays(cls, n, mean, m2) -> "FeatureStats":
        s = cls(int(np.shape(mean)[-1]))
        s.n = int(n)
        if s.n:
            s._mean = np.asarray(mean, np.float64).copy()
            s._m2 = np.asarray(m2, np.float64).copy()
        return s


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``[N, D]`` features in float64 (one pass)."""
    s = FeatureStats().update(features)
    return s.mean, s.cov


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr((s1 s2)^(1/2))`` for PSD ``s1``, ``s2`` through symmetric eigendecompositions:
    the eigenvalues of ``s1 s2`` are those of ``s1^(1/2) s2 s1^(1/2)`` (PSD)."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64).

    ``method='sqrtm'`` (default) is pytorch-fid's computation, described in the module
    docstring. ``method='eigh'`` gets ``Tr((S1 S2)^(1/2))`` from two symmetric
    eigendecompositions instead: the same quantity, several times faster for 2048-d
    features and well defined for singular covariances (no eps offset needed).
    """
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes {mu1.shape} and {mu2.shape}")
    if s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"covariances {s1.shape} and {s2.shape} do not match means {mu1.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(s1, s2)
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    with warnings.catch_warnings():  # singular products are handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of the covariance product is singular; adding {eps} to the "
                      "diagonal of both covariances", RuntimeWarning, stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"FID: sqrtm has a significant imaginary component ({m:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_or_eigh(mu1, sigma1, mu2, sigma2, method: str = "sqrtm",
                             name: str = "FID") -> tuple[float, str | None]:
    """``(frechet_distance(..., method), None)``, or, when ``method='sqrtm'`` fails
    (a significant imaginary part, as for singular covariances of few images), the same
    quantity by ``method='eigh'`` and a warning naming ``name``. For the evaluations, which
    compute the distance after all the sampling and feature passes: a failed sqrtm must
    not lose that work."""
    try:
        return frechet_distance(mu1, sigma1, mu2, sigma2, method=method), None
    except ValueError as e:
        if method != "sqrtm" or "imaginary" not in str(e):
            raise
        return (frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh"),
                f"{name}: {e}; computed with fid_method='eigh' instead")


def save_stats(path: str | os.PathLike, mu, sigma, num_images: int | None = None, *,
               mu_s=None, sigma_s=None) -> str:
    """Write ``mu``/``sigma`` (pytorch-fid's keys), ``num_images`` and, when given, the
    spatial (sFID) statistics ``mu_s``/``sigma_s`` to ``path`` (.npz)."""
    path = os.fspath(path)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if num_images is not None:
        arrays["num_images"] = np.asarray(int(num_images))
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("save_stats: give both mu_s and sigma_s, or neither")
    if mu_s is not None:
        arrays.update(mu_s=np.asarray(mu_s, np.float64), sigma_s=np.asarray(sigma_s, np.float64))
    save_npz_atomic(arrays, path)
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a stats ``.npz`` (ours or pytorch-fid's)."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{os.fspath(path)} is not an FID stats file (needs 'mu' and "
                             f"'sigma', has {z.files})")
        return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)


def load_spatial_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mu_s, sigma_s)``, the sFID statistics of a stats ``.npz``, or None when it has
    none (pytorch-fid's files); the ADM evaluator's reference batches have them."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        if "mu_s" not in z.files or "sigma_s" not in z.files:
            return None
        return np.asarray(z["mu_s"], np.float64), np.asarray(z["sigma_s"], np.float64)


def small_sample_warning(n: int) -> str | None:
    """A warning string when ``n`` images are too few for a trustworthy FID."""
    if n >= 50_000:
        return None
    if n <= 2048:
        return (f"FID on {n} images: the 2048x2048 feature covariance is singular below 2049 "
                "images and the estimate is strongly biased upwards; use it only to compare "
                "runs evaluated on the same images (published numbers use 50k)")
    return (f"FID on {n} images is biased upwards relative to the standard 50k-image FID; "
            "compare only runs evaluated on the same number of images")


# ----------------------------------------------------------------------------- features


def to_inception_input(images: Any) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] NHWC images -> float32 in [-1, 1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    a = a.astype(np.float32)
    if a.size and (a.min() < -1.001 or a.max() > 1.001):
        raise ValueError(f"float images must lie in [-1, 1], got range [{a.min():.3g}, {a.max():.3g}]")
    return np.clip(a, -1.0, 1.0)


def make_feature_fn(inception) -> Callable:
    """A jitted ``images [-1, 1] -> pool3 features`` closure over ``inception``'s weights."""
    import jax
    from flax import nnx

    gd, state = nnx.split(inception)
    fn = jax.jit(lambda st, x: nnx.merge(gd, st)(x))
    return lambda x: fn(state, x)


def inception_features(inception, images: Any, *, batch_size: int = 50,
                       feature_fn: Callable | None = None) -> np.ndarray:
    """pool3 features ``[N, 2048]`` (float32) of NHWC images (uint8 or [-1, 1] floats).

    Runs in fixed-size batches (the last one padded, pad results dropped), so one compile
    serves any ``N``. ``images`` may be an array or an iterable of arrays of equal size.
    """
    fn = feature_fn or make_feature_fn(inception)
    arrays = [images] if hasattr(images, "shape") else list(images)
    out = []
    for arr in arrays:
        x = to_inception_input(arr)
        for i in range(0, x.shape[0], batch_size):
            chunk = x[i:i + batch_size]
            n = chunk.shape[0]
            if n < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
            out.append(np.asarray(fn(chunk), np.float32)[:n])
    if not out:
        raise ValueError("no images given")
    return np.concatenate(out)


def fid_of_samples(samples: Any, reference: Any, inception, *, batch_size: int = 50,
                   method: str = "sqrtm") -> float:
    """FID of generated ``samples`` (uint8 or [-1, 1] NHWC) against ``reference``.

    ``reference``: a stats ``.npz`` path, a ``(mu, sigma)`` pair, a ``FeatureStats``, or
    reference images (array, uint8 or [-1, 1]). Warns when there are few samples.
    """
    fn = make_feature_fn(inception)
    if isinstance(reference, (str, os.PathLike)):
        mu_r, s_r = load_stats(reference)
    elif isinstance(reference, FeatureStats):
        mu_r, s_r = reference.mean, reference.cov
    elif isinstance(reference, (tuple, list)) and len(reference) == 2 and np.ndim(reference[1]) == 2:
        mu_r, s_r = np.asarray(reference[0]), np.asarray(reference[1])
    else:
        mu_r, s_r = feature_statistics(inception_features(
            inception, reference, batch_size=batch_size, feature_fn=fn))
    feats = inception_features(inception, samples, batch_size=batch_size, feature_fn=fn)
    note = small_sample_warning(feats.shape[0])
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
    mu, s = feature_statistics(feats)
    return frechet_distance(mu, s, mu_r, s_r, method=method)
