"""Norm- and rank-based complexity bounds of a trained feed-forward network.

The network is f(x) = W_L phi(W_{L-1} ... phi(W_1 x)) with W_i [h_i, h_{i-1}] (h_0 = input
width, h_i = out_i = rows of W_i, the width of layer i), phi 1-Lipschitz (ReLU or identity),
and the m training inputs are the rows of X [m, h_0]. All norms are of the trained matrices
(the bounds hold for the class with B_i = ||W_i||_2 etc. set to the trained values; no union
bound over these values is taken). ||.||_2 is the spectral norm, ||.||_F the Frobenius norm,
rank = `nearest_etf.metrics.numerical_rank` at relative tolerance `rank_rtol`.

**Rank-aware bound** (Pinto, Rangamani & Poggio, ALT 2025, arXiv 2411.13733, Theorem 7; Maurer's
chain rule for Gaussian complexity) on the empirical Gaussian complexity of the class with
||W_i||_2 <= B_i, rank W_i <= r_i:

    G <= (||X||_F / m) [ T_1 + sum_{i=2..L} T_i ],
    T_1 = ||W_1||_F sqrt(h_1) prod_{i>=2} C1 ||W_i||_2,
    T_i = C1^{L-i} C2 2 sqrt(2 r_i) kappa_i ||W_i||_F sqrt(h_i),
    r_i = min_{j<i} rank W_j,  kappa_i = prod_{j != i} ||W_j||_2.

C1, C2 are universal constants the paper leaves unspecified; every figure here uses the
arguments `c1`, `c2` (default 1, i.e. reported with C1 = C2 = 1, which is NOT a proven value:
the figures are the bound's shape, not a certified number). The per-layer `term` reported is
(||X||_F / m) T_i, so the terms sum to G.

**Generalisation gap**, as stated in the project's issue 7 from the paper, for a loss that is
L_loss-Lipschitz in the network output and takes values in [0, 1], with probability >= 1 - delta
over the m samples:

    gap <= sqrt(L_loss pi) G + sqrt(9 log(2/delta) / (2m)).

(For comparison, the textbook chain R <= sqrt(pi/2) G and gap <= 2 L_loss R + 3 sqrt(log(2/delta)
/ (2m)) gives sqrt(2 pi) L_loss G for the first term; the two agree for L_loss = 1 up to the
factor sqrt(2).)

**Comparison bounds** on the (empirical) Rademacher complexity, in the forms used for the paper's
comparison (Table 1), margin gamma = 1, data term as in each original theorem:

- Golowich, Rakhlin & Shamir (COLT 2018, Thm 1, positively homogeneous 1-Lipschitz phi):
  (||X||_F / m) (sqrt(2 log(2) L) + 1) prod_i ||W_i||_F.
- Neyshabur, Bhojanapalli & Srebro (ICLR 2018, PAC-Bayes, spectrally normalised), complexity
  term without absolute constants and without its log(L m / delta) confidence term:
  (B_X / sqrt(m)) L sqrt(h ln(L h)) prod_i ||W_i||_2 sqrt(sum_i ||W_i||_F^2 / ||W_i||_2^2),
  B_X = max_j ||x_j||, h = max_i h_i (the widest layer, input excluded).
- Bartlett, Foster & Telgarsky (NeurIPS 2017, spectrally normalised margin bound; reference
  matrices M_i = 0, rho_i = 1), without the absolute constant and the ln(2 W) ln(m) factors:
  (||X||_F / m) prod_i ||W_i||_2 (sum_i (||W_i^T||_{2,1} / ||W_i||_2)^{2/3})^{3/2},
  ||W^T||_{2,1} = sum over the rows of W of their Euclidean norms.

The comparison forms keep only what the issue and the cited theorems state plainly; constants and
log factors that the original theorems carry are dropped as documented, so cross-bound
comparisons are comparisons of growth, not of certified values.

**Biases.** The bounds are for bias-free networks. A network with biases is handled exactly by
augmenting the inputs with a constant coordinate: x' = (x, 1), hidden layers
W_i' = [[W_i, b_i], [0, 1]] (the 1 passes through phi since ReLU(1) = 1), last layer
W_L' = [W_L, b_L]; f'(x') = f(x). The bounds are then those of (W_1', ..., W_L') on X' =
[X, 1], which adds 1 to every hidden width and changes the norms (`bias_free_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from nearest_etf.layer_stack import LayerStack
from nearest_etf.metrics import numerical_rank, singular_values

__all__ = [
    "BoundsResult",
    "LayerBound",
    "bartlett_bound",
    "bias_free_weights",
    "generalisation_gap_bound",
    "golowich_bound",
    "network_bounds",
    "neyshabur_bound",
    "rank_aware_bound",
]

DEFAULT_RANK_RTOL = 1e-3


@dataclass(frozen=True)
class LayerBound:
    """One layer's row of the rank-aware bound: W_i [h_i, h_{i-1}], its norms, numerical rank,
    r_i = min_{j<i} rank W_j (None for i = 1), kappa_i = prod_{j != i} ||W_j||_2 and its term
    (||X||_F / m) T_i of the bound (see the module docstring)."""

    layer: int
    shape: tuple[int, int]
    width: int
    spectral_norm: float
    frobenius_norm: float
    rank: int
    r: int | None
    kappa: float
    term: float


@dataclass(frozen=True)
class BoundsResult:
    """All bounds of one network: per-layer rows of the rank-aware bound, and totals.

    m samples, data_norm = ||X||_F, max_input_norm = max_j ||x_j||; rank_aware = the Gaussian
    complexity bound G (Theorem 7), gap = its generalisation-gap bound; golowich, neyshabur,
    bartlett the comparison bounds; settings holds c1, c2, rank_rtol, delta, loss_lipschitz
    and how biases were handled."""

    layers: list[LayerBound]
    m: int
    data_norm: float
    max_input_norm: float
    rank_aware: float
    gap: float
    golowich: float
    neyshabur: float
    bartlett: float
    settings: dict

    @property
    def totals(self) -> dict[str, float]:
        """The bounds by name."""
        names = ("rank_aware", "gap", "golowich", "neyshabur", "bartlett")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict:
        """JSON-able form (layers as a list of dicts)."""
        return asdict(self)


def _check_weights(weights: Sequence[Tensor], X: Tensor | None = None) -> list[Tensor]:
    """float64 copies of 2-D matrices that chain (W_{i+1} has as many columns as W_i rows) and,
    with X [m, h_0], match its width."""
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or not weights:
        raise TypeError("weights must be a non-empty sequence of matrices W_i [h_i, h_{i-1}]")
    mats: list[Tensor] = []
    for i, W in enumerate(weights):
        if not isinstance(W, Tensor) or W.ndim != 2 or 0 in W.shape:
            shape = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
            raise ValueError(f"weights[{i}] must be a non-empty matrix, got {shape}")
        if mats and W.shape[1] != mats[-1].shape[0]:
            raise ValueError(
                f"widths do not chain: weights[{i}] has {W.shape[1]} columns but "
                f"weights[{i - 1}] has {mats[-1].shape[0]} rows"
            )
        mats.append(W.detach().to("cpu", torch.float64))
    if X is not None:
        if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[0] == 0:
            raise ValueError("the data X must be a non-empty matrix [m, h_0] (rows = samples)")
        if X.shape[1] != mats[0].shape[1]:
            raise ValueError(
                f"X has width {X.shape[1]} but weights[0] expects {mats[0].shape[1]} inputs"
            )
    return mats


def _spectral(W: Tensor) -> float:
    return float(singular_values(W)[0])


def _data_scale(X: Tensor) -> tuple[int, float]:
    """(m, ||X||_F / m)."""
    X = X.detach().to("cpu", torch.float64)
    return X.shape[0], float(torch.linalg.matrix_norm(X)) / X.shape[0]


def rank_aware_bound(
    weights: Sequence[Tensor],
    X: Tensor,
    rank_rtol: float = DEFAULT_RANK_RTOL,
    c1: float = 1.0,
    c2: float = 1.0,
) -> tuple[float, list[LayerBound]]:
    """(G, per-layer rows) of Theorem 7 (module docstring) for W_1..W_L and data X [m, h_0]."""
    mats = _check_weights(weights, X)
    if not (c1 > 0 and c2 > 0):
        raise ValueError(f"c1 and c2 must be positive, got {c1=}, {c2=}")
    _, scale = _data_scale(X)
    L = len(mats)
    spectral = [_spectral(W) for W in mats]
    ranks = [numerical_rank(W, rank_rtol) for W in mats]
    rows: list[LayerBound] = []
    for i, W in enumerate(mats):  # i = layer - 1
        frobenius = float(torch.linalg.matrix_norm(W))
        width = W.shape[0]
        kappa = math.prod(spectral[:i] + spectral[i + 1 :])
        if i == 0:
            r = None
            term = frobenius * math.sqrt(width) * math.prod(c1 * s for s in spectral[1:])
        else:
            r = min(ranks[:i])
            term = c1 ** (L - 1 - i) * c2 * 2 * math.sqrt(2 * r) * kappa * frobenius
            term *= math.sqrt(width)
        rows.append(
            LayerBound(
                layer=i + 1,
                shape=(W.shape[0], W.shape[1]),
                width=width,
                spectral_norm=spectral[i],
                frobenius_norm=frobenius,
                rank=ranks[i],
                r=r,
                kappa=kappa,
                term=scale * term,
            )
        )
    return sum(row.term for row in rows), rows


def generalisation_gap_bound(
    gaussian_complexity: float, m: int, delta: float = 0.05, loss_lipschitz: float = 1.0
) -> float:
    """sqrt(L_loss pi) G + sqrt(9 log(2/delta) / (2m)) (module docstring; loss in [0, 1])."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not loss_lipschitz > 0 or not gaussian_complexity >= 0 or m < 1:
        raise ValueError(
            f"need loss_lipschitz > 0, G >= 0, m >= 1; got {loss_lipschitz}, "
            f"{gaussian_complexity}, {m}"
        )
    return math.sqrt(loss_lipschitz * math.pi) * gaussian_complexity + math.sqrt(
        9 * math.log(2 / delta) / (2 * m)
    )


