"""One intra-op thread for small linear algebra.

torch runs each CPU op with `torch.get_num_threads()` OpenMP threads. On small matrices a second
thread saves nothing, and when the cores are shared (other processes, or more runnable threads
than cores) every parallel region waits at its barrier for a thread the OS has descheduled: on a
loaded 2-core machine `torch.linalg.qr` of a 512 x 10 matrix took 5-16 ms with 2 threads and
0.02 ms with 1, so a solver that calls it at every iteration (geoopt's Stiefel retraction inside
`RiemannianAdam`) ran for minutes. The package therefore runs its small linear algebra (per-
iteration solver work, K x K factorisations, the polar factor of a small d x K matrix) under
`single_threaded`, chosen by `is_small`, and leaves large products all the threads
(benchmarks/thread_limits.py measures the two settings side by side).

`torch.set_num_threads` is process-wide: other Python threads that run torch CPU ops while such a
block runs also get one thread until it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["SMALL_WORK", "is_small", "single_threaded"]

# Multiply-adds below which one thread is used: 2^24, a 512 x 181 x 181 product (about 0.5 ms on
# one core). A second thread measured no gain on the polar factor at (d, K) = (512, 100)
# (5.1e6 multiply-adds) and a clear one at (2048, 1000) (2.0e9).
SMALL_WORK = 2**24


def is_small(A: Tensor, inner: int | None = None) -> bool:
    """Whether the products of A[..., m, n] with an n x `inner` matrix (inner = n unless given),
    over all of A's batch, are small work (<= SMALL_WORK multiply-adds) on the CPU. Tensors on
    other devices are never small: their threads are not torch's CPU threads."""
    if A.device.type != "cpu":
        return False
    return A.numel() * (A.shape[-1] if inner is None else inner) <= SMALL_WORK


@contextmanager
def single_threaded(enabled: bool = True) -> Iterator[None]:
    """Run the block with one torch intra-op thread (when `enabled` and more are set), then
    restore the previous count, also when the block raises."""
    previous = torch.get_num_threads()
    if not enabled or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
