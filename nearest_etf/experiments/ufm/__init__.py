"""The unconstrained features model (UFM) convergence study and the `nearest-etf ufm` command."""

from nearest_etf.experiments.ufm.study import (
    METHODS,
    METRICS,
    OPTIMIZERS,
    UFM,
    Study,
    UFMConfig,
    UFMRun,
    etf_loss_floor,
    first_crossing,
    run_study,
    run_ufm,
    selection_score,
    step_metrics,
    summarise_study,
    thresholds,
    ufm_head,
)

__all__ = [
    "METHODS",
    "METRICS",
    "OPTIMIZERS",
    "UFM",
    "Study",
    "UFMConfig",
    "UFMRun",
    "etf_loss_floor",
    "first_crossing",
    "run_study",
    "run_ufm",
    "selection_score",
    "step_metrics",
    "summarise_study",
    "thresholds",
    "ufm_head",
]
