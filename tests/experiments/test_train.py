import csv
import gzip
import json
import math
import pickle
import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from nearest_etf.experiments._common.training import crop_flip, train_epoch
from nearest_etf.experiments.cli import main as cli_main
from nearest_etf.experiments.data import DataSplits, load_dataset, load_mnist1d, read_idx
from nearest_etf.experiments.models import MLP, ResNet18, make_backbone
from nearest_etf.experiments.train import (
    TrainConfig,
    summarise,
    train_all,
    train_run,
    write_results,
)
from nearest_etf.nn.heads import ImplicitETFHead
from nearest_etf.nn.losses import dot_regression_loss, loss_function, mse_one_hot_loss


@pytest.fixture(scope="module")
def mnist1d():
    return load_mnist1d()


@pytest.mark.parametrize("head", ["learned", "fixed", "implicit"])
def test_every_head_learns_mnist1d(mnist1d, head):
    config = TrainConfig(epochs=6, seeds=1, widths=(128, 128), lr=0.05, progress=False)
    rows = train_run(mnist1d, config, head, seed=0)
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert 0.4 < rows[-1]["test_accuracy"] <= 1.0  # a fraction; chance is 0.1
    assert rows[-1]["train_accuracy"] > rows[0]["train_accuracy"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for key in ("nc1", "nc2_means", "nc2_classifier", "nc3", "ncc_mismatch", "cosine_margin"):
        assert math.isfinite(rows[-1][key]), key


def test_implicit_head_backbone_gradient_uses_the_declarative_path(mnist1d):
    x, y = mnist1d.x_train[:256], mnist1d.y_train[:256]
    grads = []
    for detach in (False, True):
        torch.manual_seed(0)
        backbone = MLP(40, (64, 64))
        head = ImplicitETFHead(64, 10, detach_frame=detach)
        head(backbone(x[:128]).detach(), y[:128])  # first step: the next one has a prox
        nn.functional.cross_entropy(head(backbone(x[128:]), y[128:]), y[128:]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in backbone.parameters()]))
    assert (grads[0] - grads[1]).norm() > 1e-3 * grads[0].norm()


def test_train_command_writes_csv_json_png(tmp_path, capsys):
    out = tmp_path / "run"
    args = "train --dataset gaussian --epochs 2 --seeds 2 --widths 32 --train-subset 400 --out"
    cli_main([*args.split(), str(out), "--no-progress"])
    assert f"output directory: {out}" in capsys.readouterr().out
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2
    assert {r["head"] for r in rows} == {"learned", "fixed", "implicit"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["epochs"] == 2 and len(saved["rows"]) == 12
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["status"] for r in rows} == {"ok"}
    # networks only for heads without temperature (normalisation is not a linear layer): by
    # default the learned head; with --temperature none every head
    networks = sorted(p.name for p in out.glob("network-*.pt"))
    assert networks == ["network-learned-seed0.pt", "network-learned-seed1.pt"]
    linear = tmp_path / "linear"
    cli_main([*args.split(), str(linear), "--no-progress", "--seeds", "1", "--temperature", "none"])
    assert len(list(linear.glob("network-*-seed0.pt"))) == 3
    assert json.loads((linear / "metrics.json").read_text())["config"]["temperature"] is None
    quiet = tmp_path / "no-networks"
    cli_main([*args.split(), str(quiet), "--no-progress", "--no-networks", "--seeds", "1"])
    assert (quiet / "metrics.csv").exists() and not list(quiet.glob("network-*.pt"))
    # the summary of a stored run, with other thresholds
    summary = (out / "summary.txt").read_text()
    assert "first epoch at or below the threshold" in summary
    capsys.readouterr()
    cli_main(["train", "--summarise", str(out / "metrics.json"), "--thresholds", "nc1=1e9"])
    printed = capsys.readouterr().out
    assert "nc1 <= 1e+09" in printed and "1 [1, 1] (2/2)" in printed
    # a metrics.json with accuracies in percent (an earlier format) is refused, not misread
    stored = json.loads((out / "metrics.json").read_text())
    for row in stored["rows"]:
        row["test_accuracy"] *= 100
    percent = tmp_path / "percent.json"
    percent.write_text(json.dumps(stored))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--summarise", str(percent)])
    assert exit_info.value.code == 2 and "stored in percent" in capsys.readouterr().err


