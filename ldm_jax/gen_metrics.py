"""Sample-quality metrics beyond FID: Inception Score and k-NN precision / recall.

**Inception Score** (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over the 1008
classes of the FID Inception, computed as the original code does: softmax of the pool3
features times the ``fc`` weights *without* the bias (the reference code multiplies pool3
by the ``softmax/logits/MatMul`` weights), samples split into ``splits`` (10) consecutive
groups, mean and standard deviation of the per-split scores. ``InceptionScore``
accumulates it batch by batch in float64 (per split: the sum of ``p(y|x)`` and of
``sum_y p log p``), so nothing per sample is kept; ``inception_score`` is the one-shot
reference form.

**Precision and recall** (Kynkäänniemi et al. 2019, "Improved precision and recall"):
each set's manifold is the union of balls around its feature vectors with radius the
distance to the ``k``-th nearest other vector of the same set (``k = 3``); precision is the
fraction of generated samples inside the real manifold, recall the fraction of real images
inside the generated one. Distances are Euclidean on the 2048-d pool3 features, computed
on the device in row blocks (``|a|^2 + |b|^2 - 2ab``, float32, highest matmul precision).
"""

from __future__ import annotations


import numpy as np

__all__ = ["InceptionScore", "inception_score", "knn_radii", "manifold_coverage",
           "precision_recall"]


def _softmax64(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _xlogx(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


class InceptionScore:
    """Streaming Inception Score over ``num`` samples, split into ``splits`` consecutive
    groups by sample index (split ``k`` holds samples ``k*num//splits`` to
    ``(k+1)*num//splits - 1``, as ``inception_score`` slices them), so the result does not
    depend on the batch size, the order of ``update`` calls or the process count."""

    def __init__(self, num: int, splits: int = 10, classes: int = 1008):
        if num < 1 or splits < 1:
            raise ValueError(f"need num >= 1 and splits >= 1, got num={num}, splits={splits}")
        if splits > num:
            raise ValueError(f"{splits} Inception Score splits need at least {splits} samples, got {num}")
        self.num, self.splits = int(num), int(splits)
        self._starts = np.arange(splits, dtype=np.int64) * self.num // self.splits
        self.count = np.zeros((splits,), np.int64)
        self.sum_p = np.zeros((splits, classes), np.float64)
        self.sum_plogp = np.zeros((splits,), np.float64)

    def update(self, logits, index) -> "InceptionScore":
        """``logits`` [n, classes] (unbiased, see the module doc) of samples with global
        indices ``index`` [n] (each in ``[0, num)``)."""
        index = np.asarray(index, np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.num):
            raise ValueError(f"sample indices must lie in [0, {self.num})")
        p = _softmax64(logits)
        split = np.searchsorted(self._starts, index, side="right") - 1
        np.add.at(self.count, split, 1)
        np.add.at(self.sum_p, split, p)
        np.add.at(self.sum_plogp, split, _xlogx(p).sum(axis=1))
        return self

    def merge(self, other: "InceptionScore") -> "InceptionScore":
        self.count += other.count
        self.sum_p += other.sum_p
        self.sum_plogp += other.sum_plogp
        return self

    def to_arrays(self) -> dict:
        """Copies of the accumulators (``from_arrays`` rebuilds it), e.g. to all-gather."""
        return {"count": self.count.copy(), "sum_p": self.sum_p.copy(), "sum_plogp": self.sum_plogp.copy()}

    @classmethod
    def from_arrays(cls, num: int, count, sum_p, sum_plogp) -> "InceptionScore":
        """The accumulator of :meth:`to_arrays`'s arrays (e.g. one process's, all-gathered)."""
        count = np.asarray(count, np.int64)
        sum_p = np.asarray(sum_p, np.float64)
        if count.ndim != 1 or sum_p.shape[:1] != count.shape or np.shape(sum_plogp) != count.shape:
            raise ValueError(f"inconsistent Inception Score arrays: count {count.shape}, "
                             f"sum_p {sum_p.shape}, sum_plogp {np.shape(sum_plogp)}")
        acc = cls(num, len(count), classes=sum_p.shape[-1])
        acc.count, acc.sum_p = count.copy(), sum_p.copy()
        acc.sum_plogp = np.asarray(sum_plogp, np.float64).copy()
        return acc

    def result(self) -> tuple[float, float]:
        """``(mean, std)`` of the per-split scores (every split must have samples)."""
        if np.any(self.count == 0):
            raise ValueError(f"Inception Score: splits without samples ({self.count.tolist()})")
        py = self.sum_p / self.count[:, None]
        kl = self.sum_plogp / self.count - _xlogx(py).sum(axis=1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """One-shot Inception Score of ``logits`` [N, classes] (all samples at once)."""
    p = _softmax64(logits)
    n = p.shape[0]
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(np.maximum(part, 1e-300)) - np.log(np.maximum(py, 1e-300)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall


def _blocked(fn, rows: np.ndarray, block: int, *args) -> np.ndarray:
    """``fn(row_block, *args)`` over fixed-size blocks of ``rows`` (the last one padded by
    repeating its last row, pad results dropped), so one compile serves every block."""
    out = []
    for i in range(0, rows.shape[0], block):
        chunk = rows[i:i + block]
        n = chunk.shape[0]
        if n < block:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], block - n, axis=0)])
        out.append(np.asarray(fn(chunk, *args))[:n])
    return np.concatenate(out)


def _sq_dists(a, b):
    import jax
    import jax.numpy as jnp

    ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * ab
    return jnp.maximum(d, 0.0)


_JITTED: dict = {}


def _kth_fn(k: int):
    import jax

    if ("kth", k) not in _JITTED:
        def kth(rows, x):  # the (k+1)-th smallest squared distance: the row itself is the first
            neg, _ = jax.lax.top_k(-_sq_dists(rows, x), k + 1)
            return -neg[:, -1]
        _JITTED[("kth", k)] = jax.jit(kth)
    return _JITTED[("kth", k)]


def _inside_fn():
    import jax
    import jax.numpy as jnp

    if "inside" not in _JITTED:
        _JITTED["inside"] = jax.jit(
            lambda q, ref, r2: jnp.any(_sq_dists(q, ref) <= r2[None, :], axis=1))
    return _JITTED["inside"]


def knn_radii(features, k: int = 3, block: int = 1024) -> np.ndarray:
    """Squared distance of each row of ``features`` [N, D] to its ``k``-th nearest other row."""
    f = np.asarray(features, np.float32)
    if f.ndim != 2 or f.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got shape {f.shape}")
    return _blocked(_kth_fn(int(k)), f, min(block, f.shape[0]), f)


def manifold_coverage(reference, radii, query, block: int = 1024) -> float:
    """Fraction of ``query`` rows inside the union of balls around ``reference`` rows with
    squared radii ``radii``."""
    ref = np.asarray(reference, np.float32)
    q = np.asarray(query, np.float32)
    inside = _blocked(_inside_fn(), q, min(block, q.shape[0]), ref, np.asarray(radii, np.float32))
    return float(np.mean(inside))


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """``(precision, recall)`` of generated features ``fake`` against ``real`` (see the module doc)."""
    real = np.asarray(real, np.float32)
    fake = np.asarray(fake, np.float32)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"feature shapes differ: {real.shape} vs {fake.shape}")
    precision = manifold_coverage(real, knn_radii(real, k, block), fake, block)
    recall = manifold_coverage(fake, knn_radii(fake, k, block), real, block)
    return precision, recall

