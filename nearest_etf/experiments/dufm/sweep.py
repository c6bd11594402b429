"""Sweeps of DUFM runs and of the SRG/DNC loss ratio, executed in parallel on one of the
executors of `nearest_etf.experiments._common.parallel`, in a run directory (docs/runs.md):
each finished run is recorded as it arrives and a resumed sweep runs only the others."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nearest_etf.experiments._common.parallel import map_unordered
from nearest_etf.experiments._common.results import write_csv
from nearest_etf.experiments._common.runs import RunDirectory, write_json
from nearest_etf.experiments.dufm.analysis import DUFM_RANK_RTOL
from nearest_etf.experiments.dufm.model import DUFMProblem
from nearest_etf.experiments.dufm.reference import reference_losses
from nearest_etf.experiments.dufm.run import run_and_summarise
from nearest_etf.experiments.dufm.train import DUFMConfig

__all__ = ["SweepGrid", "check_sweep", "run_sweep", "srg_ratio_row", "sweep_settings"]


@dataclass(frozen=True)
class SweepGrid:
    """The Cartesian product of the listed values, over ``seeds``, on top of ``base``."""

    base: DUFMConfig
    wd: Sequence[float] = ()
    lr: Sequence[float] = ()
    width: Sequence[int] = ()
    layers: Sequence[int] = ()
    classes: Sequence[int] = ()
    per_class: Sequence[int] = ()
    seeds: Sequence[int] = (0,)

    def configs(self) -> list[DUFMConfig]:
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


def _run_task(task: tuple[int, DUFMConfig, float]) -> tuple[int, dict]:
    index, config, rank_rtol = task
    return index, run_and_summarise(config, rank_rtol)


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


def _collect(results: Iterable, total: int, desc: str, progress: bool) -> Iterator:
    return iter(tqdm(results, total=total, desc=desc, disable=not progress))


def check_sweep(
    grid: SweepGrid,
    srg_layers: Sequence[int],
    srg_r: Sequence[int],
    srg_wd: float,
    rank_rtol: float,
) -> None:
    """Check every setting of a sweep before anything runs (`ValueError` naming it): every
    configuration of the grid, no value listed twice, at least one seed, every (layers, r) of
    the SRG curve (r >= 3, so that K = r(r-1)/2 >= 2 classes) and 0 < rank_rtol < 1."""
    if not grid.seeds:
        raise ValueError("a sweep needs at least one seed (--seeds >= 1)")
    for name in ("wd", "lr", "width", "layers", "classes", "per_class"):
        values = list(getattr(grid, name))
        if len(set(values)) < len(values):
            raise ValueError(
                f"--{name.replace('_', '-')} lists a value twice ({values}): each grid point "
                "would run and count twice"
            )
    for config in grid.configs():
        config.problem()
    for r in srg_r:
        if r < 3:
            raise ValueError(
                f"--srg-r {r}: the SRG construction needs r >= 3 (K = r(r-1)/2 >= 2 classes)"
            )
    for layers in srg_layers:
        DUFMProblem(layers, 3, 3, 1, srg_wd, srg_wd)
    if not 0 < rank_rtol < 1:
        raise ValueError(f"--rank-rtol must lie in (0, 1), got {rank_rtol}")


def sweep_settings(
    grid: SweepGrid,
    srg_layers: Sequence[int],
    srg_r: Sequence[int],
    srg_wd: float,
    rank_rtol: float,
) -> dict[str, Any]:
    """What defines a sweep's results (a run directory's manifest settings)."""
    return {
        "grid": asdict(grid),
        "srg_layers": list(srg_layers),
        "srg_r": list(srg_r),
        "srg_wd": srg_wd,
        "rank_rtol": rank_rtol,
    }


def _run_key(index: int) -> str:
    return f"run-{index:04d}"


def _srg_key(layers: int, r: int) -> str:
    return f"srg-L{layers}-r{r}"


def run_sweep(
    grid: SweepGrid,
    out: Path | RunDirectory,
    executor: str = "process",
    workers: int | None = None,
    ray_address: str | None = None,
    srg_layers: Sequence[int] = (3, 4, 5),
    srg_r: Sequence[int] = (),
    srg_wd: float = 0.004,
    rank_rtol: float = DUFM_RANK_RTOL,
    progress: bool = True,
    figure_format: str = "png",
) -> dict[str, Any]:
    """Run every configuration of ``grid`` (and the SRG ratio for ``srg_layers`` x ``srg_r`` at
    every lambda = ``srg_wd``) on ``executor`` (`parallel.map_unordered`; ``ray_address``: the
    Ray cluster, None for a local instance) in the run directory ``out`` (a path is opened as
    a new one), writing runs.csv and srg_ratio.csv as results arrive, then sweep.json and the
    plots whose axis varies: rank_vs_wd, dnc_probability_vs_width, srg_ratio (.png, or
    ``figure_format``).

    Every finished run is recorded in the run directory (keys run-<grid index>, srg-L<l>-r<r>);
    runs recorded before (a resumed sweep) are not run again. Rows are in grid order. A run
    that diverged is a row with diverged = True (`run.summarise`); the summary counts the runs
    that diverged and those that had not converged."""
    from nearest_etf.experiments.dufm import plots

    check_sweep(grid, srg_layers, srg_r, srg_wd, rank_rtol)
    if not isinstance(out, RunDirectory):
        settings = sweep_settings(grid, srg_layers, srg_r, srg_wd, rank_rtol)
        out = RunDirectory.open(out, "dufm sweep", settings)
    run = out
    configs = grid.configs()
    rows: dict[int, dict] = {}
    for index in range(len(configs)):
        if (record := run.finished(_run_key(index))) is not None:
            rows[index] = record
    tasks = [(i, config, rank_rtol) for i, config in enumerate(configs) if i not in rows]
    for index, row in _collect(
        map_unordered(_run_task, tasks, executor, workers, ray_address),
        len(tasks),
        "dufm runs",
        progress,
    ):
        rows[index] = run.finish(_run_key(index), row, diverged=bool(row["diverged"]))
        write_csv([rows[i] for i in sorted(rows)], run.path / "runs.csv")
    srg_rows: dict[tuple[int, int], dict] = {}
    for layers in srg_layers:
        for r in srg_r:
            if (record := run.finished(_srg_key(layers, r))) is not None:
                srg_rows[(layers, r)] = record
    srg_tasks = [
        (layers, r, srg_wd) for layers in srg_layers for r in srg_r if (layers, r) not in srg_rows
    ]
    for row in _collect(
        map_unordered(srg_ratio_row, srg_tasks, executor, workers, ray_address),
        len(srg_tasks),
        "SRG references",
        progress,
    ):
        srg_rows[(row["layers"], row["r"])] = run.finish(_srg_key(row["layers"], row["r"]), row)
        write_csv([srg_rows[k] for k in sorted(srg_rows)], run.path / "srg_ratio.csv")
    ordered = [rows[i] for i in sorted(rows)]
    srg_ordered = [srg_rows[k] for k in sorted(srg_rows)]
    figures = []
    fmt = figure_format
    base = grid.base
    seeds = f"{len(grid.seeds)} seed{'s' * (len(grid.seeds) > 1)}"
    fixed = {"L": ("layers", base.layers), "K": ("classes", base.classes)}
    fixed |= {"width": ("width", base.width), "lambda": ("wd", base.wd)}
    settings = [
        f"{label}={value:g}"
        for label, (name, value) in fixed.items()
        if len(getattr(grid, name)) <= 1
    ]  # the swept values are on the axes
    title = f"DUFM sweep: {', '.join(settings)}; mean over {seeds}"
    if ordered:
        write_csv(ordered, run.path / "runs.csv")
        if len({row["wd"] for row in ordered}) > 1:
            figures.append(plots.plot_rank_vs_wd(ordered, run.path / f"rank_vs_wd.{fmt}", title))
        if len({row["width"] for row in ordered}) > 1:
            figures.append(
                plots.plot_dnc_probability_vs_width(
                    ordered, run.path / f"dnc_probability_vs_width.{fmt}", title
                )
            )
    if srg_ordered:
        write_csv(srg_ordered, run.path / "srg_ratio.csv")
        figures.append(
            plots.plot_srg_ratio(
                srg_ordered,
                run.path / f"srg_ratio.{fmt}",
                f"DUFM: loss of the SRG construction over the DNC loss, lambda = {srg_wd:g}",
            )
        )
    valid = [row for row in ordered if not row["diverged"]]
    ranks = [row["inner_rank"] for row in valid if row["inner_rank"] is not None]
    summary = {
        "runs": len(ordered),
        "diverged": len(ordered) - len(valid),
        "not_converged": sum(row["converged"] is False for row in valid),
        "found_dnc": sum(bool(row["found_dnc"]) for row in valid),
        "mean_inner_rank": sum(ranks) / len(ranks) if ranks else None,
        "below_dnc": sum(row["loss"] < row["dnc_loss"] for row in valid),
        "srg_ratio": srg_ordered,
        "figures": [str(p) for p in figures],
    }
    write_json(run.path / "sweep.json", summary)
    return summary
