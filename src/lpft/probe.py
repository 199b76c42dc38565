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
given values instead. Each fit is a Newton-CG solve (see ``lpft.probe_solver``) started from
the nearest solution (reusing its logits and gradient) or, between two solutions, from their
interpolation in log C. Path fits use the exact Hessian unless the Hessian subsample has at
least 2 K d rows (each class's d x d block then sees about 2d rows); with fewer, subsampled
Newton steps overshoot and cost more passes than exact ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

from lpft.probe_solver import ArrayLike, Design, Point, Preconditioner, SolveInfo, cross_entropy, matmul, newton_cg

log = logging.getLogger(__name__)

Normalize = Literal["scalar", "feature", "none"]


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
    try:  # ships with scikit-learn; GPU images without it still import this module
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(limits=n, user_api="blas"):
                yield
    finally:
        torch.set_num_threads(old)


def _labels(y: ArrayLike, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if t.ndim != 1 or t.dtype.is_floating_point and not torch.equal(t, t.round()):
        raise ValueError("labels must be a 1-d array of integer class indices")
    return t.to(device=device, dtype=torch.long)


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


class LinearProbe:
    """A linear head on frozen features, with C chosen on ID validation accuracy.

    Fitted attributes: ``coef_`` [K, d] and ``intercept_`` [K] (raw feature space, numpy
    float64), ``best_C_``, ``objective_`` (F_C at ``best_C_`` on the normalised features),
    ``path_`` (one dict per C tried, in the order tried: C, train_acc, val_acc, objective,
    loss, n_iter, n_passes, converged), ``n_classes_``, ``mean_``/``std_`` (normalisation),
    ``n_passes_`` (total passes over the training features, the unit of cost).

    Options: ``Cs`` fixes the C values (one value: a single tight fit, validation optional);
    ``tol``/``path_tol`` bound the largest gradient entry of ``F_C / (C n)`` for the chosen
    C / along the path (sklearn's ``tol`` means the same, and 1e-4 is its default too: at the
    chosen C of the 2048 x 100 benchmark that leaves the objective 3.5e-4 relative above a
    tol=1e-8 fit, as sklearn's own default fit is, 3.8e-4; ``tol=1e-5`` brings it to 2.5e-7
    for about 35 more passes; single-C fits from scratch land at 2.5e-6); path fits stop after
    ``path_max_iter`` Newton steps, as the paper's protocol caps lbfgs at 20 iterations per C,
    because only their validation accuracy is used; ``hessian_rows`` sizes the
    Hessian subsample of path fits (default n/4, used only if it has at least 2 K d rows;
    given explicitly, always used); ``chunk_rows`` streams host features
    (e.g. a memmap) to the device in row chunks; ``precision="bfloat16"`` runs the big
    products in bf16 (for large GPU problems; the objective is then that of bf16-rounded
    features, and CPUs without bf16 units are far slower); ``cpu_threads`` caps torch and
    BLAS threads on CPU (1 spends the fewest CPU-seconds; raise it for wall time).
    """

    def __init__(
        self,
        Cs: Sequence[float] | None = None,
        *,
        C_range: tuple[float, float] = (1e-7, 1e2),
        normalize: Normalize = "scalar",
        device: str | torch.device = "auto",
        n_classes: int | None = None,
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
        if normalize not in ("scalar", "feature", "none"):
            raise ValueError(f"normalize must be 'scalar', 'feature' or 'none', got {normalize!r}")
        if Cs is not None and (len(Cs) == 0 or min(Cs) <= 0):
            raise ValueError("Cs must be a non-empty list of positive values")
        self.Cs = None if Cs is None else sorted(float(c) for c in Cs)
        self.C_range = C_range
        self.normalize = normalize
        self.device = device
        self.n_classes = n_classes
        self.tol, self.path_tol = tol, path_tol
        self.max_iter, self.path_max_iter = max_iter, path_max_iter
        self.patience, self.stop_drop, self.refine_steps = patience, stop_drop, refine_steps
        self.hessian_rows = hessian_rows
        self.chunk_rows = chunk_rows
        self.precision = precision
        self.cpu_threads = cpu_threads
        self.seed = seed

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X_train: ArrayLike,
        y_train: ArrayLike,
        X_val: ArrayLike | None = None,
        y_val: ArrayLike | None = None,
        n_classes: int | None = None,
    ) -> LinearProbe:
        """Fit along the C path on ``(X_train, y_train)``, choosing C on ``(X_val, y_val)``.

        Validation data may be omitted only when a single C is given (``Cs=[c]``).
        """
        dev = resolve_device(self.device)
        with _cpu_threads(dev, self.cpu_threads):
            return self._fit(dev, X_train, y_train, X_val, y_val, n_classes)

    def _fit(
        self,
        dev: torch.device,
        X_train: ArrayLike,
        y_train: ArrayLike,
        X_val: ArrayLike | None,
        y_val: ArrayLike | None,
        n_classes: int | None,
    ) -> LinearProbe:
        if (X_val is None) != (y_val is None):
            raise ValueError("pass both X_val and y_val, or neither")
        if X_val is None and (self.Cs is None or len(self.Cs) > 1):
            raise ValueError("choosing C needs validation data; pass X_val, y_val or a single C in Cs")
        y = _labels(y_train, dev)
        if len(y) != X_train.shape[0]:
            raise ValueError(f"X_train has {X_train.shape[0]} rows but y_train has {len(y)} labels")
        yv = None if y_val is None else _labels(y_val, dev)
        if yv is not None and X_val is not None and len(yv) != X_val.shape[0]:
            raise ValueError(f"X_val has {X_val.shape[0]} rows but y_val has {len(yv)} labels")
        k = n_classes or self.n_classes or int(max(int(y.max()), -1 if yv is None else int(yv.max()))) + 1
        if int(y.min()) < 0 or int(y.max()) >= k or (yv is not None and (int(yv.min()) < 0 or int(yv.max()) >= k)):
            raise ValueError(f"labels must lie in [0, {k})")
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
        self.path_: list[dict] = []

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
            prune_kept(C, max(self.path_ + [rec], key=score)["C"])
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

        if self.Cs is not None:
            for C in self.Cs:
                self.path_.append(solve(C, tight=len(self.Cs) == 1)[1])
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
                    floor = max(r["val_acc"] for r in self.path_) - self.stop_drop if self.path_ else None
                    rec = solve(float(C), tight=False, floor=floor)[1]
                    since_best = 0 if score(rec) >= max(score(r) for r in self.path_ + [rec]) else since_best + 1
                    self.path_.append(rec)
                    if since_best >= self.patience or rec["val_acc"] < max(self.path_, key=score)["val_acc"] - self.stop_drop:
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
            if first > 0 and max(self.path_, key=score)["C"] == grid[first]:
                walk(grid[first - 1 :: -1])
            # Bisection in log C, halving the step each level, probing first towards the better
            # neighbour. A decade apart, the neighbours' accuracies do not say on which side the
            # peak lies (the curve is skewed; measured at 2048 x 100), so the first level also
            # probes the other side unless the first probe beat the best coarse C: for a
            # unimodal curve the peak then lies on the probed side. Later levels probe one side.
            for level in range(self.refine_steps):
                step /= 2.0
                best = max(self.path_, key=score)
                below = [r for r in self.path_ if r["C"] < best["C"]]
                above = [r for r in self.path_ if r["C"] > best["C"]]
                lo_nb = max(below, key=lambda r: r["C"]) if below else None
                hi_nb = min(above, key=lambda r: r["C"]) if above else None
                go_up = lo_nb is None or (hi_nb is not None and hi_nb["val_acc"] > lo_nb["val_acc"])
                toward = 1 if go_up else -1
                for sign in (toward, -toward) if level == 0 else (toward,):
                    C = best["C"] * 10 ** (sign * step)
                    if self.C_range[0] <= C <= self.C_range[1]:
                        rec = solve(C, tight=False)[1]
                        self.path_.append(rec)
                        if score(rec) > score(best):
                            break

        best_rec = max(self.path_, key=score)
        self.best_C_ = best_rec["C"]
        theta = solved[self.best_C_]
        if not (self.Cs is not None and len(self.Cs) == 1):
            point, final = solve(self.best_C_, tight=True)
            theta = point.theta
            final["n_iter"] += best_rec["n_iter"]
            final["n_passes"] += best_rec["n_passes"]
            best_rec.update(final)
        self.objective_ = best_rec["objective"]
        self.val_accuracy_ = best_rec["val_acc"]
        self.n_passes_ = sum(r["n_passes"] for r in self.path_)
        self.n_classes_ = k
        self.mean_ = mean.numpy()
        self.std_ = std.numpy()
        self._set_head(theta.cpu(), mean, std)
        return self

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

    def _set_head(self, theta: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Map ``[W; b]`` on normalised features to a head on raw features."""
        W, b = theta[:-1], theta[-1]
        Wr = W / std[:, None] if std.numel() > 1 else W / std
        shift = mean @ Wr if mean.numel() > 1 else mean * Wr.sum(0)
        self.coef_ = Wr.T.contiguous().numpy()
        self.intercept_ = (b - shift).numpy()

    # --------------------------------------------------------------- prediction
    def decision_function(self, X: ArrayLike, batch_rows: int = 65536) -> np.ndarray:
        """Logits ``X @ coef_.T + intercept_`` (float32), computed on the probe's device in chunks."""
        dev = resolve_device(self.device)
        W = torch.as_tensor(self.coef_.T, dtype=torch.float32, device=dev).contiguous()
        b = torch.as_tensor(self.intercept_, dtype=torch.float32, device=dev)
        out = []
        with _cpu_threads(dev, self.cpu_threads):
            for start in range(0, X.shape[0], batch_rows):
                block = torch.as_tensor(X[start : start + batch_rows]).to(device=dev, dtype=torch.float32)
                out.append((matmul(block, W) + b).cpu())
        return torch.cat(out).numpy()

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities, [n, K]."""
        return torch.softmax(torch.from_numpy(self.decision_function(X)), 1).numpy()

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Most likely class index per row."""
        return self.decision_function(X).argmax(1)

    def score(self, X: ArrayLike, y: ArrayLike) -> float:
        """Accuracy on ``(X, y)``."""
        y_np = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        return float((self.predict(X) == y_np).mean())

    def to_linear(self) -> torch.nn.Linear:
        """The head as a ``torch.nn.Linear`` on raw features, e.g. to start fine-tuning from."""
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
