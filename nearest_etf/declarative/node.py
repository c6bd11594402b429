"""A deep declarative node on a manifold: y*(x) = argmin_{y in M} f(x, y), differentiated
implicitly (Gould et al., "Deep Declarative Networks", TPAMI 2021).

Forward: any solver (`nearest_etf.declarative.solvers`). Backward (docs/math.md §2c), for
upstream v = dL/dy at the minimiser y*:

    solve  Hess_R f(y*)[w] = Proj_{y*}(v)   in the tangent space T_{y*}M,
    dL/dx = - d/dx < grad_y f(x, y*), w >    (w held fixed).

Where the minimiser is not isolated (a solution set, e.g. the free directions of a
rank-deficient nearest-ETF problem) the Hessian is singular and Proj(v) can have a component in
its null space; both backward methods then return the minimum-norm least-squares solution
w = Hess_R^+ Proj(v), the derivative of the minimum-norm branch:
  - `DenseKKT()` ("kkt"): the dense KKT system of the equality-constrained problem h(y) = 0,
               [ H_L  A^T ] [ w  ]   [ v ]
               [ A    0   ] [ nu ] = [ 0 ],   H_L = D^2_yy (f - lambda . h),  A = Dh(y*),
           with lambda the least-squares multipliers of grad_y f = A^T lambda, solved by the
           Hermitian pseudo-inverse. Time O(n^3) for n = numel(y): the small-size oracle.
  - `ConjugateGradient(rtol, max_iterations)` ("cg"): matrix-free conjugate gradients;
           Hessian-vector products D^2_yy f[xi] by forward-over-reverse autograd (torch.func.jvp
           of torch.func.grad), then the Riemannian Hessian of `geometry`. When CG
           breaks down (curvature p^T H p ~ 0: a singular Hessian) or misses its tolerance,
           `minimum_norm_solve` takes over; if that misses the tolerance too, a RuntimeWarning
           gives the residual reached. Memory O(numel(y)).
`Analytic()` ("analytic") names the closed-form polar derivative of `nearest_etf.nearest_etf`;
it exists for that function only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import geoopt
import torch
from torch import Tensor

from nearest_etf._threads import is_small, single_threaded
from nearest_etf._validation import SECOND_ORDER_ERROR, check_int, from_shorthand
from nearest_etf.declarative.geometry import ConstraintGeometry, geometry_of
from nearest_etf.declarative.solvers import (
    Inputs,
    Objective,
    Solver,
    SolverResult,
    as_solver,
    as_solver_result,
)

__all__ = [
    "BACKWARDS",
    "Analytic",
    "Backward",
    "ConjugateGradient",
    "DeclarativeNode",
    "DenseKKT",
    "LinearSolution",
    "as_backward",
    "conjugate_gradient",
    "minimum_norm_solve",
]


@dataclass(frozen=True)
class LinearSolution:
    """What an iterative linear solve reached.

    Attributes:
        solution: w, shaped like the right-hand side.
        converged: whether ||residual|| <= tolerance.
        iterations: operator applications in the iteration (each costs one product).
        residual_norm: ||b - A w|| from the CG recurrence; for `minimum_norm_solve`, the
            residual of the projected system ||b_range - A w||.
        rhs_norm: the norm of the right-hand side that residual belongs to (||b||, or
            ||b_range||); converged means residual_norm <= rtol * rhs_norm.
        stopping_reason: why it stopped, in words.
    """

    solution: Tensor
    converged: bool
    iterations: int
    residual_norm: float
    rhs_norm: float
    stopping_reason: str

    @property
    def relative_residual(self) -> float:
        """residual_norm / rhs_norm (0 for a zero right-hand side)."""
        return self.residual_norm / self.rhs_norm if self.rhs_norm > 0 else 0.0


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.vdot(a.flatten(), b.flatten())


def conjugate_gradient(
    operator: Callable[[Tensor], Tensor], b: Tensor, *, rtol: float, max_iterations: int
) -> LinearSolution:
    """Solve operator(w) = b for a symmetric positive (semi)definite operator by conjugate
    gradients (Hestenes & Stiefel 1952) from w = 0.

    Stops when ||r|| <= rtol ||b|| (converged), after `max_iterations` steps, or on a breakdown:
    a search direction p with curvature p^T A p <= 10 sqrt(n) eps max_k(p_k^T A p_k / ||p_k||^2)
    ||p||^2 (n = numel(b), eps of the dtype), the sign of a singular operator with b outside its
    range (CG's next step would be unbounded) or of an indefinite one; the step is then not
    taken. Runs on the device of b. Returns a `LinearSolution`; it never raises on stopping
    short."""
    w = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(_dot(r, r))
    rhs_norm = math.sqrt(rr)
    breakdown = 10 * math.sqrt(b.numel()) * torch.finfo(b.dtype).eps
    max_curvature = 0.0
    iterations = 0
    reason = f"max_iterations={max_iterations} reached"
    while True:
        if math.sqrt(rr) <= rtol * rhs_norm:
            reason = "||residual|| <= rtol ||b||"
            break
        if iterations == max_iterations:
            break
        Ap = operator(p)
        iterations += 1
        pAp = float(_dot(p, Ap))
        curvature = pAp / float(_dot(p, p))
        max_curvature = max(max_curvature, curvature)
        if not math.isfinite(curvature) or curvature <= breakdown * max_curvature:
            reason = (
                f"breakdown: curvature p^T A p / ||p||^2 = {curvature:.2e} "
                f"(largest seen {max_curvature:.2e}): singular or indefinite operator"
            )
            break
        alpha = rr / pAp
        w = w + alpha * p
        r = r - alpha * Ap
        rr_next = float(_dot(r, r))
        p = r + (rr_next / rr) * p
        rr = rr_next
    residual = math.sqrt(rr)
    return LinearSolution(w, residual <= rtol * rhs_norm, iterations, residual, rhs_norm, reason)


def minimum_norm_solve(
    operator: Callable[[Tensor], Tensor], b: Tensor, *, rtol: float, max_iterations: int
) -> LinearSolution:
    """w = A^+ b, the minimum-norm least-squares solution of operator(w) = b for a symmetric
    positive semidefinite operator A, singular or not, with b in its range or not.

    Two conjugate-gradient solves of consistent systems whose Krylov spaces lie in range(A):
    A z = A b from z = 0 gives z = A A^+ b = b_range (the orthogonal projection of b onto
    range(A)), then A w = z from w = 0 gives w = A^+ b_range = A^+ b (CG on a consistent
    semidefinite system from 0 stays in range(A); Kaasschieter 1988). Each solve stops at
    rtol times its right-hand side's norm or after `max_iterations`; the result is converged when
    both are. Its `residual_norm` is ||z - A w||, the residual of the projected system."""
    projection = conjugate_gradient(operator, operator(b), rtol=rtol, max_iterations=max_iterations)
    z = projection.solution
    solve = conjugate_gradient(operator, z, rtol=rtol, max_iterations=max_iterations)
    outside = float(torch.linalg.vector_norm(b - z))
    reason = (
        f"projection onto the range: {projection.stopping_reason} "
        f"(||b - b_range|| = {outside:.2e}); solve: {solve.stopping_reason}"
    )
    return LinearSolution(
        solve.solution,
        projection.converged and solve.converged,
        1 + projection.iterations + solve.iterations,
        solve.residual_norm,
        solve.rhs_norm,
        reason,
    )


def _hessian_vector_product(
    geometry: ConstraintGeometry, f_y: Callable[[Tensor], Tensor], y: Tensor
) -> Callable[[Tensor], Tensor]:
    """xi -> Hess_R f(y)[xi] on T_y M, D^2 f(y)[xi] by forward-over-reverse autograd."""
    egrad_fn = torch.func.grad(f_y)
    egrad = egrad_fn(y)

    def product(xi: Tensor) -> Tensor:
        _, ehess_xi = torch.func.jvp(egrad_fn, (y,), (xi,))
        return geometry.riemannian_hessian(y, egrad, ehess_xi, xi)

    return product


@dataclass(frozen=True)
class Analytic:
    """The closed-form derivative of the nearest-ETF solution (the polar-factor VJP,
    docs/math.md §2b; `polar_vjp`): O(dK^2 + K^3). Accepted by `nearest_etf` and the heads; a
    generic `DeclarativeNode` has no closed form and rejects it."""


@dataclass(frozen=True)
class DenseKKT:
    """The dense bordered KKT solve of the implicit-function system (module docstring), by the
    Hermitian pseudo-inverse: the minimum-norm solution where the minimiser is not isolated.
    O(n^3) time, O(n^2) memory for n = numel(y): the small-size oracle."""

    def tangent_solve(
        self, geometry: ConstraintGeometry, f_y: Callable[[Tensor], Tensor], y: Tensor, v: Tensor
    ) -> Tensor:
        """w in T_y M with Hess_R f(y)[w] = Proj_y(v) (minimum norm)."""
        n = y.numel()

        def f_flat(y_flat: Tensor) -> Tensor:
            return f_y(y_flat.reshape(y.shape))

        def h_flat(y_flat: Tensor) -> Tensor:
            return geometry.constraints(y_flat.reshape(y.shape))

        y_flat = y.reshape(-1)
        egrad = torch.func.grad(f_flat)(y_flat)
        A = torch.func.jacrev(h_flat)(y_flat).reshape(-1, n)
        m = A.shape[0]
        lam = (
            torch.linalg.lstsq(A.mT, egrad.unsqueeze(-1)).solution.squeeze(-1)
            if m
            else egrad.new_zeros(0)
        )

        def lagrangian(y_flat: Tensor) -> Tensor:
            return f_flat(y_flat) - lam @ h_flat(y_flat)

        H_L = torch.func.hessian(lagrangian)(y_flat)
        kkt = torch.cat(
            [torch.cat([H_L, A.mT], dim=1), torch.cat([A, A.new_zeros(m, m)], dim=1)], dim=0
        )
        rhs = torch.cat([v.reshape(-1), v.new_zeros(m)])
        # The minimum-norm solution (Hermitian pseudo-inverse): the system is singular where the
        # minimiser is not isolated, and an LU solve there can return a huge vector whose
        # residual still looks small.
        return (torch.linalg.pinv(kkt, hermitian=True) @ rhs)[:n].reshape(y.shape)


@dataclass(frozen=True)
class ConjugateGradient:
    """Matrix-free conjugate gradients on the Riemannian Hessian (module docstring).

    Args:
        rtol: stop at ||residual|| <= rtol ||Proj(v)||; None: eps**0.75 of the dtype
            (1.8e-12 in float64, 6.4e-6 in float32).
        max_iterations: cap on CG steps per solve; None: numel(y).

    If CG breaks down or stops short, `minimum_norm_solve` (two CG solves) gives the
    minimum-norm solution; a RuntimeWarning reports a solve that still misses rtol.
    """

    rtol: float | None = None
    max_iterations: int | None = None

    def __post_init__(self) -> None:
        if self.rtol is not None and not (
            isinstance(self.rtol, int | float) and not isinstance(self.rtol, bool) and self.rtol > 0
        ):
            raise ValueError(f"rtol must be a positive number or None, got {self.rtol!r}")
        if self.max_iterations is not None:
            check_int("max_iterations", self.max_iterations)

    def tangent_solve(
        self, geometry: ConstraintGeometry, f_y: Callable[[Tensor], Tensor], y: Tensor, v: Tensor
    ) -> Tensor:
        """w in T_y M with Hess_R f(y)[w] = Proj_y(v) (minimum norm), warning when the solve
        misses the tolerance."""
        rtol = self.rtol if self.rtol is not None else torch.finfo(y.dtype).eps ** 0.75
        max_iterations = self.max_iterations or y.numel()
        product = _hessian_vector_product(geometry, f_y, y)
        b = geometry.project(y, v)
        found = conjugate_gradient(product, b, rtol=rtol, max_iterations=max_iterations)
        if found.converged:
            return found.solution
        found = minimum_norm_solve(product, b, rtol=rtol, max_iterations=max_iterations)
        if not found.converged:
            warnings.warn(
                f"{self!r} stopped short: relative residual {found.relative_residual:.2e} > "
                f"rtol {rtol:.1e} "
                f"after {found.iterations} Hessian-vector products ({found.stopping_reason}); "
                "the implicit gradient is inaccurate",
                RuntimeWarning,
                stacklevel=2,
            )
        return found.solution


Backward: TypeAlias = Analytic | DenseKKT | ConjugateGradient
BACKWARDS = ("analytic", "kkt", "cg")
_BACKWARD_CLASSES: dict[str, type[Backward]] = {
    "analytic": Analytic,
    "kkt": DenseKKT,
    "cg": ConjugateGradient,
}


def as_backward(backward: str | Backward) -> Backward:
    """The backward object for a shorthand of `BACKWARDS` ("analytic" -> `Analytic()`, "kkt" ->
    `DenseKKT()`, "cg" -> `ConjugateGradient()`), or the given object unchanged. Raises
    ValueError for an unknown name and TypeError for anything else."""
    objects = "Analytic(), DenseKKT() or ConjugateGradient(...)"
    if isinstance(backward, str):
        return from_shorthand("backward", backward, _BACKWARD_CLASSES, objects)
    if not isinstance(backward, Analytic | DenseKKT | ConjugateGradient):
        raise TypeError(
            f"backward must be one of {BACKWARDS} or {objects}; got {type(backward).__name__}"
        )
    return backward


def _pack(xs: tuple[Tensor, ...] | list[Tensor], single: bool) -> Inputs:
    """The inputs in the form the user passed them: one tensor or a tuple."""
    return xs[0] if single else tuple(xs)


class _Argmin(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        node: DeclarativeNode,
        y0: Tensor | None,
        single: bool,
        results: list[SolverResult],
        *xs: Tensor,
    ) -> Tensor:
        result = as_solver_result(node.solver(node.objective, node.manifold, _pack(xs, single), y0))
        results.append(result)
        y = result.point.detach()
        ctx.node, ctx.single = node, single
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, v: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative was asked for
            raise RuntimeError(SECOND_ORDER_ERROR.format(what="declarative node (implicit)"))
        node: DeclarativeNode = ctx.node
        y, *xs = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        # the tangent solve needs no graph: torch.func differentiates detached inputs
        w = node.tangent_solve(_pack([x.detach() for x in xs], ctx.single), y, v.detach())
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) for x, need in zip(xs, needs, strict=True)]
            y_leaf = y.detach().requires_grad_(True)
            (egrad,) = torch.autograd.grad(
                node.objective(_pack(leaves, ctx.single), y_leaf), y_leaf, create_graph=True
            )
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            found = torch.autograd.grad(-(egrad * w).sum(), wanted, allow_unused=True)
        grads = iter(found)
        out: list[Tensor | None] = []
        for x, need in zip(xs, needs, strict=True):
            g = next(grads) if need else None
            out.append(torch.zeros_like(x) if need and g is None else g)
        return (None, None, None, None, *out)


@dataclass(frozen=True)
class DeclarativeNode:
    """y*(x) = argmin_{y in manifold} objective(x, y) as a differentiable function of x.

    Args:
        objective: f(x, y) -> scalar tensor, written with torch operations (it is differentiated
            twice, by torch.func). x is a tensor or a tuple of tensors, as passed to the node.
        manifold: a geoopt manifold (Stiefel, Sphere or Euclidean) describing where y lives.
        solver: a solver object (`TrustRegions(...)`, `RiemannianAdamSolver(...)`,
            `Procrustes()`), a shorthand in `SOLVERS`, or any callable
            (objective, manifold, x, y0) -> `SolverResult` | Tensor. Runs without gradient
            tracking.
        backward: `ConjugateGradient(rtol, max_iterations)` (default) or `DenseKKT()`, or their
            shorthands "cg" / "kkt"; see the module docstring.

    String shorthands are replaced by the objects at construction (`as_solver`, `as_backward`).
    Raises ValueError/TypeError for an unknown solver, backward or manifold.

    `node(x, y0=None)` returns y* with the implicit gradient attached; `node.solve(x, y0)`
    returns the solver's `SolverResult` with that differentiable y* as its `point`.
    """

    objective: Objective
    manifold: geoopt.Manifold
    solver: str | Solver
    backward: str | Backward = ConjugateGradient()

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", as_solver(self.solver))
        backward = as_backward(self.backward)
        if isinstance(backward, Analytic):
            raise ValueError(
                "the analytic backward is the nearest-ETF closed form (use nearest_etf); "
                "a DeclarativeNode takes 'cg' / ConjugateGradient(...) or 'kkt' / DenseKKT()"
            )
        object.__setattr__(self, "backward", backward)
        geometry_of(self.manifold)

    def __call__(self, x: Inputs, y0: Tensor | None = None) -> Tensor:
        return self.solve(x, y0).point

    def solve(self, x: Inputs, y0: Tensor | None = None) -> SolverResult:
        """The solver's result for inputs x (a tensor or a tuple of tensors) from start point
        y0, its `point` y* differentiable in x by the implicit function theorem."""
        single = isinstance(x, Tensor)
        xs = (x,) if single else tuple(x)
        results: list[SolverResult] = []
        y = _Argmin.apply(self, y0, single, results, *xs)
        return dataclasses.replace(results[0], point=y)

    def tangent_solve(self, x: Inputs, y: Tensor, v: Tensor) -> Tensor:
        """w in T_y M solving Hess_R f(x, .)(y)[w] = Proj_y(v) with the node's backward."""
        backward = self.backward
        assert isinstance(backward, DenseKKT | ConjugateGradient)

        def f_y(y_: Tensor) -> Tensor:
            return self.objective(x, y_)

        # dozens of Hessian-vector products (or one dense factorisation) at a point of y's
        # shape: one thread where that is small (nearest_etf._threads)
        with single_threaded(is_small(y)):
            return backward.tangent_solve(geometry_of(self.manifold), f_y, y, v)
