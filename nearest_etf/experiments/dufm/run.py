"""One DUFM experiment end to end: train, evaluate references, analyse layers, write outputs.

A diverged run (`train.TrainResult.diverged`) is a result: its summary row has the step and the
reason, its loss curve up to that step is written, and everything computed from its final point
(the layer analysis, ranks, loss over L_DNC, the network file) is skipped (None; found_dnc is
False).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from nearest_etf.experiments._common.results import write_csv
from nearest_etf.experiments._common.runs import write_json
from nearest_etf.experiments.dufm.analysis import (
    DUFM_RANK_RTOL,
    LayerStats,
    analyse_layers,
    hidden_ranks,
    is_dnc,
)
from nearest_etf.experiments.dufm.model import DUFMProblem
from nearest_etf.experiments.dufm.reference import ReferenceLosses, reference_losses
from nearest_etf.experiments.dufm.train import (
    CONVERGED_RTOL,
    DUFMConfig,
    TrainResult,
    train_dufm,
)
from nearest_etf.experiments.layer_stack import LayerStack, save_layer_stack

_DNC_LOSS_RTOL = 1.01

__all__ = [
    "cached_reference_losses",
    "layer_stack_of_dufm",
    "run_and_summarise",
    "run_experiment",
    "summarise",
]


@functools.lru_cache(maxsize=64)
def _references(
    layers: int, classes: int, width: int, per_class: int, lambda_h: float, lambda_w: tuple
) -> ReferenceLosses:
    return reference_losses(DUFMProblem(layers, classes, width, per_class, lambda_h, lambda_w))


def cached_reference_losses(problem: DUFMProblem) -> ReferenceLosses:
    """`reference_losses` memoised per (L, K, d, n, lambdas) within the process (float64)."""
    return _references(
        problem.layers,
        problem.classes,
        problem.width,
        problem.per_class,
        problem.lambda_h,
        problem.lambda_w,
    )


def summarise(
    result: TrainResult, refs: ReferenceLosses, rank_rtol: float = DUFM_RANK_RTOL
) -> dict:
    """Flat summary of a run: config, loss split, references, ranks of H_1..H_L, DNC flag.

    inner_rank = mean numerical rank of the class means of H_1..H_{L-1} (None if one is
    undefined); found_dnc = every H_l has full rank K and the loss is within 1% of L_DNC (full
    relative rank alone is also met by runs decaying to the trivial zero solution);
    loss_change = `TrainResult.loss_change`, converged = loss_change <= CONVERGED_RTOL. For a
    diverged run: the last recorded loss, diverged_step, divergence, and None for everything
    computed from the final point.
    """
    problem = result.config.problem()
    stats = None if result.diverged else analyse_layers(problem, result.params, rank_rtol)
    return _summary(result, refs, rank_rtol, stats)


def _summary(
    result: TrainResult,
    refs: ReferenceLosses,
    rank_rtol: float,
    stats: Sequence[LayerStats] | None,
) -> dict:
    """`summarise` with the `analyse_layers` result at `rank_rtol` already computed (None for
    a diverged run)."""
    problem = result.config.problem()
    names = [f"H{layer}" for layer in range(1, problem.layers + 1)]
    ranks = dict.fromkeys(names) if stats is None else hidden_ranks(stats)
    inner = [ranks[f"H{layer}"] for layer in range(1, problem.layers)]
    inner_rank = None if None in inner else sum(inner) / len(inner)  # type: ignore[arg-type]
    if result.diverged:  # the last recorded loss (the final point may not be finite)
        fit, reg = result.fit[-1], result.reg[-1]
    else:
        fit, reg = result.final.fit, result.final.reg
    change = result.loss_change()
    meaningful = stats is not None
    return {
        **asdict(result.config),
        "fit": fit,
        "reg": reg,
        "loss": fit + reg,
        "dnc_loss": refs.dnc,
        "srg_loss": refs.srg,
        "loss_over_dnc": (fit + reg) / refs.dnc if meaningful else None,
        **{f"rank_{name}": rank for name, rank in ranks.items()},
        "inner_rank": inner_rank,
        "found_dnc": meaningful
        and is_dnc(stats, problem.classes)  # type: ignore[arg-type]
        and fit + reg <= _DNC_LOSS_RTOL * refs.dnc,
        "rank_rtol": rank_rtol,
        "diverged": result.diverged,
        "diverged_step": result.diverged_step,
        "divergence": result.divergence,
        "loss_change": None if math.isnan(change) else change,
        "converged": None if math.isnan(change) else change <= CONVERGED_RTOL,
        "seconds": result.seconds,
    }


def run_and_summarise(config: DUFMConfig, rank_rtol: float = DUFM_RANK_RTOL) -> dict:
    """Train one configuration and return its `summarise` row (the sweep's unit of work)."""
    result = train_dufm(config)
    return summarise(result, cached_reference_losses(config.problem()), rank_rtol)


def layer_stack_of_dufm(
    problem: DUFMProblem, params: Sequence[Tensor], meta: dict | None = None
) -> LayerStack:
    """A DUFM point [H_1, W_1..W_L] as a network: weights W_1..W_L, ReLU between layers, no
    biases, and the free features as the data, inputs X = H_1^T [N, d] with labels j // n."""
    problem.check_params(params)
    H1, *weights = params
    return LayerStack(weights, [None] * len(weights), H1.T, problem.labels, dict(meta or {}))


def run_experiment(
    config: DUFMConfig,
    out: Path,
    rank_rtol: float = DUFM_RANK_RTOL,
    progress: bool = True,
    figure_format: str = "png",
) -> dict:
    """Train with a progress bar and write to ``out``: loss_curve.csv, summary.json,
    the figure loss_curve and, unless the run diverged, layers.csv, the figure singular_values
    and network.pt (`layer_stack_of_dufm`, for `nearest-etf bounds`); figures as .png or
    ``figure_format``. Returns the summary."""
    from nearest_etf.experiments.dufm.plots import plot_loss_curve, plot_singular_values

    out.mkdir(parents=True, exist_ok=True)
    result = train_dufm(config, progress=progress)
    problem = config.problem()
    refs = cached_reference_losses(problem)
    stats = None if result.diverged else analyse_layers(problem, result.params, rank_rtol)
    summary = _summary(result, refs, rank_rtol, stats)
    summary["srg_construction_loss"] = refs.srg_construction
    summary["srg_over_dnc"] = refs.srg_over_dnc
    summary["layers_analysis"] = None if stats is None else [s.to_dict() for s in stats]
    curve = [
        {"step": step, "fit": fit, "reg": reg, "loss": fit + reg}
        for step, fit, reg in zip(result.steps, result.fit, result.reg, strict=True)
    ]
    write_csv(curve, out / "loss_curve.csv")
    write_json(out / "summary.json", summary)
    title = (
        f"DUFM run: L={config.layers}, K={config.classes}, width {config.width}, "
        f"lambda {config.wd:g}, seed {config.seed}"
    )
    plot_loss_curve(result, refs, out / f"loss_curve.{figure_format}", title)
    if stats is None:
        return summary
    layer_rows = [
        {k: v for k, v in s.to_dict().items() if k != "singular_values"}
        | {"singular_values": " ".join(f"{v:.6g}" for v in s.singular_values)}
        for s in stats
    ]
    write_csv(layer_rows, out / "layers.csv")
    meta = {"source": "dufm run", "config": asdict(config), "found_dnc": summary["found_dnc"]}
    meta |= {"loss_over_dnc": summary["loss_over_dnc"], "inner_rank": summary["inner_rank"]}
    save_layer_stack(layer_stack_of_dufm(problem, result.params, meta), out / "network.pt")
    plot_singular_values(stats, rank_rtol, out / f"singular_values.{figure_format}", title)
    return summary
