"""The declarative-node layer: y*(x) = argmin over a geoopt manifold of f(x, y), differentiated
implicitly (docs/math.md §2c), with its constraint geometry and its generic Riemannian solvers."""

from nearest_etf.declarative.geometry import (
    ConstraintGeometry,
    geometry_of,
)
from nearest_etf.declarative.node import (
    BACKWARD_MODES,
    DeclarativeNode,
    Inputs,
    Objective,
    Solver,
)
from nearest_etf.declarative.solvers import (
    RiemannianAdam,
    TrustRegions,
)

__all__ = [
    "BACKWARD_MODES",
    "ConstraintGeometry",
    "DeclarativeNode",
    "Inputs",
    "Objective",
    "RiemannianAdam",
    "Solver",
    "TrustRegions",
    "geometry_of",
]
