"""`nearest-etf train`: train one backbone with each classifier head on a real data set.

Every (head, seed) run uses the same backbone initialisation (torch.manual_seed(seed) before
building it), data order (a loader generator seeded with seed), optimiser and schedule, so runs
differ only in the head. After every epoch the training-set collapse metrics
(`nearest_etf.metrics.collapse_metrics`, on the features the head sees) and the test loss and
accuracy are recorded. Outputs in the output directory: metrics.csv and metrics.json (config
and one row per head, seed, epoch), comparison.png (mean over seeds, min-max band) and, for the
MLP without a head temperature, network-<head>-seed<s>.pt per run: the trained eval-mode network
as a `LayerStack` (BatchNorm folded into the linear layers, the head's
classifier as the last layer, the flattened training inputs as X; float64, so about
8 * m * in_1 bytes for the inputs) for `nearest-etf bounds`; `--no-networks` skips them.

The output directory is a run directory (docs/runs.md): metrics.csv / metrics.json are
rewritten after every epoch, each (head, seed) run is checkpointed every epoch and recorded
when it finishes, `--resume DIR` continues an interrupted invocation and a run whose loss or
weights diverge stops there, keeping its rows.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nearest_etf.experiments._common.options import (
    DATASET_HELP,
    TrainingOptions,
    add_data_arguments,
    add_optimisation_arguments,
    add_run_arguments,
    config_from_args,
    default_out_dir,
    nonnegative_float,
    positive_float,
    positive_int,
)
from nearest_etf.experiments._common.results import save_figure, write_csv
from nearest_etf.experiments._common.runs import UserError, open_run, write_json
from nearest_etf.experiments._common.training import (
    EpochLoop,
    RunSeries,
    eval_loaders,
    evaluate,
    load_training_data,
    save_network,
    step_bar,
    train_epoch,
)
from nearest_etf.experiments.data import DataSplits, make_loader
from nearest_etf.experiments.models import MODELS, Classifier, make_backbone
from nearest_etf.metrics.collapse import collapse_metrics
from nearest_etf.nn.heads import HEADS, make_head
from nearest_etf.nn.losses import LOSSES, loss_function

__all__ = [
    "TrainConfig",
    "add_parser",
    "check_config",
    "train_all",
    "train_run",
    "write_metrics",
    "write_results",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
OPTIMIZERS = ("sgd", "adam")
PLOTTED = (
    ("train_loss", "train loss"),
    ("train_accuracy", "train accuracy [%]"),
    ("test_accuracy", "test accuracy [%]"),
    ("nc1", "NC1 tr(Sw Sb+)/K"),
    ("nc2_means", "NC2 means (Gram to ETF)"),
    ("nc2_classifier", "NC2 classifier"),
    ("nc3", "NC3 self-duality"),
    ("ncc_mismatch", "NCC mismatch [%]"),
    ("nearest_etf_distance", "means to nearest ETF"),
    ("cosine_margin", "average cosine margin"),
    ("equinorm_means", "equinorm of means"),
    ("bias_collapse", "||W mu_G + b||"),
)


@dataclass(frozen=True)
class TrainConfig(TrainingOptions):
    """Options of one `nearest-etf train` invocation (see `add_parser` for their meaning)."""

    seeds: int = 3
    lr: float = 0.05
    model: str = "mlp"
    heads: tuple[str, ...] = ("learned", "fixed", "implicit")
    optimizer: str = "sgd"
    momentum: float = 0.9
    loss: str = "ce"
    widths: tuple[int, ...] = (256, 256)
    temperature: float | None = None
    delta: float = 1e-3
    average: str = "ema"
    save_networks: bool = True
    head_options: dict[str, dict[str, object]] = field(default_factory=dict)


def _optimizer(config: TrainConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _head_options(config: TrainConfig, name: str) -> dict[str, object]:
    options: dict[str, object] = {"temperature": config.temperature}
    if name == "implicit":
        options |= {"delta": config.delta, "average": config.average}
    return options | config.head_options.get(name, {})


class _Outputs:
    """Re-iterable (features the head sees, logits, labels) over a loader, model in eval mode."""

    def __init__(self, model: Classifier, loader: DataLoader, device: torch.device) -> None:
        self.model, self.loader, self.device = model, loader, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        with torch.no_grad():
            for x, y in self.loader:
                features = self.model.backbone(x.to(self.device))
                logits = self.model.head(features)
                yield self.model.head.scale_features(features), logits, y


def _model(config: TrainConfig, data: DataSplits, head_name: str) -> Classifier:
    backbone = make_backbone(config.model, data.input_shape, config.widths)
    head = make_head(
        head_name, backbone.num_features, data.num_classes, **_head_options(config, head_name)
    )
    return Classifier(backbone, head)


def check_config(config: TrainConfig, data: DataSplits) -> None:
    """Fail before any training (`UserError`): every head's network is built once on `data`
    (widths vs K, image model on vectors, head options)."""
    for head in config.heads:
        try:
            _model(config, data, head)
        except (ValueError, TypeError) as exc:
            raise UserError(f"--head {head} with --widths/--model: {exc}") from exc


def train_run(
    data: DataSplits,
    config: TrainConfig,
    head_name: str,
    seed: int,
    network_dir: Path | None = None,
    loop: EpochLoop | None = None,
) -> list[dict[str, object]]:
    """Train backbone + head `head_name` with `seed`; one metrics row per epoch. With
    `network_dir` (and an MLP without temperature) also write
    network_dir/network-<head>-seed<seed>.pt (see the module docstring). `loop` (default: a
    fresh one) checkpoints and resumes the run and stops it when it diverges (no network file
    is written then)."""
    loop = loop or EpochLoop()
    device = torch.device(config.device)
    torch.manual_seed(seed)
    model = _model(config, data, head_name).to(device)
    head = model.head
    optimizer = _optimizer(config, model.parameters())
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_fn = loss_function(config.loss, scale=config.temperature or 1.0)
    train_loader = make_loader(
        data.x_train, data.y_train, config.batch_size, shuffle=True, seed=seed, drop_last=True
    )
    eval_train, eval_test = eval_loaders(data)
    done = loop.start(model, optimizer, train_loader, schedule)
    rows = loop.rows
    bar = step_bar(config.epochs * len(train_loader), f"{head_name} seed {seed}", config.progress)
    bar.update(done * len(train_loader))
    for epoch in range(done + 1, config.epochs + 1):
        step_loss = train_epoch(
            model, train_loader, optimizer, loss_fn, bar.update, targets_to_model=True
        )
        if loop.diverged(epoch, step_loss):
            break
        schedule.step()
        model.eval()
        W, b = head.classifier()
        outputs = _Outputs(model, eval_train, device)
        metrics = collapse_metrics(outputs, W, b, data.num_classes, loss_fn=loss_fn)
        test_loss, test_accuracy = evaluate(model, eval_test, loss_fn)
        row: dict[str, object] = {
            "head": head_name,
            "seed": seed,
            "epoch": epoch,
            "train_loss": metrics.pop("loss"),
            "train_step_loss": step_loss,
            "train_accuracy": metrics.pop("accuracy"),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            **metrics,
        }
        rows.append(row)
        bar.set_postfix(test_acc=f"{test_accuracy:.1f}", nc1=f"{metrics['nc1']:.3g}")
        loop.end_epoch(epoch)
    bar.close()
    if (
        loop.divergence is None
        and network_dir is not None
        and config.save_networks
        and config.model == "mlp"
        and config.temperature is None
    ):
        path = network_dir / f"network-{head_name}-seed{seed}.pt"
        save_network(model, data, path, "train", config, rows[-1], "head")
    return rows


def train_all(
    config: TrainConfig, data: DataSplits | None = None, runs: RunSeries | None = None
) -> list[dict[str, object]]:
    """train_run for every head and seed 0..seeds-1 on the configured data set; with `runs`
    in a run directory, the runs are recorded there (run keys <head>-seed<s>) and the networks
    written into it."""
    data = data if data is not None else load_training_data(config)
    runs = runs or RunSeries()
    network_dir = None if runs.directory is None else runs.directory.path
    for seed in range(config.seeds):
        for head in config.heads:
            runs.run(
                f"{head}-seed{seed}",
                lambda loop, h=head, s=seed: train_run(data, config, h, s, network_dir, loop),
            )
    return runs.rows


def _plot(rows: Sequence[dict[str, object]], heads: Sequence[str], path: Path) -> None:
    """One panel per metric: mean over seeds vs epoch per head, min-max band."""
    cols = 4
    fig = Figure(figsize=(4 * cols, 3 * math.ceil(len(PLOTTED) / cols)))
    for i, (key, title) in enumerate(PLOTTED):
        ax = fig.add_subplot(math.ceil(len(PLOTTED) / cols), cols, i + 1)
        for head in heads:
            mine = [r for r in rows if r["head"] == head]
            epochs = sorted({int(r["epoch"]) for r in mine})
            # seeds per epoch (a diverged run ends early); all-NaN epochs are not drawn
            values = [np.array([float(r[key]) for r in mine if r["epoch"] == e]) for e in epochs]
            keep = [i for i, v in enumerate(values) if not np.isnan(v).all()]
            if not keep:
                continue
            x = [epochs[i] for i in keep]
            (line,) = ax.plot(x, [np.nanmean(values[i]) for i in keep], label=head)
            ax.fill_between(
                x,
                [np.nanmin(values[i]) for i in keep],
                [np.nanmax(values[i]) for i in keep],
                color=line.get_color(),
                alpha=0.2,
            )
        if key in ("nc1", "bias_collapse") and ax.has_data():
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def write_metrics(
    rows: Sequence[dict[str, object]], config: TrainConfig, out_dir: Path
) -> dict[str, Path]:
    """Write metrics.csv and metrics.json (config + rows) into out_dir (atomically)."""
    paths = {"csv": out_dir / "metrics.csv", "json": out_dir / "metrics.json"}
    write_csv(rows, paths["csv"])
    write_json(paths["json"], {"config": asdict(config), "rows": list(rows)})
    return paths


def write_results(
    rows: Sequence[dict[str, object]], config: TrainConfig, out_dir: Path
) -> dict[str, Path]:
    """Write metrics.csv, metrics.json (config + rows) and comparison.png into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_metrics(rows, config, out_dir)
    paths["png"] = out_dir / "comparison.png"
    _plot(rows, config.heads, paths["png"])
    return paths


