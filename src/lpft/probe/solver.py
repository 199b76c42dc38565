"""Newton-CG for L2-regularised multinomial logistic regression, on CPU or CUDA.

The probe's parameters (d*K) are few next to the data (n*d), so the cost is the number of
passes over the features. Newton steps need far fewer passes than L-BFGS:

- the Hessian-vector products of the conjugate-gradient inner solve use either every row
  (exact; 2 passes per CG step, and the step's logits come for free) or a fixed random
  subsample of rows (sub-sampled Newton; a fraction of a pass, plus one pass for the logits);
- CG is preconditioned with a Kronecker (K-FAC-like) approximation of the Hessian,
  ``Sigma (x) A + lambda I``, where Sigma is the (subsampled) second moment of the
  features and A the mean softmax curvature; both eigendecompositions are small;
- the logits are updated along the search direction, so a line search costs no pass;
- a solve returns its logits and data gradient, so the next C starts without a pass.

Besides CG, a Newton step costs one pass for the gradient. Big products run in float32
(the features' precision); parameters, gradients and sums are float64.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

Tensor = torch.Tensor
ArrayLike = np.ndarray | Tensor


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; on CPU through numpy's BLAS, which took ~2x less CPU time than torch's
    MKL for these tall-skinny products on the (AMD) machines we measured."""
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype:
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return a @ b


class Design:
    """Normalised features ``Z = (X - shift) / scale`` with the two products the solver needs.

    In-memory features are normalised once into one device tensor. Host arrays passed with
    ``chunk_rows`` (e.g. a ``np.memmap`` too large for device memory) stay where they are
    and are normalised chunk by chunk on every pass.
    """

    def __init__(
        self,
        X: ArrayLike,
        shift: Tensor,
        scale: Tensor,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        chunk_rows: int | None = None,
    ) -> None:
        self.n, self.d = int(X.shape[0]), int(X.shape[1])
        self.device, self.dtype = device, dtype
        self._shift = shift.to(device=device, dtype=torch.float32)
        self._scale = scale.to(device=device, dtype=torch.float32)
        self._chunk_rows = chunk_rows
        self._host: ArrayLike | None = None
        self._z: Tensor | None = None
        if chunk_rows is None or chunk_rows >= self.n:
            self._chunk_rows = None
            self._z = self._normalise(X)
        else:
            self._host = X

    def _normalise(self, block: ArrayLike) -> Tensor:
        t = torch.as_tensor(block).to(device=self.device, dtype=torch.float32)
        return (t - self._shift).div_(self._scale).to(self.dtype).contiguous()

    @property
    def dense(self) -> Tensor | None:
        """All normalised rows as one device tensor, or None when streamed."""
        return self._z

    def chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """(row slice, normalised rows) covering all rows once."""
        if self._z is not None:
            yield slice(0, self.n), self._z
            return
        assert self._host is not None and self._chunk_rows is not None
        for start in range(0, self.n, self._chunk_rows):
            rows = slice(start, min(start + self._chunk_rows, self.n))
            yield rows, self._normalise(self._host[rows])

    def rows(self, idx: np.ndarray) -> Tensor:
        """Normalised rows ``idx`` as one tensor (used for the Hessian subsample)."""
        if self._z is not None:
            return self._z[torch.as_tensor(idx, device=self.device)].contiguous()
        assert self._host is not None
        return self._normalise(np.asarray(self._host[np.sort(idx)]))

    def logits(self, theta: Tensor) -> Tensor:
        """``Z @ W + b`` (n x K) for ``theta = [W; b]`` of shape (d+1) x K.

        The product runs in the features' precision; the result is float64 so that the line
        search compares objectives of nearby points without float32 rounding noise.
        """
        w = theta[:-1].to(self.dtype)
        out = torch.empty(self.n, theta.shape[1], device=self.device, dtype=torch.float64)
        for rows, z in self.chunks():
            out[rows] = matmul(z, w)
        out += theta[-1]
        return out

    def grad(self, R: Tensor) -> Tensor:
        """``[Z^T R; 1^T R]`` in float64, (d+1) x K: the data part of the gradient."""
        g = torch.zeros(self.d + 1, R.shape[1], device=self.device, dtype=torch.float64)
        for rows, z in self.chunks():
            r = R[rows]
            g[:-1] += matmul(z.T, r.to(self.dtype)).double()
            g[-1] += r.sum(0, dtype=torch.float64)
        return g


