"""The run lifecycle (docs/runs.md): output-directory policy, manifests, atomic files,
divergence as a result, user errors as one line with exit status 2, and interrupted runs that
resume to the same numbers as uninterrupted ones. Every CLI case uses tiny sizes."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nearest_etf.experiments import train as train_module
from nearest_etf.experiments._common.runs import (
    RunDirectory,
    UserError,
    atomic_path,
    divergence,
    resumed_argv,
)
from nearest_etf.experiments.cli import main
from nearest_etf.experiments.data import CifarUnpickler, load_dataset
from nearest_etf.experiments.dufm import sweep as sweep_module
from nearest_etf.experiments.layer_stack import LayerStack, load_layer_stack, save_layer_stack
from nearest_etf.experiments.ufm import study as study_module

# heads without temperature, so that every run writes its network file
TRAIN = (
    "train --dataset gaussian --train-subset 256 --batch-size 64 --widths 16 --temperature none "
    "--no-progress"
)
SWEEP = "dufm sweep --layers 2 --classes 3 --width 4 --steps 40 --executor serial --no-progress"
UFM = (
    "ufm --classes 3 --dim 4 --per-class 2 --steps 6 --seeds 2 --lr 1 --lr-grid 1,3 "
    "--methods fixed,implicit --workers 1 --no-progress"
)


def cli(argv: str | list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the command line."""
    capsys.readouterr()
    try:
        main(argv.split() if isinstance(argv, str) else argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(
    argv: str | list[str], capsys: pytest.CaptureFixture[str], *fragments: str
) -> str:
    """The command exits with status 2 and one stderr line (no traceback) holding fragments."""
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nearest-etf: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def csv_rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict[str, str]]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


class Interrupt:
    """Wraps a function; the `at`-th call raises KeyboardInterrupt (a simulated SIGINT)."""

    def __init__(self, fn, at: int) -> None:
        self.fn, self.at, self.calls = fn, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("training started before the settings were checked")

    monkeypatch.setattr(train_module, "train_epoch", fail)


# --- building blocks ----------------------------------------------------------------------


