"""Classifier heads that replace the final ``nn.Linear(d, K)`` of a network.

All heads map features h[N, d] to logits z[N, K] = f W^T + b, with f = tau h / ||h|| (row-wise)
when the head has a temperature tau and f = h without one, and share the constructor shape
``(num_features, num_classes, ..., temperature=...)``. Heads hold float32 or float64 state;
float16 / bfloat16 features (a backbone under torch.autocast) are cast up to the head's dtype.

- `LearnedHead`: W, b trained (optionally with the rows of W renormalised to unit norm after
  every optimiser step). No temperature by default: a drop-in ``nn.Linear``.
- `FixedETFHead`: W = (R M_K)^T frozen, R Haar-random from a seed (default) or I[:, :K].
- `ImplicitETFHead`: W = (U M_K)^T with U the nearest simplex ETF to the tracked class means,
  re-solved every training step (Markou, Ajanthan, Gould, NeurIPS 2024; math.md §2, §3).

The two ETF heads compute, in training, z_i = W (f_i - mu_G) with mu_G the mean of the batch's
f_i: one differentiable function of the batch, whose gradient reaches the features directly,
through mu_G and (implicit head) through U. In eval mode b = -W m, with m a running average of
the training batches' mu_G kept like BatchNorm's running mean (`momentum`). By default they
normalise the features to the temperature `default_temperature(K)` (math.md §2: with unit-norm
ETF rows and unnormalised features, cross-entropy grows ||h|| without bound).

**Training mode under torch.no_grad().** A training-mode forward with gradients disabled (a
validation loop that forgot ``.eval()``, torch.no_grad or torch.inference_mode) computes the
training-mode logits but changes no state: no running mean, tracker, frame, step count or
row projection is updated. Only a forward with gradients enabled is a training step.

**Errors.** A bad batch raises ValueError/TypeError and leaves the head unchanged; non-finite
features or logits raise `NonFiniteError` naming the head and its training step.
`load_state_dict` checks the whole state first (shapes, finite values, an orthonormal frame,
an ETF weight, non-negative counts) and changes nothing when it rejects it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nearest_etf._validation import (
    all_finite,
    check_choice,
    check_nonnegative,
    check_stiefel,
    normalise,
)
from nearest_etf.declarative.node import Backward
from nearest_etf.declarative.solvers import Solver
from nearest_etf.etf import centering_matrix, etf_classifier, random_stiefel
from nearest_etf.nearest import as_backward, as_solver, solve_nearest_etf
from nearest_etf.nn.class_means import ClassMeanTracker, check_batch, distributed_sum

__all__ = [
    "COLLAPSED_LOSS",
    "HEADS",
    "FixedETFHead",
    "ImplicitETFHead",
    "LearnedHead",
    "NonFiniteError",
    "default_temperature",
    "make_head",
]

ROTATIONS = ("identity", "random")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The cross-entropy that perfectly collapsed features reach at the default temperature.
COLLAPSED_LOSS = 1e-6
# Tolerance of the state checks of load_state_dict (orthonormal frame, ETF Gram matrix).
_STATE_ATOL = 1e-3

Temperature = float | Literal["auto"] | None
Update = Callable[[], None]


class NonFiniteError(ValueError):
    """A head met non-finite (NaN or inf) features or produced non-finite logits: training has
    diverged. The message names the head and its training step."""


def default_temperature(num_classes: int, collapsed_loss: float = COLLAPSED_LOSS) -> float:
    """The feature norm tau at which features collapsed onto a unit-row simplex ETF classifier
    reach the cross-entropy `collapsed_loss` (eps):

        log(1 + (K-1) exp(-tau K/(K-1))) = eps   <=>   tau = ((K-1)/K) ln((K-1) / (e^eps - 1))

    (at collapse z_y = tau and z_k = -tau/(K-1) for k != y). It grows like ln K: 6.9 for K = 2,
    14.4 for K = 10, 18.2 for K = 100, 20.7 for K = 1000 at the default eps = 1e-6. A smaller
    tau leaves the ETF heads a high loss floor (their gradient never vanishes, the features keep
    being pushed); a much larger one saturates the softmax early. docs/heads.md gives the
    measurements behind eps = 1e-6 (tau(10) = 14.4, next to tau = 15, the best of
    {None, 2, 5, 8.2, 15, 30} on digits and MNIST-1D).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not 0 < collapsed_loss < math.log(num_classes):
        raise ValueError(
            f"collapsed_loss must lie in (0, ln K) = (0, {math.log(num_classes):.3g}), "
            f"got {collapsed_loss}"
        )
    K = num_classes
    return (K - 1) / K * math.log((K - 1) / math.expm1(collapsed_loss))


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


