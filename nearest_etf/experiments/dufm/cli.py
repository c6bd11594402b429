"""`nearest-etf dufm run | sweep`: the DUFM simulator's command line.

Both write a run directory (docs/runs.md). Every option is checked before the first step. A
diverged run is reported, not an error; a sweep also warns when runs had not converged (their
loss still changing by more than `train.CONVERGED_RTOL` over the last tenth of the steps), since
unconverged runs can reverse the comparisons the sweep is for. `dufm sweep --resume DIR` runs
only the runs DIR has not recorded; `dufm run --resume DIR` trains its one run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from nearest_etf.experiments._common import options
from nearest_etf.experiments._common.runs import UserError, open_run, user_errors
from nearest_etf.experiments.dufm.analysis import DUFM_RANK_RTOL
from nearest_etf.experiments.dufm.run import run_experiment
from nearest_etf.experiments.dufm.sweep import SweepGrid, check_sweep, run_sweep, sweep_settings
from nearest_etf.experiments.dufm.train import CONVERGED_RTOL, OPTIMIZERS, DUFMConfig

__all__ = ["add_parser"]


def _add_training_args(parser: argparse.ArgumentParser, multi: bool) -> None:
    """Model/training options; with ``multi`` the swept ones take comma lists."""
    d = DUFMConfig()
    ints, rates, decays = (int, options.positive_float, options.nonnegative_float)
    if multi:
        ints, rates, decays = (
            options.comma_list(int, ranges=True),
            options.comma_list(options.positive_float),
            options.comma_list(options.nonnegative_float),
        )
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
        "--wd", type=decays, default=wrap(d.wd), help=f"lambda for every regulariser{note}"
    )
    parser.add_argument("--lr", type=rates, default=wrap(d.lr), help=f"learning rate{note}")
    parser.add_argument(
        "--wd-h", type=options.nonnegative_float, default=None, help="override lambda_H"
    )
    parser.add_argument(
        "--wd-w",
        type=options.comma_list(options.nonnegative_float),
        default=None,
        help="override lambda_W_1..lambda_W_L (L comma-separated values)",
    )
    parser.add_argument(
        "--steps", type=options.positive_int, default=d.steps, help="training steps"
    )
    parser.add_argument(
        "--init-scale",
        type=options.positive_float,
        default=d.init_scale,
        help="std of the Gaussian initialisation of every entry",
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    parser.add_argument(
        "--batch-size", type=options.positive_int, default=None, help="mini-batch size for sgd"
    )
    parser.add_argument("--momentum", type=options.nonnegative_float, default=d.momentum)
    parser.add_argument("--dtype", choices=("float64", "float32"), default=d.dtype)
    parser.add_argument("--record-every", type=options.positive_int, default=d.record_every)
    parser.add_argument(
        "--rank-rtol",
        type=options.positive_float,
        default=DUFM_RANK_RTOL,
        help="numerical rank counts s_i > rtol * s_max (0 < rtol < 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    options.add_output_arguments(parser, "output directory (default runs/dufm/<command>-<time>)")


_SWEPT = ("layers", "classes", "width", "per_class", "wd", "lr")  # comma lists in `sweep`


def _config(args: argparse.Namespace, **values: object) -> DUFMConfig:
    """DUFMConfig from the parsed options (`values` replace swept lists by one value);
    `UserError` for a bad combination."""
    wd_w = None if args.wd_w is None else tuple(args.wd_w)
    with user_errors():
        return options.config_from_args(DUFMConfig, args, wd_w=wd_w, **values)


def _check_rank_rtol(rtol: float) -> None:
    if not 0 < rtol < 1:
        raise UserError(f"--rank-rtol must lie in (0, 1), got {rtol}")


def _not_converged_warning(count: int, total: int) -> str:
    return (
        f"warning: {count} of {total} runs had not converged (loss still changing by more than "
        f"{CONVERGED_RTOL:g} over the last tenth of the steps); their ranks and DNC verdicts "
        "may change with more --steps"
    )


def _run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    config = _config(args)
    _check_rank_rtol(args.rank_rtol)
    settings = {"config": asdict(config), "rank_rtol": args.rank_rtol}
    with open_run(args, "dufm run", settings, options.default_out_dir("dufm", "run")) as run:
        summary = run_experiment(
            config, run.path, args.rank_rtol, not args.no_progress, args.format
        )
        run.update(runs={"run": "diverged" if summary["diverged"] else "finished"})
    if summary["diverged"]:
        print(
            f"the run diverged at step {summary['diverged_step']}: {summary['divergence']}; "
            f"its loss curve up to there is in {run.path}"
        )
        return
    keys = ("loss", "fit", "reg", "dnc_loss", "srg_loss", "loss_over_dnc", "inner_rank")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    ranks = {k[5:]: v for k, v in summary.items() if k.startswith("rank_H")}
    print(f"class-mean ranks (rtol {args.rank_rtol:g}): {ranks}")
    if summary["converged"] is False:
        print(_not_converged_warning(1, 1), file=sys.stderr)
    print(f"results written to {run.path}")


def _sweep(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    grid = SweepGrid(
        base=_config(args, **{name: getattr(args, name)[0] for name in _SWEPT}),
        seeds=list(range(args.seed_start, args.seed_start + args.seeds)),
        **{name: getattr(args, name) for name in _SWEPT},
    )
    srg_r = [] if args.no_srg else args.srg_r
    options.check_executor_arguments(args)
    with user_errors():  # every setting, before spawning workers
        check_sweep(grid, args.srg_layers, srg_r, args.srg_wd, args.rank_rtol)
    settings = sweep_settings(grid, args.srg_layers, srg_r, args.srg_wd, args.rank_rtol)
    with open_run(args, "dufm sweep", settings, options.default_out_dir("dufm", "sweep")) as run:
        summary = run_sweep(
            grid,
            run,
            executor=args.executor,
            workers=args.workers,
            ray_address=args.ray_address,
            srg_layers=args.srg_layers,
            srg_r=srg_r,
            srg_wd=args.srg_wd,
            rank_rtol=args.rank_rtol,
            progress=not args.no_progress,
            figure_format=args.format,
        )
    keys = ("runs", "diverged", "not_converged", "found_dnc", "below_dnc", "mean_inner_rank")
    print(json.dumps({k: summary[k] for k in (*keys, "figures")}, indent=2))
    if summary["diverged"]:
        diverged = [f"{key}" for key in run.diverged_runs()]
        print(f"{summary['diverged']} of {summary['runs']} runs diverged: {', '.join(diverged)}")
    if summary["not_converged"]:
        valid = summary["runs"] - summary["diverged"]
        print(_not_converged_warning(summary["not_converged"], valid), file=sys.stderr)
    print(f"results written to {run.path}")


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
    sweep.add_argument(
        "--seeds", type=options.positive_int, default=10, help="number of seeds per setting"
    )
    sweep.add_argument("--seed-start", type=int, default=0)
    options.add_executor_arguments(sweep)
    sweep.add_argument(
        "--workers",
        type=options.positive_int,
        default=None,
        help="processes, or CPUs of the local Ray instance (default: CPU count)",
    )
    sweep.add_argument("--srg-layers", type=options.comma_list(int, ranges=True), default=[3, 4, 5])
    sweep.add_argument(
        "--srg-r",
        type=options.comma_list(int, ranges=True),
        default=list(range(3, 9)),
        help="r values (K = r(r-1)/2) for the L_SRG/L_DNC curve: a comma list, or lo:hi for "
        "lo..hi-1 (the end excluded, like range; 3:9 = 3,4,5,6,7,8)",
    )
    sweep.add_argument(
        "--srg-wd",
        type=options.positive_float,
        default=0.004,
        help="lambda (all regularisers) of the L_SRG/L_DNC curve",
    )
    sweep.add_argument("--no-srg", action="store_true", help="skip the L_SRG/L_DNC curve")
    sweep.set_defaults(func=_sweep)
