"""The epoch loop, evaluation and network saving shared by the training commands (`train`,
`adaptive-etf`, `etf-transformer`), and the lifecycle of their runs in a run directory.

A command's runs (one per method/head/variant and seed) go through a `RunSeries`: a finished
run is read back from the run directory instead of trained again, the run in progress gets an
`EpochLoop` (in a `TrainingRun`: the run's seed, device, loaders, step bar and network file),
and the command's metrics table is rewritten after every epoch. The `EpochLoop`
is the training loop's hooks: `start` (restore model, optimiser, schedule, loader generator and
RNG from the run's checkpoint; returns the epochs already done), `diverged` (after each epoch's
steps: a non-finite or exploding loss or parameter ends the run, its rows so far are kept) and
`end_epoch` (write the checkpoint). Resumed runs are bit-identical on the CPU to uninterrupted
ones.

Under torchrun (`_common.distributed`) every rank runs the same loop on its share of each
global batch; only rank 0 writes (`open_training_run`, checkpoints, tables, networks), every
rank reads rank 0's checkpoint to resume, and every rank evaluates on the whole evaluation sets
(the ranks hold the same model, so they compute the same metrics without communicating).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from nearest_etf.experiments._common import distributed
from nearest_etf.experiments._common.options import default_out_dir
from nearest_etf.experiments._common.results import write_metrics
from nearest_etf.experiments._common.runs import (
    RunDirectory,
    UserError,
    atomic_path,
    divergence,
    open_run,
    read_manifest,
    write_text,
)
from nearest_etf.experiments.data import DataSplits, load_dataset, make_loader
from nearest_etf.experiments.layer_stack import layer_stack_of, save_layer_stack
from nearest_etf.nn.heads import NonFiniteError

__all__ = [
    "EVAL_BATCH_SIZE",
    "EpochLoop",
    "RunSeries",
    "TrainingRun",
    "check_device",
    "crop_flip",
    "eval_loaders",
    "evaluate",
    "load_training_data",
    "open_training_run",
    "run_training_command",
    "save_network",
    "step_bar",
    "train_epoch",
    "training_loader",
]

RowList = list[dict[str, object]]

EVAL_BATCH_SIZE = 1024


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    on_step: Callable[[], None] | None = None,
    *,
    targets_to_model: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    epoch: int | None = None,
) -> float:
    """One pass over `loader` in train mode, one optimiser step per batch; the mean step loss.
    With `targets_to_model` the model is called as model(x, y) (heads that track class means);
    `transform` (e.g. `crop_flip`) is applied to each input batch on the model's device.
    A head's `NonFiniteError` (non-finite features or logits) propagates: the caller records
    the divergence with the error's message.

    A step whose loss diverges (`runs.divergence`: non-finite or beyond the bound), or whose
    forward pass fails on non-finite parameters, ends the pass before its update: the return
    value is then that loss (NaN for a failed forward), for `EpochLoop.diverged`.

    Under torchrun `model` is the `distributed.parallel_model`, `loader` the rank's
    `training_loader` (its sampler gets `set_epoch(epoch)`), and each step's loss is the mean
    over the ranks, so every rank returns the loss of the global batches and takes the same
    divergence decision."""
    if epoch is not None and isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    model.train()
    device = next(model.parameters()).device
    total = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if transform is not None:
            x = transform(x)
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = loss_fn(model(x, y) if targets_to_model else model(x), y)
        except NonFiniteError:
            raise
        except ValueError:  # e.g. the nearest-ETF solve refusing non-finite class means
            if divergence(0.0, model.parameters()) is None:
                raise
            return math.nan
        value = _rank_mean(loss.detach()).item()
        if divergence(value) is not None:
            return value
        loss.backward()
        optimizer.step()
        total += value
        if on_step is not None:
            on_step()
    return total / len(loader)


def _rank_mean(x: Tensor) -> Tensor:
    """The mean of x over the ranks (x itself outside torchrun)."""
    if not distributed.is_distributed():
        return x
    total = x.clone()
    dist.all_reduce(total)
    return total / distributed.world_size()


def training_loader(
    x: Tensor, y: Tensor, batch_size: int, seed: int, *, balanced: bool = False
) -> DataLoader:
    """The shuffled training loader of a run with `seed`, incomplete last batch dropped:
    `make_loader` in one process (class-stratified batches with `balanced`), the rank's
    `distributed.training_loader` under torchrun (`batch_size` is then the per-rank batch;
    `balanced` is not supported there: `UserError`)."""
    if distributed.is_distributed():
        if balanced:
            raise UserError("--balanced-batches is not supported under torchrun")
        loader = distributed.training_loader(x, y, batch_size, seed)
        assert loader is not None
        return loader
    return make_loader(x, y, batch_size, shuffle=True, seed=seed, drop_last=True, balanced=balanced)


def open_training_run(
    args: Any, command: str, settings: Mapping[str, object], default: Path
) -> RunDirectory:
    """`open_run` on rank 0; under torchrun the other ranks wait for it and get a read-only
    view of the same directory (they read finished runs and checkpoints, never write)."""
    if not distributed.is_distributed():
        return open_run(args, command, settings, default)
    run = open_run(args, command, settings, default) if distributed.is_main() else None
    # a collective: the other ranks read the directory only after rank 0 has opened it
    path = Path(str(distributed.broadcast_object(None if run is None else str(run.path))))
    return run if run is not None else RunDirectory(path, read_manifest(path), writable=False)


def run_training_command(
    args: Any,
    config: Any,
    train: Callable[[Any, DataSplits, RunSeries], RowList],
    write_results: Callable[[RowList, Any, Path, str], dict[str, Path]],
    summary: Callable[[RowList, Any], str],
    check: Callable[[Any, DataSplits], str | None],
    summary_file: bool = False,
) -> None:
    """The lifecycle of a training command (`train`, `adaptive-etf`, `etf-transformer`:
    args.command) with `config`: its data (`load_training_data`), checked before anything is
    written (`check(config, data)`: `UserError`, or a warning to print, or None), its run
    directory (`open_training_run`, by default runs/<command>/<config.run_name>-<time>; under
    torchrun rank 0 writes, the others read), `train(config, data, runs)` over a `RunSeries` that
    rewrites the metrics (`results.write_metrics`) after every epoch, then on rank 0 the results
    files (`write_results(rows, config, dir, args.format)`, the paths written) and the summary
    text (`summary(rows, config)`; with `summary_file` also written to summary.txt), printed with
    the report of the runs that diverged and the files written."""
    data = load_training_data(config)
    if (warning := check(config, data)) is not None:
        print(warning, file=sys.stderr)
    settings = {"config": asdict(config)}
    default = default_out_dir(args.command, config.run_name)
    with (
        distributed.session(config.device),
        open_training_run(args, args.command, settings, default) as run,
    ):
        main_rank = distributed.is_main()
        write = (lambda rows: write_metrics(rows, config, run.path)) if main_rank else None
        runs = RunSeries(run, write)
        rows = train(config, data, runs)
        if not main_rank:
            return
        paths = write_results(rows, config, run.path, args.format)
        text = summary(rows, config)
        if summary_file:
            paths["txt"] = write_text(run.path / "summary.txt", text + "\n")
    print(text)
    if runs.diverged:
        print(runs.report())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """The standard CIFAR augmentation of an image batch x[N, C, H, W]: each image zero-padded
    by `padding` pixels on every side, cropped back to H x W at a uniformly random offset and
    flipped left-right with probability 1/2 (random numbers from the CPU `generator`)."""
    if x.ndim != 4:
        raise ValueError(f"crop_flip needs images [N, C, H, W], got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, N), generator=generator).to(x.device)
    rows = (offsets[0, :, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(W, device=x.device))[:, None, None, :]
    batch = torch.arange(N, device=x.device)[:, None, None, None]
    channel = torch.arange(C, device=x.device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    flip = (torch.rand(N, generator=generator) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, cropped.flip(-1), cropped)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> tuple[float, float]:
    """(mean loss, accuracy of argmax model(x) as a fraction in [0, 1]) over `loader` in eval
    mode without gradients; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total_loss = correct = count = 0.0
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                total_loss += float(loss_fn(logits, y)) * len(y)
                correct += float((logits.argmax(1) == y).sum())
                count += len(y)
    finally:
        model.train(was_training)
    return total_loss / count, correct / count


