"""Time per training step (forward + backward + SGD step) of an MLP backbone with each head.

Backbone: MLP(784 -> 1024 -> d) (Linear + BatchNorm + ReLU per layer), batch 256, SGD with
momentum, float32, synthetic inputs and uniformly random labels (timing only). The heads are
measured side by side: after a warm-up, each repeat times one step of every head in turn, and
the median over repeats is reported (with the ratio of the minima, which is less sensitive
to other processes on a shared machine). Targets (one thread): ImplicitETFHead /
LearnedHead <= 1.05x at (d, K) = (512, 100) and <= 3x at (2048, 1000), each printed with
PASS/FAIL on the median ratio; and the implicit head re-solving every 10th step
(`solve_every=10`) <= 1.5x at (2048, 1000).

The floor column bounds what any per-step solve of this kind can reach: the learned step plus
the dense linear algebra that a polar factor and its derivative need at every step whatever the
implementation: one K x K symmetric eigendecomposition (the backward's Sylvester equation needs
the eigenbasis of P = (A^T A)^{1/2}) and four d x K x K products (A^T A and U = A P^{-1}
forward; U^T G and the d x K result backward), in float32, timed in the same interleaved loop.
A target below the floor cannot be met by a per-step solve on this machine.

    .venv/bin/python benchmarks/head_overhead.py [--repeats 30] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nearest_etf.experiments.models import MLP, Classifier
from nearest_etf.nn.heads import make_head

SHAPES = ((512, 10), (512, 100), (2048, 1000))
# the heads measured: name -> (head class name, options)
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "learned": ("learned", {}),
    "fixed": ("fixed", {}),
    "implicit": ("implicit", {}),
    "implicit-k10": ("implicit", {"solve_every": 10}),
}
# (variant, (d, K)) -> step time over the learned head's, at most
TARGETS = {
    ("implicit", (512, 100)): 1.05,
    ("implicit", (2048, 1000)): 3.0,
    ("implicit-k10", (2048, 1000)): 1.5,
}
BATCH, INPUT, HIDDEN = 256, 784, 1024


def _models(d: int, K: int) -> dict[str, tuple[Classifier, torch.optim.Optimizer]]:
    models = {}
    for name, (head, options) in VARIANTS.items():
        torch.manual_seed(0)
        model = Classifier(MLP(INPUT, (HIDDEN, d)), make_head(head, d, K, **options))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        models[name] = (model, optimizer)
    return models


def _step(model: Classifier, optimizer: torch.optim.Optimizer, x, y) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x, y), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def _floor_work(d: int, K: int, g: torch.Generator) -> Callable[[], float]:
    """A timer of the per-step floor (module docstring): eigh of a K x K SPD matrix and four
    d x K x K float32 products."""
    A = torch.randn(d, K, generator=g)
    S = torch.randn(K, K, generator=g)
    gram = A.mT @ A

    def run() -> float:
        start = time.perf_counter()
        A.mT @ A
        torch.linalg.eigh(gram)
        A @ S
        A.mT @ A
        A @ S
        return time.perf_counter() - start

    return run


def measure(d: int, K: int, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per step of every head at (d, K), and of the floor work (key "floor"),
    `repeats` interleaved samples each."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(BATCH, INPUT, generator=g), torch.randint(0, K, (BATCH,), generator=g))
        for _ in range(4)
    ]
    models = _models(d, K)
    floor = _floor_work(d, K, g)
    times: dict[str, list[float]] = {name: [] for name in (*models, "floor")}
    for i in range(warmup + repeats):
        x, y = batches[i % len(batches)]
        for name, (model, optimizer) in models.items():
            seconds = _step(model, optimizer, x, y)
            if i >= warmup:
                times[name].append(seconds)
        seconds = floor()
        if i >= warmup:
            times["floor"].append(seconds)
    return times


def _shape(text: str) -> tuple[int, int]:
    try:
        d, K = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected dxK such as 512x100, got {text!r}") from exc
    return d, K


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=30, help="timed steps per head and shape (default 30)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, the setting the targets are stated for)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--shapes",
        type=_shape,
        nargs="+",
        default=list(SHAPES),
        help="(d, K) pairs as dxK (default: 512x10 512x100 2048x1000)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"MLP({INPUT} -> {HIDDEN} -> d) + head, batch {BATCH}, SGD, float32, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} steps, "
        f"1-min load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'d':>6}{'K':>6}"
        + "".join(f"{n + ' [ms]':>19}" for n in VARIANTS)
        + f"{'impl/learned':>14}{'(min-based)':>13}{'k10/learned':>13}{'floor':>8}"
    )
    results = []
    for d, K in args.shapes:
        # the largest shape is ~1 s per implicit step on 2 CPU cores: fewer repeats there
        repeats = args.repeats if d * K <= 512 * 100 else max(3, args.repeats // 6)
        samples = measure(d, K, repeats)
        t = {name: statistics.median(v) for name, v in samples.items()}
        ratio = t["implicit"] / t["learned"]
        ratio_min = min(samples["implicit"]) / min(samples["learned"])
        ratios = {name: t[name] / t["learned"] for name in VARIANTS}
        floor = (t["learned"] + t["floor"]) / t["learned"]
        results.append(
            {
                "d": d,
                "K": K,
                "median_seconds": t,
                "min_seconds": {name: min(v) for name, v in samples.items()},
                "implicit_over_learned": ratio,
                "implicit_over_learned_min": ratio_min,
                "over_learned": ratios,
                "floor_over_learned": floor,
            }
        )
        print(
            f"{d:>6}{K:>6}"
            + "".join(f"{1e3 * t[n]:>19.2f}" for n in VARIANTS)
            + f"{ratio:>14.3f}{ratio_min:>13.3f}{ratios['implicit-k10']:>13.3f}{floor:>8.3f}"
        )
    if any((name, (r["d"], r["K"])) in TARGETS for r in results for name in VARIANTS):
        print("targets")
    for r in results:
        for name in VARIANTS:
            limit = TARGETS.get((name, (r["d"], r["K"])))
            if limit is None:
                continue
            ratio = r["over_learned"][name]
            verdict = "PASS" if ratio <= limit else "FAIL"
            if ratio > limit and name == "implicit" and r["floor_over_learned"] > limit:
                verdict += f" (the per-step floor is {r['floor_over_learned']:.3f}x)"
            print(
                f"  {name} / learned step at (d, K) = ({r['d']}, {r['K']}): {ratio:.3f}x median "
                f"(target <= {limit:g}x)  {verdict}"
            )
    print(f"1-min load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
