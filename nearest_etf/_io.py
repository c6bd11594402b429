"""Result files and final-epoch summaries shared by the experiment commands."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["final_accuracy_summary", "write_csv", "write_metrics_and_summary"]


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
