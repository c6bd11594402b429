import math

import pytest
import torch
from torch import nn

from nearest_etf.etf import random_stiefel
from nearest_etf.experiments.adaptive_etf import build_mlp
from nearest_etf.metrics.collapse import ncc_accuracy
from nearest_etf.metrics.layer_probe import effective_depth, layer_collapse, layer_outputs
from nearest_etf.nn.etf_layers import (
    ETFLinear,
    convert_to_etf,
    etf_weight,
    fix_last_layers,
    linear_layer_names,
    nearest_etf_weight,
    trainable_parameters,
)


def _closed_form_gram(n: int) -> torch.Tensor:
    """n/(n-1) (I - 1 1^T / n): unit diagonal, -1/(n-1) off the diagonal."""
    return torch.full((n, n), -1.0 / (n - 1), dtype=torch.float64) + torch.eye(
        n, dtype=torch.float64
    ) * (1 + 1.0 / (n - 1))


@pytest.mark.parametrize(("out_features", "in_features"), [(5, 5), (3, 7), (7, 3), (2, 2)])
def test_etf_weight_gram_is_the_closed_form(out_features: int, in_features: int) -> None:
    W = etf_weight(out_features, in_features, dtype=torch.float64)
    assert W.shape == (out_features, in_features)
    gram = W @ W.T if out_features <= in_features else W.T @ W
    torch.testing.assert_close(gram, _closed_form_gram(min(out_features, in_features)))
    # A random frame gives another ETF with the same Gram.
    U = random_stiefel(max(out_features, in_features), min(out_features, in_features))
    V = etf_weight(out_features, in_features, U.double())
    gram = V @ V.T if out_features <= in_features else V.T @ V
    torch.testing.assert_close(gram, _closed_form_gram(min(out_features, in_features)))


def test_square_canonical_etf_is_the_paper_formula() -> None:
    h = 6
    expected = math.sqrt(h / (h - 1)) * (torch.eye(h) - torch.ones(h, h) / h)
    torch.testing.assert_close(ETFLinear(h, h).weight, expected)


def test_etf_linear_gets_no_gradient_but_its_bias_does() -> None:
    layer = ETFLinear(4, 3)
    assert isinstance(layer, nn.Linear)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    x = torch.randn(8, 4, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None
    assert layer.bias.grad is not None and x.grad is not None
    before = layer.weight.clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    optimizer.step()
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
    assert trainable_parameters(layer) == 3
    assert trainable_parameters(ETFLinear(4, 3, bias=False)) == 0


def test_etf_linear_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="min\\(out, in\\) >= 2"):
        ETFLinear(5, 1)
    with pytest.raises(ValueError, match="frame of shape"):
        ETFLinear(5, 3, frame=torch.eye(5, 2))
    with pytest.raises(ValueError, match="weight must have shape"):
        ETFLinear(5, 3, weight=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="orthonormal columns"):
        ETFLinear(5, 3, frame=2 * torch.eye(5, 3))
    with pytest.raises(ValueError, match="not both"):
        ETFLinear(5, 3, frame=torch.eye(5, 3), weight=etf_weight(3, 5))


def test_conversion_keeps_outputs_when_the_weight_already_is_the_etf() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight.copy_(etf_weight(6, 6))
        model[2].weight.copy_(etf_weight(4, 6))
    x = torch.randn(10, 6)
    expected = model(x)
    bias = model[0].bias
    for mode in ("canonical", "nearest"):
        converted = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
        converted.load_state_dict(model.state_dict())
        convert_to_etf(converted, ["0", "2"], mode)
        assert [type(m) for m in converted] == [ETFLinear, nn.ReLU, ETFLinear]
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    convert_to_etf(model, ["0"])
    assert model[0].bias is bias and bias.requires_grad  # the same trainable Parameter


