import csv
import json
from pathlib import Path

import pytest
import torch

from nearest_etf.experiments.adaptive_etf import (
    AdaptiveETFConfig,
    AdaptiveETFRule,
    run_adaptive_etf,
)
from nearest_etf.experiments.cli import main
from nearest_etf.experiments.data import gaussian_mixture
from nearest_etf.experiments.etf_transformer import PatchTransformer, feed_forward_names
from nearest_etf.experiments.layer_stack import load_layer_stack
from nearest_etf.nn.etf_layers import ETFLinear, convert_to_etf, trainable_parameters


def _first_freeze(rule: AdaptiveETFRule, sequence: list[list[float]]) -> list[int | None]:
    return [rule.update(epoch) for epoch in sequence]


def test_rule_freezes_exactly_when_the_streak_reaches_the_patience() -> None:
    rule = AdaptiveETFRule(num_layers=3, threshold=0.9, patience=3)
    sequence = [
        [0.5, 0.8, 0.95],  # layer 3 streak 1
        [0.5, 0.9, 0.96],  # layer 2 streak 1 (>= threshold counts), layer 3 streak 2
        [0.5, 0.85, 0.97],  # layer 2 broken; layer 3 streak 3 -> freeze from layer 3 (index 2)
        [0.5, 0.91, 0.99],
        [0.5, 0.92, 0.99],
        [0.95, 0.93, 0.99],  # layer 2 streak 3 -> freeze from index 1
        [0.95, 0.93, 0.99],
        [0.95, 0.99, 0.99],  # layer 1 streak 3 -> index 0
        [0.95, 0.99, 0.99],  # nothing new
    ]
    assert _first_freeze(rule, sequence) == [None, None, 2, None, None, 1, None, 0, None]
    assert rule.frozen_from == 0


def test_rule_with_the_paper_setting_and_a_dip() -> None:
    rule = AdaptiveETFRule(num_layers=2)  # threshold 0.9, patience 5
    accuracies = [0.91, 0.92, 0.93, 0.94, 0.89, 0.91, 0.92, 0.93, 0.94, 0.95]
    got = _first_freeze(rule, [[0.1, a] for a in accuracies])
    assert got == [None] * 9 + [1]  # the dip at epoch 5 restarts the window


def test_rule_rejects_bad_input_and_keeps_its_state() -> None:
    with pytest.raises(ValueError, match="patience"):
        AdaptiveETFRule(2, patience=0)
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveETFRule(2, threshold=90)
    rule = AdaptiveETFRule(2, patience=2)
    rule.update([0.95, 0.1])
    with pytest.raises(ValueError, match="expected 2"):
        rule.update([0.95])
    with pytest.raises(ValueError, match="fractions"):
        rule.update([95.0, 0.1])
    assert rule.streaks == [1, 0] and rule.frozen_from is None
    assert rule.update([0.95, 0.1]) == 0


def test_adaptive_run_freezes_and_counts_parameters() -> None:
    data = gaussian_mixture(num_classes=3, dim=6, samples_per_class=40, separation=6.0)
    config = AdaptiveETFConfig(
        depth=2, width=8, epochs=4, seeds=1, patience=1, fixed_last=1, batch_size=16, progress=False
    )
    rows = run_adaptive_etf(config, data)
    assert {r["method"] for r in rows} == {
        "baseline",
        "fixed-last-1",
        "adaptive-canonical",
        "adaptive-nearest",
    }
    total = 6 * 8 + 8 + 2 * 8 + 8 * 8 + 8 + 2 * 8 + 3 * 8 + 3
    final = {r["method"]: r for r in rows if r["epoch"] == 4}
    assert final["baseline"]["trainable_params"] == total
    assert final["fixed-last-1"]["trainable_params"] == total - 3 * 8
    for method in ("adaptive-canonical", "adaptive-nearest"):
        mine = [r for r in rows if r["method"] == method]
        # Well-separated data: layer 1 is NCC-separable after epoch 1, so with patience 1
        # both hidden linears and the classifier are frozen before epoch 2.
        assert mine[0]["frozen_from"] == -1 and mine[0]["ncc_1"] >= 0.9
        assert mine[1]["frozen_from"] == 1 and mine[1]["frozen_epoch"] == 1
        assert mine[1]["trainable_params"] == total - 6 * 8 - 8 * 8 - 3 * 8
    # Same initialisation and data order: only the frozen weights (canonical vs nearest) differ.
    canonical = [r for r in rows if r["method"] == "adaptive-canonical"]
    nearest = [r for r in rows if r["method"] == "adaptive-nearest"]
    assert canonical[0]["train_loss"] == nearest[0]["train_loss"]
    assert canonical[1]["train_loss"] != nearest[1]["train_loss"]
    with pytest.raises(ValueError, match="batch-size 1000 exceeds the 96 training samples"):
        run_adaptive_etf(AdaptiveETFConfig(batch_size=1000, progress=False), data)
    with pytest.raises(ValueError, match="needs h >= K"):
        run_adaptive_etf(AdaptiveETFConfig(width=2, progress=False), data)
    with pytest.raises(ValueError, match="threshold"):  # before any training
        run_adaptive_etf(AdaptiveETFConfig(threshold=90, progress=False), data)


