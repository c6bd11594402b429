import math
import sys

import geoopt
import pytest
import torch

from nearest_etf import polar, polar_vjp, random_stiefel, simplex_etf
from nearest_etf.polar_decomposition import (
    _gram_compute_dtypes,
    polar_factors,
    polar_gram,
    polar_svd,
)

DT = torch.float64
# the module itself (the package attribute `nearest_etf.polar` is the function)
POLAR_MODULE = sys.modules["nearest_etf.polar_decomposition"]


@pytest.fixture
def gram_for_small_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route even tiny problems through the Gram route first (by default K < 24 takes the SVD)."""
    monkeypatch.setattr(POLAR_MODULE, "GRAM_MIN_K", 2)
    monkeypatch.setattr(POLAR_MODULE, "SAME_DTYPE_GRAM_MIN_K", 2)


@pytest.fixture(params=["default", "gram"])
def route(request: pytest.FixtureRequest) -> None:
    """Each generic test runs with the default routing and with the Gram route tried first."""
    if request.param == "gram":
        request.getfixturevalue("gram_for_small_k")


def test_polar_maximises_trace_and_matches_svd(route: None) -> None:
    A = torch.randn(7, 4, dtype=DT)
    Q = polar(A)
    L, _, Vh = torch.linalg.svd(A, full_matrices=False)
    torch.testing.assert_close(Q, L @ Vh)
    torch.testing.assert_close(Q.T @ A, (Q.T @ A).T)  # Q^T A = P is symmetric
    for _ in range(20):  # no random orthonormal frame does better on tr(Q^T A)
        R = random_stiefel(7, 4, dtype=DT)
        assert torch.trace(R.T @ A) <= torch.trace(Q.T @ A) + 1e-12


def test_polar_gradcheck_generic(route: None) -> None:
    A = torch.randn(6, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(polar, (A,))


def test_polar_gradcheck_batched(route: None) -> None:
    A = torch.randn(2, 3, 6, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(polar, (A,))


def test_polar_gradient_finite_at_repeated_singular_values(route: None) -> None:
    # A = R M_K + I-part: all nonzero singular values equal, where autograd through the SVD is NaN.
    R = random_stiefel(6, 4, dtype=DT)
    A = (R @ (simplex_etf(4, dtype=DT) + 0.5 * torch.eye(4, dtype=DT))).requires_grad_(True)
    naive = A.detach().clone().requires_grad_(True)
    L, _, Vh = torch.linalg.svd(naive, full_matrices=False)
    (L @ Vh).sum().backward()
    assert not torch.isfinite(naive.grad).all()
    assert torch.autograd.gradcheck(polar, (A,))


def test_rank_deficient_completion_is_deterministic_and_orthonormal() -> None:
    A = torch.randn(8, 3, dtype=DT) @ torch.randn(3, 5, dtype=DT)  # rank 3 < K = 5
    Q1, _, s = polar_svd(A)
    Q2, _, _ = polar_svd(A.clone())
    assert torch.equal(Q1, Q2)
    torch.testing.assert_close(Q1.T @ Q1, torch.eye(5, dtype=DT))
    torch.testing.assert_close(torch.trace(Q1.T @ A), s.sum())  # still a maximiser


def test_polar_rejects_wide_matrix() -> None:
    with pytest.raises(ValueError, match="d >= K"):
        polar(torch.randn(3, 5))


# --- the Gram route, its guards and the SVD fallback ---------------------------------------


def _with_spectrum(d: int, K: int, s: torch.Tensor, dtype: torch.dtype = DT) -> torch.Tensor:
    """A = L diag(s) V^T with Haar L in St(d, K), V in O(K) (float64, then cast)."""
    L = random_stiefel(d, K, dtype=torch.float64)
    V = random_stiefel(K, K, dtype=torch.float64)
    return ((L * s.double()) @ V.T).to(dtype)


def _kappa(d: int, K: int, kappa: float, dtype: torch.dtype = DT) -> torch.Tensor:
    return _with_spectrum(d, K, torch.logspace(0, -math.log10(kappa), K), dtype)


def _orthonormality(Q: torch.Tensor) -> float:
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    return float((Q.double().mT @ Q.double() - eye).abs().amax())


def _svd_polar(A: torch.Tensor) -> torch.Tensor:
    return polar_svd(A)[0]


def _sqrt_gram(A: torch.Tensor) -> torch.Tensor:
    """P = (A^T A)^{1/2} = V diag(s) V^T from the SVD of A."""
    _, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return (Vh.mT * s) @ Vh


@pytest.mark.parametrize("kappa", [3.0, 10.0])  # unpolished, polished
def test_gram_route_matches_svd_in_float64(kappa: float) -> None:
    A = _kappa(40, 12, kappa)
    (Q, V, s, W), ok = polar_gram(A, torch.float64)
    assert bool(ok)
    torch.testing.assert_close(Q, _svd_polar(A), rtol=0, atol=1e-13)
    torch.testing.assert_close(s, torch.linalg.svdvals(A).flip(-1), rtol=1e-13, atol=0)
    torch.testing.assert_close((V * s) @ V.T, _sqrt_gram(A), rtol=0, atol=1e-13)
    torch.testing.assert_close(W, torch.linalg.inv((V * s) @ V.T), rtol=0, atol=1e-11)
    assert _orthonormality(Q) < 1e-14


@pytest.mark.parametrize("kappa", [3.0, 10.0])
def test_float32_gram_route_is_as_accurate_as_the_float32_svd(kappa: float) -> None:
    A = _kappa(600, 300, kappa, torch.float32)
    (Q, *_), ok = polar_gram(A, torch.float32)
    assert bool(ok)
    exact = _svd_polar(A.double())
    svd32 = _svd_polar(A)
    assert _orthonormality(Q) <= 3 * _orthonormality(svd32)
    assert (Q.double() - exact).abs().amax() <= 3 * (svd32.double() - exact).abs().amax()


def test_routes_by_size_and_dtype() -> None:
    assert _gram_compute_dtypes(torch.zeros(300, 256)) == (torch.float32, torch.float64)
    assert _gram_compute_dtypes(torch.zeros(300, 255)) == (torch.float64,)
    assert _gram_compute_dtypes(torch.zeros(300, 24)) == (torch.float64,)
    assert _gram_compute_dtypes(torch.zeros(300, 23)) == ()
    assert _gram_compute_dtypes(torch.zeros(300, 256, dtype=DT)) == (torch.float64,)
    assert _gram_compute_dtypes(torch.zeros(300, 255, dtype=DT)) == ()


def test_conditioning_guard_limits() -> None:
    # eps_c kappa^2 <= 256 eps_out: kappa <= 16 in one dtype, ~3.7e5 for float32 in float64
    assert bool(polar_gram(_kappa(40, 12, 15.5), torch.float64)[1])
    assert not bool(polar_gram(_kappa(40, 12, 16.5), torch.float64)[1])
    A32 = _kappa(40, 12, 1e5, torch.float32)
    assert bool(polar_gram(A32, torch.float64)[1])
    assert not bool(polar_gram(A32, torch.float32)[1])


def test_float32_moderate_kappa_falls_back_to_float64_gram() -> None:
    A = _kappa(600, 300, 100.0, torch.float32)
    assert not bool(polar_gram(A, torch.float32)[1])
    Q = polar(A)
    exact = _svd_polar(A.double())
    assert _orthonormality(Q) < 1e-6
    assert (Q.double() - exact).abs().amax() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_rank_deficient_input_takes_the_svd_route(
    dtype: torch.dtype, gram_for_small_k: None
) -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    A = _with_spectrum(9, 5, s, dtype)
    assert not bool(polar_gram(A, torch.float64)[1])
    Q = polar(A)
    assert torch.equal(Q, _svd_polar(A))  # the deterministic completion of polar_svd
    assert _orthonormality(Q) < 10 * torch.finfo(dtype).eps


def test_ill_conditioned_float64_takes_the_svd_route(gram_for_small_k: None) -> None:
    A = _kappa(30, 8, 1e6)
    assert not bool(polar_gram(A, torch.float64)[1])
    Q, V, s, W = polar_factors(A)
    assert torch.equal(Q, _svd_polar(A))
    torch.testing.assert_close(W, torch.linalg.inv((V * s) @ V.T))
    assert _orthonormality(Q) < 1e-14


def test_batch_mixes_routes_per_problem(gram_for_small_k: None) -> None:
    good = _kappa(9, 5, 3.0)
    deficient = _with_spectrum(9, 5, torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0]))
    moderate = _kappa(9, 5, 1e4)
    A = torch.stack([good, deficient, moderate])
    ok = polar_gram(A, torch.float64)[1]
    assert ok.tolist() == [True, False, False]
    Q = polar(A)
    torch.testing.assert_close(Q[0], _svd_polar(good), rtol=0, atol=1e-14)
    for i in (1, 2):  # the SVD route (the batched SVD may round differently)
        torch.testing.assert_close(Q[i], _svd_polar(A[i]), rtol=0, atol=1e-13)


def test_orthonormality_guard_catches_a_broken_eigensolver(
    monkeypatch: pytest.MonkeyPatch, gram_for_small_k: None
) -> None:
    A = _kappa(20, 6, 2.0)
    eigh = torch.linalg.eigh

    def broken(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, V = eigh(M)
        return e, V + 1e-3  # not orthogonal: conditioning looks fine, Q is not orthonormal

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    assert not bool(polar_gram(A, torch.float64)[1])
    Q = polar(A)
    monkeypatch.undo()
    assert torch.equal(Q, _svd_polar(A))


# --- the backward ---------------------------------------------------------------------------


def _dense_vjp(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """math.md §2b written out densely: 2 Q Y + (I - Q Q^T) G P^{-1}, P Y + Y P = skew(Q^T G)
    solved as a Kronecker system."""
    d, K = A.shape
    Q = _svd_polar(A)
    P = _sqrt_gram(A)
    Bk = (Q.T @ G - G.T @ Q) / 2
    eye = torch.eye(K, dtype=A.dtype)
    lyapunov = torch.kron(P, eye) + torch.kron(eye, P)
    Y = torch.linalg.solve(lyapunov, Bk.reshape(-1)).reshape(K, K)
    return 2 * Q @ Y + (torch.eye(d, dtype=A.dtype) - Q @ Q.T) @ G @ torch.linalg.inv(P)


@pytest.mark.parametrize("kappa", [3.0, 10.0, 1e4])  # Gram, polished Gram, SVD route
def test_backward_matches_the_dense_formula(kappa: float, gram_for_small_k: None) -> None:
    A = _kappa(12, 5, kappa).requires_grad_(True)
    assert bool(polar_gram(A.detach(), DT)[1]) == (kappa < 16)
    G = torch.randn(12, 5, dtype=DT)
    (grad,) = torch.autograd.grad(polar(A), A, G)
    torch.testing.assert_close(grad, _dense_vjp(A.detach(), G), rtol=1e-9, atol=1e-12)


def test_gradcheck_on_both_routes(gram_for_small_k: None) -> None:
    for kappa in (3.0, 10.0, 1e4):  # Gram, polished Gram, SVD
        A = _kappa(7, 4, kappa).requires_grad_(True)
        assert torch.autograd.gradcheck(polar, (A,))


def test_float32_gradient_matches_float64() -> None:
    A = _kappa(600, 300, 4.0, torch.float32).requires_grad_(True)
    G = torch.randn(600, 300)
    (grad,) = torch.autograd.grad(polar(A), A, G)
    A64 = A.detach().double().requires_grad_(True)
    (grad64,) = torch.autograd.grad(polar(A64), A64, G.double())
    assert float((grad.double() - grad64).norm() / grad64.norm()) < 1e-5


def test_polar_vjp_computes_the_inverse_factor_when_not_given(gram_for_small_k: None) -> None:
    A = _kappa(10, 4, 3.0)
    G = torch.randn(10, 4, dtype=DT)
    Q, V, s, W = polar_factors(A)
    torch.testing.assert_close(polar_vjp(Q, V, s, G), polar_vjp(Q, V, s, G, W))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kappa", [3.0, 10.0, 1e4])
def test_cuda_matches_cpu(kappa: float) -> None:
    A = torch.stack([_kappa(300, 260, kappa, torch.float32), _kappa(300, 260, 2.0, torch.float32)])
    G = torch.randn(2, 300, 260)
    A_cuda = A.cuda().requires_grad_(True)
    Q = polar(A_cuda)
    (grad,) = torch.autograd.grad(Q, A_cuda, G.cuda())
    A_cpu = A.clone().requires_grad_(True)
    Q_cpu = polar(A_cpu)
    (grad_cpu,) = torch.autograd.grad(Q_cpu, A_cpu, G)
    torch.testing.assert_close(Q.cpu(), Q_cpu, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad.cpu(), grad_cpu, rtol=1e-3, atol=1e-3)


def test_second_derivatives_are_refused_loudly() -> None:
    # the closed-form backward is a first derivative: a graph of it (create_graph=True) would
    # give silently partial second derivatives, so it raises instead
    from nearest_etf import DeclarativeNode, nearest_etf

    A = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivatives through the polar factor"):
        torch.autograd.grad(polar(A).sum(), A, create_graph=True)
    prox, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.functional.hessian(lambda H: nearest_etf(H, prox).square().sum(), A)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    node = DeclarativeNode(
        lambda x, y: (y - x).square().sum(), geoopt.Euclidean(), lambda f, m, x, y0: x.detach()
    )
    with pytest.raises(RuntimeError, match="second derivatives through the declarative node"):
        torch.autograd.grad(node(b).sum(), b, create_graph=True)
    # first derivatives are unaffected
    assert torch.autograd.grad(polar(A).sum(), A)[0].shape == A.shape
