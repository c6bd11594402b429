"""Per-layer collapse of any model: NCC accuracy and NC1 of the outputs of chosen submodules,
captured with forward hooks (Galanti et al.'s effective depth, Liu's Adaptive-ETF criterion).

For each chosen module l with outputs h^l_i (flattened to [N, d_l]) on inputs x_i:

    NCC accuracy_l = (1/N) #{i : argmin_k ||h^l_i - mu^l_k|| = y_i}   (`metrics.ncc_accuracy`)
    NC1_l          = tr(Sigma_W^l (Sigma_B^l)^+) / K                  (`metrics.nc1`)

with the class means mu^l_k of the same samples; both are NaN (undefined) for a layer whose class
means coincide, e.g. a dead layer with constant outputs. The effective depth is the first layer
whose NCC accuracy reaches a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from nearest_etf._validation import check_float_tensor
from nearest_etf.metrics.collapse import _class_means_coincide, nc1, ncc_accuracy
from nearest_etf.nn.class_means import check_labels

__all__ = ["effective_depth", "layer_collapse", "layer_outputs"]


def layer_outputs(
    model: nn.Module, names: Sequence[str], x: Tensor, batch_size: int = 1024
) -> dict[str, Tensor]:
    """Outputs [N, d_l] (flattened, float64, CPU) of the submodules `names` of `model` on the
    inputs x [N, ...], in eval mode without gradients (the model's mode is restored)."""
    if isinstance(names, str):
        raise TypeError("names must be a sequence of module names, not a single string")
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"the model has no submodules named {missing}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks: dict[str, list[Tensor]] = {name: [] for name in names}

    def hook_for(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            chunks[name].append(output.detach().reshape(len(output), -1).to("cpu", torch.float64))

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(chunks[name]) for name in names}


def layer_collapse(
    model: nn.Module,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    num_classes: int,
    batch_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """{name: {"ncc_accuracy": fraction in [0, 1], "nc1": NC1}} of each chosen layer's outputs
    on (x [N, ...], y [N]), class means from the same samples (see the module docstring): both
    NaN where the layer's class means coincide. ValueError naming the layer if its outputs have
    NaN or inf entries."""
    outputs = layer_outputs(model, names, x, batch_size)
    check_labels(y, len(x), num_classes, name="y")
    labels = y.to("cpu", torch.int64)
    result = {}
    for name, h in outputs.items():
        h = check_float_tensor(f"the outputs of layer {name!r}", h)
        if _class_means_coincide(h, labels, num_classes):
            result[name] = {"ncc_accuracy": math.nan, "nc1": math.nan}
        else:
            result[name] = {
                "ncc_accuracy": ncc_accuracy(h, labels, num_classes),
                "nc1": float(nc1(h, labels, num_classes)),
            }
    return result


def effective_depth(ncc_accuracies: Sequence[float], threshold: float = 0.9) -> int | None:
    """Index (0-based) of the first layer with NCC accuracy >= threshold, None if none (a NaN
    accuracy, an undefined layer, never reaches it)."""
    return next((i for i, a in enumerate(ncc_accuracies) if a >= threshold), None)
