"""DUFM simulator speed: one 20,000-step run and an 8 weight decays x 10 seeds sweep.

Targets: the run <= 10 s on this CPU, the sweep <= 300 s on 2 cores. The explicit
backward is also timed side by side against the same training step with torch.autograd
(the reference implementation), on a shorter run, and the speed-up printed.

    .venv/bin/python benchmarks/dufm_speed.py [--skip-sweep] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from nearest_etf._threads import single_threaded
from nearest_etf.experiments.dufm.sweep import SweepGrid, run_sweep
from nearest_etf.experiments.dufm.train import DUFMConfig, train_dufm

SWEEP_WDS = [0.001, 0.0014, 0.002, 0.0028, 0.004, 0.0056, 0.008, 0.0113]
RUN_TARGET_S = 10.0
SWEEP_TARGET_S = 300.0


def autograd_seconds_per_step(config: DUFMConfig, steps: int) -> float:
    """Plain gradient descent with gradients from torch.autograd on DUFMProblem.loss."""
    problem = config.problem()
    params = [p.requires_grad_() for p in problem.init(config.seed, config.init_scale)]
    optimizer = torch.optim.SGD(params, lr=config.lr)
    with single_threaded():
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            fit, reg = problem.loss(params)
            (fit + reg).backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    config = DUFMConfig()  # 4-DUFM, K = 10, width 30, lambda 0.004, lr 0.5, 20,000 steps
    result = train_dufm(config)
    auto = autograd_seconds_per_step(config, 2000) * config.steps
    print(
        f"20,000-step 4-DUFM run (K=10, width 30): {result.seconds:.2f} s "
        f"(target {RUN_TARGET_S:.0f} s, ratio {result.seconds / RUN_TARGET_S:.2f}); "
        f"autograd reference {auto:.2f} s (extrapolated from 2,000 steps), "
        f"explicit backward {auto / result.seconds:.1f}x faster"
    )
    if args.skip_sweep:
        return
    grid = SweepGrid(base=config, wd=SWEEP_WDS, seeds=range(10))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_sweep(grid, Path(tmp), workers=args.workers, srg_r=())
        seconds = time.perf_counter() - start
    print(
        f"sweep 8 wds x 10 seeds, {args.workers} worker processes: {seconds:.1f} s "
        f"(target {SWEEP_TARGET_S:.0f} s, ratio {seconds / SWEEP_TARGET_S:.2f}); "
        f"{summary['runs']} runs, mean inner rank {summary['mean_inner_rank']:.2f}"
    )


if __name__ == "__main__":
    main()
