import csv
import gzip
import json
import math
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from nearest_etf.experiments.cli import main as cli_main
from nearest_etf.experiments.data import DataSplits, load_dataset, load_mnist1d, read_idx
from nearest_etf.experiments.models import MLP, ResNet18, make_backbone
from nearest_etf.experiments.train import TrainConfig, train_run
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
    assert rows[-1]["test_accuracy"] > 40.0  # chance is 10%
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
    assert sorted(p.name for p in out.glob("network-*.pt"))[0] == "network-fixed-seed0.pt"
    quiet = tmp_path / "no-networks"
    cli_main([*args.split(), str(quiet), "--no-progress", "--no-networks", "--seeds", "1"])
    assert (quiet / "metrics.csv").exists() and not list(quiet.glob("network-*.pt"))


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
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = np.random.default_rng(1)
    batches = {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        labels = g.permutation(np.arange(6) + (5 if name == "data_batch_2" else 0)) % 10
        batches[name] = (g.integers(0, 256, (6, 3072), dtype=np.uint8), labels)
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": batches[name][0], b"labels": list(batches[name][1])}, f)
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
    with pytest.raises(ValueError, match="image data"):
        make_backbone("resnet18", (40,))


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