def curvature_product(zs: Tensor, ps: Tensor, d: Tensor, block_rows: int = 256) -> tuple[Tensor, Tensor]:
    """``u = [Z, 1] d`` (float32, m x K) and the mean cross-entropy's Hessian times ``d``,
    ``[Z, 1]^T (ps * (u - <ps, u>)) / m`` (float64, (d+1) x K), for softmax outputs ``ps``.

    On CPU the rows go in blocks that stay in cache between the two products, so Z is read
    from memory once instead of twice. With few classes the products are bound by that read:
    1.7x faster at 6000 x 1280 x 10 and 45,000 x 512 x 10; no change measured at K = 100.
    """
    m = zs.shape[0]
    if zs.device.type != "cpu" or zs.dtype != torch.float32:
        u = (zs @ d[:-1].to(zs.dtype)).float() + d[-1].float()
        t = (u - (ps * u).sum(1, keepdim=True)) * ps
        return u, torch.cat([(zs.T @ t.to(zs.dtype)).double(), t.sum(0).double()[None]]) / m
    z, p = zs.numpy(), ps.numpy()
    dw, db = d[:-1].float().numpy(), d[-1].float().numpy()
    u = np.empty(p.shape, dtype=np.float32)
    hw = np.zeros(dw.shape, dtype=np.float32)
    hb = np.zeros(db.shape, dtype=np.float64)
    for start in range(0, m, block_rows):
        rows = slice(start, start + block_rows)
        ub = np.matmul(z[rows], dw, out=u[rows])
        ub += db
        t = ub - np.einsum("ik,ik->i", p[rows], ub)[:, None]
        t *= p[rows]
        hw += z[rows].T @ t
        hb += t.sum(0)
    hd = torch.from_numpy(np.concatenate([hw.astype(np.float64), hb[None]])) / m
    return torch.from_numpy(u), hd


@dataclass
class SolveInfo:
    """How one fit went: Newton steps, CG steps, full passes over the data, final gradient."""

    n_iter: int
    n_cg: int
    n_passes: float
    grad_max: float
    converged: bool


def cross_entropy(L: Tensor, y: Tensor, lse: Tensor | None = None) -> tuple[float, Tensor]:
    """Mean cross-entropy (summed in float64) and the row-wise logsumexp (computed unless given)."""
    lse = torch.logsumexp(L, dim=1) if lse is None else lse
    ce = (lse - L.gather(1, y[:, None]).squeeze(1)).double().mean()
    return float(ce), lse


class Preconditioner:
    """Inverse of ``Sigma (x) A + lambda I`` applied to a (d+1) x K matrix.

    Sigma is the second moment of ``[z, 1]`` over the Hessian rows, fixed per fit;
    A is the mean softmax curvature, refreshed every Newton step. Both are diagonalised,
    so the inverse is two small products on each side and an elementwise division. With
    fewer rows m than columns, Sigma has rank <= m: it is factored through the m x m Gram
    matrix, and the products shrink from (d+1)^2 K to m (d+1) K (few-shot probes).
    """

    def __init__(self, zs: Tensor) -> None:
        z1 = torch.cat([zs.float(), torch.ones(zs.shape[0], 1, device=zs.device)], 1)
        m, cols = z1.shape
        # float32 is ample for a preconditioner and halves the eigendecomposition.
        if m < cols:
            s, w = torch.linalg.eigh(matmul(z1, z1.T) / m)
            keep = s > 1e-6 * s.max()
            s, w = s[keep], w[:, keep]
            self.u = matmul(z1.T, w.contiguous()) / torch.sqrt(m * s)  # orthonormal columns
            self.partial = True
        else:
            s, self.u = torch.linalg.eigh(matmul(z1.T, z1) / m)  # numpy's BLAS sees Z^T Z: a SYRK
            self.partial = False
        self.s = s.double().clamp_min(0.0)

    def factor(self, ps: Tensor, lam: float) -> tuple[Tensor, Tensor, float]:
        """Eigenvectors of A, the rank x K divisor, and lambda, for the current softmax outputs."""
        p = ps.float()
        a = torch.diag(p.sum(0, dtype=torch.float64)) - matmul(p.T, p).double()
        a /= p.shape[0]
        w, v = torch.linalg.eigh(a)
        return v.float(), (self.s[:, None] * w.clamp_min(0.0)[None, :] + lam).float(), lam

    def apply(self, g: Tensor, factor: tuple[Tensor, Tensor, float]) -> Tensor:
        v, div, lam = factor
        gf = g.float()
        proj = matmul(self.u.T, gf)
        inner = matmul(matmul(proj, v) / div, v.T)
        if self.partial:  # outside the span of u the operator is lambda I
            return (matmul(self.u, inner - proj / lam) + gf / lam).double()
        return matmul(self.u, inner).double()


