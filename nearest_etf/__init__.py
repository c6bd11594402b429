"""nearest_etf: Riemannian optimisation with implicit differentiation, built around the nearest
simplex equiangular tight frame (ETF) to a set of class means."""

from nearest_etf.declarative import BACKWARD_MODES, DeclarativeNode, Solver, conjugate_gradient
from nearest_etf.etf import centering_matrix, etf_classifier, random_stiefel, simplex_etf
from nearest_etf.geometry import ConstraintGeometry, geometry_of
from nearest_etf.nearest import (
    BACKWARDS,
    SOLVERS,
    nearest_etf,
    nearest_etf_objective,
    procrustes_target,
)
from nearest_etf.polar import polar, polar_vjp
from nearest_etf.solvers import RiemannianAdam, TrustRegions

__version__ = "0.1.0"

__all__ = [
    "BACKWARDS",
    "BACKWARD_MODES",
    "SOLVERS",
    "ConstraintGeometry",
    "DeclarativeNode",
    "RiemannianAdam",
    "Solver",
    "TrustRegions",
    "centering_matrix",
    "conjugate_gradient",
    "etf_classifier",
    "geometry_of",
    "nearest_etf",
    "nearest_etf_objective",
    "polar",
    "polar_vjp",
    "procrustes_target",
    "random_stiefel",
    "simplex_etf",
]
