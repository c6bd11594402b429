"""A deep declarative node on a manifold: y*(x) = argmin_{y in M} f(x, y), differentiated
implicitly (Gould et al., "Deep Declarative Networks", TPAMI 2021).

Forward: any solver. Backward (docs/math.md §2c), for upstream v = dL/dy at the minimiser y*:

    solve  Hess_R f(y*)[w] = Proj_{y*}(v)   in the tangent space T_{y*}M,
    dL/dx = - d/dx < grad_y f(x, y*), w >    (w held fixed).

Two ways to solve for w:
  - "cg":  matrix-free conjugate gradients; Hessian-vector products D^2_yy f[xi] by
           forward-over-reverse autograd (torch.func.jvp of torch.func.grad), then the
           Riemannian Hessian of `nearest_etf.declarative.geometry`. Memory O(size of y).
  - "kkt": the dense KKT system of the equality-constrained problem h(y) = 0,
               [ H_L  A^T ] [ w  ]   [ v ]
               [ A    0   ] [ nu ] = [ 0 ],   H_L = D^2_yy (f - lambda . h),  A = Dh(y*),
           with lambda the least-squares multipliers of grad_y f = A^T lambda. Time O(n^3) for
           n = numel(y): the small-size oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import geoopt
import torch
from torch import Tensor

from nearest_etf._validation import check_choice
from nearest_etf.declarative.geometry import ConstraintGeometry, geometry_of

__all__ = ["BACKWARD_MODES", "DeclarativeNode", "Inputs", "Objective", "Solver"]

Inputs: TypeAlias = Tensor | tuple[Tensor, ...]
Objective: TypeAlias = Callable[[Inputs, Tensor], Tensor]
BACKWARD_MODES = ("kkt", "cg")


class Solver(Protocol):
    """Finds argmin_{y in manifold} objective(x, y), starting from y0 when it uses one."""

    def __call__(
        self, objective: Objective, manifold: geoopt.Manifold, x: Inputs, y0: Tensor | None
    ) -> Tensor: ...


def conjugate_gradient(
    operator: Callable[[Tensor], Tensor], b: Tensor, *, rtol: float, max_iter: int
) -> Tensor:
    """Solve operator(w) = b for a symmetric positive (semi)definite operator by conjugate
    gradients from w = 0, stopping when ||r|| <= rtol ||b|| or after max_iter steps. Runs on the
    device of b; for a consistent semidefinite system it returns the solution in range(operator)."""
    w = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = torch.vdot(r.flatten(), r.flatten())
    stop = rtol**2 * rr
    for _ in range(max_iter):
        if rr <= stop:
            break
        Ap = operator(p)
        alpha = rr / torch.vdot(p.flatten(), Ap.flatten())
        w = w + alpha * p
        r = r - alpha * Ap
        rr_next = torch.vdot(r.flatten(), r.flatten())
        p = r + (rr_next / rr) * p
        rr = rr_next
    return w


def _kkt_tangent_solve(
    geometry: ConstraintGeometry, f_y: Callable[[Tensor], Tensor], y: Tensor, v: Tensor
) -> Tensor:
    """w in T_y M with Hess_R f(y)[w] = Proj_y(v), via the dense bordered KKT system."""
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
    # minimiser is not isolated (e.g. the free direction of a feasibility solve), and an LU solve
    # there can return a huge vector whose residual still looks small.
    return (torch.linalg.pinv(kkt, hermitian=True) @ rhs)[:n].reshape(y.shape)


def _cg_tangent_solve(
    geometry: ConstraintGeometry,
    f_y: Callable[[Tensor], Tensor],
    y: Tensor,
    v: Tensor,
    rtol: float,
    max_iter: int | None,
) -> Tensor:
    """w in T_y M with Hess_R f(y)[w] = Proj_y(v), by matrix-free conjugate gradients."""
    egrad_fn = torch.func.grad(f_y)
    egrad = egrad_fn(y)

    def hessian_vector(xi: Tensor) -> Tensor:
        _, ehess_xi = torch.func.jvp(egrad_fn, (y,), (xi,))
        return geometry.riemannian_hessian(y, egrad, ehess_xi, xi)

    b = geometry.project(y, v)
    return conjugate_gradient(hessian_vector, b, rtol=rtol, max_iter=max_iter or y.numel())


def _pack(xs: tuple[Tensor, ...] | list[Tensor], single: bool) -> Inputs:
    """The inputs in the form the user passed them: one tensor or a tuple."""
    return xs[0] if single else tuple(xs)


class _Argmin(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, node: DeclarativeNode, y0: Tensor | None, single: bool, *xs: Tensor
    ) -> Tensor:
        y = node.solver(node.objective, node.manifold, _pack(xs, single), y0).detach()
        ctx.node, ctx.single = node, single
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, v: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        node: DeclarativeNode = ctx.node
        y, *xs = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            w = node.tangent_solve(_pack(xs, ctx.single), y, v).detach()
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
        return (None, None, None, *out)


@dataclass(frozen=True)
class DeclarativeNode:
    """y*(x) = argmin_{y in manifold} objective(x, y) as a differentiable function of x.

    Args:
        objective: f(x, y) -> scalar tensor, written with torch operations (it is differentiated
            twice, by torch.func). x is a tensor or a tuple of tensors, as passed to the node.
        manifold: a geoopt manifold (Stiefel, Sphere or Euclidean) describing where y lives.
        solver: callable (objective, manifold, x, y0) -> y*, e.g. `nearest_etf.TrustRegions()`,
            `nearest_etf.RiemannianAdam()`, or a closed form. Runs without gradient tracking.
        backward: "cg" (matrix-free) or "kkt" (dense); see the module docstring.
        cg_rtol: CG stops at ||residual|| <= cg_rtol ||Proj(v)||; default eps**0.75 of the dtype.
        cg_max_iter: CG step cap; default numel(y).

    Calling `node(x, y0=None)` returns y* with the implicit gradient attached.
    """

    objective: Objective
    manifold: geoopt.Manifold
    solver: Solver
    backward: str = "cg"
    cg_rtol: float | None = None
    cg_max_iter: int | None = None

    def __post_init__(self) -> None:
        check_choice("backward", self.backward, BACKWARD_MODES)
        geometry_of(self.manifold)

    def __call__(self, x: Inputs, y0: Tensor | None = None) -> Tensor:
        single = isinstance(x, Tensor)
        xs = (x,) if single else tuple(x)
        return _Argmin.apply(self, y0, single, *xs)

    def tangent_solve(self, x: Inputs, y: Tensor, v: Tensor) -> Tensor:
        """w in T_y M solving Hess_R f(x, .)(y)[w] = Proj_y(v) with the node's backward mode."""
        geometry = geometry_of(self.manifold)

        def f_y(y_: Tensor) -> Tensor:
            return self.objective(x, y_)

        if self.backward == "kkt":
            return _kkt_tangent_solve(geometry, f_y, y, v)
        rtol = self.cg_rtol if self.cg_rtol is not None else torch.finfo(y.dtype).eps ** 0.75
        return _cg_tangent_solve(geometry, f_y, y, v, rtol, self.cg_max_iter)
