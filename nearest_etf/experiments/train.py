"""`nearest-etf train`: train one backbone with each classifier head on a real data set.

Every (head, seed) run uses the same backbone initialisation (torch.manual_seed(seed) before
building it), data order (a loader generator seeded with seed), augmentation, optimiser and
schedule, so runs differ only in the head. Each head is built with its own defaults unless an
option overrides them (`--temperature` for every head). After every epoch the training-set
collapse metrics (`nearest_etf.metrics.collapse_metrics`, on the features the head sees) and
the test loss and accuracy are recorded.

A run whose training loss, or the features or logits of its head, become non-finite stops
there (`NonFiniteError`); its last row has status "diverged", the reason in `error` and no
metrics, and the other runs go on. Outputs in the output directory: metrics.csv and
metrics.json (config and one row per head, seed, epoch), comparison.png (mean over seeds,
min-max band, runs that did not diverge) and, for the MLP with a head without temperature,
network-<head>-seed<s>.pt per run: the trained eval-mode network as a
`LayerStack` (BatchNorm folded into the linear layers, the head's
classifier as the last layer, the flattened training inputs as X; float64, so about
8 * m * in_1 bytes for the inputs) for `nearest-etf bounds`; `--no-networks` skips them.

The output directory is a run directory (docs/runs.md): metrics.csv / metrics.json are
rewritten after every epoch, each (head, seed) run is checkpointed every epoch and recorded
when it finishes, `--resume DIR` continues an interrupted invocation and a run whose loss or
weights diverge stops there, keeping its rows.

Under torchrun (`torchrun --nproc_per_node N -m nearest_etf train ...`) the runs train with
DistributedDataParallel: `--batch-size` is the per-rank batch, so a step sees N times as many
samples; only rank 0 writes and prints (docs/heads.md, "Several processes").
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nearest_etf.experiments._common import distributed
from nearest_etf.experiments._common.options import (
    DATASET_HELP,
    TrainingOptions,
    comma_list,
    config_from_args,
    nonnegative_float,
    positive_int,
)
from nearest_etf.experiments._common.plotting import (
    PERCENT,
    line_styles,
    style_axes,
    suptitle,
)
from nearest_etf.experiments._common.results import Rows, save_figure, write_metrics
from nearest_etf.experiments._common.runs import UserError, write_text
from nearest_etf.experiments._common.training import (
    EpochLoop,
    RunSeries,
    TrainingRun,
    crop_flip,
    evaluate,
    run_training_command,
    train_epoch,
)
from nearest_etf.experiments.data import DataSplits
from nearest_etf.experiments.models import MODELS, Classifier, make_backbone
from nearest_etf.metrics.collapse import collapse_metrics
from nearest_etf.nn.heads import HEADS, NonFiniteError, make_head
from nearest_etf.nn.losses import LOSSES, loss_function

__all__ = [
    "DEFAULT_THRESHOLDS",
    "TrainConfig",
    "add_parser",
    "check_config",
    "summarise",
    "train_all",
    "train_run",
    "write_metrics",
    "write_results",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
OPTIMIZERS = ("sgd", "adam")
# TrainConfig.temperature: "default" builds each head with its own default temperature.
HEAD_DEFAULT = "default"
THRESHOLD_KEYS = ("train_error", "nc1", "nc2_means", "nc2_classifier", "nc3", "ncc_mismatch")
DEFAULT_THRESHOLDS = {"train_error": 0.01, "nc1": 0.5, "nc2_means": 0.5, "nc3": 0.3}
# (row key, axis label, display factor): rates are stored as fractions and shown in percent
PLOTTED = (
    ("train_loss", "train loss", 1.0),
    ("train_accuracy", "train accuracy [%]", PERCENT),
    ("test_accuracy", "test accuracy [%]", PERCENT),
    ("nc1", "NC1 tr(Sw Sb+)/K", 1.0),
    ("nc2_means", "NC2 means (Gram to ETF)", 1.0),
    ("nc2_classifier", "NC2 classifier", 1.0),
    ("nc3", "NC3 self-duality", 1.0),
    ("ncc_mismatch", "NCC mismatch [%]", PERCENT),
    ("nearest_etf_distance", "means to nearest ETF", 1.0),
    ("cosine_margin", "average cosine margin", 1.0),
    ("equinorm_means", "equinorm of means (std/mean)", 1.0),
    ("bias_collapse", "||W mu_G + b||", 1.0),
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
    temperature: float | str | None = HEAD_DEFAULT
    delta: float = 1e-3
    average: str = "ema"
    solve_every: int = 1
    augment: bool = False
    normalize_rows: bool = False
    balanced_batches: bool = False
    save_networks: bool = True
    head_options: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return f"{super().run_name}-{self.model}"


def _optimizer(config: TrainConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _head_options(config: TrainConfig, name: str) -> dict[str, object]:
    options: dict[str, object] = {}
    if config.temperature != HEAD_DEFAULT:
        options["temperature"] = config.temperature
    if name == "implicit":
        options |= {
            "delta": config.delta,
            "average": config.average,
            "solve_every": config.solve_every,
        }
    if name == "learned" and config.normalize_rows:
        options["normalize_rows"] = True
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
    """Fail before any training (`UserError`): options the data or the launch cannot serve
    (--augment on vectors, --balanced-batches under torchrun), and every head's network built
    once on `data` (widths vs K, image model on vectors, head options)."""
    _augmentation(config, data, seed=0)
    if config.balanced_batches and distributed.launched():
        raise UserError("--balanced-batches is not supported under torchrun")
    for head in config.heads:
        try:
            _model(config, data, head)
        except (ValueError, TypeError) as exc:
            raise UserError(f"--head {head} with --widths/--model: {exc}") from exc


def _augmentation(config: TrainConfig, data: DataSplits, seed: int) -> torch.Generator | None:
    """The generator of `crop_flip`, seeded by `seed`, when config.augment (images only)."""
    if not config.augment:
        return None
    if len(data.input_shape) != 3:
        raise UserError(
            f"--augment (random crop + flip) needs image data [C, H, W]; {data.name} has inputs "
            f"of shape {data.input_shape}"
        )
    return torch.Generator().manual_seed(seed)


def train_run(
    data: DataSplits,
    config: TrainConfig,
    head_name: str,
    seed: int,
    network_dir: Path | None = None,
    loop: EpochLoop | None = None,
) -> list[dict[str, object]]:
    """Train backbone + head `head_name` with `seed`; one metrics row per epoch (status "ok"),
    and a last row with status "diverged" and the reason if the run diverged (see the module
    docstring). With `network_dir` (an MLP and a head without temperature) also write
    network_dir/network-<head>-seed<seed>.pt. `loop` (default: a fresh one) checkpoints and
    resumes the run and stops it when it diverges (no network file is written then)."""
    loop = loop or EpochLoop()
    return _train(
        TrainingRun(data, config, head_name, seed, loop, network_dir, config.balanced_batches)
    )


def _train(run: TrainingRun) -> list[dict[str, object]]:
    """`train_run` of a `TrainingRun` (networks written into its out_dir)."""
    data, config, head_name, seed, loop = run.data, run.config, run.name, run.seed, run.loop
    model = _model(config, data, head_name).to(run.device)
    trained = distributed.parallel_model(model)
    head = model.head
    optimizer = _optimizer(config, model.parameters())
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_fn = loss_function(config.loss, scale=head.temperature or 1.0)
    augment = _augmentation(config, data, seed)
    epochs, bar = run.start(model, optimizer, schedule)
    rows = loop.rows
    if augment is not None and "augment_generator" in loop.extra:
        augment.set_state(loop.extra["augment_generator"])
    transform = None if augment is None else (lambda x: crop_flip(x, augment))
    for epoch in epochs:
        row: dict[str, object] = {"head": head_name, "seed": seed, "epoch": epoch}
        try:
            step_loss = train_epoch(
                trained,
                run.loader,
                optimizer,
                loss_fn,
                bar.update,
                targets_to_model=True,
                transform=transform,
                epoch=epoch,
            )
            if loop.diverged(epoch, step_loss):
                break
            schedule.step()
            model.eval()
            W, b = head.classifier()
            outputs = _Outputs(model, run.eval_train, run.device)
            metrics = collapse_metrics(outputs, W, b, data.num_classes, loss_fn=loss_fn)
            test_loss, test_accuracy = evaluate(model, run.eval_test, loss_fn)
        except NonFiniteError as error:
            loop.record_divergence(epoch, str(error))
            break
        row |= {
            "status": "ok",
            "error": "",
            "train_loss": metrics.pop("loss"),
            "train_step_loss": step_loss,
            "train_accuracy": metrics.pop("accuracy"),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            **metrics,
        }
        rows.append(row)
        bar.set_postfix(test_acc=f"{test_accuracy:.3f}", nc1=f"{metrics['nc1']:.3g}")
        loop.end_epoch(
            epoch, None if augment is None else {"augment_generator": augment.get_state()}
        )
    bar.close()
    if loop.divergence is not None:
        epoch, reason = loop.divergence["diverged_epoch"], loop.divergence["reason"]
        rows.append(
            {"head": head_name, "seed": seed, "epoch": epoch, "status": "diverged"}
            | {"error": f"epoch {epoch}: {reason}"}
        )
        bar.write(f"{head_name} seed {seed} diverged in epoch {epoch}: {reason}")
    if config.model == "mlp" and head.temperature is None and rows[-1]["status"] == "ok":
        run.save_network(model, "train", "head")
    return rows


def train_all(
    config: TrainConfig, data: DataSplits | None = None, runs: RunSeries | None = None
) -> list[dict[str, object]]:
    """train_run for every head and seed 0..seeds-1 on the configured data set; with `runs`
    in a run directory, the runs are recorded there (run keys <head>-seed<s>) and the networks
    written into it."""
    runs = runs or RunSeries()
    return runs.run_all(config, data, config.heads, _train, balanced=config.balanced_batches)


def _plot(rows: Rows, config: TrainConfig, path: Path) -> None:
    """One panel per metric: mean over seeds vs epoch per head, min-max band (runs that
    did not diverge only)."""
    diverged = {(r["head"], r["seed"]) for r in rows if r["status"] != "ok"}
    rows = [r for r in rows if (r["head"], r["seed"]) not in diverged]
    cols = 4
    fig = Figure(figsize=(4 * cols, 3.2 * math.ceil(len(PLOTTED) / cols)), layout="constrained")
    for i, (key, label, factor) in enumerate(PLOTTED):
        ax = fig.add_subplot(math.ceil(len(PLOTTED) / cols), cols, i + 1)
        for head, style in zip(config.heads, line_styles(), strict=False):
            mine = [r for r in rows if r["head"] == head]
            epochs = sorted({int(r["epoch"]) for r in mine})
            # seeds per epoch (a diverged run ends early); all-NaN epochs are not drawn
            values = [
                factor * np.array([float(r[key]) for r in mine if r["epoch"] == e]) for e in epochs
            ]
            keep = [i for i, v in enumerate(values) if not np.isnan(v).all()]
            if not keep:
                continue
            x = [epochs[i] for i in keep]
            ax.plot(x, [np.nanmean(values[i]) for i in keep], label=head, **style)
            ax.fill_between(
                x,
                [np.nanmin(values[i]) for i in keep],
                [np.nanmax(values[i]) for i in keep],
                color=style["color"],
                alpha=0.2,
            )
        if key in ("nc1", "bias_collapse") and ax.has_data():
            ax.set_yscale("log")
        style_axes(ax, xlabel="epoch", ylabel=label, integer_x=True, legend=i == 0)
    suptitle(
        fig,
        f"train: {config.model} on {Path(config.dataset).name}, {config.epochs} epochs; "
        f"mean over {config.seeds} seeds, band min-max",
    )
    save_figure(fig, path)


def write_results(
    rows: Rows, config: TrainConfig, out_dir: Path, figure_format: str = "png"
) -> dict[str, Path]:
    """Write metrics.csv, metrics.json (config + rows) and the figure comparison.<format>
    into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_metrics(rows, config, out_dir)
    paths["figure"] = out_dir / f"comparison.{figure_format}"
    _plot(rows, config, paths["figure"])
    return paths