def _resolve_temperature(temperature: Temperature, num_classes: int) -> float | None:
    if temperature is None:
        return None
    if temperature == "auto":
        return default_temperature(num_classes)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise (ValueError if isinstance(temperature, str) else TypeError)(
            f"temperature must be a positive number, 'auto' or None, got {temperature!r}"
        )
    if not 0 < temperature < math.inf:
        raise ValueError(
            f"temperature must be a positive number, 'auto' or None (no feature "
            f"normalisation), got {temperature!r}"
        )
    return float(temperature)


def _check_momentum(momentum: float | None) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise TypeError(f"momentum must be a number in (0, 1] or None, got {momentum!r}")
    if not 0 < momentum <= 1:
        raise ValueError(
            f"momentum must lie in (0, 1] (or None for a cumulative mean), got {momentum!r}"
        )
    return float(momentum)


class _Head(nn.Module):
    """Shared behaviour: input checks, the optional normalisation to norm `temperature`, the
    training-step counter ``num_steps`` (a buffer), the no-grad policy, state checks on load.
    Subclasses expose the classifier as ``weight[K, d]`` and ``bias[K]``."""

    weight: Tensor
    num_steps: Tensor
    _state = "weight"  # the attribute whose dtype is the head's dtype

    def __init__(
        self, num_features: int, num_classes: int, temperature: Temperature, *, etf: bool
    ) -> None:
        super().__init__()
        _check_sizes(num_features, num_classes, etf=etf)
        self.num_features = num_features
        self.num_classes = num_classes
        self.temperature = _resolve_temperature(temperature, num_classes)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._settings().items())

    def _settings(self) -> dict[str, object]:
        """The head's settings shown by `extra_repr` (subclasses add theirs)."""
        temperature = None if self.temperature is None else round(self.temperature, 4)
        return {
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "temperature": temperature,
        }

    @property
    def _dtype(self) -> torch.dtype:
        """The dtype of the head's state, held by the tensor attribute `_state` (features are
        cast to it)."""
        return getattr(self, self._state).dtype

    def _stepping(self) -> bool:
        """Whether this forward is a training step (training mode with gradients enabled)."""
        return self.training and torch.is_grad_enabled()

    def _where(self) -> str:
        """The head and its step, for error messages."""
        if not self.training:
            return f"{type(self).__name__} (eval mode)"
        return f"{type(self).__name__}, training step {int(self.num_steps) + 1}"

    def scale_features(self, features: Tensor) -> Tensor:
        """tau h / ||h|| row-wise with a temperature tau, else h unchanged: the features the
        classifier (W, b) acts on."""
        if self.temperature is None:
            return features
        return self.temperature * normalise(features, 1)

    def forward(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        """Logits z[N, K] for features h[N, d] (targets[N]: labels, needed by the implicit head
        in training). Runs outside torch.autocast: the head computes in its own dtype.
        Raises NonFiniteError on non-finite features or logits (state unchanged)."""
        device_type = features.device.type if isinstance(features, Tensor) else "cpu"
        with torch.autocast(device_type, enabled=False):
            features, targets = self._inputs(features, targets)
            logits, update = self._logits(features, targets)
            if not all_finite(logits):
                raise NonFiniteError(
                    f"{self._where()}: non-finite logits (NaN or inf) from finite features; the "
                    "classifier is non-finite or overflowed"
                )
            if self._stepping():
                with torch.no_grad():
                    if update is not None:
                        update()
                    self.num_steps.add_(1)
            return logits

    def _logits(self, features: Tensor, targets: Tensor | None) -> tuple[Tensor, Update | None]:
        """The head's map on checked, scaled features, and the state update of a training step
        (run by `forward` only once the logits are known to be finite, and only in a training
        step: training mode with gradients enabled)."""
        raise NotImplementedError

    def _inputs(self, features: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
        dtype = self._dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{type(self).__name__} holds {dtype} state, but heads compute in float32 or "
                "float64 (float16/bfloat16 features are cast up to the head's dtype): convert "
                "the head with .float() or .double(), not .half()/.bfloat16()"
            )
        if isinstance(features, Tensor) and features.dtype in _LOW_PRECISION:
            # e.g. a backbone under torch.autocast: the head computes in its own dtype (the
            # class means, the SVD) and the gradient flows back in the features' dtype
            features = features.to(dtype)
        try:
            features, targets = check_batch(features, targets, self.num_features, self.num_classes)
        except ValueError as error:
            if isinstance(features, Tensor) and not bool(torch.isfinite(features).all()):
                raise NonFiniteError(
                    f"{self._where()}: features have non-finite entries (NaN or inf); the "
                    "network has diverged (lower the learning rate?) or its input is not finite"
                ) from error
            raise
        if features.dtype != dtype:
            raise TypeError(f"features are {features.dtype} but the head is {dtype}; use .to()")
        return self.scale_features(features), targets

    def classifier(self) -> tuple[Tensor, Tensor]:
        """(W[K, d], b[K]) as used in eval mode (detached copies)."""
        return self.weight.detach().clone(), self.bias.detach().clone()

    # -- loading ---------------------------------------------------------------------------

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """`nn.Module.load_state_dict`, atomic for the head: with strict=True missing and
        unexpected keys are rejected before anything is copied, and every state is checked
        as a whole first (`_check_state`); a rejected state raises RuntimeError and changes
        nothing."""
        if strict:
            expected, given = set(self.state_dict()), set(state_dict)
            if expected != given:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                    f"{sorted(expected - given)}, unexpected keys {sorted(given - expected)}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Called for the head (from its own or a parent's load_state_dict) before any of its
        # or its submodules' (the tracker's) entries are copied: check the whole candidate.
        current = self.state_dict()
        candidate = dict(current)
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if key.startswith(prefix) and name in current:
                candidate[name] = value
        problems = [
            f"{name}: shape {tuple(value.shape)}, expected {tuple(current[name].shape)}"
            for name, value in candidate.items()
            if not isinstance(value, Tensor) or value.shape != current[name].shape
        ]
        if not problems:
            problems = self._check_state(candidate)
        if problems:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__} (nothing was "
                f"loaded into it): {'; '.join(problems)}"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_state(self, state: dict[str, Tensor]) -> list[str]:
        """The problems of a complete candidate state (same shapes as this head's): non-finite
        floats, a negative step count. Subclasses add their own checks."""
        problems = [
            f"{name} has non-finite entries"
            for name, value in state.items()
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all())
        ]
        if int(state["num_steps"]) < 0:
            problems.append(f"num_steps = {int(state['num_steps'])} < 0")
        return problems