def test_atomic_path_keeps_the_old_file_when_a_write_is_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half a fi")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_interrupted_network_save_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    """Case 4: SIGINT while a network file is written leaves no truncated file."""
    stack = LayerStack([torch.eye(3)], [None], torch.eye(3), torch.arange(3))
    real_save = torch.save

    def save_then_interrupt(obj, path):
        real_save(obj, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a truncated write
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_layer_stack(stack, tmp_path / "network-a.pt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    save_layer_stack(stack, tmp_path / "network-a.pt")
    assert torch.equal(load_layer_stack(tmp_path / "network-a.pt").weights[0], torch.eye(3))


def test_divergence_names_the_reason() -> None:
    assert divergence(0.5, [torch.ones(3)]) is None
    assert divergence(float("nan")) == "loss is nan"
    assert divergence(2.4e104) == "loss 2.4e+104 exceeds 1e+10"
    assert divergence(0.5, [torch.tensor([1.0, float("inf")])]) == "parameters are non-finite"
    assert "exceeds" in divergence(0.5, [torch.tensor([3e10])])


def test_output_directory_policy(tmp_path: Path) -> None:
    settings = {"config": {"lr": 0.1, "progress": True}}
    run = RunDirectory.open(tmp_path / "a", "train", settings, ["train", "--lr", "0.1"])
    assert manifest(run.path)["status"] == "running"
    assert manifest(run.path)["package_version"] == "0.1.0"
    with pytest.raises(UserError, match="not empty; pass --resume"):
        RunDirectory.open(tmp_path / "a", "train", settings)
    with pytest.raises(UserError, match=r"lr was 0\.1 in that run, now 0\.2"):
        RunDirectory.open(tmp_path / "a", "train", {"config": {"lr": 0.2}}, resume=True)
    with pytest.raises(UserError, match="not `nearest-etf ufm`"):
        RunDirectory.open(tmp_path / "a", "ufm", settings, resume=True)
    # environment settings (progress, device, workers...) may change on resume
    resumed = RunDirectory.open(
        tmp_path / "a", "train", {"config": {"lr": 0.1, "progress": False}}, resume=True
    )
    assert len(resumed.manifest["resumed"]) == 1
    (tmp_path / "a" / "old.pt").write_text("x")
    RunDirectory.open(tmp_path / "a", "train", {"config": {"lr": 0.3}}, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not a run directory"):
        RunDirectory.open(tmp_path / "mine", "train", settings, overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to output directory"):
        RunDirectory.open(tmp_path / "file" / "sub", "train", settings)
    with pytest.raises(UserError, match="records no command line"):
        resumed_argv(["train"], tmp_path / "a")


def test_resumed_argv_replays_the_recorded_command_line(tmp_path: Path) -> None:
    argv = ["dufm", "sweep", "--lr", "0.5", "--out", "x", "--overwrite"]
    RunDirectory.open(tmp_path, "dufm sweep", {}, argv)
    assert resumed_argv(
        ["dufm", "sweep", "--resume", str(tmp_path), "--workers", "2"], tmp_path
    ) == [
        "dufm",
        "sweep",
        "--lr",
        "0.5",
        "--workers",
        "2",
        "--resume",
        str(tmp_path),
    ]
    with pytest.raises(UserError, match="resume it with: nearest-etf dufm sweep --resume"):
        resumed_argv(["train", "--resume", str(tmp_path)], tmp_path)


def test_cifar_unpickler_refuses_other_globals(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "cifar"
    folder.mkdir()
    labels = list(range(10))
    for name in ("data_batch_1", "test_batch"):
        batch = {b"data": np.zeros((10, 3072), np.uint8), b"labels": labels}
        if name == "test_batch":
            batch[b"extra"] = Exploit()
        (folder / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR-10 python batch .*refusing"):
        load_dataset(str(folder))
    assert not (tmp_path / "pwned").exists()
    with (folder / "data_batch_1").open("rb") as f:
        assert CifarUnpickler(f).load()[b"labels"] == labels


# --- case 1 and 2: divergence is a result -----------------------------------------------


def test_sweep_keeps_good_runs_when_others_diverge(tmp_path: Path, capsys) -> None:
    """Case 1 (and the not-converged warning): lr 1000 diverges, the lr 0.5 runs are kept."""
    out = tmp_path / "sw"
    code, stdout, err = cli(f"{SWEEP} --lr 0.5,1000 --seeds 2 --no-srg --out {out}", capsys)
    assert code == 0, err
    rows = csv_rows(out / "runs.csv")
    assert [(r["lr"], r["diverged"]) for r in rows] == [
        ("0.5", "False"),
        ("0.5", "False"),
        ("1000.0", "True"),
        ("1000.0", "True"),
    ]
    assert {r["diverged_step"] for r in rows[2:]} == {"40"} and rows[2]["rank_H1"] == ""
    assert rows[0]["rank_H1"] != "" and float(rows[0]["loss"]) < 1
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["runs"], summary["diverged"]) == (4, 2)
    assert manifest(out)["status"] == "diverged"
    assert "2 of 4 runs diverged" in stdout
    assert "runs had not converged" in err  # 40 steps are far from converged


def test_sweep_settings_are_checked_before_any_run(tmp_path: Path, capsys) -> None:
    """Case 1 (--srg-r 1,2) and case 6 (--seeds 0): refused before anything runs."""
    out = tmp_path / "sw"
    assert_user_error(f"{SWEEP} --srg-r 1,2 --out {out}", capsys, "--srg-r 1", "r >= 3")
    assert_user_error(f"{SWEEP} --seeds 0 --out {out}", capsys, "--seeds", "positive integer")
    assert not out.exists()


@pytest.mark.parametrize("lr, reason", [("100", "exceeds 1e+10"), ("1000", "loss is nan")])
def test_diverged_dufm_run_is_a_result(tmp_path: Path, capsys, lr: str, reason: str) -> None:
    """Case 2: the default 4-DUFM at lr 100 / 1000 diverges by step 100."""
    out = tmp_path / "run"
    code, stdout, err = cli(f"dufm run --lr {lr} --steps 300 --no-progress --out {out}", capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_step"] == 100
    assert reason in summary["divergence"] and summary["rank_H1"] is None
    assert summary["layers_analysis"] is None and summary["found_dnc"] is False
    assert [r["step"] for r in csv_rows(out / "loss_curve.csv")] == ["0", "100"]
    assert not (out / "layers.csv").exists() and not (out / "network.pt").exists()
    assert manifest(out)["status"] == "diverged"
    assert "diverged at step 100" in stdout


def test_rank_of_denormal_class_means_is_undefined() -> None:
    from nearest_etf.experiments.dufm.analysis import analyse_layers
    from nearest_etf.experiments.dufm.model import DUFMProblem

    problem = DUFMProblem(2, 3, 3)
    params = [1e-320 * p for p in problem.init(0, 1.0)]
    stats = {s.name: s for s in analyse_layers(problem, params)}
    assert stats["H1"].rank is None and np.isnan(stats["H1"].etf_distance)


# --- case 3: train writes as it goes --------------------------------------------------------


def test_train_keeps_finished_runs_when_a_later_one_diverges(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Case 3: a NaN in the second run keeps the first, marks the second, runs the third."""
    real = train_module.train_epoch
    calls = []

    def nan_in_second_run(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "train_epoch", nan_in_second_run)
    out = tmp_path / "t"
    code, stdout, _ = cli(f"{TRAIN} --epochs 2 --seeds 1 --out {out}", capsys)
    assert code == 0
    rows = csv_rows(out / "metrics.csv")
    assert [(r["head"], r["epoch"], r["status"]) for r in rows] == [
        ("learned", "1", "ok"),
        ("learned", "2", "ok"),
        ("fixed", "1", "diverged"),
        ("implicit", "1", "ok"),
        ("implicit", "2", "ok"),
    ]
    assert rows[2]["error"] == "epoch 1: loss is nan"
    assert manifest(out)["runs"] == {
        "learned-seed0": "finished",
        "fixed-seed0": "diverged",
        "implicit-seed0": "finished",
    }
    assert manifest(out)["status"] == "diverged"
    record = json.loads((out / "units" / "fixed-seed0.json").read_text())
    assert record["divergence"] == {"diverged_epoch": 1, "reason": "loss is nan"}
    assert "run fixed-seed0 diverged in epoch 1" in stdout
    assert not (out / "network-fixed-seed0.pt").exists()
    assert (out / "network-implicit-seed0.pt").exists()


