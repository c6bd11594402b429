"""Data-parallel training under torchrun: the process group, the rank-0 predicate and the
pieces that make N processes train like one process on the global batches.

`session(device)` initialises the default process group when the command runs under torchrun
(the environment variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are set): backend nccl for
a CUDA device (each rank on cuda:LOCAL_RANK), gloo otherwise; it is torn down at the end.
Without torchrun everything here is the identity: rank 0 of a world of size 1.

With world size R and per-rank batch B, a training step sees the global batch of R * B samples
that one process with batch R * B would see in the same order (`training_loader`: a
`DistributedSampler` over the epoch's permutation, `set_epoch` per epoch), the gradients are
averaged over the ranks (`DistributedDataParallel`), BatchNorm normalises with the statistics
of the global batch (`GlobalBatchNorm1d/2d`, all-reduced; torch's SyncBatchNorm needs a GPU)
and the heads all-reduce their class statistics (`nearest_etf.nn.class_means.distributed_sum`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nearest_etf.nn.class_means import distributed_sum

__all__ = [
    "GlobalBatchNorm1d",
    "GlobalBatchNorm2d",
    "broadcast_object",
    "is_distributed",
    "is_main",
    "launched",
    "local_device",
    "parallel_model",
    "rank",
    "session",
    "training_loader",
    "world_size",
]


def launched() -> bool:
    """True in a process that torchrun started (RANK and WORLD_SIZE set), before or after its
    `session` begins."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """True inside a `session` started by torchrun (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the only rank that writes files and prints."""
    return rank() == 0


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (pickled)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_device(device: str) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for "cuda" under torchrun, else `device`."""
    if device == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


@contextmanager
def session(device: str) -> Iterator[None]:
    """Initialise the process group for the duration of the block when started by torchrun
    (nccl on CUDA, gloo on the CPU); otherwise do nothing."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or is_distributed():
        yield
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _global_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm over the union of the ranks' batches (training mode): the mean and the biased
    variance of the global batch normalise, the running statistics get the unbiased variance,
    as nn.BatchNorm does for one process."""
    dims = [0, *range(2, x.ndim)]
    count = distributed_sum(
        torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
    )
    mean = distributed_sum(x.sum(dims)) / count
    shape = [1, -1] + [1] * (x.ndim - 2)
    centred = x - mean.view(shape)
    var = distributed_sum((centred * centred).sum(dims)) / count
    if module.track_running_stats and module.running_mean is not None:
        with torch.no_grad():
            module.num_batches_tracked += 1
            m = module.momentum  # None: the cumulative average, as nn.BatchNorm
            m = 1.0 / float(module.num_batches_tracked) if m is None else m
            module.running_mean.lerp_(mean.detach(), m)
            module.running_var.lerp_(var.detach() * count / (count - 1), m)
    y = centred / torch.sqrt(var.view(shape) + module.eps)
    if module.affine:
        y = y * module.weight.view(shape) + module.bias.view(shape)
    return y


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training-mode statistics are those of the global batch."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return _global_batch_norm(self, x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are those of the global batch."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return _global_batch_norm(self, x)


def _globalise(module: nn.Module) -> None:
    for child in module.children():
        _globalise(child)
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            child.__class__ = (
                GlobalBatchNorm1d if isinstance(child, nn.BatchNorm1d) else GlobalBatchNorm2d
            )


def parallel_model(model: nn.Module) -> nn.Module:
    """The module to train: `model` itself outside a session; inside one, its BatchNorm layers
    switched to the global-batch statistics (in place, same parameters and state dict) and
    wrapped in DistributedDataParallel (buffers are not broadcast: every rank computes the same
    BatchNorm and head statistics)."""
    if not is_distributed():
        return model
    _globalise(model)
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # its replacement would still sync buffers at the start
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def training_loader(x: Tensor, y: Tensor, batch_size: int, seed: int) -> DataLoader | None:
    """Inside a session: this rank's shuffled loader of per-rank batches (`DistributedSampler`
    with `seed`, incomplete last batches dropped; call `sampler.set_epoch(epoch)` each epoch).
    Outside one: None (the command uses its own loader)."""
    if not is_distributed():
        return None
    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=seed, drop_last=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=sampler, drop_last=True)
