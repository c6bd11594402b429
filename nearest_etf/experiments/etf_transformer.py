"""`nearest-etf etf-transformer`: a small patch transformer classifier with and without simplex-ETF
feed-forward layers (the ETF-Transformer of Liu, arXiv 2412.00884).

Model (`PatchTransformer`): the flattened input x [L] is cut into L/p patches of length p (the
tokens), embedded by a Linear(p, d) plus a learned position embedding, passed through
`nn.TransformerEncoderLayer` blocks (pre-norm, ReLU, no dropout; model width d, FFN width f),
mean-pooled over tokens, layer-normed and classified by a Linear(d, K). With ETF feed-forward
layers, both FFN linears of every block (linear1 [f, d], linear2 [d, f]) are converted by
`etf_layers.convert_to_etf` at initialisation: "canonical" (the identity frame) or "nearest"
(the ETF nearest to the random initial weight, i.e. a random frame); their biases stay
trainable. All variants start from the same initialisation and data order per seed and train
with AdamW and cross-entropy.

Outputs in the output directory: metrics.csv / metrics.json (one row per variant, seed and
epoch), summary.csv / summary.json (final accuracies, trainable parameters, seconds per run) and
accuracy.<format>. The output directory is a run directory (docs/runs.md): metrics are written after
every epoch, runs are checkpointed every epoch and `--resume DIR` continues an interrupted one.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from nearest_etf.experiments._common import distributed
from nearest_etf.experiments._common.options import TrainingOptions, config_from_args, positive_int
from nearest_etf.experiments._common.results import (
    ACCURACY_PANELS,
    Rows,
    final_summaries,
    format_final_table,
    plot_mean_curves,
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
from nearest_etf.nn.etf_layers import convert_to_etf, trainable_parameters

__all__ = [
    "VARIANTS",
    "ETFTransformerConfig",
    "PatchTransformer",
    "add_parser",
    "feed_forward_names",
    "run_etf_transformer",
]

VARIANTS = ("baseline", "etf-canonical", "etf-nearest")


class PatchTransformer(nn.Module):
    """logits [N, K] = Linear(LayerNorm(mean_t Encoder(Embed(patches(x)) + pos)_t)) for inputs
    x [N, ...] with L = prod(...) features, cut into L/p tokens of length p."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        patch_size: int = 4,
        width: int = 64,
        ffn_width: int = 128,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if in_features % patch_size:
            raise ValueError(
                f"patch size {patch_size} does not divide the {in_features} input features"
            )
        if width % heads:
            raise ValueError(f"width {width} must be divisible by the number of heads {heads}")
        self.patch_size = patch_size
        self.embed = nn.Linear(patch_size, width)
        self.position = nn.Parameter(0.02 * torch.randn(in_features // patch_size, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, ffn_width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.reshape(len(x), -1, self.patch_size)) + self.position
        for block in self.blocks:
            tokens = block(tokens)
        return self.classifier(self.norm(tokens.mean(dim=1)))


def feed_forward_names(model: nn.Module) -> list[str]:
    """Qualified names of the FFN linears (linear1, linear2) of every TransformerEncoderLayer."""
    return [
        f"{name}.{part}"
        for name, module in model.named_modules()
        if isinstance(module, nn.TransformerEncoderLayer)
        for part in ("linear1", "linear2")
    ]


@dataclass(frozen=True)
class ETFTransformerConfig(TrainingOptions):
    """Options of one `nearest-etf etf-transformer` invocation (see `add_parser`)."""

    epochs: int = 15
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patch_size: int = 4
    width: int = 64
    ffn_width: int = 256
    depth: int = 2
    heads: int = 4
    variants: tuple[str, ...] = VARIANTS


def _model(config: ETFTransformerConfig, data: DataSplits) -> PatchTransformer:
    return PatchTransformer(
        math.prod(data.input_shape),
        data.num_classes,
        config.patch_size,
        config.width,
        config.ffn_width,
        config.depth,
        config.heads,
    )


def check_config(config: ETFTransformerConfig, data: DataSplits) -> None:
    """Fail before any training (`UserError`): the variants, the model's shape on `data`."""
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants:
        raise UserError(f"variants must be among {VARIANTS}, got {config.variants}")
    if len(set(config.variants)) < len(config.variants):
        raise UserError(f"--variants names a variant twice: {list(config.variants)}")
    try:
        _model(config, data)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _run(run: TrainingRun) -> list[dict[str, object]]:
    """Train one variant with one seed; one row per epoch. The run's loop checkpoints, resumes
    and stops a diverged run."""
    config, variant = run.config, run.name
    model = _model(config, run.data).to(run.device)
    if variant != "baseline":
        convert_to_etf(model, feed_forward_names(model), variant.removeprefix("etf-"))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    total_params = sum(p.numel() for p in model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    trained = distributed.parallel_model(model)
    epochs, bar = run.start(model, optimizer)
    rows = run.loop.rows
    for epoch in epochs:
        train_loss = train_epoch(trained, run.loader, optimizer, loss_fn, bar.update, epoch=epoch)
        if run.loop.diverged(epoch, train_loss):
            break
        train_accuracy, test_accuracy = run.accuracies(model)
        row: dict[str, object] = {
            "variant": variant,
            "seed": run.seed,
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "test_accuracy": test_accuracy,
            "trainable_params": trainable_parameters(model),
            "total_params": total_params,
            "seconds": run.loop.seconds(),
        }
        rows.append(row)
        bar.set_postfix(test_acc=f"{row['test_accuracy']:.3f}")
        run.loop.end_epoch(epoch)
    bar.close()
    return rows


def run_etf_transformer(
    config: ETFTransformerConfig, data: DataSplits | None = None, runs: RunSeries | None = None
) -> list[dict[str, object]]:
    """Every variant with seeds 0..seeds-1; all rows. With `runs` in a run directory the runs
    are recorded there (keys <variant>-seed<s>)."""
    runs = runs or RunSeries()
    return runs.run_all(config, data, config.variants, _run, check_config)


def _summary_rows(rows: Rows, config: ETFTransformerConfig) -> list[dict[str, object]]:
    return final_summaries(
        rows,
        "variant",
        config.variants,
        config.epochs,
        lambda _, final: {
            "trainable_params": int(final[0]["trainable_params"]),
            "total_params": int(final[0]["total_params"]),
        },
    )


def _summary(rows: Rows, config: ETFTransformerConfig) -> str:
    """The printed summary: `format_summary` of the rows' summary.csv."""
    return format_summary(_summary_rows(rows, config))


def format_summary(summary: Rows) -> str:
    """A plain-text table of summary.csv."""
    columns = (
        ("trainable", 11, lambda s: str(s["trainable_params"])),
        ("total", 9, lambda s: str(s["total_params"])),
    )
    return format_final_table(summary, "variant", 16, columns)


def write_results(
    rows: Rows, config: ETFTransformerConfig, out_dir: Path, figure_format: str = "png"
) -> dict[str, Path]:
    """metrics.csv/json, summary.csv/json and the accuracy figure (in `figure_format`) into
    out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = _summary_rows(rows, config)
    paths = write_metrics_and_summary(config, rows, summary, out_dir)
    paths["accuracy"] = out_dir / f"accuracy.{figure_format}"
    labels = {
        str(s["variant"]): f"{s['variant']} ({s.get('trainable_params', '-')} trainable)"
        for s in summary
    }
    title = (
        f"etf-transformer on {Path(config.dataset).name}: accuracy, mean over {config.seeds} seeds"
    )
    plot_mean_curves(rows, "variant", labels, ACCURACY_PANELS, paths["accuracy"], title)
    return paths


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    config = config_from_args(ETFTransformerConfig, args, variants=tuple(args.variants))
    run_training_command(args, config, run_etf_transformer, write_results, _summary, check_config)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = ETFTransformerConfig()
    about = "patch transformer classifier with and without simplex-ETF feed-forward layers"
    parser = d.add_command(subparsers, "etf-transformer", about, main)
    parser.add_argument(
        "--patch-size", type=positive_int, default=d.patch_size, help="features per token"
    )
    parser.add_argument("--width", type=positive_int, default=d.width, help="model width d")
    parser.add_argument("--ffn-width", type=positive_int, default=d.ffn_width, help="FFN width")
    parser.add_argument("--depth", type=positive_int, default=d.depth, help="encoder blocks")
    parser.add_argument("--heads", type=positive_int, default=d.heads, help="attention heads")
    d.add_optimisation_arguments(parser, lr_help="AdamW learning rate")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(d.variants))
    d.add_run_arguments(parser)
