"""LayerStack: shape validation, extraction from models (BatchNorm folding), save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nearest_etf.experiments.layer_stack import (
    LayerStack,
    layer_stack_of,
    load_layer_stack,
    save_layer_stack,
)
from nearest_etf.experiments.models import MLP, Classifier
from nearest_etf.nn.heads import make_head


def _randomise_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so folding is really exercised."""
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm1d):
            size = bn.num_features
            bn.running_mean.copy_(torch.randn(size, generator=generator))
            bn.running_var.copy_(torch.rand(size, generator=generator) + 0.3)
            bn.weight.data.copy_(torch.randn(size, generator=generator))
            bn.bias.data.copy_(torch.randn(size, generator=generator))


@pytest.mark.parametrize("head", ["learned", "fixed", "implicit"])
def test_batch_norm_folding_reproduces_eval_model(head: str) -> None:
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    options = {} if head == "learned" else {"temperature": None}  # a linear eval-mode head
    model = Classifier(MLP(12, (16, 9)), make_head(head, 9, 4, **options)).double()
    _randomise_batch_norms(model, generator)
    if head != "learned":  # a non-zero eval-mode bias b = -W m
        model.head.running_mean.copy_(torch.randn(9, generator=generator))
    model.eval()
    x = torch.randn(25, 3, 4, generator=generator, dtype=torch.float64)
    stack = layer_stack_of(model, x, torch.arange(25) % 4, {"source": "test"})
    assert stack.widths == [12, 16, 9, 4]
    assert stack.activations == ["relu", "relu"]
    assert stack.inputs.shape == (25, 12)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(stack(x), expected, rtol=0, atol=1e-12)
    # the folding formula on the first layer, written out
    linear, bn = model.backbone.layers[1], model.backbone.layers[2]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(stack.weights[0], (scale[:, None] * linear.weight).detach())
    shift = scale * (linear.bias - bn.running_mean) + bn.bias
    torch.testing.assert_close(stack.biases[0], shift.detach())


def test_sequential_with_subclassed_linear_and_identity_activation() -> None:
    class FrozenLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6, bias=False), FrozenLinear(6, 3)
    ).double()
    x = torch.randn(10, 5, dtype=torch.float64)
    stack = layer_stack_of(model, x)
    assert stack.activations == ["relu", "identity"]
    assert stack.biases[1] is None
    torch.testing.assert_close(stack(x), model(x).detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "unsupported module Tanh"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)), "direct"),
        (nn.Sequential(nn.Linear(4, 2), nn.ReLU()), "ends in an activation"),
        (nn.Sequential(nn.Flatten()), "no linear layers"),
        (Classifier(MLP(4, (4,)), make_head("learned", 4, 2, temperature=2.0)), "temperature"),
    ],
)
def test_unsupported_models_are_rejected(model: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_stack_of(model, torch.randn(3, 4))


def test_inconsistent_shapes_get_clear_errors() -> None:
    W1, W2, X = torch.randn(3, 4), torch.randn(2, 3), torch.randn(5, 4)
    with pytest.raises(ValueError, match="widths do not chain"):
        LayerStack([W1, torch.randn(2, 5)], [None, None], X)
    with pytest.raises(ValueError, match="biases"):
        LayerStack([W1, W2], [None], X)
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape \(3,\)"):
        LayerStack([W1, W2], [torch.zeros(4), None], X)
    with pytest.raises(ValueError, match=r"non-empty matrix \[m, in_1\], got \(4,\)$"):
        LayerStack([W1, W2], [None, None], torch.randn(4))
    with pytest.raises(ValueError, match="inputs have width 5"):
        LayerStack([W1, W2], [None, None], torch.randn(5, 5))
    with pytest.raises(ValueError, match="labels must have shape"):
        LayerStack([W1, W2], [None, None], X, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="activations"):
        LayerStack([W1, W2], [None, None], X, activations=["tanh"])
    with pytest.raises(ValueError, match="non-finite"):
        LayerStack([W1, W2.fill_(float("nan"))], [None, None], X)
    with pytest.raises(TypeError, match="list of matrices"):
        LayerStack(W1, [None], X)  # type: ignore[arg-type]


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    stack = LayerStack(
        [torch.randn(3, 4), torch.randn(2, 3)],
        [torch.randn(3), None],
        torch.randn(6, 4),
        torch.arange(6) % 2,
        {"source": "test", "accuracy": 0.5, "nested": {"a": [1, 2]}},
        ["identity"],
    )
    loaded = load_layer_stack(save_layer_stack(stack, tmp_path / "sub" / "network.pt"))
    expected, got = stack.weights + stack.biases[:1], loaded.weights + loaded.biases[:1]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b) and b.dtype == torch.float64
    assert loaded.biases[1] is None
    assert torch.equal(loaded.inputs, stack.inputs) and torch.equal(loaded.labels, stack.labels)
    assert loaded.meta == stack.meta and loaded.activations == ["identity"]
    torch.testing.assert_close(loaded(), stack(), rtol=0, atol=0)
    torch.save({"weights": []}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a layer stack"):
        load_layer_stack(tmp_path / "other.pt")
    stack.meta["bad"] = object()
    with pytest.raises(TypeError, match="JSON"):
        save_layer_stack(stack, tmp_path / "bad.pt")
