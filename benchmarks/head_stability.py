"""Do the heads train out of the box? Final test accuracy and rising-loss check per head,
optimiser, learning rate and data set.

Set-up (a newcomer's first use): a ReLU MLP in -> 128 -> 64 (no BatchNorm) whose last
nn.Linear(64, K) is replaced by a head built with only (d, K) (or with the options of a
variant), cross-entropy, batch 64, constant learning rate, no weight decay, `--epochs` epochs.

- digits: scikit-learn's 8x8 digits, inputs x/16, a random split (NumPy generator seed 0) into
  1400 training and 397 test images.
- mnist1d: `nearest_etf.experiments.data.load_mnist1d()` (4000 / 1000, standardised).

Per run: the final test accuracy (eval mode), the final epoch's mean training loss, and
whether the loss "rose": some epoch's mean training loss exceeded 10x the lowest epoch mean
before it, or the run stopped on a non-finite loss or a head's NonFiniteError ("diverged").
The table gives, per (data set, head, optimiser, lr), the mean and min-max of the test
accuracy over the seeds and how many seeds rose or diverged.

    python benchmarks/head_stability.py                       # the default heads, full grid
    python benchmarks/head_stability.py --datasets digits --optimizers adam --lrs-adam 1e-3 \\
        --variant implicit-t5:implicit:temperature=5 --variant fixed-id:fixed:rotation=identity

A variant is NAME:HEAD[:key=value,...] (values: numbers, none, true, false, words or 'quoted'
strings, e.g. average='none'). Results go to --json (one record per run, with the epoch
losses) and the tables to stdout (`--table FILE` reprints them from a stored --json); runs are
single-threaded.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from nearest_etf.experiments.data import load_mnist1d
from nearest_etf.nn.heads import HEADS, NonFiniteError, make_head

DATASETS = ("digits", "mnist1d")
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LRS = {"sgd": (0.01, 0.03, 0.1), "adam": (1e-4, 1e-3, 1e-2)}
SGD_MOMENTUM = 0.9
BATCH = 64
RISE = 10.0


@dataclass(frozen=True)
class Variant:
    """A head built as make_head(head, d, K, **options), reported as `name`."""

    name: str
    head: str
    options: dict[str, object] = field(default_factory=dict)


def _value(text: str) -> object:
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    if text == "none":
        return None
    if text in ("true", "false"):
        return text == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if text.lstrip("-").isdigit() else number


def parse_variant(text: str) -> Variant:
    """NAME:HEAD[:key=value,...] -> Variant."""
    name, head, *rest = text.split(":")
    if head not in HEADS:
        raise argparse.ArgumentTypeError(f"unknown head {head!r} in variant {text!r}")
    options = {}
    for item in rest[0].split(",") if rest and rest[0] else []:
        key, _, value = item.partition("=")
        options[key] = _value(value)
    return Variant(name, head, options)


def load(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) of the data set `name` (see the module docstring)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        order = np.random.default_rng(0).permutation(len(bunch.target))
        x = torch.tensor(bunch.data[order] / 16, dtype=torch.float32)
        y = torch.tensor(bunch.target[order], dtype=torch.long)
        return x[:1400], y[:1400], x[1400:], y[1400:]
    data = load_mnist1d()
    return data.x_train, data.y_train, data.x_test, data.y_test


def network(in_features: int, head: nn.Module) -> nn.Module:
    """ReLU MLP in -> 128 -> 64 followed by `head` (called with the targets in training)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Linear(in_features, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()
            )
            self.head = head

        def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
            return self.head(self.body(x), y)

    return Net()


def run(
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    variant: Variant,
    optimizer_name: str,
    lr: float,
    seed: int,
    epochs: int,
) -> dict[str, object]:
    """Train one network; the record of the module docstring."""
    x_train, y_train, x_test, y_test = data
    K = int(y_train.max()) + 1
    torch.manual_seed(seed)
    model = network(x_train.shape[1], make_head(variant.head, 64, K, **variant.options))
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=SGD_MOMENTUM
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    status = "ok"
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total, steps = 0.0, 0
        for start in range(0, len(order) - BATCH + 1, BATCH):
            index = order[start : start + BATCH]
            try:
                loss = nn.functional.cross_entropy(
                    model(x_train[index], y_train[index]), y_train[index]
                )
            except NonFiniteError:
                status = "diverged"
                break
            if not math.isfinite(loss.item()):
                status = "diverged"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        if status != "ok":
            break
        losses.append(total / steps)
    rose = status != "ok" or any(losses[i] > RISE * min(losses[:i]) for i in range(1, len(losses)))
    accuracy = math.nan
    if status == "ok":
        model.eval()
        with torch.no_grad():
            try:
                accuracy = 100 * float((model(x_test).argmax(1) == y_test).float().mean())
            except NonFiniteError:
                status = "diverged"
    return {
        "variant": variant.name,
        "optimizer": optimizer_name,
        "lr": lr,
        "seed": seed,
        "test_accuracy": accuracy,
        "final_loss": losses[-1] if losses else math.nan,
        "max_rise": max((losses[i] / min(losses[:i]) for i in range(1, len(losses))), default=1.0),
        "rose": rose,
        "status": status,
        "epoch_losses": losses,
    }


