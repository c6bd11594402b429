import argparse
import json
import math

import pytest
import torch

from nearest_etf.experiments import dufm
from nearest_etf.experiments._common.parallel import map_unordered
from nearest_etf.experiments.dufm.analysis import analyse_layers, hidden_ranks, is_dnc
from nearest_etf.experiments.dufm.model import DUFMProblem
from nearest_etf.experiments.dufm.reference import (
    balanced_scale_loss,
    dnc_loss,
    dnc_point,
    incidence_matrix,
    optimise_locally,
    reference_losses,
    srg_point,
    srg_vertices,
)
from nearest_etf.experiments.dufm.sweep import SweepGrid, srg_ratio_row
from nearest_etf.experiments.dufm.train import DUFMConfig, train_dufm
from nearest_etf.metrics.collapse import class_means

F64 = torch.float64


def _random_point(problem: DUFMProblem, seed: int = 0) -> list[torch.Tensor]:
    return problem.init(seed, scale=0.7)


@pytest.mark.parametrize(("layers", "per_class"), [(2, 1), (3, 2), (4, 3)])
def test_explicit_gradient_matches_autograd(layers, per_class):
    problem = DUFMProblem(
        layers, 4, 6, per_class, lambda_h=0.03, lambda_w=[0.01 * (i + 1) for i in range(layers)]
    )
    params = [p.requires_grad_() for p in _random_point(problem)]
    fit, reg = problem.loss(params)
    expected = torch.autograd.grad(fit + reg, params)
    parts, grads = problem.loss_and_grad([p.detach() for p in params])
    assert parts.fit == pytest.approx(float(fit.detach()), rel=1e-13)
    assert parts.reg == pytest.approx(float(reg.detach()), rel=1e-13)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_minibatch_gradient_matches_autograd_of_batch_loss():
    problem = DUFMProblem(3, 3, 5, per_class=4, lambda_h=0.02, lambda_w=0.01)
    params = [p.requires_grad_() for p in _random_point(problem, 1)]
    columns = torch.tensor([0, 5, 6, 11])
    out = params[-1] @ torch.relu(params[2] @ torch.relu(params[1] @ params[0][:, columns]))
    fit = ((out - problem.targets[:, columns]) ** 2).sum() / (2 * len(columns))
    _, reg = problem.loss(params)
    expected = torch.autograd.grad(fit + reg, params)
    _, grads = problem.loss_and_grad([p.detach() for p in params], columns)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_gradient_matches_central_finite_differences():
    problem = DUFMProblem(4, 3, 5, per_class=2, lambda_h=0.01, lambda_w=0.02)
    params = _random_point(problem, 2)
    _, grads = problem.loss_and_grad(params)
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    eps = 1e-6
    plus = problem.loss_parts([p + eps * v for p, v in zip(params, direction, strict=True)])
    minus = problem.loss_parts([p - eps * v for p, v in zip(params, direction, strict=True)])
    numeric = (plus.total - minus.total) / (2 * eps)
    analytic = sum(float((gr * v).sum()) for gr, v in zip(grads, direction, strict=True))
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_dnc_closed_form_value_from_math_md():
    # docs/math.md §5: n = 1, equal lambdas, L = 4, K = 10, lambda = 0.004 -> 0.0992.
    assert dnc_loss(DUFMProblem(4, 10, 30, 1, 0.004, 0.004)) == pytest.approx(0.0992, abs=5e-5)


@pytest.mark.parametrize(
    ("layers", "classes", "per_class", "lambda_h", "lambda_w"),
    [(4, 10, 1, 0.004, 0.004), (3, 5, 3, 0.01, [0.002, 0.02, 0.005]), (2, 4, 2, 0.05, 0.01)],
)
def test_dnc_closed_form_equals_loss_at_constructed_point(
    layers, classes, per_class, lambda_h, lambda_w
):
    problem = DUFMProblem(layers, classes, classes + 3, per_class, lambda_h, lambda_w)
    point = dnc_point(problem)
    assert problem.loss_parts(point).total == pytest.approx(dnc_loss(problem), rel=1e-12)
    # The optimally scaled DNC point is a critical point of the full loss.
    _, grads = problem.loss_and_grad(point)
    assert max(float(g.abs().max()) for g in grads) < 1e-7
    stats = analyse_layers(problem, point)
    assert is_dnc(stats, classes)
    for s in stats:
        assert s.orthogonal_frame_distance < 1e-10
        assert s.nc1 == pytest.approx(0.0, abs=1e-20)


def test_balanced_scale_loss_is_the_minimum_over_a_grid():
    loss, u = balanced_scale_loss(0.3, 3)
    grid = torch.linspace(0, 1.5, 30001, dtype=F64)
    values = 0.5 * (grid**4 - 1) ** 2 + 4 * 0.3 * grid**2 / 2
    assert loss <= float(values.min()) + 1e-12
    assert loss == pytest.approx(float(values.min()), abs=1e-8)
    # Large c: the trivial solution u = 0 (loss 1/2) wins.
    assert loss == pytest.approx(0.5 * (u**4 - 1) ** 2 + 4 * 0.3 * u**2 / 2, rel=1e-14)
    # Large c: the trivial solution u = 0 (loss 1/2) wins.
    big_loss, big_u = balanced_scale_loss(10.0, 3)
    assert big_loss == pytest.approx(0.5) and big_u == pytest.approx(0.0, abs=1e-6)


