"""The epoch loop, evaluation and network saving shared by the training commands (`train`,
`adaptive-etf`, `etf-transformer`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nearest_etf.data import DataSplits, make_loader
from nearest_etf.heads import NonFiniteError
from nearest_etf.layer_stack import layer_stack_of, save_layer_stack

__all__ = [
    "EVAL_BATCH_SIZE",
    "crop_flip",
    "eval_loaders",
    "evaluate",
    "save_network",
    "step_bar",
    "train_epoch",
]

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
) -> float:
    """One pass over `loader` in train mode, one optimiser step per batch; the mean step loss.
    With `targets_to_model` the model is called as model(x, y) (heads that track class means);
    `transform` (e.g. `crop_flip`) is applied to each input batch on the model's device.

    Raises NonFiniteError naming the step when a loss is non-finite (before its backward, so
    the parameters keep their last finite values); a head raises it for non-finite features.
    """
    model.train()
    device = next(model.parameters()).device
    total = 0.0
    for step, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device), y.to(device)
        if transform is not None:
            x = transform(x)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x, y) if targets_to_model else model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"training loss is {value} at step {step} of {len(loader)} of the epoch; the "
                "network has diverged (lower the learning rate?)"
            )
        loss.backward()
        optimizer.step()
        total += value
        if on_step is not None:
            on_step()
    return total / len(loader)


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
    """(mean loss, accuracy in percent of argmax model(x)) over `loader` in eval mode without
    gradients; the model's train/eval mode is restored afterwards."""
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
    return total_loss / count, 100.0 * correct / count


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
    seed, epoch and accuracies; the model is moved to the CPU (this ends its run)."""
    meta: dict[str, object] = {"source": source, "config": asdict(config)}
    keys = (name_key, "seed", "epoch", "train_accuracy", "test_accuracy")
    meta |= {k: final_row[k] for k in keys}
    stack = layer_stack_of(model.cpu(), data.x_train, data.y_train, meta)
    save_layer_stack(stack, path)
