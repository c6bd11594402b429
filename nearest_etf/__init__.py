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

from nearest_etf import declarative, etf, metrics, nearest, nn, polar_decomposition
from nearest_etf.declarative import *
from nearest_etf.etf import *
from nearest_etf.metrics import *
from nearest_etf.nearest import *
from nearest_etf.nn import *
from nearest_etf.polar_decomposition import *

__version__ = "0.1.0"

__all__ = list(
    dict.fromkeys(
        [
            *etf.__all__,
            *polar_decomposition.__all__,
            *nearest.__all__,
            *declarative.__all__,
            *nn.__all__,
            *metrics.__all__,
        ]
    )
)

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
    if name == "RiemannianAdam":  # the deprecated name of RiemannianAdamSolver
        return declarative.solvers.deprecated_alias()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
