"""Reference solutions of the L-DUFM: deep neural collapse (DNC) and the low-rank SRG point.

Balanced scaling. Let unit-scale matrices A_0 (for H_1) and A_1..A_L (for W_1..W_L) with
non-negative hidden pre-activations satisfy forward(A) = Y exactly. ReLU is positively
homogeneous, so the point (x_0 A_0, ..., x_L A_L), x_i > 0, has output t Y with t = prod x_i and

    loss = 1/2 (t - 1)^2 + sum_i a_i x_i^2 / 2,    a_i = lambda_i ||A_i||^2.

For fixed t, AM-GM gives sum_i a_i x_i^2 >= (L+1) c t^(2/(L+1)), c = (prod_i a_i)^(1/(L+1)),
with equality iff all a_i x_i^2 are equal. With u = t^(1/(L+1)) the best loss of the structure is

    min_{u >= 0}  1/2 (u^(L+1) - 1)^2 + (L+1) c u^2 / 2.

DNC (every layer an orthogonal frame of the K classes): A_0 = E_K (I_K kron 1_n^T),
A_l = E_K E_K^T, A_L = E_K^T, so ||A_0||^2 = N = nK and ||A_l||^2 = K, hence

    c_DNC = (lambda_H n K prod_{l=1}^{L} lambda_W_l K)^(1/(L+1)),

which for n = 1 and equal lambdas is lambda K: min_u 1/2 (u^(L+1) - 1)^2 + lambda (L+1) K u^2/2
(0.0992 for L = 4, K = 10, lambda = 0.004).

SRG (Sukenik, Mondelli & Lampert 2024), K = r(r-1)/2, classes = edges of the complete graph
on r vertices, B the r x K vertex-edge incidence matrix: H_1 ... H_{L-1} have class means B
(rank r); W_{L-1} = B^T - (1/2) 1_K 1_r^T maps B to B^T B - J = 2I + A - J (A the adjacency of
the line graph, a strongly regular graph) whose ReLU is I_K; W_L = I_K. This is scaled as above
and then optimised locally (L-BFGS on all parameters) from there.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from nearest_etf._threads import single_threaded
from nearest_etf.experiments.dufm.model import DUFMProblem

__all__ = [
    "ReferenceLosses",
    "balanced_scale_loss",
    "dnc_loss",
    "dnc_point",
    "incidence_matrix",
    "optimise_locally",
    "reference_losses",
    "srg_point",
    "srg_vertices",
]


def balanced_scale_loss(c: float, layers: int) -> tuple[float, float]:
    """(loss, u) minimising 1/2 (u^(L+1) - 1)^2 + (L+1) c u^2 / 2 over u >= 0.

    The minimiser lies in [0, 1] (both terms grow beyond 1) and the function can have two local
    minima there, so a fine grid picks the basin and bounded Brent refines it.
    """
    if not c > 0:
        raise ValueError(f"c must be positive (all regularisation strengths > 0), got {c}")
    p = layers + 1

    def f(u: float) -> float:
        return 0.5 * (u**p - 1.0) ** 2 + p * c * u * u / 2

    grid = np.linspace(0.0, 1.0, 2001)
    i = int(np.argmin(f(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = scipy.optimize.minimize_scalar(
        f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-14}
    )
    if not res.success:
        warnings.warn(
            f"balanced_scale_loss: bounded Brent stopped short of xatol=1e-14 ({res.message})",
            RuntimeWarning,
            stacklevel=2,
        )
    u = float(res.x) if res.fun <= f(grid[i]) else float(grid[i])
    return f(u), u


def _structure_constant(problem: DUFMProblem, unit: Sequence[Tensor]) -> float:
    lambdas = [problem.lambda_h, *problem.lambda_w]
    if min(lambdas) <= 0:
        raise ValueError("reference solutions need every regularisation strength > 0")
    logs = [math.log(lam * float((A * A).sum())) for lam, A in zip(lambdas, unit, strict=True)]
    return math.exp(sum(logs) / len(logs))


def _scale(problem: DUFMProblem, unit: list[Tensor]) -> list[Tensor]:
    """The optimally scaled point (x_0 A_0, ..., x_L A_L) of a unit structure (module doc)."""
    c = _structure_constant(problem, unit)
    _, u = balanced_scale_loss(c, problem.layers)
    lambdas = [problem.lambda_h, *problem.lambda_w]
    kappa = c * u * u  # every a_i x_i^2 equals kappa at the optimum
    return [
        math.sqrt(kappa / (lam * float((A * A).sum()))) * A
        for lam, A in zip(lambdas, unit, strict=True)
    ]


def _embed(problem: DUFMProblem, M: Tensor, rows: bool = True, cols: bool = True) -> Tensor:
    """Place M in the top-left corner of a zero matrix with width-sized rows / columns."""
    d = problem.width
    out = torch.zeros(
        d if rows else M.shape[0],
        d if cols else M.shape[1],
        dtype=problem.dtype,
        device=problem.device,
    )
    out[: M.shape[0], : M.shape[1]] = M
    return out


def dnc_loss(problem: DUFMProblem) -> float:
    """Closed-form loss of the optimally scaled DNC point (module doc)."""
    K, n = problem.classes, problem.per_class
    a = [problem.lambda_h * n * K] + [lam * K for lam in problem.lambda_w]
    if min(a) <= 0:
        raise ValueError("reference solutions need every regularisation strength > 0")
    c = math.exp(sum(math.log(v) for v in a) / len(a))
    return balanced_scale_loss(c, problem.layers)[0]


def dnc_point(problem: DUFMProblem) -> list[Tensor]:
    """The optimally scaled DNC point [H_1, W_1..W_L]: orthogonal frames in every layer."""
    eye = torch.eye(problem.classes, dtype=problem.dtype, device=problem.device)
    unit = [_embed(problem, eye[:, problem.labels], cols=False)]
    unit += [_embed(problem, eye)] * (problem.layers - 1)
    unit.append(_embed(problem, eye, rows=False))
    return _scale(problem, unit)


def srg_vertices(classes: int) -> int:
    """r with K = r(r-1)/2, or a ValueError if K is not a triangular number >= 3."""
    r = round((1 + math.sqrt(1 + 8 * classes)) / 2)
    if classes < 3 or r * (r - 1) // 2 != classes:
        raise ValueError(
            f"the SRG construction needs K = r(r-1)/2 with r >= 3 (K = 3, 6, 10, 15, ...), "
            f"got K={classes}"
        )
    return r


def incidence_matrix(r: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Vertex-edge incidence matrix [r, r(r-1)/2] of the complete graph on r vertices
    (edges in lexicographic order)."""
    edges = list(itertools.combinations(range(r), 2))
    B = torch.zeros(r, len(edges), dtype=dtype)
    for k, (i, j) in enumerate(edges):
        B[i, k] = B[j, k] = 1.0
    return B


