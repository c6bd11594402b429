"""Run under torchrun by tests/experiments/test_distributed.py: train every head for two
epochs on digits with the per-rank batch argv[2] and write this rank's rows and final model
state to argv[1]/rank<r>.pt."""

import sys
from pathlib import Path

import torch

from nearest_etf.experiments._common import distributed
from nearest_etf.experiments._common.training import EpochLoop, load_training_data
from nearest_etf.experiments.train import TrainConfig, train_run

TRAIN, TEST, HEADS = 256, 128, ("learned", "fixed", "implicit")


class KeepingLoop(EpochLoop):
    """An EpochLoop that keeps the trained model."""

    def start(self, model: torch.nn.Module, *args: object) -> int:
        self.model = model
        return super().start(model, *args)


def main(out: Path, batch_size: int) -> None:
    config = TrainConfig(
        dataset="digits",
        train_subset=TRAIN,
        test_subset=TEST,
        epochs=2,
        batch_size=batch_size,
        widths=(32, 32),
        progress=False,
    )
    data = load_training_data(config)
    with distributed.session("cpu"):
        result = {}
        for head in HEADS:
            loop = KeepingLoop()
            rows = train_run(data, config, head, seed=0, loop=loop)
            result[head] = {"rows": rows, "state": loop.model.state_dict()}
        rank = distributed.rank()
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