class LearnedHead(_Head):
    """z = f W^T + b with W[K, d] (and b[K] unless bias=False) trained by the optimiser,
    initialised like nn.Linear; f = h (temperature=None, the default: a drop-in nn.Linear) or
    tau h/||h||.

    normalize_rows: in a training step the first forward after W changed (an optimiser step, a
    load) rescales the rows of W to unit norm in place, so graphs of earlier forwards stay valid
    (gradient accumulation); eval mode and no-grad training forwards use row-normalised W
    without changing it.
    """

    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        bias: bool = True,
        normalize_rows: bool = False,
        temperature: Temperature = None,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, etf=False)
        linear = nn.Linear(num_features, num_classes, bias=bias)
        self.weight = linear.weight
        self.bias = linear.bias
        self.normalize_rows = normalize_rows
        self._projected_version = -1  # weight._version right after the last row projection

    def _logits(self, features: Tensor, targets: Tensor | None) -> tuple[Tensor, Update | None]:
        W = self.weight
        if self.normalize_rows:
            if self._stepping():
                if W._version != self._projected_version:
                    with torch.no_grad():
                        W.copy_(normalise(W, 1))
                    self._projected_version = W._version
            else:
                W = normalise(W, 1)
        return F.linear(features, W, self.bias), None

    def classifier(self) -> tuple[Tensor, Tensor]:
        W = self.weight.detach()
        W = normalise(W, 1) if self.normalize_rows else W.clone()
        b = self.bias
        return W, (W.new_zeros(self.num_classes) if b is None else b.detach().clone())


def _batch_mean(features: Tensor) -> Tensor:
    """mu_G of the (all-ranks) batch, differentiable (the all-reduce backward sums the ranks'
    upstream gradients)."""
    total = distributed_sum(torch.cat([features.sum(0), features.new_full((1,), len(features))]))
    if not bool(total[-1] > 0):
        raise ValueError("empty training batch (no samples on any rank)")
    return total[:-1] / total[-1]


