"""The nearest simplex ETF to a set of class means (Markou, Ajanthan, Gould, NeurIPS 2024).

For centred class means H[d, K], Hn = H / ||H||, and the previous solution U_prev:

    U* = argmin_{U in St(d, K)}  ||Hn - U M_K / sqrt(K)||^2 + (delta/2) ||U - U_prev||^2

On St(d, K) the objective is linear in U, so U* = polar(A) with
A = (2/sqrt(K-1)) Hn C + delta U_prev, C = I - 1 1^T / K (docs/math.md §2a). Without U_prev
(the first, "feasibility" solve) delta = 0 and A has rank <= K-1: U* C (hence the classifier
U* M_K) is still unique, and the free direction U* 1/sqrt(K) is chosen deterministically and
carries no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import geoopt
import torch
from torch import Tensor

from nearest_etf._validation import check_class_means, check_nonnegative, check_stiefel, normalise
from nearest_etf.declarative.node import BACKWARDS, Analytic, Backward, DeclarativeNode, as_backward
from nearest_etf.declarative.solvers import (
    SOLVERS,
    Inputs,
    Procrustes,
    Solver,
    as_solver,
    as_solver_result,
)
from nearest_etf.etf import centre_columns
from nearest_etf.polar_decomposition import polar, polar_of_bounded

__all__ = [
    "BACKWARDS",
    "SOLVERS",
    "as_backward",
    "as_solver",
    "nearest_etf",
    "nearest_etf_objective",
    "procrustes_target",
    "solve_nearest_etf",
]


def procrustes_target(Hn: Tensor, prox: Tensor | None, delta: float) -> Tensor:
    """A = (2/sqrt(K-1)) Hn C + delta prox, so that the objective is const - tr(U^T A).
    Shapes [..., d, K]."""
    K = Hn.shape[-1]
    A = centre_columns(Hn).mul_(2 / math.sqrt(K - 1))  # in place on a fresh tensor
    return A if prox is None else A.add_(prox, alpha=delta)


def nearest_etf_objective(
    Hn: Tensor, U: Tensor, prox: Tensor | None = None, delta: float = 1e-3
) -> Tensor:
    """||Hn - U M_K / sqrt(K)||^2 + (delta/2) ||U - prox||^2 (the prox term only with a prox),
    summed over leading batch dimensions. Hn, U, prox [..., d, K]."""
    K = U.shape[-1]
    value = (Hn - centre_columns(U) / math.sqrt(K - 1)).square().sum()
    return value if prox is None else value + delta / 2 * (U - prox).square().sum()


def _objective(delta: float, x: Inputs, U: Tensor) -> Tensor:
    """nearest_etf_objective in the DeclarativeNode form f(x, U), x = (Hn,) or (Hn, prox)."""
    Hn, *prox = x
    return nearest_etf_objective(Hn, U, prox[0] if prox else None, delta)


def _start_point(Hn: Tensor, prox: Tensor | None, delta: float) -> Tensor:
    """Initial point of the iterative solvers for one problem [d, K]: the previous solution,
    else I[:, :K]; for d == K, moved into the minimiser's connected component.

    St(d, d) = O(d) has two components, det = +1 and det = -1, and no path between them, so an
    iterative solver started in the other one converges to the best point of that component
    (2 s_min worse than the minimum, s_min the smallest singular value of A). The minimiser
    polar(A) has det sign(det A) (A = Q P with det P > 0); when the start's sign differs, the
    column k with the smallest (U^T A)_kk is reflected, the reflection that lowers tr(U^T A)
    least. A singular A (the feasibility solve) has minimisers in both components. Not
    differentiated (inputs detached)."""
    Hn, prox = Hn.detach(), None if prox is None else prox.detach()
    d, K = Hn.shape[-2:]
    start = prox if prox is not None else torch.eye(d, K, dtype=Hn.dtype, device=Hn.device)
    if d != K:
        return start
    A = procrustes_target(Hn, prox, delta)
    target = torch.sign(torch.linalg.det(A))
    if bool(target == 0) or bool(target == torch.sign(torch.linalg.det(start))):
        return start
    k = int(torch.argmin(torch.diagonal(start.mT @ A)))
    flip = torch.ones(K, dtype=start.dtype, device=start.device)
    flip[k] = -1
    return start * flip


def _map_problems(
    fn: Callable[[Tensor, Tensor | None], Tensor], Hn: Tensor, prox: Tensor | None
) -> Tensor:
    """Apply fn(Hn_i, prox_i) -> U_i to each problem of a batch [..., d, K] and restack."""
    shape = Hn.shape
    Hs = Hn.reshape(-1, *shape[-2:]).unbind(0)
    Ps = prox.reshape(-1, *shape[-2:]).unbind(0) if prox is not None else (None,) * len(Hs)
    return torch.stack([fn(h, p) for h, p in zip(Hs, Ps, strict=True)]).reshape(shape)


def nearest_etf(
    H: Tensor,
    prox: Tensor | None = None,
    *,
    delta: float = 1e-3,
    solver: str | Solver = "procrustes",
    backward: str | Backward = "analytic",
) -> Tensor:
    """The nearest simplex ETF frame U* in St(d, K) to the class means H, differentiable in H
    (Markou, Ajanthan & Gould, NeurIPS 2024; docs/math.md §2).

    Args:
        H: [..., d, K] centred class means as columns (any scale over the dtype's range;
            normalised to unit Frobenius norm, scale-safely, inside the differentiable map).
            d >= K >= 2. Leading dims are a batch. float16/bfloat16 are computed in float32.
        prox: [..., d, K] the previous solution (orthonormal columns), or None for the first,
            delta = 0 "feasibility" solve.
        delta: proximal weight (>= 0), used only with a prox; delta = 0 ignores the prox (the
            objective does not depend on it) and gives the feasibility solve.
        solver: a solver object or its shorthand (`nearest_etf.declarative.solvers.SOLVERS`):
            `Procrustes()` / "procrustes" (closed form U* = polar(A), the default),
            `TrustRegions(...)` / "trust-regions" (pymanopt, 30 iterations by default),
            `RiemannianAdamSolver(...)` / "riemannian-adam" (geoopt, to a gradient tolerance),
            or any `Solver` callable. Iterative solvers start at the prox (else I[:, :K]),
            moved into the minimiser's component of O(d) when d == K, and warn when they stop
            short of their tolerance.
        backward: a backward object or its shorthand (`BACKWARDS`): `Analytic()` / "analytic"
            (closed-form polar derivative, O(dK^2 + K^3), docs/math.md §2b), `DenseKKT()` / "kkt"
            (dense implicit-function system of the generic `DeclarativeNode`) or
            `ConjugateGradient(rtol, max_iterations)` / "cg" (matrix-free conjugate gradients on
            the Riemannian Hessian, same node).

    Returns:
        U [..., d, K] with U^T U = I minimising ||Hn - U M_K/sqrt(K)||^2 + (delta/2)||U - prox||^2.
        The ETF classifier is `etf_classifier(U)` = (U M_K)^T. Without a prox, U C is unique
        only when the centred means H C have rank K - 1; with fewer independent centred means
        the missing directions are completed deterministically and held fixed (no gradient),
        so finite differences disagree with the gradient there by design.

    Raises:
        TypeError for a non-float dtype; ValueError for NaN/inf entries, a bad shape, centred
        means H C that vanish (all class means coincide), a malformed prox or a negative delta;
        ValueError / TypeError for an unknown solver or backward. The backward is a first
        derivative: asked for a graph of it (create_graph=True, e.g. a Hessian), it raises
        RuntimeError rather than return a partial second derivative.
    """
    H = check_class_means(H)
    delta = check_nonnegative("delta", delta)
    solver, backward = as_solver(solver), as_backward(backward)
    if prox is not None:
        prox = check_stiefel("prox", prox, H.shape, H.dtype).to(H.device)
    Hn = normalise(H, (-2, -1))
    return solve_nearest_etf(Hn, prox, delta, solver, backward)


def solve_nearest_etf(
    Hn: Tensor,
    prox: Tensor | None,
    delta: float,
    solver: str | Solver,
    backward: str | Backward,
) -> Tensor:
    """`nearest_etf` without its input checks, for unit-norm Hn [..., d, K] and a checked prox
    (callers that validated their inputs already, e.g. `ImplicitETFHead` at every step). The
    solver and backward are normalised by `as_solver` / `as_backward` (cheap for objects)."""
    solve, backward = as_solver(solver), as_backward(backward)
    if delta == 0:
        prox = None
    objective = partial(_objective, delta)
    manifold = geoopt.Stiefel(canonical=False)

    def inputs(h: Tensor, p: Tensor | None) -> tuple[Tensor, ...]:
        return (h,) if p is None else (h, p)

    if isinstance(backward, Analytic):
        A = procrustes_target(Hn, prox, delta)
        if isinstance(solve, Procrustes):
            # |A_ij| <= 4/sqrt(K-1) + delta (Hn unit-norm, prox orthonormal): an exact power of two
            # brings a large delta to order one (polar(cA) = polar(A) for c > 0)
            U = polar_of_bounded(A if delta <= 1 else A * 2.0 ** -math.frexp(delta)[1])
        else:
            with torch.no_grad():
                found = _map_problems(
                    lambda h, p: (
                        as_solver_result(
                            solve(objective, manifold, inputs(h, p), _start_point(h, p, delta))
                        ).point
                    ),
                    Hn,
                    prox,
                )
            U = polar(A, found)
    else:
        node = DeclarativeNode(objective, manifold, solve, backward=backward)
        U = _map_problems(lambda h, p: node(inputs(h, p), _start_point(h, p, delta)), Hn, prox)
    if prox is None:
        # Only U C is determined: the free column direction U 1/sqrt(K) carries no gradient.
        U = centre_columns(U) + U.detach().mean(dim=-1, keepdim=True)
    return U
