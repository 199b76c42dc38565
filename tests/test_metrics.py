"""Metrics against hand-computed values, their invariances and their input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lpft.evaluation.metrics import (
    accuracy,
    brier_score,
    calibration_report,
    expected_calibration_error,
    feature_change,
    fit_temperature,
    linear_cka,
    negative_log_likelihood,
    softmax,
)

LN2, LN3 = math.log(2), math.log(3)


def _sampled_task(seed: int, n: int = 2000, k: int = 5, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits), so the logits are calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, size=(n, k))
    p = softmax(z)
    u = rng.random((n, 1))
    y = np.minimum((u > np.cumsum(p, axis=1)).sum(axis=1), k - 1)
    return z, y


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook HSIC form with an explicit centring matrix: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.trace(k @ l_) / math.sqrt(np.trace(k @ k) * np.trace(l_ @ l_)))


# --- hand-computed values ---------------------------------------------------------------


def test_accuracy_hand() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0], [4.0, 0.0, 0.0]])
    # argmax = 0, 1, 2, 0 vs labels 0, 2, 2, 1 -> 2 of 4 correct
    assert accuracy(logits, np.array([0, 2, 2, 1])) == 0.5


def test_nll_hand_and_stable() -> None:
    logits = np.array([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [LN2, 0.0, 0.0], [1000.0, 0.0, 0.0]])
    labels = np.array([2, 0, 1, 0])
    # softmax rows: (1/3,1/3,1/3), (2/4,1/4,1/4), (2/4,1/4,1/4), (~1, ~0, ~0)
    # -log p[label]: ln 3 = 1.0986123, ln 2 = 0.6931472, ln 4 = 1.3862944, ~2e-434 = 0
    # mean = (1.0986123 + 0.6931472 + 1.3862944 + 0) / 4 = 0.7945135
    nll = negative_log_likelihood(logits, labels)
    assert nll == pytest.approx((LN3 + LN2 + 2 * LN2) / 4, abs=1e-12)
    assert nll == pytest.approx(0.7945135, abs=1e-7)
    # A per-row constant shift changes nothing (and 1e4 would overflow a naive exp).
    assert negative_log_likelihood(logits + 1e4, labels) == pytest.approx(nll, abs=1e-9)


def test_brier_hand() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 2, 1, 2])
    # row 0: 0.5^2 + 0.25^2 + 0.25^2 = 0.375
    # row 1: 0.1^2 + 0.2^2 + 0.3^2    = 0.14
    # row 2: 1^2 + 1^2 + 0^2          = 2      (confidently wrong: the maximum)
    # row 3: 0                                 (confidently right)
    # mean = 2.515 / 4 = 0.62875
    assert brier_score(probs, labels) == pytest.approx(0.62875, abs=1e-12)


def test_ece_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.08, 0.92], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 0])
    # confidence 0.9, 0.92, 0.7, 0.55; correct 1, 0, 1, 1. With 15 bins of width 1/15:
    #   0.9*15 = 13.5, 0.92*15 = 13.8 -> bin 13: acc 1/2, conf 0.91, |gap| 0.41, weight 2/4
    #   0.7*15 = 10.5                 -> bin 10: acc 1,   conf 0.7,  |gap| 0.30, weight 1/4
    #   0.55*15 = 8.25                -> bin 8:  acc 1,   conf 0.55, |gap| 0.45, weight 1/4
    # ECE = 0.5*0.41 + 0.25*0.30 + 0.25*0.45 = 0.205 + 0.075 + 0.1125 = 0.3925
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3925, abs=1e-12)
    # One bin: |mean acc - mean conf| = |3/4 - 3.07/4| = 0.0175
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.0175, abs=1e-12)


def test_ece_bin_edges_are_right_closed() -> None:
    # n_bins=4: bins (0,.25], (.25,.5], (.5,.75], (.75,1]; 0.5 and 1.0 are exact in binary.
    probs = np.array([[0.5, 0.5], [0.625, 0.375], [1.0, 0.0]])
    labels = np.array([0, 1, 0])
    # conf 0.5 (tie -> class 0, correct) is in (.25,.5]: |1 - 0.5|   = 0.5
    # conf 0.625 (wrong)               is in (.5,.75]:  |0 - 0.625| = 0.625
    # conf 1.0 (correct)               is in (.75,1]:   |1 - 1|     = 0
    # ECE = (0.5 + 0.625 + 0) / 3 = 0.375. Left-closed bins would merge the first two:
    # |0.5 - 0.5625| * 2/3 = 0.041667.
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.375, abs=1e-12)


def test_ece_zero_when_perfectly_calibrated() -> None:
    # 10 rows at confidence 0.8 with 8 correct; 4 rows at confidence 0.75 with 3 correct.
    probs = np.array([[0.8, 0.2]] * 10 + [[0.25, 0.75]] * 4)
    labels = np.array([0] * 8 + [1] * 2 + [1] * 3 + [0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_cka_hand() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # column means 0
    y = np.array([[2.0], [0.0], [1.0], [-3.0]])  # mean 0
    # Y^T X = [2*1 + 1*(-1), (-3)*(-1)] = [1, 3]  -> ||.||_F^2 = 10
    # X^T X = diag(2, 2) -> ||.||_F = 2*sqrt(2);  Y^T Y = 4 + 1 + 9 = 14
    # CKA = 10 / (2*sqrt(2) * 14) = 0.2525381
    assert linear_cka(x, y) == pytest.approx(10 / (28 * math.sqrt(2)), abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(0.2525381, abs=1e-7)
    # Uncentred inputs are centred first.
    assert linear_cka(x + [5.0, -3.0], y + 7.0) == pytest.approx(0.2525381, abs=1e-7)


def test_feature_change_hand() -> None:
    f0 = np.array([[1.0, 0.0], [0.0, 2.0]])
    f1 = np.array([[1.0, 1.0], [0.0, -2.0]])
    # ||f1 - f0||^2: 1, 16 -> mean 8.5;  ||f0||^2: 1, 4 -> mean 2.5;  relative 8.5 / 2.5 = 3.4
    # cos: 1 / (1 * sqrt 2) = 0.7071068 -> 0.2928932;  -4 / (2 * 2) = -1 -> 2
    # mean cosine distance = (0.2928932 + 2) / 2 = 1.1464466
    # CKA: with N = 2 both centred matrices are rank 1 (rows r and -r), so CKA = 1.
    out = feature_change(f0, f1)
    assert out["mean_sq_change"] == pytest.approx(8.5, abs=1e-12)
    assert out["relative_change"] == pytest.approx(3.4, abs=1e-12)
    assert out["cosine_distance"] == pytest.approx(1 - 0.5 / math.sqrt(2) + 0.5, abs=1e-12)
    assert out["cosine_distance"] == pytest.approx(1.1464466, abs=1e-7)
    assert out["cka"] == pytest.approx(1.0, abs=1e-12)


def test_feature_change_zero_rows_and_identity() -> None:
    rng = np.random.default_rng(0)
    f0 = rng.normal(size=(20, 6))
    same = feature_change(f0, f0)
    assert same["mean_sq_change"] == 0.0 and same["relative_change"] == 0.0
    assert same["cosine_distance"] == pytest.approx(0.0, abs=1e-12)
    assert same["cka"] == pytest.approx(1.0, abs=1e-12)
    # A zero vector has no angle: both zero -> distance 0; one zero -> 1.
    a = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    b = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
    assert feature_change(a, b)["cosine_distance"] == pytest.approx((0 + 1 + 0) / 3, abs=1e-12)


# --- invariances and properties ----------------------------------------------------------


def test_cka_invariances() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    y = x @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(50, 5))
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(3.7 * x, 1e-3 * y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(1e150 * x, y) == pytest.approx(base, abs=1e-12)  # no overflow
    assert linear_cka(y, x) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("n", "d1", "d2"), [(200, 3, 4), (10, 50, 40), (12, 2, 300)])
def test_cka_both_forms_match_reference(n: int, d1: int, d2: int) -> None:
    # (200, 3, 4) takes the feature-space form; the wide shapes (N < D) take the Gram form.
    rng = np.random.default_rng(n + d1 + d2)
    x, y = rng.normal(size=(n, d1)), rng.normal(size=(n, d2))
    assert linear_cka(x, y) == pytest.approx(_reference_cka(x, y), abs=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("stretch", [1.0, 3.0, 1 / 3])
def test_temperature_never_increases_nll(seed: int, stretch: float) -> None:
    # stretch 1: calibrated; 3: over-confident; 1/3: under-confident.
    z, y = _sampled_task(seed)
    logits = z * stretch
    t = fit_temperature(logits, y)
    assert t > 0
    assert negative_log_likelihood(logits / t, y) <= negative_log_likelihood(logits, y)
    if stretch > 1:
        assert t > 1.5  # over-confident -> soften (true value is 3)
    elif stretch < 1:
        assert t < 0.7  # under-confident -> sharpen (true value is 1/3)
    else:
        assert t == pytest.approx(1.0, abs=0.15)


def test_temperature_edge_cases() -> None:
    # Separable with a margin: NLL falls towards 0 as T -> 0 (flat once it underflows).
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, 1.0]])
    labels = np.array([0, 1, 0])
    t = fit_temperature(logits, labels)
    assert math.exp(-5) * (1 - 1e-9) <= t < 0.2
    assert negative_log_likelihood(logits / t, labels) <= negative_log_likelihood(logits, labels)
    # Constant logits: every T gives ln K, so nothing beats T = 1.
    assert fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0])) == 1.0


def test_calibration_report() -> None:
    z, y = _sampled_task(7, n=500)
    logits = 3.0 * z
    plain = calibration_report(logits, y)
    assert set(plain) == {"accuracy", "ece", "nll", "brier"}
    p = softmax(logits)
    assert plain["accuracy"] == accuracy(logits, y)
    assert plain["ece"] == expected_calibration_error(p, y)
    assert plain["nll"] == negative_log_likelihood(logits, y)
    assert plain["brier"] == brier_score(p, y)
    t = fit_temperature(logits, y)
    scaled = calibration_report(logits, y, temperature=t)
    assert set(scaled) == set(plain) | {"temperature", "ece_ts", "nll_ts", "brier_ts"}
    assert {k: scaled[k] for k in plain} == plain
    assert scaled["nll_ts"] <= plain["nll"]
    assert scaled["ece_ts"] < plain["ece"]  # the over-confidence was the miscalibration


def test_softmax_rows_and_torch_inputs() -> None:
    torch = pytest.importorskip("torch")
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0]])
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0])
    labels = np.array([2, 1])
    zt, yt = torch.tensor(logits, dtype=torch.float32, requires_grad=True), torch.tensor(labels)
    assert accuracy(zt, yt) == accuracy(logits, labels)
    assert negative_log_likelihood(zt, yt) == pytest.approx(negative_log_likelihood(logits, labels), rel=1e-6)
    # Row 1 ties classes 0 and 1; argmax takes the first, so it is wrong for label 1.
    assert calibration_report(zt.to(torch.bfloat16), yt)["accuracy"] == 0.5


# --- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: accuracy(np.zeros((4, 3)), np.zeros(3, dtype=int)), "shape mismatch: 4 rows of scores but 3 labels"),
        (lambda: accuracy(np.zeros(4), np.zeros(4, dtype=int)), r"logits must be 2-D \[N, K\]"),
        (lambda: accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int)), "must be non-empty"),
        (lambda: negative_log_likelihood(np.zeros((2, 3)), np.array([0, 3])), r"labels must lie in \[0, 3\)"),
        (lambda: negative_log_likelihood(np.zeros((2, 3)), np.array([-1, 0])), r"first label\[0\] = -1"),
        (lambda: accuracy(np.zeros((2, 3)), np.array([0.0, 1.0])), "labels must be integer class indices"),
        (lambda: negative_log_likelihood(np.array([[0.0, np.nan]]), np.array([0])), "logits contains 1 NaN/inf"),
        (lambda: fit_temperature(np.array([[0.0, 1.0], [np.inf, 0.0]]), np.array([0, 1])), "first in row 1"),
        (lambda: brier_score(np.array([[0.2, 0.2]]), np.array([0])), "rows must sum to 1.*softmax"),
        (lambda: expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0])), r"must lie in \[0, 1\]"),
        (lambda: expected_calibration_error(np.array([[0.5, 0.5]]), np.array([0]), n_bins=0), "n_bins"),
        (lambda: calibration_report(np.zeros((2, 2)), np.array([0, 1]), temperature=0.0), "temperature"),
        (lambda: linear_cka(np.zeros((4, 2)), np.zeros((5, 2))), "x has 4 rows, y has 5"),
        (lambda: linear_cka(np.ones((4, 2)), np.eye(4)), "x has .*zero variance"),
        (lambda: feature_change(np.zeros((4, 2)), np.zeros((4, 3))), "f0 is .4, 2., f1 is .4, 3."),
        (lambda: feature_change(np.zeros((4, 2)), np.eye(4, 2)), "f0 is all zeros"),
    ],
)
def test_bad_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
