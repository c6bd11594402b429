"""Norm- and rank-based complexity bounds of a trained feed-forward network.

The network is f(x) = W_L phi(W_{L-1} ... phi(W_1 x)) with W_i [h_i, h_{i-1}] (h_0 = input
width, h_i = out_i = rows of W_i, the width of layer i), phi 1-Lipschitz (ReLU or identity),
and the m training inputs are the rows of X [m, h_0]. All norms are of the trained matrices
(the bounds hold for the class with B_i = ||W_i||_2 etc. set to the trained values; no union
bound over these values is taken). ||.||_2 is the spectral norm, ||.||_F the Frobenius norm,
rank = `nearest_etf.metrics.collapse.numerical_rank` at relative tolerance `rank_rtol`.

**Rank-aware bound** (Pinto, Rangamani & Poggio, ALT 2025, arXiv 2411.13733, Theorem 7; Maurer's
chain rule for Gaussian complexity) on the empirical Gaussian complexity of the class with
||W_i||_2 <= B_i, rank W_i <= r_i:

    G <= (||X||_F / m) [ T_1 + sum_{i=2..L} T_i ],
    T_1 = ||W_1||_F sqrt(h_1) prod_{i>=2} C1 ||W_i||_2,
    T_i = C1^{L-i} C2 2 sqrt(2 r_i) kappa_i ||W_i||_F sqrt(h_i),
    r_i = min_{j<i} rank W_j,  kappa_i = prod_{j != i} ||W_j||_2.

C1, C2 are universal constants the paper leaves unspecified; every figure here uses the
arguments `c1`, `c2` (of `BoundSettings`; default 1, i.e. reported with C1 = C2 = 1, which is NOT
a proven value: the figures are the bound's shape, not a certified number). The per-layer
`term` reported is (||X||_F / m) T_i, so the terms sum to G.

**Generalisation gap.** The reported `gap` is the form attributed to Pinto et al.'s rank-aware
bound (its full text was not available here to check it). For a loss
that is L_loss-Lipschitz in the network output and takes values in [0, 1], with probability
>= 1 - delta over the m samples:

    gap <= sqrt(L_loss pi) G + sqrt(9 log(2/delta) / (2m)).

This is NOT what the textbook chain gives: R <= sqrt(pi/2) G (Rademacher from Gaussian
complexity), the contraction R(loss o F) <= L_loss R(F) and gap <= 2 R + 3 sqrt(log(2/delta) /
(2m)) give sqrt(2 pi) L_loss G for the first term, larger than the attributed form by the factor
sqrt(2 L_loss) (sqrt(2) for L_loss = 1). The confidence terms agree. Only the attributed form is
computed here.

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

The comparison forms keep only what the cited theorems state plainly; constants and
log factors that the original theorems carry are dropped as documented, so cross-bound
comparisons are comparisons of growth, not of certified values.

**Biases.** The bounds are for bias-free networks. A network with biases is handled exactly by
augmenting the inputs with a constant coordinate: x' = (x, 1), hidden layers
W_i' = [[W_i, b_i], [0, 1]] (the 1 passes through phi since ReLU(1) = 1), last layer
W_L' = [W_L, b_L]; f'(x') = f(x). The bounds are then those of (W_1', ..., W_L') on X' =
[X, 1], which adds 1 to every hidden width and to the input width, and changes the norms
(`bias_free_weights`). The exact rank of each hidden layer grows by 1 ([[W_i, b_i], [0, 1]] has
rank W_i + 1); the last layer's [W_L, b_L] gains 0 or 1 (0 when b_L is in the span of W_L's
columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from nearest_etf._validation import as_float64, scale_safe_norm
from nearest_etf.experiments.layer_stack import LayerStack
from nearest_etf.metrics.collapse import RANK_RTOL, rank_of_singular_values, singular_values

__all__ = [
    "BOUND_NAMES",
    "BoundSettings",
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


BOUND_NAMES = ("rank_aware", "gap", "golowich", "neyshabur", "bartlett")
"""The bounds of a `BoundsResult`, by attribute name, in reporting order."""


@dataclass(frozen=True)
class BoundSettings:
    """The constants of the bounds of a network (`network_bounds`): C1, C2 of the rank-aware
    bound (Theorem 7; unspecified by the paper, 1 by default), the relative tolerance of the
    numerical ranks, and the confidence 1 - delta and loss Lipschitz constant of the
    generalisation gap."""

    c1: float = 1.0
    c2: float = 1.0
    rank_rtol: float = RANK_RTOL
    delta: float = 0.05
    loss_lipschitz: float = 1.0


@dataclass(frozen=True)
class LayerBound:
    """One layer's row of the rank-aware bound: W_i [h_i, h_{i-1}], its norms, numerical rank,
    r_i = min_{j<i} rank W_j (None for i = 1), kappa_i = prod_{j != i} ||W_j||_2 and its term
    (||X||_F / m) T_i of the bound (see the module docstring); width = h_i = shape[0]."""

    layer: int
    shape: tuple[int, int]
    spectral_norm: float
    frobenius_norm: float
    rank: int
    r: int | None
    kappa: float
    term: float

    @property
    def width(self) -> int:
        """h_i, the rows of W_i."""
        return self.shape[0]

    def to_dict(self) -> dict:
        """JSON-able form, with width after shape."""
        fields = asdict(self)  # "layer" and "shape" first, so width lands right after shape
        return {"layer": self.layer, "shape": fields.pop("shape"), "width": self.width} | fields


@dataclass(frozen=True)
class BoundsResult:
    """All bounds of one network: per-layer rows of the rank-aware bound, and totals.

    m samples, data_norm = ||X||_F, max_input_norm = max_j ||x_j||; rank_aware = the Gaussian
    complexity bound G (Theorem 7), gap = its generalisation-gap bound; golowich, neyshabur,
    bartlett the comparison bounds; settings holds the `BoundSettings` (c1, c2, rank_rtol,
    delta, loss_lipschitz) and how biases were handled."""

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
        """The bounds by name (`BOUND_NAMES`)."""
        return {name: getattr(self, name) for name in BOUND_NAMES}

    def to_dict(self) -> dict:
        """JSON-able form (layers as a list of dicts, `LayerBound.to_dict`)."""
        return asdict(self) | {"layers": [layer.to_dict() for layer in self.layers]}


@dataclass(frozen=True)
class _Matrix:
    """The statistics of one W_i [h_i, h_{i-1}] that the bounds use (one SVD)."""

    shape: tuple[int, int]
    singular_values: Tensor
    spectral: float
    frobenius: float
    row_norm_sum: float  # ||W^T||_{2,1}


@dataclass(frozen=True)
class _Data:
    """m, ||X||_F and max_j ||x_j|| of the data X [m, h_0]."""

    m: int
    frobenius: float
    max_row_norm: float

    @property
    def scale(self) -> float:
        """||X||_F / m."""
        return self.frobenius / self.m


def _check_weights(weights: Sequence[Tensor], X: Tensor | None = None) -> list[Tensor]:
    """float64 copies of real, finite 2-D matrices that chain (W_{i+1} has as many columns as
    W_i rows) and, with X [m, h_0] (real, finite), match its width."""
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
        mats.append(as_float64(f"weights[{i}]", W))
    if X is not None:
        if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[0] == 0:
            raise ValueError("the data X must be a non-empty matrix [m, h_0] (rows = samples)")
        as_float64("X", X)
        if X.shape[1] != mats[0].shape[1]:
            raise ValueError(
                f"X has width {X.shape[1]} but weights[0] expects {mats[0].shape[1]} inputs"
            )
    return mats


def _data_stats(X: Tensor) -> tuple[int, float, float]:
    """(m, ||X||_F, max_j ||x_j||) of X [m, h_0], in float64 and without autograd; the norms
    scale-safe (no overflow of the squares of entries beyond 1e154)."""
    X = as_float64("X", X)
    frobenius = float(scale_safe_norm(X, (0, 1)))
    return X.shape[0], frobenius, float(scale_safe_norm(X, 1).max())


def _prepare(weights: Sequence[Tensor], X: Tensor) -> tuple[list[_Matrix], _Data]:
    """Checked statistics of W_1..W_L (one SVD each) and of X."""
    matrices = []
    for W in _check_weights(weights, X):
        s = singular_values(W)
        matrices.append(
            _Matrix(
                shape=(W.shape[0], W.shape[1]),
                singular_values=s,
                spectral=float(s[0]),
                frobenius=float(scale_safe_norm(W, (0, 1))),
                row_norm_sum=float(scale_safe_norm(W, 1).sum()),
            )
        )
    return matrices, _Data(*_data_stats(X))


def _rank_aware(
    mats: list[_Matrix], data: _Data, rank_rtol: float, c1: float, c2: float
) -> tuple[float, list[LayerBound]]:
    if not (c1 > 0 and c2 > 0):
        raise ValueError(f"c1 and c2 must be positive, got {c1=}, {c2=}")
    L = len(mats)
    spectral = [W.spectral for W in mats]
    ranks = [rank_of_singular_values(W.singular_values, rank_rtol) for W in mats]
    rows: list[LayerBound] = []
    for i, W in enumerate(mats):  # i = layer - 1
        width = W.shape[0]
        kappa = math.prod(spectral[:i] + spectral[i + 1 :], start=1.0)
        if i == 0:
            r = None
            term = W.frobenius * math.sqrt(width) * math.prod(c1 * s for s in spectral[1:])
        else:
            r = min(ranks[:i])
            term = c1 ** (L - 1 - i) * c2 * 2 * math.sqrt(2 * r) * kappa * W.frobenius
            term *= math.sqrt(width)
        rows.append(
            LayerBound(
                layer=i + 1,
                shape=W.shape,
                spectral_norm=spectral[i],
                frobenius_norm=W.frobenius,
                rank=ranks[i],
                r=r,
                kappa=kappa,
                term=data.scale * term,
            )
        )
    return sum(row.term for row in rows), rows


def _golowich(mats: list[_Matrix], data: _Data) -> float:
    product = math.prod(W.frobenius for W in mats)
    return data.scale * (math.sqrt(2 * math.log(2) * len(mats)) + 1) * product


def _neyshabur(mats: list[_Matrix], data: _Data) -> float:
    L = len(mats)
    h = max(W.shape[0] for W in mats)
    spectral = [W.spectral for W in mats]
    if min(spectral) == 0:
        return 0.0
    stable = sum(W.frobenius**2 / W.spectral**2 for W in mats)
    # L, h >= 1, so ln(L h) >= 0 (and 0 for a single 1-row layer)
    return (
        data.max_row_norm
        / math.sqrt(data.m)
        * L
        * math.sqrt(h * math.log(L * h))
        * math.prod(spectral)
        * math.sqrt(stable)
    )


def _bartlett(mats: list[_Matrix], data: _Data) -> float:
    spectral = [W.spectral for W in mats]
    if min(spectral) == 0:
        return 0.0
    ratios = [W.row_norm_sum / W.spectral for W in mats]
    return data.scale * math.prod(spectral) * sum(r ** (2 / 3) for r in ratios) ** 1.5


def rank_aware_bound(
    weights: Sequence[Tensor],
    X: Tensor,
    rank_rtol: float = RANK_RTOL,
    c1: float = 1.0,
    c2: float = 1.0,
) -> tuple[float, list[LayerBound]]:
    """(G, per-layer rows) of Theorem 7 (module docstring) for W_1..W_L and data X [m, h_0]."""
    return _rank_aware(*_prepare(weights, X), rank_rtol, c1, c2)


def generalisation_gap_bound(
    gaussian_complexity: float, m: int, delta: float = 0.05, loss_lipschitz: float = 1.0
) -> float:
    """sqrt(L_loss pi) G + sqrt(9 log(2/delta) / (2m)), loss in [0, 1]: the form attributed to
    Pinto et al. (the textbook chain gives sqrt(2 pi) L_loss G for the first term; see the
    module docstring)."""
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
    return _golowich(*_prepare(weights, X))


def neyshabur_bound(weights: Sequence[Tensor], X: Tensor) -> float:
    """(B_X / sqrt(m)) L sqrt(h ln(L h)) prod ||W_i||_2 sqrt(sum ||W_i||_F^2 / ||W_i||_2^2),
    B_X = max row norm of X, h = max_i h_i (Neyshabur et al. 2018; no constants)."""
    return _neyshabur(*_prepare(weights, X))


def bartlett_bound(weights: Sequence[Tensor], X: Tensor) -> float:
    """(||X||_F / m) prod ||W_i||_2 (sum_i (||W_i^T||_{2,1} / ||W_i||_2)^{2/3})^{3/2}
    (Bartlett et al. 2017, reference matrices 0, no constants or log factors)."""
    return _bartlett(*_prepare(weights, X))


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


def network_bounds(stack: LayerStack, settings: BoundSettings = BoundSettings()) -> BoundsResult:
    """Every bound of the network in `stack` on its training inputs (biases folded in by input
    augmentation, see `bias_free_weights`) with the constants `settings`; one SVD per weight
    matrix."""
    mats, data = _prepare(*bias_free_weights(stack))
    s = settings
    G, rows = _rank_aware(mats, data, s.rank_rtol, s.c1, s.c2)
    return BoundsResult(
        layers=rows,
        m=data.m,
        data_norm=data.frobenius,
        max_input_norm=data.max_row_norm,
        rank_aware=G,
        gap=generalisation_gap_bound(G, data.m, s.delta, s.loss_lipschitz),
        golowich=_golowich(mats, data),
        neyshabur=_neyshabur(mats, data),
        bartlett=_bartlett(mats, data),
        settings=asdict(s) | {"biases": "augmented inputs (x, 1)" if stack.has_bias else "none"},
    )
