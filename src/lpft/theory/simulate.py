"""Simulate LP, FT and LP-FT on overparameterised two-layer linear networks.

The setting of Kumar et al. (ICLR 2022, section 3): a model f(x) = v^T B x with features
B in R^{k x d} and head v in R^k; ground truth y = v*^T B* x. Training inputs span an
m-dimensional subspace S of R^d. Pretrained features B0 equal U B* up to a perturbation of
Frobenius norm eps, for a rotation U. We compare

- ``lp``: least-squares head on the frozen B0;
- ``ft_random`` / ``ft_zero``: gradient descent on (v, B) from (v0, B0), v0 random or 0;
- ``lpft``: the same gradient descent from (v_lp, B0).

Errors are exact expected squared errors, computed in closed form from w = B^T v:
E[(w^T x - w*^T x)^2] = (w - w*)^T Sigma (w - w*). ID inputs are x ~ N(0, P_S) (the
training distribution's span); OOD inputs are x ~ N(0, I_d), which puts mass in every
direction, including those the training data never showed (as in the paper's theorem,
which needs only a full-rank OOD covariance).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from lpft.progress import progress_disabled

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("lp", "ft_random", "ft_zero", "lpft")
# methods trained by gradient descent (they differ only in the initial head)
_GD_METHODS: tuple[str, ...] = ("ft_random", "ft_zero", "lpft")
# below this final training MSE a gradient-descent run counts as converged
CONVERGED_MSE = 1e-8


@dataclass(frozen=True)
class TheorySettings:
    """Knobs of one simulated sweep over the feature error eps.

    Defaults are chosen so that every gradient-descent run converges (training MSE below
    ``CONVERGED_MSE``) and the whole sweep takes a few seconds on one core.
    """

    eps: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    seeds: int = 10
    d: int = 50  # input dimension
    k: int = 5  # feature dimension (k < d)
    m: int = 10  # dimension of the training span S (m < d)
    n: int = 40  # number of training examples (n >= m so that they span S)
    steps: int = 3000  # full-batch gradient-descent steps for FT and LP-FT
    lr: float = 0.1  # gradient-descent step size on the loss (1/2n)||Xw - y||^2
    methods: tuple[str, ...] = METHODS
    v_star_norm: float = 1.0  # ||v*|| = ||w*||, so the OOD error of predicting 0 is this^2
    head_scale: float = 1.0  # random head v0 ~ N(0, (head_scale ||v*||)^2 / k I_k)
    base_seed: int = 0

    def validate(self) -> None:
        """Reject settings that leave the theory's assumptions (k < d, m < d, ...)."""
        if not self.eps or any(e < 0 for e in self.eps):
            raise ValueError(f"eps must be a non-empty list of values >= 0, got {self.eps}")
        if not 0 < self.k < self.d or not 0 < self.m < self.d:
            raise ValueError(f"need 0 < k < d and 0 < m < d, got d={self.d} k={self.k} m={self.m}")
        if self.n < self.k:
            raise ValueError(f"need n >= k for the least-squares probe, got n={self.n} k={self.k}")
        if self.seeds < 1 or self.steps < 0 or self.lr <= 0:
            raise ValueError("need seeds >= 1, steps >= 0 and lr > 0")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        if self.n < self.m:
            logger.warning(
                "n=%d < m=%d: the training inputs span only part of S, so FT cannot fit "
                "all of the ID distribution",
                self.n,
                self.m,
            )

    def to_dict(self) -> dict:
        """JSON-ready copy (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Instance:
    """One seeded random problem: subspace, ground truth, data and pretrained features."""

    basis_s: np.ndarray  # (d, m) orthonormal basis of S
    basis_perp: np.ndarray  # (d, d - m) orthonormal basis of S's complement
    b_star: np.ndarray  # (k, d), orthonormal rows
    v_star: np.ndarray  # (k,)
    x: np.ndarray  # (n, d) training inputs, rows in S
    y: np.ndarray  # (n,)
    rotation: np.ndarray  # (k, k) the U in B0 = U B* + eps E
    direction: np.ndarray  # (k, d) the E, unit Frobenius norm, Procrustes-aligned with U
    v0_random: np.ndarray  # (k,) random head for ft_random

    @property
    def w_star(self) -> np.ndarray:
        return self.b_star.T @ self.v_star

    def b0(self, eps: float) -> np.ndarray:
        return self.rotation @ self.b_star + eps * self.direction


def _orthogonal(rng: np.random.Generator, size: int) -> np.ndarray:
    """Haar-random orthogonal matrix (QR with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def make_instance(settings: TheorySettings, seed: int) -> Instance:
    """Draw one random problem.

    The perturbation E = U (A B* + C) has A symmetric and C's rows orthogonal to B*'s, so
    U^T B0 B*^T = I + eps A is symmetric and (for eps <= 1) positive definite: U is then
    the best rotation and eps is exactly min_U ||B0 - U B*||_F, the paper's feature error.
    """
    s = settings
    rng = np.random.default_rng([s.base_seed, seed])
    basis = _orthogonal(rng, s.d)
    basis_s, basis_perp = basis[:, : s.m], basis[:, s.m :]
    b_star = _orthogonal(rng, s.d)[: s.k]
    v_star = rng.standard_normal(s.k)
    v_star *= s.v_star_norm / np.linalg.norm(v_star)
    x = rng.standard_normal((s.n, s.m)) @ basis_s.T
    y = x @ (b_star.T @ v_star)
    rotation = _orthogonal(rng, s.k)
    g = rng.standard_normal((s.k, s.d))
    inside = g @ b_star.T
    direction = 0.5 * (inside + inside.T) @ b_star + g - inside @ b_star
    direction = rotation @ direction / np.linalg.norm(direction)
    v0_random = rng.standard_normal(s.k) * s.head_scale * s.v_star_norm / np.sqrt(s.k)
    return Instance(basis_s, basis_perp, b_star, v_star, x, y, rotation, direction, v0_random)


def procrustes_distance(b0: np.ndarray, b_star: np.ndarray) -> float:
    """min over orthogonal U of ||b0 - U b_star||_F (orthogonal Procrustes via SVD)."""
    p, _, qt = np.linalg.svd(b0 @ b_star.T)
    return float(np.linalg.norm(b0 - p @ qt @ b_star))


def linear_probe(b0: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares head on frozen features (minimum-norm if under-determined)."""
    return np.linalg.lstsq(x @ b0.T, y, rcond=None)[0]


def gradient_descent(
    v: np.ndarray,
    b: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    steps: int,
    lr: float,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch GD on (1/2n)||X B^T v - y||^2 for a batch of independent runs.

    Shapes: v (R, k), b (R, k, d), x (R, n, d), y (R, n). The data enter only through the
    second moments X^T X / n and X^T y / n, so one step costs O(R d^2) whatever n is.
    The B-gradient is v (X^T X w - X^T y)^T / n: its rows lie in the span of the training
    inputs, which is why B never changes on S's complement.
    """
    n = x.shape[1]
    sigma = np.einsum("rni,rnj->rij", x, x) / n
    c = np.einsum("rni,rn->ri", x, y) / n
    v, b = v.copy(), b.copy()
    chunk = 100
    with tqdm(total=steps, desc="gradient descent", unit="step", disable=progress_disabled(progress)) as bar:
        for start in range(0, steps, chunk):
            for _ in range(min(chunk, steps - start)):
                w = np.einsum("rk,rkd->rd", v, b)
                g = np.einsum("rij,rj->ri", sigma, w) - c
                grad_v = np.einsum("rkd,rd->rk", b, g)
                b -= lr * v[:, :, None] * g[:, None, :]
                v -= lr * grad_v
            bar.update(min(chunk, steps - start))
    return v, b


def _relative_change(delta: np.ndarray, b0: np.ndarray, basis: np.ndarray) -> float:
    """||(B - B0) P|| / ||B0 P|| with P the projector onto span(basis)."""
    return float(np.linalg.norm(delta @ basis) / np.linalg.norm(b0 @ basis))


def _record(
    inst: Instance, eps: float, seed: int, method: str, v: np.ndarray, b: np.ndarray, b0: np.ndarray
) -> dict:
    err = b.T @ v - inst.w_star
    residual = inst.x @ (b.T @ v) - inst.y
    delta = b - b0
    return {
        "eps": float(eps),
        "method": method,
        "seed": seed,
        "id_error": float(np.sum((inst.basis_s.T @ err) ** 2)),
        "ood_error": float(err @ err),
        "feature_change_in_span": _relative_change(delta, b0, inst.basis_s),
        "feature_change_orthogonal": _relative_change(delta, b0, inst.basis_perp),
        "train_mse": float(np.mean(residual**2)),
        "feature_error": procrustes_distance(b0, inst.b_star),
    }


def simulate(settings: TheorySettings | None = None, progress: bool = False) -> dict:
    """Run every (eps, seed, method) of the sweep; returns ``{"settings", "runs"}``.

    All gradient-descent runs advance together as one batched array computation.
    """
    settings = settings or TheorySettings()
    settings.validate()
    s = settings
    instances = [make_instance(s, seed) for seed in range(s.seeds)]
    gd_methods = [mth for mth in _GD_METHODS if mth in s.methods]

    runs: list[dict] = []
    batch: list[tuple[Instance, float, int, str, np.ndarray]] = []
    heads: list[np.ndarray] = []
    for seed, inst in enumerate(instances):
        for eps in s.eps:
            b0 = inst.b0(eps)
            v_lp = linear_probe(b0, inst.x, inst.y)
            if "lp" in s.methods:
                runs.append(_record(inst, eps, seed, "lp", v_lp, b0, b0))
            init = {"ft_random": inst.v0_random, "ft_zero": np.zeros(s.k), "lpft": v_lp}
            for method in gd_methods:
                batch.append((inst, eps, seed, method, b0))
                heads.append(init[method])

    if batch:
        logger.info("gradient descent: %d runs x %d steps (lr=%g)", len(batch), s.steps, s.lr)
        v, b = gradient_descent(
            np.stack(heads),
            np.stack([item[4] for item in batch]),
            np.stack([item[0].x for item in batch]),
            np.stack([item[0].y for item in batch]),
            s.steps,
            s.lr,
            progress=progress,
        )
        for i, (inst, eps, seed, method, b0) in enumerate(batch):
            runs.append(_record(inst, eps, seed, method, v[i], b[i], b0))

    worst = max((r["train_mse"] for r in runs if r["method"] != "lp"), default=0.0)
    if not np.isfinite(worst):
        logger.warning("gradient descent diverged; lower --lr")
    elif worst > CONVERGED_MSE:
        logger.warning(
            "some FT/LP-FT runs did not converge (worst training MSE %.2e > %.0e); "
            "raise --steps or --lr",
            worst,
            CONVERGED_MSE,
        )
    order = {mth: i for i, mth in enumerate(METHODS)}
    runs.sort(key=lambda r: (r["eps"], order[r["method"]], r["seed"]))
    return {"settings": s.to_dict(), "runs": runs}


def summarise(result: dict) -> dict[tuple[float, str], dict[str, float]]:
    """Mean, min and max over seeds of each metric, keyed by (eps, method)."""
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for run in result["runs"]:
        groups[(run["eps"], run["method"])].append(run)
    out: dict[tuple[float, str], dict[str, float]] = {}
    for key, rows in groups.items():
        stats: dict[str, float] = {}
        for metric in rows[0]:
            if metric in ("eps", "method", "seed"):
                continue
            values = np.array([r[metric] for r in rows], dtype=float)
            stats[metric] = float(values.mean())
            stats[f"{metric}_min"] = float(values.min())
            stats[f"{metric}_max"] = float(values.max())
        out[key] = stats
    return out
