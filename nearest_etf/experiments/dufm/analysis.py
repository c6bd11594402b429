"""Per-layer neural-collapse analysis of a DUFM point.

For every representation (H_1, then Z_l = W_l H_l before and H_{l+1} = ReLU(Z_l) after each ReLU,
then the output Z_L), with class means M [K, d] (uncentred, rows = classes):
singular values of M, numerical rank #{s_i > rtol s_max}, effective rank, NC1 (pseudo-inverse
cut-off rtol^2 relative to the top eigenvalue of Sigma_B, whose eigenvalues are squared singular
values), distance to a simplex ETF of the centred means and to an orthogonal frame of M
(formulas in nearest_etf.metrics.collapse). Undefined entries (all class means equal up to
||Mbar|| <= 1e-12 ||M||, e.g. a dead layer) are NaN. When the largest singular value is so small
that rtol * s_max is not a normal float (e.g. class means decayed to ~1e-320, whose singular
values are rounding noise) or is non-finite, the rank is undefined: `rank` is None and the other
statistics are NaN. The same holds, before anything is computed, when the largest feature entry
is non-finite or that small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import Tensor, finfo

from nearest_etf import metrics
from nearest_etf._validation import scale_safe_norm
from nearest_etf.experiments.dufm.model import DUFMProblem

__all__ = ["DUFM_RANK_RTOL", "LayerStats", "analyse_layers", "hidden_ranks", "is_dnc"]

# The DUFM's rank cut-off, looser than metrics.RANK_RTOL: after a ReLU the class means of a
# low-rank pre-activation keep a small tail of singular values (docs/dufm.md, "Why rtol").
DUFM_RANK_RTOL = 1e-2
_COLLAPSED_RTOL = 1e-12  # centred means this small (relative) count as one point


@dataclass(frozen=True)
class LayerStats:
    """Collapse statistics of one representation's class means."""

    name: str
    singular_values: list[float]
    rank: int | None
    effective_rank: float
    nc1: float
    etf_distance: float
    orthogonal_frame_distance: float

    def to_dict(self) -> dict:
        return asdict(self)


def _resolvable(s_max: float, rtol: float, tiny: float) -> bool:
    """Whether a rank with cut-off rtol * s_max means anything: s_max finite and either zero
    (rank 0) or with rtol * s_max a normal float (at least `tiny`, the dtype's smallest)."""
    return math.isfinite(s_max) and (s_max == 0.0 or rtol * s_max >= tiny)


def analyse_layers(
    problem: DUFMProblem, params: Sequence[Tensor], rtol: float = DUFM_RANK_RTOL
) -> list[LayerStats]:
    """LayerStats of H1, Z1, H2, ..., Z{L} (see `DUFMProblem.representations`)."""
    stats = []
    K = problem.classes
    for name, rep in problem.representations(params):
        features = rep.detach().T
        tiny = finfo(features.dtype).tiny
        if not _resolvable(float(features.abs().max()), rtol, tiny):
            stats.append(_undefined(name, K))
            continue
        means, _ = metrics.class_means(features, problem.labels, K)
        s = metrics.singular_values(means)
        if not _resolvable(float(s[0]), rtol, tiny):
            stats.append(_undefined(name, K, [float(v) for v in s]))
            continue
        zero = float(s[0]) == 0.0
        spread = scale_safe_norm(means - means.mean(dim=0), (0, 1))
        collapsed = float(spread) <= _COLLAPSED_RTOL * float(scale_safe_norm(means, (0, 1)))
        stats.append(
            LayerStats(
                name=name,
                singular_values=[float(v) for v in s],
                rank=metrics.numerical_rank(means, rtol),
                effective_rank=math.nan if zero else metrics.effective_rank(means),
                nc1=(
                    math.nan
                    if collapsed
                    else float(metrics.nc1(features, problem.labels, K, rtol=rtol**2))
                ),
                etf_distance=math.nan if collapsed else float(metrics.etf_distance(means)),
                orthogonal_frame_distance=(
                    math.nan if zero else float(metrics.orthogonal_frame_distance(means))
                ),
            )
        )
    return stats


def _undefined(name: str, classes: int, values: Sequence[float] | None = None) -> LayerStats:
    """LayerStats without a meaningful rank (non-finite or unresolvably small class means)."""
    return LayerStats(
        name=name,
        singular_values=list(values) if values is not None else [math.nan] * classes,
        rank=None,
        effective_rank=math.nan,
        nc1=math.nan,
        etf_distance=math.nan,
        orthogonal_frame_distance=math.nan,
    )


def hidden_ranks(stats: Sequence[LayerStats]) -> dict[str, int | None]:
    """Numerical ranks of the class means of H_1..H_L (inputs of W_1..W_L); None where the rank
    is undefined."""
    return {s.name: s.rank for s in stats if s.name.startswith("H")}


def is_dnc(stats: Sequence[LayerStats], classes: int) -> bool:
    """True when every H_l has class means of full rank K (a DNC-like solution)."""
    return all(rank == classes for rank in hidden_ranks(stats).values())
