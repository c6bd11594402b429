"""The structured KKT baseline of benchmarks/structured_kkt.py, in float64, against independent
oracles: finite differences of the closed-form map Hn -> polar(A(Hn)) (computed here with
torch.linalg.svd), autograd for the constraint Jacobian, and nearest_etf's analytic backward."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from nearest_etf import nearest_etf

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "structured_kkt.py"
_SPEC = importlib.util.spec_from_file_location("structured_kkt", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
skkt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(skkt)

DELTA = 1e-3
SIZES = [(6, 3), (5, 5), (8, 4), (7, 2)]


def _closed_form(Hn: Tensor, prox: Tensor, delta: float) -> Tensor:
    """U*(Hn) = L V^T for the thin SVD of A = (2/sqrt(K-1)) Hn C + delta prox (docs/math.md §2a)."""
    K = Hn.shape[-1]
    A = (2 / math.sqrt(K - 1)) * (Hn - Hn.mean(dim=-1, keepdim=True)) + delta * prox
    L, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return L @ Vh


def _problem(d: int, K: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Hn, prox, U, G): noisy centred class means of unit norm, a previous solution for slightly
    different means, the solution U*(Hn), a random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    H = torch.randn(d, K, generator=gen, dtype=torch.float64)
    H = H - H.mean(dim=-1, keepdim=True)
    Hn = H / H.norm()
    prox = torch.linalg.qr(Hn + 0.1 * torch.randn(d, K, generator=gen, dtype=torch.float64)).Q
    G = torch.randn(d, K, generator=gen, dtype=torch.float64)
    return Hn, prox, _closed_form(Hn, prox, DELTA), G


def _finite_difference_grad(Hn: Tensor, prox: Tensor, G: Tensor, eps: float = 1e-6) -> Tensor:
    """Central differences of <G, U*(Hn)> in every entry of Hn."""
    grad = torch.empty_like(Hn)
    for idx in range(Hn.numel()):
        step = torch.zeros_like(Hn).reshape(-1)
        step[idx] = eps
        step = step.reshape(Hn.shape)
        plus = (G * _closed_form(Hn + step, prox, DELTA)).sum()
        minus = (G * _closed_form(Hn - step, prox, DELTA)).sum()
        grad.reshape(-1)[idx] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize(("d", "K"), SIZES)
def test_matches_finite_differences_of_closed_form(d: int, K: int) -> None:
    Hn, prox, U, G = _problem(d, K, seed=d * 10 + K)
    got = skkt.structured_kkt_backward(Hn, prox, U, DELTA, G)
    want = _finite_difference_grad(Hn, prox, G)
    assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want)


@pytest.mark.parametrize(("d", "K"), SIZES)
def test_matches_nearest_etf_analytic_backward(d: int, K: int) -> None:
    Hn, prox, U, G = _problem(d, K, seed=d * 10 + K + 1)
    H = Hn.clone().requires_grad_(True)
    U_pkg = nearest_etf(H, prox, delta=DELTA, solver="procrustes", backward="analytic")
    assert torch.allclose(U_pkg, U, atol=1e-12)
    (want,) = torch.autograd.grad(U_pkg, H, G)
    g = skkt.structured_kkt_backward(Hn, prox, U, DELTA, G)
    got = g - (g * Hn).sum() * Hn  # chain through Hn = H / ||H|| at ||H|| = 1
    assert torch.linalg.norm(got - want) <= 1e-10 * torch.linalg.norm(want)


def test_lagrangian_block_is_polar_factor_at_optimum() -> None:
    Hn, prox, U, _ = _problem(9, 4, seed=3)
    K = Hn.shape[-1]
    A = (2 / math.sqrt(K - 1)) * (Hn - Hn.mean(dim=-1, keepdim=True)) + DELTA * prox
    P = torch.linalg.svdvals(A)  # P_L = (A^T A)^{1/2}: same eigenvalues as A's singular values
    block = skkt.lagrangian_hessian_block(Hn, prox, U, DELTA)
    assert torch.allclose(block, block.mT, atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(block).flip(0), P, atol=1e-12)
    assert torch.allclose(block @ block, A.mT @ A, atol=1e-12)


def test_constraint_jacobian_matches_autograd() -> None:
    U = torch.randn(5, 4, dtype=torch.float64)
    rows, cols = torch.triu_indices(4, 4)

    def h(V: Tensor) -> Tensor:
        return (V.mT @ V - torch.eye(4, dtype=V.dtype))[rows, cols]

    want = torch.func.jacrev(h)(U)
    assert torch.equal(skkt.constraint_jacobian(U), want)


def test_memory_estimate_covers_the_dense_jacobian() -> None:
    d, K = 12, 5
    jac = skkt.constraint_jacobian(torch.randn(d, K, dtype=torch.float64))
    jac_bytes = jac.numel() * jac.element_size()
    estimate = skkt.structured_kkt_memory_bytes(d, K, torch.float64)
    assert 2 * jac_bytes <= estimate <= 4 * jac_bytes
    assert skkt.structured_kkt_memory_bytes(d, K, torch.float32) * 2 == estimate


def test_bad_input() -> None:
    Hn, prox, U, G = _problem(6, 3, seed=0)
    with pytest.raises(ValueError, match="delta > 0"):
        skkt.structured_kkt_backward(Hn, prox, U, 0.0, G)
    with pytest.raises(ValueError, match="G must be a d x K"):
        skkt.structured_kkt_backward(Hn, prox, U, DELTA, G[:, :2])
    with pytest.raises(TypeError, match=r"prox must be a torch\.Tensor"):
        skkt.structured_kkt_backward(Hn, prox.numpy(), U, DELTA, G)
    with pytest.raises(ValueError, match="not positive definite"):
        skkt.structured_kkt_backward(Hn, prox, -U, DELTA, G)  # -U maximises the objective


def test_numerically_singular_block_raises() -> None:
    # Two distinct class means (rank-1 Hn C) and delta = 1e-15: P_L has eigenvalues ~2e-16 and
    # 1.15, numerically singular in float64. A Cholesky factor still exists; the solve must
    # refuse instead of returning a gradient of rounding errors amplified by 1e15.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    H = torch.cat([a.repeat(1, 2), b.repeat(1, 2)], 1)
    H = H - H.mean(dim=-1, keepdim=True)
    Hn = H / H.norm()
    prox = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64)).Q
    U, G = _closed_form(Hn, prox, 1e-15), torch.randn(6, 4, generator=gen, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(skkt.lagrangian_hessian_block(Hn, prox, U, 1e-15))[1]) == 0
    with pytest.raises(ValueError, match="numerically singular"):
        skkt.structured_kkt_backward(Hn, prox, U, 1e-15, G)
