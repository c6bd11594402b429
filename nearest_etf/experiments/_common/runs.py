"""The run lifecycle every experiment command shares (docs/runs.md).

- `UserError`: a problem with the user's options, files or data. The command line prints its
  message as one line and exits with status 2; `user_errors()` turns the `ValueError` and
  `OSError` of a validation phase into one.
- Atomic files: `atomic_path`, `write_text`, `write_json` write to a hidden temporary name in
  the same directory and rename it over the final name, so an interrupted write leaves the
  previous version or nothing, never a truncated file.
- `divergence`: whether a run's loss or parameters are non-finite or beyond `DIVERGENCE_BOUND`.
- `RunDirectory`: an output directory with its manifest.json (command, command line, settings,
  package version, status, per-run statuses), the output-directory policy (a non-empty
  directory needs `--resume` or `--overwrite`), the records of finished runs (units/<key>.json)
  and per-run checkpoints (checkpoints/<key>.pt). Used as a context manager it sets the final
  status: "finished", "diverged" (some run diverged), "interrupted" (SIGINT, with a message
  naming the resume command) or "failed" (an error).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import Tensor

import nearest_etf

__all__ = [
    "DIVERGENCE_BOUND",
    "MANIFEST",
    "RunDirectory",
    "UserError",
    "atomic_path",
    "divergence",
    "open_run",
    "read_manifest",
    "resumed_argv",
    "user_errors",
    "write_json",
    "write_text",
]

MANIFEST = "manifest.json"
# A loss or parameter entry beyond this magnitude marks a run as diverged: no loss or weight of
# these experiments is meaningful at 1e10, and float32 overflow (3.4e38) is far away.
DIVERGENCE_BOUND = 1e10
# Settings that change how a run executes, not what it computes: a resumed run may change them.
ENVIRONMENT_KEYS = frozenset({"progress", "device", "threads", "workers", "executor"})
_OUTPUT_OPTIONS = ("--out", "--resume")  # options with a value dropped from a resumed argv
_OUTPUT_FLAGS = ("--overwrite",)


class UserError(ValueError):
    """A bad option, input file or output directory: reported as one line, exit status 2."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Inside the block, a `ValueError`, `OSError` or `EOFError` (the errors of option, data
    and model checks) is re-raised as a `UserError` with the same message."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(str(exc)) from exc


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a hidden name in the same directory); when the
    block ends normally it is renamed to `path` (atomic on POSIX), otherwise deleted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: Path, obj: object) -> Path:
    """Write `obj` as indented JSON to `path` atomically (NaN written as NaN); returns `path`."""
    return write_text(path, json.dumps(obj, indent=1) + "\n")


def divergence(
    loss: float, tensors: Iterable[Tensor] = (), bound: float = DIVERGENCE_BOUND
) -> str | None:
    """Why a run has diverged, or None: `loss` non-finite or |loss| > bound, or an entry of
    one of `tensors` (parameters) non-finite or beyond the bound in magnitude."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if abs(loss) > bound:
        return f"loss {loss:.3g} exceeds {bound:g}"
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        largest = float(tensor.detach().abs().max())
        if not math.isfinite(largest):
            return "parameters are non-finite"
        if largest > bound:
            return f"a parameter entry {largest:.3g} exceeds {bound:g}"
    return None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _normalised(value: object) -> object:
    """JSON round trip (tuples become lists) without the environment keys of every dict."""
    plain = json.loads(json.dumps(value))

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ENVIRONMENT_KEYS}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(plain)


def _first_difference(old: object, new: object, where: str = "") -> str | None:
    """A description of the first differing entry of two normalised settings, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), key)
            if found:
                return found
        return None
    if old != new:
        return f"{where or 'settings'} was {old!r} in that run, now {new!r}"
    return None