def test_summary_gives_final_values_and_threshold_epochs():
    rows = [
        {
            "head": "a",
            "seed": seed,
            "epoch": epoch,
            "status": "ok",
            "train_accuracy": acc,
            "test_accuracy": 0.5 + seed / 100,
            "nc1": nc1,
            "nc2_means": 1.0,
            "nc3": 1.0,
            "ncc_mismatch": 0.0,
        }
        for seed, curve in enumerate(
            [[(0.9, 1.0), (0.995, 0.4), (1.0, 0.2)], [(0.8, 1.0), (0.95, 1.0), (0.99, 0.3)]]
        )
        for epoch, (acc, nc1) in enumerate(curve, start=1)
    ]
    text = summarise(rows, ["a"], {"nc1": 0.5, "train_error": 0.0101, "nc3": 0.5})
    assert "2.5 [2, 3] (2/2)" in text  # nc1 <= 0.5 at epochs 2 and 3
    assert "2.5 [2, 3] (2/2)" in text.splitlines()[-1]  # train error <= 1% at epochs 2 and 3
    assert "- (0/2)" in text  # nc3 never
    assert "0.505 +- 0.005" in text and "0.5, 0.51" in text  # final test accuracy, range


def test_a_diverging_run_stops_with_its_reason_and_the_others_go_on(tmp_path):
    # a NaN input sample: every run meets it in its first epoch, at the step that draws it
    data = load_dataset("gaussian").subset(200, 50)
    x_train = data.x_train.clone()
    x_train[7] = math.nan
    data = DataSplits("gaussian", x_train, data.y_train, data.x_test, data.y_test, 10)
    config = TrainConfig(epochs=2, seeds=2, widths=(16,), batch_size=32, heads=("fixed", "learned"))
    config = replace(config, progress=False, save_networks=False)
    rows = train_all(config, data)
    assert [(r["head"], r["seed"], r["epoch"], r["status"]) for r in rows] == [
        (head, seed, 1, "diverged") for seed in (0, 1) for head in ("fixed", "learned")
    ]
    assert all(
        re.search(r"epoch 1: \w+Head, training step \d+: features", r["error"]) for r in rows
    )
    paths = write_results(rows, config, tmp_path)
    with paths["csv"].open() as f:
        written = list(csv.DictReader(f))
    assert written[0]["status"] == "diverged" and "test_accuracy" not in written[0]
    summary = summarise(rows, config.heads)
    assert (
        re.search(r"fixed +no run completed", summary)
        and "learned seed 1 diverged in epoch 1" in summary
    )


def test_train_epoch_stops_on_a_non_finite_loss():
    model = nn.Linear(4, 3)
    loader = [(torch.randn(5, 4), torch.arange(5) % 3)] * 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def loss_fn(logits, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(logits, y)
        return loss * math.inf if len(calls) == 2 else loss

    before = model.weight.detach().clone()
    # the pass ends at the diverged step, before its update, and returns that loss
    assert train_epoch(model, loader, optimizer, loss_fn) == math.inf
    assert len(calls) == 2
    assert bool(torch.isfinite(model.weight).all()) and not torch.equal(model.weight, before)


def _write_cifar(folder, sizes, seed=0):
    """CIFAR-10 python batches: dicts {b"data": uint8 [n, 3072], b"labels": list} pickled."""
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    batches = {}
    for name, n in sizes.items():
        labels = g.permutation(np.arange(n) % 10)  # every class present (n >= 10)
        batches[name] = (g.integers(0, 256, (n, 3072), dtype=np.uint8), labels)
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": batches[name][0], b"labels": list(batches[name][1])}, f)
    return batches


def test_cifar10_directory_trains_resnet18_with_augmentation(tmp_path):
    # the GPU user's route, one epoch on a small generated CIFAR-10-format directory
    _write_cifar(
        tmp_path / "cifar-10-batches-py", {"data_batch_1": 24, "data_batch_2": 24, "test_batch": 10}
    )
    out = tmp_path / "run"
    args = (
        f"train --dataset {tmp_path} --model resnet18 --augment --head implicit --epochs 1 "
        f"--seeds 1 --batch-size 16 --train-subset 32 --out {out} --no-progress"
    )
    cli_main(args.split())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["augment"] is True and saved["config"]["model"] == "resnet18"
    (row,) = saved["rows"]
    assert row["status"] == "ok" and math.isfinite(row["train_loss"]) and math.isfinite(row["nc1"])


def test_augmentation_is_a_padded_random_crop_and_flip():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) + 1
    out = crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        candidates = [
            crop
            for r in range(5)
            for c in range(5)
            for crop in (padded[i, :, r : r + 5, c : c + 6],)
            for crop in (crop, crop.flip(-1))
        ]
        assert any(torch.equal(out[i], crop) for crop in candidates)
    flips = crop_flip(x[:1].expand(200, 3, 5, 6), torch.Generator().manual_seed(1), padding=0)
    flipped = (flips != x[0]).flatten(1).any(1).float().mean()
    assert 0.35 < float(flipped) < 0.65
    with pytest.raises(ValueError, match="images"):
        crop_flip(x[0], torch.Generator())
    with pytest.raises(ValueError, match="--augment"):
        train_run(load_mnist1d(num_samples=200), TrainConfig(augment=True), "learned", 0)


