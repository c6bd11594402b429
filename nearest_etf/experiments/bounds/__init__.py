"""Generalisation bounds of trained networks (rank-aware and norm-based) and the
`nearest-etf bounds` command."""

from nearest_etf.experiments.bounds.generalisation import (
    BOUND_NAMES,
    BoundsResult,
    LayerBound,
    bartlett_bound,
    bias_free_weights,
    generalisation_gap_bound,
    golowich_bound,
    network_bounds,
    neyshabur_bound,
    rank_aware_bound,
)

__all__ = [
    "BOUND_NAMES",
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
