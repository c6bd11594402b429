"""Correct or loud, over the whole input range: scale, non-finite entries, degenerate class means
and the dtype policy, for every public entry point that takes float tensors.

Oracles: the same quantity in float64 at scale 1 (the metrics are scale invariant or
homogeneous), numpy formulas, and hand values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from nearest_etf import metrics
from nearest_etf._validation import normalise, scale_safe_norm
from nearest_etf.etf import centre_columns, etf_classifier
from nearest_etf.experiments.bounds.generalisation import golowich_bound, rank_aware_bound
from nearest_etf.metrics.collapse import collapse_metrics, nc1, ncc_accuracy, numerical_rank
from nearest_etf.metrics.layer_probe import layer_collapse
from nearest_etf.nearest import nearest_etf
from nearest_etf.nn.class_means import ClassMeanTracker
from nearest_etf.nn.heads import FixedETFHead, ImplicitETFHead
from nearest_etf.polar_decomposition import polar

F32, F64 = torch.float32, torch.float64
N, D, K = 40, 8, 4


def _data() -> dict[str, Tensor]:
    """Float64 features[N, D] with labels, their class means and global mean, a classifier
    weight[K, D] with bias[K], a matrix M and its singular values s."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N) % K
    offsets = 3 * torch.randn(K, D, generator=g, dtype=F64)
    features = torch.randn(N, D, generator=g, dtype=F64) + offsets[labels]
    means, global_mean = metrics.class_means(features, labels, K)
    M = torch.randn(6, 5, generator=g, dtype=F64) @ torch.diag(torch.logspace(0, -2, 5, dtype=F64))
    return {
        "features": features,
        "labels": labels,
        "predictions": (torch.arange(N) + N // 3) % K,
        "means": means,
        "rows": means - global_mean,
        "global_mean": global_mean,
        "weight": torch.randn(K, D, generator=g, dtype=F64),
        "bias": torch.randn(K, generator=g, dtype=F64),
        "M": M,
        "s": torch.linalg.svdvals(M),
    }


_FLOAT_ARGS = frozenset(k for k, v in _data().items() if v.is_floating_point())


@dataclass(frozen=True)
class Metric:
    """A public metric under test: `function` of `args` (names of `_data()` entries; other
    values are passed as they are), of which a rescaling multiplies `scaled`; its value is
    homogeneous of `degree` in that rescaling: value(c x) = c^degree value(x)."""

    function: Callable[..., object]
    args: tuple[object, ...]
    scaled: tuple[str, ...]
    degree: int = 0

    def __call__(self, t: dict[str, Tensor]) -> object:
        return self.function(*(t[a] if isinstance(a, str) else a for a in self.args))

    @property
    def float_args(self) -> tuple[str, ...]:
        """Its float tensor arguments."""
        return tuple(a for a in self.args if a in _FLOAT_ARGS)


FEATURES = ("features", "labels", K)
MEANS = ("means", "global_mean")
CLASSIFIER = ("weight", *MEANS)
# Every public metric by name.
METRICS = {
    "class_means": Metric(lambda *a: metrics.class_means(*a)[0], FEATURES, ("features",), 1),
    "nc1": Metric(nc1, FEATURES, ("features",)),
    "singular_values": Metric(metrics.singular_values, ("M",), ("M",), 1),
    "numerical_rank": Metric(numerical_rank, ("M",), ("M",)),
    "effective_rank": Metric(metrics.effective_rank, ("M",), ("M",)),
    "rank_of_singular_values": Metric(metrics.rank_of_singular_values, ("s", 0.05), ("s",)),
    "etf_distance": Metric(metrics.etf_distance, MEANS, MEANS),
    "orthogonal_frame_distance": Metric(metrics.orthogonal_frame_distance, ("means",), ("means",)),
    "classifier_etf_distance": Metric(metrics.classifier_etf_distance, ("weight",), ("weight",)),
    "self_duality": Metric(metrics.self_duality, CLASSIFIER, MEANS),
    "bias_collapse": Metric(
        metrics.bias_collapse, ("weight", "bias", "global_mean"), ("bias", "global_mean"), 1
    ),
    "equinorm": Metric(metrics.equinorm, ("rows",), ("rows",)),
    "ncc_mismatch": Metric(
        metrics.ncc_mismatch, ("features", "predictions", "means"), ("features", "means")
    ),
    "ncc_accuracy": Metric(ncc_accuracy, (*FEATURES, "means"), ("features", "means")),
    "cosine_margin": Metric(
        metrics.cosine_margin,
        ("features", "labels", "weight", "global_mean"),
        ("features", "global_mean"),
    ),
    "nearest_etf_distance": Metric(metrics.nearest_etf_distance, MEANS, MEANS),
    "variability_collapse_index": Metric(
        metrics.variability_collapse_index, FEATURES, ("features",)
    ),
    "class_numerical_rank": Metric(metrics.class_numerical_rank, FEATURES, ("features",)),
    "self_duality_product": Metric(metrics.self_duality_product, CLASSIFIER, MEANS),
}


def test_every_public_metric_is_covered():
    functions = {n for n in metrics.collapse.__all__ if callable(getattr(metrics.collapse, n))}
    functions -= {"CollapseStatistics", "ScatterOptions", "collapse_metrics"}
    assert functions == set(METRICS)


def _as_array(value: object) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().double().numpy()
    return np.asarray(value, dtype=np.float64)


# float32: 1e19 squares past the maximum, 1e-30 squares below the smallest normal and 3e36
# overflows a sum of N entries; float64: the same at its range.
SCALES = [(F32, 1e-30), (F32, 1e19), (F32, 1e30), (F32, 3e36), (F64, 1e-300), (F64, 1e300)]


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize(("dtype", "scale"), SCALES)
def test_metrics_hold_over_the_dtype_range(name: str, dtype: torch.dtype, scale: float):
    metric = METRICS[name]
    t = _data()
    expected = _as_array(metric(t)) * scale**metric.degree  # float64 at scale 1
    value = metric(
        {
            k: (v * scale if k in metric.scaled else v).to(dtype) if v.is_floating_point() else v
            for k, v in t.items()
        }
    )
    rtol = 1e-4 if dtype == F32 else 1e-10
    np.testing.assert_allclose(
        _as_array(value), expected, rtol=rtol, atol=rtol * scale**metric.degree
    )


@pytest.mark.parametrize("name", sorted(METRICS))
def test_non_finite_input_is_rejected_naming_the_argument(name: str):
    metric = METRICS[name]
    for arg in metric.float_args:
        for bad in (float("nan"), float("inf")):
            t = _data()
            t[arg] = t[arg].clone()
            t[arg].view(-1)[1] = bad
            with pytest.raises(ValueError, match=f"{arg} has non-finite"):
                metric(t)


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(name: str, low: torch.dtype):
    metric = METRICS[name]
    t = _data()
    rounded = {k: v.to(low) if k in metric.float_args else v for k, v in t.items()}
    upcast = {k: v.float() if k in metric.float_args else v for k, v in rounded.items()}
    value, expected = metric(rounded), metric(upcast)
    if isinstance(value, Tensor):
        assert value.dtype == F32
    np.testing.assert_array_equal(_as_array(value), _as_array(expected))


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("bad", [torch.int64, torch.complex64])
def test_other_dtypes_raise_the_packages_type_error(name: str, bad: torch.dtype):
    metric = METRICS[name]
    for arg in metric.float_args:
        t = _data()
        t[arg] = t[arg].to(bad)
        with pytest.raises(TypeError, match=f"{arg} must be a floating-point tensor.*{bad}"):
            metric(t)


def test_etf_distance_of_bfloat16_means_is_computed_in_float32():
    means = _data()["means"].bfloat16()
    oracle = float(metrics.etf_distance(means.double()))  # the bfloat16 values, in float64
    assert float(metrics.etf_distance(means)) == pytest.approx(oracle, rel=1e-6)


# --- nearest_etf and polar ------------------------------------------------------------------


def _classifier_and_gradient(H: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    H = H.clone().requires_grad_(True)
    W = etf_classifier(nearest_etf(H))
    (W * R.to(W.dtype)).sum().backward()
    return W.detach(), H.grad


@pytest.mark.parametrize("scale", [1e-36, 1e-23, 1e20, 1e30, 3e36])
def test_nearest_etf_is_scale_invariant_over_the_float32_range(scale: float):
    g = torch.Generator().manual_seed(1)
    H = torch.randn(8, 5, generator=g, dtype=F64)
    R = torch.randn(5, 8, generator=g, dtype=F64)
    W64, grad64 = _classifier_and_gradient(H, R)  # oracle: float64 at scale 1
    W, grad = _classifier_and_gradient((H * scale).float(), R)
    torch.testing.assert_close(W.double(), W64, rtol=0, atol=1e-5)
    # L(c H) = L(H): dL/d(cH) = (dL/dH) / c
    torch.testing.assert_close(grad.double() * scale, grad64, rtol=1e-4, atol=1e-5)


def test_nearest_etf_rejects_coinciding_class_means():
    H = torch.randn(16, 1, generator=torch.Generator().manual_seed(2)).expand(16, 5)
    with pytest.raises(ValueError, match="all class means coincide"):
        nearest_etf(H)
    batch = torch.stack([torch.randn(16, 5), H])  # one degenerate problem in a batch
    with pytest.raises(ValueError, match="all class means coincide"):
        nearest_etf(batch)
    with pytest.raises(ValueError, match="zero Frobenius norm"):
        nearest_etf(torch.zeros(16, 5))


@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e37])
def test_polar_is_scale_invariant_over_the_float32_range(scale: float):
    A = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = polar(A)
    Q = polar((A * scale).float())
    torch.testing.assert_close(Q.double(), expected, rtol=0, atol=1e-5)


