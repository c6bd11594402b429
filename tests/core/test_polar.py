import pytest
import torch

from nearest_etf import polar, random_stiefel, simplex_etf
from nearest_etf.polar_decomposition import polar_svd

DT = torch.float64


def test_polar_maximises_trace_and_matches_svd() -> None:
    A = torch.randn(7, 4, dtype=DT)
    Q = polar(A)
    L, _, Vh = torch.linalg.svd(A, full_matrices=False)
    torch.testing.assert_close(Q, L @ Vh)
    torch.testing.assert_close(Q.T @ A, (Q.T @ A).T)  # Q^T A = P is symmetric
    for _ in range(20):  # no random orthonormal frame does better on tr(Q^T A)
        R = random_stiefel(7, 4, dtype=DT)
        assert torch.trace(R.T @ A) <= torch.trace(Q.T @ A) + 1e-12


def test_polar_gradcheck_generic() -> None:
    A = torch.randn(6, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(polar, (A,))


def test_polar_gradcheck_batched() -> None:
    A = torch.randn(2, 3, 6, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(polar, (A,))


def test_polar_gradient_finite_at_repeated_singular_values() -> None:
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
