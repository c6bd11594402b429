"""What the declarative node needs to know about a geoopt manifold, viewed as the constraint set
{y : h(y) = 0} embedded in Euclidean space with the embedded metric.

For an equality-constrained set, the Riemannian Hessian at a critical point is

    Hess_R f(y)[xi] = Proj_y( D^2 f(y)[xi] - xi * Lambda(y, grad f(y)) )

where `xi * Lambda` is the curvature (Weingarten) term built from the Lagrange multipliers:
  - Stiefel St(d, K), h(U) = U^T U - I:        Lambda = sym(U^T grad f),  xi * Lambda = xi @ Lambda
  - Sphere (unit rows), h(y) = ||y_i||^2 - 1:  Lambda_i = <y_i, grad_i f>, xi * Lambda scales rows
  - Euclidean: no constraints, the term is 0.
The implicit derivative of an argmin does not depend on the metric, so the canonical and the
embedded Stiefel metrics share this description.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import geoopt
import torch
from torch import Tensor

__all__ = ["ConstraintGeometry", "geometry_of"]


def _sym(X: Tensor) -> Tensor:
    return (X + X.mT) / 2


def _stiefel_project(U: Tensor, Z: Tensor) -> Tensor:
    return Z - U @ _sym(U.mT @ Z)


def _stiefel_curvature(U: Tensor, egrad: Tensor, xi: Tensor) -> Tensor:
    return xi @ _sym(U.mT @ egrad)


def _stiefel_constraints(U: Tensor) -> Tensor:
    K = U.shape[-1]
    rows, cols = torch.triu_indices(K, K, device=U.device)
    # the upper triangle of U^T U - I of every point of a batch [..., d, K], flattened
    return (U.mT @ U - torch.eye(K, dtype=U.dtype, device=U.device))[..., rows, cols].reshape(-1)


def _sphere_project(y: Tensor, z: Tensor) -> Tensor:
    return z - (y * z).sum(-1, keepdim=True) * y


def _sphere_curvature(y: Tensor, egrad: Tensor, xi: Tensor) -> Tensor:
    return xi * (y * egrad).sum(-1, keepdim=True)


def _sphere_constraints(y: Tensor) -> Tensor:
    return (y.square().sum(-1) - 1).reshape(-1)


def _identity_project(y: Tensor, z: Tensor) -> Tensor:
    return z


def _zero_curvature(y: Tensor, egrad: Tensor, xi: Tensor) -> Tensor:
    return torch.zeros_like(xi)


def _no_constraints(y: Tensor) -> Tensor:
    return y.new_zeros(0)


@dataclass(frozen=True)
class ConstraintGeometry:
    """A manifold as a constraint set: tangent projection, curvature term, constraint map h."""

    name: str
    project: Callable[[Tensor, Tensor], Tensor]
    curvature: Callable[[Tensor, Tensor, Tensor], Tensor]
    constraints: Callable[[Tensor], Tensor]

    def riemannian_hessian(self, y: Tensor, egrad: Tensor, ehess_xi: Tensor, xi: Tensor) -> Tensor:
        """Hess_R f(y)[xi] = Proj_y(D^2 f(y)[xi] - xi * Lambda(y, grad f(y)))."""
        return self.project(y, ehess_xi - self.curvature(y, egrad, xi))


STIEFEL = ConstraintGeometry("stiefel", _stiefel_project, _stiefel_curvature, _stiefel_constraints)
SPHERE = ConstraintGeometry("sphere", _sphere_project, _sphere_curvature, _sphere_constraints)
EUCLIDEAN = ConstraintGeometry("euclidean", _identity_project, _zero_curvature, _no_constraints)


def geometry_of(manifold: geoopt.Manifold) -> ConstraintGeometry:
    """The constraint description of a geoopt manifold (Stiefel of either metric, Sphere with
    unit-norm rows, Euclidean)."""
    if isinstance(manifold, geoopt.Stiefel):
        return STIEFEL
    if isinstance(manifold, geoopt.Sphere):
        if getattr(manifold, "projector", None) is not None:
            raise ValueError("geoopt.Sphere with a subspace projector is not supported")
        return SPHERE
    if isinstance(manifold, geoopt.Euclidean):
        return EUCLIDEAN
    raise TypeError(
        f"unsupported manifold {type(manifold).__name__}; supported: geoopt.Stiefel "
        "(Euclidean or canonical metric), geoopt.Sphere, geoopt.Euclidean"
    )