def _write_idx(path, array: np.ndarray, type_code: int) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_directory_is_read(tmp_path):
    g = np.random.default_rng(0)
    images = {n: g.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (20, 8)}
    labels = {n: g.permutation(np.arange(n) % 10).astype(np.uint8) for n in (20, 8)}
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[20], 0x08)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels[20], 0x08)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[8], 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[8], 0x08)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images[20])
    data = load_dataset(str(tmp_path))
    assert data.input_shape == (1, 28, 28) and len(data.x_test) == 8
    np.testing.assert_array_equal(data.y_train.numpy(), labels[20])
    scaled = images[20] / 255
    expected = (scaled - scaled.mean()) / scaled.std()
    np.testing.assert_allclose(data.x_train[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_cifar_batches_are_read(tmp_path):
    sizes = {"data_batch_1": 6, "data_batch_2": 6, "test_batch": 6}
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", sizes, seed=1)
    data = load_dataset(str(tmp_path))
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(data.y_test.numpy(), batches["test_batch"][1])
    train = np.concatenate([batches["data_batch_1"][0], batches["data_batch_2"][0]])
    red = train.reshape(12, 3, 32, 32)[:, 0] / 255
    expected = (red - red.mean()) / red.std()
    np.testing.assert_allclose(data.x_train[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_dataset(str(tmp_path / "empty"))


def test_builtin_datasets_and_errors():
    np_state, py_state = np.random.get_state(), random.getstate()
    data = load_mnist1d(num_samples=200, seed=3)
    assert data.x_train.shape == (160, 40) and data.num_classes == 10
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # global RNG untouched
    assert random.getstate() == py_state
    digits = load_dataset("digits")
    assert digits.input_shape == (64,) and len(digits.x_train) + len(digits.x_test) == 1797
    gauss = load_dataset("gaussian")
    assert gauss.num_classes == 10 and abs(float(gauss.x_train.mean())) < 1e-5
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_backbones():
    assert ResNet18(3)(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert make_backbone("mlp", (1, 4, 4), (8, 5))(torch.randn(3, 1, 4, 4)).shape == (3, 5)
    assert make_backbone("cnn1d", (40,))(torch.randn(3, 40)).shape == (3, 64)
    assert make_backbone("cnn1d", (2, 40))(torch.randn(3, 2, 40)).shape == (3, 64)
    digits_cnn = make_backbone("cnn2d", (64,))  # a vector of square length: an 8x8 image
    assert digits_cnn.input_shape == (1, 8, 8) and digits_cnn(torch.randn(3, 64)).shape == (3, 64)
    assert make_backbone("cnn2d", (3, 8, 8))(torch.randn(3, 3, 8, 8)).shape == (3, 64)
    with pytest.raises(ValueError, match="image data"):
        make_backbone("resnet18", (40,))
    with pytest.raises(ValueError, match="square length"):
        make_backbone("cnn2d", (40,))


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    onehot = torch.eye(3, dtype=torch.float64)[y]
    assert float(mse_one_hot_loss(z, y)) == pytest.approx(float(((z - onehot) ** 2).mean()))
    s = 2.5
    expected = sum((float(z[i, y[i]]) - s) ** 2 / (2 * s) for i in range(5)) / 5
    assert float(dot_regression_loss(z, y, scale=s)) == pytest.approx(expected)
    assert loss_function("ce") is nn.functional.cross_entropy
    assert float(loss_function("dr", 2.5)(z, y)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown loss"):
        loss_function("hinge")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        mse_one_hot_loss(z, torch.tensor([0, 3, 1, 1, 0]))
    with pytest.raises(ValueError, match="scale must be positive"):
        loss_function("dr", scale=0.0)  # at construction, not at the first step
    with pytest.raises(ValueError, match=r"shape \[N\] = \[5\]"):
        dot_regression_loss(z, y[:4])


def test_resnet18_trains_end_to_end_on_images():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 3
    x = torch.randn(24, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1)
    data = DataSplits("images", x[:16], y[:16], x[16:], y[16:], 3)
    config = TrainConfig(model="resnet18", epochs=1, batch_size=8, progress=False)
    (row,) = train_run(data, config, "implicit", seed=0)
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["nc3"])
