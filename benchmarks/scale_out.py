"""Scale-out overhead on this machine: `train` in 1 vs 2 processes (torchrun, gloo) and
`dufm sweep` on the process vs the Ray executor, side by side.

train: digits (the full 1437-sample training split), the fixed-ETF head, one seed, MLP 256-256,
global batch 64 (one process with --batch-size 64 against two ranks with --batch-size 32, the
same global batches), --epochs epochs. dufm sweep: a grid of --runs runs (4 wd values x
seeds, L 3, K 4, width 16, --steps steps, no SRG references) on 2 workers, once with
--executor process and once with --executor ray (a local Ray instance started by the
command). Each command runs --repeats times as a subprocess from a fresh interpreter; the
table gives the median wall-clock seconds (start-up included: imports, process group or Ray
start) and the overhead against the first row of each pair.

    .venv/bin/python benchmarks/scale_out.py [--epochs 5] [--steps 2000] [--runs 8]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds(command: list[str], repeats: int) -> float:
    """Median wall-clock seconds of `command` (run from the repository root, output dirs fresh)."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run(
                [*command, "--out", str(Path(tmp) / "out")],
                cwd=ROOT,
                env=env,
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=8, help="sweep runs (a multiple of 4)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    python = [sys.executable]
    train = ["-m", "nearest_etf", "train", "--dataset", "digits", "--head", "fixed"]
    train += ["--seeds", "1", "--epochs", str(args.epochs), "--no-networks", "--no-progress"]
    torchrun = [*python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    sweep = ["-m", "nearest_etf", "dufm", "sweep", "--layers", "3", "--classes", "4"]
    sweep += ["--width", "16", "--wd", "0.001,0.002,0.004,0.008", "--steps", str(args.steps)]
    sweep += ["--seeds", str(args.runs // 4), "--no-srg", "--workers", "2", "--no-progress"]
    pairs = {
        f"train, digits, {args.epochs} epochs, global batch 64": [
            ("1 process (batch 64)", [*python, *train, "--batch-size", "64"]),
            ("torchrun 2 ranks (batch 32 each)", [*torchrun, "2", *train, "--batch-size", "32"]),
        ],
        f"dufm sweep, {args.runs} runs x {args.steps} steps, 2 workers": [
            ("--executor process", [*python, *sweep, "--executor", "process"]),
            ("--executor ray (local instance)", [*python, *sweep, "--executor", "ray"]),
        ],
    }
    print(f"{'command':<58}{'variant':<36}{'seconds':>9}{'overhead':>10}")
    for title, variants in pairs.items():
        reference = None
        for name, command in variants:
            seconds = _seconds(command, args.repeats)
            reference = reference or seconds
            overhead = f"{100 * (seconds / reference - 1):+.0f}%"
            print(f"{title:<58}{name:<36}{seconds:>9.1f}{overhead:>10}", flush=True)


if __name__ == "__main__":
    main()
