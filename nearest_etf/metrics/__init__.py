"""Neural-collapse and spectral metrics on plain tensors (docs/math.md §4, docs/metrics.md),
streamed over data loaders, and per-layer probes of a network."""

from nearest_etf.metrics import collapse, layer_probe
from nearest_etf.metrics.collapse import *
from nearest_etf.metrics.layer_probe import *

__all__ = [*collapse.__all__, *layer_probe.__all__]
