"""Per-class feature sums and the one running class-mean tracker (docs/math.md §3).

Per training batch with features h_i (rows) and labels y_i:

    n_k = #{i : y_i = k},  mu_k = (1/n_k) sum_{y_i = k} h_i,  mu_G = (1/N) sum_i h_i

(sums and counts all-reduced over the ranks when torch.distributed is initialised, so every rank
sees the statistics of the union of the ranks' batches). The tracked centred class means are

    Hbar_k <- alpha_k (mu_k - mu_G) + (1 - alpha_k) Hbar_k.detach()   for the classes in the batch
    Hbar_k <- Hbar_k.detach()                                           for the others

with t_k the number of batches class k has appeared in (this one included) and
alpha_k = max(2/(t_k + 1), min_alpha) ("ema"), 1/t_k ("cma", the mean of the per-batch centred
means) or 1 ("none": the current batch's means); centred means that vanish to rounding (a
batch of one class) count as zero. A class never seen keeps Hbar_k = 0 (its mean is taken to be
mu_G). The output is Hbar / ||Hbar||_F, normalised scale-safely; gradients reach only the
current batch. This is the reference code's moving average of the raw centred means
(docs/math.md §3): it is invariant to the scale of the whole feature stream, not of single
batches, so one batch at an outlying scale dominates the average for about 1/alpha_k steps. The
heads normalise every feature to the norm tau by default, which removes such outliers before
the tracker sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nearest_etf._validation import (
    check_choice,
    check_float_tensor,
    coincide,
    max_abs,
    normalise,
)

__all__ = [
    "AVERAGES",
    "ClassMeanTracker",
    "TrackerUpdate",
    "check_batch",
    "class_sums",
    "distributed_sum",
]

AVERAGES = ("ema", "cma", "none")


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; the backward sums the upstream gradients over the ranks (each
    rank's loss depends on every rank's x)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed_sum(x: Tensor) -> Tensor:
    """sum_r x_r over the ranks of the default process group (x itself without one),
    differentiable: the gradient w.r.t. the local x is the sum of the ranks' upstream gradients."""
    if not _distributed():
        return x
    if x.requires_grad:
        return _AllReduceSum.apply(x)
    y = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(y)
    return y


def check_batch(
    features: object, labels: object, num_features: int, num_classes: int
) -> tuple[Tensor, Tensor | None]:
    """Check features[N, num_features] (finite; float16/bfloat16 returned as float32, other
    non-float dtypes rejected: `check_float_tensor`) and, unless None, integer labels[N] in
    [0, num_classes); raise TypeError/ValueError naming the problem."""
    features = check_float_tensor("features", features)
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, d], got {tuple(features.shape)}")
    if features.shape[1] != num_features:
        raise ValueError(
            f"features have width {features.shape[1]}, but this module expects "
            f"num_features={num_features}"
        )
    if labels is None:
        return features, None
    labels = check_labels(labels, features.shape[0], num_classes)
    return features, labels.to(device=features.device, dtype=torch.long)


