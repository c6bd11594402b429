"""Neural-collapse and spectral metrics on plain tensors (docs/math.md §4), streamed over data
loaders, and per-layer probes of a network."""

from nearest_etf.metrics.collapse import (
    CollapseStatistics,
    bias_collapse,
    class_means,
    classifier_etf_distance,
    collapse_metrics,
    cosine_margin,
    effective_rank,
    equinorm,
    etf_distance,
    nc1,
    ncc_accuracy,
    ncc_mismatch,
    nearest_etf_distance,
    numerical_rank,
    orthogonal_frame_distance,
    rank_of_singular_values,
    self_duality,
    singular_values,
)
from nearest_etf.metrics.layer_probe import (
    effective_depth,
    layer_collapse,
    layer_outputs,
)

__all__ = [
    "CollapseStatistics",
    "bias_collapse",
    "class_means",
    "classifier_etf_distance",
    "collapse_metrics",
    "cosine_margin",
    "effective_depth",
    "effective_rank",
    "equinorm",
    "etf_distance",
    "layer_collapse",
    "layer_outputs",
    "nc1",
    "ncc_accuracy",
    "ncc_mismatch",
    "nearest_etf_distance",
    "numerical_rank",
    "orthogonal_frame_distance",
    "rank_of_singular_values",
    "self_duality",
    "singular_values",
]