def _summary(rows: Sequence[dict[str, object]], config: TrainConfig) -> str:
    """Final-epoch test accuracy and NC metrics per head, mean +- std over the seeds whose run
    reached the last epoch (diverged runs end earlier)."""
    keys = ("test_accuracy", "train_accuracy", "nc1", "nc2_means", "nc3", "ncc_mismatch")
    lines = [f"{'head':<10}" + "".join(f"{k:>22}" for k in keys)]
    for head in config.heads:
        final = [r for r in rows if r["head"] == head and r["epoch"] == config.epochs]
        cells = []
        for key in keys:
            values = np.array([float(r[key]) for r in final])
            cell = f"{values.mean():>13.4g} +- {values.std():<6.2g}" if final else "diverged"
            cells.append(f"{cell:>22}")
        lines.append(f"{head:<10}" + "".join(cells))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    heads = tuple(HEADS) if args.head == "all" else (args.head,)
    config = config_from_args(TrainConfig, args, heads=heads, widths=tuple(args.widths))
    data = load_training_data(config)
    check_config(config, data)
    default = default_out_dir("train", f"{Path(args.dataset).name}-{args.model}")
    with open_run(args, "train", {"config": asdict(config)}, default) as run:
        runs = RunSeries(run, lambda rows: write_metrics(rows, config, run.path))
        rows = train_all(config, data, runs)
        paths = write_results(rows, config, run.path)
    print(_summary(rows, config))
    if runs.diverged:
        print(runs.report())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    parser = subparsers.add_parser(
        "train", help="train a backbone with each classifier head; collapse metrics per epoch"
    )
    add_data_arguments(parser, d, DATASET_HELP + " or CIFAR-10 python batches")
    parser.add_argument("--model", choices=MODELS, default=d.model)
    parser.add_argument("--head", choices=(*HEADS, "all"), default="all")
    add_optimisation_arguments(parser, d)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    parser.add_argument(
        "--momentum", type=nonnegative_float, default=d.momentum, help="SGD momentum"
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default=d.loss,
        help="ce: cross-entropy, mse: MSE to one-hot, dr: dot regression (scale = temperature)",
    )
    parser.add_argument(
        "--widths",
        type=positive_int,
        nargs="+",
        default=list(d.widths),
        help="MLP hidden widths; the last is the feature dimension d",
    )
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=d.temperature,
        help="normalise the features to this norm before every head (default: off)",
    )
    parser.add_argument(
        "--delta", type=nonnegative_float, default=d.delta, help="implicit head prox weight"
    )
    parser.add_argument("--average", choices=("ema", "cma", "none"), default=d.average)
    add_run_arguments(parser, d, device_help="cpu, cuda, cuda:1, ...", threads=False, networks=True)
    parser.set_defaults(func=main)
