"""The plotting style of every figure the experiment commands write.

One style for the package: figures saved at `DPI` (150) by `results.save_figure`, font sizes
readable at that resolution, every axis labelled (with its unit), integer ticks on count axes
(epochs, steps, ranks), curves that may coincide drawn with distinct line styles and markers,
and a suptitle saying what was run. Stored values are fractions in [0, 1]; `PERCENT` scales
them to percent for display.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "DPI",
    "FORMATS",
    "PERCENT",
    "line_styles",
    "style_axes",
    "suptitle",
]

DPI = 150
FORMATS = ("png", "pdf", "svg")
PERCENT = 100.0  # display factor of a fraction in [0, 1] on an axis labelled "[%]"

TITLE_SIZE = 10
LABEL_SIZE = 9
TICK_SIZE = 8
LEGEND_SIZE = 8
SUPTITLE_SIZE = 11

_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")


def line_styles() -> Iterator[dict[str, object]]:
    """Keyword arguments for `Axes.plot`, one per curve: colour, line style and a sparse
    marker all change from curve to curve, so identical curves drawn on top of each other
    stay distinguishable."""
    for i in itertools.count():
        yield {
            "color": f"C{i % 10}",
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
            "markevery": (0.02 * (i % 5) + 0.01, 0.12),  # staggered: coinciding markers alternate
            "markersize": 4,
            "linewidth": 1.3,
        }


def style_axes(
    ax: Axes,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    integer_x: bool = False,
    integer_y: bool = False,
    legend: bool = False,
) -> None:
    """Label `ax` (axis labels with units, title), set the package's font sizes, integer
    ticks on the count axes (`integer_x`, `integer_y`) and, with `legend`, a legend of the
    labelled curves."""
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    if title:
        ax.set_title(title, fontsize=TITLE_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if integer_y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=LEGEND_SIZE)
    ax.grid(alpha=0.3)


def suptitle(fig: Figure, text: str) -> None:
    """The figure's title: what was run (command, data set, seeds, ...)."""
    fig.suptitle(text, fontsize=SUPTITLE_SIZE)
