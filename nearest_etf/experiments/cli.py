"""The `nearest-etf` command line: one sub-command per experiment.

Each experiment module exposes `add_parser(subparsers)`, which registers its sub-command and
sets `func` (a callable taking the parsed namespace) as the parser default.

`main` is the entry point: it records the command line in ``args.argv`` (run manifests keep
it), turns ``--resume DIR`` into the command line recorded in DIR's manifest plus the options
given now (`runs.resumed_argv`), and reports user errors (bad options, files, data, output
directories: `runs.UserError` and argparse's errors) as one line on stderr (whitespace
collapsed) with exit status 2, and an interruption (SIGINT) with status 130. ``--debug``
anywhere on the command line shows the traceback of a user error instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from nearest_etf.experiments import adaptive_etf, demo, dufm, etf_transformer, train
from nearest_etf.experiments._common.options import show_defaults
from nearest_etf.experiments._common.runs import UserError, resumed_argv
from nearest_etf.experiments.bounds import cli as bounds_cli
from nearest_etf.experiments.ufm import cli as ufm_cli

_COMMANDS = (adaptive_etf, bounds_cli, demo, dufm, etf_transformer, train, ufm_cli)
USAGE_ERROR = 2
INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `UserError` (one line, exit 2, via `main`)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nearest-etf",
        description="Nearest simplex-ETF solvers, declarative nodes, neural-collapse experiments.",
        epilog="--debug (anywhere): show tracebacks of user errors.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in _COMMANDS:
        module.add_parser(subparsers)
    for subparser in subparsers.choices.values():
        show_defaults(subparser)
    return parser


def _run(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "resume", None) is not None:
        argv = resumed_argv(argv, args.resume)
        args = parser.parse_args(argv)
    args.argv = argv
    args.func(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line `argv` (default: sys.argv[1:]); see the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        _run(argv)
    except UserError as exc:
        if debug:
            raise
        print(f"nearest-etf: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.exit(INTERRUPTED)
    except BrokenPipeError:
        # the reader of stdout went away (`... | head`): stop quietly, as the Python docs advise,
        # pointing stdout at devnull so that the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
