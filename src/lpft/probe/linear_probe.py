"""The linear probe: L2 multinomial logistic regression on frozen features, C chosen on validation.

Objective, at one C, on the normalised features ``z`` (sklearn's convention, so ``C`` values
and objectives compare with ``sklearn.linear_model.LogisticRegression``)::

    F_C(W, b) = C * sum_i CE(W z_i + b, y_i) + 0.5 * ||W||_F^2      (intercept b unpenalised)

Normalisation (``normalize``): ``"scalar"`` (default) subtracts one mean and divides by one
standard deviation over all training entries, as in the paper's protocol; ``"feature"``
standardises each feature; ``"none"`` fits the features as given. The fitted head always
maps RAW features: ``logits = X @ coef_.T + intercept_``.

Regularisation search: the paper fits 50 log-spaced C in [1e-7, 1e2]. Here a coarse grid
(one value per decade) is walked upwards with warm starts from the grid value where the
penalty's curvature meets the data's (walking down too only if that start stays the best),
stopped once validation accuracy has not improved for ``patience`` values or fell
``stop_drop`` below the best (a coarse fit that falls that far is cut short after its first
Newton step), then refined by bisection in log C (1/2, 1/4, 1/8 decade) towards the better
neighbour; the first level also probes the other side unless its first probe beat the best
coarse C. Then the chosen C is solved tightly (exact Hessian). ``Cs=[...]`` fits exactly the
given values instead. Each fit is a Newton-CG solve (see ``lpft.probe.solver``) started from
the nearest solution (reusing its logits and gradient) or, between two solutions, from their
interpolation in log C. Path fits use the exact Hessian unless the Hessian subsample has at
least 2 K d rows (each class's d x d block then sees about 2d rows); with fewer, subsampled
Newton steps overshoot and cost more passes than exact ones.

scikit-learn: ``LinearProbe`` is a classifier estimator (``clone``, ``get_params``, ``Pipeline``,
``cross_val_score`` work; labels may be any sklearn classification target). ``fit(X, y)`` alone
holds out a stratified ``validation_fraction`` of the rows (drawn with ``seed``) to choose C, then
refits on all rows at the chosen C, warm-started from the held-out fit, as
``LogisticRegressionCV(refit=True)`` does. ``fit(X, y, X_val, y_val)`` chooses C on the given
validation set and fits on ``X`` alone: the paper's protocol.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_consistent_length, check_is_fitted, column_or_1d, validate_data
from threadpoolctl import threadpool_limits

from lpft.errors import ConfigError
from lpft.probe.solver import ArrayLike, Design, Point, Preconditioner, SolveInfo, cross_entropy, matmul, newton_cg

log = logging.getLogger(__name__)

Normalize = Literal["scalar", "feature", "none"]
_DTYPES = (np.float32, np.float64)  # kept as given; anything else is converted to float32


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def _cpu_threads(device: torch.device, n: int | None) -> Iterator[None]:
    """Limit torch and BLAS to ``n`` threads on CPU. The two pools otherwise spin against
    each other between the solver's many small calls (10x slower on 2 cores, measured)."""
    if device.type != "cpu" or n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


def _to_host(a: Any) -> Any:
    """A tensor as a numpy array (sharing memory when on CPU); anything else as given."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


def _on_accelerator(X: Any) -> bool:
    return isinstance(X, torch.Tensor) and X.device.type != "cpu"


def _checked_tensor(X: torch.Tensor) -> torch.Tensor:
    """sklearn's array checks, done where an accelerator tensor lies: a host copy for
    ``check_array`` would cost more than the probe's fit."""
    if X.ndim != 2:
        raise ValueError(f"Expected 2D array, got {X.ndim}D tensor instead")
    if min(X.shape) < 1:
        raise ValueError(f"Found array with shape {tuple(X.shape)}, while a minimum of 1 sample and 1 feature is required.")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("Input X contains NaN or infinity.")
    return X


