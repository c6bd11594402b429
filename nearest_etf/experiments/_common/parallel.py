"""Run independent tasks in parallel: the one executor layer of the experiment commands.

Executors: "process" (default; concurrent.futures.ProcessPoolExecutor with spawned workers),
"ray" (ray.remote / ray.wait; the optional extra `nearest_etf[ray]`) and "serial". Each unit of
work runs torch single-threaded, so every executor computes the same numbers for a task.

Ray: without an address the command starts a local Ray instance with `workers` CPUs
(`ray.init(num_cpus=workers)`; its workers import this very package, so a source checkout
works without installing it); `address` ("auto", "ray://host:10001", ...) connects to a running
cluster instead, whose nodes must have nearest_etf installed. One task holds one CPU.

On SIGINT (Ctrl-C reaches the whole process group) worker processes exit at once without a
traceback; the main process gets the KeyboardInterrupt, pending tasks are cancelled, and the
caller records the interruption.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

import nearest_etf

__all__ = ["EXECUTORS", "check_executor", "map_unordered"]

EXECUTORS = ("process", "ray", "serial")


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _init_worker() -> None:
    torch.set_num_threads(1)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # as the parent was started
        signal.signal(signal.SIGINT, _exit_quietly)


def _single_threaded(fn: Callable, task: object) -> object:
    torch.set_num_threads(1)
    return fn(task)


def _ray_results(fn: Callable, tasks: Sequence, workers: int, address: str | None) -> Iterator:
    import ray

    if not ray.is_initialized():
        if address is None:
            package_root = str(Path(nearest_etf.__file__).resolve().parents[1])
            path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
            ray.init(
                num_cpus=workers,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_single_threaded)
    pending = [remote.remote(fn, task) for task in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def check_executor(executor: str, address: str | None = None) -> None:
    """ValueError for an unknown executor, or a Ray `address` with an executor other than
    "ray" (see `map_unordered`)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if address is not None and executor != "ray":
        raise ValueError(
            f"--ray-address needs --executor ray: a Ray address needs the ray executor, not "
            f"{executor!r}"
        )


def map_unordered(
    fn: Callable,
    tasks: Sequence,
    executor: str = "process",
    workers: int | None = None,
    address: str | None = None,
) -> Iterator:
    """Yield fn(task) for every task, in completion order, on the chosen executor.

    ``fn`` must be a module-level function (workers are spawned processes). ``address`` is the
    Ray cluster to use (executor "ray" only; None: a local instance with ``workers`` CPUs).
    """
    check_executor(executor, address)
    workers = workers or os.cpu_count() or 1
    if executor == "ray":
        if importlib.util.find_spec("ray") is None:
            raise ValueError(
                "--executor ray needs the 'ray' package, which is not installed; "
                "install ray or use --executor process"
            )
        yield from _ray_results(fn, tasks, workers, address)
    elif executor == "serial" or workers == 1:
        yield from map(fn, tasks)
    else:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
        try:
            futures = [pool.submit(fn, task) for task in tasks]
            for future in as_completed(futures):
                yield future.result()
        finally:  # on an interruption, do not start the tasks still pending
            pool.shutdown(wait=True, cancel_futures=True)
