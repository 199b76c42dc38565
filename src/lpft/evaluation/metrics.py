"""Accuracy, calibration and representation-change metrics.

Pure functions on numpy arrays (torch tensors are converted), computed in float64 so that
results do not depend on the dtype a model happened to produce. ``logits`` are ``[N, K]``
unnormalised scores, ``probs`` are ``[N, K]`` rows on the simplex and ``labels`` are
integer class indices ``[N]`` in ``[0, K)``. Bad inputs (shape mismatch, labels out of
range, NaN or inf) raise ``ValueError`` saying what is wrong, because a silently wrong
metric is worse than a crash.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

# Rows of ``probs`` must sum to 1 within this; loose enough for float32 softmax over many
# classes, tight enough to catch logits passed where probabilities are expected.
_SIMPLEX_ATOL = 1e-3
# fit_temperature searches log T in this interval, i.e. T in [e^-5, e^5] ~ [0.0067, 148].
_LOG_T_BOUNDS = (-5.0, 5.0)
ECE_BINS = 15  # equal-width confidence bins of every ECE and reliability diagram lpft reports


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        t = x.detach().cpu()
        x = t.double().numpy() if t.is_floating_point() else t.numpy()
    return np.asarray(x)


def _matrix(x: Any, name: str) -> np.ndarray:
    """Validate a non-empty, finite, 2-D real array and return it as float64."""
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf value(s), first in row {row}")
    return arr


def _labels(labels: Any, n: int, k: int) -> np.ndarray:
    """Validate integer labels of length ``n`` in ``[0, k)`` and return them as int64."""
    arr = _to_numpy(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {arr.dtype}")
    if arr.shape[0] != n:
        raise ValueError(f"shape mismatch: {n} rows of scores but {arr.shape[0]} labels")
    out = (arr < 0) | (arr >= k)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(
            f"labels must lie in [0, {k}) for {k} classes; {int(out.sum())} do not, "
            f"first label[{i}] = {int(arr[i])}"
        )
    return arr.astype(np.int64, copy=False)


def _logits_and_labels(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = _matrix(logits, "logits")
    return z, _labels(labels, *z.shape)


def _probs_and_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _matrix(probs, "probs")
    if (p < 0).any() or (p > 1 + _SIMPLEX_ATOL).any():
        raise ValueError("probs must lie in [0, 1]; did you pass logits? Apply softmax(logits) first")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1) > _SIMPLEX_ATOL
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(
            f"probs rows must sum to 1, row {i} sums to {sums[i]:.6g}; "
            "did you pass logits? Apply softmax(logits) first"
        )
    return p, _labels(labels, *p.shape)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(z))) without overflow."""
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(_logsumexp(z) - z[np.arange(len(y)), y]))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _confidence_bins(p: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: its top-label confidence, whether it is correct, and its bin index.

    Bin i is (i/n, (i+1)/n]: ceil puts a confidence on an edge into the bin it closes.
    """
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return conf, correct, np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def _ece(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    conf, correct, idx = _confidence_bins(p, y, n_bins)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum_{i in b} (correct_i - conf_i)| / N
    gap = np.bincount(idx, weights=correct - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def _brier(p: np.ndarray, y: np.ndarray) -> float:
    d = p.copy()
    d[np.arange(len(y)), y] -= 1.0
    return float(np.mean((d**2).sum(axis=1)))


def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax of ``[N, K]`` logits in float64, shifted by the row max for stability."""
    return _softmax(_matrix(logits, "logits"))


def accuracy(logits: Any, labels: Any) -> float:
    """Fraction of rows whose argmax (first index on ties) equals the label.

    Also valid for probabilities, since softmax preserves the argmax.
    """
    z, y = _logits_and_labels(logits, labels)
    return float(np.mean(z.argmax(axis=1) == y))


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error of probabilities ``probs`` ``[N, K]``.

    Confidence is the top probability and correctness whether its class is the label.
    Confidences fall into ``n_bins`` equal-width bins over (0, 1], bin ``i`` being
    ``(i/n_bins, (i+1)/n_bins]`` (a confidence of exactly 0 cannot occur on the simplex);
    the result is ``sum_b (n_b / N) * |accuracy_b - mean confidence_b|`` over non-empty
    bins. Pass probabilities, not logits: use :func:`softmax` first.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y = _probs_and_labels(probs, labels)
    return _ece(p, y, int(n_bins))


def negative_log_likelihood(logits: Any, labels: Any) -> float:
    """Mean cross-entropy ``-log softmax(logits)[label]`` (natural log), via logsumexp."""
    z, y = _logits_and_labels(logits, labels)
    return _nll(z, y)


def brier_score(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over rows of ``sum_k (p_k - onehot_k)^2``.

    This is the sum-over-classes form (range 0 to 2, 0 is perfect), not the
    per-class average some libraries report.
    """
    p, y = _probs_and_labels(probs, labels)
    return _brier(p, y)


def fit_temperature(logits: Any, labels: Any) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``logits / T`` on the given set.

    Fit on ID validation data. Optimises ``log T`` over ``[-5, 5]`` with a bounded 1-D
    search, then keeps ``T = 1`` if that is at least as good, so scaling by the returned
    temperature never increases the NLL on the fitting set.
    """
    z, y = _logits_and_labels(logits, labels)
    res = minimize_scalar(
        lambda s: _nll(z / math.exp(s), y), bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6}
    )
    t = math.exp(float(res.x))
    return t if _nll(z / t, y) < _nll(z, y) else 1.0


def calibration_report(logits: Any, labels: Any, temperature: float | None = None) -> dict[str, float]:
    """Accuracy and calibration of ``logits``, optionally also after temperature scaling.

    Returns ``accuracy``, ``ece`` (:data:`ECE_BINS` bins), ``nll`` and ``brier`` (see the functions of the
    same meaning). With ``temperature`` it adds ``temperature`` and ``ece_ts``, ``nll_ts``,
    ``brier_ts`` computed on ``logits / temperature``; accuracy is omitted there because a
    positive temperature does not change the argmax.
    """
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    z, y = _logits_and_labels(logits, labels)
    p = _softmax(z)
    report = {
        "accuracy": float(np.mean(z.argmax(axis=1) == y)),
        "ece": _ece(p, y, ECE_BINS),
        "nll": _nll(z, y),
        "brier": _brier(p, y),
    }
    if temperature is not None:
        t = float(temperature)
        zt = z / t
        pt = _softmax(zt)
        report.update(temperature=t, ece_ts=_ece(pt, y, ECE_BINS), nll_ts=_nll(zt, y), brier_ts=_brier(pt, y))
    return report


def reliability_bins(logits: Any, labels: Any, temperature: float = 1.0, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin: count, mean confidence and accuracy of ``logits / temperature`` (a reliability diagram).

    The bins of :func:`expected_calibration_error`, so ``sum_b count_b |accuracy_b -
    confidence_b| / N`` is that ECE. Empty bins hold NaN.
    """
    z, y = _logits_and_labels(logits, labels)
    conf, correct, idx = _confidence_bins(_softmax(z / temperature), y, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"count": count.tolist(), "confidence": confidence.tolist(), "accuracy": acc.tolist()}


def _centred_unit(m: np.ndarray, name: str) -> np.ndarray:
    """Centre the columns of ``m`` and scale it to unit Frobenius norm."""
    c = m - m.mean(axis=0)
    norm = np.linalg.norm(c)
    # Relative test: centring a constant float column can leave rounding residue, not signal.
    if norm <= 1e-10 * np.linalg.norm(m):
        raise ValueError(f"{name} has (numerically) zero variance after centring; CKA is undefined")
    return c / norm


def linear_cka(x: Any, y: Any) -> float:
    """Linear centred kernel alignment between features ``x`` ``[N, D1]`` and ``y`` ``[N, D2]``.

    With column-centred ``X``, ``Y``: ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, in
    [0, 1], invariant to isotropic scaling and orthogonal transforms of either side. Each
    matrix is scaled to unit Frobenius norm first (CKA is scale-free) so large features
    cannot overflow, and the cheaper of the equivalent feature-space (``D x D``) and
    Gram (``N x N``) forms is used, so ``N < D`` is fine.
    """
    a = _matrix(x, "x")
    b = _matrix(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"shape mismatch: x has {a.shape[0]} rows, y has {b.shape[0]}; rows must be the same examples"
        )
    n, d1 = a.shape
    d2 = b.shape[1]
    a, b = _centred_unit(a, "x"), _centred_unit(b, "y")
    # Feature-space form costs ~N(D1 D2 + D1^2 + D2^2) flops, the Gram form ~N^2 (D1 + D2).
    if d1 * d2 + d1 * d1 + d2 * d2 <= n * (d1 + d2):
        cross = np.sum((b.T @ a) ** 2)
        self_a, self_b = np.linalg.norm(a.T @ a), np.linalg.norm(b.T @ b)
    else:
        ka, kb = a @ a.T, b @ b.T
        cross = np.sum(ka * kb)
        self_a, self_b = np.linalg.norm(ka), np.linalg.norm(kb)
    return float(np.clip(cross / (self_a * self_b), 0.0, 1.0))


def feature_change(f0: Any, f1: Any) -> dict[str, float]:
    """How much per-example features moved from ``f0`` to ``f1`` (both ``[N, D]``).

    Returns
      ``mean_sq_change``: ``mean_i ||f1_i - f0_i||^2``;
      ``relative_change``: ``mean_i ||f1_i - f0_i||^2 / mean_i ||f0_i||^2`` (a ratio of
      means, so small-norm examples cannot dominate);
      ``cosine_distance``: ``mean_i (1 - cos(f0_i, f1_i))``, in [0, 2]; a pair with a zero
      vector has no angle and counts 0 if both are zero, else 1 (as if orthogonal);
      ``cka``: :func:`linear_cka` of ``f0`` and ``f1``.
    """
    a = _matrix(f0, "f0")
    b = _matrix(f1, "f1")
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: f0 is {a.shape}, f1 is {b.shape}; they must be the same examples and features"
        )
    sq = np.sum((b - a) ** 2, axis=1)
    base = np.mean(np.sum(a**2, axis=1))
    if base == 0:
        raise ValueError("f0 is all zeros; relative change is undefined")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both = (na > 0) & (nb > 0)
    cos = np.where(both, np.sum(a * b, axis=1) / np.where(both, na * nb, 1.0), 0.0)
    cos[(na == 0) & (nb == 0)] = 1.0
    return {
        "mean_sq_change": float(np.mean(sq)),
        "relative_change": float(np.mean(sq) / base),
        "cosine_distance": float(np.mean(1.0 - np.clip(cos, -1.0, 1.0))),
        "cka": linear_cka(a, b),
    }
