"""Command-line pieces shared by the training sub-commands (`train`, `adaptive-etf`,
`etf-transformer`) and the default run directories of every experiment command.

Each command's frozen config dataclass extends `TrainingOptions` (redeclaring a field changes its
default), and an instance of it adds its options, with its values as their defaults, to the
command's parser (`add_command`, `add_optimisation_arguments`, `add_run_arguments`); option
names, help texts and types are the commands' historical ones (docs and scripts rely on them).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nearest_etf.experiments._common.parallel import EXECUTORS, check_executor
from nearest_etf.experiments._common.plotting import FORMATS
from nearest_etf.experiments._common.runs import UserError

__all__ = [
    "DATASET_HELP",
    "FieldOption",
    "HelpFormatter",
    "TrainingOptions",
    "add_field_arguments",
    "add_output_arguments",
    "add_threads_argument",
    "check_executor_arguments",
    "comma_list",
    "config_from_args",
    "default_out_dir",
    "nonnegative_float",
    "positive_float",
    "positive_int",
    "show_defaults",
    "unit_fraction",
]

DATASET_HELP = (
    "mnist1d | digits | gaussian | a directory of MNIST/Fashion-MNIST IDX files or CIFAR-10 "
    "python batches"
)

ConfigT = TypeVar("ConfigT")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The help formatter of every sub-command: each option's help shows its default
    (`show_defaults`), a list default as the option takes it (a comma list, or space-separated
    values for an option of several arguments)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if isinstance(action.default, list | tuple) and text is not None:
            separator = " " if action.nargs in ("+", "*") else ","  # as the option is typed
            listed = separator.join(str(v) for v in action.default)
            text = text.replace("%(default)s", listed.replace("%", "%%"))
        return text


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Make `parser`'s --help show every option's default: `HelpFormatter`, and options
    without a help text get one naming the default (argparse prints defaults only after a
    help text); the same for its sub-commands' parsers."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                show_defaults(subparser)
        elif action.help is None and action.default is not argparse.SUPPRESS:
            action.help = "default: %(default)s"


_NEGATED_FLAGS = {"progress": "no_progress", "save_networks": "no_networks"}  # field: flag


@dataclass(frozen=True)
class TrainingOptions:
    """Options every training command has: data, optimisation budget, device and progress.
    An instance adds them to the command's parser with its values as their defaults; a
    subclass may name its default run directory otherwise (`run_name`)."""

    dataset: str = "mnist1d"
    epochs: int = 20
    seeds: int = 2
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 5e-4
    train_subset: int | None = None
    test_subset: int | None = None
    device: str = "cpu"
    progress: bool = True

    @property
    def run_name(self) -> str:
        """The name of the command's default run directory (`default_out_dir`): the data
        set's."""
        return Path(self.dataset).name

    def add_command(
        self,
        subparsers: argparse._SubParsersAction,
        command: str,
        help: str,
        main: Callable[[argparse.Namespace], Any],
        dataset_help: str = DATASET_HELP,
    ) -> argparse.ArgumentParser:
        """Register the training sub-command `command` (`help` in `nearest-etf --help`) that
        runs `main`, with its data options --dataset, --train-subset and --test-subset (fields
        dataset, train_subset, test_subset); the caller adds the others."""
        parser = subparsers.add_parser(command, help=help)
        parser.add_argument("--dataset", default=self.dataset, help=dataset_help)
        parser.add_argument("--train-subset", type=positive_int, default=self.train_subset)
        parser.add_argument("--test-subset", type=positive_int, default=self.test_subset)
        parser.set_defaults(func=main)
        return parser

    def add_optimisation_arguments(
        self, parser: argparse.ArgumentParser, lr_help: str | None = None
    ) -> None:
        """--epochs, --seeds, --batch-size, --lr, --weight-decay (fields of the same names)."""
        parser.add_argument("--epochs", type=positive_int, default=self.epochs)
        parser.add_argument(
            "--seeds", type=positive_int, default=self.seeds, help="runs with seeds 0..S-1"
        )
        parser.add_argument("--batch-size", type=positive_int, default=self.batch_size)
        parser.add_argument("--lr", type=positive_float, default=self.lr, help=lr_help)
        parser.add_argument("--weight-decay", type=nonnegative_float, default=self.weight_decay)

    def add_run_arguments(
        self,
        parser: argparse.ArgumentParser,
        device_help: str = "cpu, cuda, ...",
        threads: bool = True,
        networks: bool = False,
    ) -> None:
        """--device, --threads (when `threads`; not a field), --out / --resume / --overwrite
        (`add_output_arguments`), --no-progress and, when `networks`, --no-networks
        (`config_from_args` sets the fields `progress` and `save_networks` to their
        negations)."""
        parser.add_argument("--device", default=self.device, help=device_help)
        if threads:
            add_threads_argument(
                parser,
                "torch CPU threads (these models are small: more threads mostly add contention)",
            )
        add_output_arguments(parser)
        parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
        if networks:
            parser.add_argument(
                "--no-networks",
                action="store_true",
                help="do not save the trained networks (network-*.pt layer stacks, for `bounds`)",
            )


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _finite_float(text: str, positive: bool) -> float:
    """argparse type core: a finite float, > 0 (`positive`) or >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        bound = "> 0" if positive else ">= 0"
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (learning rates, tolerances)."""
    return _finite_float(text, positive=True)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0 (weight decays, momenta)."""
    return _finite_float(text, positive=False)


def comma_list(
    kind: Callable[[str], Any] = str,
    choices: Sequence[str] | None = None,
    *,
    ranges: bool = False,
) -> Callable[[str], list]:
    """argparse type: "a,b,c" as a list of ``kind`` (each item parsed by it), non-empty, no item
    twice (a grid point or a method listed twice would run and count twice), each among
    ``choices`` if given; with ``ranges`` also "a:b" for the integers a..b-1 (end excluded)."""

    def parse(text: str) -> list:
        try:
            if ranges and ":" in text:
                lo, hi = text.split(":")
                values = [kind(str(v)) for v in range(int(lo), int(hi))]
            else:
                values = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"cannot parse {text!r} as a list: {exc}") from exc
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        if choices is not None and (unknown := [v for v in values if v not in choices]):
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(str, unknown))}; choose from {', '.join(choices)}"
            )
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"{text!r} names a value twice")
        return values

    return parse


def unit_fraction(text: str) -> float:
    """argparse type: a float strictly between 0 and 1 (relative tolerances, probabilities)."""
    value = _finite_float(text, positive=True)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def check_executor_arguments(args: argparse.Namespace) -> None:
    """`UserError` before anything runs for executor options `map_unordered` would refuse
    (`parallel.check_executor`: e.g. --ray-address without --executor ray)."""
    try:
        check_executor(args.executor, getattr(args, "ray_address", None))
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def add_output_arguments(
    parser: argparse.ArgumentParser, out_help: str = "output directory", *, figures: bool = True
) -> None:
    """--out DIR, --format (of the figures; only for a command that draws some), --resume DIR
    and --overwrite: the output-directory policy of every command that writes a run directory
    (`runs.RunDirectory.open`, docs/runs.md)."""
    parser.add_argument("--out", type=Path, default=None, help=out_help)
    if figures:
        parser.add_argument(
            "--format",
            choices=FORMATS,
            default="png",
            help="file format of the figures (pdf and svg are vector graphics, for papers)",
        )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the interrupted run in DIR with the settings recorded in its manifest",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the files of the run directory --out before running (a non-empty --out "
        "is refused otherwise)",
    )


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """--executor (`parallel.EXECUTORS`) and --ray-address of the sweep commands."""
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="process",
        help="process: a local process pool; ray: Ray tasks (pip install nearest_etf[ray]); "
        "serial: one after the other in this process",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="with --executor ray: the running Ray cluster to use ('auto': the one this "
        "machine belongs to; 'ray://HOST:10001': a remote head node); default: a local Ray "
        "instance with --workers CPUs, started by the command and ended with it",
    )


FieldOption = tuple[str, Callable[[str], Any], str | None]  # (field, argparse type, help)


def add_field_arguments(
    parser: argparse.ArgumentParser, defaults: object, options: Sequence[FieldOption]
) -> None:
    """One option per (field, argparse type, help or None) of `options`, in order: --<field>
    (underscores as dashes) for the config field of that name, its default the field's value in
    `defaults` (the config's defaults)."""
    for name, kind, text in options:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=getattr(defaults, name), help=text)


def add_threads_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """--threads: the torch CPU threads of the command's process (`help`: what for), default 1
    (not a config field)."""
    parser.add_argument("--threads", type=positive_int, default=1, help=help)


def config_from_args(
    config_cls: type[ConfigT], args: argparse.Namespace, **overrides: object
) -> ConfigT:
    """`config_cls(**values)`: every dataclass field named like an attribute of `args` takes
    that attribute, a field named in `_NEGATED_FLAGS` the negation of its --no-... flag,
    `overrides` replace or add values (renamed or derived fields), the other fields keep their
    defaults."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values |= {
        name: not getattr(args, flag)
        for name, flag in _NEGATED_FLAGS.items()
        if name in names and hasattr(args, flag)
    }
    return config_cls(**(values | overrides))


def default_out_dir(command: str, name: str) -> Path:
    """runs/<command>/<name>-<YYYYmmdd-HHMMSS> (local time now)."""
    return Path("runs") / command / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
