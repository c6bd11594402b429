"""The generic declarative node on objectives other than the nearest ETF, each checked against an
independent oracle: autograd through torch.linalg.eigh / torch.linalg.solve."""

import geoopt
import pytest
import torch

from nearest_etf import DeclarativeNode, TrustRegions, conjugate_gradient, geometry_of
from nearest_etf.polar_decomposition import polar

DT = torch.float64


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _sym(X: torch.Tensor) -> torch.Tensor:
    return X + X.T


# Sphere: y*(X) = argmin_{||y|| = 1} y^T (X + X^T) y, the bottom eigenvector.
def rayleigh(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y @ _sym(X) @ y


def bottom_eigenvector(
    objective, manifold, X: torch.Tensor, y0: torch.Tensor | None
) -> torch.Tensor:
    return torch.linalg.eigh(_sym(X)).eigenvectors[:, 0]


# Stiefel: Brockett cost argmin_{U^T U = I} -tr(U^T S U N), N = diag(K, ..., 1): top eigenvectors.
def brockett(X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    K = U.shape[1]
    N = torch.arange(K, 0, -1, dtype=U.dtype)
    return -((U.T @ _sym(X) @ U).diagonal() * N).sum()


def top_eigenvectors(objective, manifold, X: torch.Tensor, U0: torch.Tensor | None) -> torch.Tensor:
    return torch.linalg.eigh(_sym(X)).eigenvectors.flip(-1)[:, :3]


# Euclidean: ridge regression, y* = (A^T A + I)^{-1} A^T b.
def ridge(x: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    A, b = x
    return (A @ y - b).square().sum() + y.square().sum()


def ridge_solution(objective, manifold, x, y0):
    A, b = x
    return torch.linalg.solve(A.T @ A + torch.eye(A.shape[1], dtype=A.dtype), A.T @ b)


@pytest.mark.parametrize("backward", ["cg", "kkt"])
def test_sphere_node_matches_eigh_autograd(backward: str) -> None:
    X = torch.randn(6, 6, dtype=DT)
    g = torch.randn(6, dtype=DT)
    node = DeclarativeNode(rayleigh, geoopt.Sphere(), bottom_eigenvector, backward=backward)
    Xn = X.clone().requires_grad_(True)
    (node(Xn) * g).sum().backward()
    Xo = X.clone().requires_grad_(True)
    (torch.linalg.eigh(_sym(Xo)).eigenvectors[:, 0] * g).sum().backward()
    assert relative(Xn.grad, Xo.grad) <= 1e-8


@pytest.mark.parametrize("backward", ["cg", "kkt"])
def test_stiefel_node_matches_eigh_autograd(backward: str) -> None:
    X = torch.randn(7, 7, dtype=DT)
    G = torch.randn(7, 3, dtype=DT)
    node = DeclarativeNode(brockett, geoopt.Stiefel(), top_eigenvectors, backward=backward)
    Xn = X.clone().requires_grad_(True)
    (node(Xn) * G).sum().backward()
    Xo = X.clone().requires_grad_(True)
    (torch.linalg.eigh(_sym(Xo)).eigenvectors.flip(-1)[:, :3] * G).sum().backward()
    assert relative(Xn.grad, Xo.grad) <= 1e-8


@pytest.mark.parametrize("backward", ["cg", "kkt"])
def test_euclidean_node_with_tuple_input_matches_solve_autograd(backward: str) -> None:
    A, b, g = torch.randn(8, 4, dtype=DT), torch.randn(8, dtype=DT), torch.randn(4, dtype=DT)
    node = DeclarativeNode(ridge, geoopt.Euclidean(), ridge_solution, backward=backward)
    An, bn = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    (node((An, bn)) * g).sum().backward()
    Ao, bo = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    (ridge_solution(None, None, (Ao, bo), None) * g).sum().backward()
    assert relative(An.grad, Ao.grad) <= 1e-8
    assert relative(bn.grad, bo.grad) <= 1e-8


def test_node_gradcheck_with_iterative_solver() -> None:
    X = torch.randn(5, 5, dtype=DT, requires_grad=True)
    y0 = torch.linalg.eigh(_sym(X.detach())).eigenvectors[:, 0] + 0.05
    solver = TrustRegions(max_iterations=100, min_gradient_norm=1e-13)
    node = DeclarativeNode(rayleigh, geoopt.Sphere(), solver, backward="cg")
    y = node(X, y0 / y0.norm())
    torch.testing.assert_close(
        y.abs(), torch.linalg.eigh(_sym(X.detach())).eigenvectors[:, 0].abs()
    )
    assert torch.autograd.gradcheck(lambda x: node(x, y.detach()), (X,), atol=1e-6)


@pytest.mark.parametrize("backward", ["cg", "kkt"])
def test_batched_stiefel_point_matches_the_polar_derivative(backward: str) -> None:
    # y*(X) = argmin_{U_b^T U_b = I} -<X, U> = polar(X_b) for a batch X[2, 5, 3] (one point of
    # the product manifold); the oracle is the closed-form polar derivative.
    X = torch.randn(2, 5, 3, dtype=DT)
    G = torch.randn(2, 5, 3, dtype=DT)

    def by_polar(objective, manifold, x, y0):
        return polar(x)

    node = DeclarativeNode(
        lambda x, U: -(x * U).sum(), geoopt.Stiefel(), by_polar, backward=backward
    )
    Xn = X.clone().requires_grad_(True)
    (node(Xn) * G).sum().backward()
    Xo = X.clone().requires_grad_(True)
    (polar(Xo) * G).sum().backward()
    assert relative(Xn.grad, Xo.grad) <= 1e-8


def test_canonical_and_euclidean_stiefel_give_the_same_derivative() -> None:
    X = torch.randn(6, 6, dtype=DT)
    G = torch.randn(6, 3, dtype=DT)
    grads = []
    for manifold in (geoopt.Stiefel(canonical=True), geoopt.Stiefel(canonical=False)):
        Xn = X.clone().requires_grad_(True)
        (DeclarativeNode(brockett, manifold, top_eigenvectors)(Xn) * G).sum().backward()
        grads.append(Xn.grad)
    assert relative(grads[0], grads[1]) <= 1e-10


def test_conjugate_gradient_solves_spd_system() -> None:
    B = torch.randn(20, 20, dtype=DT)
    S = B @ B.T + 0.1 * torch.eye(20, dtype=DT)
    b = torch.randn(20, dtype=DT)
    found = conjugate_gradient(lambda v: S @ v, b, rtol=1e-12, max_iterations=200)
    assert found.converged and found.relative_residual <= 1e-12
    torch.testing.assert_close(found.solution, torch.linalg.solve(S, b))


def test_riemannian_hessian_matches_second_derivative_along_geodesic() -> None:
    # d^2/dt^2 f(R_y(t xi)) at t = 0 equals <xi, Hess_R f(y)[xi]> at a critical point.
    X = torch.randn(6, 6, dtype=DT)
    U = top_eigenvectors(None, None, X, None)
    geometry = geometry_of(geoopt.Stiefel())
    xi = geometry.project(U, torch.randn(6, 3, dtype=DT))

    def f(V: torch.Tensor) -> torch.Tensor:
        return brockett(X, V)

    egrad = torch.func.grad(f)(U)
    _, ehess = torch.func.jvp(torch.func.grad(f), (U,), (xi,))
    quadratic = (xi * geometry.riemannian_hessian(U, egrad, ehess, xi)).sum()
    manifold = geoopt.Stiefel(canonical=False)  # its retraction has velocity xi at t = 0
    t = 1e-4
    values = [float(f(manifold.retr(U, s * xi))) for s in (-t, 0.0, t)]
    second = (values[0] - 2 * values[1] + values[2]) / t**2
    assert abs(second - float(quadratic)) <= 1e-5 * abs(float(quadratic))


def test_node_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="unknown backward 'lu'"):
        DeclarativeNode(rayleigh, geoopt.Sphere(), bottom_eigenvector, backward="lu")
    with pytest.raises(TypeError, match="unsupported manifold PoincareBall"):
        DeclarativeNode(rayleigh, geoopt.PoincareBall(), bottom_eigenvector)
    node = DeclarativeNode(rayleigh, geoopt.Sphere(), TrustRegions())
    with pytest.raises(ValueError, match="initial point"):
        node(torch.randn(4, 4, dtype=DT))