def golowich_bound(weights: Sequence[Tensor], X: Tensor) -> float:
    """(||X||_F / m) (sqrt(2 log(2) L) + 1) prod_i ||W_i||_F (Golowich et al. 2018)."""
    mats = _check_weights(weights, X)
    _, scale = _data_scale(X)
    product = math.prod(float(torch.linalg.matrix_norm(W)) for W in mats)
    return scale * (math.sqrt(2 * math.log(2) * len(mats)) + 1) * product


def neyshabur_bound(weights: Sequence[Tensor], X: Tensor) -> float:
    """(B_X / sqrt(m)) L sqrt(h ln(L h)) prod ||W_i||_2 sqrt(sum ||W_i||_F^2 / ||W_i||_2^2),
    B_X = max row norm of X, h = max_i h_i (Neyshabur et al. 2018; no constants)."""
    mats = _check_weights(weights, X)
    m, L = X.shape[0], len(mats)
    h = max(W.shape[0] for W in mats)
    max_norm = float(torch.linalg.vector_norm(X.to(torch.float64), dim=1).max())
    spectral = [_spectral(W) for W in mats]
    if min(spectral) == 0:
        return 0.0
    stable = sum(
        float(torch.linalg.matrix_norm(W)) ** 2 / s**2 for W, s in zip(mats, spectral, strict=True)
    )
    log_term = math.log(L * h) if L * h > 1 else 0.0
    return (
        max_norm
        / math.sqrt(m)
        * L
        * math.sqrt(h * log_term)
        * math.prod(spectral)
        * (math.sqrt(stable))
    )