def srg_point(problem: DUFMProblem) -> list[Tensor]:
    """The optimally scaled SRG construction [H_1, W_1..W_L] (before local optimisation)."""
    K = problem.classes
    r = srg_vertices(K)
    B = incidence_matrix(r, problem.dtype).to(problem.device)
    to_line_graph = B.T - 0.5 * torch.ones(K, r, dtype=problem.dtype, device=problem.device)
    eye_r = torch.eye(r, dtype=problem.dtype, device=problem.device)
    eye_k = torch.eye(K, dtype=problem.dtype, device=problem.device)
    unit = [_embed(problem, B[:, problem.labels], cols=False)]
    unit += [_embed(problem, eye_r)] * (problem.layers - 2)
    unit += [_embed(problem, to_line_graph), _embed(problem, eye_k, rows=False)]
    return _scale(problem, unit)


def optimise_locally(
    problem: DUFMProblem,
    params: Sequence[Tensor],
    gd_steps: int = 2000,
    gd_lr: float = 0.25,
    max_iter: int = 5000,
    gtol: float = 1e-9,
) -> list[Tensor]:
    """Local optimisation from ``params``: ``gd_steps`` of gradient descent (robust at the ReLU
    kinks where constructions have exactly-zero pre-activations, on which L-BFGS line searches
    fail), then scipy's L-BFGS with the explicit DUFM gradient. Returns the better of the two
    points; warns (RuntimeWarning) when L-BFGS reports failure (its iteration cap, or an
    abnormal line-search end), with its message and the gradient reached."""
    shapes = problem.shapes()
    sizes = [a * b for a, b in shapes]

    def unflatten(x: np.ndarray) -> list[Tensor]:
        flat = torch.from_numpy(x).to(dtype=problem.dtype, device=problem.device)
        return [p.reshape(s) for p, s in zip(torch.split(flat, sizes), shapes, strict=True)]

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        parts, grads = problem.loss_and_grad(unflatten(x))
        return parts.total, torch.cat([g.flatten() for g in grads]).cpu().double().numpy()

    with single_threaded():  # tiny matrices; torch threads contend with scipy's BLAS
        current = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(current, lr=gd_lr)
        for _ in range(gd_steps):
            _, grads = problem.loss_and_grad(current, with_loss=False)
            for p, g in zip(current, grads, strict=True):
                p.grad = g
            optimizer.step()
        x0 = torch.cat([p.flatten() for p in current]).cpu().double().numpy()
        res = scipy.optimize.minimize(
            fun,
            x0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "gtol": gtol, "ftol": 1e-15},
        )
    if not res.success:
        warnings.warn(
            f"optimise_locally: L-BFGS-B stopped short after {res.nit} iterations: {res.message} "
            f"(max |grad| = {float(np.abs(res.jac).max()):.2e}, gtol = {gtol:g})",
            RuntimeWarning,
            stacklevel=2,
        )
    best = unflatten(res.x)
    return best if problem.loss_parts(best).total <= problem.loss_parts(current).total else current


@dataclass(frozen=True)
class ReferenceLosses:
    """DNC (closed form), SRG construction (scaled) and locally optimised SRG losses; the SRG
    entries are None when K is not r(r-1)/2."""

    dnc: float
    srg_construction: float | None
    srg: float | None

    @property
    def srg_over_dnc(self) -> float | None:
        return None if self.srg is None else self.srg / self.dnc


def reference_losses(problem: DUFMProblem) -> ReferenceLosses:
    """Reference losses evaluated in ``problem``'s loss."""
    dnc = dnc_loss(problem)
    try:
        start = srg_point(problem)
    except ValueError:
        return ReferenceLosses(dnc, None, None)
    local = optimise_locally(problem, start)
    return ReferenceLosses(dnc, problem.loss_parts(start).total, problem.loss_parts(local).total)
