"""`nearest-etf adaptive-etf`: Adaptive-ETF MLPs (Liu, arXiv 2412.00884) against the baseline
and a fixed-last-k-layers network, with per-layer NCC accuracy curves.

Network: x -> [Linear(., h) -> BatchNorm1d -> ReLU] x D -> Linear(h, K) (`models.MLP` plus a
linear classifier), trained with cross-entropy and SGD (lr 0.01, momentum 0.9, weight decay
5e-4, batch 128, constant lr: the paper's settings). Methods, all from the same initialisation
and data order per seed:

- ``baseline``: every layer trainable;
- ``fixed-last-k``: the last k linear layers (the classifier included) are canonical ETFs
  (`etf_layers.fix_last_layers`) from the start;
- ``adaptive-canonical`` / ``adaptive-nearest``: after every epoch the training-set NCC
  accuracy of every hidden layer's output (after its ReLU; `layer_probe.layer_collapse`) is fed
  to `AdaptiveETFRule`; once hidden layer l has NCC accuracy >= threshold (0.9) for `patience`
  (5) consecutive epochs, then before the next epoch the linear layer of block l and all later
  ones (the K x h classifier included) are frozen to ETFs (a decision after the last epoch is
  not applied: the frozen network would be untrained): the canonical ETF (the paper) or the
  ETF nearest to each layer's current weight (a Procrustes solve with
  `nearest_etf.nearest_etf`; our variant).
  Biases and batch norm stay trainable.

Effective depth (reported 1-based): the first hidden layer whose training NCC accuracy reaches
the threshold, at the last epoch for the baseline and at the freeze for the adaptive runs.

Outputs in the output directory: metrics.csv / metrics.json (config, one row per method, seed
and epoch with per-layer ``ncc_l`` and ``nc1_l``), summary.csv / summary.json (final accuracies,
trainable parameters, effective depths, freeze epochs, run times), ncc_curves.<format>,
accuracy.<format>, and network-<method>-seed<s>.pt per run (the trained eval-mode network as a
`LayerStack` with the training inputs, for `nearest-etf bounds`). The output directory is a run
directory (docs/runs.md): metrics are written after every epoch, runs are checkpointed every
epoch (the freezing rule's state included) and `--resume DIR` continues an interrupted one.

A decision needs `patience` epochs and takes effect from the next epoch, so a layer can be
frozen only when epochs > patience; the command warns otherwise (the adaptive methods then
equal the baseline).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from nearest_etf.experiments._common import distributed
from nearest_etf.experiments._common.options import (
    TrainingOptions,
    add_field_arguments,
    config_from_args,
    nonnegative_float,
    positive_int,
)
from nearest_etf.experiments._common.plotting import PERCENT, line_styles, style_axes, suptitle
from nearest_etf.experiments._common.results import (
    ACCURACY_PANELS,
    Rows,
    final_summaries,
    format_final_table,
    mean_curve,
    plot_mean_curves,
    save_figure,
    write_metrics_and_summary,
)
from nearest_etf.experiments._common.runs import UserError
from nearest_etf.experiments._common.training import (
    RunSeries,
    TrainingRun,
    run_training_command,
    train_epoch,
)
from nearest_etf.experiments.data import DataSplits
from nearest_etf.experiments.models import MLP
from nearest_etf.metrics.layer_probe import effective_depth, layer_collapse
from nearest_etf.nn.etf_layers import (
    convert_to_etf,
    fix_last_layers,
    linear_layer_names,
    trainable_parameters,
)

__all__ = [
    "AdaptiveETFConfig",
    "AdaptiveETFRule",
    "add_parser",
    "build_mlp",
    "format_summary",
    "method_names",
    "run_adaptive_etf",
    "short_run_warning",
    "write_results",
]


class AdaptiveETFRule:
    """The Adaptive-ETF freezing criterion on a sequence of per-epoch NCC accuracies.

    `update(ncc)` takes the NCC accuracies (fractions) of the `num_layers` hidden layers after
    an epoch. Layer l's streak counts the consecutive epochs, up to this one, with
    ncc[l] >= threshold. The first time some not-yet-frozen layer reaches streak >= patience,
    `frozen_from` becomes the smallest such l and `update` returns it (freeze layer l and all
    later ones); it returns None otherwise. Later calls keep watching the layers before
    `frozen_from`, so the frozen block can only grow towards the input.
    """

    def __init__(self, num_layers: int, threshold: float = 0.9, patience: int = 5) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be an accuracy in [0, 1], got {threshold}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int (epochs), got {patience!r}")
        self.num_layers, self.threshold, self.patience = num_layers, threshold, patience
        self.streaks = [0] * num_layers
        self.frozen_from: int | None = None

    def update(self, ncc_accuracies: Sequence[float]) -> int | None:
        """Record one epoch's NCC accuracies [num_layers]; the layer to freeze from, or None."""
        values = [float(a) for a in ncc_accuracies]
        if len(values) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} NCC accuracies, got {len(values)}")
        if not all(0.0 <= a <= 1.0 for a in values):
            raise ValueError(f"NCC accuracies must be fractions in [0, 1], got {values}")
        self.streaks = [
            s + 1 if a >= self.threshold else 0 for s, a in zip(self.streaks, values, strict=True)
        ]
        watched = self.num_layers if self.frozen_from is None else self.frozen_from
        ready = [i for i in range(watched) if self.streaks[i] >= self.patience]
        if not ready:
            return None
        self.frozen_from = ready[0]
        return self.frozen_from