def test_polar_dtype_policy_and_finite_input():
    A = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    Q = polar(A.half())
    assert Q.dtype == F32
    torch.testing.assert_close(Q, polar(A.half().float()), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"A must be a floating-point tensor.*torch\.int64"):
        polar(A.long())
    with pytest.raises(ValueError, match="A has non-finite"):
        polar(A.clone().fill_(float("nan")))
    with pytest.raises(TypeError, match="Q must have the dtype of A"):
        polar(A, polar(A).double())


# --- the class-mean tracker and the implicit head ------------------------------------------


def _stream(steps: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(K, 16, generator=g)
    labels = torch.arange(32) % K
    return [(centres[labels] + torch.randn(32, 16, generator=g), labels) for _ in range(steps)]


@pytest.mark.parametrize(("scale", "atol"), [(2.0**60, 0.0), (1e18, 1e-3)])
def test_an_outlier_batch_moves_the_implicit_head_as_at_normal_scale(scale: float, atol: float):
    # One batch of features ~1e18 used to freeze the frame for good (tracked raw means ~1e18,
    # decaying by 1 - alpha per step: it moved 1e-7 over the next 50 steps against 0.11 for the
    # clean head). The default head normalises every feature to norm tau first, so the outlier
    # acts as the same batch at scale 1: bitwise for an exact power of two, and up to the
    # rounding of x * 1e18 (amplified over 50 proximal steps) otherwise.
    stream = _stream(61)
    clean, outlier = ImplicitETFHead(16, K), ImplicitETFHead(16, K)
    for x, y in stream[:10]:
        clean(x, y)
        outlier(x, y)
    x, y = stream[10]
    clean(x, y)
    outlier(x * scale, y)
    assert float(outlier.tracker.means.abs().max()) <= 2 * outlier.temperature  # |mu_k - mu_G|
    start = outlier.frame.clone()
    for x, y in stream[11:]:
        clean(x, y)
        outlier(x, y)
    torch.testing.assert_close(outlier.frame, clean.frame, rtol=0, atol=atol)
    moved = float((outlier.frame - start).norm())
    assert moved > 0.1
    assert moved == pytest.approx(float((clean.frame - start).norm()), rel=1e-3)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tracker_output_is_scale_invariant(scale: float):
    stream = _stream(3)
    a, b = ClassMeanTracker(16, K), ClassMeanTracker(16, K)
    for x, y in stream:
        expected = a(x, y)
        torch.testing.assert_close(b(x * scale, y), expected, rtol=1e-5, atol=1e-6)


def test_tracker_rejects_overflowing_class_sums_with_the_cause():
    tracker = ClassMeanTracker(16, K)
    x, y = _stream(1)[0]
    with pytest.raises(ValueError, match=r"class sums overflow torch\.float32"):
        tracker(x * 1e37, y)
    assert int(tracker.appearances.sum()) == 0


# --- non-finite, one-shot and degenerate inputs -------------------------------------------


def test_spectral_metrics_reject_an_inf_entry():
    M = torch.randn(6, 4)
    M[0, 0] = float("inf")
    with pytest.raises(ValueError, match="M has non-finite"):
        numerical_rank(M)  # was 0
    with pytest.raises(ValueError, match="M has non-finite"):
        metrics.effective_rank(M)  # was 1.0


def test_ncc_accuracy_rejects_a_nan_feature():
    t = _data()
    t["features"][3, 2] = float("nan")
    with pytest.raises(ValueError, match="features has non-finite"):
        ncc_accuracy(t["features"], t["labels"], K)  # was 0.3 in the issue


def _batches(t: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
    logits = t["features"] @ t["weight"].T + t["bias"]
    return [
        (t["features"][i : i + 10], logits[i : i + 10], t["labels"][i : i + 10])
        for i in range(0, N, 10)
    ]


def test_collapse_metrics_rejects_nan_logits():
    t = _data()
    batches = _batches(t)
    batches[1][1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits has non-finite"):
        collapse_metrics(batches, t["weight"], t["bias"], K)  # accuracy was 20%


def test_collapse_metrics_needs_two_passes():
    t = _data()
    batches = _batches(t)
    expected = collapse_metrics(batches, t["weight"], t["bias"], K)
    oracle = float(
        ((t["features"] @ t["weight"].T + t["bias"]).argmax(1) == t["labels"]).double().mean()
    )
    assert expected["accuracy"] == pytest.approx(oracle)
    with pytest.raises(TypeError, match="one-shot iterator"):
        collapse_metrics((b for b in batches), t["weight"], t["bias"], K)  # accuracy was 0

    class Once:
        """Re-iterable in form only: the second pass finds the iterator spent."""

        def __init__(self) -> None:
            self.iterator = iter(batches)

        def __iter__(self):
            return self.iterator

    with pytest.raises(ValueError, match="other samples in the second pass"):
        collapse_metrics(Once(), t["weight"], t["bias"], K)


def test_metrics_reject_coinciding_class_means():
    t = _data()
    same = t["means"][:1].expand(K, D)
    for call in (
        lambda: metrics.etf_distance(same),
        lambda: metrics.self_duality(t["weight"], same),
        lambda: metrics.nearest_etf_distance(same),
        lambda: ncc_accuracy(t["features"], t["labels"], K, same.contiguous()),
        lambda: nc1(torch.ones(N, D), t["labels"], K),  # was 0: "perfectly collapsed"
    ):
        with pytest.raises(ValueError, match="all class means coincide"):
            call()
    with pytest.raises(ValueError, match="weight is zero"):
        metrics.self_duality(torch.zeros(K, D, dtype=F64), t["means"])
    with pytest.raises(ValueError, match="every row is zero"):
        metrics.equinorm(torch.zeros(K, D))


def test_cosine_margin_of_tiny_features_uses_unit_rows():
    # F.normalize divides by max(||h||, 1e-12): rows of norm 1e-15 were not normalised.
    t = _data()
    expected = float(metrics.cosine_margin(t["features"], t["labels"], t["weight"]))
    tiny = metrics.cosine_margin(t["features"] * 1e-15, t["labels"], t["weight"])
    assert float(tiny) == pytest.approx(expected, rel=1e-12)


# --- layer probe, bounds, helpers ------------------------------------------------------------


def test_layer_collapse_names_a_non_finite_layer_and_marks_a_dead_one_undefined():
    model = nn.Sequential(nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, 6))
    t = _data()
    x, y = t["features"].float(), t["labels"]
    with torch.no_grad():
        model[0].weight.fill_(-1.0)  # every unit dead on these inputs
        model[0].bias.fill_(-100.0)
    result = layer_collapse(model, ["1", "2"], x, y, K)
    assert all(math.isnan(v) for layer in result.values() for v in layer.values())
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="the outputs of layer '2' has non-finite"):
        layer_collapse(model, ["2"], x, y, K)


def test_bounds_are_scale_safe_and_check_their_inputs():
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(6, D, generator=g, dtype=F64), torch.randn(K, 6, generator=g, dtype=F64)]
    X = torch.randn(N, D, generator=g, dtype=F64)
    # the bounds are linear in ||X||_F; at 1e160 its square overflows float64
    assert golowich_bound(weights, X * 1e160) == pytest.approx(1e160 * golowich_bound(weights, X))
    complexity, _ = rank_aware_bound(weights, X * 1e160)
    assert complexity == pytest.approx(1e160 * rank_aware_bound(weights, X)[0])
    with pytest.raises(ValueError, match=r"weights\[1\] has non-finite"):
        golowich_bound([weights[0], weights[1].clone().fill_(float("inf"))], X)
    with pytest.raises(TypeError, match=r"weights\[0\] must be a real tensor"):
        golowich_bound([weights[0].to(torch.complex128), weights[1]], X)
    with pytest.raises(ValueError, match="X has non-finite"):
        golowich_bound(weights, X.clone().fill_(float("nan")))


