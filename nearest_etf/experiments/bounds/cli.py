"""`nearest-etf bounds --run PATH`: complexity bounds of saved networks (`generalisation`).

PATH is a ``network*.pt`` file (a `LayerStack` written by `nearest-etf train`, `nearest-etf dufm
run` or any experiment using `save_layer_stack`) or a directory searched recursively for them.
Written into the directory (a file's parent): ``bounds.json`` (settings, and per network its
meta, totals and per-layer rows), ``bounds.csv`` (one row per network), ``bounds_layers.csv``
(one row per network and layer) and ``bounds.png`` (every bound per network, log scale;
``--format`` pdf or svg for vector graphics). For a
single file the names carry its stem, ``bounds-<stem>.json`` etc., so that a directory's
summary is not overwritten.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nearest_etf.experiments._common.options import (
    add_field_arguments,
    config_from_args,
    positive_float,
    unit_fraction,
)
from nearest_etf.experiments._common.plotting import FORMATS, PERCENT, style_axes, suptitle
from nearest_etf.experiments._common.results import save_figure, write_csv
from nearest_etf.experiments._common.runs import UserError, write_json
from nearest_etf.experiments.bounds.generalisation import (
    BOUND_NAMES,
    BoundSettings,
    BoundsResult,
    network_bounds,
)
from nearest_etf.experiments.layer_stack import load_layer_stack

__all__ = ["add_parser", "bounds_of_run", "format_table", "network_files"]

_META_KEYS = ("source", "head", "seed", "train_accuracy", "test_accuracy", "found_dnc")


def network_files(path: Path) -> tuple[Path, list[Path]]:
    """(output directory, sorted network*.pt files) for a file or a directory; `UserError` if
    there is none."""
    path = Path(path)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise UserError(f"--run {path}: no such network file or directory")
    files = sorted(path.rglob("network*.pt"))
    if not files:
        raise UserError(f"--run {path}: no network*.pt files in that directory")
    return path, files


def _summary_row(name: str, meta: dict, result: BoundsResult) -> dict[str, object]:
    row: dict[str, object] = {"network": name}
    row |= {key: meta.get(key, "") for key in _META_KEYS}
    row |= {
        "depth": len(result.layers),
        "m": result.m,
        "data_norm": result.data_norm,
        "ranks": " ".join(str(layer.rank) for layer in result.layers),
        "widths": " ".join(str(layer.width) for layer in result.layers),
    }
    return row | result.totals


def _plot(rows: Sequence[dict[str, object]], path: Path, c1: float, c2: float) -> None:
    fig = Figure(figsize=(max(6.5, 1.2 * len(rows) + 2), 4.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.8 / len(BOUND_NAMES)
    for i, name in enumerate(BOUND_NAMES):
        values = [float(r[name]) for r in rows]
        ax.bar(x + (i - (len(BOUND_NAMES) - 1) / 2) * width, values, width, label=name)
    ax.axhline(1.0, color="k", ls=":", lw=1, label="1 (above: vacuous for a loss in [0, 1])")
    ax.set_yscale("log")
    style_axes(ax, xlabel="network", ylabel=f"bound (C1 = {c1:g}, C2 = {c2:g}, no log factors)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    ax.set_xticks(x, [str(r["network"]) for r in rows], rotation=30, ha="right", fontsize=7)
    suptitle(fig, f"generalisation bounds of {len(rows)} saved network(s)")
    save_figure(fig, path)


def bounds_of_run(
    path: Path, settings: BoundSettings | None = None, figure_format: str = "png"
) -> tuple[list[dict[str, object]], dict[str, Path]]:
    """Bounds (with the constants `settings`, default `BoundSettings()`) of every network under
    `path`; (summary rows, written file paths). The files are bounds.* for a directory and
    bounds-<stem>.* for a single network file (module docstring), the figure in
    `figure_format`."""
    settings = settings or BoundSettings()
    out_dir, files = network_files(path)
    rows: list[dict[str, object]] = []
    networks: list[dict] = []
    layer_rows: list[dict[str, object]] = []
    for file in files:
        try:
            stack = load_layer_stack(file)
        except ValueError as exc:
            raise UserError(f"--run: {exc}") from exc
        result = network_bounds(stack, settings)
        name = str(file.relative_to(out_dir).with_suffix(""))
        rows.append(_summary_row(name, stack.meta, result))
        result_dict = result.to_dict()
        networks.append({"network": name, "meta": stack.meta, **result_dict})
        for layer in result_dict["layers"]:
            layer_rows.append(
                {"network": name, **layer, "shape": "x".join(map(str, layer["shape"]))}
            )
    stem = "bounds" if Path(path).is_dir() else f"bounds-{files[0].stem}"
    paths = {
        "json": out_dir / f"{stem}.json",
        "csv": out_dir / f"{stem}.csv",
        "layers_csv": out_dir / f"{stem}_layers.csv",
        "figure": out_dir / f"{stem}.{figure_format}",
    }
    shared = networks[0]["settings"] | {"biases": "per network, see networks[].settings"}
    write_json(paths["json"], {"settings": shared, "networks": networks})
    write_csv(rows, paths["csv"])
    write_csv(layer_rows, paths["layers_csv"])
    _plot(rows, paths["figure"], settings.c1, settings.c2)
    return rows, paths


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """The summary rows as a fixed-width text table (test accuracy in percent, "-" where a
    network's meta has no value), with notes on what is not applicable or vacuous."""
    columns = ("network", "test acc [%]", "found_dnc", "ranks", *BOUND_NAMES)
    cells = [
        [
            _cell(row["network"]),
            _percent(row["test_accuracy"]),
            _cell(row["found_dnc"]) if row["found_dnc"] != "" else "-",
            _cell(row["ranks"]),
            *(_cell(row[name]) for name in BOUND_NAMES),
        ]
        for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    if any(row["found_dnc"] == "" for row in rows):
        lines.append(
            "found_dnc '-': not applicable (only DUFM networks record whether gradient descent "
            "found deep neural collapse)"
        )
    vacuous = [name for name in BOUND_NAMES if any(float(row[name]) >= 1.0 for row in rows)]
    if vacuous:
        lines.append(
            f"vacuous: {', '.join(vacuous)} >= 1 for some network; the loss is in [0, 1], so a "
            "bound >= 1 on its generalisation gap guarantees nothing (such values only compare "
            "networks)"
        )
    return "\n".join(lines)


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _percent(value: object) -> str:
    return f"{PERCENT * float(value):.2f}" if isinstance(value, float) else "-"


def main(args: argparse.Namespace) -> None:
    s = config_from_args(BoundSettings, args)
    rows, paths = bounds_of_run(args.run, s, args.format)
    print(
        f"bounds with C1 = {s.c1:g}, C2 = {s.c2:g} (unspecified universal constants), "
        f"rank rtol {s.rank_rtol:g}, delta {s.delta:g}, L_loss {s.loss_lipschitz:g}"
    )
    print(format_table(rows))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


# the argparse type of each BoundSettings field: rtol and delta are fractions, the constants
# positive (an invalid value is a one-line user error before anything is read)
_SETTING_TYPES = {
    "rank_rtol": unit_fraction,
    "delta": unit_fraction,
    "loss_lipschitz": positive_float,
    "c1": positive_float,
    "c2": positive_float,
}
# the help of the BoundSettings fields (floats), each set by an option of the same name
_SETTING_HELP = {
    "rank_rtol": "numerical rank counts singular values > rtol * s_max",
    "delta": "confidence 1 - delta",
    "loss_lipschitz": "Lipschitz constant of the loss",
    "c1": "constant C1 of Theorem 7",
    "c2": "constant C2 of Theorem 7",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bounds", help="rank-aware and norm-based generalisation bounds of saved networks"
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="a network*.pt file or a directory holding some"
    )
    options = [(name, _SETTING_TYPES[name], text) for name, text in _SETTING_HELP.items()]
    add_field_arguments(parser, BoundSettings(), options)
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="file format of the figure (pdf and svg are vector graphics, for papers)",
    )
    parser.set_defaults(func=main)