def build_mlp(in_features: int, depth: int, width: int, num_classes: int) -> nn.Sequential:
    """[Flatten, (Linear -> BatchNorm1d -> ReLU) x depth] (`models.MLP`) then Linear(width, K)."""
    if depth < 1 or width < 2:
        raise ValueError(f"need depth >= 1 and width >= 2, got depth={depth}, width={width}")
    return nn.Sequential(MLP(in_features, (width,) * depth), nn.Linear(width, num_classes))


def _relu_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.ReLU)]


@dataclass(frozen=True)
class AdaptiveETFConfig(TrainingOptions):
    """Options of one `nearest-etf adaptive-etf` invocation (see `add_parser`)."""

    epochs: int = 30
    depth: int = 6
    width: int = 256
    fixed_last: int = 3
    threshold: float = 0.9
    patience: int = 5
    momentum: float = 0.9
    probe_samples: int = 2000
    save_networks: bool = True

    @property
    def run_name(self) -> str:
        return f"{super().run_name}-D{self.depth}-h{self.width}"


def method_names(config: AdaptiveETFConfig) -> tuple[str, ...]:
    """The four compared methods."""
    return (
        "baseline",
        f"fixed-last-{config.fixed_last}",
        "adaptive-canonical",
        "adaptive-nearest",
    )


def _check_config(config: AdaptiveETFConfig, data: DataSplits) -> str | None:
    """Fail before any training (`UserError`): network shape, ETF widths, fixed-last k, the
    freezing rule, a batch that fits the training set, a probe set holding every class. The
    `short_run_warning`, if any."""
    try:
        build_mlp(math.prod(data.input_shape), config.depth, config.width, data.num_classes)
        AdaptiveETFRule(config.depth, config.threshold, config.patience)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if config.width < data.num_classes:
        raise UserError(
            f"--width {config.width} < {data.num_classes} classes: the K x h classifier ETF "
            "needs h >= K"
        )
    if not 0 <= config.fixed_last <= config.depth + 1:
        raise UserError(f"--fixed-last must lie in [0, {config.depth + 1}] (linear layers)")
    if len(data.x_train) < config.batch_size:
        raise UserError(
            f"--batch-size {config.batch_size} exceeds the {len(data.x_train)} training samples: "
            "with the incomplete last batch dropped there is no batch to train on"
        )
    probed = set(data.y_train[: config.probe_samples].tolist())
    if len(probed) < data.num_classes:
        missing = sorted(set(range(data.num_classes)) - probed)
        raise UserError(
            f"--probe-samples {config.probe_samples}: the first {config.probe_samples} training "
            f"samples, the NCC probe set, have no samples of classes {missing[:10]}; the probe "
            "needs every class (raise --probe-samples)"
        )
    return short_run_warning(config)


def short_run_warning(config: AdaptiveETFConfig) -> str | None:
    """A warning when no layer can be frozen: a decision needs `patience` epochs and applies
    from the next one, so freezing needs epochs > patience (None otherwise)."""
    if config.epochs > config.patience:
        return None
    return (
        f"warning: --patience {config.patience} needs at least {config.patience + 1} epochs to "
        f"freeze a layer; with --epochs {config.epochs} the adaptive methods train exactly like "
        "the baseline"
    )


