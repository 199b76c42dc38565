"""The linear probe: its API, objective parity with sklearn, the path's choice, CPU/GPU agreement."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from lpft.probe import LinearProbe, fit_logistic
from lpft.probe.solver import Preconditioner, curvature_product, loss_and_grad
from lpft.probe.synthetic import make_features


@pytest.fixture(autouse=True)
def single_thread_blas():
    """sklearn's BLAS threads spin against torch's on small problems; one thread is ~10x faster here."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return make_features(2000, 1000, 1000, 48, 6, rank=8, separation=0.6, seed=3)


def objective(Z: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """sklearn's objective C * sum CE + 0.5 ||W||^2, computed independently in float64."""
    L = Z.astype(np.float64) @ coef.T + intercept
    return float(C * np.sum(logsumexp(L, axis=1) - L[np.arange(len(y)), y]) + 0.5 * np.sum(coef**2))


def scalar_normalised(X: np.ndarray) -> np.ndarray:
    return ((X.astype(np.float64) - X.mean(dtype=np.float64)) / X.std(dtype=np.float64)).astype(np.float32)


@pytest.mark.parametrize("C", [1e-4, 3e-2, 10.0])
def test_fixed_C_objective_matches_tight_sklearn(data: dict[str, np.ndarray], C: float) -> None:
    Z, y = scalar_normalised(data["X_train"]), data["y_train"]
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(Z.astype(np.float64), y)
    probe = fit_logistic(Z, y, C, device="cpu")
    f_ref = objective(Z, y, ref.coef_, ref.intercept_, C)
    f_probe = objective(Z, y, probe.coef_, probe.intercept_, C)
    assert f_probe <= f_ref * (1 + 1e-4)
    assert probe.objective_ == pytest.approx(f_probe, rel=1e-5)
    assert probe.path_[0]["converged"]


@pytest.mark.parametrize("rows", [9, 40])  # fewer rows than columns (Gram factoring), and more
def test_preconditioner_inverts_the_kronecker_operator(rows: int) -> None:
    """apply(Sigma G A + lam G) == G, with Sigma the second moment of [z, 1] and A the softmax curvature."""
    gen = torch.Generator().manual_seed(0)
    zs = torch.randn(rows, 15, generator=gen)
    ps = torch.softmax(torch.randn(rows, 4, generator=gen), 1)
    lam = 0.3
    pre = Preconditioner(zs)
    z1 = torch.cat([zs, torch.ones(rows, 1)], 1).double()
    sigma = z1.T @ z1 / rows
    p = ps.double()
    A = torch.diag(p.mean(0)) - p.T @ p / rows
    G = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    got = pre.apply(sigma @ G @ A + lam * G, pre.factor(ps, lam))
    torch.testing.assert_close(got, G, rtol=1e-3, atol=1e-3)


def test_few_shot_fit_with_more_features_than_rows() -> None:
    """n < d: the preconditioner works in the rows' span (and lambda I outside it)."""
    data = make_features(60, 10, 10, 200, 5, rank=8, separation=0.8, seed=5)
    Z, y, C = scalar_normalised(data["X_train"]), data["y_train"], 0.1
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(Z.astype(np.float64), y)
    probe = fit_logistic(Z, y, C, device="cpu")
    assert objective(Z, y, probe.coef_, probe.intercept_, C) <= objective(Z, y, ref.coef_, ref.intercept_, C) * (1 + 1e-6)
    assert probe.path_[0]["converged"]


def test_scalar_normalisation_head_is_in_raw_space(data: dict[str, np.ndarray]) -> None:
    """Fitting raw X with scalar normalisation equals fitting the normalised X, mapped back."""
    X, y, C = data["X_train"], data["y_train"], 1e-2
    probe = LinearProbe([C], device="cpu").fit(X, y)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(scalar_normalised(X).astype(np.float64), y)
    f_ref = objective(scalar_normalised(X), y, ref.coef_, ref.intercept_, C)
    assert probe.objective_ <= f_ref * (1 + 1e-4)
    raw_logits = X.astype(np.float64) @ probe.coef_.T + probe.intercept_
    norm_logits = scalar_normalised(X).astype(np.float64) @ ref.coef_.T + ref.intercept_
    shift = raw_logits - norm_logits  # logits are defined up to a per-row constant
    assert np.abs(shift - shift.mean(1, keepdims=True)).max() < 1e-2
    np.testing.assert_allclose(probe.decision_function(X), raw_logits, rtol=1e-4, atol=1e-3)


def test_feature_normalisation_maps_back(data: dict[str, np.ndarray]) -> None:
    X, y = data["X_train"], data["y_train"]
    probe = LinearProbe([1e-2], normalize="feature", device="cpu").fit(X, y)
    Z = (X - probe.mean_) / probe.std_
    W = probe.coef_ * probe.std_  # back to the normalised space
    b = probe.intercept_ + probe.mean_ / probe.std_ @ W.T
    assert objective(Z, y, W, b, 1e-2) == pytest.approx(probe.objective_, rel=1e-5)


def reference_protocol(data: dict[str, np.ndarray]) -> tuple[float, float]:
    """The paper's path: 50 C in [1e-7, 1e2], warm-started lbfgs with 20 iterations each."""
    mu, sd = data["X_train"].mean(), data["X_train"].std()
    Z, Zv = (data["X_train"] - mu) / sd, (data["X_val"] - mu) / sd
    clf = LogisticRegression(warm_start=True, max_iter=20)
    best = (-1.0, 0.0)
    for C in np.logspace(-7, 2, 50):
        clf.set_params(C=C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 20-iteration cap is the protocol
            clf.fit(Z, data["y_train"])
        best = max(best, (clf.score(Zv, data["y_val"]), -C))
    return best[0], -best[1]


def test_path_val_accuracy_matches_reference_protocol(data: dict[str, np.ndarray]) -> None:
    ref_val, ref_C = reference_protocol(data)
    probe = LinearProbe(device="cpu").fit(data["X_train"], data["y_train"], data["X_val"], data["y_val"])
    assert 0.3 < ref_val < 0.99  # the case is neither trivial nor hopeless
    assert probe.val_accuracy_ >= ref_val - 0.003
    assert probe.score(data["X_val"], data["y_val"]) == pytest.approx(probe.val_accuracy_, abs=1e-9)
    assert 1e-7 <= probe.best_C_ <= 1e2
    # Fewer fits than the reference's 50, and the chosen C is one the path actually tried.
    assert len(probe.path_) < 25
    assert probe.best_C_ in [r["C"] for r in probe.path_]


def test_normalisation_moments_survive_large_offsets() -> None:
    """Chunked float32 moments: a feature with a large mean and a small spread keeps its std."""
    rng = np.random.default_rng(0)
    X = (100.0 + 0.01 * rng.standard_normal((3000, 5))).astype(np.float32)
    X[:, 0] = rng.standard_normal(3000)  # and one ordinary feature
    y = rng.integers(0, 3, 3000)
    X64 = X.astype(np.float64)
    per_feature = LinearProbe([1.0], normalize="feature", device="cpu", chunk_rows=700).fit(X, y)
    np.testing.assert_allclose(per_feature.mean_, X64.mean(0), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(per_feature.std_, X64.std(0), rtol=1e-4)
    scalar = LinearProbe([1.0], device="cpu", chunk_rows=700).fit(X, y)
    assert float(scalar.mean_[0]) == pytest.approx(X64.mean(), rel=1e-7)
    assert float(scalar.std_[0]) == pytest.approx(X64.std(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_curvature_product_matches_autograd(dtype: torch.dtype) -> None:
    """The CG's Hessian-vector product equals autograd's: the blocked CPU path (float32) and the
    plain one (other dtypes and devices)."""
    gen = torch.Generator().manual_seed(0)
    m, d, k = 1300, 7, 4  # 1300 rows: five full blocks of 256 and a ragged one
    Z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (m,), generator=gen)
    theta, v = torch.randn(d + 1, k, generator=gen, dtype=torch.float64), torch.randn(d + 1, k, generator=gen, dtype=torch.float64)

    def mean_ce(th: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(Z @ th[:-1] + th[-1], y)

    _, ref = torch.autograd.functional.hvp(mean_ce, theta, v)
    ps = torch.softmax(Z @ theta[:-1] + theta[-1], 1).to(torch.float32 if dtype == torch.float32 else dtype)
    u, hv = curvature_product(Z.to(dtype), ps, v)
    torch.testing.assert_close(hv, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(u.double(), Z @ v[:-1] + v[-1], rtol=1e-4, atol=1e-5)


def test_walk_goes_down_when_its_start_is_best() -> None:
    """Uninformative features: the prior (smallest C, lowest validation loss) wins, so the walk,
    which starts at the data's curvature scale, must turn and walk down to it."""
    rng = np.random.default_rng(0)
    X, Xv = rng.standard_normal((3000, 20)).astype(np.float32), rng.standard_normal((1000, 20)).astype(np.float32)
    y, yv = (rng.random(3000) < 0.3).astype(int), (rng.random(1000) < 0.3).astype(int)
    probe = LinearProbe(device="cpu").fit(X, y, Xv, yv)
    start = probe.path_[0]["C"]
    assert start >= 1e-5  # the walk did not start at the bottom of the range
    assert probe.best_C_ < start / 100
    assert min(r["C"] for r in probe.path_) == pytest.approx(1e-7)


def test_api_shapes_and_consistency(data: dict[str, np.ndarray]) -> None:
    X, y, Xv, yv = data["X_train"], data["y_train"], data["X_val"], data["y_val"]
    probe = LinearProbe(Cs=[1e-3, 1e-1], device="cpu").fit(X, y, Xv, yv)
    k, d = 6, X.shape[1]
    assert probe.coef_.shape == (k, d) and probe.intercept_.shape == (k,)
    assert [r["C"] for r in probe.path_] == [1e-3, 1e-1]
    assert set(probe.path_[0]) >= {"C", "train_acc", "val_acc", "objective", "loss"}
    proba = probe.predict_proba(Xv)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1), probe.predict(Xv))
    assert probe.score(Xv, yv) == pytest.approx(float((probe.predict(Xv) == yv).mean()))
    layer = probe.to_linear()
    with torch.no_grad():
        np.testing.assert_allclose(layer(torch.from_numpy(Xv)).numpy(), probe.decision_function(Xv), rtol=1e-4, atol=1e-4)
    # Torch tensors in, same fit out.
    t = LinearProbe(Cs=[1e-3, 1e-1], device="cpu").fit(
        torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(Xv), torch.from_numpy(yv)
    )
    np.testing.assert_allclose(t.coef_, probe.coef_, rtol=1e-6, atol=1e-8)


def test_missing_class_and_label_checks(data: dict[str, np.ndarray]) -> None:
    X, y = data["X_train"], data["y_train"]
    keep = y != 5
    probe = LinearProbe([1e-2], device="cpu").fit(X[keep], y[keep], n_classes=7)
    assert probe.coef_.shape == (7, X.shape[1]) and probe.n_classes_ == 7
    np.testing.assert_array_equal(probe.classes_, np.arange(7))
    assert not np.isin(probe.predict(X[keep]), [5, 6]).any()
    # Also when C is chosen on the probe's own hold-out, and with the count given to the constructor.
    held_out = LinearProbe(device="cpu", n_classes=7).fit(X[keep], y[keep])
    assert held_out.coef_.shape == (7, X.shape[1])
    np.testing.assert_array_equal(held_out.classes_, np.arange(7))
    with pytest.raises(ValueError, match="labels"):
        LinearProbe([1e-2], device="cpu").fit(X, y, n_classes=3)
    with pytest.raises(ValueError, match="X_val and y_val"):
        LinearProbe(device="cpu").fit(X, y, X)


def test_streamed_memmap_matches_in_memory(data: dict[str, np.ndarray], tmp_path) -> None:
    X, y = data["X_train"], data["y_train"]
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
    mm[:] = X
    mm.flush()
    ref = LinearProbe([1e-2], device="cpu").fit(X, y)
    streamed = LinearProbe([1e-2], device="cpu", chunk_rows=300).fit(mm, y)
    assert streamed.objective_ == pytest.approx(ref.objective_, rel=1e-6)
    np.testing.assert_allclose(streamed.coef_, ref.coef_, rtol=1e-3, atol=1e-5)


def test_bfloat16_features_run_the_device_generic_path(data: dict[str, np.ndarray]) -> None:
    """bf16 features skip the CPU-only numpy kernels and take the torch code CUDA runs; on CPU this
    checks that path end to end (the path search, warm starts, preconditioner) against float32."""
    args = (data["X_train"], data["y_train"], data["X_val"], data["y_val"])
    f32 = LinearProbe(device="cpu").fit(*args)
    bf16 = LinearProbe(device="cpu", precision="bfloat16").fit(*args)
    assert abs(bf16.val_accuracy_ - f32.val_accuracy_) <= 0.01
    assert abs(math.log10(bf16.best_C_ / f32.best_C_)) <= 0.5
    agree = (bf16.predict(data["X_test"]) == f32.predict(data["X_test"])).mean()
    assert agree >= 0.97


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(data: dict[str, np.ndarray]) -> None:
    args = (data["X_train"], data["y_train"], data["X_val"], data["y_val"])
    cpu = LinearProbe(device="cpu").fit(*args)
    gpu = LinearProbe(device="cuda").fit(*args)
    assert gpu.best_C_ == pytest.approx(cpu.best_C_)
    assert gpu.objective_ == pytest.approx(cpu.objective_, rel=1e-5)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu.predict_proba(data["X_test"]), cpu.predict_proba(data["X_test"]), atol=1e-4)


def test_loss_and_grad_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(300, 17, generator=gen), torch.randint(0, 5, (300,), generator=gen)
    W = torch.randn(17, 5, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    loss, gW, gb = loss_and_grad(X, y, W.detach(), b.detach(), chunk_rows=128)
    ref = torch.nn.functional.cross_entropy(X @ W + b, y)
    ref.backward()
    assert float(loss) == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(gW, W.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_bf16_loss_and_grad_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(4000, 64, generator=gen), torch.randint(0, 10, (4000,), generator=gen)
    W, b = 0.1 * torch.randn(64, 10, generator=gen), torch.randn(10, generator=gen)
    ref = loss_and_grad(X, y, W, b)
    got = loss_and_grad(X.cuda().bfloat16(), y.cuda(), W.cuda(), b.cuda(), chunk_rows=1500)
    assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-2)
    torch.testing.assert_close(got[1].cpu(), ref[1], rtol=0.05, atol=2e-3)
    torch.testing.assert_close(got[2].cpu(), ref[2], rtol=0.05, atol=2e-3)
