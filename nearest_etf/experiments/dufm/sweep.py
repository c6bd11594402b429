"""Sweeps of DUFM runs and of the SRG/DNC loss ratio, executed in parallel on one of the
executors of `nearest_etf.experiments._common.parallel`."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nearest_etf.experiments._common.parallel import map_unordered
from nearest_etf.experiments._common.results import write_csv
from nearest_etf.experiments.dufm.analysis import DEFAULT_RANK_RTOL
from nearest_etf.experiments.dufm.model import DUFMProblem
from nearest_etf.experiments.dufm.reference import reference_losses
from nearest_etf.experiments.dufm.run import run_and_summarise
from nearest_etf.experiments.dufm.train import TrainConfig

__all__ = ["SweepGrid", "run_sweep", "srg_ratio_row"]


@dataclass(frozen=True)
class SweepGrid:
    """The Cartesian product of the listed values, over ``seeds``, on top of ``base``."""

    base: TrainConfig
    wd: Sequence[float] = ()
    lr: Sequence[float] = ()
    width: Sequence[int] = ()
    layers: Sequence[int] = ()
    classes: Sequence[int] = ()
    per_class: Sequence[int] = ()
    seeds: Sequence[int] = (0,)

    def configs(self) -> list[TrainConfig]:
        axes = {
            name: values
            for name in ("wd", "lr", "width", "layers", "classes", "per_class")
            if (values := getattr(self, name))
        }
        axes["seed"] = self.seeds
        names = list(axes)
        return [
            replace(self.base, **dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*axes.values())
        ]


def _run_task(task: tuple[TrainConfig, float]) -> dict:
    return run_and_summarise(*task)


def srg_ratio_row(task: tuple[int, int, float]) -> dict:
    """L_SRG / L_DNC at width d = K, n = 1, every lambda = wd, for task (layers, r, wd)."""
    layers, r, wd = task
    K = r * (r - 1) // 2
    refs = reference_losses(DUFMProblem(layers, K, K, 1, wd, wd))
    return {
        "layers": layers,
        "r": r,
        "classes": K,
        "wd": wd,
        "dnc_loss": refs.dnc,
        "srg_construction_loss": refs.srg_construction,
        "srg_loss": refs.srg,
        "srg_over_dnc": refs.srg_over_dnc,
    }


def _collect(results: Iterable, total: int, desc: str, progress: bool) -> list[dict]:
    return list(tqdm(results, total=total, desc=desc, disable=not progress))


def run_sweep(
    grid: SweepGrid,
    out: Path,
    executor: str = "process",
    workers: int | None = None,
    srg_layers: Sequence[int] = (3, 4, 5),
    srg_r: Sequence[int] = (),
    srg_wd: float = 0.004,
    rank_rtol: float = DEFAULT_RANK_RTOL,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every configuration of ``grid`` (and the SRG ratio for ``srg_layers`` x ``srg_r`` at
    every lambda = ``srg_wd``), writing runs.csv, srg_ratio.csv, sweep.json and the plots whose
    axis varies: rank_vs_wd.png, dnc_probability_vs_width.png, srg_ratio.png."""
    from nearest_etf.experiments.dufm import plots

    out.mkdir(parents=True, exist_ok=True)
    configs = grid.configs()
    tasks: list = [(config, rank_rtol) for config in configs]
    rows = _collect(
        map_unordered(_run_task, tasks, executor, workers), len(tasks), "dufm runs", progress
    )
    rows.sort(key=lambda row: tuple(str(row[k]) for k in ("layers", "classes", "width", "wd")))
    srg_tasks = [(layers, r, srg_wd) for layers in srg_layers for r in srg_r]
    srg_rows = _collect(
        map_unordered(srg_ratio_row, srg_tasks, executor, workers),
        len(srg_tasks),
        "SRG references",
        progress,
    )
    srg_rows.sort(key=lambda row: (row["layers"], row["r"]))
    figures = []
    if rows:
        write_csv(rows, out / "runs.csv")
        if len({row["wd"] for row in rows}) > 1:
            figures.append(plots.plot_rank_vs_wd(rows, out / "rank_vs_wd.png"))
        if len({row["width"] for row in rows}) > 1:
            figures.append(
                plots.plot_dnc_probability_vs_width(rows, out / "dnc_probability_vs_width.png")
            )
    if srg_rows:
        write_csv(srg_rows, out / "srg_ratio.csv")
        figures.append(plots.plot_srg_ratio(srg_rows, out / "srg_ratio.png"))
    summary = {
        "runs": len(rows),
        "found_dnc": sum(bool(row["found_dnc"]) for row in rows),
        "mean_inner_rank": sum(row["inner_rank"] for row in rows) / len(rows) if rows else None,
        "below_dnc": sum(row["loss"] < row["dnc_loss"] for row in rows),
        "srg_ratio": srg_rows,
        "figures": [str(p) for p in figures],
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    return summary
