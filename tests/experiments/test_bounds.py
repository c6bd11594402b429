"""Complexity bounds against hand computations on small explicit matrices; CLI on tiny saved
runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nearest_etf.experiments.bounds import cli as bounds_cli
from nearest_etf.experiments.bounds.generalisation import (
    BOUND_NAMES,
    BoundSettings,
    bartlett_bound,
    bias_free_weights,
    generalisation_gap_bound,
    golowich_bound,
    network_bounds,
    neyshabur_bound,
    rank_aware_bound,
)
from nearest_etf.experiments.cli import main as cli_main
from nearest_etf.experiments.layer_stack import LayerStack, save_layer_stack
from nearest_etf.metrics.collapse import numerical_rank

SQRT2 = math.sqrt(2)


def _weights(first_diagonal: tuple[float, float, float] = (2.0, 1.0, 1.0)) -> list[torch.Tensor]:
    """W1 = diag(first_diagonal), W2 = diag(1, 1, 0), W3 = [4, 0, 0]: with the default W1,
    spectral norms (2, 1, 4), Frobenius norms (sqrt 6, sqrt 2, 4), ranks (3, 2, 1)."""
    W1 = torch.diag(torch.tensor(first_diagonal, dtype=torch.float64))
    W2 = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    W3 = torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64)
    return [W1, W2, W3]


# m = 4 rows, ||X||_F = 4 so ||X||_F / m = 1; every row has norm 2 (B_X = 2)
X = 2.0 * torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)


def test_rank_aware_bound_by_hand() -> None:
    G, rows = rank_aware_bound(_weights(), X)
    # T1 = ||W1||_F sqrt(h1) ||W2||_2 ||W3||_2 = sqrt6 sqrt3 * 1 * 4
    T1 = math.sqrt(6) * math.sqrt(3) * 4
    # T2: r2 = rank W1 = 3, kappa2 = 2 * 4, ||W2||_F = sqrt2, h2 = 3
    T2 = 2 * math.sqrt(2 * 3) * 8 * SQRT2 * math.sqrt(3)
    # T3: r3 = min(3, 2) = 2, kappa3 = 2 * 1, ||W3||_F = 4, h3 = 1
    T3 = 2 * math.sqrt(2 * 2) * 2 * 4 * 1
    assert [row.term for row in rows] == pytest.approx([T1, T2, T3], rel=1e-12)
    assert pytest.approx(T1 + T2 + T3, rel=1e-12) == G
    assert [row.rank for row in rows] == [3, 2, 1]
    assert [row.r for row in rows] == [None, 3, 2]
    assert [row.kappa for row in rows] == pytest.approx([4, 8, 2])
    assert [row.spectral_norm for row in rows] == pytest.approx([2, 1, 4])
    assert [row.frobenius_norm for row in rows] == pytest.approx([math.sqrt(6), SQRT2, 4])
    assert [row.width for row in rows] == [3, 3, 1]
    # constants: T1 gets C1^(L-1), T_i gets C1^(L-i) C2; the data scale ||X||_F / m multiplies all
    G_c, _ = rank_aware_bound(_weights(), 3 * X, c1=2.0, c2=5.0)
    assert G_c == pytest.approx(3 * (4 * T1 + 2 * 5 * T2 + 5 * T3), rel=1e-12)


def test_rank_aware_term_shrinks_when_a_rank_drops_with_norms_fixed() -> None:
    full = _weights((2.0, 1.0, 1.0))  # rank 3, ||.||_2 = 2, ||.||_F = sqrt 6
    low = _weights((2.0, SQRT2, 0.0))  # rank 2, same spectral and Frobenius norms
    G_full, rows_full = rank_aware_bound(full, X)
    G_low, rows_low = rank_aware_bound(low, X)
    assert rows_low[0].spectral_norm == pytest.approx(rows_full[0].spectral_norm)
    assert rows_low[0].frobenius_norm == pytest.approx(rows_full[0].frobenius_norm)
    assert (rows_full[0].rank, rows_low[0].rank) == (3, 2)
    assert rows_low[1].term == pytest.approx(rows_full[1].term * math.sqrt(2 / 3), rel=1e-12)
    assert rows_low[0].term == pytest.approx(rows_full[0].term)
    assert G_low < G_full
    # the norm-only comparison bounds cannot see the rank drop
    assert golowich_bound(low, X) == pytest.approx(golowich_bound(full, X), rel=1e-12)
    assert neyshabur_bound(low, X) == pytest.approx(neyshabur_bound(full, X), rel=1e-12)


def test_rank_tolerance() -> None:
    weights = [torch.diag(torch.tensor([1.0, 1e-4], dtype=torch.float64)), torch.eye(2)]
    data = torch.eye(2, dtype=torch.float64)
    assert rank_aware_bound(weights, data, rank_rtol=1e-3)[1][1].r == 1
    assert rank_aware_bound(weights, data, rank_rtol=1e-5)[1][1].r == 2


def test_comparison_bounds_by_hand() -> None:
    weights = _weights()
    expected_golowich = 1.0 * (math.sqrt(2 * math.log(2) * 3) + 1) * math.sqrt(6) * SQRT2 * 4
    assert golowich_bound(weights, X) == pytest.approx(expected_golowich, rel=1e-12)
    # B_X / sqrt(m) = 1, L = 3, h = 3, prod ||W||_2 = 8, sum ||W||_F^2/||W||_2^2 = 6/4 + 2 + 1
    expected_neyshabur = 3 * math.sqrt(3 * math.log(9)) * 8 * math.sqrt(4.5)
    assert neyshabur_bound(weights, X) == pytest.approx(expected_neyshabur, rel=1e-12)
    # sums of row norms (2 + 1 + 1, 1 + 1, 4) over the spectral norms: 2, 2, 1
    expected_bartlett = 8 * (2 * 2 ** (2 / 3) + 1) ** 1.5
    assert bartlett_bound(weights, X) == pytest.approx(expected_bartlett, rel=1e-12)


def test_bounds_by_hand_with_a_non_symmetric_layer_and_a_wide_input() -> None:
    """W2 = [[3, 4], [0, 0]] has row-norm sum 5 but column-norm sum 7, and the input width 3
    exceeds every layer width 2, so a transposed matrix or a width taken from the input shows."""
    W1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    W2 = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    data = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    # W1: ||.||_2 = 2, ||.||_F = sqrt 5, rank 2, row-norm sum 1 + 2 = 3, h_1 = 2 (3 columns)
    # W2: ||.||_2 = 5, ||.||_F = 5, rank 1, row-norm sum 5 (column-norm sum 3 + 4 = 7), h_2 = 2
    # X: m = 2, ||X||_F = sqrt 18, both rows have norm 3 (B_X = 3)
    scale = math.sqrt(18) / 2
    T1 = math.sqrt(5) * math.sqrt(2) * 5  # ||W1||_F sqrt(h_1) ||W2||_2
    T2 = 2 * math.sqrt(2 * 2) * 2 * 5 * math.sqrt(2)  # 2 sqrt(2 r_2) kappa_2 ||W2||_F sqrt(h_2)
    G, rows = rank_aware_bound([W1, W2], data)
    assert [row.term for row in rows] == pytest.approx([scale * T1, scale * T2], rel=1e-12)
    assert pytest.approx(scale * (T1 + T2), rel=1e-12) == G
    assert [row.width for row in rows] == [2, 2]
    assert [row.shape for row in rows] == [(2, 3), (2, 2)]
    assert [(row.rank, row.r) for row in rows] == [(2, None), (1, 2)]
    expected_golowich = scale * (math.sqrt(2 * math.log(2) * 2) + 1) * math.sqrt(5) * 5
    assert golowich_bound([W1, W2], data) == pytest.approx(expected_golowich, rel=1e-12)
    # B_X / sqrt(m) = 3 / sqrt 2, L = 2, h = 2, prod ||W||_2 = 10, sum ||W||_F^2/||W||_2^2 = 9/4
    expected_neyshabur = 3 / math.sqrt(2) * 2 * math.sqrt(2 * math.log(4)) * 10 * 1.5
    assert neyshabur_bound([W1, W2], data) == pytest.approx(expected_neyshabur, rel=1e-12)
    # ||W^T||_{2,1} / ||W||_2: 3 / 2 and 5 / 5
    expected_bartlett = scale * 10 * ((3 / 2) ** (2 / 3) + 1) ** 1.5
    assert bartlett_bound([W1, W2], data) == pytest.approx(expected_bartlett, rel=1e-12)


def test_ranks_and_kappa_match_the_metrics_and_a_single_layer() -> None:
    torch.manual_seed(0)
    low = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 5, dtype=torch.float64)
    weights = [torch.randn(5, 4, dtype=torch.float64), low, torch.randn(3, 6, dtype=torch.float64)]
    data = torch.randn(7, 4, dtype=torch.float64)
    _, rows = rank_aware_bound(weights, data, rank_rtol=1e-6)
    assert [row.rank for row in rows] == [numerical_rank(W, 1e-6) for W in weights] == [4, 2, 3]
    _, (row,) = rank_aware_bound([torch.ones(1, 4, dtype=torch.float64)], data)
    assert isinstance(row.kappa, float) and row.kappa == 1.0  # the empty product
    assert row.to_dict()["width"] == 1 and list(row.to_dict())[:3] == ["layer", "shape", "width"]
    # a single layer of width 1: ln(L h) = 0
    assert neyshabur_bound([torch.ones(1, 4, dtype=torch.float64)], data) == 0.0


def test_generalisation_gap_bound_by_hand() -> None:
    value = generalisation_gap_bound(0.5, m=100, delta=0.1, loss_lipschitz=2.0)
    assert value == pytest.approx(math.sqrt(2 * math.pi) * 0.5 + math.sqrt(9 * math.log(20) / 200))
    with pytest.raises(ValueError, match="delta"):
        generalisation_gap_bound(0.5, m=100, delta=1.0)
    with pytest.raises(ValueError, match="loss_lipschitz"):
        generalisation_gap_bound(0.5, m=100, loss_lipschitz=0.0)


def test_biases_are_folded_by_input_augmentation() -> None:
    stack = LayerStack(
        [torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0]])],
        [torch.tensor([3.0]), torch.tensor([5.0])],
        torch.tensor([[1.0, -1.0], [0.5, 2.0], [-3.0, 0.0]]),
    )
    weights, data = bias_free_weights(stack)
    torch.testing.assert_close(
        weights[0], torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]).double()
    )
    torch.testing.assert_close(weights[1], torch.tensor([[4.0, 5.0]]).double())
    torch.testing.assert_close(data[:, 2], torch.ones(3, dtype=torch.float64))
    outputs = (data @ weights[0].T).clamp_min(0) @ weights[1].T
    torch.testing.assert_close(outputs, stack(), rtol=0, atol=1e-12)
    result = network_bounds(stack)
    assert result.settings["biases"].startswith("augmented")
    assert result.data_norm == pytest.approx(float(torch.linalg.matrix_norm(data)))
    no_bias = LayerStack(_weights(), [None, None, None], X)
    result = network_bounds(no_bias, BoundSettings(delta=0.1))
    assert result.settings["biases"] == "none"
    assert result.rank_aware == pytest.approx(rank_aware_bound(_weights(), X)[0])
    assert result.gap == pytest.approx(generalisation_gap_bound(result.rank_aware, 4, 0.1))
    assert (result.m, result.max_input_norm) == (4, pytest.approx(2.0))
    assert list(result.totals) == list(BOUND_NAMES)
    assert result.totals["bartlett"] == pytest.approx(bartlett_bound(_weights(), X), rel=1e-12)


def test_inconsistent_shapes_get_clear_errors() -> None:
    weights = _weights()
    with pytest.raises(ValueError, match="widths do not chain"):
        rank_aware_bound([weights[0], torch.ones(2, 2)], X)
    with pytest.raises(ValueError, match="X has width 2"):
        golowich_bound(weights, X[:, :2])
    with pytest.raises(ValueError, match="non-empty matrix"):
        bartlett_bound([torch.ones(3)], X)
    with pytest.raises(TypeError, match="non-empty sequence"):
        neyshabur_bound([], X)
    with pytest.raises(ValueError, match="c1 and c2"):
        rank_aware_bound(weights, X, c1=0.0)


def test_bounds_command_on_tiny_train_and_dufm_runs(tmp_path, capsys) -> None:
    train_dir, dufm_dir = tmp_path / "train", tmp_path / "dufm"
    train = "train --dataset gaussian --head learned --epochs 1 --seeds 1 --widths 8"
    train += " --train-subset 200 --test-subset 50 --no-progress"
    cli_main([*train.split(), "--out", str(train_dir)])
    dufm = "dufm run --layers 3 --classes 4 --width 6 --steps 50"
    cli_main([*dufm.split(), "--out", str(dufm_dir)])
    cli_main(["bounds", "--run", str(train_dir)])
    cli_main(["bounds", "--run", str(dufm_dir / "network.pt"), "--rank-rtol", "0.01"])
    printed = capsys.readouterr().out
    assert "network-learned-seed0" in printed and "rank_aware" in printed
    for out, stem, name, widths, m, biases in (
        (train_dir, "bounds", "network-learned-seed0", [9, 10], 200, "augmented inputs (x, 1)"),
        (dufm_dir, "bounds-network", "network", [6, 6, 4], 4, "none"),  # --run FILE
    ):
        for file in (f"{stem}.csv", f"{stem}_layers.csv", f"{stem}.png"):
            assert (out / file).stat().st_size > 0
        (network,) = json.loads((out / f"{stem}.json").read_text())["networks"]
        assert network["network"] == name and network["m"] == m
        assert network["settings"]["biases"] == biases
        assert [layer["width"] for layer in network["layers"]] == widths
        terms = sum(layer["term"] for layer in network["layers"])
        assert network["rank_aware"] == pytest.approx(terms) and terms > 0
        assert network["gap"] > network["rank_aware"]
    meta = json.loads((dufm_dir / "bounds-network.json").read_text())["networks"][0]["meta"]
    assert meta["source"] == "dufm run" and meta["config"]["width"] == 6


def test_bounds_of_one_file_do_not_overwrite_the_directory_summary(tmp_path, monkeypatch) -> None:
    data = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    for seed in (0, 1):
        weights = [torch.eye(2) * (seed + 1), torch.tensor([[1.0, -1.0]])]
        stack = LayerStack(weights, [None, None], data, meta={"seed": seed})
        save_layer_stack(stack, tmp_path / f"network-seed{seed}.pt")
    labels: list[str] = []
    savefig = bounds_cli.Figure.savefig

    def recording_savefig(fig, path, **kwargs):
        labels.append(fig.axes[0].get_ylabel())
        savefig(fig, path, **kwargs)

    monkeypatch.setattr(bounds_cli.Figure, "savefig", recording_savefig)
    cli_main(["bounds", "--run", str(tmp_path)])
    summary = (tmp_path / "bounds.json").read_text()
    assert len(json.loads(summary)["networks"]) == 2
    cli_main(["bounds", "--run", str(tmp_path / "network-seed1.pt"), "--c1", "2", "--c2", "3"])
    assert (tmp_path / "bounds.json").read_text() == summary
    (network,) = json.loads((tmp_path / "bounds-network-seed1.json").read_text())["networks"]
    assert network["network"] == "network-seed1" and network["settings"]["c1"] == 2.0
    csv_lines = (tmp_path / "bounds-network-seed1.csv").read_text().splitlines()
    layer_lines = (tmp_path / "bounds-network-seed1_layers.csv").read_text().splitlines()
    assert (len(csv_lines), len(layer_lines)) == (2, 3)  # header + 1 network, header + 2 layers
    assert (tmp_path / "bounds-network-seed1.png").stat().st_size > 0
    assert labels == [
        "bound (C1 = 1, C2 = 1, no log factors)",
        "bound (C1 = 2, C2 = 3, no log factors)",
    ]
