"""Deep unconstrained features model (DUFM) simulator: training, DNC/SRG references, analysis.

Reproduces Sukenik, Mondelli & Lampert (NeurIPS 2024), "Neural Collapse versus Low-rank Bias:
Is Deep Neural Collapse Really Optimal?". See docs/dufm.md.
"""

from nearest_etf.experiments.dufm.analysis import LayerStats, analyse_layers
from nearest_etf.experiments.dufm.cli import add_parser
from nearest_etf.experiments.dufm.model import DUFMProblem, LossParts
from nearest_etf.experiments.dufm.reference import (
    ReferenceLosses,
    dnc_loss,
    dnc_point,
    optimise_locally,
    reference_losses,
    srg_point,
)
from nearest_etf.experiments.dufm.run import run_experiment
from nearest_etf.experiments.dufm.sweep import SweepGrid, run_sweep
from nearest_etf.experiments.dufm.train import DUFMConfig, TrainResult, train_dufm

__all__ = [
    "DUFMConfig",
    "DUFMProblem",
    "LayerStats",
    "LossParts",
    "ReferenceLosses",
    "SweepGrid",
    "TrainResult",
    "add_parser",
    "analyse_layers",
    "dnc_loss",
    "dnc_point",
    "optimise_locally",
    "reference_losses",
    "run_experiment",
    "run_sweep",
    "srg_point",
    "train_dufm",
]