def _value(row: dict[str, object], key: str) -> float:
    if key == "train_error":
        return 1.0 - float(row["train_accuracy"])  # type: ignore[arg-type]
    return float(row[key])  # type: ignore[arg-type]


def _cell(values: Sequence[float]) -> str:
    array = np.asarray(values, dtype=float)
    return f"{array.mean():.4g} +- {array.std():.2g}"


def summarise(
    rows: Rows,
    heads: Sequence[str],
    thresholds: dict[str, float] | None = None,
) -> str:
    """The printed summary of a `train` run.

    1. Final epoch, per head, over the runs that did not diverge: mean +- std over the seeds
       of the test and train accuracy, NC1, NC2 (means), NC3, NCC mismatch, and the test
       accuracy's min and max.
    2. Per head and metric of `thresholds` (default DEFAULT_THRESHOLDS; keys: row metrics or
       "train_error" = 1 - train accuracy, a fraction): the first epoch with metric <= threshold,
       as the median over the seeds that reach it, [min, max] and how many seeds reach it.
    3. One line per diverged run with its reason.
    """
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    diverged = {(r["head"], r["seed"]) for r in rows if r["status"] != "ok"}
    done = [r for r in rows if (r["head"], r["seed"]) not in diverged]
    last = max((int(r["epoch"]) for r in done), default=0)  # type: ignore[call-overload]
    keys = ("test_accuracy", "train_accuracy", "nc1", "nc2_means", "nc3", "ncc_mismatch")
    lines = [f"final epoch ({last}), mean +- std over seeds:"]
    lines.append(
        f"{'head':<10}{'seeds':>6}" + "".join(f"{k:>20}" for k in keys) + "   test min, max"
    )
    for head in heads:
        final = [r for r in done if r["head"] == head and r["epoch"] == last]
        if not final:
            lines.append(f"{head:<10} no run completed")
            continue
        test = [_value(r, "test_accuracy") for r in final]
        lines.append(
            f"{head:<10}{len(final):>6}"
            + "".join(f"{_cell([_value(r, k) for r in final]):>20}" for k in keys)
            + f"   {min(test):.4g}, {max(test):.4g}"
        )
    lines += ["", "first epoch at or below the threshold: median over seeds [min, max] (seeds)"]
    header = "".join(f"{f'{k} <= {v:g}':>26}" for k, v in thresholds.items())
    lines.append(f"{'head':<10}" + header)
    for head in heads:
        cells = []
        for key, limit in thresholds.items():
            first = []
            seeds = sorted({r["seed"] for r in done if r["head"] == head})
            for seed in seeds:
                mine = [r for r in done if r["head"] == head and r["seed"] == seed]
                epochs = [int(r["epoch"]) for r in mine if _value(r, key) <= limit]  # type: ignore[call-overload]
                if epochs:
                    first.append(min(epochs))
            cell = (
                f"{np.median(first):g} [{min(first)}, {max(first)}] ({len(first)}/{len(seeds)})"
                if first
                else f"- (0/{len(seeds)})"
            )
            cells.append(f"{cell:>26}")
        lines.append(f"{head:<10}" + "".join(cells))
    lines += [
        f"{r['head']} seed {r['seed']} diverged in {r['error']}"
        for r in rows
        if r["status"] != "ok"
    ]
    return "\n".join(lines)