def _groups(
    records: Sequence[dict[str, object]], fields: tuple[str, ...]
) -> dict[tuple[object, ...], list[dict[str, object]]]:
    """The records grouped by their values of `fields`, in order of first appearance."""
    groups: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for r in records:
        groups.setdefault(tuple(r[f] for f in fields), []).append(r)
    return groups


def _rose_diverged(group: Sequence[dict[str, object]]) -> str:
    """The cell "rose/diverged of runs": the runs whose loss rose tenfold, those that
    diverged, and all runs of `group`."""
    rose = sum(bool(r["rose"]) for r in group)
    diverged = sum(r["status"] != "ok" for r in group)
    return f"{rose}/{diverged} of {len(group)}"


def table(records: Sequence[dict[str, object]]) -> str:
    """One line per (data set, variant, optimiser, lr): test accuracy mean [min, max] over the
    seeds, final loss mean, seeds whose loss rose tenfold or diverged."""
    lines = [
        f"{'dataset':<8} {'head':<18} {'optim':<5} {'lr':>7} {'test acc [%] mean [min, max]':>30} "
        f"{'final loss':>11} {'rose/diverged':>14}"
    ]
    groups = _groups(records, ("dataset", "variant", "optimizer", "lr"))
    for (dataset, variant, optimizer, lr), group in groups.items():
        acc = np.array([float(r["test_accuracy"]) for r in group])
        finite = acc[np.isfinite(acc)]
        cell = (
            f"{finite.mean():.1f} [{finite.min():.1f}, {finite.max():.1f}]" if finite.size else "-"
        )
        loss = statistics.fmean(float(r["final_loss"]) for r in group)
        lines.append(
            f"{dataset:<8} {variant:<18} {optimizer:<5} {lr:>7g} {cell:>30} {loss:>11.4f} "
            f"{_rose_diverged(group):>14}"
        )
    return "\n".join(lines)


def overview(records: Sequence[dict[str, object]]) -> str:
    """One line per (data set, variant) over its whole optimiser x lr grid: the mean test
    accuracy over every run, the worst (optimiser, lr) cell's mean, and the runs that rose or
    diverged."""
    lines = [
        f"{'dataset':<8} {'head':<18} {'mean acc':>9} {'worst cell':>11} {'rose/diverged':>14}"
    ]
    for (dataset, variant), group in _groups(records, ("dataset", "variant")).items():
        cells = _groups(group, ("optimizer", "lr")).values()
        mean = statistics.fmean(float(r["test_accuracy"]) for r in group)
        worst = min(statistics.fmean(float(r["test_accuracy"]) for r in cell) for cell in cells)
        lines.append(
            f"{dataset:<8} {variant:<18} {mean:>9.1f} {worst:>11.1f} {_rose_diverged(group):>14}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--lrs-sgd", type=float, nargs="+", default=list(DEFAULT_LRS["sgd"]))
    parser.add_argument("--lrs-adam", type=float, nargs="+", default=list(DEFAULT_LRS["adam"]))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="NAME:HEAD[:key=value,...] (repeatable); default: the three heads with defaults",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the run records here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--table", type=Path, default=None, help="print the tables of a stored --json and exit"
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        records = json.loads(args.table.read_text())["records"]
        print(table(records) + "\n\n" + overview(records))
        return
    torch.set_num_threads(args.threads)
    variants = args.variant or [Variant(name, name) for name in HEADS]
    lrs = {"sgd": args.lrs_sgd, "adam": args.lrs_adam}
    records: list[dict[str, object]] = []
    start = time.perf_counter()
    for dataset in args.datasets:
        data = load(dataset)
        for variant in variants:
            for optimizer in args.optimizers:
                for lr in lrs[optimizer]:
                    for seed in range(args.seeds):
                        record = run(data, variant, optimizer, lr, seed, args.epochs)
                        records.append({"dataset": dataset, **record})
                        if args.json is not None:
                            args.json.write_text(
                                json.dumps(
                                    {
                                        "args": {
                                            **vars(args),
                                            "variant": [asdict(v) for v in variants],
                                            "json": str(args.json),
                                        },
                                        "records": records,
                                    },
                                    indent=1,
                                )
                            )
    print(table(records) + "\n\n" + overview(records))
    print(f"{len(records)} runs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
