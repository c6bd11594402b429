"""Generalisation bounds of trained networks (rank-aware and norm-based) and the
`nearest-etf bounds` command."""

from nearest_etf.experiments.bounds import generalisation
from nearest_etf.experiments.bounds.generalisation import *

__all__ = generalisation.__all__