def _run(run: TrainingRun) -> list[dict[str, object]]:
    """Train the network of one method and seed; one row per epoch. The run's loop
    checkpoints, resumes and stops a diverged run."""
    data, config, method, seed, loop = run.data, run.config, run.name, run.seed, run.loop
    model = build_mlp(math.prod(data.input_shape), config.depth, config.width, data.num_classes).to(
        run.device
    )
    linears, probes = linear_layer_names(model), _relu_names(model)
    if method.startswith("fixed-last-"):
        fix_last_layers(model, int(method.removeprefix("fixed-last-")))
    rule = (
        AdaptiveETFRule(config.depth, config.threshold, config.patience)
        if method.startswith("adaptive-")
        else None
    )
    state = {"frozen_from": None, "frozen_epoch": None, "pending": None, "streaks": None}
    state |= loop.extra
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    if state["frozen_from"] is not None:  # a resumed run: freeze as before its interruption
        convert_to_etf(model, linears[state["frozen_from"] :], method.removeprefix("adaptive-"))
    if rule is not None and state["streaks"] is not None:
        rule.streaks, rule.frozen_from = list(state["streaks"]), state["frozen_from"]
    x_probe, y_probe = data.x_train[: config.probe_samples], data.y_train[: config.probe_samples]
    loss_fn = nn.CrossEntropyLoss()
    trained = distributed.parallel_model(model)
    epochs, bar = run.start(model, optimizer)
    rows = loop.rows
    frozen_from, frozen_epoch, pending = (
        state[k] for k in ("frozen_from", "frozen_epoch", "pending")
    )
    for epoch in epochs:
        if pending is not None:  # decided after the previous epoch, applied before this one
            convert_to_etf(model, linears[pending:], method.removeprefix("adaptive-"))
            frozen_from, frozen_epoch, pending = pending, epoch - 1, None
            trained = distributed.parallel_model(model)  # DDP of the converted parameters
        train_loss = train_epoch(trained, run.loader, optimizer, loss_fn, bar.update, epoch=epoch)
        if loop.diverged(epoch, train_loss):
            break
        layers = layer_collapse(model, probes, x_probe, y_probe, data.num_classes)
        ncc = [layers[name]["ncc_accuracy"] for name in probes]
        train_accuracy, test_accuracy = run.accuracies(model)
        row: dict[str, object] = {
            "method": method,
            "seed": seed,
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "test_accuracy": test_accuracy,
            "trainable_params": trainable_parameters(model),
            "frozen_from": -1 if frozen_from is None else frozen_from + 1,
            "frozen_epoch": -1 if frozen_epoch is None else frozen_epoch,
            "seconds": loop.seconds(),
        }
        row |= {f"ncc_{i + 1}": a for i, a in enumerate(ncc)}
        row |= {f"nc1_{i + 1}": layers[name]["nc1"] for i, name in enumerate(probes)}
        rows.append(row)
        if rule is not None:
            pending = rule.update(ncc)
        bar.set_postfix(test_acc=f"{row['test_accuracy']:.3f}", frozen=row["frozen_from"])
        loop.end_epoch(
            epoch,
            {
                "frozen_from": frozen_from,
                "frozen_epoch": frozen_epoch,
                "pending": pending,
                "streaks": None if rule is None else rule.streaks,
            },
        )
    bar.close()
    run.save_network(model, "adaptive-etf", "method")
    return rows


def run_adaptive_etf(
    config: AdaptiveETFConfig, data: DataSplits | None = None, runs: RunSeries | None = None
) -> list[dict[str, object]]:
    """Every method with seeds 0..seeds-1; all rows. With `runs` in a run directory the runs
    are recorded there (keys <method>-seed<s>) and the networks written into it."""
    runs = runs or RunSeries()
    return runs.run_all(config, data, method_names(config), _run, _check_config)


def _summary_rows(rows: Rows, config: AdaptiveETFConfig) -> list[dict[str, object]]:
    """Per method, over seeds: final accuracies (mean, std), trainable parameters, effective
    depth and freeze epoch per seed, seconds per run."""

    def details(method: str, final: Rows) -> dict[str, object]:
        ncc_final = [[float(r[f"ncc_{i + 1}"]) for i in range(config.depth)] for r in final]
        if method.startswith("adaptive-"):
            depths = [int(r["frozen_from"]) for r in final]
        else:
            depths = [
                -1 if (d := effective_depth(n, config.threshold)) is None else d + 1
                for n in ncc_final
            ]
        # -1: no layer reached the threshold (baseline) or none was frozen (adaptive)
        return {
            "trainable_params": float(np.mean([int(r["trainable_params"]) for r in final])),
            "effective_depth": " ".join(map(str, depths)),
            "frozen_epoch": " ".join(str(r["frozen_epoch"]) for r in final),
        }

    return final_summaries(rows, "method", method_names(config), config.epochs, details)


