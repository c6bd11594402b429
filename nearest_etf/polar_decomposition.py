"""The polar factor Q = polar(A) of A[..., d, K] (d >= K) and its closed-form derivative.

With the thin SVD A = L diag(s) V^T: Q = L V^T and P = (A^T A)^{1/2} = V diag(s) V^T, A = Q P.
Q = argmax_{Q in St(d,K)} tr(Q^T A) (orthogonal Procrustes).

Vector-Jacobian product, for upstream G = dL/dQ (docs/math.md §2b):

    Bk = skew(Q^T G),   Y = V [ (V^T Bk V)_ij / (s_i + s_j) ] V^T   (solves P Y + Y P = Bk)
    dL/dA = 2 Q Y + (I - Q Q^T) G P^{-1}

O(d K^2 + K^3); it needs only s_i + s_j > 0, so it is exact where autograd through
`torch.linalg.svd` is NaN (repeated singular values). Where A is rank-deficient the polar factor
is not unique: the free directions are completed deterministically and held fixed, and P^{-1},
1/(s_i + s_j) become pseudo-inverses (zero on the null space).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nearest_etf._validation import check_float_tensor, pow2_scale

__all__ = ["polar", "polar_vjp"]


def _null_tolerance(s: Tensor, shape: torch.Size) -> Tensor:
    """Singular values <= tol count as zero: tol = max(d, K) * eps * s_max (numpy's matrix_rank)."""
    eps = torch.finfo(s.dtype).eps
    return max(shape[-2:]) * eps * s.abs().amax(dim=-1, keepdim=True)


def _complement_basis(B: Tensor, k: int) -> Tensor:
    """k orthonormal columns orthogonal to the orthonormal columns of B[n, r], chosen
    deterministically: the standard basis vectors with the largest residual after projecting out
    range(B) (ties broken by index), projected and orthonormalised by QR with diag(R) > 0."""
    n = B.shape[0]
    residual = 1.0 - B.square().sum(dim=1)
    order = torch.sort(-residual, stable=True).indices[:k]
    E = torch.eye(n, dtype=B.dtype, device=B.device)[:, order]
    Q, R = torch.linalg.qr(E - B @ (B.mT @ E))
    signs = torch.sign(torch.diagonal(R))
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _complete_polar(L: Tensor, s: Tensor, Vh: Tensor, tol: Tensor) -> Tensor:
    """Polar factor of one rank-deficient A = L diag(s) Vh: the determined part L_r V_r^T plus a
    deterministic isometry between the left and right null spaces."""
    r = int((s > tol).sum())
    Lr, Vr = L[:, :r], Vh[:r].mT
    k = s.shape[0] - r
    return Lr @ Vr.mT + _complement_basis(Lr, k) @ _complement_basis(Vr, k).mT


def polar_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Q, V, s) with Q = polar(A), A^T A = V diag(s^2) V^T; batched over leading dims."""
    L, s, Vh = torch.linalg.svd(A, full_matrices=False)
    Q = L @ Vh
    tol = _null_tolerance(s, A.shape)
    deficient = (s[..., -1:] <= tol).squeeze(-1)
    if bool(deficient.any()):
        Q, Lf, sf, Vf, tf = (t.reshape(-1, *t.shape[A.ndim - 2 :]) for t in (Q, L, s, Vh, tol))
        Q = Q.clone()
        for i in torch.nonzero(deficient.reshape(-1)).flatten().tolist():
            Q[i] = _complete_polar(Lf[i], sf[i], Vf[i], tf[i])
        Q = Q.reshape(A.shape)
    return Q, Vh.mT, s


def polar_factors_at(A: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """(V, s) of P = sym(Q^T A) = V diag(s) V^T: the symmetric factor of A = Q P at a point Q
    returned by an iterative solver (at the exact maximiser of tr(Q^T A), Q^T A is symmetric)."""
    QtA = Q.mT @ A
    s, V = torch.linalg.eigh((QtA + QtA.mT) / 2)
    return V, s


def polar_vjp(Q: Tensor, V: Tensor, s: Tensor, G: Tensor) -> Tensor:
    """dL/dA from G = dL/dQ at A = Q V diag(s) V^T (see the module docstring). Shapes
    Q, G [..., d, K]; V [..., K, K]; s [..., K]."""
    tol = _null_tolerance(s, Q.shape)
    QtG = Q.mT @ G
    Bk = (QtG - QtG.mT) / 2
    denom = s.unsqueeze(-1) + s.unsqueeze(-2)
    ratio = torch.where(denom > tol.unsqueeze(-1), (V.mT @ Bk @ V) / denom, torch.zeros_like(denom))
    Y = V @ ratio @ V.mT
    inv_s = torch.where(s > tol, 1.0 / s, torch.zeros_like(s))
    P_pinv = (V * inv_s.unsqueeze(-2)) @ V.mT
    # 2 Q Y + (I - Q Q^T) G P^+ = Q (2 Y - Q^T G P^+) + G P^+: three d x K x K products, not four
    return Q @ (2 * Y - QtG @ P_pinv) + G @ P_pinv


class _Polar(torch.autograd.Function):
    """Q = polar(A) with the closed-form backward; `Q_given` (optional, not differentiated) is a
    maximiser of tr(Q^T A) found by another solver, at which the same derivative is evaluated."""

    @staticmethod
    def forward(ctx, A: Tensor, Q_given: Tensor | None) -> Tensor:  # type: ignore[override]
        if Q_given is None:
            Q, V, s = polar_svd(A)
        else:
            Q = Q_given
            V, s = polar_factors_at(A, Q)
        ctx.save_for_backward(Q, V, s)
        return Q

    @staticmethod
    def backward(ctx, G: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        Q, V, s = ctx.saved_tensors
        return polar_vjp(Q, V, s, G), None


def polar(A: Tensor, Q: Tensor | None = None) -> Tensor:
    """Q = polar(A) = argmax_{Q^T Q = I} tr(Q^T A) for A[..., d, K], d >= K, differentiable
    with the closed-form backward. Pass `Q` (a maximiser found elsewhere) to differentiate at it
    instead of recomputing the SVD.

    polar(c A) = polar(A) for c > 0: each problem is first rescaled by an exact power of two to
    max |A_ij| in [1/2, 1), so no singular value overflows or underflows at any scale of the
    dtype. float16/bfloat16 A is computed in float32 (Q is float32); TypeError for other
    non-float dtypes, ValueError for NaN/inf entries or a wrong shape."""
    A = check_float_tensor("A", A)
    if A.ndim < 2 or A.shape[-2] < A.shape[-1]:
        raise ValueError(f"polar(A) needs A[..., d, K] with d >= K, got {tuple(A.shape)}")
    if Q is not None:
        Q = check_float_tensor("Q", Q)
        if Q.shape != A.shape:
            raise ValueError(f"Q must have the shape of A, {tuple(A.shape)}, got {tuple(Q.shape)}")
        if Q.dtype != A.dtype:
            raise TypeError(f"Q must have the dtype of A, {A.dtype}, got {Q.dtype}")
    return _Polar.apply(A * pow2_scale(A, (-2, -1)), Q)
