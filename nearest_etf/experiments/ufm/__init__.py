"""The unconstrained features model (UFM) convergence study and the `nearest-etf ufm` command."""

from nearest_etf.experiments.ufm import study
from nearest_etf.experiments.ufm.study import *

__all__ = study.__all__
