"""Classifier heads that replace the final ``nn.Linear(d, K)`` of a network.

All heads map features h[N, d] to logits z[N, K] = h W^T + b and share the constructor shape
``(num_features, num_classes, ..., temperature=None)``; with a temperature tau the features are
first rescaled to norm tau, h <- tau h / ||h||. Heads hold float32 or float64 state; float16 /
bfloat16 features (a backbone under torch.autocast) are cast up to the head's dtype.

- `LearnedHead`: W, b trained (optionally with the rows of W renormalised to unit norm after
  every optimiser step).
- `FixedETFHead`: W = (R M_K)^T frozen, R = I[:, :K] or Haar-random; b = -W mu_G (batch mean in
  training, no gradient; the last training batch's in eval).
- `ImplicitETFHead`: in training, Hbar from the `ClassMeanTracker`, U = nearest_etf(Hbar^T,
  U_prev), W = (U M_K)^T, b = -W mu_G; the logits depend on the features directly and through U
  (the declarative path). In eval, the last W, b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearest_etf._validation import check_choice, check_nonnegative
from nearest_etf.etf import etf_classifier, random_stiefel
from nearest_etf.nearest import BACKWARDS, SOLVERS, solve_nearest_etf
from nearest_etf.nn.class_means import ClassMeanTracker, check_batch, distributed_sum

__all__ = ["HEADS", "FixedETFHead", "ImplicitETFHead", "LearnedHead", "make_head"]

ROTATIONS = ("identity", "random")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_sizes(num_features: int, num_classes: int, *, etf: bool) -> None:
    for name, value in (("num_features", num_features), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_classes < 2 or num_features < 1:
        raise ValueError(
            f"need num_classes >= 2 and num_features >= 1, got {num_features=}, {num_classes=}"
        )
    if etf and num_features < num_classes:
        raise ValueError(
            f"a simplex-ETF head U M_K with U in St(d, K) needs num_features d >= num_classes "
            f"K, got d={num_features}, K={num_classes}"
        )


def _check_temperature(temperature: float | None) -> float | None:
    if temperature is None:
        return None
    value = check_nonnegative("temperature", temperature)
    if value == 0:
        raise ValueError("temperature must be positive (or None for no feature normalisation)")
    return value


class _Head(nn.Module):
    """Shared input handling: validation, optional normalisation to norm `temperature`.
    Subclasses hold the classifier as ``weight[K, d]`` and ``bias[K]`` (parameters or buffers)."""

    weight: Tensor

    def __init__(
        self, num_features: int, num_classes: int, temperature: float | None, *, etf: bool
    ) -> None:
        super().__init__()
        _check_sizes(num_features, num_classes, etf=etf)
        self.num_features = num_features
        self.num_classes = num_classes
        self.temperature = _check_temperature(temperature)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, "
            f"temperature={self.temperature}"
        )

    def scale_features(self, features: Tensor) -> Tensor:
        """tau h / ||h|| row-wise with a temperature tau, else h unchanged: the features the
        classifier (W, b) acts on."""
        if self.temperature is None:
            return features
        return self.temperature * F.normalize(features, dim=1)

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        """Logits z[N, K] for features h[N, d] (targets[N]: labels, needed by the implicit head
        in training). Runs outside torch.autocast: the head computes in its own dtype."""
        device_type = features.device.type if isinstance(features, Tensor) else "cpu"
        with torch.autocast(device_type, enabled=False):
            features, targets = self._inputs(features, targets)
            return self._logits(features, targets)

    def _logits(self, features: Tensor, targets: Tensor | None) -> Tensor:
        """The head's map on checked, scaled features."""
        raise NotImplementedError

    def _inputs(self, features: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
        dtype = self.weight.dtype
        if isinstance(features, Tensor) and features.dtype in _LOW_PRECISION:
            # e.g. a backbone under torch.autocast: the head computes in its own dtype (the
            # class means, the SVD) and the gradient flows back in the features' dtype
            features = features.to(dtype)
        features, targets = check_batch(features, targets, self.num_features, self.num_classes)
        if features.dtype != dtype:
            raise TypeError(f"features are {features.dtype} but the head is {dtype}; use .to()")
        return self.scale_features(features), targets

    def classifier(self) -> tuple[Tensor, Tensor]:
        """(W[K, d], b[K]) as used in eval mode (detached copies of the buffers)."""
        return self.weight.clone(), self.bias.clone()


class LearnedHead(_Head):
    """z = h W^T + b with W[K, d] (and b[K] unless bias=False) trained by the optimiser,
    initialised like nn.Linear.

    normalize_rows: in training mode the first forward after W changed (an optimiser step, a
    load) rescales the rows of W to unit norm in place, so graphs of earlier forwards stay valid
    (gradient accumulation); eval mode uses row-normalised W.
    """

    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        bias: bool = True,
        normalize_rows: bool = False,
        temperature: float | None = None,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, etf=False)
        linear = nn.Linear(num_features, num_classes, bias=bias)
        self.weight = linear.weight
        self.bias = linear.bias
        self.normalize_rows = normalize_rows
        self._projected_version = -1  # weight._version right after the last row projection

    def _weight(self) -> Tensor:
        W = self.weight
        return F.normalize(W, dim=1) if self.normalize_rows and not self.training else W

    def _logits(self, features: Tensor, targets: Tensor | None) -> Tensor:
        if (
            self.normalize_rows
            and self.training
            and self.weight._version != self._projected_version
        ):
            with torch.no_grad():
                self.weight.copy_(F.normalize(self.weight, dim=1))
            self._projected_version = self.weight._version
        return F.linear(features, self._weight(), self.bias)

    def classifier(self) -> tuple[Tensor, Tensor]:
        W = self._weight().detach()
        b = self.bias
        return W, (W.new_zeros(self.num_classes) if b is None else b.detach())


