"""A feed-forward network as a plain stack of weight matrices, with its training inputs.

A `LayerStack` holds the function

    f(x) = W_L a_{L-1}(W_{L-1} ... a_1(W_1 x + b_1) ... + b_{L-1}) + b_L,

W_i [out_i, in_i] (in_{i+1} = out_i), optional biases b_i [out_i], activations a_i in
{"relu", "identity"} (both 1-Lipschitz), together with the training inputs X [m, in_1] (rows are
samples, flattened) that W_1 sees, optional labels [m] and a JSON-able `meta` dict. Everything
is stored as float64 on the CPU. It is what `nearest_etf.experiments.bounds` consumes and what
`nearest-etf train`, `nearest-etf dufm run` (and other experiments) save as ``network*.pt``.

`layer_stack_of` extracts it from a torch model: an ``nn.Sequential``, the `MLP` of
`nearest_etf.experiments.models`, or a `Classifier` (backbone + a head of `nearest_etf.nn`),
nested in any way. Modules are read in registration order, which is the order the forward pass
applies them for these containers. An eval-mode ``BatchNorm1d`` directly after a Linear layer
(running mean mu, running variance v, eps, affine gamma, beta) is folded into it:

    BN(W x + b) = s * (W x + b - mu) + beta,  s = gamma / sqrt(v + eps)
    =>  W' = diag(s) W,  b' = s * (b - mu) + beta.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from nearest_etf._validation import as_float64
from nearest_etf.experiments._common.runs import atomic_path
from nearest_etf.experiments.models import MLP, Classifier
from nearest_etf.nn.heads import HEADS

__all__ = ["ACTIVATIONS", "LayerStack", "layer_stack_of", "load_layer_stack", "save_layer_stack"]

ACTIVATIONS = ("relu", "identity")
_CONTAINERS = (nn.Sequential, MLP, Classifier)
_PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout)
_FORMAT = "nearest_etf.layer_stack/1"


@dataclass
class LayerStack:
    """Weights W_1..W_L ([out_i, in_i]), biases (None or [out_i]), activations a_1..a_{L-1}
    ("relu" or "identity"; default all "relu"), training inputs X [m, in_1], labels [m] or None,
    and a JSON-able meta dict (source command, config, accuracies, ...).

    Tensors are converted to float64 on the CPU (labels to int64); the constructor raises a
    ValueError/TypeError naming the first inconsistency (widths that do not chain, a bias of the
    wrong length, an input width different from in_1, ...).
    """

    weights: list[Tensor]
    biases: list[Tensor | None]
    inputs: Tensor
    labels: Tensor | None = None
    meta: dict = field(default_factory=dict)
    activations: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.weights, Tensor) or not isinstance(self.weights, Sequence):
            raise TypeError("weights must be a list of matrices [out_i, in_i]")
        if len(self.weights) == 0:
            raise ValueError("a LayerStack needs at least one weight matrix")
        weights = [as_float64(f"weights[{i}]", W) for i, W in enumerate(self.weights)]
        for i, W in enumerate(weights):
            if W.ndim != 2 or 0 in W.shape:
                raise ValueError(f"weights[{i}] must be a non-empty matrix, got {tuple(W.shape)}")
            if i > 0 and W.shape[1] != weights[i - 1].shape[0]:
                raise ValueError(
                    f"widths do not chain: weights[{i}] has {W.shape[1]} input columns but "
                    f"weights[{i - 1}] has {weights[i - 1].shape[0]} output rows"
                )
        if len(self.biases) != len(weights):
            raise ValueError(f"got {len(self.biases)} biases for {len(weights)} weight matrices")
        biases: list[Tensor | None] = []
        for i, (b, W) in enumerate(zip(self.biases, weights, strict=True)):
            if b is not None:
                b = as_float64(f"biases[{i}]", b)
                if b.shape != (W.shape[0],):
                    raise ValueError(
                        f"biases[{i}] must have shape ({W.shape[0]},) like the rows of "
                        f"weights[{i}], got {tuple(b.shape)}"
                    )
            biases.append(b)
        inputs = as_float64("inputs", self.inputs)
        if inputs.ndim != 2 or inputs.shape[0] == 0:
            raise ValueError(
                f"inputs must be a non-empty matrix [m, in_1], got {tuple(inputs.shape)}"
            )
        if inputs.shape[1] != weights[0].shape[1]:
            raise ValueError(
                f"inputs have width {inputs.shape[1]} but weights[0] expects in_1 = "
                f"{weights[0].shape[1]} (pass the flattened inputs as fed to W_1)"
            )
        labels = self.labels
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.is_floating_point():
                raise TypeError("labels must be an integer tensor [m] or None")
            labels = labels.detach().to("cpu", torch.int64)
            if labels.shape != (inputs.shape[0],):
                raise ValueError(
                    f"labels must have shape ({inputs.shape[0]},), got {tuple(labels.shape)}"
                )
        activations = (
            ["relu"] * (len(weights) - 1) if self.activations is None else list(self.activations)
        )
        if len(activations) != len(weights) - 1 or any(a not in ACTIVATIONS for a in activations):
            raise ValueError(
                f"activations must be {len(weights) - 1} values from {ACTIVATIONS}, "
                f"got {activations}"
            )
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")
        self.weights, self.biases, self.inputs = weights, biases, inputs
        self.labels, self.activations = labels, activations

    @property
    def depth(self) -> int:
        """L, the number of weight matrices."""
        return len(self.weights)

    @property
    def widths(self) -> list[int]:
        """(in_1, out_1, ..., out_L)."""
        return [self.weights[0].shape[1], *(W.shape[0] for W in self.weights)]

    @property
    def has_bias(self) -> bool:
        """Whether any layer has a (nonzero) bias."""
        return any(b is not None and bool(b.any()) for b in self.biases)

    def __call__(self, x: Tensor | None = None) -> Tensor:
        """f(x) [n, out_L] for x [n, in_1] (default: the stored inputs)."""
        h = self.inputs if x is None else as_float64("x", x).reshape(len(x), -1)
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ W.T if b is None else torch.addmm(b, h, W.T)
            if i < self.depth - 1 and self.activations[i] == "relu":
                h = h.clamp_min(0)
        return h


class _Collector:
    """Accumulates (W, b, activation-after) while walking a model's leaf modules."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []
        self.biases: list[Tensor | None] = []
        self.after: list[str] = []  # activation following each layer so far

    def linear(self, weight: Tensor, bias: Tensor | None) -> None:
        if self.after and self.after[-1] == "pending":
            self.after[-1] = "identity"
        self.weights.append(weight.detach().to("cpu", torch.float64))
        self.biases.append(None if bias is None else bias.detach().to("cpu", torch.float64))
        self.after.append("pending")

    def relu(self, module: nn.Module) -> None:
        if not self.after:
            raise ValueError(f"{module} before the first linear layer is not supported")
        if self.after[-1] == "relu":
            return  # ReLU(ReLU(z)) = ReLU(z)
        self.after[-1] = "relu"

    def batch_norm(self, bn: nn.BatchNorm1d) -> None:
        if not self.after or self.after[-1] != "pending":
            raise ValueError(
                "a BatchNorm1d can only be folded when it directly follows a linear layer"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("cannot fold a BatchNorm1d without running statistics")
        mean = bn.running_mean.detach().to("cpu", torch.float64)
        var = bn.running_var.detach().to("cpu", torch.float64)
        scale = 1.0 / torch.sqrt(var + bn.eps)
        shift = -mean * scale
        if bn.affine:
            gamma = bn.weight.detach().to("cpu", torch.float64)
            scale, shift = gamma * scale, gamma * shift + bn.bias.detach().to("cpu", torch.float64)
        W, b = self.weights[-1], self.biases[-1]
        self.weights[-1] = scale[:, None] * W
        self.biases[-1] = shift if b is None else scale * b + shift


def _walk(module: nn.Module, out: _Collector) -> None:
    if isinstance(module, tuple(HEADS.values())):
        if module.temperature is not None:
            raise ValueError(
                "a head with a temperature normalises the features (h -> tau h/||h||), which "
                "is not a linear layer; only heads with temperature=None are supported"
            )
        W, b = module.classifier()
        out.linear(W, b)
    elif isinstance(module, nn.Linear):
        out.linear(module.weight, module.bias)
    elif isinstance(module, nn.BatchNorm1d):
        out.batch_norm(module)
    elif isinstance(module, nn.ReLU):
        out.relu(module)
    elif isinstance(module, _PASS_THROUGH):
        return
    elif isinstance(module, _CONTAINERS):
        for child in module.children():
            _walk(child, out)
    else:
        raise ValueError(
            f"unsupported module {type(module).__name__} in a layer stack: supported are "
            "nn.Linear (and subclasses), BatchNorm1d after a Linear, ReLU, Flatten, Identity, "
            "Dropout, the nearest_etf heads, and the containers nn.Sequential, MLP, Classifier"
        )


def layer_stack_of(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor | None = None,
    meta: dict | None = None,
) -> LayerStack:
    """The `LayerStack` of a feed-forward `model` (its eval-mode function) with training
    inputs [m, ...] (flattened to [m, in_1]).

    Collects nn.Linear layers (and subclasses) in order, folds each BatchNorm1d that follows a
    Linear into it (running statistics, see the module docstring), takes a head's eval-mode
    classifier (W[K, d], b[K]) = head.classifier() as a linear layer, skips Flatten, Identity and
    Dropout (identity in eval mode), and records ReLU as the activation of the preceding layer.
    Raises ValueError on any other module (e.g. a convolution or a non-1-Lipschitz
    activation), on a BatchNorm1d not directly after a Linear, on a head with a temperature,
    and on a model ending in an activation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    collected = _Collector()
    _walk(model, collected)
    if not collected.weights:
        raise ValueError("the model has no linear layers")
    if collected.after[-1] != "pending":
        raise ValueError("the model ends in an activation; the bounds need a linear last layer")
    activations = ["identity" if a == "pending" else a for a in collected.after[:-1]]
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    return LayerStack(
        weights=collected.weights,
        biases=collected.biases,
        inputs=inputs.reshape(len(inputs), -1),
        labels=labels,
        meta=dict(meta or {}),
        activations=activations,
    )


def save_layer_stack(stack: LayerStack, path: str | Path) -> Path:
    """torch.save the stack as plain tensors (meta as a JSON string) to `path`; returns it."""
    try:
        meta = json.dumps(stack.meta)
    except TypeError as exc:
        raise TypeError(f"LayerStack.meta must be JSON-serialisable: {exc}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(
            {
                "format": _FORMAT,
                "weights": stack.weights,
                "biases": stack.biases,
                "activations": stack.activations,
                "inputs": stack.inputs,
                "labels": stack.labels,
                "meta": meta,
            },
            tmp,
        )
    return path


def load_layer_stack(path: str | Path) -> LayerStack:
    """The `LayerStack` written by `save_layer_stack` (torch.load with weights_only=True).
    Raises `ValueError` naming the file if it is not such a file (unreadable, truncated, another
    format)."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load's failures on foreign bytes have many types
        # not torch's message: it advises retrying with weights_only=False, which would run
        # whatever code the file holds
        raise ValueError(
            f"{path} is not a network file written by nearest-etf (torch.load with "
            f"weights_only=True failed: {type(exc).__name__})"
        ) from exc
    keys = ("format", "weights", "biases", "activations", "inputs", "labels", "meta")
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not set(keys) <= set(data):
        raise ValueError(f"{path} is not a layer stack written by save_layer_stack")
    return LayerStack(
        weights=data["weights"],
        biases=data["biases"],
        inputs=data["inputs"],
        labels=data["labels"],
        meta=json.loads(data["meta"]),
        activations=data["activations"],
    )
