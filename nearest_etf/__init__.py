"""nearest_etf: Riemannian optimisation with implicit differentiation, built around the nearest
simplex equiangular tight frame (ETF) to a set of class means.

The solver and the declarative node, the classifier heads, the class-mean tracker and the
collapse metrics are re-exported here; the ETF layers, layer probes, network
format and generalisation bounds likewise. The experiments live in their modules
(`nearest_etf.ufm`, `nearest_etf.dufm`, `nearest_etf.train`, `nearest_etf.adaptive_etf`,
`nearest_etf.etf_transformer`).
"""

from nearest_etf.bounds import (
    BOUND_NAMES,
    BoundsResult,
    LayerBound,
    bartlett_bound,
    generalisation_gap_bound,
    golowich_bound,
    network_bounds,
    neyshabur_bound,
    rank_aware_bound,
)
from nearest_etf.class_means import AVERAGES, ClassMeanTracker
from nearest_etf.declarative import (
    BACKWARDS,
    Analytic,
    Backward,
    ConjugateGradient,
    DeclarativeNode,
    DenseKKT,
    LinearSolution,
    as_backward,
    conjugate_gradient,
    minimum_norm_solve,
)
from nearest_etf.etf import (
    centering_matrix,
    centre_columns,
    etf_classifier,
    random_stiefel,
    simplex_etf,
)
from nearest_etf.etf_layers import (
    ETF_MODES,
    ETFLinear,
    convert_to_etf,
    etf_weight,
    fix_last_layers,
    nearest_etf_weight,
    trainable_parameters,
)
from nearest_etf.geometry import ConstraintGeometry, geometry_of
from nearest_etf.heads import HEADS, FixedETFHead, ImplicitETFHead, LearnedHead, make_head
from nearest_etf.layer_probe import effective_depth, layer_collapse, layer_outputs
from nearest_etf.layer_stack import LayerStack, layer_stack_of, load_layer_stack, save_layer_stack
from nearest_etf.losses import LOSSES, dot_regression_loss, loss_function, mse_one_hot_loss
from nearest_etf.metrics import (
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
from nearest_etf.nearest import nearest_etf, nearest_etf_objective, procrustes_target
from nearest_etf.polar import polar, polar_vjp
from nearest_etf.solvers import (
    SOLVERS,
    Procrustes,
    RiemannianAdamSolver,
    Solver,
    SolverResult,
    TrustRegions,
    as_solver,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "RiemannianAdam":  # deprecated alias of RiemannianAdamSolver
        from nearest_etf.solvers import deprecated_alias

        return deprecated_alias()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AVERAGES",
    "BACKWARDS",
    "BOUND_NAMES",
    "ETF_MODES",
    "HEADS",
    "LOSSES",
    "SOLVERS",
    "Analytic",
    "Backward",
    "BoundsResult",
    "ClassMeanTracker",
    "CollapseStatistics",
    "ConjugateGradient",
    "ConstraintGeometry",
    "DeclarativeNode",
    "DenseKKT",
    "ETFLinear",
    "FixedETFHead",
    "ImplicitETFHead",
    "LayerBound",
    "LayerStack",
    "LearnedHead",
    "LinearSolution",
    "Procrustes",
    "RiemannianAdamSolver",
    "Solver",
    "SolverResult",
    "TrustRegions",
    "as_backward",
    "as_solver",
    "bartlett_bound",
    "bias_collapse",
    "centering_matrix",
    "centre_columns",
    "class_means",
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
    "generalisation_gap_bound",
    "geometry_of",
    "golowich_bound",
    "layer_collapse",
    "layer_outputs",
    "layer_stack_of",
    "load_layer_stack",
    "loss_function",
    "make_head",
    "minimum_norm_solve",
    "mse_one_hot_loss",
    "nc1",
    "ncc_accuracy",
    "ncc_mismatch",
    "nearest_etf",
    "nearest_etf_distance",
    "nearest_etf_objective",
    "nearest_etf_weight",
    "network_bounds",
    "neyshabur_bound",
    "numerical_rank",
    "orthogonal_frame_distance",
    "polar",
    "polar_vjp",
    "procrustes_target",
    "random_stiefel",
    "rank_aware_bound",
    "rank_of_singular_values",
    "save_layer_stack",
    "self_duality",
    "simplex_etf",
    "singular_values",
    "trainable_parameters",
]
