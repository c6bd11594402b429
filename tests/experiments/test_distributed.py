"""`train` under torchrun: 2 gloo processes on the CPU train like one process on the same
global batches (tests/experiments/ddp_worker.py), and only rank 0 writes the run directory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nearest_etf.experiments._common.distributed import GlobalBatchNorm1d, GlobalBatchNorm2d

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(nproc: int, *args: str) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(nproc), *args]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """rank0 and rank1 of 2 processes with batch 32, and the single process with batch 64."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    _torchrun(2, str(WORKER), str(two), "32")
    _torchrun(1, str(WORKER), str(one), "64")
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    return {
        "rank0": load(two / "rank0.pt"),
        "rank1": load(two / "rank1.pt"),
        "single": load(one / "rank0.pt"),
    }


@pytest.mark.parametrize("head", ["learned", "fixed", "implicit"])
def test_ranks_hold_identical_models(ranks: dict[str, dict], head: str) -> None:
    first, second = ranks["rank0"][head]["state"], ranks["rank1"][head]["state"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert ranks["rank0"][head]["rows"] == ranks["rank1"][head]["rows"]


@pytest.mark.parametrize("head", ["learned", "fixed", "implicit"])
def test_two_ranks_equal_one_process_on_the_global_batches(
    ranks: dict[str, dict], head: str
) -> None:
    two, one = ranks["rank0"][head], ranks["single"][head]
    assert len(two["rows"]) == len(one["rows"]) == 2
    for row_two, row_one in zip(two["rows"], one["rows"], strict=True):
        assert row_two["status"] == row_one["status"] == "ok"
        for key, value in row_one.items():
            if isinstance(value, float) and key != "seconds":
                assert row_two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for key, value in one["state"].items():
        # float32 reductions in another order: the frame is a polar factor whose smallest
        # singular direction has s ~ delta, so rounding differences grow by up to 1/(2 delta)
        atol = 1e-4 if key in ("head.frame", "head.tracker.means") else 1e-5
        torch.testing.assert_close(two["state"][key], value, rtol=1e-4, atol=atol, msg=key)
    # the models moved: the comparison is not between two untrained networks
    assert one["rows"][1]["train_loss"] < one["rows"][0]["train_step_loss"]


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_directory(tmp_path: Path) -> None:
    """Rank 0 writes everything, no temporary file is left behind; `--resume` of the finished
    directory reads the run back on both ranks and gives the same metrics."""
    out = tmp_path / "run"
    argv = ["-m", "nearest_etf", "train", "--dataset", "digits", "--train-subset", "128"]
    argv += ["--test-subset", "64", "--epochs", "1", "--batch-size", "32", "--seeds", "1"]
    argv += ["--head", "learned", "--widths", "16", "16", "--no-progress", "--out", str(out)]
    _torchrun(2, *argv)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["runs"] == {"learned-seed0": "finished"}
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "comparison.png",
        "manifest.json",
        "metrics.csv",
        "metrics.json",
        "network-learned-seed0.pt",
        "summary.txt",
        "units",
    ]
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    metrics = json.loads((out / "metrics.json").read_text())["rows"]
    _torchrun(2, "-m", "nearest_etf", "train", "--resume", str(out))
    assert json.loads((out / "metrics.json").read_text())["rows"] == metrics
    assert len(json.loads((out / "manifest.json").read_text())["resumed"]) == 1


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rows"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["etf-transformer", "--patch-size", "8", "--depth", "1", "--width", "16", "--heads", "2"],
        # --threshold 0.01 --patience 1: the adaptive methods freeze layers mid-run
        ["adaptive-etf", "--depth", "3", "--width", "32", "--patience", "1", "--threshold", "0.01"],
    ],
    ids=["etf-transformer", "adaptive-etf"],
)
def test_other_training_commands_on_two_ranks_equal_one(tmp_path: Path, command: list) -> None:
    base = ["-m", "nearest_etf", *command, "--dataset", "digits", "--train-subset", "128"]
    base += ["--test-subset", "64", "--epochs", "3", "--seeds", "1", "--no-progress"]
    _torchrun(2, *base, "--batch-size", "16", "--out", str(tmp_path / "two"))
    _torchrun(1, *base, "--batch-size", "32", "--out", str(tmp_path / "one"))
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert len(two) == len(one) > 0
    if command[0] == "adaptive-etf":  # the comparison covers a run that froze layers
        assert any(row["frozen_from"] != -1 for row in one)
    for row_two, row_one in zip(two, one, strict=True):
        for key, value in row_one.items():
            if key == "seconds":
                continue
            if isinstance(value, float):
                assert row_two[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
            else:
                assert row_two[key] == value, key


@pytest.mark.slow
def test_interrupted_torchrun_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGINT to the torchrun process group after the first checkpoint; `--resume` on 2 ranks
    (every rank loads rank 0's checkpoint) ends with the rows of an uninterrupted run."""
    argv = ["-m", "nearest_etf", "train", "--dataset", "digits", "--head", "learned"]
    argv += ["--seeds", "1", "--epochs", "4", "--batch-size", "32", "--widths", "64", "64"]
    argv += ["--no-progress"]
    out, reference = tmp_path / "run", tmp_path / "reference"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", *argv, "--out", str(out)]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = out / "checkpoints" / "learned-seed0.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=60)
    interrupted = _rows(out)
    assert 1 <= len(interrupted) < 4  # stopped mid-run, after a checkpoint
    _torchrun(2, "-m", "nearest_etf", "train", "--resume", str(out))
    _torchrun(2, *argv, "--out", str(reference))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(out)) == strip(_rows(reference))
    assert len(_rows(out)) == 4


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batch_norm_in_one_process_is_batch_norm(momentum: float | None) -> None:
    """Without other ranks the global-batch BatchNorm is nn.BatchNorm: output, gradients and
    running statistics (momentum and cumulative average)."""
    for ours, theirs, shape in (
        (
            GlobalBatchNorm1d(5, momentum=momentum),
            torch.nn.BatchNorm1d(5, momentum=momentum),
            (8, 5),
        ),
        (
            GlobalBatchNorm2d(3, momentum=momentum),
            torch.nn.BatchNorm2d(3, momentum=momentum),
            (4, 3, 2, 2),
        ),
    ):
        theirs.load_state_dict(ours.state_dict())
        for _ in range(3):
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True) * 3 + 1
            ours.double(), theirs.double()
            y_ours, y_theirs = ours(x), theirs(x)
            torch.testing.assert_close(y_ours, y_theirs)
            (g_ours,) = torch.autograd.grad((y_ours**3).sum(), x)
            (g_theirs,) = torch.autograd.grad((y_theirs**3).sum(), x)
            torch.testing.assert_close(g_ours, g_theirs)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
