"""A newcomer's first use: replace the last nn.Linear(d, K) of a small network with a head built
from (d, K) alone and train as usual. Every head must learn scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nearest_etf.nn.heads import HEADS, make_head

EPOCHS, BATCH = 8, 64


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    x = torch.tensor(bunch.data[order] / 16, dtype=torch.float32)
    y = torch.tensor(bunch.target[order])
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("name", list(HEADS))
def test_default_head_learns_digits(digits, name, optimizer):
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    head = make_head(name, 64, 10)
    params = [*body.parameters(), *head.parameters()]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-3)
    else:
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    epoch_losses = []
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=generator)
        losses = []
        for i in range(0, len(order) - BATCH + 1, BATCH):
            index = order[i : i + BATCH]
            loss = nn.functional.cross_entropy(
                head(body(x_train[index]), y_train[index]), y_train[index]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    head.eval()
    with torch.no_grad():
        accuracy = float((head(body(x_test)).argmax(1) == y_test).float().mean())
    assert accuracy >= 0.9, (name, optimizer, accuracy)
    # no rising loss curve (with the old defaults the implicit head's rose from 1.9 to 107)
    rise = max(epoch_losses[i] / min(epoch_losses[:i]) for i in range(1, EPOCHS))
    assert rise < 1.5 and epoch_losses[-1] < epoch_losses[0] / 3, epoch_losses
