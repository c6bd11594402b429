"""`nearest-etf dufm run | sweep`: the DUFM simulator's command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from nearest_etf.experiments._common.options import config_from_args, default_out_dir
from nearest_etf.experiments._common.parallel import EXECUTORS
from nearest_etf.experiments.dufm.analysis import DEFAULT_RANK_RTOL
from nearest_etf.experiments.dufm.run import run_experiment
from nearest_etf.experiments.dufm.sweep import SweepGrid, run_sweep
from nearest_etf.experiments.dufm.train import OPTIMIZERS, TrainConfig

__all__ = ["add_parser"]


def _list_of(kind: Callable) -> Callable[[str], list]:
    """Parse "a,b,c" (or "a:b" for the integers a..b-1) into a list of ``kind``."""

    def parse(text: str) -> list:
        try:
            if ":" in text:
                lo, hi = text.split(":")
                return list(range(int(lo), int(hi)))
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"cannot parse {text!r} as a list: {exc}") from exc

    return parse


def _add_training_args(parser: argparse.ArgumentParser, multi: bool) -> None:
    """Model/training options; with ``multi`` the swept ones take comma lists."""
    d = TrainConfig()
    ints, floats = (_list_of(int), _list_of(float)) if multi else (int, float)
    wrap = (lambda v: [v]) if multi else (lambda v: v)
    note = " (comma list)" if multi else ""
    parser.add_argument(
        "--layers",
        type=ints,
        default=wrap(d.layers),
        help=f"L, number of weight matrices (>= 2){note}",
    )
    parser.add_argument("--classes", type=ints, default=wrap(d.classes), help=f"K{note}")
    parser.add_argument("--width", type=ints, default=wrap(d.width), help=f"d >= K{note}")
    parser.add_argument(
        "--per-class", type=ints, default=wrap(d.per_class), help=f"n samples per class{note}"
    )
    parser.add_argument(
        "--wd", type=floats, default=wrap(d.wd), help=f"lambda for every regulariser{note}"
    )
    parser.add_argument("--lr", type=floats, default=wrap(d.lr), help=f"learning rate{note}")
    parser.add_argument("--wd-h", type=float, default=None, help="override lambda_H")
    parser.add_argument(
        "--wd-w",
        type=_list_of(float),
        default=None,
        help="override lambda_W_1..lambda_W_L (L comma-separated values)",
    )
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument(
        "--init-scale",
        type=float,
        default=d.init_scale,
        help="std of the Gaussian initialisation of every entry",
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    parser.add_argument("--batch-size", type=int, default=None, help="mini-batch size for sgd")
    parser.add_argument("--momentum", type=float, default=d.momentum)
    parser.add_argument("--dtype", choices=("float64", "float32"), default=d.dtype)
    parser.add_argument("--record-every", type=int, default=d.record_every)
    parser.add_argument(
        "--rank-rtol",
        type=float,
        default=DEFAULT_RANK_RTOL,
        help="numerical rank counts s_i > rtol * s_max",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default runs/dufm/<command>-<time>)",
    )


_SWEPT = ("layers", "classes", "width", "per_class", "wd", "lr")  # comma lists in `sweep`


def _config(args: argparse.Namespace, **values: object) -> TrainConfig:
    """TrainConfig from the parsed options (`values` replace swept lists by one value)."""
    wd_w = None if args.wd_w is None else tuple(args.wd_w)
    return config_from_args(TrainConfig, args, wd_w=wd_w, **values)


def _run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    config = _config(args)
    out = args.out or default_out_dir("dufm", "run")
    summary = run_experiment(config, out, args.rank_rtol)
    keys = ("loss", "fit", "reg", "dnc_loss", "srg_loss", "loss_over_dnc", "inner_rank")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    ranks = {k[5:]: v for k, v in summary.items() if k.startswith("rank_H")}
    print(f"class-mean ranks (rtol {args.rank_rtol:g}): {ranks}")
    print(f"results written to {out}")


def _sweep(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    grid = SweepGrid(
        base=_config(args, **{name: getattr(args, name)[0] for name in _SWEPT}),
        seeds=list(range(args.seed_start, args.seed_start + args.seeds)),
        **{name: getattr(args, name) for name in _SWEPT},
    )
    for config in grid.configs():  # fail fast on bad combinations, before spawning workers
        config.problem()
    out = args.out or default_out_dir("dufm", "sweep")
    summary = run_sweep(
        grid,
        out,
        executor=args.executor,
        workers=args.workers,
        srg_layers=args.srg_layers,
        srg_r=[] if args.no_srg else args.srg_r,
        srg_wd=args.srg_wd,
        rank_rtol=args.rank_rtol,
    )
    keys = ("runs", "found_dnc", "below_dnc", "mean_inner_rank", "figures")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"results written to {out}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `dufm` with its `run` and `sweep` sub-commands."""
    parser = subparsers.add_parser(
        "dufm", help="deep unconstrained features model: low-rank bias vs deep neural collapse"
    )
    commands = parser.add_subparsers(dest="dufm_command", required=True)
    run = commands.add_parser("run", help="train one DUFM and analyse it")
    _add_training_args(run, multi=False)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=_run)
    sweep = commands.add_parser("sweep", help="parallel sweep over wd, lr, width, L, K, n, seeds")
    _add_training_args(sweep, multi=True)
    sweep.add_argument("--seeds", type=int, default=10, help="number of seeds per setting")
    sweep.add_argument("--seed-start", type=int, default=0)
    sweep.add_argument("--executor", choices=EXECUTORS, default="process")
    sweep.add_argument("--workers", type=int, default=None, help="default: CPU count")
    sweep.add_argument("--srg-layers", type=_list_of(int), default=[3, 4, 5])
    sweep.add_argument(
        "--srg-r",
        type=_list_of(int),
        default=list(range(3, 9)),
        help="r values (K = r(r-1)/2) for the L_SRG/L_DNC curve, e.g. 3:9",
    )
    sweep.add_argument(
        "--srg-wd",
        type=float,
        default=0.004,
        help="lambda (all regularisers) of the L_SRG/L_DNC curve",
    )
    sweep.add_argument("--no-srg", action="store_true", help="skip the L_SRG/L_DNC curve")
    sweep.set_defaults(func=_sweep)
