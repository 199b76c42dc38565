"""LinearProbe as a scikit-learn estimator: sklearn's own checks, fit without validation data,
clone / Pipeline / cross_val_score, string and binary labels, bad parameters, and the
explicit-validation fit (the paper's protocol) unchanged by all of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from lpft.errors import ConfigError
from lpft.probe import LinearProbe
from lpft.probe.linear_probe import _stratified_split
from lpft.probe.synthetic import make_features


# Every check passes, so no expected_failed_checks are given. (Two are skipped where their
# optional dependencies are missing: pandas, and SCIPY_ARRAY_API for the array-API check.)
@parametrize_with_checks([LinearProbe(device="cpu")])
def test_sklearn_estimator_checks(estimator: LinearProbe, check) -> None:
    check(estimator)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return make_features(600, 300, 300, 16, 4, rank=4, separation=0.7, seed=7)


def test_fit_alone_chooses_C_on_a_stratified_holdout_then_refits_on_all_rows(data: dict[str, np.ndarray]) -> None:
    X, y = data["X_train"], data["y_train"]
    probe = LinearProbe(device="cpu").fit(X, y)
    assert probe.best_C_ in [r["C"] for r in probe.path_]
    assert all(np.isfinite(r["val_acc"]) for r in probe.path_)
    assert probe.val_accuracy_ == max(r["val_acc"] for r in probe.path_)
    np.testing.assert_array_equal(probe.classes_, np.arange(4))
    assert probe.n_features_in_ == 16 and probe.coef_.shape == (4, 16)
    # The head is the fit on ALL rows at best_C_: the same optimum as a tight fit there from
    # scratch, with the normalisation of all rows.
    ref = LinearProbe([probe.best_C_], device="cpu", tol=1e-8).fit(X, y)
    assert float(probe.mean_[0]) == pytest.approx(float(X.astype(np.float64).mean()), rel=1e-6)
    assert probe.objective_ == pytest.approx(ref.objective_, rel=1e-5)
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-2, atol=1e-3)
    # The refit costs passes over all rows, counted with the search's.
    assert probe.n_passes_ > sum(r["n_passes"] for r in probe.path_)
    # It generalises about as well as the paper's protocol on the held-out validation set.
    explicit = LinearProbe(device="cpu").fit(X, y, data["X_val"], data["y_val"])
    assert probe.score(data["X_test"], data["y_test"]) >= explicit.score(data["X_test"], data["y_test"]) - 0.03
    # Seeded: a second fit is identical.
    again = LinearProbe(device="cpu").fit(X, y)
    np.testing.assert_array_equal(again.coef_, probe.coef_)
    assert [r["C"] for r in again.path_] == [r["C"] for r in probe.path_]


def test_stratified_split() -> None:
    y = np.repeat(np.arange(5), [50, 30, 7, 1, 2])
    train, val = _stratified_split(y, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert len(val) == round(0.2 * len(y))
    per_class = np.bincount(y[val], minlength=5)
    counts = np.bincount(y)
    assert np.all(per_class >= np.minimum(np.floor(0.2 * counts), counts - 1))
    assert np.all(per_class <= np.minimum(np.ceil(0.2 * counts), counts - 1))
    assert set(y[train]) == set(range(5))  # every class keeps a training row
    np.testing.assert_array_equal(_stratified_split(y, 0.2, seed=0)[1], val)
    assert not np.array_equal(_stratified_split(y, 0.2, seed=1)[1], val)


def test_too_few_rows_to_hold_out_any() -> None:
    X, y = np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0, 1])
    with pytest.raises(ValueError, match="validation rows"):
        LinearProbe(device="cpu").fit(X, y)
    assert LinearProbe([1.0], device="cpu").fit(X, y).predict(X).tolist() == [0, 1]


def test_clone_params_pipeline_and_cross_val_score(data: dict[str, np.ndarray]) -> None:
    X, y = data["X_train"], data["y_train"]
    probe = LinearProbe([0.1, 1.0], device="cpu", validation_fraction=0.3)
    assert probe.get_params()["Cs"] == [0.1, 1.0] and probe.get_params()["validation_fraction"] == 0.3
    twin = clone(probe).set_params(seed=5)
    assert twin.get_params()["Cs"] == [0.1, 1.0] and twin.seed == 5 and probe.seed == 0
    assert not hasattr(clone(probe.fit(X, y)), "coef_")
    pipe = make_pipeline(StandardScaler(), LinearProbe(device="cpu", normalize="none")).fit(X, y)
    assert pipe.score(data["X_test"], data["y_test"]) > 0.5  # chance: 0.25
    scores = cross_val_score(LinearProbe(device="cpu"), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.5


def test_string_labels_match_integer_labels(data: dict[str, np.ndarray]) -> None:
    names = np.array(["cat", "dog", "eel", "fox"])
    X, y, Xv, yv = data["X_train"], data["y_train"], data["X_val"], data["y_val"]
    for args, named in (((X, y), (X, names[y])), ((X, y, Xv, yv), (X, names[y], Xv, names[yv]))):
        ints = LinearProbe(device="cpu").fit(*args)
        strs = LinearProbe(device="cpu").fit(*named)
        np.testing.assert_array_equal(strs.classes_, names)
        np.testing.assert_array_equal(strs.coef_, ints.coef_)
        assert strs.best_C_ == ints.best_C_
        np.testing.assert_array_equal(strs.predict(Xv), names[ints.predict(Xv)])
        assert strs.score(Xv, names[yv]) == ints.score(Xv, yv)


def test_binary_decision_function_is_the_margin(data: dict[str, np.ndarray]) -> None:
    keep = data["y_train"] < 2
    X, y = data["X_train"][keep], np.where(data["y_train"][keep] == 1, "yes", "no")
    probe = LinearProbe(device="cpu").fit(X, y)
    assert probe.coef_.shape == (2, X.shape[1])  # both rows, as to_linear and LP-FT need
    margin = probe.decision_function(data["X_test"])
    logits = data["X_test"].astype(np.float64) @ probe.coef_.T + probe.intercept_
    assert margin.shape == (len(data["X_test"]),)
    np.testing.assert_allclose(margin, logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(probe.predict(data["X_test"]), np.where(margin > 0, "yes", "no"))
    np.testing.assert_array_equal(probe.predict_proba(data["X_test"])[:, 1] > 0.5, margin > 0)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"normalize": "l2"}, "normalize"),
        ({"Cs": []}, "Cs"),
        ({"Cs": [0.1, -1.0]}, "Cs"),
        ({"C_range": (1.0, 1e-3)}, "C_range"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"max_iter": 0}, "max_iter"),
        ({"precision": "float16"}, "precision"),
        ({"device": "no-such-device"}, "device"),
    ],
)
def test_bad_parameters_raise_config_error_in_fit(params: dict, name: str) -> None:
    probe = LinearProbe(**params)  # sklearn's convention: __init__ stores, fit checks
    assert probe.get_params()[name] == params[name]
    with pytest.raises(ConfigError, match=name):
        probe.fit(np.eye(4), [0, 1, 0, 1])


# The probe's fit before it became a scikit-learn estimator, on this problem with explicit
# validation data (the paper's protocol): the path, the choice and the head must not change.
# (On the machine that recorded them they match bit for bit; another BLAS may round differently.)
REFERENCE_PATH_CS = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 3.1622776601683795, 5.623413251903491, 4.216965034285823]
REFERENCE_BEST_C = 5.623413251903491
REFERENCE_VAL_ACCURACY = 0.7933333333333333
REFERENCE_N_PASSES = 162.0
REFERENCE_COEF = [
    [-2.401209976987406, 0.2912176445112452, 0.8477288265203355, 0.6857066587172226,
     1.0585153041263287, -0.25399589880318996, -1.266100344916348, 1.6679587122667598],
    [-0.4464259656842889, -0.2686018095618844, 0.011322856031407808, -0.18973144115812224,
     -0.30762897855130306, 0.17674784503710764, 0.3648637989087436, 0.21639414848468885],
    [2.847637368516833, -0.02261795659596687, -0.8590529301492686, -0.4959759724507635,
     -0.7508855003115683, 0.07724318516869687, 0.9012378128164724, -1.8843524385656747],
]
REFERENCE_INTERCEPT = [6.938815913141634, 5.689531347263828, 1.185663967535306]


def test_explicit_validation_fit_is_unchanged() -> None:
    small = make_features(300, 150, 0, 8, 3, rank=4, separation=0.8, seed=11)
    probe = LinearProbe(device="cpu").fit(small["X_train"], small["y_train"], small["X_val"], small["y_val"])
    assert [r["C"] for r in probe.path_] == REFERENCE_PATH_CS
    assert probe.best_C_ == REFERENCE_BEST_C
    assert probe.val_accuracy_ == REFERENCE_VAL_ACCURACY
    assert probe.n_passes_ == REFERENCE_N_PASSES
    np.testing.assert_allclose(probe.coef_, REFERENCE_COEF, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(probe.intercept_, REFERENCE_INTERCEPT, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_in_match_numpy(data: dict[str, np.ndarray]) -> None:
    """Tensors on the GPU are checked and split there, not copied to the host for sklearn."""
    X, y = data["X_train"], data["y_train"]
    ref = LinearProbe(device="cuda").fit(X, y)
    got = LinearProbe(device="cuda").fit(torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda())
    assert got.best_C_ == pytest.approx(ref.best_C_)
    np.testing.assert_allclose(got.coef_, ref.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.predict(torch.from_numpy(data["X_test"]).cuda()), ref.predict(data["X_test"]))
    with pytest.raises(ValueError, match="NaN"):
        LinearProbe(device="cuda").fit(torch.full((8, 3), float("nan"), device="cuda"), torch.arange(8) % 2)
