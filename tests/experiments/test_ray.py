"""The Ray executor (the optional extra nearest_etf[ray]) on a local Ray instance: a tiny
`dufm sweep` and a tiny `ufm` study give the same results as the process executor."""

import dataclasses
from pathlib import Path

import pytest

from nearest_etf.experiments._common.parallel import map_unordered
from nearest_etf.experiments.dufm.sweep import SweepGrid, run_sweep
from nearest_etf.experiments.dufm.train import DUFMConfig
from nearest_etf.experiments.ufm.study import UFMConfig, run_study

ray = pytest.importorskip(
    "ray", reason="ray is not installed (pip install -c constraints.txt -e '.[ray]')"
)


@pytest.fixture(scope="module", autouse=True)
def _local_ray():
    """One local Ray instance (2 CPUs, started by the first map_unordered) for the module."""
    yield
    ray.shutdown()


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_dufm_sweep_on_ray_equals_the_process_executor(tmp_path: Path) -> None:
    grid = SweepGrid(base=DUFMConfig(layers=2, classes=3, width=4, steps=40), wd=[0.01, 0.03])
    grid = dataclasses.replace(grid, seeds=[0, 1])
    options = {"srg_layers": [3], "srg_r": [3], "progress": False, "workers": 2}
    on_ray = run_sweep(grid, tmp_path / "ray", executor="ray", **options)
    pooled = run_sweep(grid, tmp_path / "process", executor="process", **options)
    assert on_ray["runs"] == pooled["runs"] == 4
    ray_rows = (tmp_path / "ray" / "runs.csv").read_text().splitlines()
    process_rows = (tmp_path / "process" / "runs.csv").read_text().splitlines()
    header = ray_rows[0].split(",")
    drop = header.index("seconds") if "seconds" in header else None
    strip = lambda line: [v for i, v in enumerate(line.split(",")) if i != drop]  # noqa: E731
    assert [strip(r) for r in ray_rows] == [strip(r) for r in process_rows]
    assert (tmp_path / "ray" / "srg_ratio.csv").read_text() == (
        tmp_path / "process" / "srg_ratio.csv"
    ).read_text()


@pytest.mark.slow
def test_ufm_study_on_ray_equals_the_process_executor() -> None:
    config = UFMConfig(classes=3, dim=4, per_class=2, steps=20, records=5)
    common = {
        "methods": ["fixed", "implicit"],
        "seeds": [0],
        "lr_grid": [0.1, 1.0],
        "shared_lr": 0.1,
        "tune_seed": 7,
        "workers": 2,
        "progress": False,
    }
    on_ray = run_study(config, executor="ray", **common)
    pooled = run_study(config, executor="process", **common)
    assert on_ray.best_lr == pooled.best_lr and on_ray.tuning == pooled.tuning
    assert on_ray.runs.keys() == pooled.runs.keys()
    for key, run in pooled.runs.items():
        assert _without_time([run.to_dict()]) == _without_time([on_ray.runs[key].to_dict()])


def test_a_ray_address_needs_the_ray_executor() -> None:
    with pytest.raises(ValueError, match="ray executor"):
        list(map_unordered(abs, [1], "process", 2, address="auto"))