class _ETFHead(_Head):
    """A head z = W (f - mu_G) with a simplex-ETF W: the batch mean mu_G (with gradient) in
    training, the running mean m in eval (b = -W m).

    The running mean (buffer ``running_mean[d]``) follows BatchNorm: after every training
    step m <- (1 - momentum) m + momentum mu_G, or the cumulative mean of the step means with
    momentum=None; unlike BatchNorm, the first step sets m = mu_G (no bias towards 0).
    """

    running_mean: Tensor

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        temperature: Temperature,
        momentum: float | None,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, etf=True)
        self.momentum = _check_momentum(momentum)
        self.register_buffer("running_mean", torch.zeros(num_features))

    def _settings(self) -> dict[str, object]:
        return {**super()._settings(), "momentum": self.momentum}

    @property
    def bias(self) -> Tensor:
        """b = -W m [K], the eval-mode bias from the running mean m of mu_G."""
        return -(self.weight @ self.running_mean)

    def _running_mean_update(self, global_mean: Tensor) -> Update:
        """The update m <- lerp(m, mu_G, rate) of a training step with batch mean mu_G."""
        mean = global_mean.detach().to(self.running_mean.dtype)

        def update() -> None:
            steps = self.num_steps.to(mean.dtype)
            if self.momentum is None:
                rate = 1 / (steps + 1)
            else:
                rate = torch.where(steps == 0, 1.0, self.momentum).to(mean.dtype)
            self.running_mean.lerp_(mean, rate)

        return update


class FixedETFHead(_ETFHead):
    """The frozen simplex-ETF classifier W = (R M_K)^T.

    Training: z = W (f - mu_G) with mu_G the batch mean of f (gradient through f and mu_G).
    Eval: z = f W^T + b, b = -W m with m the running mean of mu_G (`momentum`, see `_ETFHead`).

    rotation: "random" (default) draws R Haar-uniformly on St(d, K) from `seed`; "identity"
    takes R = I[:, :K], which puts the classifier on the first K feature coordinates (after a
    ReLU a dead unit there can leave a class unreachable). temperature: "auto" (default) is
    `default_temperature(K)`, a number tau normalises f = tau h/||h||, None leaves h as is.

    Buffers: ``weight[K, d]``, ``running_mean[d]``, ``num_steps``.
    """

    weight: Tensor

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        rotation: str = "random",
        seed: int = 0,
        temperature: Temperature = "auto",
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, momentum)
        check_choice("rotation", rotation, ROTATIONS)
        if rotation == "identity":
            R = torch.eye(num_features, num_classes)
        else:
            R = random_stiefel(
                num_features, num_classes, generator=torch.Generator().manual_seed(seed)
            )
        self.rotation = rotation
        self.register_buffer("weight", etf_classifier(R))

    def _settings(self) -> dict[str, object]:
        return {**super()._settings(), "rotation": self.rotation}

    def _logits(self, features: Tensor, targets: Tensor | None) -> tuple[Tensor, Update | None]:
        if not self.training:
            return F.linear(features, self.weight, self.bias), None
        mean = _batch_mean(features)
        logits = F.linear(features, self.weight, -(self.weight @ mean))
        return logits, self._running_mean_update(mean)

    def _check_state(self, state: dict[str, Tensor]) -> list[str]:
        problems = super()._check_state(state)
        W = state["weight"].detach().to(torch.float64)
        K = self.num_classes
        gram = K / (K - 1) * centering_matrix(K, dtype=torch.float64)
        error = float((W @ W.T - gram).abs().amax()) if not problems else 0.0
        if error > _STATE_ATOL:
            problems.append(
                f"weight is not a simplex-ETF classifier (U M_K)^T: max |W W^T - M_K^2| = "
                f"{error:.3g}"
            )
        return problems


