"""Synthetic cached features for testing and benchmarking the probe.

Real backbone features are non-negative-ish, unevenly scaled, strongly correlated (a few
directions carry most variance) and only partly separable. This mimics that: class means
in a low-rank subspace, shared low-rank "nuisance" variation, isotropic noise, per-feature
scales and offsets, and a little label noise, so that accuracies sit well between chance and
100% and the regularisation strength matters.
"""

from __future__ import annotations

import numpy as np


def make_features(
    n_train: int,
    n_val: int,
    n_test: int,
    d: int,
    k: int,
    *,
    rank: int = 32,
    separation: float = 1.0,
    label_noise: float = 0.05,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Float32 features and int64 labels for train/val/test splits (keys ``X_train``, ``y_train``, ...)."""
    rng = np.random.default_rng(seed)
    signal = np.linalg.qr(rng.normal(size=(d, rank)))[0]
    nuisance = np.linalg.qr(rng.normal(size=(d, rank)))[0]
    means = separation * rng.normal(size=(k, rank)) @ signal.T * np.sqrt(d / rank) / np.sqrt(d) * 3.0
    scales = np.exp(rng.normal(0.0, 0.5, size=d))
    offsets = rng.uniform(0.0, 1.0, size=d)
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        y = rng.integers(0, k, size=n)
        x = means[y] + rng.normal(size=(n, rank)) @ nuisance.T * 2.0 + rng.normal(size=(n, d)) * 0.5
        flip = rng.random(n) < label_noise
        y[flip] = rng.integers(0, k, size=int(flip.sum()))
        out[f"X_{split}"] = ((x * scales + offsets)).astype(np.float32)
        out[f"y_{split}"] = y.astype(np.int64)
    return out
