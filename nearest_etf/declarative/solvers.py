"""Solvers for argmin_{y in manifold} objective(x, y), as objects that carry their settings.

A solver is called as ``solver(objective, manifold, x, y0)`` and returns a `SolverResult`: the
point, whether it met its tolerance, the iterations, the Riemannian gradient norm and the cost
at the point, and why it stopped (in the style of pymanopt's ``OptimizerResult``). An iterative
solver that stops on its iteration cap above its tolerance also warns (RuntimeWarning); no
result is silent about stopping short.

  - `Procrustes`: the closed form polar(A), A = -grad f(0), for objectives that equal
    const - <A, U> on St(d, K) (the nearest-ETF problem, docs/math.md §2a);
  - `TrustRegions`: pymanopt's Riemannian trust-region method in float64 NumPy, with the
    Euclidean gradient and Hessian-vector product supplied by torch autograd;
  - `RiemannianAdamSolver`: geoopt's RiemannianAdam optimiser on a ManifoldParameter, run until
    the Riemannian gradient norm falls below a tolerance.

The string shorthands of `SOLVERS` name these with their default settings (`as_solver`). Any
callable with the same signature is a solver too; one that returns a bare tensor is reported
as a result with ``converged=None`` (unknown).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import geoopt
import numpy as np
import pymanopt
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from nearest_etf._threads import is_small, single_threaded
from nearest_etf._validation import check_int, check_nonnegative, from_shorthand
from nearest_etf.declarative.geometry import geometry_of
from nearest_etf.polar_decomposition import polar

__all__ = [
    "SOLVERS",
    "Inputs",
    "Objective",
    "Procrustes",
    "RiemannianAdamSolver",
    "Solver",
    "SolverResult",
    "TrustRegions",
    "as_solver",
    "as_solver_result",
]

Inputs: TypeAlias = Tensor | tuple[Tensor, ...]
Objective: TypeAlias = Callable[[Inputs, Tensor], Tensor]


@dataclass(frozen=True)
class SolverResult:
    """What a solver reached.

    Attributes:
        point: the solution y, on the manifold, shaped like the start point.
        converged: True when the solver met its tolerance, False when it stopped short, None
            when unknown (a user callable that returned a bare tensor).
        iterations: iterations taken (0 for a closed form), None when unknown.
        gradient_norm: ||grad_R f(point)||, None when unknown.
        cost: f(point), None when unknown.
        stopping_reason: why the solver stopped, in words (pymanopt's stopping criterion for
            `TrustRegions`).
    """

    point: Tensor
    converged: bool | None
    iterations: int | None
    gradient_norm: float | None
    cost: float | None
    stopping_reason: str


class Solver(Protocol):
    """Finds argmin_{y in manifold} objective(x, y), starting from y0 when it uses one, and
    returns a `SolverResult` (or, for a user callable, a bare tensor: see `as_solver_result`)."""

    def __call__(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor | None
    ) -> SolverResult | Tensor: ...


def as_solver_result(found: SolverResult | Tensor) -> SolverResult:
    """A solver's return value as a `SolverResult`: a bare tensor (a user's closed form) becomes
    a result with converged, iterations, gradient_norm and cost unknown (None)."""
    if isinstance(found, SolverResult):
        return found
    if isinstance(found, Tensor):
        return SolverResult(found, None, None, None, None, "the solver returned a bare point")
    raise TypeError(f"a solver must return a SolverResult or a Tensor, got {type(found).__name__}")


def _detached(x: Inputs) -> Inputs:
    return x.detach() if isinstance(x, Tensor) else tuple(t.detach() for t in x)


def _gradient_and_cost(
    objective: Objective, manifold: geoopt.Manifold, x: Inputs, y: Tensor
) -> tuple[float, float]:
    """(||grad_R f(y)||, f(y)) with the embedded metric (docs/math.md §2c)."""
    with torch.enable_grad():
        leaf = y.detach().requires_grad_(True)
        cost = objective(x, leaf)
        (egrad,) = torch.autograd.grad(cost, leaf)
    rgrad = geometry_of(manifold).project(leaf.detach(), egrad)
    return float(torch.linalg.vector_norm(rgrad)), float(cost.detach())


def _warn_stopped_short(result: SolverResult, solver: object, tolerance: float) -> None:
    warnings.warn(
        f"{solver!r} stopped above its tolerance: ||grad|| = {result.gradient_norm:.2e} > "
        f"{tolerance:g} after {result.iterations} iterations ({result.stopping_reason})",
        RuntimeWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class Procrustes:
    """The orthogonal Procrustes closed form on St(d, K): U* = polar(A) with A = -grad f(0).

    For an objective that equals const - <A, U> on St(d, K) (any sum of a linear term and terms
    ||U B||^2, constant there because U^T U = I), argmin f = argmax tr(U^T A) = polar(A)
    (docs/math.md §2a); the nearest-ETF objective is one, with A = (2/sqrt(K-1)) Hn C + delta prox.
    A rank-deficient A has many maximisers; `polar` completes the free
    directions deterministically. The result is checked: `converged` is
    ||grad_R f(U*)|| <= sqrt(eps) max(1, ||A||), and a RuntimeWarning says when it is not (the
    objective is not of this form). Points [..., d, K] with d >= K; y0 gives the shape (its
    values are not used). Raises TypeError off geoopt.Stiefel, ValueError without y0.
    """

    def __call__(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor | None
    ) -> SolverResult:
        if not isinstance(manifold, geoopt.Stiefel):
            raise TypeError(f"Procrustes solves on geoopt.Stiefel, got {type(manifold).__name__}")
        x = _detached(x)
        if y0 is None:
            raise ValueError("Procrustes needs y0 (any point of the right shape) for the shape")
        origin = torch.zeros_like(y0)
        A = -torch.func.grad(lambda y: objective(x, y))(origin)
        U = polar(A)
        gradient_norm, cost = _gradient_and_cost(objective, manifold, x, U)
        tolerance = math.sqrt(torch.finfo(A.dtype).eps) * max(1.0, float(A.norm()))
        converged = gradient_norm <= tolerance
        result = SolverResult(
            U,
            converged,
            0,
            gradient_norm,
            cost,
            "closed form" if converged else "closed form; the objective is not Procrustes",
        )
        if not converged:
            _warn_stopped_short(result, self, tolerance)
        return result


class _IterativeSolver:
    """The `Solver` call shared by the iterative solvers: checks the start point, detaches the
    inputs, hands over to `_run` and warns when the result stopped short of the tolerance."""

    min_gradient_norm: float

    def __call__(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor | None
    ) -> SolverResult:
        if y0 is None:
            raise ValueError(f"{type(self).__name__} needs an initial point y0 on the manifold")
        # every iteration is small linear algebra at a point of y0's shape (geoopt's QR
        # retraction, autograd of the objective): one thread where it is small (_threads)
        with single_threaded(is_small(y0)):
            result = self._run(objective, manifold, _detached(x), y0.detach())
        if not result.converged:
            _warn_stopped_short(result, self, self.min_gradient_norm)
        return result

    def _run(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor
    ) -> SolverResult:
        raise NotImplementedError


def _pymanopt_manifold(
    manifold: geoopt.Manifold, shape: torch.Size
) -> pymanopt.manifolds.manifold.Manifold:
    """The pymanopt manifold matching a geoopt one at points of the given shape."""
    if isinstance(manifold, geoopt.Stiefel) and len(shape) == 2:
        return pymanopt.manifolds.Stiefel(*shape)
    if isinstance(manifold, geoopt.Sphere) and len(shape) == 1:
        return pymanopt.manifolds.Sphere(*shape)
    if isinstance(manifold, geoopt.Euclidean):
        return pymanopt.manifolds.Euclidean(*shape)
    raise TypeError(
        f"TrustRegions supports geoopt.Stiefel with [d, K] points, geoopt.Sphere with vectors and "
        f"geoopt.Euclidean; got {type(manifold).__name__} with points of shape {tuple(shape)}"
    )


@dataclass(frozen=True)
class TrustRegions(_IterativeSolver):
    """pymanopt's Riemannian trust-region solver (Absil, Baker, Gallivan 2007).

    Stops when ||grad_R f|| < `min_gradient_norm` (converged) or after `max_iterations`
    (a RuntimeWarning with the gradient norm reached). `max_iterations=30` matches the
    nearest-ETF reference code. The problem is solved in float64 NumPy and the point returned in
    y0's dtype and device; the result's `stopping_reason` is pymanopt's stopping criterion.
    """

    max_iterations: int = 30
    min_gradient_norm: float = 1e-6
    verbosity: int = 0

    def __post_init__(self) -> None:
        check_int("max_iterations", self.max_iterations)
        check_nonnegative("min_gradient_norm", self.min_gradient_norm)

    def _run(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor
    ) -> SolverResult:
        x64 = x.double() if isinstance(x, Tensor) else tuple(t.double() for t in x)
        device = y0.device

        def f(y: Tensor) -> Tensor:
            return objective(x64, y)

        egrad_fn = torch.func.grad(f)

        def as_torch(a: np.ndarray) -> Tensor:
            return torch.as_tensor(a, dtype=torch.float64, device=device)

        pm = _pymanopt_manifold(manifold, y0.shape)

        @pymanopt.function.numpy(pm)
        def cost(y: np.ndarray) -> float:
            return float(f(as_torch(y)))

        @pymanopt.function.numpy(pm)
        def euclidean_gradient(y: np.ndarray) -> np.ndarray:
            return egrad_fn(as_torch(y)).cpu().numpy()

        @pymanopt.function.numpy(pm)
        def euclidean_hessian(y: np.ndarray, xi: np.ndarray) -> np.ndarray:
            _, hv = torch.func.jvp(egrad_fn, (as_torch(y),), (as_torch(xi),))
            return hv.cpu().numpy()

        problem = pymanopt.Problem(
            pm, cost, euclidean_gradient=euclidean_gradient, euclidean_hessian=euclidean_hessian
        )
        optimizer = pymanopt.optimizers.TrustRegions(
            max_iterations=self.max_iterations,
            min_gradient_norm=self.min_gradient_norm,
            verbosity=self.verbosity,
        )
        # torch.func transforms differentiate regardless of an enclosing no_grad. pymanopt's
        # NumPy work runs on NumPy's BLAS threads, which on small problems only contend with
        # torch's (2-10x slower on 2 cores): one BLAS thread where the problem is small.
        with threadpool_limits(1 if is_small(y0) else None, user_api="blas"):
            found = optimizer.run(problem, initial_point=y0.double().cpu().numpy())
        gradient_norm = float(found.gradient_norm)
        return SolverResult(
            torch.as_tensor(found.point, dtype=y0.dtype, device=device),
            gradient_norm < self.min_gradient_norm,
            int(found.iterations),
            gradient_norm,
            float(found.cost),
            str(found.stopping_criterion),
        )


@dataclass(frozen=True)
class RiemannianAdamSolver(_IterativeSolver):
    """geoopt's RiemannianAdam optimiser (Becigneul & Ganea, ICLR 2019) run to a gradient
    tolerance.

    Steps until ||grad_R f(y)|| <= `min_gradient_norm` (converged), or stops after
    `max_iterations` steps with a RuntimeWarning giving the gradient norm reached. Adam at a
    fixed step oscillates around a minimiser, so the learning rate is multiplied by `lr_factor`
    after every step that raised the cost (by more than rounding, 100 eps |f|). The second-moment
    decay `betas[1]` = 0.99 (Adam's default is 0.999) lets the step size follow the shrinking
    gradient within a few hundred steps, which problems with weakly curved directions (the
    nearest-ETF prox term, curvature delta) need.
    """

    lr: float = 3e-2
    lr_factor: float = 0.5
    betas: tuple[float, float] = (0.9, 0.99)
    min_gradient_norm: float = 1e-6
    max_iterations: int = 10000

    def __post_init__(self) -> None:
        check_int("max_iterations", self.max_iterations)
        check_nonnegative("min_gradient_norm", self.min_gradient_norm)
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not (isinstance(self.lr_factor, int | float) and 0 < self.lr_factor <= 1):
            raise ValueError(f"lr_factor must be in (0, 1], got {self.lr_factor!r}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    def _run(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor
    ) -> SolverResult:
        y = geoopt.ManifoldParameter(manifold.projx(y0.clone()), manifold=manifold)
        optimizer = geoopt.optim.RiemannianAdam([y], lr=self.lr, betas=self.betas)
        rounding = 100 * torch.finfo(y0.dtype).eps
        previous = math.inf
        steps = 0
        with torch.enable_grad():
            while True:
                optimizer.zero_grad()
                cost_tensor = objective(x, y)
                cost_tensor.backward()
                cost = float(cost_tensor.detach())
                gradient_norm = float(manifold.egrad2rgrad(y.detach(), y.grad).norm())
                if gradient_norm <= self.min_gradient_norm or steps == self.max_iterations:
                    break
                if cost > previous + rounding * abs(previous):
                    for group in optimizer.param_groups:
                        group["lr"] *= self.lr_factor
                previous = cost
                optimizer.step()
                steps += 1
        converged = gradient_norm <= self.min_gradient_norm
        reason = (
            f"||grad|| <= min_gradient_norm after {steps} steps"
            if converged
            else f"max_iterations={self.max_iterations} reached"
        )
        return SolverResult(y.detach().clone(), converged, steps, gradient_norm, cost, reason)


SOLVERS = ("procrustes", "trust-regions", "riemannian-adam")
_SOLVER_CLASSES: dict[str, Callable[[], Solver]] = {
    "procrustes": Procrustes,
    "trust-regions": TrustRegions,
    "riemannian-adam": RiemannianAdamSolver,
}


def as_solver(solver: str | Solver) -> Solver:
    """The solver object for a shorthand of `SOLVERS` ("procrustes" -> `Procrustes()`,
    "trust-regions" -> `TrustRegions()`, "riemannian-adam" -> `RiemannianAdamSolver()`), or the
    given solver object / callable unchanged. Raises ValueError for an unknown name and
    TypeError for anything else."""
    if isinstance(solver, str):
        return from_shorthand("solver", solver, _SOLVER_CLASSES, "a solver object")
    if not callable(solver):
        raise TypeError(
            f"solver must be one of {SOLVERS} or a solver object, got {type(solver).__name__}"
        )
    return solver


_warned_deprecated_alias = False


def deprecated_alias(stacklevel: int = 2) -> type[RiemannianAdamSolver]:
    """`RiemannianAdamSolver`, for the deprecated name `RiemannianAdam` (it reused geoopt's
    optimiser name for another API); warns DeprecationWarning on the first use in a process."""
    global _warned_deprecated_alias
    if not _warned_deprecated_alias:
        _warned_deprecated_alias = True
        warnings.warn(
            "RiemannianAdam is deprecated and will be removed in the next release; it is "
            "RiemannianAdamSolver (geoopt's optimiser of the same name has another API)",
            DeprecationWarning,
            stacklevel=stacklevel + 1,
        )
    return RiemannianAdamSolver


def __getattr__(name: str) -> object:
    if name == "RiemannianAdam":
        return deprecated_alias()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
