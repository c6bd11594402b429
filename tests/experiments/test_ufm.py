"""The UFM convergence study: tiny runs of every method, determinism, lr selection, outputs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from nearest_etf import metrics
from nearest_etf.etf import random_stiefel, simplex_etf
from nearest_etf.experiments.cli import main
from nearest_etf.experiments.ufm.study import (
    METHODS,
    METRICS,
    UFM,
    UFMConfig,
    UFMRun,
    etf_loss_floor,
    first_crossing,
    run_study,
    run_ufm,
    selection_score,
    step_metrics,
    summarise_study,
    thresholds,
    ufm_head,
)
from nearest_etf.nn.heads import FixedETFHead, ImplicitETFHead, LearnedHead

TINY = UFMConfig(classes=4, dim=8, per_class=3, steps=40, records=10)


@pytest.fixture(scope="module")
def tiny_runs() -> dict[str, UFMRun]:
    return {method: run_ufm(TINY, method, lr=0.3, seed=0) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_tiny_run_records_every_metric(tiny_runs: dict[str, UFMRun], method: str) -> None:
    run = tiny_runs[method]
    assert not run.diverged
    assert run.steps == TINY.record_steps()
    for name in METRICS:
        values = run.curves[name]
        assert len(values) == len(run.steps), name
        assert all(math.isfinite(v) for v in values), name
    # full-batch training on separable free features: everything ends classified correctly
    assert run.final("error") == 0.0
    assert run.final("nc1") < run.curves["nc1"][0]


@pytest.mark.parametrize("method", ["implicit", "implicit-none"])
def test_implicit_loss_decreases(tiny_runs: dict[str, UFMRun], method: str) -> None:
    loss = tiny_runs[method].curves["loss"]
    assert loss[-1] < 0.8 * loss[0]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(loss))
    # the ETF heads cannot beat the collapsed-ETF cross-entropy at norm tau = 1
    assert loss[-1] >= etf_loss_floor(TINY.classes, 1.0) - 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_runs_are_deterministic_per_seed(tiny_runs: dict[str, UFMRun], method: str) -> None:
    again = run_ufm(TINY, method, lr=0.3, seed=0)
    assert again.curves == tiny_runs[method].curves
    other = run_ufm(TINY, method, lr=0.3, seed=1)
    assert other.curves["loss"] != tiny_runs[method].curves["loss"]


def test_same_seed_same_initial_features_for_every_method() -> None:
    starts = [UFM(TINY, method, seed=3).features.detach() for method in METHODS]
    for start in starts[1:]:
        assert torch.equal(start, starts[0])


def test_heads_are_the_projects_heads_with_the_shared_normalisation() -> None:
    config = UFMConfig(classes=3, dim=5, per_class=2, feature_norm=2.0, delta=0.01)
    learned, fixed = ufm_head("learned", config, 0), ufm_head("fixed", config, 0)
    implicit, none = ufm_head("implicit", config, 0), ufm_head("implicit-none", config, 0)
    assert isinstance(learned, LearnedHead) and isinstance(fixed, FixedETFHead)
    assert isinstance(implicit, ImplicitETFHead) and isinstance(none, ImplicitETFHead)
    assert implicit.tracker.average == "ema" and none.tracker.average == "none"
    assert implicit.delta == 0.01
    every10 = ufm_head("implicit-k10", config, 0)
    assert every10.solve_every == 10 and implicit.solve_every == 1
    assert every10.tracker.average == "ema" and every10.delta == 0.01
    for head in (learned, fixed, implicit, none):
        assert head.temperature == 2.0
    for head in (fixed, implicit, none):  # full batch: the eval bias is the last step's
        assert head.momentum == 1.0
    # the fixed head's frame is the Haar-random one of the seed
    U = random_stiefel(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fixed.weight, (U @ simplex_etf(3)).T)


def test_step_metrics_of_an_exact_collapse() -> None:
    K, d, n = 4, 6, 3
    U = random_stiefel(d, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = (U @ simplex_etf(K, dtype=torch.float64)).T
    labels = torch.arange(K).repeat_interleave(n)
    features = 2.0 * W[labels]
    values = step_metrics(features, labels, K, W, torch.zeros(K, dtype=torch.float64))
    assert values["error"] == 0.0
    for name in ("nc1", "etf_distance", "nc2_classifier", "nc3", "equinorm"):
        assert values[name] == pytest.approx(0.0, abs=1e-10), name
    assert values["cosine_margin"] == pytest.approx(K / (K - 1))
    # and an independent check of one entry against the metrics module on a random case
    noisy = features + 0.1 * torch.randn(K * n, d, dtype=torch.float64)
    values = step_metrics(noisy, labels, K, W, torch.zeros(K, dtype=torch.float64))
    assert values["nc1"] == pytest.approx(float(metrics.nc1(noisy, labels, K)))


def test_first_crossing_and_selection_score() -> None:
    run = UFMRun(method="fixed", lr=1.0, seed=0, steps=[0, 10, 20])
    run.curves.update(nc1=[1.0, 1e-2, 1e-5], etf_distance=[1.0, 0.1, 0.01], nc3=[1.0, 1.0, 1.0])
    assert first_crossing(run, "nc1", "<=", 1e-2) == 10
    assert first_crossing(run, "etf_distance", "<=", 1e-3) is None
    assert first_crossing(run, "nc3", ">=", 1.0) == 0
    assert {thresholds(TINY)[m] for m in ("nc1", "etf_distance", "nc3")} == {("<=", 1e-3)}
    # log10(max(m, 1e-3) / 1e-3) averaged over the steps, summed over the three metrics
    expected = (3 + 1 + 0) / 3 + (3 + 2 + 1) / 3 + (3 + 3 + 3) / 3
    assert selection_score(run, TINY) == pytest.approx(expected)
    run.curves.update(nc1=[1e-4] * 3, etf_distance=[1e-3] * 3, nc3=[0.0] * 3)
    assert selection_score(run, TINY) == 0.0
    run.diverged = True
    assert selection_score(run, TINY) == math.inf


def test_diverging_lr_is_flagged() -> None:
    config = UFMConfig(classes=3, dim=4, per_class=2, steps=30, feature_norm=None, momentum=0.9)
    run = run_ufm(config, "learned", lr=1e6, seed=0)
    assert run.diverged
    assert selection_score(run, config) == math.inf


def test_study_picks_the_best_lr_per_method_and_reuses_runs() -> None:
    config = UFMConfig(classes=3, dim=4, per_class=2, steps=20, records=5)
    study = run_study(
        config,
        ["fixed", "implicit"],
        seeds=[0, 1],
        lr_grid=[0.01, 3.0],
        shared_lr=0.01,
        tune_seed=7,
        progress=False,
    )
    for method in ("fixed", "implicit"):
        scores = study.tuning[method]
        assert study.best_lr[method] == min(scores, key=scores.get)
        # a 300x larger lr collapses faster on this easy problem
        assert study.best_lr[method] == 3.0
        assert {r.seed for r in study.group("best-lr", method)} == {0, 1}
    assert len(study.runs) == 2 * 2 + 2 * 2 * 2  # tuning + (shared, best) x seeds, no repeats
    rows = summarise_study(study)
    assert [(r["comparison"], r["method"]) for r in rows] == [
        ("shared-lr", "fixed"),
        ("shared-lr", "implicit"),
        ("best-lr", "fixed"),
        ("best-lr", "implicit"),
    ]
    assert all(r["seeds"] == 2 for r in rows)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="method"):
        run_ufm(TINY, "svm", lr=1.0, seed=0)
    with pytest.raises(ValueError, match="lr"):
        run_ufm(TINY, "fixed", lr=0.0, seed=0)
    with pytest.raises(ValueError, match="dim"):
        UFMConfig(classes=10, dim=5)
    with pytest.raises(ValueError, match="optimizer"):
        UFMConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="tune_seed"):
        run_study(TINY, ["fixed"], seeds=[0], lr_grid=[1.0, 2.0], shared_lr=1.0, tune_seed=0)


def test_command_writes_curves_summary_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ufm"
    command = (
        "ufm --classes 3 --dim 4 --per-class 2 --steps 10 --seeds 2 --lr 1 --lr-grid 0.3,3 "
        "--methods learned,fixed,implicit,implicit-none --records 11 --workers 1 --no-progress"
    )
    main([*command.split(), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "First recorded step where the metric crosses its threshold" in printed
    assert "Final values, mean +- std over seeds" in printed
    for name in ("curves.csv", "summary.csv", "summary.txt", "study.json", "ufm.png"):
        assert (out / name).stat().st_size > 0, name
    record = json.loads((out / "study.json").read_text())
    assert record["comparisons"]["shared-lr"] == dict.fromkeys(
        ["learned", "fixed", "implicit", "implicit-none"], 1.0
    )
    assert set(record["comparisons"]["best-lr"].values()) <= {0.3, 3.0}
    lines = (out / "curves.csv").read_text().splitlines()
    assert lines[0].split(",") == ["method", "lr", "seed", "step", *METRICS]
    # every step of every run (records > steps)
    assert len(lines) - 1 == 11 * len(record["runs"])
    assert (out / "ufm.png").read_bytes()[:4] == b"\x89PNG"


def test_replot_rebuilds_the_same_tables_from_study_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "run", tmp_path / "replot"
    command = (
        "ufm --classes 3 --dim 4 --per-class 2 --steps 6 --seeds 2 --lr 1 --lr-grid 1,3 "
        "--methods fixed,implicit --workers 1 --no-progress"
    )
    main([*command.split(), "--out", str(first)])
    main(["ufm", "--replot", str(first / "study.json"), "--out", str(second)])
    capsys.readouterr()
    for name in ("summary.txt", "summary.csv", "curves.csv"):
        assert (second / name).read_text() == (first / name).read_text(), name
    assert (second / "ufm.png").stat().st_size > 0
