"""The declarative-node layer: y*(x) = argmin over a geoopt manifold of f(x, y), differentiated
implicitly (docs/math.md §2c), with its constraint geometry, its backward methods and its
generic Riemannian solvers."""

from nearest_etf.declarative import geometry, node, solvers
from nearest_etf.declarative.geometry import *
from nearest_etf.declarative.node import *
from nearest_etf.declarative.solvers import *

__all__ = [*geometry.__all__, *node.__all__, *solvers.__all__]


def __getattr__(name: str) -> object:
    if name == "RiemannianAdam":  # the deprecated name of RiemannianAdamSolver
        return solvers.deprecated_alias()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
