"""Sweeps of DUFM runs and of the SRG/DNC loss ratio, executed in parallel.

Executors: "process" (default; concurrent.futures.ProcessPoolExecutor with spawned workers),
"ray" (a thin adapter over ray.remote / ray.wait, only when ray is importable) and "serial".
Each unit of work runs torch single-threaded.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nearest_etf._io import write_csv
from nearest_etf.dufm.analysis import DEFAULT_RANK_RTOL
from nearest_etf.dufm.model import DUFMProblem
from nearest_etf.dufm.reference import reference_losses
from nearest_etf.dufm.run import run_and_summarise
from nearest_etf.dufm.train import TrainConfig

__all__ = ["EXECUTORS", "SweepGrid", "map_unordered", "run_sweep", "srg_ratio_row"]

EXECUTORS = ("process", "ray", "serial")


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


def _init_worker() -> None:
    torch.set_num_threads(1)


def _ray_results(fn: Callable, tasks: Sequence, workers: int) -> Iterator:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=workers)
    remote = ray.remote(num_cpus=1)(fn)
    pending = [remote.remote(task) for task in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def map_unordered(
    fn: Callable, tasks: Sequence, executor: str = "process", workers: int | None = None
) -> Iterator:
    """Yield fn(task) for every task, in completion order, on the chosen executor.

    ``fn`` must be a module-level function (workers are spawned processes).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    workers = workers or os.cpu_count() or 1
    if executor == "ray":
        if importlib.util.find_spec("ray") is None:
            raise ValueError(
                "--executor ray needs the 'ray' package, which is not installed; "
                "install ray or use --executor process"
            )
        yield from _ray_results(fn, tasks, workers)
    elif executor == "serial" or workers == 1:
        yield from map(fn, tasks)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures = [pool.submit(fn, task) for task in tasks]
            for future in as_completed(futures):
                yield future.result()


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
    from nearest_etf.dufm import plots

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