@pytest.mark.parametrize(("dtype", "scale"), SCALES)
def test_scale_safe_norm_and_normalise(dtype: torch.dtype, scale: float):
    x = torch.tensor([[3.0, -4.0], [0.0, 12.0]], dtype=F64)
    norm = float(scale_safe_norm((x * scale).to(dtype), (0, 1)))
    assert norm == pytest.approx(13.0 * scale, rel=1e-6)  # hand value: sqrt(9 + 16 + 144)
    torch.testing.assert_close(normalise((x * scale).to(dtype), (0, 1)).double(), x / 13.0)
    rows = normalise((x * scale).to(dtype), 1).double()
    torch.testing.assert_close(rows, torch.tensor([[0.6, -0.8], [0.0, 1.0]], dtype=F64))
    assert normalise(torch.zeros(2, 3, dtype=dtype), 1).abs().max() == 0


def test_centre_columns_does_not_overflow():
    X = torch.tensor([[3e38, 1e38, 2e38]])
    torch.testing.assert_close(centre_columns(X), torch.tensor([[1e38, -1e38, 0.0]]))


@pytest.mark.parametrize("dim", [1, (0, 1), (-2, -1)])
def test_normalise_derivative_is_the_projection_over_the_norm(dim):
    # gradcheck against finite differences, and the hand formula (I - u u^T) / ||x|| per slice
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: normalise(t, dim), (x,))
    up = torch.randn(4, 5, generator=g, dtype=F64)
    (grad,) = torch.autograd.grad(normalise(x, dim), x, up)
    x0 = x.detach()
    norm = torch.linalg.vector_norm(x0, dim=dim, keepdim=True)
    u = x0 / norm
    expected = (up - u * (u * up).sum(dim=dim, keepdim=True)) / norm
    torch.testing.assert_close(grad, expected)
    # second derivatives (create_graph) against finite differences of the gradient
    torch.autograd.gradgradcheck(lambda t: normalise(t, dim), (x,))
    # a zero slice stays zero, with a finite derivative
    z = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    (gz,) = torch.autograd.grad(normalise(z, 1).sum(), z)
    assert bool(torch.isfinite(gz).all())