def _take(X: ArrayLike, idx: np.ndarray) -> ArrayLike:
    """Rows ``idx`` of a numpy array, or of a tensor on its own device."""
    return X[torch.as_tensor(idx, device=X.device)] if isinstance(X, torch.Tensor) else X[idx]


def _class_indices(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Integer labels checked to lie in ``[0, n_classes)``, as int64."""
    codes = labels.astype(np.int64) if labels.dtype.kind in "biuf" else None
    if codes is None or not np.array_equal(codes, labels) or codes.min() < 0 or codes.max() >= n_classes:
        raise ValueError(f"with n_classes={n_classes}, labels must be integers in [0, {n_classes})")
    return codes


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and validation row indices for class indices ``y``.

    Each class gives ``fraction`` of its rows to validation (rounded down, the largest
    remainders rounding up until the total is ``round(fraction * n)``) but keeps at least one
    for training, so that every class in ``y`` is fitted; a class of one row is not validated.
    """
    n = len(y)
    counts = np.bincount(y)
    quota = fraction * counts
    n_val = np.floor(quota).astype(np.int64)
    extra = int(round(fraction * n)) - int(n_val.sum())
    n_val[np.argsort(n_val - quota, kind="stable")[: max(extra, 0)]] += 1
    n_val = np.minimum(n_val, np.maximum(counts - 1, 0))
    # Rows grouped by class, shuffled within it; each class's first n_val rows are held out.
    order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(y[order], kind="stable")]
    rank = np.arange(n) - (np.cumsum(counts) - counts)[y[order]]
    held = np.zeros(n, dtype=bool)
    held[order[rank < n_val[y[order]]]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _to_raw(theta: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[W; b]`` on the normalised features as the same head on raw features, (d+1) x K."""
    W, b = theta[:-1], theta[-1]
    Wr = W / std[:, None] if std.numel() > 1 else W / std
    shift = mean @ Wr if mean.numel() > 1 else mean * Wr.sum(0)
    return torch.cat([Wr, (b - shift)[None]])


def _from_raw(theta: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_to_raw``: a raw-feature head on the features normalised by ``mean``, ``std``."""
    Wr, br = theta[:-1], theta[-1]
    W = Wr * std[:, None] if std.numel() > 1 else Wr * std
    shift = mean @ Wr if mean.numel() > 1 else mean * Wr.sum(0)
    return torch.cat([W, (br + shift)[None]])


def _moments(X: ArrayLike, normalize: Normalize, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training mean and std (float64): scalars or per feature.

    Row chunks (so memmaps work) are reduced in float32 around their own mean and merged in
    float64 (Chan et al.'s pairwise update): 4x cheaper than float64 sums, and a feature with a
    large mean and a small spread does not cancel to a wrong variance.
    """
    n, d = X.shape
    if normalize == "none":
        return torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    mean = torch.zeros(d, dtype=torch.float64)
    m2 = torch.zeros(d, dtype=torch.float64)
    seen = 0
    for start in range(0, n, chunk_rows):
        block = torch.as_tensor(X[start : start + chunk_rows]).to(device="cpu", dtype=torch.float32)
        rows = block.shape[0]
        block_mean = block.mean(0)
        block_m2 = (block - block_mean).square_().sum(0)
        delta = block_mean.double() - mean
        mean += delta * (rows / (seen + rows))
        m2 += block_m2.double() + delta**2 * (seen * rows / (seen + rows))
        seen += rows
    if normalize == "scalar":
        # Over all n*d entries: the within-feature spread plus the spread of the feature means.
        grand = mean.mean()
        var = (m2.sum() / n + ((mean - grand) ** 2).sum()) / d
        return grand.reshape(1), var.sqrt().clamp_min(1e-12).reshape(1)
    std = (m2 / n).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


@dataclass
class _Search:
    """What one run along the C path leaves: the chosen fit and every record."""

    theta: torch.Tensor  # [W; b] of the chosen C on the normalised features, (d+1) x K, CPU float64
    mean: torch.Tensor
    std: torch.Tensor
    path: list[dict]
    best: dict  # the chosen C's record in ``path``


class LinearProbe(ClassifierMixin, BaseEstimator):
    """A linear head on frozen features, with C chosen on ID validation accuracy.

    A scikit-learn classifier: ``fit(X, y)`` chooses C on a stratified hold-out and refits on
    all rows; ``fit(X, y, X_val, y_val)`` chooses C on the given validation set (see ``fit``).

    Fitted attributes: ``classes_`` (the labels, sorted; ``arange(n_classes)`` when
    ``n_classes`` is given), ``coef_`` [K, d] and ``intercept_`` [K] (raw feature space, numpy
    float64, K rows even for two classes), ``best_C_``, ``val_accuracy_`` (at ``best_C_`` on the
    validation rows), ``objective_`` (F_C at ``best_C_`` of the returned head, on the normalised
    features it was fitted on), ``path_`` (one dict per C tried, in the order tried: C,
    train_acc, val_acc, val_loss, objective, loss, n_iter, n_passes, converged), ``n_classes_``,
    ``n_features_in_``, ``mean_``/``std_`` (normalisation), ``n_passes_`` (total passes over the
    training features, the unit of cost, refit included) and ``n_iter_`` (total Newton steps).

    Options: ``Cs`` fixes the C values (one value: a single tight fit, validation optional);
    ``validation_fraction`` is the stratified share of rows held out when ``fit`` gets no
    validation set; ``tol``/``path_tol`` bound the largest gradient entry of ``F_C / (C n)``
    for the chosen C / along the path (sklearn's ``tol`` means the same, and 1e-4 is its
    default too: at the chosen C of the 2048 x 100 benchmark that leaves the objective 3.5e-4
    relative above a tol=1e-8 fit, as sklearn's own default fit is, 3.8e-4; ``tol=1e-5`` brings it to 2.5e-7
    for about 35 more passes; single-C fits from scratch land at 2.5e-6); path fits stop after
    ``path_max_iter`` Newton steps, as the paper's protocol caps lbfgs at 20 iterations per C,
    because only their validation accuracy is used; ``hessian_rows`` sizes the
    Hessian subsample of path fits (default n/4, used only if it has at least 2 K d rows;
    given explicitly, always used); ``chunk_rows`` streams host features
    (e.g. a memmap) to the device in row chunks; ``precision="bfloat16"`` runs the big
    products in bf16 (for large GPU problems; the objective is then that of bf16-rounded
    features, and CPUs without bf16 units are far slower); ``cpu_threads`` caps torch and
    BLAS threads on CPU (1 spends the fewest CPU-seconds; raise it for wall time); ``seed``
    draws the Hessian subsample and the validation hold-out. Parameters are checked in ``fit``
    (``lpft.errors.ConfigError``), as sklearn's convention asks.
    """

    def __init__(
        self,
        Cs: Sequence[float] | None = None,
        *,
        C_range: tuple[float, float] = (1e-7, 1e2),
        normalize: Normalize = "scalar",
        device: str | torch.device = "auto",
        n_classes: int | None = None,
        validation_fraction: float = 0.2,
        tol: float = 1e-4,
        path_tol: float = 3e-4,
        max_iter: int = 100,
        path_max_iter: int = 4,
        patience: int = 1,
        stop_drop: float = 0.02,
        refine_steps: int = 3,
        hessian_rows: int | None = None,
        chunk_rows: int | None = None,
        precision: Literal["float32", "bfloat16"] = "float32",
        cpu_threads: int | None = 1,
        seed: int = 0,
    ) -> None:
        self.Cs = Cs
        self.C_range = C_range
        self.normalize = normalize
        self.device = device
        self.n_classes = n_classes
        self.validation_fraction = validation_fraction
        self.tol = tol
        self.path_tol = path_tol
        self.max_iter = max_iter
        self.path_max_iter = path_max_iter
        self.patience = patience
        self.stop_drop = stop_drop
        self.refine_steps = refine_steps
        self.hessian_rows = hessian_rows
        self.chunk_rows = chunk_rows
        self.precision = precision
        self.cpu_threads = cpu_threads
        self.seed = seed

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        X_val: ArrayLike | None = None,
        y_val: ArrayLike | None = None,
        n_classes: int | None = None,
    ) -> LinearProbe:
        """Fit along the C path on ``(X, y)``, keeping the C of best validation accuracy.

        With ``(X_val, y_val)``, C is chosen on them and the head is the fit on ``X`` at that C
        (the paper's protocol). Without, a stratified ``validation_fraction`` of the rows is
        held out to choose C, and the head is then refitted on all rows at that C (warm-started
        from the held-out fit); ``path_`` and ``val_accuracy_`` describe the held-out search. A
        single C (``Cs=[c]``) needs no validation: it is fitted on all rows. ``n_classes``
        (integer labels only) makes ``classes_ = arange(n_classes)``, so that a class absent
        from ``y`` still gets a row of ``coef_``. Without it ``classes_`` are the labels found
        in ``y`` and ``y_val``. Features may be numpy arrays (memmaps too) or torch tensors;
        a tensor on an accelerator stays there. The hold-out copies its rows, so for a memmap
        streamed with ``chunk_rows`` pass validation data.
        """
        Cs, dev = self._check_params()
        if (X_val is None) != (y_val is None):
            raise ValueError("pass both X_val and y_val, or neither")
        X, y = self._check_Xy(X, y, reset=True)
        if X_val is not None:
            X_val, y_val = self._check_Xy(X_val, y_val, reset=False)
        codes, val_codes = self._encode_labels(y, y_val, self.n_classes if n_classes is None else n_classes)
        k = len(self.classes_)
        with _cpu_threads(dev, self.cpu_threads):
            if X_val is not None or (Cs is not None and len(Cs) == 1):
                chosen = search = self._search(dev, X, codes, X_val, val_codes, k, Cs)
                runs = [chosen]
            else:
                train, val = _stratified_split(codes, self.validation_fraction, self.seed)
                if len(val) == 0:
                    raise ValueError(
                        f"choosing C needs validation rows, but n_samples={len(codes)} leaves none at "
                        f"validation_fraction={self.validation_fraction} (each class keeps a training row); "
                        "pass X_val, y_val or a single C in Cs"
                    )
                log.debug("probe: C chosen on a stratified hold-out of %d of %d rows, then refitted on all", len(val), len(codes))
                # The final tight solve is left to the refit, which starts from the path's fit.
                search = self._search(dev, _take(X, train), codes[train], _take(X, val), codes[val], k, Cs, final_solve=False)
                start = _to_raw(search.theta, search.mean, search.std)
                chosen = self._search(dev, X, codes, None, None, k, [search.best["C"]], start=start)
                runs = [search, chosen]
        self.path_ = search.path
        self.best_C_ = search.best["C"]
        self.val_accuracy_ = search.best["val_acc"]
        self.objective_ = chosen.best["objective"]
        self.n_passes_ = sum(r["n_passes"] for run in runs for r in run.path)
        self.n_iter_ = sum(r["n_iter"] for run in runs for r in run.path)
        self.n_classes_ = k
        self.mean_ = chosen.mean.numpy()
        self.std_ = chosen.std.numpy()
        head = _to_raw(chosen.theta, chosen.mean, chosen.std)
        self.coef_ = head[:-1].T.contiguous().numpy()
        self.intercept_ = head[-1].numpy()
        return self

    def _check_params(self) -> tuple[list[float] | None, torch.device]:
        """The constructor's parameters, checked at fit time as sklearn asks: the sorted Cs and the device."""
        name = type(self).__name__

        def require(param: str, ok: Callable[[Any], Any], allowed: str) -> None:
            value = getattr(self, param)
            try:
                good = bool(ok(value))
            except (TypeError, ValueError):
                good = False
            if not good:
                raise ConfigError(f"{name}: {param} must be {allowed}, got {value!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, numbers.Integral)

        require("Cs", lambda v: v is None or len(v) > 0 and all(0 < float(c) < math.inf for c in v),
                "None or a non-empty list of positive values")
        require("C_range", lambda v: len(v) == 2 and 0 < float(v[0]) < float(v[1]) < math.inf,
                "a pair (low, high) with 0 < low < high")
        require("normalize", lambda v: v in ("scalar", "feature", "none"), "'scalar', 'feature' or 'none'")
        require("precision", lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'")
        require("validation_fraction", lambda v: 0 < v < 1, "a fraction in (0, 1)")
        for param in ("tol", "path_tol"):
            require(param, lambda v: v > 0, "a positive number")
        require("stop_drop", lambda v: v >= 0, "a number >= 0")
        for param in ("max_iter", "path_max_iter", "patience"):
            require(param, lambda v: is_int(v) and v >= 1, "an integer >= 1")
        require("refine_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0")
        for param in ("hessian_rows", "chunk_rows", "cpu_threads"):
            require(param, lambda v: v is None or is_int(v) and v >= 1, "None or an integer >= 1")
        require("n_classes", lambda v: v is None or is_int(v) and v >= 2, "None or an integer >= 2")
        require("seed", is_int, "an integer")
        try:
            dev = resolve_device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"{name}: device must be 'auto' or a torch device, got {self.device!r}") from err
        return (None if self.Cs is None else sorted(float(c) for c in self.Cs)), dev

    def _check_Xy(self, X: Any, y: Any, *, reset: bool) -> tuple[ArrayLike, np.ndarray]:
        """``(X, y)`` through sklearn's ``validate_data`` (its errors, ``n_features_in_``)."""
        y = _to_host(y)
        if _on_accelerator(X):
            X, y = validate_data(self, _checked_tensor(X), y, skip_check_array=True, reset=reset)
            y = column_or_1d(y, warn=True)
            check_consistent_length(X, y)
            return X, y
        return validate_data(self, _to_host(X), y, reset=reset, dtype=_DTYPES)

    def _check_X(self, X: Any) -> ArrayLike:
        """Features to predict on, checked against the fitted ``n_features_in_``."""
        if _on_accelerator(X):
            return validate_data(self, _checked_tensor(X), skip_check_array=True, reset=False)
        return validate_data(self, _to_host(X), reset=False, dtype=_DTYPES)

    def _encode_labels(
        self, y: np.ndarray, y_val: np.ndarray | None, n_classes: int | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Set ``classes_``; return ``y`` and ``y_val`` as indices into it."""
        labels = y if y_val is None else np.concatenate([y, y_val])
        check_classification_targets(labels)
        if n_classes is None:
            self.classes_, codes = np.unique(labels, return_inverse=True)
        else:
            codes = _class_indices(labels, n_classes)
            self.classes_ = np.arange(n_classes)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes, but the data contains only one class: "
                f"{self.classes_[0]}"
            )
        return codes[: len(y)], None if y_val is None else codes[len(y) :]

    def _search(
        self,
        dev: torch.device,
        X_train: ArrayLike,
        y_train: np.ndarray,
        X_val: ArrayLike | None,
        y_val: np.ndarray | None,
        k: int,
        Cs: list[float] | None,
        *,
        final_solve: bool = True,
        start: torch.Tensor | None = None,
    ) -> _Search:
        """Walk the C path on ``X_train`` (class indices ``y_train`` in ``[0, k)``), choosing on
        the validation set, and solve the chosen C tightly unless ``final_solve`` is off. A
        raw-feature head ``start`` replaces the C -> 0 limit as the first warm start."""
        y = torch.as_tensor(y_train).to(device=dev, dtype=torch.long)
        yv = None if y_val is None else torch.as_tensor(y_val).to(device=dev, dtype=torch.long)
        n, d = X_train.shape
        mean, std = _moments(X_train, self.normalize, min(self.chunk_rows or 8192, 8192))
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
        design = Design(X_train, mean, std, dev, dtype, self.chunk_rows)
        val = None if X_val is None else Design(X_val, mean, std, dev, dtype, self.chunk_rows)

        rng = np.random.default_rng(self.seed)
        m = min(n, self.hessian_rows or max(4096, n // 4))
        hess_idx = np.sort(rng.choice(n, size=m, replace=False))
        zs = design.rows(hess_idx)
        precond = Preconditioner(zs)
        # Tight solves use the exact Hessian (quadratic convergence) when the features are in
        # memory. So do path solves unless the subsample gives each class's d x d block of the
        # Hessian about 2d rows (m >= 2Kd): with fewer, the subsampled Hessian misses most
        # directions that carry curvature and its Newton steps overshoot (measured: at 2048 x
        # 100, six subsampled steps reach a worse objective than two exact ones, for more passes).
        exact = (np.arange(n), design.dense) if design.dense is not None else (hess_idx, zs)
        path_hessian = exact if self.hessian_rows is None and m < 2 * k * d else (hess_idx, zs)

        solved: dict[float, torch.Tensor] = {}
        # Fits that keep their logits and data gradient (n x K each), so that later starts cost
        # fewer passes: the latest (the next coarse C starts from it), the best (the final tight
        # solve) and, while n K is small, the best's two neighbours (refinement fits start
        # between the best and one of them, and logits interpolate like the parameters).
        kept: dict[float, Point] = {}
        keep_neighbours = n * k <= 2**24
        path: list[dict] = []

        def prune_kept(latest: float, best_C: float) -> None:
            keep = {latest, best_C}
            if keep_neighbours:
                keep |= {max((c for c in solved if c < best_C), default=best_C)}
                keep |= {min((c for c in solved if c > best_C), default=best_C)}
            for c in [c for c in kept if c not in keep]:
                del kept[c]

        def warm_start(C: float) -> Point:
            if C in solved:  # the final tight solve of a C fitted on the path
                return kept.get(C, Point(solved[C]))
            if not solved and start is not None:
                return Point(_from_raw(start, mean, std).to(dev))
            if not solved:
                # The C -> 0 limit: W = 0 and the bias at the log class frequencies; its logits
                # need no pass.
                theta = torch.zeros(d + 1, k, dtype=torch.float64, device=dev)
                theta[-1] = torch.bincount(y, minlength=k).double().clamp_min(0.5).log()
                return Point(theta, theta[-1].expand(n, k).clone())
            below = [c for c in solved if c < C]
            above = [c for c in solved if c > C]
            if below and above:
                # Between two solutions: interpolate in log C (a pass for the gradient, and one for
                # the logits unless both ends kept theirs), repaid by a start much closer than
                # either end.
                a, b = max(below), min(above)
                t = math.log(C / a) / math.log(b / a)
                theta = (1 - t) * solved[a] + t * solved[b]
                if a in kept and b in kept:
                    return Point(theta, torch.lerp(kept[a].logits, kept[b].logits, t))
                return Point(theta)
            near = min(solved, key=lambda c: abs(math.log(c / C)))
            return kept.get(near, Point(solved[near]))

        def val_acc(theta: torch.Tensor) -> float:
            assert val is not None and yv is not None
            return float((val.logits(theta).argmax(1) == yv).double().mean())

        def solve(C: float, tight: bool, floor: float | None = None) -> tuple[Point, dict]:
            """Fit at C; a path fit whose validation accuracy falls below ``floor`` is cut short."""
            lam = 1.0 / (C * n)
            point, info = newton_cg(
                design, y, lam, warm_start(C),
                *(exact if tight else path_hessian), precond,
                tol=self.tol if tight else self.path_tol,
                max_iter=self.max_iter if tight else self.path_max_iter,
                min_iter=0 if tight else 1,
                max_cg=50 if tight else 10,
                forcing=0.5 if tight else 0.1,
                abandon=None if floor is None else lambda theta: val_acc(theta) < floor,
            )
            solved[C] = point.theta
            rec = self._record(C, point, y, val, yv, info, n)
            kept[C] = point
            prune_kept(C, max(path + [rec], key=score)["C"])
            log.debug(
                "probe C=%.3g train_acc=%.4f val_acc=%s newton=%d cg=%d passes=%.1f grad=%.1e",
                C, rec["train_acc"], "-" if yv is None else f"{rec['val_acc']:.4f}",
                info.n_iter, info.n_cg, info.n_passes, info.grad_max,
            )
            return point, rec

        def score(rec: dict) -> tuple[float, float]:
            # Accuracy first; ties (common on small or easy validation sets) go to the lower
            # validation loss, not the smallest C, whose near-zero head is badly calibrated.
            if yv is None:
                return (0.0, -rec["C"])
            return (rec["val_acc"], -rec["val_loss"])

        if Cs is not None:
            for C in Cs:
                path.append(solve(C, tight=len(Cs) == 1)[1])
        else:
            lo, hi = (math.log10(c) for c in self.C_range)
            n_coarse = max(2, int(round(hi - lo)) + 1)
            grid = np.logspace(lo, hi, n_coarse)
            step = (hi - lo) / (n_coarse - 1)

            def walk(values: np.ndarray) -> None:
                since_best = 0
                for C in values:
                    # A coarse fit that already drops stop_drop below the best ends the walk
                    # however it would converge; the first Newton step shows that (one step from
                    # the previous C lies between the two solutions), so its remaining steps are
                    # skipped.
                    floor = max(r["val_acc"] for r in path) - self.stop_drop if path else None
                    rec = solve(float(C), tight=False, floor=floor)[1]
                    since_best = 0 if score(rec) >= max(score(r) for r in path + [rec]) else since_best + 1
                    path.append(rec)
                    if since_best >= self.patience or rec["val_acc"] < max(path, key=score)["val_acc"] - self.stop_drop:
                        break

            # The walk starts where the penalty's curvature (1 / Cn) meets the data's at the
            # C -> 0 limit, ||Sigma|| ||diag(p) - p p^T|| for the class frequencies p: below it the
            # head is nearly linear in C and barely leaves the prior, so validation accuracy
            # still rises with C on every case measured. It walks down from there only if the
            # start is the best so far (for a unimodal curve the peak is then below it).
            freq = torch.bincount(y, minlength=k).double() / n
            curvature = float(precond.s.max()) * float(torch.linalg.eigvalsh(torch.diag(freq) - torch.outer(freq, freq)).max())
            first = int(np.argmin(np.abs(np.log10(grid) + math.log10(n * max(curvature, 1e-30)))))
            walk(grid[first:])
            if first > 0 and max(path, key=score)["C"] == grid[first]:
                walk(grid[first - 1 :: -1])
            # Bisection in log C, halving the step each level, probing first towards the better
            # neighbour. A decade apart, the neighbours' accuracies do not say on which side the
            # peak lies (the curve is skewed; measured at 2048 x 100), so the first level also
            # probes the other side unless the first probe beat the best coarse C: for a
            # unimodal curve the peak then lies on the probed side. Later levels probe one side.
            for level in range(self.refine_steps):
                step /= 2.0
                best = max(path, key=score)
                below = [r for r in path if r["C"] < best["C"]]
                above = [r for r in path if r["C"] > best["C"]]
                lo_nb = max(below, key=lambda r: r["C"]) if below else None
                hi_nb = min(above, key=lambda r: r["C"]) if above else None
                go_up = lo_nb is None or (hi_nb is not None and hi_nb["val_acc"] > lo_nb["val_acc"])
                toward = 1 if go_up else -1
                for sign in (toward, -toward) if level == 0 else (toward,):
                    C = best["C"] * 10 ** (sign * step)
                    if self.C_range[0] <= C <= self.C_range[1]:
                        rec = solve(C, tight=False)[1]
                        path.append(rec)
                        if score(rec) > score(best):
                            break

        best_rec = max(path, key=score)
        theta = solved[best_rec["C"]]
        if final_solve and not (Cs is not None and len(Cs) == 1):
            point, final = solve(best_rec["C"], tight=True)
            theta = point.theta
            final["n_iter"] += best_rec["n_iter"]
            final["n_passes"] += best_rec["n_passes"]
            best_rec.update(final)
        return _Search(theta.cpu(), mean, std, path, best_rec)

    def _record(
        self, C: float, point: Point, y: torch.Tensor,
        val: Design | None, yv: torch.Tensor | None, info: SolveInfo, n: int,
    ) -> dict:
        theta, L = point.theta, point.logits
        assert L is not None
        loss, _ = cross_entropy(L, y, point.lse)
        objective = C * n * loss + 0.5 * float((theta[:-1] ** 2).sum())
        val_acc = val_loss = float("nan")
        if val is not None and yv is not None:
            vl = val.logits(theta)
            val_acc = float((vl.argmax(1) == yv).double().mean())
            val_loss = float((torch.logsumexp(vl, 1) - vl.gather(1, yv[:, None]).squeeze(1)).double().mean())
        return {
            "C": C,
            "train_acc": float((L.argmax(1) == y).double().mean()),
            "val_acc": val_acc,
            "val_loss": val_loss,
            "objective": objective,
            "loss": loss,
            "n_iter": info.n_iter,
            "n_passes": info.n_passes,
            "converged": info.converged,
        }

    # --------------------------------------------------------------- prediction
    def _logits(self, X: ArrayLike, batch_rows: int = 65536) -> np.ndarray:
        """``X @ coef_.T + intercept_`` (float32, [n, K]), computed on the probe's device in chunks."""
        check_is_fitted(self)
        X = self._check_X(X)
        dev = resolve_device(self.device)
        W = torch.as_tensor(self.coef_.T, dtype=torch.float32, device=dev).contiguous()
        b = torch.as_tensor(self.intercept_, dtype=torch.float32, device=dev)
        out = []
        with _cpu_threads(dev, self.cpu_threads):
            for start in range(0, X.shape[0], batch_rows):
                block = torch.as_tensor(X[start : start + batch_rows]).to(device=dev, dtype=torch.float32)
                out.append((matmul(block, W) + b).cpu())
        return torch.cat(out).numpy()

    def decision_function(self, X: ArrayLike, batch_rows: int = 65536) -> np.ndarray:
        """Logits, float32 [n, K]; for two classes, as sklearn's binary classifiers, the margin
        of ``classes_[1]``, ``logit_1 - logit_0`` [n] (``to_linear`` keeps both logits)."""
        logits = self._logits(X, batch_rows)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities, [n, K], columns in the order of ``classes_``."""
        return torch.softmax(torch.from_numpy(self._logits(X)), 1).numpy()

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Most likely label per row, from ``classes_``."""
        index = self._logits(X).argmax(1)  # first: it raises NotFittedError before fit
        return self.classes_[index]

    def score(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> float:
        """Accuracy on ``(X, y)``; ``y`` may be a tensor."""
        return float(super().score(X, _to_host(y), sample_weight=sample_weight))

    def to_linear(self) -> torch.nn.Linear:
        """The head as a ``torch.nn.Linear`` on raw features, e.g. to start fine-tuning from."""
        check_is_fitted(self)
        k, d = self.coef_.shape
        layer = torch.nn.Linear(d, k)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(self.coef_))
            layer.bias.copy_(torch.as_tensor(self.intercept_))
        return layer


def fit_logistic(
    X: ArrayLike,
    y: ArrayLike,
    C: float,
    *,
    normalize: Normalize = "none",
    n_classes: int | None = None,
    device: str | torch.device = "auto",
    tol: float = 1e-7,
    max_iter: int = 200,
) -> LinearProbe:
    """One tightly converged fit at a fixed C (no validation, no normalisation by default).

    ``.objective_`` is F_C on the features as given, directly comparable with sklearn's
    ``LogisticRegression(C=C)`` fitted on the same array.
    """
    probe = LinearProbe([C], normalize=normalize, device=device, n_classes=n_classes, tol=tol, max_iter=max_iter)
    return probe.fit(X, y)