def eval_loaders(data: DataSplits) -> tuple[DataLoader, DataLoader]:
    """Unshuffled loaders over the training and the test split, for `evaluate`."""
    return (
        make_loader(data.x_train, data.y_train, EVAL_BATCH_SIZE, shuffle=False),
        make_loader(data.x_test, data.y_test, EVAL_BATCH_SIZE, shuffle=False),
    )


def step_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """The tqdm bar over the optimiser steps of one run."""
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, mininterval=0.5)


def save_network(
    model: nn.Module,
    data: DataSplits,
    path: Path,
    source: str,
    config: Any,
    final_row: Mapping[str, object],
    name_key: str,
) -> None:
    """Write `model` (its eval-mode function) with the training inputs of `data` as a LayerStack
    file at `path`, with meta {"source", "config": asdict(config)} and the final row's name_key,
    seed, epoch and accuracies (fractions); the model is moved to the CPU (this ends its
    run)."""
    meta: dict[str, object] = {"source": source, "config": asdict(config)}
    keys = (name_key, "seed", "epoch", "train_accuracy", "test_accuracy")
    meta |= {k: final_row[k] for k in keys}
    stack = layer_stack_of(model.cpu(), data.x_train, data.y_train, meta)
    save_layer_stack(stack, path)


def check_device(device: str) -> None:
    """`UserError` unless torch can allocate on `device` (e.g. "cuda" without a GPU)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise UserError(f"--device {device}: {exc}") from exc


def load_training_data(config: Any) -> DataSplits:
    """The data set of a training command's config (fields dataset, train_subset, test_subset,
    batch_size, device), checked before any training: `UserError` naming the problem (an
    unusable device, an unreadable data set, a training subset smaller than one batch)."""
    check_device(config.device)
    try:
        data = load_dataset(config.dataset)
    except (ValueError, OSError) as exc:
        raise UserError(f"--dataset {config.dataset}: {exc}") from exc
    data = data.subset(config.train_subset, config.test_subset)
    if len(data.x_train) < config.batch_size:
        raise UserError(
            f"--batch-size {config.batch_size} exceeds the {len(data.x_train)} training samples: "
            "with the incomplete last batch dropped there is no batch to train on"
        )
    return data


class EpochLoop:
    """The lifecycle hooks of one training run's epoch loop (see the module docstring).

    With `checkpoint` (a path) every `end_epoch` writes the run's state there atomically and
    `start` restores it when the file exists; without, the hooks only track rows, time and
    divergence. `extra` is the command's own state saved with the last checkpoint ({} for a
    fresh run), available before `start` (e.g. to rebuild a converted network).
    """

    def __init__(
        self, checkpoint: Path | None = None, on_epoch: Callable[[RowList], None] | None = None
    ) -> None:
        self.checkpoint = checkpoint
        self.on_epoch = on_epoch
        self.rows: RowList = []
        self.divergence: dict[str, object] | None = None
        self._state: dict[str, Any] | None = None
        if checkpoint is not None and checkpoint.is_file():
            self._state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.extra: dict[str, Any] = dict(self._state["extra"]) if self._state else {}
        self._objects: tuple[nn.Module, torch.optim.Optimizer, DataLoader, Any] | None = None
        self._elapsed = 0.0
        self._started = time.perf_counter()

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        scheduler: Any = None,
    ) -> int:
        """Register the run's objects and restore them (and torch's RNG, the rows and the
        elapsed time) from the checkpoint if there is one; the number of epochs done."""
        self._objects = (model, optimizer, loader, scheduler)
        self._started = time.perf_counter()
        if self._state is None:
            return 0
        state = self._state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if loader.generator is not None:
            loader.generator.set_state(state["loader_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.rows = list(state["rows"])
        self._elapsed = float(state["seconds"])
        return int(state["epoch"])

    def seconds(self) -> float:
        """Training time of the run so far (across interruptions)."""
        return self._elapsed + time.perf_counter() - self._started

    def diverged(self, epoch: int, loss: float) -> bool:
        """After an epoch's steps with mean step loss `loss`: True (and `divergence` set to
        {"diverged_epoch", "reason"}) if the loss or a parameter of the model diverged."""
        if self._objects is None:
            raise RuntimeError("EpochLoop.start must be called before the epoch loop")
        reason = divergence(loss, self._objects[0].parameters())
        if reason is None:
            return False
        self.record_divergence(epoch, reason)
        return True

    def record_divergence(self, epoch: int, reason: str) -> None:
        """Mark the run as diverged in `epoch` (for a loop that detects it itself, e.g. from an
        exception); `RunSeries` records it and the loop should stop."""
        self.divergence = {"diverged_epoch": epoch, "reason": reason}

    def end_epoch(self, epoch: int, extra: Mapping[str, Any] | None = None) -> None:
        """Checkpoint after `epoch` (model, optimiser, schedule, loader generator, RNG, rows,
        time and `extra`) and report the rows to `on_epoch`."""
        if self._objects is None:
            raise RuntimeError("EpochLoop.start must be called before the epoch loop")
        self.extra = dict(extra or {})
        if self.checkpoint is not None and distributed.is_main():
            model, optimizer, loader, scheduler = self._objects
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "loader_generator": (
                    None if loader.generator is None else loader.generator.get_state()
                ),
                "torch_rng": torch.get_rng_state(),
                "rows": self.rows,
                "seconds": self.seconds(),
                "extra": self.extra,
            }
            self.checkpoint.parent.mkdir(exist_ok=True)
            with atomic_path(self.checkpoint) as tmp:
                torch.save(state, tmp)
        if self.on_epoch is not None:
            self.on_epoch(self.rows)


class RunSeries:
    """The runs of a training command, in order, in an optional run directory.

    `run(key, train)` returns the rows of run `key`: read back from the directory if it
    finished before, else `train(loop)` with an `EpochLoop` checkpointing to the run's
    checkpoint; then the run is recorded (`RunDirectory.finish`, "diverged" with its epoch and
    reason if it diverged). `write_rows(rows)` is called with every row so far (finished runs
    and the epochs of the run in progress) after every epoch and run.
    """

    def __init__(
        self,
        directory: RunDirectory | None = None,
        write_rows: Callable[[RowList], None] | None = None,
    ) -> None:
        self.directory = directory
        self.write_rows = write_rows
        self.rows: RowList = []
        self.diverged: dict[str, dict[str, object]] = {}

    @property
    def path(self) -> Path | None:
        """The run directory's path (None without one)."""
        return None if self.directory is None else self.directory.path

    def _write(self, rows: Sequence[dict[str, object]]) -> None:
        if self.write_rows is not None and rows:
            self.write_rows(list(rows))

    def run(self, key: str, train: Callable[[EpochLoop], RowList]) -> RowList:
        record = self.directory.finished(key) if self.directory is not None else None
        if record is not None:
            rows: RowList = record["rows"]
            if record.get("divergence"):
                self.diverged[key] = record["divergence"]
        else:
            checkpoint = None if self.directory is None else self.directory.checkpoint_path(key)
            loop = EpochLoop(checkpoint, lambda current: self._write(self.rows + current))
            rows = train(loop)
            if loop.divergence is not None:
                self.diverged[key] = loop.divergence
            if self.directory is not None:
                record = {"key": key, "rows": rows, "divergence": loop.divergence}
                record = self.directory.finish(key, record, diverged=loop.divergence is not None)
                rows = record["rows"]
        self.rows += rows
        self._write(self.rows)
        return rows

    def run_all(
        self,
        config: Any,
        data: DataSplits | None,
        names: Sequence[str],
        train: Callable[[TrainingRun], RowList],
        check: Callable[[Any, DataSplits], object] | None = None,
        *,
        balanced: bool = False,
    ) -> RowList:
        """Every run of a training command with `config`: each name with each seed
        0..config.seeds-1 (seed by seed; run keys <name>-seed<s>), `train(run)` on a
        `TrainingRun` (networks written into this series' directory; `balanced` batches) for
        a run not finished before, on `data` (default: `load_training_data(config)`) after
        `check(config, data)`; every row so far."""
        data = data if data is not None else load_training_data(config)
        if check is not None:
            check(config, data)
        for seed in range(config.seeds):
            for name in names:
                self.run(
                    f"{name}-seed{seed}",
                    lambda loop, n=name, s=seed: train(
                        TrainingRun(data, config, n, s, loop, self.path, balanced)
                    ),
                )
        return self.rows

    def report(self) -> str:
        """One line per diverged run ("" if none diverged)."""
        return "\n".join(
            f"run {key} diverged in epoch {d['diverged_epoch']}: {d['reason']}"
            for key, d in self.diverged.items()
        )


