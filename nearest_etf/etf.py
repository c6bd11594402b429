"""The simplex equiangular tight frame (ETF): the one construction every module uses.

M_K = sqrt(K/(K-1)) (I_K - 1 1^T / K) has unit-norm columns with pairwise inner products
-1/(K-1), rank K-1, M_K 1 = 0 and ||M_K||_F^2 = K. A simplex ETF in R^d is U M_K with
U in St(d, K) = {U in R^{d x K} : U^T U = I_K}.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["centering_matrix", "centre_columns", "etf_classifier", "random_stiefel", "simplex_etf"]


def _check_num_classes(K: int) -> None:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"number of classes K must be an int, got {type(K).__name__}")
    if K < 2:
        raise ValueError(f"a simplex ETF needs K >= 2 classes, got K={K}")


def centering_matrix(
    K: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """C = I_K - 1 1^T / K, the orthogonal projector onto 1-perp. Shape [K, K]."""
    _check_num_classes(K)
    eye = torch.eye(K, dtype=dtype, device=device)
    return eye - torch.full_like(eye, 1.0 / K)


class _CentreColumns(torch.autograd.Function):
    """X -> X C. C is a symmetric projector, so the vector-Jacobian and Jacobian-vector products
    are the same map (two passes, where autograd's chain through the mean takes five); defined
    for torch.func transforms too (jvp, and vmap by the generated rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor) -> Tensor:  # type: ignore[override]
        return X - (X / X.shape[-1]).sum(dim=-1, keepdim=True)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _CentreColumns.apply(grad)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[override]
        return _CentreColumns.apply(tangent)


def centre_columns(X: Tensor) -> Tensor:
    """X C = X - (X 1/K) 1^T for X[..., n, K]: each row minus its mean, in O(nK) (no K x K
    product with the centring matrix C), differentiable to any order. The mean is
    sum_j (x_j / K), which cannot overflow where sum_j x_j would (entries near the dtype's
    maximum). TypeError for a non-float X."""
    if not X.is_floating_point():
        raise TypeError(f"centre_columns needs a floating-point tensor, got {X.dtype}")
    return _CentreColumns.apply(X)


def simplex_etf(
    K: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """The canonical simplex ETF M_K = sqrt(K/(K-1)) (I_K - 1 1^T / K). Shape [K, K]."""
    _check_num_classes(K)
    return math.sqrt(K / (K - 1)) * centering_matrix(K, dtype=dtype, device=device)


def etf_classifier(U: Tensor) -> Tensor:
    """The ETF classifier W = (U M_K)^T = sqrt(K/(K-1)) (U - (U 1/K) 1^T)^T for U[..., d, K] in
    St(d, K), computed in O(dK) (no K x K product). Returns [..., K, d]."""
    if U.ndim < 2:
        raise ValueError(f"U must have shape [..., d, K], got {tuple(U.shape)}")
    K = U.shape[-1]
    _check_num_classes(K)
    return math.sqrt(K / (K - 1)) * centre_columns(U).mT


def random_stiefel(
    d: int,
    K: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A Haar-distributed point of St(d, K): Q of the QR of a Gaussian d x K matrix, with the
    signs of diag(R) absorbed so the distribution is exactly uniform. Shape [d, K]."""
    if d < K:
        raise ValueError(f"St(d, K) needs d >= K, got d={d}, K={K}")
    G = torch.randn(d, K, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    Q = Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, 1.0)
    return Q.to(dtype=dtype or torch.get_default_dtype(), device=device)
