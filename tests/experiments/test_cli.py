import csv
import json
from pathlib import Path

import pytest

from nearest_etf.experiments.cli import main
from nearest_etf.experiments.demo import run_demo


def test_demo_rows_agree_with_closed_form() -> None:
    rows = run_demo(8, 3, seed=0)
    by_method = {(r["stage"], r["method"]): r for r in rows}
    assert set(by_method) == {
        ("forward", "procrustes"),
        ("forward", "trust-regions"),
        ("forward", "riemannian-adam"),
        ("fwd+bwd", "analytic"),
        ("fwd+bwd", "kkt"),
        ("fwd+bwd", "cg"),
    }
    assert by_method[("forward", "trust-regions")]["error"] <= 1e-9
    assert by_method[("fwd+bwd", "kkt")]["error"] <= 1e-8
    assert by_method[("fwd+bwd", "cg")]["error"] <= 1e-8


def test_demo_command_prints_and_writes_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["demo", "--dim", "6", "--classes", "3", "--out", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "d=6, K=3" in out and f"output directory: {tmp_path / 'd'}" in out
    methods = ("procrustes", "trust-regions", "riemannian-adam", "analytic", "kkt", "cg")
    for method in methods:
        assert method in out
    with (tmp_path / "d" / "demo.csv").open() as f:
        assert tuple(r["method"] for r in csv.DictReader(f)) == methods
    saved = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert saved["settings"] == {"dim": 6, "classes": 3, "seed": 0} and len(saved["rows"]) == 6


def test_unknown_command_exits() -> None:
    with pytest.raises(SystemExit):
        main(["frobnicate"])
