"""Matplotlib figures for DUFM runs and sweeps (object-oriented API, Agg canvas, small PNGs)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from nearest_etf.experiments._common.results import save_figure
from nearest_etf.experiments.dufm.analysis import LayerStats
from nearest_etf.experiments.dufm.reference import ReferenceLosses
from nearest_etf.experiments.dufm.train import TrainResult

__all__ = [
    "plot_dnc_probability_vs_width",
    "plot_loss_curve",
    "plot_rank_vs_wd",
    "plot_singular_values",
    "plot_srg_ratio",
]

_DPI = 80


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=_DPI)


def plot_loss_curve(result: TrainResult, refs: ReferenceLosses, path: Path) -> Path:
    """Total, fit and regularisation loss vs step, with the DNC and SRG reference lines."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    total = [f + r for f, r in zip(result.fit, result.reg, strict=True)]
    # a diverged run's last point may be inf or NaN: draw the finite part
    n = len(total) - (not math.isfinite(total[-1])) if total else 0
    ax.plot(result.steps[:n], total[:n], label="loss")
    ax.plot(result.steps[:n], result.fit[:n], label="fit", lw=0.8)
    ax.plot(result.steps[:n], result.reg[:n], label="regularisation", lw=0.8)
    ax.axhline(refs.dnc, color="k", ls="--", label=f"DNC {refs.dnc:.4f}")
    if refs.srg is not None:
        ax.axhline(refs.srg, color="r", ls=":", label=f"SRG {refs.srg:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    if result.diverged:
        ax.set_title(f"diverged at step {result.diverged_step}: {result.divergence}", fontsize=9)
    else:
        ax.set_title(f"final loss {total[-1]:.4f}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_singular_values(stats: Sequence[LayerStats], rtol: float, path: Path) -> Path:
    """Normalised singular values s_i / s_max of the class means of every representation."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for s in stats:
        if s.rank is not None and s.singular_values[0] > 0:
            sv = [v / s.singular_values[0] for v in s.singular_values]
            ax.semilogy(
                range(1, len(sv) + 1), sv, marker="o", ms=3, label=f"{s.name} (rank {s.rank})"
            )
    ax.axhline(rtol, color="k", ls="--", lw=0.8, label=f"rtol {rtol:g}")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1 of class means")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _grouped_mean(rows: Sequence[dict], x: str, y: str, group: str) -> dict:
    """Per group, (x, mean of y) sorted by x over the rows where y is defined (not None: a
    diverged run or an undefined rank)."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row[y] is not None and not row.get("diverged"):
            acc[row[group]][row[x]].append(float(row[y]))
    return {
        g: sorted((k, sum(v) / len(v)) for k, v in by_x.items()) for g, by_x in sorted(acc.items())
    }


def plot_rank_vs_wd(rows: Sequence[dict], path: Path) -> Path:
    """Average (over seeds) mean inner rank vs weight decay, log2 axis, one line per width."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for width, pts in _grouped_mean(rows, "wd", "inner_rank", "width").items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"width {width}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("weight decay lambda")
    ax.set_ylabel("average rank of H_1..H_{L-1}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_dnc_probability_vs_width(rows: Sequence[dict], path: Path) -> Path:
    """Fraction of seeds ending at a full-rank (DNC) solution vs width, one line per wd."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for wd, pts in _grouped_mean(rows, "width", "found_dnc", "wd").items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"lambda {wd:g}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("width")
    ax.set_ylabel("P(gradient descent finds DNC)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_srg_ratio(rows: Sequence[dict], path: Path) -> Path:
    """L_SRG / L_DNC vs r (K = r(r-1)/2), one line per number of layers."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for layers, pts in _grouped_mean(rows, "r", "srg_over_dnc", "layers").items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"L = {layers}")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("r  (K = r(r-1)/2)")
    ax.set_ylabel("L_SRG / L_DNC")
    ax.legend(fontsize=8)
    return _save(fig, path)
