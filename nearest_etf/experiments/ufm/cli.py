"""`nearest-etf ufm`: the UFM convergence study (learned vs fixed vs implicit ETF heads).

Writes to the output directory: ``curves.csv`` (one row per run and recorded step),
``study.json`` (configuration, lr tuning scores, chosen lrs, summary rows and every curve),
``summary.csv``, ``summary.txt`` (the printed table) and ``ufm.png`` (``ufm.pdf``/``ufm.svg``
with ``--format``; two rows of panels: every method at the shared lr, and every method at its
best lr; mean over seeds with the min-max band).

The output directory is a run directory (docs/runs.md): each finished run is recorded
(units/<method>-lr<lr>-seed<s>.json) and ``curves.csv`` rewritten as it finishes, and
``--resume DIR`` trains only the runs DIR has not recorded.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from nearest_etf.experiments._common.options import (
    add_executor_arguments,
    add_field_arguments,
    add_output_arguments,
    add_threads_argument,
    check_executor_arguments,
    comma_list,
    config_from_args,
    default_out_dir,
    nonnegative_float,
    positive_float,
    positive_int,
)
from nearest_etf.experiments._common.plotting import line_styles, style_axes, suptitle
from nearest_etf.experiments._common.results import save_figure, write_csv
from nearest_etf.experiments._common.runs import (
    RunDirectory,
    atomic_path,
    open_run,
    user_errors,
    write_json,
    write_text,
)
from nearest_etf.experiments.ufm.study import (
    METHODS,
    METRICS,
    OPTIMIZERS,
    Study,
    UFMConfig,
    UFMRun,
    check_study,
    run_study,
    summarise_study,
    thresholds,
)

__all__ = ["add_parser", "format_summary", "plot_study", "read_study", "write_study"]

_PANELS = (
    ("loss", "loss (cross-entropy)", True),
    ("nc1", "NC1  tr(Σ_W Σ_B⁺)/K", True),
    ("nc3", "NC3 self-duality", True),
    ("cosine_margin", "average cosine margin", False),
    ("equinorm", "equinorm of means (std/mean)", True),
    ("etf_distance", "means to simplex ETF", True),
)
_METHOD_HELP = {
    "learned": "LearnedHead: W, b trained with the features",
    "fixed": "FixedETFHead: a random simplex ETF fixed from the start",
    "implicit": "ImplicitETFHead: the ETF nearest the class means (EMA of the means)",
    "implicit-cma": "ImplicitETFHead with the cumulative average of the means",
    "implicit-none": "ImplicitETFHead with the exact means of the step (full batch: "
    "curves close to implicit's)",
    "implicit-k10": "ImplicitETFHead (EMA) re-solving the frame every 10th step only",
}
_COMPARISON_TITLES = {"shared-lr": "one shared lr", "best-lr": "best lr per method"}
# UFMConfig fields set by an option of the same name after --optimizer
_TRAINING_OPTIONS = (
    ("momentum", nonnegative_float, "SGD momentum"),
    ("feature_norm", float, "tau (<= 0: no normalisation)"),
    ("feature_wd", nonnegative_float, "wd on H"),
    ("head_wd", nonnegative_float, "wd on a learned W, b"),
    ("init_scale", positive_float, "row norm of H_0"),
    ("delta", nonnegative_float, "implicit heads' prox weight"),
    ("records", int, "recorded steps (log-spaced; > T: all)"),
)


def _aligned(study: Study, comparison: str, method: str, metric: str) -> tuple[list, np.ndarray]:
    """Steps and a [seeds, steps] array of ``metric`` (NaN after a run diverged)."""
    group = study.group(comparison, method)
    steps = max((r.steps for r in group), key=len)
    values = np.full((len(group), len(steps)), np.nan)
    for i, run in enumerate(group):
        values[i, : len(run.steps)] = run.curves[metric]
    return steps, values


def plot_study(study: Study, path: Path) -> Path:
    """The figure: a row per comparison, a panel per metric, a line style per method (methods
    with identical curves, e.g. implicit and implicit-none under full-batch training, stay
    visible); format from the suffix of `path`."""
    comparisons = list(study.comparisons)
    cols = 3
    rows_per = math.ceil(len(_PANELS) / cols)
    fig = Figure(
        figsize=(4.6 * cols, 3.4 * rows_per * len(comparisons) + 0.6), layout="constrained"
    )
    subfigs = fig.subfigures(len(comparisons), 1, squeeze=False)[:, 0]
    K = study.config.classes
    for subfig, comparison in zip(subfigs, comparisons, strict=True):
        lrs = study.comparisons[comparison]
        subfig.suptitle(_COMPARISON_TITLES[comparison], fontsize=10, fontweight="bold")
        axes = subfig.subplots(rows_per, cols, squeeze=False).flatten()
        for col, (metric, label, log) in enumerate(_PANELS):
            ax = axes[col]
            for method, style in zip(study.methods, line_styles(), strict=False):
                steps, values = _aligned(study, comparison, method, metric)
                if np.isnan(values).all():
                    continue
                ax.plot(
                    steps,
                    np.nanmean(values, axis=0),
                    label=f"{method} (lr {lrs[method]:g})",
                    **style,
                )
                ax.fill_between(
                    steps,
                    np.nanmin(values, axis=0),
                    np.nanmax(values, axis=0),
                    color=style["color"],
                    alpha=0.15,
                    lw=0,
                )
            if metric == "cosine_margin":
                ax.axhline(K / (K - 1), color="k", ls=":", lw=0.8, label="collapsed K/(K-1)")
            if log:
                ax.set_yscale("log")
            ax.set_xscale("symlog", linthresh=10)  # linear to step 10, then logarithmic
            ax.set_xlim(0, study.config.steps)
            style_axes(ax, xlabel="step (gradient steps)", ylabel=label, legend=col == 0)
    c = study.config
    suptitle(
        fig,
        f"UFM K={K}, d={c.dim}, n={c.per_class}/class, {c.optimizer}, {len(study.seeds)} seeds "
        "(mean, min-max band; step axis linear to 10, then log)",
    )
    save_figure(fig, path)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _legend(study: Study, limits: dict[str, tuple[str, float]]) -> list[str]:
    """What the thresholds and methods of the summary are (docs/ufm.md has the details)."""
    K = study.config.classes
    lines = ["  where:"]
    if "loss" in limits:
        lines.append(
            f"    loss {limits['loss'][0]} {limits['loss'][1]:.4g}: the loss floor of a "
            f"bounded-logit head (ETF heads see features of norm tau={study.config.feature_norm:g},"
        )
        lines.append(
            "      so their logits are bounded and the cross-entropy cannot go below "
            "log(1 + (K-1) exp(-tau K/(K-1)))) plus 0.01;"
        )
        lines.append(
            "      the learned head's W grows without bound, so its loss goes towards 0: "
            "compare losses within a head type only"
        )
    lines.append("    error <= 0: every training sample classified correctly")
    lines.append(
        "    nc1, etf_distance, nc3, equinorm <= 0.001: within-class variability, means' "
        "distance to a simplex ETF, self-duality, equal norms collapsed"
    )
    lines.append(
        f"    cosine_margin >= {0.99 * K / (K - 1):.4g}: 0.99 of the collapsed value K/(K-1)"
    )
    lines.append("  methods:")
    lines += [f"    {m:<14} {_METHOD_HELP[m]}" for m in study.methods if m in _METHOD_HELP]
    return lines


def format_summary(study: Study, rows: Sequence[dict]) -> str:
    """The two summary tables (steps to threshold; final mean +- std) as text."""
    limits = thresholds(study.config)
    crossing = [m for m in METRICS if m in limits]
    lines = [
        f"UFM K={study.config.classes} d={study.config.dim} n={study.config.per_class} "
        f"steps={study.config.steps} seeds={study.seeds} optimizer={study.config.optimizer}",
        "lr grid "
        + ", ".join(f"{lr:g}" for lr in study.lr_grid)
        + f"; best lr chosen on seed {study.tune_seed}; shared lr {study.shared_lr:g}",
        "",
        "First recorded step where the metric crosses its threshold "
        "(median over seeds; '-' if some seed never crosses, with seeds crossed/total):",
        "  thresholds: " + ", ".join(f"{m} {op} {v:.4g}" for m, (op, v) in limits.items()),
        *_legend(study, limits),
    ]
    head = f"{'comparison':<10} {'method':<14} {'lr':>6} " + " ".join(f"{m:>15}" for m in crossing)
    lines += [head, "-" * len(head)]
    for row in rows:
        cells = [
            f"{_fmt(row[f'{m}_step'])} ({row[f'{m}_crossed']}/{row['seeds']})" for m in crossing
        ]
        lines.append(
            f"{row['comparison']:<10} {row['method']:<14} {row['lr']:>6g} "
            + " ".join(f"{c:>15}" for c in cells)
        )
    lines += ["", "Final values, mean +- std over seeds:"]
    head = f"{'comparison':<10} {'method':<14} {'lr':>6} " + " ".join(f"{m:>19}" for m in METRICS)
    lines += [head, "-" * len(head)]
    for row in rows:
        cells = [
            f"{_fmt(row[f'{m}_final_mean'])} +- {_fmt(row[f'{m}_final_std'], 2)}" for m in METRICS
        ]
        extra = f"  ({row['diverged']} diverged)" if row["diverged"] else ""
        lines.append(
            f"{row['comparison']:<10} {row['method']:<14} {row['lr']:>6g} "
            + " ".join(f"{c:>19}" for c in cells)
            + extra
        )
    return "\n".join(lines)


def write_curves(runs: Sequence[UFMRun], path: Path) -> None:
    """curves.csv: one row per run (sorted by method, lr, seed) and recorded step."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "lr", "seed", "step", *METRICS])
        for run in sorted(runs, key=lambda r: r.key):
            for i, step in enumerate(run.steps):
                writer.writerow(
                    [run.method, run.lr, run.seed, step, *(run.curves[m][i] for m in METRICS)]
                )


