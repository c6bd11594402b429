"""Training an L-DUFM: full-batch gradient descent (default), mini-batch SGD or Adam.

Gradients come from the explicit backward of `DUFMProblem.loss_and_grad`; the update rule is
torch.optim's (SGD with the full batch is plain gradient descent).

At every recorded step the run is checked for divergence (`runs.divergence`: a non-finite loss
or parameter, or one beyond `runs.DIVERGENCE_BOUND`); a diverged run stops there, keeping its
curve up to and including that step. `TrainResult.loss_change` measures how far a finished run
still was from convergence (`CONVERGED_RTOL`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from nearest_etf._threads import single_threaded
from nearest_etf.experiments._common.runs import divergence
from nearest_etf.experiments.dufm.model import DUFMProblem, LossParts

__all__ = ["CONVERGED_RTOL", "OPTIMIZERS", "DUFMConfig", "TrainResult", "train_dufm"]

# A run counts as converged when its loss changed by at most this fraction over the last tenth
# of its steps (`TrainResult.loss_change`).
CONVERGED_RTOL = 1e-3

OPTIMIZERS = ("gd", "sgd", "adam")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class DUFMConfig:
    """Everything that defines one DUFM training run.

    ``wd`` is the regularisation strength of every term unless ``wd_h`` (for H_1) or ``wd_w``
    (one value per weight matrix W_1..W_L) override it. ``init_scale`` is the standard deviation
    of the i.i.d. Gaussian initialisation of every entry. ``batch_size`` is used by "sgd" only.
    """

    layers: int = 4
    classes: int = 10
    width: int = 30
    per_class: int = 1
    wd: float = 0.004
    wd_h: float | None = None
    wd_w: tuple[float, ...] | None = None
    lr: float = 0.5
    steps: int = 20_000
    seed: int = 0
    init_scale: float = 0.1
    optimizer: str = "gd"
    batch_size: int | None = None
    momentum: float = 0.0
    record_every: int = 100
    dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {self.init_scale}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {self.steps!r}")
        if self.record_every < 1:
            raise ValueError(f"record_every must be >= 1, got {self.record_every}")
        if self.optimizer == "sgd" and (
            self.batch_size is None or not 1 <= self.batch_size <= self.classes * self.per_class
        ):
            raise ValueError(
                f"optimizer 'sgd' needs 1 <= batch_size <= N={self.classes * self.per_class}, "
                f"got {self.batch_size}"
            )
        if self.optimizer != "sgd" and self.batch_size is not None:
            raise ValueError(
                f"batch_size is for optimizer 'sgd'; {self.optimizer!r} uses the full batch "
                f"(got batch_size={self.batch_size})"
            )
        for name, values in (("wd", [self.wd]), ("wd_h", [self.wd_h]), ("wd_w", self.wd_w)):
            if any(not (math.isfinite(v) and v >= 0) for v in values or () if v is not None):
                raise ValueError(f"{name} must be finite and non-negative, got {values}")
        self.problem()  # validates the model arguments

    def problem(self) -> DUFMProblem:
        return DUFMProblem(
            self.layers,
            self.classes,
            self.width,
            self.per_class,
            lambda_h=self.wd if self.wd_h is None else self.wd_h,
            lambda_w=self.wd if self.wd_w is None else self.wd_w,
            dtype=_DTYPES[self.dtype],
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """Final parameters [H_1, W_1..W_L], the recorded loss curve and run statistics.

    A diverged run has ``diverged`` set, ``diverged_step`` (the recorded step where it was
    detected) and ``divergence`` (why); its parameters are those of that step."""

    config: DUFMConfig
    params: list[Tensor]
    steps: list[int] = field(default_factory=list)
    fit: list[float] = field(default_factory=list)
    reg: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_step: int | None = None
    divergence: str | None = None
    seconds: float = 0.0

    @property
    def final(self) -> LossParts:
        return self.config.problem().loss_parts(self.params)

    def loss_change(self, fraction: float = 0.1) -> float:
        """|loss(t0) - loss(T)| / |loss(T)| over the recorded curve, t0 the last recorded step
        at or before (1 - fraction) T (NaN for a curve of fewer than two points or a diverged
        run). At most `CONVERGED_RTOL` counts as converged."""
        if self.diverged or len(self.steps) < 2:
            return math.nan
        total = [f + r for f, r in zip(self.fit, self.reg, strict=True)]
        cut = (1 - fraction) * self.steps[-1]
        start = max(i for i, step in enumerate(self.steps[:-1]) if step <= cut)
        if total[-1] == 0:
            return 0.0 if total[start] == 0 else math.inf
        return abs(total[start] - total[-1]) / abs(total[-1])


def _optimizer(config: DUFMConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def train_dufm(config: DUFMConfig, progress: bool = False) -> TrainResult:
    """Train from the seeded Gaussian initialisation for ``config.steps`` steps.

    The loss is recorded every ``record_every`` steps and at the last step. Stops early
    (``diverged=True``, with the step and the reason) at a recorded step where the loss or a
    parameter is non-finite or beyond the divergence bound (`runs.divergence`).
    """
    with single_threaded():  # tiny matrices; torch threads contend with scipy's BLAS
        return _train(config, progress)


def _train(config: DUFMConfig, progress: bool) -> TrainResult:
    problem = config.problem()
    params = problem.init(config.seed, config.init_scale)
    optimizer = _optimizer(config, params)
    batch_gen = torch.Generator().manual_seed(config.seed + 1)
    result = TrainResult(config=config, params=params)
    start = time.perf_counter()
    bar = tqdm(total=config.steps, disable=not progress, desc="dufm", unit="step", mininterval=0.5)
    for step in range(config.steps + 1):
        columns = None
        if config.optimizer == "sgd":
            columns = torch.randperm(problem.num_samples, generator=batch_gen)[: config.batch_size]
        record = step % config.record_every == 0 or step == config.steps
        parts, grads = problem.loss_and_grad(params, columns, with_loss=record)
        if record:
            if columns is not None:
                parts = problem.loss_parts(params)
            result.steps.append(step)
            result.fit.append(parts.fit)
            result.reg.append(parts.reg)
            bar.set_postfix(loss=f"{parts.total:.6f}", refresh=False)
            reason = divergence(parts.total, params)
            if reason is not None:
                result.diverged, result.diverged_step, result.divergence = True, step, reason
                break
        if step == config.steps:
            break
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        bar.update()
    bar.close()
    for p in params:
        p.grad = None
    result.seconds = time.perf_counter() - start
    return result
