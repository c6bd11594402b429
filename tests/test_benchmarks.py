"""Every script in benchmarks/ imports against the current package and answers --help (a
benchmark that only runs by hand must not rot unnoticed)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted(
    path
    for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()  # not the modules they import
)


# the package's own deprecation messages (moved or renamed names) fail the test
OUR_DEPRECATIONS = "error:.*(moved to|deprecated and will be removed):DeprecationWarning"


@pytest.mark.filterwarnings(OUR_DEPRECATIONS)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_benchmark_answers_help(script: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # as when run as a script
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
