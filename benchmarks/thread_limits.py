"""Thread over-subscription in the package's small linear algebra, side by side.

Each workload is timed (a) as the package runs it under `torch.set_num_threads(N)` (default N:
all logical CPUs; NumPy's BLAS left at its default) and (b) forced onto one thread
(`nearest_etf._threads.single_threaded` and threadpoolctl's one-thread BLAS limit around the
call), interleaved repeat by repeat so that both see the same machine load; medians. Where the
package limits its own threads, (a) ~ (b). Workloads:

  torch.linalg.qr 512x10       the bare operation (no package code): what an unlimited small
                               factorisation costs, for reference (no target)
  polar 512x100 float32        torch.autograd through polar(A), forward + backward
  polar 2048x1000 float32      the same at the ImageNet head size, which the package leaves all
                               threads (no target: on an idle machine (a) should be faster)
  riemannian-adam 512x10       nearest_etf(H, prox, solver=RiemannianAdamSolver(max_iterations=200))
                               (geoopt's QR retraction at every step)
  trust-regions 512x10         nearest_etf(H, prox, solver="trust-regions") (pymanopt)
  cg backward 512x10           dL/dH through nearest_etf(H, prox, backward="cg")

Target for each small package workload: (a) / (b) <= 1.25 (no over-subscription left in the
code path), printed with PASS/FAIL.

    .venv/bin/python benchmarks/thread_limits.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from threadpoolctl import threadpool_limits

from nearest_etf import RiemannianAdamSolver, nearest_etf, polar, procrustes_target
from nearest_etf._threads import single_threaded
from nearest_etf.synthetic import noisy_etf_problem

TARGET_RATIO = 1.25


def _polar_step(d: int, K: int) -> Callable[[], object]:
    p = noisy_etf_problem(d, K, noise=1 / math.sqrt(d), seed=0, dtype=torch.float32)
    A = procrustes_target(p.H / p.H.norm(), p.prox, 1e-3).requires_grad_(True)

    def step() -> object:
        return torch.autograd.grad(polar(A), A, p.G)

    return step


def workloads() -> dict[str, tuple[Callable[[], object], bool]]:
    """name -> (call, has a target)."""
    p = noisy_etf_problem(512, 10, noise=1 / math.sqrt(512), seed=0)
    X = torch.randn(512, 10, dtype=torch.float64)
    adam = RiemannianAdamSolver(max_iterations=200)

    def riemannian_adam() -> object:
        with warnings.catch_warnings():  # it stops at max_iterations on purpose
            warnings.simplefilter("ignore", RuntimeWarning)
            return nearest_etf(p.H, p.prox, solver=adam)

    def cg_backward() -> object:
        H = p.H.clone().requires_grad_(True)
        return torch.autograd.grad(nearest_etf(H, p.prox, backward="cg"), H, p.G)

    return {
        "torch.linalg.qr 512x10": (lambda: torch.linalg.qr(X), False),
        "polar 512x100 float32": (_polar_step(512, 100), True),
        "polar 2048x1000 float32": (_polar_step(2048, 1000), False),
        "riemannian-adam 512x10": (riemannian_adam, True),
        "trust-regions 512x10": (lambda: nearest_etf(p.H, p.prox, solver="trust-regions"), True),
        "cg backward 512x10": (cg_backward, True),
    }


def _forced_single(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with single_threaded(), threadpool_limits(1, user_api="blas"):
            return fn()

    return call


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds as the package runs it, median seconds forced onto one thread)."""
    variants = (fn, _forced_single(fn))
    samples: tuple[list[float], list[float]] = ([], [])
    for variant in variants:
        variant()  # warm-up
    for _ in range(repeats):
        for variant, out in zip(variants, samples, strict=True):
            start = time.perf_counter()
            variant()
            out.append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="N (default: all CPUs)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch threads N = {torch.get_num_threads()} against 1, median of {args.repeats} "
        f"interleaved repeats, 1-min load average {os.getloadavg()[0]:.2f}"
    )
    header = f"{'workload':<26} {'N threads':>11} {'1 thread':>11} {'N / 1':>7}  target"
    print(header)
    print("-" * len(header))
    for name, (fn, has_target) in workloads().items():
        many, one = measure(fn, args.repeats)
        ratio = many / one
        verdict = (
            f"<= {TARGET_RATIO:g}  {'PASS' if ratio <= TARGET_RATIO else 'FAIL'}"
            if has_target
            else "-"
        )
        print(f"{name:<26} {_ms(many):>11} {_ms(one):>11} {ratio:>7.2f}  {verdict}")
    print(f"1-min load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