def test_the_etf_heads_feature_map_has_exact_second_derivatives():
    # z = W (tau h/||h||) + b: the Hessian of a loss through the normalisation (gradient
    # penalties, meta-learning) against finite differences
    head = FixedETFHead(6, 3).double().eval()
    h = torch.randn(4, 6, dtype=F64, requires_grad=True)
    torch.autograd.gradgradcheck(head, (h,))


@pytest.mark.parametrize(("scale", "tol"), [(1e-310, 1e-10), (5e-318, 1e-4)])
def test_float64_subnormal_inputs(scale: float, tol: float):
    # max |x| subnormal: the power-of-two rescaling must stay finite (2^1023 at most); the
    # tolerance is the precision left in subnormals (fewer mantissa bits at 5e-318)
    g = torch.Generator().manual_seed(4)
    H = torch.randn(6, 3, generator=g, dtype=F64)
    prox, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=F64))
    close = {"rtol": 0, "atol": tol}
    torch.testing.assert_close(nearest_etf(H * scale, prox), nearest_etf(H, prox), **close)
    torch.testing.assert_close(polar(H * scale), polar(H), **close)
    torch.testing.assert_close(normalise(H * scale, (0, 1)), normalise(H, (0, 1)), **close)


@pytest.mark.parametrize("delta", [1e-3, 1.0, 1e6, 1e30])
def test_nearest_etf_at_any_proximal_weight_in_float32(delta: float):
    # float32 against float64 (an independent rounding), at deltas up to where delta^2 overflows
    # float32: the solve brings A to order one by an exact power of two
    g = torch.Generator().manual_seed(11)
    H = torch.randn(12, 5, generator=g, dtype=F64)
    prox, _ = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=F64))
    U64 = nearest_etf(H, prox, delta=delta)
    U32 = nearest_etf(H.float(), prox.float(), delta=delta)
    # float32 rounding times the conditioning of A (~1e3 at delta = 1e-3, where only delta
    # weighs the direction 1 that C removes)
    torch.testing.assert_close(U32.double(), U64, atol=1e-4 if delta < 1 else 1e-5, rtol=0)
    if delta >= 1e6:  # the prox term dominates: U* -> polar(prox) = prox
        torch.testing.assert_close(U64, prox, atol=1e-5, rtol=0)