def test_srg_construction_structure_and_ranks():
    problem = DUFMProblem(4, 10, 12)
    point = srg_point(problem)
    r = srg_vertices(10)
    assert r == 5
    ranks = hidden_ranks(analyse_layers(problem, point))
    assert ranks == {"H1": 5, "H2": 5, "H3": 5, "H4": 10}
    reps = dict(problem.representations(point))
    B = incidence_matrix(r)
    line_graph = B.T @ B - 2 * torch.eye(10, dtype=F64)  # adjacency A of the line graph
    means_z3, _ = class_means(reps["Z3"].T, problem.labels, 10)
    target = (2 * torch.eye(10, dtype=F64) + line_graph - torch.ones(10, 10, dtype=F64)).T
    scale = float(means_z3[0, 0])
    torch.testing.assert_close(means_z3[:, :10], scale * target)
    means_h4, _ = class_means(reps["H4"].T, problem.labels, 10)
    torch.testing.assert_close(means_h4[:, :10], scale * torch.eye(10, dtype=F64))


def test_srg_beats_dnc_for_four_layers_not_for_three_at_small_r():
    four = reference_losses(DUFMProblem(4, 10, 10))
    assert four.srg <= four.srg_construction < four.dnc
    three = reference_losses(DUFMProblem(3, 3, 3))
    assert three.srg > three.dnc
    row = srg_ratio_row((4, 5, 0.004))
    assert row["srg_over_dnc"] == pytest.approx(four.srg_over_dnc, rel=1e-6)


def test_local_optimisation_does_not_increase_loss():
    problem = DUFMProblem(3, 6, 6)
    start = srg_point(problem)
    local = optimise_locally(problem, start, gd_steps=200, max_iter=200)
    assert problem.loss_parts(local).total < problem.loss_parts(start).total


def test_short_run_is_deterministic_per_seed():
    config = DUFMConfig(layers=3, classes=4, width=8, steps=300, seed=7)
    a, b = train_dufm(config), train_dufm(config)
    for p, q in zip(a.params, b.params, strict=True):
        assert torch.equal(p, q)
    assert a.fit == b.fit
    c = train_dufm(DUFMConfig(layers=3, classes=4, width=8, steps=300, seed=8))
    assert not torch.equal(a.params[0], c.params[0])
    assert a.fit[-1] < a.fit[0]


@pytest.mark.parametrize("optimizer", ["gd", "sgd", "adam"])
def test_optimizers_decrease_the_loss(optimizer):
    config = DUFMConfig(
        layers=3,
        classes=4,
        width=8,
        per_class=2,
        steps=400,
        lr=0.05 if optimizer == "adam" else 0.3,
        optimizer=optimizer,
        batch_size=4 if optimizer == "sgd" else None,
        init_scale=0.3,
    )
    result = train_dufm(config)
    assert result.fit[-1] + result.reg[-1] < 0.5 * (result.fit[0] + result.reg[0])
    assert not result.diverged


def test_float32_option():
    result = train_dufm(DUFMConfig(layers=2, classes=3, width=4, steps=50, dtype="float32"))
    assert result.params[0].dtype == torch.float32


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match=r"r\(r-1\)/2"):
        srg_point(DUFMProblem(4, 4, 8))
    with pytest.raises(ValueError, match="width"):
        DUFMProblem(4, 10, 9)
    with pytest.raises(ValueError, match="layers"):
        DUFMProblem(1, 10, 30)
    with pytest.raises(TypeError, match="classes"):
        DUFMProblem(4, 10.0, 30)
    with pytest.raises(ValueError, match="lambda_w needs"):
        DUFMProblem(3, 3, 3, lambda_w=[0.1, 0.1])
    with pytest.raises(ValueError, match="optimizer"):
        DUFMConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch_size"):
        DUFMConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="batch_size is for optimizer 'sgd'"):
        DUFMConfig(optimizer="gd", batch_size=2)  # would be ignored silently
    with pytest.raises(ValueError, match="width"):
        DUFMConfig(width=5)
    with pytest.raises(ValueError, match="regularisation"):
        dnc_loss(DUFMProblem(2, 3, 3, lambda_h=0.0))
    with pytest.raises(ValueError, match="shapes"):
        DUFMProblem(2, 3, 3).representations([torch.zeros(3, 3)])


def test_ray_executor_without_ray_is_a_clear_error():
    try:
        import ray
    except ImportError:
        with pytest.raises(ValueError, match="ray"):
            list(map_unordered(abs, [1, -2], executor="ray"))
    else:
        assert sorted(map_unordered(abs, [1, -2], executor="ray", workers=1)) == [1, 2]
        ray.shutdown()  # the local instance this started
    with pytest.raises(ValueError, match="executor"):
        list(map_unordered(abs, [1], executor="dask"))