def test_train_output_directory_is_checked_first(tmp_path: Path, capsys, monkeypatch) -> None:
    """Case 3: an --out that cannot be written fails before training."""
    _forbid_training(monkeypatch)
    (tmp_path / "file").write_text("x")
    assert_user_error(
        f"{TRAIN} --epochs 1 --out {tmp_path / 'file' / 'run'}", capsys, "cannot write"
    )


# --- case 5: one output-directory policy ------------------------------------------------


def test_second_run_into_the_same_out(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t"
    base = f"{TRAIN} --head fixed --epochs 1 --out {out}"
    assert cli(f"{base} --seeds 2", capsys)[0] == 0
    assert len(list(out.glob("network-*.pt"))) == 2
    assert_user_error(f"{base} --seeds 1 --lr 0.1", capsys, "is not empty", "--overwrite")
    assert cli(f"{base} --seeds 1 --lr 0.1 --overwrite", capsys)[0] == 0
    assert [p.name for p in out.glob("network-*.pt")] == ["network-fixed-seed0.pt"]
    assert manifest(out)["settings"]["config"]["lr"] == 0.1
    assert load_layer_stack(out / "network-fixed-seed0.pt").meta["config"]["lr"] == 0.1
    assert_user_error(f"train --resume {out} --lr 0.2", capsys, "lr was 0.1 in that run, now 0.2")


# --- cases 6 and 7: user errors -------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _idx_dataset(folder: Path, train_labels: np.ndarray, images: int | None = None) -> Path:
    folder.mkdir()
    n = len(train_labels)
    _write_idx(folder / "train-images-idx3-ubyte", np.zeros((images or n, 4, 4), np.uint8))
    _write_idx(folder / "train-labels-idx1-ubyte", train_labels)
    _write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((10, 4, 4), np.uint8))
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(10))
    return folder


def test_bad_settings_are_refused_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    """Case 6."""
    _forbid_training(monkeypatch)
    out = tmp_path / "out"
    assert_user_error(
        f"dufm run --rank-rtol -1 --out {out}", capsys, "--rank-rtol", "finite number > 0"
    )
    assert_user_error(f"dufm run --rank-rtol 2 --out {out}", capsys, "--rank-rtol must lie in")
    assert_user_error(
        f"{TRAIN} --head all --widths 5 --out {out}", capsys, "--head fixed", "d=5, K=10"
    )
    labels = np.arange(40) % 10
    labels[7] = 200
    data = _idx_dataset(tmp_path / "idx", labels)
    assert_user_error(
        f"{TRAIN} --dataset {data} --out {out}",
        capsys,
        "train-labels-idx1-ubyte",
        "labels run from 0 to 200",
    )
    for command in ("train", "adaptive-etf", "etf-transformer"):
        for lr in ("0", "inf", "nan", "-1"):
            assert_user_error(
                f"{command} --lr {lr} --out {out}", capsys, "--lr", "expected a finite number > 0"
            )
    assert_user_error(f"{SWEEP} --lr 0.5,inf --out {out}", capsys, "--lr", "'0.5,inf'")
    assert_user_error(f"{UFM} --lr-grid 1,nan --out {out}", capsys, "--lr-grid")
    assert not out.exists()


