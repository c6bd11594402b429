"""The files the README and docs/ name (tests, benchmarks, modules, figures) exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"\b((?:tests|benchmarks|nearest_etf)/[\w/]+\.py)\b")
FIGURE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_named_files_exist(page: Path) -> None:
    text = page.read_text()
    missing = [path for path in PATH.findall(text) if not (ROOT / path).exists()]
    missing += [figure for figure in FIGURE.findall(text) if not (page.parent / figure).exists()]
    assert not missing, f"{page.name} names files that do not exist: {sorted(set(missing))}"