class ImplicitETFHead(_ETFHead):
    """The nearest-ETF classifier, re-solved at every training step (docs/math.md §2, §3).

    Training step (targets required): f the (normalised) features, Hbar = tracker(f, y)
    (normalised centred class means, [K, d]); U = nearest_etf(Hbar^T, U_prev, delta) (no prox
    on the first step); W = (U M_K)^T; z = W (f - mu_G) with mu_G the batch mean. The gradient
    reaches f directly, through mu_G and through U (unless detach_frame=True, an ablation).
    Eval: z = f W^T + b with the last W and b = -W m, m the running mean of mu_G (`momentum`).

    temperature: "auto" (default) is `default_temperature(K)`; a number tau normalises
    f = tau h/||h||; None leaves h unnormalised (not recommended: cross-entropy then grows
    ||h|| without bound). Before the first step U = I[:, :K] and m = 0.

    solve_every: re-solve U every k-th training step (default 1, every step, as in the paper).
    In between, the tracker and the running mean are still updated and the logits use the last
    U, held fixed (no gradient through U on those steps, like `FixedETFHead` with a moving
    frame): an explicit trade of the node's cost against how closely U follows the class
    means. docs/heads.md measures its speed and its effect on collapse.

    Buffers: tracker state, ``frame`` U[d, K] (the prox of the next step), ``running_mean[d]``,
    ``num_steps``; ``weight`` = (U M_K)^T and ``bias`` are computed from them.
    """

    frame: Tensor
    _state = "frame"

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        delta: float = 1e-3,
        average: str = "ema",
        temperature: Temperature = "auto",
        momentum: float | None = 0.1,
        solver: str | Solver = "procrustes",
        backward: str | Backward = "analytic",
        detach_frame: bool = False,
        solve_every: int = 1,
    ) -> None:
        super().__init__(num_features, num_classes, temperature, momentum)
        self.delta = check_nonnegative("delta", delta)
        if isinstance(solve_every, bool) or not isinstance(solve_every, int) or solve_every < 1:
            raise ValueError(f"solve_every must be an int >= 1, got {solve_every!r}")
        self.solve_every = solve_every
        self.solver = as_solver(solver)
        self.backward = as_backward(backward)
        self.detach_frame = detach_frame
        self.tracker = ClassMeanTracker(num_features, num_classes, average=average)
        self.register_buffer("frame", torch.eye(num_features, num_classes))

    def _settings(self) -> dict[str, object]:
        return {
            **super()._settings(),
            "delta": self.delta,
            "average": self.tracker.average,
            "solver": self.solver,
            "backward": self.backward,
            "solve_every": self.solve_every,
            "detach_frame": self.detach_frame,
        }

    @property
    def weight(self) -> Tensor:
        """W = (U M_K)^T [K, d] of the current frame U."""
        return etf_classifier(self.frame)

    def _logits(self, features: Tensor, targets: Tensor | None) -> tuple[Tensor, Update | None]:
        if not self.training:
            W = self.weight
            return F.linear(features, W, -(W @ self.running_mean)), None
        if targets is None:
            raise ValueError(
                "ImplicitETFHead needs targets in training mode (it tracks the class means); "
                "call head.eval() for inference"
            )
        solving = int(self.num_steps) % self.solve_every == 0
        # Between solves (solve_every > 1) the tracked means feed no solve: track without a graph
        with torch.set_grad_enabled(solving and torch.is_grad_enabled()):
            tracked = self.tracker.compute(features, targets)
        # Without class information yet (only single-class batches so far, e.g. class-sorted
        # data) the nearest ETF is undefined: keep the current frame until there is some.
        if solving and tracked.informative:
            U = self._solve(tracked.normalised.mT)
            if self.detach_frame:
                U = U.detach()
        else:  # reuse the last frame
            U = self.frame.to(features.dtype, copy=True)
        mean = tracked.global_mean if solving else _batch_mean(features)  # with gradient
        W = etf_classifier(U)
        logits = F.linear(features, W, -(W @ mean))
        update_mean = self._running_mean_update(tracked.global_mean)
        frame = U.detach()

        def update() -> None:
            self.tracker.commit(tracked)
            self.frame.copy_(frame)
            update_mean()

        return logits, update

    def _solve(self, Hn: Tensor) -> Tensor:
        """U = nearest_etf(Hn, U_prev) for the unit-norm centred means Hn[d, K], through
        `solve_nearest_etf`: the features were checked here and the prox is our own frame."""
        # a copy: the buffer is overwritten after the step, and a backward may need the prox
        prox = self.frame.to(Hn.dtype, copy=True) if int(self.num_steps) > 0 else None
        return solve_nearest_etf(Hn, prox, self.delta, self.solver, self.backward)

    def _check_state(self, state: dict[str, Tensor]) -> list[str]:
        problems = super()._check_state(state)
        frame = state["frame"].detach()
        try:
            check_stiefel("frame", frame, frame.shape, frame.dtype, atol=_STATE_ATOL)
        except ValueError as error:
            problems.append(str(error))
        if bool((state["tracker.appearances"] < 0).any()):
            problems.append("tracker.appearances has negative counts")
        return problems


HEADS = {"learned": LearnedHead, "fixed": FixedETFHead, "implicit": ImplicitETFHead}


def make_head(name: str, num_features: int, num_classes: int, **options: object) -> _Head:
    """The head class named in HEADS ("learned", "fixed", "implicit") built with `options`."""
    check_choice("head", name, HEADS)
    return HEADS[name](num_features, num_classes, **options)  # type: ignore[arg-type]
