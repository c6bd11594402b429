import math

import pytest
import torch

from nearest_etf import (
    centering_matrix,
    centre_columns,
    etf_classifier,
    random_stiefel,
    simplex_etf,
)


@pytest.mark.parametrize("K", [2, 3, 7, 50])
def test_simplex_etf_properties(K: int) -> None:
    M = simplex_etf(K, dtype=torch.float64)
    gram = M.T @ M
    torch.testing.assert_close(torch.diagonal(gram), torch.ones(K, dtype=torch.float64))
    off = gram[~torch.eye(K, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / (K - 1)))
    assert torch.linalg.matrix_rank(M) == K - 1
    torch.testing.assert_close(
        M @ torch.ones(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    )
    assert math.isclose(float(M.square().sum()), K, rel_tol=1e-12)


def test_centering_matrix_is_projector() -> None:
    C = centering_matrix(5, dtype=torch.float64)
    torch.testing.assert_close(C @ C, C)
    torch.testing.assert_close(C, C.T)
    X = torch.randn(2, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(centre_columns(X), X @ C)


def test_centre_columns_derivatives_are_the_centring_map() -> None:
    # reverse mode to second order (finite differences), forward mode and vmap against X C
    X = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(centre_columns, (X,))
    torch.autograd.gradgradcheck(centre_columns, (X,))
    C = centering_matrix(4, dtype=torch.float64)
    T = torch.randn(3, 6, 4, dtype=torch.float64)
    _, tangent = torch.func.jvp(centre_columns, (X.detach(),), (T,))
    torch.testing.assert_close(tangent, T @ C)
    torch.testing.assert_close(torch.func.vmap(centre_columns)(X.detach()), X.detach() @ C)


def test_etf_classifier_is_rotated_etf() -> None:
    U = random_stiefel(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = etf_classifier(U)
    assert W.shape == (4, 9)
    torch.testing.assert_close(W, (U @ simplex_etf(4, dtype=torch.float64)).T)  # the definition
    torch.testing.assert_close(
        W @ W.T, simplex_etf(4, dtype=torch.float64).T @ simplex_etf(4, dtype=torch.float64)
    )


def test_etf_classifier_batched() -> None:
    U = torch.stack([random_stiefel(6, 3, dtype=torch.float64) for _ in range(2)])
    W = etf_classifier(U)
    assert W.shape == (2, 3, 6)
    torch.testing.assert_close(W[1], etf_classifier(U[1]))


def test_random_stiefel_orthonormal_and_seeded() -> None:
    a = random_stiefel(20, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = random_stiefel(20, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(a.T @ a, torch.eye(5, dtype=torch.float64))
    assert torch.equal(a, b)


@pytest.mark.parametrize("K", [0, 1])
def test_simplex_etf_rejects_too_few_classes(K: int) -> None:
    with pytest.raises(ValueError, match="K >= 2"):
        simplex_etf(K)


def test_simplex_etf_rejects_non_int() -> None:
    with pytest.raises(TypeError, match="int"):
        simplex_etf(3.0)  # type: ignore[arg-type]


def test_random_stiefel_rejects_d_below_k() -> None:
    with pytest.raises(ValueError, match="d >= K"):
        random_stiefel(3, 5)
