"""The reference paper's backward for the nearest-ETF node: the structured KKT solve (baseline).

Markou, Ajanthan & Gould (NeurIPS 2024) differentiate U* = argmin_{U^T U = I} f(Hn, U),

    f(Hn, U) = ||Hn - U C / sqrt(K-1)||^2 + (delta/2) ||U - prox||^2,   C = I - 1 1^T / K,

with the equality-constrained deep declarative node formula (Gould et al., TPAMI 2021,
Prop. 4.5; docs/math.md §2b). With y = vec(U) taken row by row (n = dK), the constraints
h(U) = U^T U - I (upper triangle, m = K(K+1)/2 of them), A = Dh(U) (m x n, formed densely) and
B = D^2_{Hn,y} f:

    Dy(Hn) = H_L^{-1} A^T (A H_L^{-1} A^T)^{-1} A H_L^{-1} B - H_L^{-1} B.

The Lagrangian Hessian is block diagonal, H_L = I_d (x) P_L, one K x K block per row of U:

    P_L = (2/(K-1)) C + delta I - sym(U^T grad_U f)     (= sym(U^T A_proc) at the optimum,
                                                          A_proc = (2/sqrt(K-1)) Hn C + delta prox)

so a single Cholesky factor of P_L serves all d blocks. For an upstream gradient G = dL/dU:

    w  = H_L^{-1} vec(G)                      (= G P_L^{-1})
    S  = A H_L^{-1} A^T                       (m x m Schur complement: O(d K^5) time,
                                               O(d K^3) memory)
    u  = H_L^{-1} A^T S^{-1} A w - w
    dL/dHn = B^T u = -(2/sqrt(K-1)) u C       (u as a d x K matrix)

This module is the baseline timed by `benchmarks/solver_speed.py`; `nearest_etf`'s own
`backward="analytic"` computes the same derivative in O(d K^2 + K^3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "constraint_jacobian",
    "lagrangian_hessian_block",
    "structured_kkt_backward",
    "structured_kkt_memory_bytes",
]


def constraint_jacobian(U: Tensor) -> Tensor:
    """The dense Jacobian of h(U) = triu(U^T U - I) at U[d, K], shape [K(K+1)/2, d, K].

    Row p = (i, j), i <= j (torch.triu_indices order): d h_ij / dU = U e_j e_i^T + U e_i e_j^T,
    i.e. column i of the row holds U[:, j] and column j holds U[:, i] (2 U[:, i] when i = j)."""
    d, K = U.shape
    rows, cols = torch.triu_indices(K, K, device=U.device)
    p = torch.arange(rows.numel(), device=U.device)
    jac = U.new_zeros(rows.numel(), d, K)
    jac[p, :, rows] = U[:, cols].mT
    jac[p, :, cols] += U[:, rows].mT
    return jac


def lagrangian_hessian_block(Hn: Tensor, prox: Tensor, U: Tensor, delta: float) -> Tensor:
    """P_L = (2/(K-1)) C + delta I - sym(U^T grad_U f(Hn, U)), the K x K block repeated d times
    along the diagonal of the Lagrangian Hessian (y = vec(U) row by row)."""
    K = U.shape[-1]
    C = torch.eye(K, dtype=U.dtype, device=U.device) - 1.0 / K
    hess_f = (2 / (K - 1)) * C + delta * torch.eye(K, dtype=U.dtype, device=U.device)
    egrad = -(2 / math.sqrt(K - 1)) * Hn @ C + U @ hess_f - delta * prox
    UtG = U.mT @ egrad
    return hess_f - (UtG + UtG.mT) / 2


def _check_inputs(Hn: Tensor, prox: Tensor, U: Tensor, G: Tensor, delta: float) -> None:
    for name, t in (("Hn", Hn), ("prox", prox), ("U", U), ("G", G)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2 or t.shape != Hn.shape:
            raise ValueError(
                f"{name} must be a d x K matrix shaped like Hn {tuple(Hn.shape)}, "
                f"got {tuple(t.shape)}"
            )
    d, K = Hn.shape
    if K < 2 or d < K:
        raise ValueError(f"need d >= K >= 2, got d={d}, K={K}")
    if not delta > 0:
        raise ValueError(
            f"the structured KKT solve needs delta > 0 (P_L is singular at delta = 0), got {delta}"
        )


def structured_kkt_backward(Hn: Tensor, prox: Tensor, U: Tensor, delta: float, G: Tensor) -> Tensor:
    """dL/dHn for the nearest-ETF solution U = U*(Hn) and upstream G = dL/dU, by the reference's
    structured KKT solve (module docstring). All shapes [d, K]; returns [d, K].

    Raises ValueError when P_L is not positive definite or numerically singular (smallest
    eigenvalue <= K eps times the largest): U is then not a strict minimiser, and the inverses
    this formula needs do not exist (`nearest_etf`'s "kkt"/"cg" backwards return the
    minimum-norm derivative there)."""
    _check_inputs(Hn, prox, U, G, delta)
    d, K = U.shape
    P_L = lagrangian_hessian_block(Hn, prox, U, delta)
    eigenvalues = torch.linalg.eigvalsh(P_L)  # O(K^3), next to the O(d K^5) solve
    chol, info = torch.linalg.cholesky_ex(P_L)
    if int(info) != 0 or bool(
        eigenvalues[0] <= K * torch.finfo(P_L.dtype).eps * eigenvalues[-1].abs()
    ):
        raise ValueError(
            "the Lagrangian Hessian block P_L is not positive definite (or numerically "
            "singular): U is not a strict minimiser of the nearest-ETF objective"
        )
    P_inv = torch.cholesky_inverse(chol)  # the one shared factorisation, applied to all d blocks
    jac = constraint_jacobian(U).reshape(-1, d * K)  # A, m x n
    jac_hinv = (jac.reshape(-1, K) @ P_inv).reshape_as(jac)  # A H_L^{-1}, m x n
    schur = jac @ jac_hinv.mT  # A H_L^{-1} A^T, m x m
    w = G @ P_inv  # H_L^{-1} vec(G)
    z = torch.cholesky_solve((jac @ w.reshape(-1)).unsqueeze(-1), torch.linalg.cholesky(schur))
    u = (jac_hinv.mT @ z).reshape(d, K) - w
    return -(2 / math.sqrt(K - 1)) * (u - u.mean(dim=-1, keepdim=True))


def structured_kkt_memory_bytes(d: int, K: int, dtype: torch.dtype = torch.float64) -> int:
    """Peak memory of `structured_kkt_backward`, dominated by the dense A and A H_L^{-1}
    (2 m n entries) and the Schur complement S (m^2), m = K(K+1)/2, n = dK."""
    m, n = K * (K + 1) // 2, d * K
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return (2 * m * n + 2 * m * m + 4 * n) * itemsize
