"""The `nearest-etf` command line: one sub-command per experiment.

Each experiment module exposes `add_parser(subparsers)`, which registers its sub-command and
sets `func` (a callable taking the parsed namespace) as the parser default.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from nearest_etf.experiments import adaptive_etf, demo, dufm, etf_transformer, train
from nearest_etf.experiments.bounds import cli as bounds_cli
from nearest_etf.experiments.ufm import cli as ufm_cli

_COMMANDS = (adaptive_etf, bounds_cli, demo, dufm, etf_transformer, train, ufm_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearest-etf",
        description="Nearest simplex-ETF solvers, declarative nodes, neural-collapse experiments.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