@dataclass
class Point:
    """An iterate with the per-row quantities that cost a pass each to recompute.

    ``logits`` are those of ``theta`` on the design (float64); ``data_grad`` is the gradient
    of the mean cross-entropy alone, so it stays valid when the next fit changes lambda.
    """

    theta: Tensor
    logits: Tensor | None = None
    data_grad: Tensor | None = None
    lse: Tensor | None = None  # row-wise logsumexp of ``logits``


def newton_cg(
    design: Design,
    y: Tensor,
    lam: float,
    start: Point,
    hess_idx: np.ndarray,
    zs: Tensor,
    precond: Preconditioner,
    tol: float,
    max_iter: int,
    min_iter: int = 0,
    max_cg: int = 50,
    forcing: float = 0.5,
    abandon: Callable[[Tensor], bool] | None = None,
) -> tuple[Point, SolveInfo]:
    """Minimise ``mean_i CE_i + lam/2 ||W||^2`` from ``start`` (``theta = [W; b]``).

    Returns the solution (with its logits and, unless the last step stalled, its data
    gradient) and a ``SolveInfo``. Stops when the largest gradient entry is below ``tol``
    (the quantity sklearn's lbfgs ``tol`` bounds), after at least ``min_iter`` steps (so a
    warm start from a nearby C still moves). When ``zs`` holds every row in order
    (``hess_idx`` is ``arange(n)``) the Hessian is exact and the step's logits are
    accumulated during CG. CG stops at a relative residual ``eta = min(forcing,
    sqrt(|g|))`` (superlinear convergence), but never tighter than ``tol`` needs.
    ``abandon(theta)``, asked after each step, ends the solve early when it returns True.
    """
    n, m = design.n, zs.shape[0]
    full = m == n
    hidx = torch.as_tensor(hess_idx, device=design.device)
    rows = torch.arange(n, device=design.device)
    theta = start.theta.clone()
    passes, n_cg, it = 0.0, 0, 0
    L = start.logits
    if L is None:
        L = design.logits(theta)
        passes += 1.0
    G = start.data_grad
    converged = False
    # ||W||^2 along a step: ||W + a S||^2 = ww + 2 a ws + a^2 ss, so trial points cost nothing.
    ww = float((theta[:-1] ** 2).sum())

    ce, lse = cross_entropy(L, y, start.lse)
    f = ce + 0.5 * lam * ww
    while True:
        # Softmax in float32: it feeds float32 products only (gradient, curvature); the
        # logits and their logsumexp stay float64 for the line search.
        P = (L - lse[:, None]).float().exp_()
        if G is None:
            R = P.clone()
            R[rows, y] -= 1.0
            G = design.grad(R) / n
            passes += 1.0
        g = G.clone()
        g[:-1] += lam * theta[:-1]
        gmax = float(g.abs().max())
        if gmax <= tol and it >= min_iter:
            converged = True
            break
        if it >= max_iter:
            break
        it += 1
        # Inexact Newton direction by preconditioned CG on the (subsampled) Hessian. The new
        # gradient is about the CG residual, so a residual far below tol buys nothing.
        ps = P if full else P[hidx]
        factor = precond.factor(ps, lam)
        gnorm = float(g.norm())
        eta = max(min(forcing, math.sqrt(gnorm)), 0.5 * tol / gmax)
        step = torch.zeros_like(theta)
        dL = torch.zeros_like(P) if full else None
        r = -g
        zr = precond.apply(r, factor)
        d = zr
        rz = float((r * zr).sum())
        for _ in range(max_cg):
            u, hd = curvature_product(zs, ps, d)
            hd[:-1] += lam * d[:-1]
            n_cg += 1
            passes += 2.0 * m / n
            dhd = float((d * hd).sum())
            if dhd <= 0.0:
                break
            alpha = rz / dhd
            step += alpha * d
            if dL is not None:
                dL.add_(u, alpha=alpha)
            r = r - alpha * hd
            if float(r.norm()) <= eta * gnorm:
                break
            zr = precond.apply(r, factor)
            rz_new = float((r * zr).sum())
            d = zr + (rz_new / rz) * d
            rz = rz_new
        # Backtracking (Armijo) line search along the step; logits move linearly, no pass.
        if dL is None:
            dL = design.logits(step)
            passes += 1.0
        slope = float((g * step).sum())
        if slope >= 0.0:
            step, slope = -g, -float((g * g).sum())
            dL = design.logits(step)
            passes += 1.0
        ws, ss = float((theta[:-1] * step[:-1]).sum()), float((step[:-1] ** 2).sum())
        a = 1.0
        for _ in range(40):
            L_new = torch.add(L, dL, alpha=a)
            ce_new, lse_new = cross_entropy(L_new, y)
            ww_new = ww + 2 * a * ws + a * a * ss
            f_new = ce_new + 0.5 * lam * ww_new
            if f_new <= f + 1e-4 * a * slope:
                break
            a *= 0.5
        else:
            log.debug("line search failed at step %d; stopping at gradient %.2e", it, gmax)
            break
        stalled = f - f_new <= 1e-15 * max(1.0, abs(f))
        theta += a * step
        L, lse, f, ww = L_new, lse_new, f_new, ww_new
        G = None
        if stalled or (abandon is not None and abandon(theta)):
            break
    info = SolveInfo(n_iter=it, n_cg=n_cg, n_passes=passes, grad_max=gmax, converged=converged)
    return Point(theta, L, G, lse), info


