"""The effect of `ImplicitETFHead(solve_every=k)` on training: test accuracy and collapse.

A ReLU MLP in -> 128 -> 64 whose last layer is the implicit head (built from (64, K) plus
`solve_every`), Adam lr 1e-3, batch 64, cross-entropy, on scikit-learn's digits and MNIST-1D,
`--seeds` seeds per k. After every epoch the training-set collapse metrics of the features the
head sees (`collapse_metrics`); printed per data set and k: the final test accuracy (mean +- std
over seeds), the final NC1 and NC3, and the first epoch at which NC1 <= 0.5 and NC3 <= 0.3
(median over seeds). The step-time side of the trade is measured by benchmarks/head_overhead.py.

    .venv/bin/python benchmarks/solve_every.py [--every 1 10] [--epochs 20] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from nearest_etf.experiments.data import DataSplits, load_digits, load_mnist1d, make_loader
from nearest_etf.metrics import collapse_metrics
from nearest_etf.nn.heads import ImplicitETFHead

THRESHOLDS = {"nc1": 0.5, "nc3": 0.3}


def _train(data: DataSplits, every: int, seed: int, epochs: int) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    width = data.x_train.shape[1]
    body = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    head = ImplicitETFHead(64, data.num_classes, solve_every=every)
    optimizer = torch.optim.Adam(body.parameters(), lr=1e-3)
    loader = make_loader(data.x_train, data.y_train, 64, shuffle=True, seed=seed, drop_last=True)
    rows = []
    for _ in range(epochs):
        body.train()
        head.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(head(body(x), y), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        body.eval()
        head.eval()
        with torch.no_grad():
            features = head.scale_features(body(data.x_train))
            weight, bias = head.classifier()
            logits = features @ weight.T + bias
            batches = [(features, logits, data.y_train)]
            metrics = collapse_metrics(batches, weight, bias, data.num_classes, class_rank=False)
            test = float((head(body(data.x_test)).argmax(1) == data.y_test).float().mean())
        rows.append({"test_accuracy": test, "nc1": metrics["nc1"], "nc3": metrics["nc3"]})
    return rows


def _first(rows: list[dict[str, float]], key: str) -> int | None:
    return next((i + 1 for i, r in enumerate(rows) if r[key] <= THRESHOLDS[key]), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10], help="values of k")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{'data':<9}{'k':>4}{'test acc [%]':>16}{'NC1':>10}{'NC3':>10}"
        f"{'epoch NC1<=0.5':>16}{'epoch NC3<=0.3':>16}"
    )
    for data in (load_digits(), load_mnist1d()):
        for every in args.every:
            runs = [_train(data, every, seed, args.epochs) for seed in range(args.seeds)]
            accuracy = [100 * r[-1]["test_accuracy"] for r in runs]
            firsts = {}
            for key in THRESHOLDS:
                reached = [e for r in runs if (e := _first(r, key)) is not None]
                firsts[key] = (
                    f"{statistics.median(reached):g} ({len(reached)}/{len(runs)})"
                    if reached
                    else f"- (0/{len(runs)})"
                )
            print(
                f"{data.name:<9}{every:>4}"
                f"{statistics.mean(accuracy):>9.2f} +- {statistics.pstdev(accuracy):<4.2f}"
                f"{statistics.mean(r[-1]['nc1'] for r in runs):>10.3g}"
                f"{statistics.mean(r[-1]['nc3'] for r in runs):>10.3g}"
                f"{firsts['nc1']:>16}{firsts['nc3']:>16}"
            )


if __name__ == "__main__":
    main()