def _summary(rows: Rows, config: AdaptiveETFConfig) -> str:
    """The printed summary: `format_summary` of the rows' `summary.csv`."""
    return format_summary(_summary_rows(rows, config))


def _plot_ncc(rows: Rows, config: AdaptiveETFConfig, path: Path) -> None:
    """Per method: training NCC accuracy of every hidden layer vs epoch (mean over seeds)."""
    methods = method_names(config)
    fig = Figure(figsize=(4.5 * len(methods), 3.8), layout="constrained")
    for j, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), j + 1)
        for i, style in zip(range(config.depth), line_styles(), strict=False):
            curve = mean_curve(rows, "method", method, f"ncc_{i + 1}") * PERCENT
            ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{i + 1}", **style)
        ax.axhline(config.threshold * PERCENT, color="grey", linestyle=":", linewidth=1)
        for r in rows:
            if r["method"] == method and r["epoch"] == config.epochs and r["frozen_epoch"] != -1:
                ax.axvline(int(r["frozen_epoch"]), color="k", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, 102)
        style_axes(
            ax,
            xlabel="epoch",
            ylabel="train NCC accuracy [%]",
            title=method,
            integer_x=True,
        )
        if j == 0:
            ax.legend(title="layer", fontsize=7, title_fontsize=7, ncol=2)
    suptitle(
        fig, _title(config, "NCC accuracy per hidden layer (dotted: threshold; dashed: freezes)")
    )
    save_figure(fig, path)


def _title(config: AdaptiveETFConfig, what: str) -> str:
    return (
        f"adaptive-etf on {Path(config.dataset).name}: {what}; depth {config.depth}, "
        f"width {config.width}, mean over {config.seeds} seeds"
    )


def write_results(
    rows: Rows, config: AdaptiveETFConfig, out_dir: Path, figure_format: str = "png"
) -> dict[str, Path]:
    """metrics.csv/json, summary.csv/json, ncc_curves and accuracy figures (in
    `figure_format`) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_metrics_and_summary(config, rows, _summary_rows(rows, config), out_dir)
    paths |= {name: out_dir / f"{name}.{figure_format}" for name in ("ncc_curves", "accuracy")}
    _plot_ncc(rows, config, paths["ncc_curves"])
    plot_mean_curves(
        rows,
        "method",
        {m: m for m in method_names(config)},
        (*ACCURACY_PANELS, ("trainable_params", "trainable parameters", 1.0)),
        paths["accuracy"],
        _title(config, "accuracy"),
    )
    return paths


def _epochs_cell(key: str) -> Callable[[Mapping[str, object]], str]:
    """The cell text of a summary's per-seed list `key` of 1-based layers or epochs ("-" for
    -1: none)."""
    return lambda s: " ".join("-" if v == "-1" else v for v in str(s[key]).split())


def format_summary(summary: Rows) -> str:
    """A plain-text table of `summary.csv`."""
    columns = (
        ("trainable", 11, lambda s: f"{s['trainable_params']:.0f}"),
        ("eff. depth", 12, _epochs_cell("effective_depth")),
        ("frozen at", 12, _epochs_cell("frozen_epoch")),
    )
    return format_final_table(summary, "method", 20, columns)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    config = config_from_args(AdaptiveETFConfig, args)
    run_training_command(args, config, run_adaptive_etf, write_results, _summary, _check_config)


# AdaptiveETFConfig fields set by an option of the same name after the optimisation options
_METHOD_OPTIONS = (
    ("momentum", nonnegative_float, None),
    ("fixed_last", int, "k of the fixed-last-k baseline (linear layers, classifier included)"),
    (
        "threshold",
        float,
        "a layer counts as collapsed when its training NCC accuracy (a fraction) is at least this",
    ),
    (
        "patience",
        positive_int,
        "epochs a layer must stay collapsed before the rule freezes from it",
    ),
    (
        "probe_samples",
        positive_int,
        "training samples on which the per-layer NCC accuracy and NC1 are measured",
    ),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = AdaptiveETFConfig()
    about = "Adaptive-ETF MLPs vs baseline and fixed-last-k ETF layers; per-layer NCC curves"
    parser = d.add_command(subparsers, "adaptive-etf", about, main)
    parser.add_argument("--depth", type=positive_int, default=d.depth, help="hidden layers D")
    parser.add_argument("--width", type=positive_int, default=d.width, help="hidden width h")
    d.add_optimisation_arguments(parser)
    add_field_arguments(parser, d, _METHOD_OPTIONS)
    d.add_run_arguments(parser, networks=True)