@dataclass
class TrainingRun:
    """One run (`name`, `seed`) of a training command with `config` (a `TrainingOptions`) on
    `data`, its hooks `loop` and the run directory `out_dir` its network is written into.

    Creating it seeds torch's RNG with `seed` (the network built next is the run's
    initialisation) and sets `device` (this rank's, `distributed.local_device`), `loader` (the
    run's shuffled training loader, `training_loader`; class-stratified with `balanced`) and
    `eval_train`, `eval_test` (`eval_loaders`). `start` begins the epoch loop, `accuracies`
    evaluates the model and `save_network` writes it.
    """

    data: DataSplits
    config: Any
    name: str
    seed: int
    loop: EpochLoop = field(default_factory=EpochLoop)
    out_dir: Path | None = None
    balanced: bool = False
    device: torch.device = field(init=False)
    loader: DataLoader = field(init=False)
    eval_train: DataLoader = field(init=False)
    eval_test: DataLoader = field(init=False)

    def __post_init__(self) -> None:
        data, config = self.data, self.config
        self.device = distributed.local_device(config.device)
        torch.manual_seed(self.seed)
        self.loader = training_loader(
            data.x_train, data.y_train, config.batch_size, self.seed, balanced=self.balanced
        )
        self.eval_train, self.eval_test = eval_loaders(data)

    def start(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> tuple[range, tqdm]:
        """`loop.start` (restoring the checkpoint if there is one) and the run's `step_bar`
        over config.epochs epochs (shown with config.progress, on rank 0), advanced past the
        epochs already done; (the epochs left to train, the bar)."""
        done = self.loop.start(model, optimizer, self.loader, scheduler)
        config = self.config
        total = config.epochs * len(self.loader)
        desc = f"{self.name} seed {self.seed}"
        bar = step_bar(total, desc, config.progress and distributed.is_main())
        bar.update(done * len(self.loader))
        return range(done + 1, config.epochs + 1), bar

    def accuracies(self, model: nn.Module) -> tuple[float, float]:
        """(train, test) accuracy of `model` (fractions; `evaluate`)."""
        return evaluate(model, self.eval_train)[1], evaluate(model, self.eval_test)[1]

    def save_network(self, model: nn.Module, source: str, name_key: str) -> None:
        """Unless the run diverged: with a run directory `out_dir` and config.save_networks, on
        rank 0, write the trained `model` as out_dir/network-<name>-seed<seed>.pt
        (`save_network`: `source`, the last row's accuracies and its `name_key`)."""
        if (
            self.loop.divergence is None
            and self.out_dir is not None
            and distributed.is_main()
            and self.config.save_networks
        ):
            path = self.out_dir / f"network-{self.name}-seed{self.seed}.pt"
            row = self.loop.rows[-1]
            save_network(model, self.data, path, source, self.config, row, name_key)
