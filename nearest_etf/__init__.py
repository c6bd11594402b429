"""nearest_etf: Riemannian optimisation with implicit differentiation, built around the nearest
simplex equiangular tight frame (ETF) to a set of class means (Markou, Ajanthan & Gould,
NeurIPS 2024).

Layers (docs/design.md): the core maths (`etf`, `polar_decomposition`, `nearest`), the
declarative node (`nearest_etf.declarative`), the PyTorch layers (`nearest_etf.nn`), the metrics
(`nearest_etf.metrics`) and the experiments with the command line (`nearest_etf.experiments`).
The public API of the first four is re-exported here; the experiments are imported from their
package.
"""

import importlib
import warnings

from nearest_etf.declarative.geometry import ConstraintGeometry, geometry_of
from nearest_etf.declarative.node import BACKWARD_MODES, DeclarativeNode, Solver, conjugate_gradient
from nearest_etf.declarative.solvers import RiemannianAdam, TrustRegions
from nearest_etf.etf import (
    centering_matrix,
    centre_columns,
    etf_classifier,
    random_stiefel,
    simplex_etf,
)
from nearest_etf.metrics.collapse import (
    CollapseStatistics,
    bias_collapse,
    class_means,
    class_numerical_rank,
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
    self_duality_product,
    singular_values,
    variability_collapse_index,
)
from nearest_etf.metrics.layer_probe import effective_depth, layer_collapse, layer_outputs
from nearest_etf.nearest import (
    BACKWARDS,
    SOLVERS,
    nearest_etf,
    nearest_etf_objective,
    procrustes_target,
)
from nearest_etf.nn.class_means import AVERAGES, ClassMeanTracker
from nearest_etf.nn.etf_layers import (
    ETF_MODES,
    ETFLinear,
    convert_to_etf,
    etf_weight,
    fix_last_layers,
    nearest_etf_weight,
    trainable_parameters,
)
from nearest_etf.nn.heads import HEADS, FixedETFHead, ImplicitETFHead, LearnedHead, make_head
from nearest_etf.nn.losses import LOSSES, dot_regression_loss, loss_function, mse_one_hot_loss
from nearest_etf.polar_decomposition import polar, polar_vjp

__version__ = "0.1.0"

__all__ = [
    "AVERAGES",
    "BACKWARDS",
    "BACKWARD_MODES",
    "ETF_MODES",
    "HEADS",
    "LOSSES",
    "SOLVERS",
    "ClassMeanTracker",
    "CollapseStatistics",
    "ConstraintGeometry",
    "DeclarativeNode",
    "ETFLinear",
    "FixedETFHead",
    "ImplicitETFHead",
    "LearnedHead",
    "RiemannianAdam",
    "Solver",
    "TrustRegions",
    "bias_collapse",
    "centering_matrix",
    "centre_columns",
    "class_means",
    "class_numerical_rank",
    "classifier_etf_distance",
    "collapse_metrics",
    "conjugate_gradient",
    "convert_to_etf",
    "cosine_margin",
    "dot_regression_loss",
    "effective_depth",
    "effective_rank",
    "equinorm",
    "etf_classifier",
    "etf_distance",
    "etf_weight",
    "fix_last_layers",
    "geometry_of",
    "layer_collapse",
    "layer_outputs",
    "loss_function",
    "make_head",
    "mse_one_hot_loss",
    "nc1",
    "ncc_accuracy",
    "ncc_mismatch",
    "nearest_etf",
    "nearest_etf_distance",
    "nearest_etf_objective",
    "nearest_etf_weight",
    "numerical_rank",
    "orthogonal_frame_distance",
    "polar",
    "polar_vjp",
    "procrustes_target",
    "random_stiefel",
    "rank_of_singular_values",
    "self_duality",
    "self_duality_product",
    "simplex_etf",
    "singular_values",
    "trainable_parameters",
    "variability_collapse_index",
]

# Names that moved to nearest_etf.experiments: importable from here, with a warning, for one
# release.
_MOVED = {
    "BOUND_NAMES": "nearest_etf.experiments.bounds",
    "BoundsResult": "nearest_etf.experiments.bounds",
    "LayerBound": "nearest_etf.experiments.bounds",
    "bartlett_bound": "nearest_etf.experiments.bounds",
    "generalisation_gap_bound": "nearest_etf.experiments.bounds",
    "golowich_bound": "nearest_etf.experiments.bounds",
    "network_bounds": "nearest_etf.experiments.bounds",
    "neyshabur_bound": "nearest_etf.experiments.bounds",
    "rank_aware_bound": "nearest_etf.experiments.bounds",
    "LayerStack": "nearest_etf.experiments.layer_stack",
    "layer_stack_of": "nearest_etf.experiments.layer_stack",
    "load_layer_stack": "nearest_etf.experiments.layer_stack",
    "save_layer_stack": "nearest_etf.experiments.layer_stack",
}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        warnings.warn(
            f"nearest_etf.{name} moved to {_MOVED[name]}.{name}; the top-level name will "
            "be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'nearest_etf' has no attribute {name!r}")