def test_sweep_grid_and_process_pool_agree_with_serial():
    grid = SweepGrid(
        base=DUFMConfig(layers=2, classes=3, width=4, steps=20),
        wd=[0.01, 0.02],
        width=[4, 5],
        seeds=[0, 1, 2],
    )
    configs = grid.configs()
    assert len(configs) == 12
    assert {(c.wd, c.width, c.seed) for c in configs} == {
        (w, d, s) for w in (0.01, 0.02) for d in (4, 5) for s in (0, 1, 2)
    }
    tasks = [(layers, 3, 0.01) for layers in (2, 3)]
    serial = sorted(map_unordered(srg_ratio_row, tasks, "serial"), key=lambda r: r["layers"])
    pooled = sorted(map_unordered(srg_ratio_row, tasks, "process", 2), key=lambda r: r["layers"])
    assert [r["srg_over_dnc"] for r in serial] == pytest.approx([r["srg_over_dnc"] for r in pooled])


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    dufm.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_run_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    _cli(
        [
            "dufm",
            "run",
            "--layers",
            "3",
            "--classes",
            "3",
            "--width",
            "5",
            "--steps",
            "200",
            "--out",
            str(out),
        ]
    )
    assert str(out) in capsys.readouterr().out
    for name in (
        "loss_curve.csv",
        "layers.csv",
        "summary.json",
        "loss_curve.png",
        "singular_values.png",
    ):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == pytest.approx(summary["fit"] + summary["reg"])
    assert summary["dnc_loss"] == pytest.approx(dnc_loss(DUFMProblem(3, 3, 5)))
    assert len(summary["layers_analysis"]) == 2 * 3


def test_cli_sweep_writes_csv_and_plots(tmp_path):
    out = tmp_path / "sweep"
    _cli(
        [
            "dufm",
            "sweep",
            "--layers",
            "2",
            "--classes",
            "3",
            "--width",
            "3,4",
            "--wd",
            "0.01,0.02",
            "--steps",
            "30",
            "--seeds",
            "2",
            "--executor",
            "serial",
            "--srg-layers",
            "3,4",
            "--srg-r",
            "3:5",
            "--out",
            str(out),
        ]
    )
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2
    assert len((out / "srg_ratio.csv").read_text().splitlines()) == 1 + 2 * 2
    for name in ("rank_vs_wd.png", "dnc_probability_vs_width.png", "srg_ratio.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["runs"] == 8


def test_cli_rejects_bad_sweep_values():
    with pytest.raises(SystemExit):
        _cli(["dufm", "sweep", "--wd", "a,b"])
    with pytest.raises(ValueError, match="width"):
        _cli(["dufm", "sweep", "--width", "5", "--no-srg"])


@pytest.mark.slow
def test_paper_setting_reaches_low_rank_below_dnc():
    config = DUFMConfig()  # 4-DUFM, K = 10, width 30, lambda 0.004, lr 0.5, 20k steps
    result = train_dufm(config)
    problem = config.problem()
    ranks = hidden_ranks(analyse_layers(problem, result.params))
    assert result.final.total < dnc_loss(problem)
    assert max(ranks[f"H{layer}"] for layer in (1, 2, 3)) < 10
    assert math.isfinite(result.final.total)


def test_analysis_of_a_dead_layer_is_nan_not_an_error():
    problem = DUFMProblem(3, 3, 4)
    params = problem.init(0, 0.5)
    params[1] = torch.zeros_like(params[1])  # H_2 = ReLU(0) = 0
    stats = {s.name: s for s in analyse_layers(problem, params)}
    assert stats["H2"].rank == 0
    assert math.isnan(stats["H2"].etf_distance) and math.isnan(stats["H2"].nc1)
    constant = [torch.ones(4, 3, dtype=F64), *params[1:]]  # every class mean equal
    stats = {s.name: s for s in analyse_layers(problem, constant)}
    assert stats["H1"].rank == 1 and math.isnan(stats["H1"].etf_distance)


def test_analysis_of_nearly_identical_class_means_is_nan():
    problem = DUFMProblem(2, 3, 3)
    H1 = torch.ones(3, 3, dtype=F64) + 1e-15 * torch.eye(3, dtype=F64)
    stats = analyse_layers(problem, [H1, *problem.init(0, 0.5)[1:]])
    assert math.isnan(stats[0].etf_distance)


def test_found_dnc_needs_full_rank_and_the_dnc_loss():
    from nearest_etf.experiments.dufm.run import summarise
    from nearest_etf.experiments.dufm.train import TrainResult

    config = DUFMConfig(layers=3, classes=3, width=4, steps=0)
    problem = config.problem()
    refs = reference_losses(problem)
    point = dnc_point(problem)
    assert summarise(TrainResult(config, point), refs)["found_dnc"]
    vanishing = [1e-3 * p for p in point]  # same full-rank structure, near the zero solution
    row = summarise(TrainResult(config, vanishing), refs)
    assert row["rank_H1"] == 3 and not row["found_dnc"]
