"""One DUFM experiment end to end: train, evaluate references, analyse layers, write outputs."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from nearest_etf.experiments._common.results import write_csv
from nearest_etf.experiments.dufm.analysis import (
    DEFAULT_RANK_RTOL,
    LayerStats,
    analyse_layers,
    hidden_ranks,
    is_dnc,
)
from nearest_etf.experiments.dufm.model import DUFMProblem
from nearest_etf.experiments.dufm.reference import ReferenceLosses, reference_losses
from nearest_etf.experiments.dufm.train import TrainConfig, TrainResult, train_dufm
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
    result: TrainResult, refs: ReferenceLosses, rank_rtol: float = DEFAULT_RANK_RTOL
) -> dict:
    """Flat summary of a run: config, loss split, references, ranks of H_1..H_L, DNC flag.

    inner_rank = mean numerical rank of the class means of H_1..H_{L-1}; found_dnc = every H_l
    has full rank K and the loss is within 1% of L_DNC (full relative rank alone is also met by
    runs decaying to the trivial zero solution).
    """
    problem = result.config.problem()
    return _summary(result, refs, rank_rtol, analyse_layers(problem, result.params, rank_rtol))


def _summary(
    result: TrainResult, refs: ReferenceLosses, rank_rtol: float, stats: Sequence[LayerStats]
) -> dict:
    """`summarise` with the `analyse_layers` result at `rank_rtol` already computed."""
    problem = result.config.problem()
    ranks = hidden_ranks(stats)
    inner = [ranks[f"H{layer}"] for layer in range(1, problem.layers)]
    final = result.final
    return {
        **asdict(result.config),
        "fit": final.fit,
        "reg": final.reg,
        "loss": final.total,
        "dnc_loss": refs.dnc,
        "srg_loss": refs.srg,
        "loss_over_dnc": final.total / refs.dnc,
        **{f"rank_{name}": rank for name, rank in ranks.items()},
        "inner_rank": sum(inner) / len(inner),
        "found_dnc": is_dnc(stats, problem.classes) and final.total <= _DNC_LOSS_RTOL * refs.dnc,
        "rank_rtol": rank_rtol,
        "diverged": result.diverged,
        "seconds": result.seconds,
    }


def run_and_summarise(config: TrainConfig, rank_rtol: float = DEFAULT_RANK_RTOL) -> dict:
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
    config: TrainConfig, out: Path, rank_rtol: float = DEFAULT_RANK_RTOL, progress: bool = True
) -> dict:
    """Train with a progress bar and write to ``out``: loss_curve.csv, layers.csv,
    summary.json, loss_curve.png, singular_values.png and network.pt (`layer_stack_of_dufm`,
    for `nearest-etf bounds`). Returns the summary."""
    from nearest_etf.experiments.dufm.plots import plot_loss_curve, plot_singular_values

    out.mkdir(parents=True, exist_ok=True)
    result = train_dufm(config, progress=progress)
    problem = config.problem()
    refs = cached_reference_losses(problem)
    stats = analyse_layers(problem, result.params, rank_rtol)
    summary = _summary(result, refs, rank_rtol, stats)
    summary["srg_construction_loss"] = refs.srg_construction
    summary["srg_over_dnc"] = refs.srg_over_dnc
    summary["layers_analysis"] = [s.to_dict() for s in stats]
    curve = [
        {"step": step, "fit": fit, "reg": reg, "loss": fit + reg}
        for step, fit, reg in zip(result.steps, result.fit, result.reg, strict=True)
    ]
    write_csv(curve, out / "loss_curve.csv")
    layer_rows = [
        {k: v for k, v in s.to_dict().items() if k != "singular_values"}
        | {"singular_values": " ".join(f"{v:.6g}" for v in s.singular_values)}
        for s in stats
    ]
    write_csv(layer_rows, out / "layers.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    meta = {"source": "dufm run", "config": asdict(config), "found_dnc": summary["found_dnc"]}
    meta |= {"loss_over_dnc": summary["loss_over_dnc"], "inner_rank": summary["inner_rank"]}
    save_layer_stack(layer_stack_of_dufm(problem, result.params, meta), out / "network.pt")
    plot_loss_curve(result, refs, out / "loss_curve.png")
    plot_singular_values(stats, rank_rtol, out / "singular_values.png")
    return summary
