"""`nearest-etf demo`: solve one nearest-ETF problem with every solver and differentiate it with
every backward mode; print times, objective gaps and gradient errors against the closed form.
The table is also written as demo.csv and demo.json (settings and rows) into the output
directory (a run directory, docs/runs.md; default runs/demo/d<d>-K<K>-<time>)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from nearest_etf.experiments._common.options import (
    add_output_arguments,
    default_out_dir,
    positive_int,
)
from nearest_etf.experiments._common.results import write_csv
from nearest_etf.experiments._common.runs import UserError, open_run, write_json
from nearest_etf.nearest import BACKWARDS, SOLVERS, nearest_etf, nearest_etf_objective
from nearest_etf.synthetic import noisy_etf_problem


def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _gradient(H: Tensor, prox: Tensor, G: Tensor, backward: str) -> Tensor:
    H = H.clone().requires_grad_(True)
    (nearest_etf(H, prox, backward=backward) * G).sum().backward()
    assert H.grad is not None
    return H.grad


def run_demo(d: int, K: int, seed: int) -> list[dict[str, object]]:
    """Rows of (stage, method, seconds, error against procrustes + analytic)."""
    problem = noisy_etf_problem(d, K, seed=seed)
    H, prox, G = problem.H, problem.prox, problem.G
    Hn = H / H.norm()
    reference = nearest_etf(H, prox)
    best = float(nearest_etf_objective(Hn, reference, prox))
    rows: list[dict[str, object]] = []
    for solver in SOLVERS:
        U, seconds = _timed(lambda s=solver: nearest_etf(H, prox, solver=s))
        gap = (float(nearest_etf_objective(Hn, U, prox)) - best) / abs(best)
        rows.append({"stage": "forward", "method": solver, "seconds": seconds, "error": gap})
    exact = _gradient(H, prox, G, "analytic")
    for backward in BACKWARDS:
        grad, seconds = _timed(lambda b=backward: _gradient(H, prox, G, b))
        err = float((grad - exact).norm() / exact.norm())
        rows.append({"stage": "fwd+bwd", "method": backward, "seconds": seconds, "error": err})
    return rows


def _print_table(rows: list[dict[str, object]], d: int, K: int) -> None:
    print(f"nearest ETF, d={d}, K={K}, float64 (errors against procrustes + analytic)")
    print(f"{'stage':<9}{'method':<17}{'time [ms]':>11}  error")
    print(
        f"{'':<9}{'':<17}{'':>11}  (forward: relative objective gap, backward: relative grad error)"
    )
    for row in rows:
        print(
            f"{row['stage']:<9}{row['method']:<17}{1e3 * row['seconds']:>11.2f}  {row['error']:.2e}"
        )


def main(args: argparse.Namespace) -> None:
    if not 2 <= args.classes <= args.dim:
        raise UserError(f"need 2 <= --classes <= --dim, got K={args.classes}, d={args.dim}")
    settings = {"dim": args.dim, "classes": args.classes, "seed": args.seed}
    default = default_out_dir("demo", f"d{args.dim}-K{args.classes}")
    with open_run(args, "demo", settings, default) as run:
        torch.manual_seed(args.seed)
        rows = run_demo(args.dim, args.classes, args.seed)
        write_csv(rows, run.path / "demo.csv")
        write_json(run.path / "demo.json", {"settings": settings, "rows": rows})
    _print_table(rows, args.dim, args.classes)
    print(f"wrote {run.path / 'demo.csv'}, {run.path / 'demo.json'}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="solver and backward-mode demo table")
    parser.add_argument("--dim", type=positive_int, default=64, help="feature dimension d")
    parser.add_argument("--classes", type=positive_int, default=10, help="number of classes K")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser, figures=False)  # a table, no figure
    parser.set_defaults(func=main)
