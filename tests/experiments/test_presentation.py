"""Figures, --help texts, option parsing and units shared by the experiment commands."""

import csv
import json
import re
from dataclasses import replace

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nearest_etf.experiments._common.plotting import line_styles, style_axes, suptitle
from nearest_etf.experiments._common.results import save_figure
from nearest_etf.experiments._common.runs import UserError
from nearest_etf.experiments.cli import build_parser
from nearest_etf.experiments.cli import main as cli_main
from nearest_etf.experiments.data import BalancedBatchSampler, load_dataset, make_loader
from nearest_etf.experiments.train import TrainConfig, _model, check_config, train_run
from nearest_etf.nn.heads import LearnedHead

COMMANDS = (
    ["train"],
    ["adaptive-etf"],
    ["etf-transformer"],
    ["ufm"],
    ["bounds"],
    ["dufm", "run"],
    ["dufm", "sweep"],
    ["demo"],
)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default:" in text or "default: " in text


def test_train_help_shows_each_default():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    for option, default in (("--epochs", "20"), ("--lr", "0.05"), ("--model", "mlp")):
        assert re.search(rf"{option} \S+ .*?default: {re.escape(default)}\)?", text), option


def test_train_head_takes_a_comma_list():
    parser = build_parser()
    assert parser.parse_args(["train", "--head", "learned,implicit"]).head == (
        "learned",
        "implicit",
    )
    assert parser.parse_args(["train", "--head", "all"]).head == ("learned", "fixed", "implicit")
    assert parser.parse_args(["train"]).head == ("learned", "fixed", "implicit")
    for bad in ("learned,bogus", "fixed,fixed"):
        with pytest.raises(Exception, match="--head"):
            parser.parse_args(["train", "--head", bad])


def test_srg_r_help_says_the_end_is_excluded():
    dufm = build_parser()._subparsers._group_actions[0].choices["dufm"]
    sweep = dufm._subparsers._group_actions[0].choices["sweep"]
    assert "end excluded" in " ".join(sweep.format_help().split())


def test_styled_axes_have_labels_integer_ticks_and_a_title(tmp_path):
    fig = Figure()
    ax = fig.add_subplot()
    for i, style in zip(range(3), line_styles(), strict=False):
        ax.plot([1, 2, 3], [0.1, 0.2, 0.3], label=f"curve {i}", **style)
    style_axes(ax, xlabel="epoch", ylabel="accuracy [%]", integer_x=True, legend=True)
    suptitle(fig, "what was run")
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "accuracy [%]"
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert fig.get_suptitle() == "what was run"
    assert ax.get_legend() is not None
    styles = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
    assert len(set(styles)) == 3  # coinciding curves stay distinguishable
    assert save_figure(fig, tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in save_figure(fig, tmp_path / "f.svg").read_bytes()[:500]


def test_train_writes_fractions_and_a_pdf_figure(tmp_path, capsys):
    out = tmp_path / "run"
    args = "train --dataset gaussian --epochs 2 --seeds 1 --widths 16 --train-subset 200"
    cli_main([*args.split(), "--head", "learned,fixed", "--format", "pdf", "--out", str(out)])
    capsys.readouterr()
    assert (out / "comparison.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (out / "comparison.png").exists()
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["head"] for r in rows} == {"learned", "fixed"}
    for row in rows:
        for key in ("train_accuracy", "test_accuracy", "ncc_mismatch"):
            assert 0.0 <= float(row[key]) <= 1.0, (key, row[key])


def test_balanced_batches_are_stratified_and_reproducible():
    labels = torch.arange(10).repeat_interleave(30)  # 10 classes x 30
    sampler = BalancedBatchSampler(labels, 50, torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    assert len({i for b in batches for i in b}) == 300  # every sample once per epoch
    for batch in batches:
        counts = torch.bincount(labels[batch], minlength=10)
        assert counts.min() >= 4 and counts.max() <= 6  # 5 per class, up to rounding
    again = list(BalancedBatchSampler(labels, 50, torch.Generator().manual_seed(0)))
    assert again == batches
    assert list(sampler) != batches  # the next epoch draws new batches

    x = torch.randn(300, 3)
    first = [y.tolist() for _, y in make_loader(x, labels, 50, shuffle=True, balanced=True)]
    second = [y.tolist() for _, y in make_loader(x, labels, 50, shuffle=True, balanced=True)]
    assert first == second


def test_balanced_batches_and_row_normalisation_in_train():
    data = load_dataset("gaussian").subset(200, 50)
    config = TrainConfig(epochs=1, seeds=1, widths=(8,), batch_size=40, progress=False)
    config = replace(config, balanced_batches=True, normalize_rows=True)
    head = _model(config, data, "learned").head
    assert isinstance(head, LearnedHead) and head.normalize_rows
    rows = [train_run(data, config, "learned", seed=0) for _ in range(2)]
    assert json.dumps(rows[0]) == json.dumps(rows[1])  # NaN-aware: some metrics are NaN
    assert 0.0 <= rows[0][-1]["test_accuracy"] <= 1.0


def test_options_the_launch_or_data_cannot_serve_fail_before_training(monkeypatch):
    # checked by check_config, before the run directory or the first step
    data = load_dataset("gaussian").subset(200, 50)
    config = TrainConfig(epochs=1, seeds=1, widths=(16,), batch_size=40, progress=False)
    check_config(replace(config, balanced_batches=True), data)  # one process: fine
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--balanced-batches is not supported under torchrun"):
        check_config(replace(config, balanced_batches=True), data)
    with pytest.raises(UserError, match=r"--augment .* needs image data"):
        check_config(replace(config, augment=True), data)


def test_comma_lists_parse_one_way_everywhere():
    import argparse

    from nearest_etf.experiments._common.options import comma_list

    assert comma_list(int, ranges=True)("3:6") == [3, 4, 5]  # end excluded
    assert comma_list(float)("0.1, 0.2") == [0.1, 0.2]
    assert comma_list(choices=("a", "b"))("b,a") == ["b", "a"]
    for text, parser, message in (
        ("1,1", comma_list(int), "twice"),
        ("", comma_list(int), "empty"),
        ("a,c", comma_list(choices=("a", "b")), "unknown c"),
        ("x", comma_list(int), "cannot parse"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parser(text)
    # every sub-command that takes a list refuses a repeated value as a user error (status 2)
    for argv in (
        ["ufm", "--methods", "fixed,fixed"],
        ["train", "--head", "fixed,fixed"],
        ["dufm", "sweep", "--wd", "0.1,0.1"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2
