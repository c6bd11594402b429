"""The polar factor Q = polar(A) of A[..., d, K] (d >= K) and its closed-form derivative.

With the thin SVD A = L diag(s) V^T: Q = L V^T and P = (A^T A)^{1/2} = V diag(s) V^T, A = Q P.
Q = argmax_{Q in St(d,K)} tr(Q^T A) (orthogonal Procrustes).

Forward (docs/math.md §2a). The SVD of the tall matrix is not needed: from the eigendecomposition of
the K x K Gram matrix, A^T A = V diag(s^2) V^T,

    Q = A W,   W = P^{-1} = V diag(1/s) V^T,

one d x K x K product for A^T A, a K x K `eigh`, a K^3 product for W and a d x K x K product for
A W: at (d, K) = (2048, 1000) in float32 about 0.4x the time of `torch.linalg.svd(A)`, and it
yields (V, s, W), what the backward needs. Forming A^T A squares the condition number
kappa = s_max / s_min: in unit roundoff eps_c the computed Q has orthonormality and forward errors
~ eps_c kappa^2 (the SVD's are ~ eps kappa). With eps_out the unit roundoff of A's dtype, per
problem of a batch:

  - conditioning guard: the Gram route in compute dtype c is kept only if
    eps_c kappa^2 <= GRAM_TOLERANCE * eps_out, kappa^2 = e_max / e_min read off the computed
    eigenvalues: kappa <= 16 when c is A's dtype, kappa <= 3.7e5 for a float32 A in a float64
    Gram;
  - polish: above eps_c kappa^2 > POLISH_TOLERANCE * eps_out (kappa > 5.7 in one dtype) one
    Newton-Schulz step Q <- Q + Q (I - Q^T Q) / 2 (two d x K x K products) squares the
    orthonormality error; the forward error left is ~ eps_c kappa^2 / 8. Measured on spectra
    log-spaced over [1/kappa, 1] (benchmarks/polar_speed.py --accuracy, docs/benchmarks.md):
    unpolished at kappa = 5.6, max|Q^T Q - I| is up to 4x the SVD's (2.4e-6 in float32, 5e-15
    in float64) and max|Q - polar(A)| about the SVD's; polished, up to kappa = 16, both are at
    or below the SVD's;
  - orthonormality guard: |Q^T Q z - z| <= sqrt(eps_out) for the probe z = 1/sqrt(K) (two
    matrix-vector products; a gross failure of the eigensolver, not rounding, trips it).

Route choice (a priori, by size; the guards then decide): the Gram route in A's own dtype is tried
when K >= SAME_DTYPE_GRAM_MIN_K (there the K x K eigensolver costs half the SVD or less, and in
the nearest-ETF problem kappa ~ 1 + 2 / ((K-1) delta) is small), the float64 Gram route for a
float32 A when K >= GRAM_MIN_K (below that the thin SVD costs less than the Gram route's dozen
small operations); problems that none of these tried routes serve take the SVD route (rank-
deficient A, kappa > 16 in float64, small K).

Vector-Jacobian product, for upstream G = dL/dQ (docs/math.md §2b):

    Bk = skew(Q^T G),   Y = V [ (V^T Bk V)_ij / (s_i + s_j) ] V^T   (solves P Y + Y P = Bk)
    dL/dA = 2 Q Y + (I - Q Q^T) G P^{-1}

O(d K^2 + K^3); it needs only s_i + s_j > 0, so it is exact where autograd through
`torch.linalg.svd` is NaN (repeated singular values). Where A is rank-deficient the polar factor
is not unique: the free directions are completed deterministically and held fixed, and P^{-1},
1/(s_i + s_j) become pseudo-inverses (zero on the null space).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nearest_etf._blas import gram
from nearest_etf._threads import is_small, single_threaded
from nearest_etf._validation import SECOND_ORDER_ERROR, check_float_tensor, pow2_scale

__all__ = ["polar", "polar_vjp"]

# The Gram route's limits (module docstring): kept while eps_c kappa^2 <= GRAM_TOLERANCE eps_out,
# polished above POLISH_TOLERANCE eps_out; tried from K = GRAM_MIN_K in float64 for float32 A,
# from K = SAME_DTYPE_GRAM_MIN_K in A's own dtype (crossovers measured by polar_speed.py).
GRAM_TOLERANCE = 256.0
POLISH_TOLERANCE = 32.0
GRAM_MIN_K = 24
SAME_DTYPE_GRAM_MIN_K = 256

# (Q, V, s, W) with A = Q V diag(s) V^T and W = P^+ = V diag(1/s) V^T (pseudo-inverse)
Factors = tuple[Tensor, Tensor, Tensor, Tensor]


def _null_tolerance(s: Tensor, shape: torch.Size) -> Tensor:
    """Singular values <= tol count as zero: tol = max(d, K) * eps * s_max (numpy's matrix_rank)."""
    eps = torch.finfo(s.dtype).eps
    return max(shape[-2:]) * eps * s.abs().amax(dim=-1, keepdim=True)


def _inverse_factor(V: Tensor, s: Tensor, tol: Tensor) -> Tensor:
    """P^+ = V diag(1/s) V^T with 1/s_i -> 0 where s_i <= tol. Shapes V [..., K, K], s [..., K]."""
    inv_s = torch.where(s > tol, 1.0 / s, torch.zeros_like(s))
    return (V * inv_s.unsqueeze(-2)) @ V.mT


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
    """(Q, V, s) with Q = polar(A), A^T A = V diag(s^2) V^T, from the thin SVD (any rank);
    batched over leading dims."""
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


def _gram_compute_dtypes(A: Tensor) -> tuple[torch.dtype, ...]:
    """The compute dtypes in which the Gram route is tried for A (float32 or float64), in order;
    empty: the SVD route directly (see the module docstring)."""
    K = A.shape[-1]
    same = (A.dtype,) if K >= SAME_DTYPE_GRAM_MIN_K else ()
    wider = (torch.float64,) if A.dtype != torch.float64 and K >= GRAM_MIN_K else ()
    return same + wider


def polar_gram(A: Tensor, dtype: torch.dtype) -> tuple[Factors, Tensor]:
    """The polar factors of A[..., d, K] from the eigendecomposition of A^T A computed in
    `dtype` (polished where needed), returned in A's dtype, and the accuracy guard: a bool tensor
    [...] (A's batch shape), True where the problem passed both guards of the module docstring.
    Where it is False the factors are not to be used (they may be inaccurate, or inf/NaN)."""
    K = A.shape[-1]
    eps_c, eps_out = torch.finfo(dtype).eps, torch.finfo(A.dtype).eps
    B = A.to(dtype)
    e, V = torch.linalg.eigh(gram(B))  # ascending eigenvalues
    e_min, e_max = e[..., 0], e[..., -1]
    conditioned = e_min * (GRAM_TOLERANCE * eps_out) >= e_max * eps_c  # False for NaN, e_max = 0
    s = e.clamp_min(torch.finfo(dtype).tiny).sqrt()
    W = (V / s.unsqueeze(-2)) @ V.mT
    Q = B @ W
    rough = conditioned & (e_min * (POLISH_TOLERANCE * eps_out) < e_max * eps_c)
    if bool(rough.any()):
        eye = torch.eye(K, dtype=dtype, device=A.device)
        polished = Q + Q @ ((eye - gram(Q)) / 2)
        Q = torch.where(rough.reshape(*rough.shape, 1, 1), polished, Q)
    z = torch.full((K, 1), 1 / math.sqrt(K), dtype=dtype, device=A.device)
    residual = torch.linalg.vector_norm((Q.mT @ (Q @ z) - z).squeeze(-1), dim=-1)
    ok = conditioned & (residual <= math.sqrt(eps_out))
    out = A.dtype
    return (Q.to(out), V.to(out), s.to(out), W.to(out)), ok


def _select(keep: Tensor, first: Factors, second: Factors) -> Factors:
    """Per problem of the batch: the `first` factors where keep, else the `second`."""
    return tuple(  # type: ignore[return-value]
        torch.where(keep.reshape(*keep.shape, *(1,) * (a.ndim - keep.ndim)), a, b)
        for a, b in zip(first, second, strict=True)
    )


def polar_factors(A: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(Q, V, s, W) of A[..., d, K]: Q = polar(A), A^T A = V diag(s^2) V^T, W = P^+, by the Gram
    route with its accuracy guard and the SVD route for the problems that fail it. W is None
    where every problem took the SVD route (the backward forms P^+ itself, only if it runs)."""
    best: tuple[Factors, Tensor] | None = None  # the factors so far and where they passed
    for dtype in _gram_compute_dtypes(A):
        found, ok = polar_gram(A, dtype)
        if best is not None:
            factors, done = best
            found, ok = _select(done, factors, found), done | ok
        best = (found, ok)
        if bool(ok.all()):
            return found
    Q, V, s = polar_svd(A)
    if best is None:
        return Q, V, s, None
    factors, done = best
    return _select(done, factors, (Q, V, s, _inverse_factor(V, s, _null_tolerance(s, A.shape))))


def polar_factors_at(A: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """(V, s) of P = sym(Q^T A) = V diag(s) V^T: the symmetric factor of A = Q P at a point Q
    returned by an iterative solver (at the exact maximiser of tr(Q^T A), Q^T A is symmetric)."""
    QtA = Q.mT @ A
    s, V = torch.linalg.eigh((QtA + QtA.mT) / 2)
    return V, s


def polar_vjp(Q: Tensor, V: Tensor, s: Tensor, G: Tensor, P_pinv: Tensor | None = None) -> Tensor:
    """dL/dA from G = dL/dQ at A = Q V diag(s) V^T (see the module docstring). Shapes
    Q, G [..., d, K]; V [..., K, K]; s [..., K]; P_pinv [..., K, K] = P^+ = V diag(1/s) V^T if
    the caller has it (computed here otherwise).

    In the eigenbasis, with T = V^T Q^T G V: V^T Y V = skew(T) / (s_i + s_j) and
    V^T Q^T G P^+ V = T diag(1/s), so dL/dA = Q X + G P^+ with
    X = V (2 skew(T) / (s_i + s_j) - T diag(1/s)) V^T: three d x K x K products and four K^3."""
    tol = _null_tolerance(s, Q.shape)
    if P_pinv is None:
        P_pinv = _inverse_factor(V, s, tol)
    T = V.mT @ (Q.mT @ G) @ V
    denom = s.unsqueeze(-1) + s.unsqueeze(-2)
    ratio = torch.where(denom > tol.unsqueeze(-1), (T - T.mT) / denom, torch.zeros_like(denom))
    inv_s = torch.where(s > tol, 1.0 / s, torch.zeros_like(s))
    X = V @ (ratio - T * inv_s.unsqueeze(-2)) @ V.mT
    GP = G @ P_pinv
    return torch.addmm(GP, Q, X) if Q.ndim == 2 else GP + Q @ X  # addmm: no separate sum pass


class _Polar(torch.autograd.Function):
    """Q = polar(A) with the closed-form backward; `Q_given` (optional, not differentiated) is a
    maximiser of tr(Q^T A) found by another solver, at which the same derivative is evaluated.
    Small problems run on one CPU thread (`nearest_etf._threads`)."""

    @staticmethod
    def forward(ctx, A: Tensor, Q_given: Tensor | None) -> Tensor:  # type: ignore[override]
        with single_threaded(is_small(A)):
            if Q_given is None:
                Q, V, s, W = polar_factors(A)
                ctx.save_for_backward(Q, V, s, *([] if W is None else [W]))
            else:
                Q = Q_given
                V, s = polar_factors_at(A, Q)
                ctx.save_for_backward(Q, V, s)
        return Q

    @staticmethod
    def backward(ctx, G: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_ERROR.format(what="polar factor (nearest_etf, polar)"))
        Q, V, s, *P_pinv = ctx.saved_tensors  # P^+ is saved where the forward formed it
        with single_threaded(is_small(G)):
            return polar_vjp(Q, V, s, G, *P_pinv), None


def polar_of_bounded(A: Tensor) -> Tensor:
    """`polar(A)` without its input checks and rescaling pass, for callers whose A is a checked
    float32/float64 [..., d, K] (d >= K) with entries of order one (the nearest-ETF target:
    |A_ij| <= 5 after `nearest_etf`'s scaling), where A^T A can neither overflow nor underflow."""
    return _Polar.apply(A, None)


def polar(A: Tensor, Q: Tensor | None = None) -> Tensor:
    """Q = polar(A) = argmax_{Q^T Q = I} tr(Q^T A) for A[..., d, K], d >= K, differentiable
    with the closed-form backward. Pass `Q` (a maximiser found elsewhere) to differentiate at it
    instead of recomputing the SVD.

    polar(c A) = polar(A) for c > 0: each problem is first rescaled by an exact power of two to
    max |A_ij| in [1/2, 1), so no singular value overflows or underflows at any scale of the
    dtype. float16/bfloat16 A is computed in float32 (Q is float32); TypeError for other
    non-float dtypes, ValueError for NaN/inf entries or a wrong shape. First derivatives only:
    a backward with create_graph=True raises RuntimeError."""
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
