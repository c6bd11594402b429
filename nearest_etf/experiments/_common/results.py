"""Result files (CSV, JSON, PNG curves) and final-epoch summaries shared by the experiment
commands. Rows are dicts, one per (method, seed, epoch)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "ACCURACY_PANELS",
    "final_accuracy_summary",
    "mean_curve",
    "plot_mean_curves",
    "write_csv",
    "write_metrics_and_summary",
]

ACCURACY_PANELS = (("train_accuracy", "train accuracy [%]"), ("test_accuracy", "test accuracy [%]"))


def write_csv(rows: Sequence[Mapping[str, object]], path: Path) -> None:
    """Write `rows` (dicts with the same keys, the first row's order) as a CSV with a header."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_metrics_and_summary(
    config: Any,
    rows: Sequence[Mapping[str, object]],
    summary: Sequence[Mapping[str, object]],
    out_dir: Path,
) -> dict[str, Path]:
    """metrics.csv/json (per-epoch rows) and summary.csv/json (per method) into `out_dir`;
    the JSON files also hold `asdict(config)`."""
    paths = {
        name: out_dir / name
        for name in ("metrics.csv", "metrics.json", "summary.csv", "summary.json")
    }
    write_csv(rows, paths["metrics.csv"])
    write_csv(summary, paths["summary.csv"])
    paths["metrics.json"].write_text(
        json.dumps({"config": asdict(config), "rows": list(rows)}, indent=1)
    )
    paths["summary.json"].write_text(
        json.dumps({"config": asdict(config), "summary": list(summary)}, indent=1)
    )
    return paths


def final_accuracy_summary(final: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Over the final-epoch rows of one method (one per seed): mean and std of test_accuracy and
    train_accuracy, and the mean of seconds (per run)."""
    summary = {}
    for key in ("test_accuracy", "train_accuracy"):
        values = np.array([float(r[key]) for r in final])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std())
    summary["seconds_per_run"] = float(np.mean([float(r["seconds"]) for r in final]))
    return summary


def mean_curve(rows: Sequence[Mapping[str, object]], by: str, name: str, key: str) -> np.ndarray:
    """Per epoch (ascending), the mean over the rows with rows[by] == name (the seeds) of key."""
    mine = [r for r in rows if r[by] == name]
    epochs = sorted({int(r["epoch"]) for r in mine})  # type: ignore[call-overload]
    return np.array([np.mean([float(r[key]) for r in mine if r["epoch"] == e]) for e in epochs])


def plot_mean_curves(
    rows: Sequence[Mapping[str, object]],
    by: str,
    labels: Mapping[str, str],
    panels: Sequence[tuple[str, str]],
    path: Path,
) -> None:
    """One panel per (key, title) in `panels`: `mean_curve` vs epoch of every name in `labels`
    (legend text labels[name]); saved as a PNG at `path`."""
    fig = Figure(figsize=(4 * len(panels), 3.4))
    for j, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for name, label in labels.items():
            curve = mean_curve(rows, by, name, key)
            ax.plot(np.arange(1, len(curve) + 1), curve, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