def read_manifest(directory: Path) -> dict:
    """The manifest.json of a run directory; `UserError` if it is missing or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{directory} is not a run directory of nearest-etf (it has no {MANIFEST})"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or "command" not in manifest:
        raise UserError(f"{path} is not a manifest written by nearest-etf")
    return manifest


def _strip_output_options(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _OUTPUT_OPTIONS:
            skip = True
        elif token in _OUTPUT_FLAGS or token.startswith(tuple(f"{o}=" for o in _OUTPUT_OPTIONS)):
            continue
        else:
            out.append(token)
    return out


def resumed_argv(argv: Sequence[str], directory: Path) -> list[str]:
    """The command line that resumes the run in `directory`: the one recorded in its manifest
    (without its --out), then the options of `argv` after the command words (without --resume),
    then ``--resume directory``. `UserError` if the manifest is missing, records no command
    line or belongs to another command than the one `argv` starts with, or if `argv` also
    gives --out or --overwrite (a resumed run stays in its directory, as it is)."""
    manifest = read_manifest(directory)
    stored = manifest.get("argv")
    words = str(manifest["command"]).split()
    if not isinstance(stored, list) or stored[: len(words)] != words:
        raise UserError(f"{directory}/{MANIFEST} records no command line to resume")
    if list(argv[: len(words)]) != words:
        raise UserError(
            f"--resume {directory}: that directory holds a `nearest-etf {manifest['command']}` "
            f"run; resume it with: nearest-etf {manifest['command']} --resume {directory}"
        )
    given = list(argv[len(words) :])
    for option in ("--out", "--overwrite"):
        if any(token == option or token.startswith(f"{option}=") for token in given):
            raise UserError(
                f"--resume {directory} continues that run in its own directory: drop {option}"
            )
    extra = _strip_output_options(given)
    return [*_strip_output_options(stored), *extra, "--resume", str(directory)]


def _clear(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class RunDirectory:
    """An experiment's output directory (see the module docstring and docs/runs.md).

    Files: manifest.json, the command's results, units/<key>.json (one per finished run: its
    record) and checkpoints/<key>.pt (the latest checkpoint of a run in progress).
    """

    def __init__(self, path: Path, manifest: dict, *, writable: bool = True) -> None:
        """A directory opened by `open`; with `writable=False` a read-only view (the other
        ranks under torchrun): the manifest, unit records and checkpoints are read, and
        nothing is written."""
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable

    @classmethod
    def open(
        cls,
        path: Path,
        command: str,
        settings: Mapping[str, object],
        argv: Sequence[str] | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
    ) -> RunDirectory:
        """Apply the output-directory policy to `path`, create it and write its manifest with
        status "running". A new or empty directory is used as is; a non-empty one needs
        `resume` (its manifest must record the same `command` and `settings`, environment keys
        aside) or `overwrite` (its files are deleted; only a run directory, one with a
        manifest.json, is cleared). Errors are `UserError`s naming the directory."""
        path = Path(path)
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        if path.exists() and not path.is_dir():
            raise UserError(f"output directory {path} is a file; choose another --out")
        try:
            occupied = path.is_dir() and any(path.iterdir())
        except OSError as exc:
            raise UserError(f"cannot read output directory {path}: {exc.strerror}") from exc
        settings_json = json.loads(json.dumps(settings))
        manifest: dict[str, object] = {
            "command": command,
            "argv": list(argv) if argv is not None else None,
            "settings": settings_json,
            "package_version": nearest_etf.__version__,
            "status": "running",
            "created": _now(),
            "updated": _now(),
            "resumed": [],
            "runs": {},
        }
        if resume:
            old = read_manifest(path)
            if old["command"] != command:
                raise UserError(
                    f"--resume {path}: that directory holds a `nearest-etf {old['command']}` "
                    f"run, not `nearest-etf {command}`"
                )
            difference = _first_difference(
                _normalised(old.get("settings")), _normalised(settings_json)
            )
            if difference:
                raise UserError(
                    f"--resume {path}: {difference}; a resumed run keeps its settings "
                    "(start a new run with another --out, or pass --overwrite to replace it)"
                )
            old.pop("error", None)
            manifest = old | {
                "status": "running",
                "updated": _now(),
                "resumed": [*old.get("resumed", []), _now()],
            }
        elif occupied and overwrite:
            if not (path / MANIFEST).is_file():
                raise UserError(
                    f"--overwrite: {path} has no {MANIFEST}, so it is not a run directory of "
                    "nearest-etf; refusing to delete its files (choose another --out)"
                )
            if Path.cwd().resolve().is_relative_to(path.resolve()):
                raise UserError(f"--overwrite: {path} contains the working directory")
            _clear(path)
        elif occupied:
            raise UserError(
                f"output directory {path} is not empty; pass --resume {path} to continue the "
                "run in it, --overwrite to replace it, or choose another --out"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path, manifest)
            run._write_manifest()
        except OSError as exc:
            raise UserError(
                f"cannot write to output directory {path}: {exc.strerror or exc}"
            ) from exc
        return run

    # --- manifest and lifecycle ------------------------------------------------------------

    @property
    def command(self) -> str:
        return str(self.manifest["command"])

    @property
    def status(self) -> str:
        return str(self.manifest["status"])

    def resume_command(self) -> str:
        """The command line that continues this run."""
        return f"nearest-etf {self.command} --resume {self.path}"

    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        if not self.writable:
            return
        write_json(self.path / MANIFEST, self.manifest)

    def update(self, **fields: object) -> None:
        """Set manifest fields and rewrite manifest.json."""
        self.manifest |= fields
        self._write_manifest()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            runs = self.runs()
            diverged = any(s == "diverged" for s in runs.values())
            self.update(status="diverged" if diverged else "finished")
        elif issubclass(kind, KeyboardInterrupt):
            self.update(status="interrupted")
            print(
                f"interrupted: the results so far are in {self.path}; continue with: "
                f"{self.resume_command()}",
                file=sys.stderr,
            )
        else:
            self.update(status="failed", error=f"{kind.__name__}: {exc}")

    # --- runs (units of work) -----------------------------------------------------------------

    def runs(self) -> dict[str, str]:
        """Status of every run recorded so far: key -> "finished" | "diverged"."""
        return dict(self.manifest.get("runs", {}))  # type: ignore[call-overload]

    def _unit_path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad run key {key!r}")
        return self.path / "units" / f"{key}.json"

    def finished(self, key: str) -> dict | None:
        """The record stored by `finish(key, ...)`, or None if that run has not finished."""
        if key not in self.runs():
            return None
        return json.loads(self._unit_path(key).read_text())

    def finish(self, key: str, record: Mapping[str, object], diverged: bool = False) -> dict:
        """Store a finished run's `record` (JSON-serialisable) as units/<key>.json, mark it
        "finished" or "diverged" in the manifest and delete its checkpoint. Returns the record
        as `finished(key)` will read it back (tuples become lists), so that results computed
        now and read back after a resume are identical."""
        path = self._unit_path(key)
        text = json.dumps(dict(record), indent=1) + "\n"
        if not self.writable:
            return json.loads(text)
        path.parent.mkdir(exist_ok=True)
        write_text(path, text)
        runs = self.runs() | {key: "diverged" if diverged else "finished"}
        self.update(runs=runs)
        checkpoint = self.checkpoint_path(key)
        checkpoint.unlink(missing_ok=True)
        if checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
            checkpoint.parent.rmdir()
        return json.loads(text)

    def checkpoint_path(self, key: str) -> Path:
        """checkpoints/<key>.pt (neither the file nor the folder need exist)."""
        return self.path / "checkpoints" / f"{self._unit_path(key).stem}.pt"

    def diverged_runs(self) -> list[str]:
        """Keys of the runs recorded as diverged."""
        return [key for key, status in self.runs().items() if status == "diverged"]


def open_run(
    args: argparse.Namespace,
    command: str,
    settings: Mapping[str, object],
    default: Path,
) -> RunDirectory:
    """`RunDirectory.open` for a parsed command line: the directory is ``--resume DIR``, else
    ``--out``, else `default`; ``--overwrite`` and the recorded command line (`args.argv`, set
    by the entry point) are passed on. Prints "output directory: ..."."""
    resume = getattr(args, "resume", None)
    out = getattr(args, "out", None)
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise UserError("give either --resume DIR (continue that run) or --out DIR, not both")
    path = Path(resume or out or default)
    run = RunDirectory.open(
        path,
        command,
        settings,
        getattr(args, "argv", None),
        resume=resume is not None,
        overwrite=bool(getattr(args, "overwrite", False)),
    )
    print(f"output directory: {path}" + (" (resumed)" if resume is not None else ""))
    return run