def _residual(logits: Tensor, bias: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy (float64), ``softmax - onehot`` in the logits' dtype, its column sums."""
    z = logits.float() + bias
    lse = torch.logsumexp(z, dim=1)
    loss = (lse - z.gather(1, y[:, None]).squeeze(1)).sum(dtype=torch.float64)
    resid = torch.exp(z - lse[:, None])
    resid = resid - torch.nn.functional.one_hot(y, z.shape[1]).to(resid.dtype)
    return loss, resid.to(logits.dtype), resid.sum(0)


@functools.cache
def _fused_residual() -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``_residual`` compiled into a couple of kernels (one read of the logits, one write of the
    residual); plain ``_residual`` where compilation is unavailable."""
    try:
        return torch.compile(_residual, dynamic=False)
    except Exception as exc:  # pragma: no cover - depends on the installed toolchain
        log.warning("torch.compile unavailable (%s); loss_and_grad runs eagerly", exc)
        return _residual


def loss_and_grad(
    X: Tensor, y: Tensor, W: Tensor, b: Tensor, chunk_rows: int = 262_144, fused: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of ``X @ W + b`` and its gradients in ``W`` and ``b``, in one sweep.

    For first-order use at large scale (e.g. ImageNet features in bf16 on a GPU): per row
    chunk, one matmul for the logits in X's dtype (float32 accumulation), logsumexp and the
    residual in float32, one matmul for the gradient. ``fused`` (default: on CUDA) compiles
    the elementwise part so the float32 temporaries never reach memory.
    """
    n = X.shape[0]
    w = W.to(X.dtype)
    bias = b.float()
    residual = _fused_residual() if (X.is_cuda if fused is None else fused) else _residual
    loss = torch.zeros((), device=X.device, dtype=torch.float64)
    gW = torch.zeros(W.shape, device=X.device, dtype=torch.float32)
    gb = torch.zeros(W.shape[1], device=X.device, dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        xc, yc = X[start : start + chunk_rows], y[start : start + chunk_rows]
        loss_c, resid, gb_c = residual(xc @ w, bias, yc)
        loss += loss_c
        gb += gb_c
        gW += (xc.T @ resid).float()
    return loss / n, gW / n, gb / n