def bartlett_bound(weights: Sequence[Tensor], X: Tensor) -> float:
    """(||X||_F / m) prod ||W_i||_2 (sum_i (||W_i^T||_{2,1} / ||W_i||_2)^{2/3})^{3/2}
    (Bartlett et al. 2017, reference matrices 0, no constants or log factors)."""
    mats = _check_weights(weights, X)
    _, scale = _data_scale(X)
    spectral = [_spectral(W) for W in mats]
    if min(spectral) == 0:
        return 0.0
    ratios = [
        float(torch.linalg.vector_norm(W, dim=1).sum()) / s
        for W, s in zip(mats, spectral, strict=True)
    ]
    return scale * math.prod(spectral) * sum(r ** (2 / 3) for r in ratios) ** 1.5


def bias_free_weights(stack: LayerStack) -> tuple[list[Tensor], Tensor]:
    """(W_1', ..., W_L'), X' of the bias-augmented network (module docstring); the stack's own
    weights and inputs when it has no nonzero bias."""
    if not stack.has_bias:
        return list(stack.weights), stack.inputs
    weights: list[Tensor] = []
    for i, (W, b) in enumerate(zip(stack.weights, stack.biases, strict=True)):
        bias = W.new_zeros(W.shape[0]) if b is None else b
        augmented = torch.cat([W, bias[:, None]], dim=1)
        if i < stack.depth - 1:
            unit = W.new_zeros(1, W.shape[1] + 1)
            unit[0, -1] = 1.0
            augmented = torch.cat([augmented, unit], dim=0)
        weights.append(augmented)
    ones = stack.inputs.new_ones(len(stack.inputs), 1)
    return weights, torch.cat([stack.inputs, ones], dim=1)


def network_bounds(
    stack: LayerStack,
    rank_rtol: float = DEFAULT_RANK_RTOL,
    delta: float = 0.05,
    loss_lipschitz: float = 1.0,
    c1: float = 1.0,
    c2: float = 1.0,
) -> BoundsResult:
    """Every bound of the network in `stack` on its training inputs (biases folded in by input
    augmentation, see `bias_free_weights`)."""
    weights, X = bias_free_weights(stack)
    m = X.shape[0]
    G, rows = rank_aware_bound(weights, X, rank_rtol, c1, c2)
    return BoundsResult(
        layers=rows,
        m=m,
        data_norm=float(torch.linalg.matrix_norm(X)),
        max_input_norm=float(torch.linalg.vector_norm(X, dim=1).max()),
        rank_aware=G,
        gap=generalisation_gap_bound(G, m, delta, loss_lipschitz),
        golowich=golowich_bound(weights, X),
        neyshabur=neyshabur_bound(weights, X),
        bartlett=bartlett_bound(weights, X),
        settings={
            "c1": c1,
            "c2": c2,
            "rank_rtol": rank_rtol,
            "delta": delta,
            "loss_lipschitz": loss_lipschitz,
            "biases": "augmented inputs (x, 1)" if stack.has_bias else "none",
        },
    )