def test_adaptive_etf_command_writes_outputs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    main(
        [
            "adaptive-etf",
            "--dataset",
            "digits",
            "--depth",
            "2",
            "--width",
            "16",
            "--epochs",
            "2",
            "--seeds",
            "1",
            "--fixed-last",
            "2",
            "--train-subset",
            "300",
            "--probe-samples",
            "200",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    for name in ("metrics.csv", "summary.csv", "ncc_curves.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert [s["method"] for s in summary] == [
        "baseline",
        "fixed-last-2",
        "adaptive-canonical",
        "adaptive-nearest",
    ]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"ncc_1", "ncc_2", "nc1_2"} <= set(rows[0])
    stack = load_layer_stack(out / "network-fixed-last-2-seed0.pt")
    assert stack.widths == [64, 16, 16, 10]
    assert stack.meta["method"] == "fixed-last-2"


def test_bad_dataset_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["adaptive-etf", "--dataset", "no-such-thing", "--no-progress"])
    assert exit_info.value.code == 2
    assert "unknown dataset 'no-such-thing'" in capsys.readouterr().err


def test_transformer_ffn_conversion_counts_parameters() -> None:
    model = PatchTransformer(in_features=12, num_classes=3, patch_size=4, width=8, ffn_width=16)
    names = feed_forward_names(model)
    assert names == [
        "blocks.0.linear1",
        "blocks.0.linear2",
        "blocks.1.linear1",
        "blocks.1.linear2",
    ]
    total = trainable_parameters(model)
    convert_to_etf(model, names, "nearest")
    assert all(isinstance(model.get_submodule(n), ETFLinear) for n in names)
    assert trainable_parameters(model) == total - 4 * 8 * 16
    x = torch.randn(5, 12)
    model(x).sum().backward()
    assert all(model.get_submodule(n).weight.grad is None for n in names)
    with pytest.raises(ValueError, match="does not divide"):
        PatchTransformer(in_features=10, num_classes=3, patch_size=4)


def test_etf_transformer_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tr"
    main(
        [
            "etf-transformer",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--width",
            "16",
            "--ffn-width",
            "32",
            "--depth",
            "1",
            "--train-subset",
            "256",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())["summary"]
    by_variant = {s["variant"]: s for s in summary}
    assert set(by_variant) == {"baseline", "etf-canonical", "etf-nearest"}
    frozen = 2 * 16 * 32
    assert by_variant["etf-canonical"]["trainable_params"] == (
        by_variant["baseline"]["trainable_params"] - frozen
    )
    assert (out / "accuracy.png").stat().st_size > 0
    assert "etf-nearest" in capsys.readouterr().out
    for argv, message in (
        (["--patch-size", "5"], "patch size 5 does not divide the 64 input features"),
        (["--train-subset", "60"], "--batch-size 128 exceeds the 60 training samples"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["etf-transformer", "--dataset", "digits", *argv, "--no-progress"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