def check_labels(
    labels: object, num_samples: int, num_classes: int, name: str = "targets"
) -> Tensor:
    """Check integer labels[num_samples] in [0, num_classes); raise TypeError/ValueError naming
    the problem (as `name`)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape != (num_samples,):
        raise ValueError(f"{name} must have shape [N] = [{num_samples}], got {tuple(labels.shape)}")
    if labels.numel():
        low, high = labels.aminmax()
        if not bool((low >= 0) & (high < num_classes)):  # one host sync
            bad = labels[(labels < 0) | (labels >= num_classes)]
            raise ValueError(
                f"{name} must lie in [0, {num_classes}) for num_classes={num_classes}; "
                f"got {bad[:5].tolist()}"
            )
    return labels


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(sums[K, d], counts[K]) with sums_k = sum_{y_i = k} h_i (index_add, no loop over classes)
    and counts_k = n_k in the features' dtype, for features[N, d] and integer labels[N]."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    return sums, counts


@dataclass(frozen=True)
class TrackerUpdate:
    """The result of `ClassMeanTracker.compute`, not yet written into the tracker's buffers.

    means: [K, d] the new tracked centred means Hbar (dimensionless, see the module docstring;
    with gradient through this batch);
    normalised: Hbar / ||Hbar||_F (zero when not `informative`); global_mean: [d] mu_G of the
    (all-ranks) batch; appearances: [K] the new t_k; informative: False while every tracked
    centred mean is zero (so far only batches of a single class: no class information yet)."""

    means: Tensor
    normalised: Tensor
    global_mean: Tensor
    appearances: Tensor
    informative: bool


class ClassMeanTracker(nn.Module):
    """Running centred class means of a feature stream (see the module docstring).

    Buffers (in the state dict): ``means[K, d]`` (Hbar, rows), ``appearances[K]`` (t_k, int64),
    ``global_mean[d]`` (mu_G of the last batch).
    """

    means: Tensor
    appearances: Tensor
    global_mean: Tensor

    def __init__(
        self, num_features: int, num_classes: int, *, average: str = "ema", min_alpha: float = 1e-4
    ) -> None:
        super().__init__()
        check_choice("average", average, AVERAGES)
        if not 0 < min_alpha <= 1:
            raise ValueError(f"min_alpha must lie in (0, 1], got {min_alpha}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.average = average
        self.min_alpha = float(min_alpha)
        self.register_buffer("means", torch.zeros(num_classes, num_features))
        self.register_buffer("appearances", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("global_mean", torch.zeros(num_features))

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"average={self.average!r}"
        )

    def _alpha(self, appearances: Tensor, dtype: torch.dtype) -> Tensor:
        t = appearances.to(dtype)
        if self.average == "ema":
            return (2 / (t + 1)).clamp_min(self.min_alpha)
        if self.average == "cma":
            return 1 / t
        return torch.ones_like(t)

    def compute(self, features: Tensor, labels: Tensor) -> TrackerUpdate:
        """The update for one batch (features[N, d], labels[N] in [0, K)), without touching the
        buffers. ValueError for an empty batch and for class sums that overflow the dtype; an
        update whose tracked means are all zero has ``informative=False``. The inputs are assumed
        to have passed `check_batch`."""
        K = self.num_classes
        sums, counts = class_sums(features, labels, K)
        if _distributed():  # one all-reduce for sums and counts
            stats = distributed_sum(torch.cat([sums, counts.unsqueeze(1)], dim=1))
            sums, counts = stats[:, :-1], stats[:, -1]
        total = counts.sum()
        present = counts > 0
        global_mean = sums.sum(0) / total
        batch_means = sums / counts.clamp_min(1).unsqueeze(1)  # zero rows for absent classes
        centred = (batch_means - global_mean) * present.unsqueeze(1)  # and here too
        vanish = coincide(centred, batch_means, (0, 1), total)
        # a finite sum proves every entry finite (NaN/inf propagate), in one pass
        size, finite, vanishes = torch.stack(
            [total, torch.isfinite(centred.detach().sum()), vanish]
        ).tolist()  # one host sync
        if not size > 0:
            raise ValueError("empty training batch (no samples on any rank)")
        if not finite and not bool(torch.isfinite(centred).all()):  # the sum alone overflowed?
            raise ValueError(
                f"the batch's class sums overflow {features.dtype} (features up to "
                f"{float(features.detach().abs().max()):.3g}): rescale the features"
            )
        batch = torch.zeros_like(centred) if vanishes else centred
        appearances = self.appearances + present.long()
        alpha = self._alpha(appearances.clamp_min(1), features.dtype).unsqueeze(1)
        previous = self.means.detach().to(features.dtype)
        # alpha_k (batch_k - Hbar_k) + Hbar_k for the classes present, Hbar_k for the others
        means = torch.lerp(previous, batch, alpha * present.unsqueeze(1))
        informative = bool(max_abs(means.detach(), (0, 1)) > 0)
        return TrackerUpdate(means, normalise(means, (0, 1)), global_mean, appearances, informative)

    @torch.no_grad()
    def commit(self, update: TrackerUpdate) -> None:
        """Write a computed update into the buffers."""
        self.means.copy_(update.means)
        self.appearances.copy_(update.appearances)
        self.global_mean.copy_(update.global_mean)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Update with one batch and return the normalised tracked means Hbar/||Hbar|| [K, d]."""
        features, labels = check_batch(features, labels, self.num_features, self.num_classes)
        if labels is None:
            raise ValueError("the class-mean tracker needs the batch's labels")
        update = self.compute(features, labels)
        if not update.informative:
            raise ValueError(
                "all tracked class means coincide with the global mean (zero centred means): "
                "the features carry no class information yet (only one class seen so far?)"
            )
        self.commit(update)
        return update.normalised
