"""Matplotlib figures for DUFM runs and sweeps (object-oriented API, Agg canvas, the package's
style `_common.plotting`); every function takes the figure's title (what was run) and saves in
the format of its path's suffix."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from nearest_etf.experiments._common.plotting import line_styles, style_axes, suptitle
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


def _save(fig: Figure, path: Path, title: str) -> Path:
    suptitle(fig, title)
    return save_figure(fig, path)


def plot_loss_curve(result: TrainResult, refs: ReferenceLosses, path: Path, title: str) -> Path:
    """Total, fit and regularisation loss vs step, with the DNC and SRG reference lines."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    total = [f + r for f, r in zip(result.fit, result.reg, strict=True)]
    # a diverged run's last point may be inf or NaN: draw the finite part
    n = len(total) - (not math.isfinite(total[-1])) if total else 0
    styles = line_styles()
    ax.plot(result.steps[:n], total[:n], label="loss", **next(styles))
    ax.plot(result.steps[:n], result.fit[:n], label="fit", **next(styles))
    ax.plot(result.steps[:n], result.reg[:n], label="regularisation", **next(styles))
    ax.axhline(refs.dnc, color="k", ls="--", label=f"DNC {refs.dnc:.4f}")
    if refs.srg is not None:
        ax.axhline(refs.srg, color="r", ls=":", label=f"SRG {refs.srg:.4f}")
    ax.set_yscale("log")
    if result.diverged:
        what = f"diverged at step {result.diverged_step}: {result.divergence}"
    else:
        what = f"final loss {total[-1]:.4f}"
    style_axes(
        ax,
        xlabel="step (gradient steps)",
        ylabel="loss (fit + regularisation)",
        title=what,
        integer_x=True,
        legend=True,
    )
    return _save(fig, path, title)


def plot_singular_values(stats: Sequence[LayerStats], rtol: float, path: Path, title: str) -> Path:
    """Normalised singular values s_i / s_max of the class means of every representation."""
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    styles = line_styles()
    for s in stats:
        if s.rank is not None and s.singular_values[0] > 0:
            sv = [v / s.singular_values[0] for v in s.singular_values]
            ax.semilogy(
                range(1, len(sv) + 1), sv, label=f"{s.name} (rank {s.rank})", **next(styles)
            )
    ax.axhline(rtol, color="k", ls="--", lw=0.8, label=f"rtol {rtol:g}")
    style_axes(
        ax,
        xlabel="index i",
        ylabel="s_i / s_1 of the class means",
        title="singular values per layer",
        integer_x=True,
    )
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path, title)


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


@dataclass(frozen=True)
class _Quantity:
    """How a quantity of the sweep rows is drawn: its axis `label`, the `legend` text of a line
    at one of its values (a format string), a log2 axis (`log2`), integer ticks (`integer`)."""

    label: str
    legend: str = "{}"
    log2: bool = False
    integer: bool = False


_QUANTITIES = {
    "wd": _Quantity("weight decay lambda (log2 scale)", "lambda {:g}", log2=True),
    "width": _Quantity("width (log2 scale)", "width {}", log2=True),
    "layers": _Quantity("layers L", "L = {}", integer=True),
    "r": _Quantity("r  (K = r(r-1)/2 classes)", integer=True),
    "inner_rank": _Quantity("average rank of H_1..H_{L-1}", integer=True),
    "found_dnc": _Quantity("P(gradient descent finds DNC)"),
    "srg_over_dnc": _Quantity("L_SRG / L_DNC"),
}


def _grouped_figure(rows: Sequence[dict], x: str, y: str, group: str) -> tuple[Figure, Axes, list]:
    """A figure of one line per value of `group`: the mean of y over the seeds vs x
    (`_grouped_mean`), each quantity drawn as `_QUANTITIES` says; (figure, axes, the x values
    drawn)."""
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    grouped = _grouped_mean(rows, x, y, group).items()
    legend = _QUANTITIES[group].legend
    for (value, pts), style in zip(grouped, line_styles(), strict=False):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=legend.format(value), **style)
    h, v = _QUANTITIES[x], _QUANTITIES[y]  # the horizontal and the vertical axis
    if h.log2:
        ax.set_xscale("log", base=2)
    style_axes(
        ax, xlabel=h.label, ylabel=v.label, integer_x=h.integer, integer_y=v.integer, legend=True
    )
    return fig, ax, sorted({p[0] for _, pts in grouped for p in pts})


def plot_rank_vs_wd(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Average (over seeds) mean inner rank vs weight decay, log2 axis, one line per width."""
    fig, _, _ = _grouped_figure(rows, "wd", "inner_rank", "width")
    return _save(fig, path, title)


def plot_dnc_probability_vs_width(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Fraction of seeds ending at a full-rank (DNC) solution vs width, one line per wd."""
    fig, ax, widths = _grouped_figure(rows, "width", "found_dnc", "wd")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(widths, [str(w) for w in widths])  # the swept widths, not powers of 2
    return _save(fig, path, title)


def plot_srg_ratio(rows: Sequence[dict], path: Path, title: str) -> Path:
    """L_SRG / L_DNC vs r (K = r(r-1)/2), one line per number of layers."""
    fig, ax, _ = _grouped_figure(rows, "r", "srg_over_dnc", "layers")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    return _save(fig, path, title)