def _batch_mean(features: Tensor) -> Tensor:
    """mu_G of the (all-ranks) batch, without gradient."""
    features = features.detach()
    total = distributed_sum(torch.cat([features.sum(0), features.new_full((1,), len(features))]))
    if not bool(total[-1] > 0):
        raise ValueError("empty training batch (no samples on any rank)")
    return total[:-1] / total[-1]


class FixedETFHead(_Head):
    """z = W (h - mu_G) with the frozen simplex ETF W = (R M_K)^T, R = I[:, :K] ("identity") or
    Haar-random from `seed` ("random"). Training: mu_G = batch mean (no gradient), stored as
    b = -W mu_G for eval mode."""

    weight: Tensor
    bias: Tensor

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        rotation: str = "identity",
        seed: int = 0,
        temperature: float | None = None,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, etf=True)
        check_choice("rotation", rotation, ROTATIONS)
        if rotation == "identity":
            R = torch.eye(num_features, num_classes)
        else:
            R = random_stiefel(
                num_features, num_classes, generator=torch.Generator().manual_seed(seed)
            )
        self.rotation = rotation
        self.register_buffer("weight", etf_classifier(R))
        self.register_buffer("bias", torch.zeros(num_classes))

    def _logits(self, features: Tensor, targets: Tensor | None) -> Tensor:
        if not self.training:
            return F.linear(features, self.weight, self.bias)
        bias = -self.weight @ _batch_mean(features)
        with torch.no_grad():
            self.bias.copy_(bias)
        return F.linear(features, self.weight, bias)


class ImplicitETFHead(_Head):
    """The nearest-ETF classifier, re-solved at every training step (docs/math.md §2, §3).

    Training forward (targets required): Hbar = tracker(h, y) (normalised centred class means,
    [K, d]); U = nearest_etf(Hbar^T, U_prev, delta) (U_prev = None on the first step);
    W = (U M_K)^T; z = W (h - mu_G) (mu_G the batch mean, no gradient). Gradients reach h directly
    and through U (unless detach_frame=True, an ablation). Eval forward: z = h W^T + b with the
    last W and b = -W mu_G.

    Buffers: tracker state, ``frame`` U[d, K] (the prox of the next step), ``weight[K, d]``,
    ``bias[K]``, ``num_steps``. Before the first step, U = I[:, :K] and b = 0.
    """

    frame: Tensor
    weight: Tensor
    bias: Tensor
    num_steps: Tensor

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        delta: float = 1e-3,
        average: str = "ema",
        temperature: float | None = None,
        solver: str = "procrustes",
        backward: str = "analytic",
        detach_frame: bool = False,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, etf=True)
        self.delta = check_nonnegative("delta", delta)
        check_choice("solver", solver, SOLVERS)
        check_choice("backward", backward, BACKWARDS)
        self.solver = solver
        self.backward_mode = backward
        self.detach_frame = detach_frame
        self.tracker = ClassMeanTracker(num_features, num_classes, average=average)
        frame = torch.eye(num_features, num_classes)
        self.register_buffer("frame", frame)
        self.register_buffer("weight", etf_classifier(frame))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, delta={self.delta}, average={self.tracker.average!r}, "
            f"solver={self.solver!r}, backward={self.backward_mode!r}"
        )

    def _logits(self, features: Tensor, targets: Tensor | None) -> Tensor:
        if self.training and targets is None:
            raise ValueError(
                "ImplicitETFHead needs targets in training mode (it tracks the class means); "
                "call head.eval() for inference"
            )
        if not self.training:
            return F.linear(features, self.weight, self.bias)
        assert targets is not None
        update = self.tracker.compute(features, targets)
        U = self._solve(update.normalised.mT)
        if self.detach_frame:
            U = U.detach()
        W = etf_classifier(U)
        bias = -W @ update.global_mean.detach()
        # Everything above is free of side effects; commit the step only now.
        self.tracker.commit(update)
        with torch.no_grad():
            self.frame.copy_(U)
            self.weight.copy_(W)
            self.bias.copy_(bias)
            self.num_steps.add_(1)
        return F.linear(features, W, bias)

    def _solve(self, Hn: Tensor) -> Tensor:
        """U = nearest_etf(Hn, U_prev) for the unit-norm centred means Hn[d, K], through
        `solve_nearest_etf`: the features were checked here and the prox is our own frame."""
        # a copy: the buffer is overwritten after the step, and a backward may need the prox
        prox = self.frame.to(Hn.dtype, copy=True) if int(self.num_steps) > 0 else None
        return solve_nearest_etf(Hn, prox, self.delta, self.solver, self.backward_mode)


HEADS = {"learned": LearnedHead, "fixed": FixedETFHead, "implicit": ImplicitETFHead}


def make_head(name: str, num_features: int, num_classes: int, **options: object) -> _Head:
    """The head class named in HEADS ("learned", "fixed", "implicit") built with `options`."""
    check_choice("head", name, HEADS)
    return HEADS[name](num_features, num_classes, **options)  # type: ignore[arg-type]