def test_nearest_mode_is_the_polar_factor_by_svd() -> None:
    torch.manual_seed(2)
    for out_features, in_features in ((4, 9), (9, 4), (5, 5)):
        W = torch.randn(out_features, in_features, dtype=torch.float64)
        n = min(out_features, in_features)
        M = math.sqrt(n / (n - 1)) * (torch.eye(n, dtype=torch.float64) - 1.0 / n)
        # Independent oracle: U* = L R^T from the SVD of H M, H the side holding the ETF.
        H = W.T if out_features <= in_features else W
        L, _, Rt = torch.linalg.svd(H @ M, full_matrices=False)
        U = L @ Rt
        expected = (U @ M).T if out_features <= in_features else U @ M
        got = nearest_etf_weight(W)
        torch.testing.assert_close(got, expected)
        # ... and it is at least as close to W as the canonical ETF and random-frame ETFs.
        distance = torch.linalg.matrix_norm(W - got)
        assert distance <= torch.linalg.matrix_norm(W - etf_weight(*W.shape).double())
        for _ in range(5):
            frame = random_stiefel(max(W.shape), n, dtype=torch.float64)
            assert distance <= torch.linalg.matrix_norm(W - etf_weight(*W.shape, frame))


def test_convert_keeps_module_tree_and_counts_parameters() -> None:
    model = build_mlp(in_features=10, depth=3, width=8, num_classes=4)
    names = linear_layer_names(model)
    assert names == ["0.layers.1", "0.layers.4", "0.layers.7", "1"]
    before = {name for name, _ in model.named_modules()}
    total = sum(p.numel() for p in model.parameters())
    assert trainable_parameters(model) == total
    chosen = fix_last_layers(model, 2, "nearest")
    assert chosen == ["0.layers.7", "1"]
    assert {name for name, _ in model.named_modules()} == before
    assert isinstance(model.get_submodule("1"), ETFLinear)
    assert not isinstance(model.get_submodule("0.layers.4"), ETFLinear)
    # Frozen: the 8 x 8 and 4 x 8 weights; everything else (biases, BN) stays trainable.
    assert trainable_parameters(model) == total - 8 * 8 - 4 * 8
    assert sum(p.numel() for p in model.parameters()) == total


def test_convert_rejects_bad_input_without_changing_the_model() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        convert_to_etf(model, ["0", "nope"])
    with pytest.raises(TypeError, match=r"not an nn\.Linear"):
        convert_to_etf(model, ["0", "1"])
    with pytest.raises(ValueError, match="unknown mode"):
        convert_to_etf(model, ["0"], "random")
    with pytest.raises(TypeError, match="single string"):
        convert_to_etf(model, "0")
    with pytest.raises(ValueError, match="the model itself"):
        convert_to_etf(model, [""])
    with pytest.raises(ValueError, match="k must be"):
        fix_last_layers(model, 3)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_layer_probe_matches_direct_computation() -> None:
    torch.manual_seed(3)
    model = build_mlp(in_features=5, depth=2, width=6, num_classes=3)
    model.train()
    x, y = torch.randn(30, 5), torch.arange(30) % 3
    outputs = layer_outputs(model, ["0.layers.3", "0.layers.6"], x, batch_size=7)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        hidden = model[0].layers[:4](x)
    # float32 activations computed in batches of 7 vs all at once: float32 tolerances
    assert outputs["0.layers.3"].dtype == torch.float64
    torch.testing.assert_close(outputs["0.layers.3"].float(), hidden)
    stats = layer_collapse(model, ["0.layers.3"], x, y, 3)["0.layers.3"]
    # NCC accuracy by brute force over the class means.
    means = torch.stack([hidden[y == k].mean(0) for k in range(3)])
    nearest = torch.cdist(hidden, means).argmin(1)
    assert stats["ncc_accuracy"] == pytest.approx(float((nearest == y).double().mean()))
    with pytest.raises(ValueError, match="no submodules named"):
        layer_outputs(model, ["missing"], x)


def test_ncc_accuracy_and_effective_depth() -> None:
    features = torch.tensor([[0.0], [0.2], [1.0], [0.45]])
    labels = torch.tensor([0, 0, 1, 1])
    # Means 0.1 and 0.725: 0.45 is nearer 0.725 (0.275 < 0.35), so all four are right.
    assert ncc_accuracy(features, labels, 2) == 1.0
    assert ncc_accuracy(features, labels, 2, torch.tensor([[0.0], [1.0]])) == 0.75
    with pytest.raises(ValueError, match="means must have shape"):
        ncc_accuracy(features, labels, 2, torch.zeros(3, 1))
    # mixed float32/float64 inputs are computed in the wider dtype (the metrics' rule)
    wide = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    assert ncc_accuracy(features, labels, 2, wide) == 0.75
    assert effective_depth([0.5, 0.89, 0.9, 0.95]) == 2
    assert effective_depth([0.5, 0.6], threshold=0.9) is None