def write_study(study: Study, out: Path, command: str = "", figure_format: str = "png") -> dict:
    """Write curves.csv, summary.csv, summary.txt, study.json and the figure
    ufm.<figure_format> into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise_study(study)
    write_curves(list(study.runs.values()), out / "curves.csv")
    write_csv(rows, out / "summary.csv")
    text = format_summary(study, rows)
    write_text(out / "summary.txt", text + "\n")
    figure = plot_study(study, out / f"ufm.{figure_format}")
    record = {
        "command": command,
        "config": study.config.to_dict(),
        "methods": study.methods,
        "seeds": study.seeds,
        "tune_seed": study.tune_seed,
        "lr_grid": study.lr_grid,
        "shared_lr": study.shared_lr,
        "tuning_scores": {
            m: {str(lr): s for lr, s in by_lr.items()} for m, by_lr in study.tuning.items()
        },
        "comparisons": study.comparisons,
        "thresholds": thresholds(study.config),
        "summary": rows,
        "runs": [r.to_dict() for _, r in sorted(study.runs.items())],
        "figure": str(figure),
    }
    write_json(out / "study.json", record)
    return record


def read_study(path: Path) -> tuple[Study, str]:
    """The `Study` (and its command line) stored in a study.json written by `write_study`."""
    record = json.loads(path.read_text())
    runs = {}
    for r in record["runs"]:
        run = UFMRun.from_dict(r)
        runs[run.key] = run
    study = Study(
        config=UFMConfig(**record["config"]),
        methods=record["methods"],
        seeds=record["seeds"],
        tune_seed=record["tune_seed"],
        lr_grid=record["lr_grid"],
        shared_lr=record["shared_lr"],
        runs=runs,
        tuning={
            m: {float(lr): v for lr, v in s.items()} for m, s in record["tuning_scores"].items()
        },
        best_lr=record["comparisons"]["best-lr"],
    )
    return study, record["command"]


def _run_key(run: UFMRun) -> str:
    return f"{run.method}-lr{run.lr!r}-seed{run.seed}"


def _recorded_runs(run_dir: RunDirectory) -> dict[tuple[str, float, int], UFMRun]:
    """The runs a (resumed) run directory has recorded."""
    runs = [UFMRun.from_dict(run_dir.finished(key) or {}) for key in run_dir.runs()]
    return {run.key: run for run in runs}


def main(args: argparse.Namespace) -> None:
    if args.replot is not None:
        with user_errors():
            study, command = read_study(args.replot)
        out = args.out or args.replot.parent
        write_study(study, out, command, args.format)
        print((out / "summary.txt").read_text(), end="")
        return
    with user_errors():
        config = config_from_args(
            UFMConfig, args, feature_norm=None if args.feature_norm <= 0 else args.feature_norm
        )
        lr_grid = args.lr_grid if args.lr_grid else [args.lr]
        seeds = list(range(args.seeds))
        check_study(args.methods, seeds, lr_grid, args.lr, args.tune_seed, args.workers)
    check_executor_arguments(args)
    torch.set_num_threads(args.threads)
    settings = {
        "config": config.to_dict(),
        "methods": args.methods,
        "seeds": seeds,
        "lr_grid": sorted(set(lr_grid)),
        "shared_lr": args.lr,
        "tune_seed": args.tune_seed,
    }
    start = time.perf_counter()
    with open_run(args, "ufm", settings, default_out_dir("ufm", f"K{args.classes}")) as run:
        done = _recorded_runs(run)
        finished = dict(done)

        def record(new: UFMRun) -> None:
            finished[new.key] = UFMRun.from_dict(
                run.finish(_run_key(new), new.to_dict(), diverged=new.diverged)
            )
            write_curves(list(finished.values()), run.path / "curves.csv")

        study = run_study(
            config,
            args.methods,
            seeds,
            lr_grid,
            args.lr,
            tune_seed=args.tune_seed,
            workers=args.workers,
            progress=not args.no_progress,
            executor=args.executor,
            ray_address=args.ray_address,
            done=done,
            on_run=record,
        )
        study.runs = {key: finished[key] for key in study.runs}
        command = " ".join(["nearest-etf", *(getattr(args, "argv", None) or ["ufm"])])
        write_study(study, run.path, command, args.format)
    print((run.path / "summary.txt").read_text(), end="")
    diverged = run.diverged_runs()
    if diverged:
        print(f"{len(diverged)} of {len(study.runs)} runs diverged: {', '.join(diverged)}")
    print(f"\nwall time {time.perf_counter() - start:.1f} s; results in {run.path}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = UFMConfig()
    parser = subparsers.add_parser(
        "ufm",
        help="UFM convergence study: learned vs fixed vs implicit ETF heads",
        description=__doc__,
    )
    parser.add_argument("--classes", type=int, default=d.classes, help="K")
    parser.add_argument("--dim", type=int, default=d.dim, help="feature dimension d >= K")
    parser.add_argument(
        "--per-class", type=positive_int, default=d.per_class, help="n samples per class"
    )
    parser.add_argument("--steps", type=int, default=d.steps, help="full-batch steps T")
    parser.add_argument(
        "--methods",
        type=comma_list(choices=METHODS),
        default=["learned", "fixed", "implicit", "implicit-none"],
        help=f"comma list from {', '.join(METHODS)}",
    )
    parser.add_argument("--seeds", type=positive_int, default=5, help="evaluation seeds 0..S-1")
    parser.add_argument("--lr", type=positive_float, default=10.0, help="the shared learning rate")
    parser.add_argument(
        "--lr-grid",
        type=comma_list(positive_float),
        default=[1.0, 3.0, 10.0, 30.0, 100.0],
        help="comma list each method picks its best lr from (one value: no tuning)",
    )
    parser.add_argument("--tune-seed", type=int, default=1000, help="seed the lr is tuned on")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    add_field_arguments(parser, d, _TRAINING_OPTIONS)
    parser.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="processes, or CPUs of the local Ray instance (1 with --executor process: in this "
        "process)",
    )
    add_executor_arguments(parser)
    add_threads_argument(parser, "torch threads in this process (with --workers 1)")
    add_output_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="STUDY_JSON",
        help="only rewrite the table, CSVs and figure of a stored study.json (into --out or its "
        "directory); every other option is ignored",
    )
    parser.set_defaults(func=main)