def _thresholds(text: str) -> dict[str, float]:
    """argparse type of --thresholds: key=value,... with keys of THRESHOLD_KEYS."""
    found = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in THRESHOLD_KEYS:
            raise argparse.ArgumentTypeError(
                f"unknown threshold {key!r}; choose from {', '.join(THRESHOLD_KEYS)}"
            )
        try:
            found[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad threshold value in {item!r}") from None
    return found


def main(args: argparse.Namespace) -> None:
    if args.summarise is not None:
        try:
            stored = json.loads(args.summarise.read_text())
            rows, heads = stored["rows"], stored["config"]["heads"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"--summarise {args.summarise}: not a train metrics.json ({exc})"
            ) from exc
        if any(
            isinstance(r.get(key), int | float) and r[key] > 1
            for r in rows
            for key in ("test_accuracy", "train_accuracy")
        ):
            raise UserError(
                f"--summarise {args.summarise}: accuracies above 1, i.e. stored in percent by an "
                "earlier version of the package (rates are fractions now); rerun the training"
            )
        text = summarise(rows, heads, args.thresholds)
        write_text(args.summarise.parent / "summary.txt", text + "\n")
        print(text)
        return
    config = config_from_args(TrainConfig, args, heads=args.head, widths=tuple(args.widths))
    run_training_command(
        args,
        config,
        train_all,
        write_results,
        lambda rows, config: summarise(rows, config.heads, args.thresholds),
        check_config,
        summary_file=True,
    )


def _heads(text: str) -> tuple[str, ...]:
    """argparse type of --head: a comma list of HEADS (`comma_list`), or 'all'."""
    return tuple(HEADS) if text == "all" else tuple(comma_list(choices=HEADS)(text))


def _temperature(text: str) -> float | str | None:
    """argparse type of --temperature: a positive number, 'auto', 'none' or 'default'."""
    if text in (HEAD_DEFAULT, "auto"):
        return text
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, 'auto', 'none' or 'default', got {text!r}"
        ) from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the temperature must be positive, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    parser = d.add_command(
        subparsers,
        "train",
        "train a backbone with each classifier head; collapse metrics per epoch",
        main,
        DATASET_HELP + " or CIFAR-10 python batches",
    )
    parser.add_argument("--model", choices=MODELS, default=d.model)
    parser.add_argument(
        "--head",
        type=_heads,
        default=",".join(d.heads),
        help=f"comma-separated heads of {', '.join(HEADS)}, or 'all'",
    )
    d.add_optimisation_arguments(parser)
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
        type=_temperature,
        default=d.temperature,
        help="feature norm tau before every head: a number, 'auto' (the ETF heads' rule "
        "from K), 'none' (no normalisation) or 'default' (each head's own default: auto for "
        "the ETF heads, none for the learned head)",
    )
    parser.add_argument(
        "--delta", type=nonnegative_float, default=d.delta, help="implicit head prox weight"
    )
    parser.add_argument("--average", choices=("ema", "cma", "none"), default=d.average)
    parser.add_argument(
        "--solve-every",
        type=positive_int,
        default=d.solve_every,
        help="implicit head: re-solve the frame every k-th step (docs/heads.md, 'Solving every "
        "k steps')",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="random crop (4-pixel zero padding) and horizontal flip of training images",
    )
    parser.add_argument(
        "--normalize-rows",
        action="store_true",
        help="learned head: classifier rows normalised to unit norm (LearnedHead(normalize_rows))",
    )
    parser.add_argument(
        "--balanced-batches",
        action="store_true",
        help="class-stratified training batches (about batch_size/K samples per class, as the "
        "paper's reference code) instead of uniformly shuffled ones",
    )
    d.add_run_arguments(parser, device_help="cpu, cuda, cuda:1, ...", threads=False, networks=True)
    parser.add_argument(
        "--thresholds",
        type=_thresholds,
        default=None,
        help="collapse thresholds of the summary, key=value,... (keys: "
        + ", ".join(THRESHOLD_KEYS)
        + "; train_error = 1 - train accuracy, a fraction; default: "
        + ",".join(f"{k}={v:g}" for k, v in DEFAULT_THRESHOLDS.items())
        + ")",
    )
    parser.add_argument(
        "--summarise",
        type=Path,
        default=None,
        metavar="METRICS_JSON",
        help="print (and write summary.txt next to it) the summary of a stored run's "
        "metrics.json instead of training",
    )
