"""Result files (CSV, JSON, PNG curves) and final-epoch summaries shared by the experiment
commands. Rows are dicts, one per (method, seed, epoch). Every file is written atomically
(`runs.atomic_path`): an interrupted write never leaves a truncated file."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from nearest_etf.experiments._common.plotting import (
    DPI,
    PERCENT,
    line_styles,
    style_axes,
    suptitle,
)
from nearest_etf.experiments._common.runs import atomic_path, write_json

__all__ = [
    "ACCURACY_PANELS",
    "Rows",
    "final_accuracy_summary",
    "final_summaries",
    "format_final_table",
    "mean_curve",
    "plot_mean_curves",
    "save_figure",
    "write_csv",
    "write_metrics",
    "write_metrics_and_summary",
]

Rows = Sequence[Mapping[str, object]]  # a command's per-epoch (or summary) rows, one dict each

# (key, axis label, display factor): accuracies are stored as fractions, shown in percent
ACCURACY_PANELS = (
    ("train_accuracy", "train accuracy [%]", PERCENT),
    ("test_accuracy", "test accuracy [%]", PERCENT),
)


def write_csv(rows: Rows, path: Path) -> None:
    """Write `rows` (dicts) as a CSV with a header: the keys in order of first appearance, a
    row's missing keys (and None) as empty cells."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """Save `fig` at `path` (atomically) in the format its suffix names (png, pdf or svg;
    `plotting.FORMATS`); returns `path`."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower())
    return path


def write_metrics(rows: Rows, config: Any, out_dir: Path) -> dict[str, Path]:
    """metrics.csv and metrics.json (`asdict(config)` and the rows) of the per-epoch rows so far
    into `out_dir` (rewritten after every epoch); their paths."""
    paths = {"csv": out_dir / "metrics.csv", "json": out_dir / "metrics.json"}
    write_csv(rows, paths["csv"])
    write_json(paths["json"], {"config": asdict(config), "rows": list(rows)})
    return paths


def write_metrics_and_summary(
    config: Any,
    rows: Rows,
    summary: Rows,
    out_dir: Path,
) -> dict[str, Path]:
    """metrics.csv/json (per-epoch rows, `write_metrics`) and summary.csv/json (per method)
    into `out_dir`; the JSON files also hold `asdict(config)`."""
    paths = write_metrics(rows, config, out_dir)
    paths |= {"summary_csv": out_dir / "summary.csv", "summary_json": out_dir / "summary.json"}
    write_csv(summary, paths["summary_csv"])
    write_json(paths["summary_json"], {"config": asdict(config), "summary": list(summary)})
    return paths


def final_accuracy_summary(final: Rows) -> dict[str, float]:
    """Over the final-epoch rows of one method (one per seed): mean and std of test_accuracy and
    train_accuracy (fractions, like the rows), and the mean of seconds (per run)."""
    summary = {}
    for key in ("test_accuracy", "train_accuracy"):
        values = np.array([float(r[key]) for r in final])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std())
    summary["seconds_per_run"] = float(np.mean([float(r["seconds"]) for r in final]))
    return summary


def final_summaries(
    rows: Rows,
    by: str,
    names: Sequence[str],
    epochs: int,
    details: Callable[[str, Rows], dict[str, object]],
) -> list[dict[str, object]]:
    """One summary row per name (of rows[by]) over its rows of the final epoch `epochs` (one per
    seed that did not diverge): {by: name, "seeds": their number}, `final_accuracy_summary`
    and `details(name, final rows)`; {by: name, "seeds": 0} where every seed diverged."""
    out: list[dict[str, object]] = []
    for name in names:
        final = [r for r in rows if r[by] == name and r["epoch"] == epochs]
        summary: dict[str, object] = {by: name, "seeds": len(final)}
        if final:
            summary |= final_accuracy_summary(final) | details(name, final)
        out.append(summary)
    return out


def format_final_table(
    summary: Rows,
    by: str,
    width: int,
    columns: Sequence[tuple[str, int, Callable[[Mapping[str, object]], str]]],
) -> str:
    """A plain-text table of `final_summaries` rows: the name (rows[by], `width` characters),
    the test and train accuracy (mean +- std over the seeds, in percent), one column per
    (header, width, cell text of a row) in `columns`, and the seconds per run; "every run
    diverged" for a name without final rows."""
    lines = [
        f"{by:<{width}}{'test acc [%]':>16}{'train acc [%]':>16}"
        + "".join(f"{header:>{w}}" for header, w, _ in columns)
        + f"{'s/run':>8}"
    ]
    for s in summary:
        if not s["seeds"]:
            lines.append(f"{s[by]:<{width}}  every run diverged")
            continue
        lines.append(
            f"{s[by]:<{width}}"
            f"{PERCENT * s['test_accuracy_mean']:>9.2f} +- {PERCENT * s['test_accuracy_std']:<4.2f}"
            f"{PERCENT * s['train_accuracy_mean']:>9.2f} +- "
            f"{PERCENT * s['train_accuracy_std']:<4.2f}"
            + "".join(f"{cell(s):>{w}}" for _, w, cell in columns)
            + f"{s['seconds_per_run']:>8.1f}"
        )
    return "\n".join(lines)


def mean_curve(rows: Rows, by: str, name: str, key: str) -> np.ndarray:
    """Per epoch (ascending), the mean over the rows with rows[by] == name (the seeds) of key."""
    mine = [r for r in rows if r[by] == name]
    epochs = sorted({int(r["epoch"]) for r in mine})  # type: ignore[call-overload]
    return np.array([np.mean([float(r[key]) for r in mine if r["epoch"] == e]) for e in epochs])


def plot_mean_curves(
    rows: Rows,
    by: str,
    labels: Mapping[str, str],
    panels: Sequence[tuple[str, str, float]],
    path: Path,
    title: str,
) -> None:
    """One panel per (key, axis label, display factor) in `panels`: `mean_curve` times the
    factor vs epoch of every name in `labels` (legend text labels[name]); the figure titled
    `title` (what was run) and saved at `path` (format from its suffix)."""
    fig = Figure(figsize=(4.5 * len(panels), 3.8), layout="constrained")
    for j, (key, label, factor) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for (name, text), style in zip(labels.items(), line_styles(), strict=False):
            curve = mean_curve(rows, by, name, key) * factor
            ax.plot(np.arange(1, len(curve) + 1), curve, label=text, **style)
        style_axes(ax, xlabel="epoch", ylabel=label, integer_x=True, legend=True)
    suptitle(fig, title)
    save_figure(fig, path)
