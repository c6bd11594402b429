"""Generic Riemannian solvers for `DeclarativeNode`: argmin_{y in manifold} objective(x, y).

Both follow the `Solver` protocol (objective, manifold, x, y0) -> y and work for any smooth
objective written in torch:
  - `TrustRegions`: pymanopt's Riemannian trust-region method in float64 NumPy, with the
    Euclidean gradient and Hessian-vector product supplied by torch autograd;
  - `RiemannianAdam`: geoopt's RiemannianAdam on a ManifoldParameter, run until the Riemannian
    gradient norm falls below a tolerance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import geoopt
import numpy as np
import pymanopt
import torch
from torch import Tensor

from nearest_etf.declarative.node import Inputs, Objective

__all__ = ["RiemannianAdam", "TrustRegions"]


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


class _IterativeSolver:
    """The `Solver` call shared by the iterative solvers: checks the start point, detaches the
    inputs, and hands over to `_run`."""

    def __call__(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor | None
    ) -> Tensor:
        if y0 is None:
            raise ValueError(f"{type(self).__name__} needs an initial point y0 on the manifold")
        x = x.detach() if isinstance(x, Tensor) else tuple(t.detach() for t in x)
        return self._run(objective, manifold, x, y0.detach())

    def _run(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor
    ) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TrustRegions(_IterativeSolver):
    """pymanopt's Riemannian trust-region solver (Absil, Baker, Gallivan 2007).

    `max_iterations=30` matches the nearest-ETF reference code; raise it (and lower
    `min_gradient_norm`) for a converged run. The problem is solved in float64 NumPy and the
    result returned in y0's dtype and device.
    """

    max_iterations: int = 30
    min_gradient_norm: float = 1e-6
    verbosity: int = 0

    def _run(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor
    ) -> Tensor:
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
        # torch.func transforms differentiate regardless of an enclosing no_grad
        result = optimizer.run(problem, initial_point=y0.double().cpu().numpy())
        return torch.as_tensor(result.point, dtype=y0.dtype, device=device)


@dataclass(frozen=True)
class RiemannianAdam(_IterativeSolver):
    """geoopt's RiemannianAdam (Becigneul & Ganea 2019) run to a gradient-norm tolerance.

    Steps until ||grad_R f(y)|| <= gtol, or warns (RuntimeWarning) after `max_iterations` with
    the gradient norm reached. Adam at a fixed step oscillates
    around a minimiser, so the learning rate is multiplied by `lr_factor` whenever the gradient
    norm has not improved for `patience` steps (torch's ReduceLROnPlateau).
    """

    lr: float = 3e-2
    lr_factor: float = 0.5
    patience: int = 20
    gtol: float = 1e-6
    max_iterations: int = 10000

    def __post_init__(self) -> None:
        if isinstance(self.max_iterations, bool) or not (
            isinstance(self.max_iterations, int) and self.max_iterations >= 1
        ):
            raise ValueError(f"max_iterations must be an int >= 1, got {self.max_iterations!r}")

    def _run(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor
    ) -> Tensor:
        y = geoopt.ManifoldParameter(manifold.projx(y0.clone()), manifold=manifold)
        optimizer = geoopt.optim.RiemannianAdam([y], lr=self.lr)
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=self.lr_factor, patience=self.patience
        )
        with torch.enable_grad():
            for _ in range(self.max_iterations):
                optimizer.zero_grad()
                objective(x, y).backward()
                grad_norm = float(manifold.egrad2rgrad(y.detach(), y.grad).norm())
                if grad_norm <= self.gtol:
                    break
                optimizer.step()
                schedule.step(grad_norm)
            else:
                warnings.warn(
                    f"RiemannianAdam stopped at max_iterations={self.max_iterations} with "
                    f"||grad|| = {grad_norm:.2e} > gtol = {self.gtol:g}",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return y.detach().clone()