def test_user_errors_are_one_line(tmp_path: Path, capsys) -> None:
    """Case 7."""
    out = tmp_path / "out"
    code, stdout, err = cli(f"{TRAIN} --dataset /nonexistent --out {out}", capsys)
    assert code == 2 and "output directory" not in stdout
    assert "dataset directory /nonexistent does not exist" in err
    assert_user_error(f"ufm --dim 5 --out {out}", capsys, "dim must be an int >= 10, got 5")
    truncated = _idx_dataset(tmp_path / "gz", np.arange(20) % 10)
    raw = gzip.compress((truncated / "train-labels-idx1-ubyte").read_bytes())
    (truncated / "train-labels-idx1-ubyte").unlink()
    (truncated / "train-labels-idx1-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    assert_user_error(
        f"{TRAIN} --dataset {truncated} --out {out}", capsys, "train-labels-idx1-ubyte.gz"
    )
    mismatch = _idx_dataset(tmp_path / "n", np.arange(20) % 10, images=21)
    assert_user_error(
        f"{TRAIN} --dataset {mismatch} --out {out}", capsys, "has 21 images but", "20 labels"
    )
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    (cifar / "data_batch_1").write_bytes(b"garbage, not a pickle")
    (cifar / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    assert_user_error(f"{TRAIN} --dataset {cifar} --out {out}", capsys, "data_batch_1: not a")
    (cifar / "data_batch_1").write_bytes((cifar / "test_batch").read_bytes())
    assert_user_error(f"{TRAIN} --dataset {cifar} --out {out}", capsys, "data_batch_1", "b'labels'")
    text = tmp_path / "notes.txt"
    text.write_text("e" * 200)
    assert_user_error(f"bounds --run {text}", capsys, "not a network file written by")
    assert_user_error("train --epochs x", capsys, "--epochs", "see nearest-etf train --help")
    assert not out.exists()
    with pytest.raises(UserError):
        main(["--debug", *f"ufm --dim 5 --out {out}".split()])


# --- warnings ---------------------------------------------------------


def test_adaptive_etf_warns_when_no_layer_can_freeze(tmp_path: Path, capsys) -> None:
    out = tmp_path / "a"
    code, stdout, err = cli(
        "adaptive-etf --dataset gaussian --depth 1 --width 16 --epochs 1 --patience 1 --seeds 1 "
        "--fixed-last 1 "
        f"--train-subset 128 --batch-size 64 --probe-samples 64 --no-progress --out {out}",
        capsys,
    )
    assert code == 0
    assert "--patience 1 needs at least 2 epochs" in err
    adaptive = [line.split() for line in stdout.splitlines() if line.startswith("adaptive-")]
    assert [cells[-3:-1] for cells in adaptive] == [["-", "-"]] * 2  # eff. depth, frozen at


# --- resume: interrupted, then resumed, equals uninterrupted --------------------------------


def _interrupt_then_resume(command: str, out: Path, capsys) -> None:
    """Run `command` into `out`, expecting an interruption, then resume it."""
    code, _, err = cli(f"{command} --out {out}", capsys)
    assert code == 130
    assert manifest(out)["status"] == "interrupted"
    assert f"continue with: nearest-etf {manifest(out)['command']} --resume {out}" in err
    code, stdout, err = cli([*manifest(out)["command"].split(), "--resume", str(out)], capsys)
    assert code == 0, err
    assert "(resumed)" in stdout
    assert manifest(out)["status"] == "finished" and len(manifest(out)["resumed"]) == 1


def test_train_resumes_bit_exactly(tmp_path: Path, capsys, monkeypatch) -> None:
    command = f"{TRAIN} --epochs 2 --seeds 1"
    assert cli(f"{command} --out {tmp_path / 'whole'}", capsys)[0] == 0
    # heads run learned, fixed, implicit: interrupt the implicit head's second epoch
    monkeypatch.setattr(train_module, "train_epoch", Interrupt(train_module.train_epoch, 6))
    part = tmp_path / "part"
    code, _, _ = cli(f"{command} --out {part}", capsys)
    assert code == 130 and (part / "checkpoints" / "implicit-seed0.pt").exists()
    assert len(csv_rows(part / "metrics.csv")) == 5  # two finished runs and one epoch
    monkeypatch.undo()
    code, _, _ = cli(["train", "--resume", str(part)], capsys)
    assert code == 0 and manifest(part)["status"] == "finished"
    whole = tmp_path / "whole"
    assert (part / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()
    for name in ("network-learned-seed0.pt", "network-implicit-seed0.pt"):
        a, b = load_layer_stack(whole / name), load_layer_stack(part / name)
        assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    assert not (part / "checkpoints").exists()


def test_ufm_resumes_to_the_same_study(tmp_path: Path, capsys, monkeypatch) -> None:
    assert cli(f"{UFM} --out {tmp_path / 'whole'}", capsys)[0] == 0
    monkeypatch.setattr(study_module, "run_ufm", Interrupt(study_module.run_ufm, 5))
    code, _, _ = cli(f"{UFM} --out {tmp_path / 'part'}", capsys)
    assert code == 130 and len(manifest(tmp_path / "part")["runs"]) == 4
    monkeypatch.undo()
    code, _, _ = cli(["ufm", "--resume", str(tmp_path / "part")], capsys)
    assert code == 0
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert (part / "curves.csv").read_text() == (whole / "curves.csv").read_text()
    drop = ("seconds",)
    assert csv_rows(part / "summary.csv", drop) == csv_rows(whole / "summary.csv", drop)


def test_dufm_sweep_resumes_to_the_same_rows(tmp_path: Path, capsys, monkeypatch) -> None:
    command = f"{SWEEP} --wd 0.01,0.02 --seeds 2 --srg-layers 2 --srg-r 3"
    assert cli(f"{command} --out {tmp_path / 'whole'}", capsys)[0] == 0
    monkeypatch.setattr(sweep_module, "_run_task", Interrupt(sweep_module._run_task, 3))
    _interrupt_then_resume(command, tmp_path / "part", capsys)
    whole, part = tmp_path / "whole", tmp_path / "part"
    drop = ("seconds",)
    assert csv_rows(part / "runs.csv", drop) == csv_rows(whole / "runs.csv", drop)
    assert (part / "srg_ratio.csv").read_text() == (whole / "srg_ratio.csv").read_text()
    assert json.loads((part / "sweep.json").read_text())["runs"] == 4


def test_adaptive_etf_resumes_after_a_freeze(tmp_path: Path, capsys, monkeypatch) -> None:
    """The frozen ETF layers and the freezing rule's state survive an interruption."""
    from nearest_etf.experiments import adaptive_etf

    command = (
        "adaptive-etf --dataset gaussian --depth 2 --width 16 --epochs 3 --patience 1 --seeds 1 "
        "--fixed-last 1 --train-subset 128 --batch-size 64 --probe-samples 64 --no-progress"
    )
    assert cli(f"{command} --out {tmp_path / 'whole'}", capsys)[0] == 0
    # 4 methods x 3 epochs: call 12 is adaptive-nearest's third epoch, after its freeze
    monkeypatch.setattr(adaptive_etf, "train_epoch", Interrupt(adaptive_etf.train_epoch, 12))
    _interrupt_then_resume(command, tmp_path / "part", capsys)
    drop = ("seconds",)
    whole = csv_rows(tmp_path / "whole" / "metrics.csv", drop)
    assert csv_rows(tmp_path / "part" / "metrics.csv", drop) == whole
    assert [r["frozen_from"] for r in whole if r["method"] == "adaptive-nearest"] == [
        "-1",
        "1",
        "1",
    ]


def test_more_options_checked_before_anything_is_written(tmp_path, capsys):
    # each a one-line user error with no output directory created
    out = tmp_path / "never"
    assert_user_error(
        f"dufm sweep --steps 20 --classes 6 --width 8 --seeds 1 --no-srg --ray-address auto "
        f"--out {out}",
        capsys,
        "--ray-address needs --executor ray",
    )
    assert_user_error(
        f"adaptive-etf --dataset digits --epochs 1 --seeds 1 --probe-samples 5 --out {out}",
        capsys,
        "--probe-samples 5",
        "needs every class",
    )
    for option in ("--rank-rtol 1.5", "--rank-rtol 0", "--delta 0", "--c1 -1", "--c2 nan"):
        assert_user_error(f"bounds --run {tmp_path} {option}", capsys, option.split()[0])
    assert not out.exists()
    # a resumed run stays in its own directory, as it is
    run = tmp_path / "run"
    code, _, err = cli(
        f"train --dataset gaussian --epochs 1 --seeds 1 --head learned --out {run} --no-progress",
        capsys,
    )
    assert code == 0, err
    assert_user_error(f"train --resume {run} --out {out}", capsys, "drop --out")
    assert_user_error(f"train --resume {run} --overwrite", capsys, "drop --overwrite")
