"""Every public metric against a hand computation on a tiny exact case (float64), and the
options that change the conventions: the global mean of imbalanced classes, the equinorm's
standard deviation, the two NC3 forms; `collapse_metrics` on the same tiny case.

The imbalanced case used throughout: d = 1 (embedded in R^2 where d >= K is needed), K = 2,
class 0 = {-2, -1, 0} (n_0 = 3, mu_0 = -1, scatter 2), class 1 = {2} (n_1 = 1, mu_1 = 2), N = 4.
Sigma_W = 2/4 = 1/2. The global mean is
  samples: mu_G = (3 (-1) + 2)/4 = -1/4, centred means (-3/4, 9/4),
           Sigma_B = ((3/4)^2 + (9/4)^2)/2 = 45/16;
  classes: mu_G = (-1 + 2)/2 = 1/2,   centred means (-3/2, 3/2), Sigma_B = 9/4.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from nearest_etf.etf import simplex_etf
from nearest_etf.metrics import collapse
from nearest_etf.metrics.collapse import (
    class_means,
    class_numerical_rank,
    collapse_metrics,
    equinorm,
    etf_distance,
    nc1,
    self_duality,
    self_duality_product,
    variability_collapse_index,
)

F64 = torch.float64
SQRT2, SQRT5 = math.sqrt(2), math.sqrt(5)


def _t(rows: list) -> Tensor:
    return torch.tensor(rows, dtype=F64)


X1 = _t([[-2.0], [-1.0], [0.0], [2.0]])  # the imbalanced case, d = 1
X2 = _t([[-2.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])  # the same in R^2
Y = torch.tensor([0, 0, 0, 1])
MEANS = _t([[-1.0, 0.0], [2.0, 0.0]])
MU_SAMPLES = _t([-0.25, 0.0])
W_SIGN = _t([[-1.0, 0.0], [1.0, 0.0]])  # w_0 = -e_1, w_1 = e_1: a K = 2 simplex ETF
# NCC case: centres 0 and 10 on a line, samples 1, 9, 6 (nearest centres 0, 1, 1).
NCC_MEANS = _t([[0.0, 0.0], [10.0, 0.0]])
NCC_FEATURES = _t([[1.0, 0.0], [9.0, 0.0], [6.0, 0.0]])

# name: (computation, hand value, derivation)
HAND: dict[str, tuple[Callable[[], object], object, str]] = {
    "class_means": (
        lambda: torch.cat([m.flatten() for m in class_means(X1, Y, 2)]),
        [-1.0, 2.0, -0.25],
        "mu_0 = -3/3, mu_1 = 2, mu_G = (-2 - 1 + 0 + 2)/4",
    ),
    "nc1": (
        lambda: nc1(X1, Y, 2),
        4 / 45,
        "tr(Sigma_W Sigma_B^+)/K = (1/2)/(45/16)/2",
    ),
    "variability_collapse_index": (
        lambda: variability_collapse_index(X1, Y, 2),
        8 / 53,
        "1 - Sigma_B/(Sigma_W + Sigma_B)/rank = 1 - (45/16)/(53/16)/1",
    ),
    "class_numerical_rank": (
        lambda: class_numerical_rank(
            _t([[3, 0], [0, 4], [1, 1], [2, 2]]), Y.new_tensor([0, 0, 1, 1]), 2
        ),
        (49 / 25 + 1) / 2,
        "class 0: s = (4, 3), (7/5)^2; class 1: rows parallel, rank 1",
    ),
    "singular_values": (
        lambda: collapse.singular_values(_t([[3, 0], [0, 4], [0, 0]])),
        [4.0, 3.0],
        "the column norms of orthogonal columns, sorted",
    ),
    "numerical_rank": (
        lambda: collapse.numerical_rank(torch.diag(_t([1, 1e-2, 1e-4])), 1e-3),
        2,
        "1 and 1e-2 exceed 1e-3 * 1; 1e-4 does not",
    ),
    "rank_of_singular_values": (
        lambda: collapse.rank_of_singular_values(_t([4, 3, 1e-3]), 0.5),
        2,
        "4 and 3 exceed 0.5 * 4",
    ),
    "effective_rank": (
        lambda: collapse.effective_rank(torch.diag(_t([1, 1, 2]))),
        2**1.5,
        "p = (1/4, 1/4, 1/2): entropy (3/2) log 2",
    ),
    "etf_distance": (
        lambda: etf_distance(MEANS, MU_SAMPLES),
        math.sqrt(0.4),
        "G/||G|| = [[1, -3], [-3, 9]]/10 minus C = [[1, -1], [-1, 1]]/2 is [[-4, 2], [2, 4]]/10",
    ),
    "orthogonal_frame_distance": (
        lambda: collapse.orthogonal_frame_distance(_t([[1, 0], [0, 2]])),
        math.sqrt(2 - 10 / math.sqrt(34)),
        "||diag(1, 4)/sqrt(17) - I/sqrt(2)||^2 = 1 + 1 - 2 (5/sqrt(17))/sqrt(2)",
    ),
    "classifier_etf_distance": (
        lambda: collapse.classifier_etf_distance(torch.eye(2, dtype=F64)),
        math.sqrt(2 - SQRT2),
        "||I/sqrt(2) - C||^2 = 1 + 1 - 2 tr(C)/sqrt(2)",
    ),
    "self_duality": (
        lambda: self_duality(W_SIGN, MEANS, MU_SAMPLES),
        2 - 4 / SQRT5,
        "||(-1, 1)/sqrt(2) - (-1, 3)/sqrt(10)||^2 = 2 - 2 (4/sqrt(20))",
    ),
    "self_duality_product": (
        # W = Mbar with non-ETF means (NC3 = 0): W Mbar^T = A = [[1, -1, 0], [-1, 1, 0], 0],
        # ||A/2 - C/sqrt(2)||^2 = 1 + 1 - tr(A C)/sqrt(2) = 2 - 2/sqrt(2) (A C = A, tr A = 2).
        lambda: self_duality_product(*2 * [_t([[1, 0], [-1, 0], [0, 0]])]),
        math.sqrt(2 - SQRT2),
        "see the comment: nonzero although self_duality is 0",
    ),
    "bias_collapse": (
        lambda: collapse.bias_collapse(torch.eye(2, dtype=F64), _t([-1, 0]), _t([1, 2])),
        2.0,
        "||(1, 2) + (-1, 0)|| = ||(0, 2)||",
    ),
    "equinorm": (
        lambda: equinorm(_t([[1, 0], [0, 3]])),
        0.5,
        "norms 1 and 3: population std 1, mean 2",
    ),
    "ncc_mismatch": (
        lambda: collapse.ncc_mismatch(NCC_FEATURES, torch.tensor([0, 0, 1]), NCC_MEANS),
        1 / 3,
        "predictions (0, 0, 1) against nearest centres (0, 1, 1)",
    ),
    "ncc_accuracy": (
        lambda: collapse.ncc_accuracy(NCC_FEATURES, torch.tensor([0, 1, 0]), 2, NCC_MEANS),
        2 / 3,
        "labels (0, 1, 0) against nearest centres (0, 1, 1)",
    ),
    "cosine_margin": (
        lambda: collapse.cosine_margin(_t([[2, 1]]), torch.tensor([0]), torch.eye(2, dtype=F64)),
        1 / SQRT5,
        "cos(e_1, (2, 1)) - cos(e_2, (2, 1)) = (2 - 1)/sqrt(5)",
    ),
    "nearest_etf_distance": (
        # Hn = (-1, 3) e_1^T/sqrt(10), ||Hn C||_* = ||(-2, 2)||/sqrt(10) = 2/sqrt(5), and
        # min_U ||Hn - U C/sqrt(K-1)||^2 = ||Hn||^2 + 1 - 2 ||Hn C||_*/sqrt(K-1).
        lambda: collapse.nearest_etf_distance(MEANS, MU_SAMPLES),
        math.sqrt(2 - 4 / SQRT5),
        "see the comment",
    ),
}


def test_every_public_metric_has_a_hand_value():
    functions = {n for n in collapse.__all__ if callable(getattr(collapse, n))}
    functions -= {"CollapseStatistics", "ScatterOptions", "collapse_metrics"}
    assert functions == set(HAND)


@pytest.mark.parametrize("name", sorted(HAND))
def test_metric_equals_its_hand_value(name: str):
    compute, expected, _ = HAND[name]
    value = compute()
    value = value.detach().numpy() if isinstance(value, Tensor) else np.asarray(value)
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)


def test_global_mean_of_classes_on_imbalanced_classes():
    means, mu = class_means(X1, Y, 2, global_mean_of="classes")
    assert mu.tolist() == [0.5]
    assert float(nc1(X1, Y, 2, global_mean_of="classes")) == pytest.approx(1 / 9, rel=1e-12)
    vci = variability_collapse_index(X1, Y, 2, global_mean_of="classes")
    assert float(vci) == pytest.approx(2 / 11, rel=1e-12)  # 1 - (9/4)/(11/4)
    # centred means (-3/2, 3/2) e_1: a K = 2 simplex ETF (equal norms), 3/2 W_SIGN.
    means2 = torch.cat([means, torch.zeros(2, 1, dtype=F64)], dim=1)
    mu2 = _t([0.5, 0.0])
    assert float(etf_distance(means2, mu2)) < 1e-15
    assert float(equinorm(means2 - mu2)) < 1e-15
    assert float(self_duality(W_SIGN, means2, mu2)) < 1e-15
    # the means-only functions default to the mean of the class means
    assert float(etf_distance(means2)) < 1e-15


def test_vci_is_invariant_to_invertible_maps_where_nc1_is_not():
    # Within-class deviations +-(a, b) with b != 0 are linearly separable from the between-class
    # direction e_1: an invertible map sends them to e_2, so VCI = 0 (the linear probe is
    # perfect), while NC1 = a^2/2 (Sigma_W = (a, b)(a, b)^T, Sigma_B = e_1 e_1^T). With b = 0
    # both see the noise: Sigma_T = 1 + a^2 on e_1, VCI = a^2/(1 + a^2).
    a, b = 0.3, 0.5
    labels = torch.tensor([0, 0, 1, 1])
    x = _t([[1 + a, b], [1 - a, -b], [-1 + a, b], [-1 - a, -b]])
    assert float(nc1(x, labels, 2)) == pytest.approx(a**2 / 2, rel=1e-12)
    assert float(variability_collapse_index(x, labels, 2)) == pytest.approx(0, abs=1e-14)
    x[:, 1] = 0
    assert float(variability_collapse_index(x, labels, 2)) == pytest.approx(a**2 / (1 + a**2))
    collapsed = _t([[1, 0], [1, 0], [-1, 0], [-1, 0]])
    assert float(variability_collapse_index(collapsed, labels, 2)) == pytest.approx(0, abs=1e-15)


def test_equinorm_sample_std_is_larger_by_sqrt_k_over_k_minus_1():
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    norms = rows.norm(dim=1).numpy()
    population, sample = float(equinorm(rows)), float(equinorm(rows, correction=1))
    assert population == pytest.approx(norms.std() / norms.mean(), rel=1e-12)
    assert sample == pytest.approx(norms.std(ddof=1) / norms.mean(), rel=1e-12)
    assert sample / population == pytest.approx(math.sqrt(5 / 4), rel=1e-12)
    assert float(equinorm(_t([[1, 0], [0, 3]]), correction=1)) == pytest.approx(1 / SQRT2)
    for bad in (2, -1, True, 0.0):
        with pytest.raises(ValueError, match="correction must be an int in"):
            equinorm(rows[:2], correction=bad)


def test_the_two_nc3_forms():
    etf = simplex_etf(3, dtype=F64).T  # rows: a K = 3 simplex ETF in R^3
    assert float(self_duality_product(etf, 2 * etf)) == pytest.approx(0, abs=1e-15)
    assert float(self_duality_product(-etf, etf)) == pytest.approx(2, rel=1e-12)  # -C/sqrt(2)
    assert float(self_duality(-etf, etf)) == pytest.approx(4, rel=1e-12)
    # the K = 2 imbalanced case: W Mbar^T = [[3, -9], [-3, 9]]/4, the same value as NC3's root
    value = float(self_duality_product(W_SIGN, MEANS, MU_SAMPLES))
    assert value == pytest.approx(math.sqrt(2 - 4 / SQRT5), rel=1e-12)
    with pytest.raises(ValueError, match="W Mbar\\^T vanishes"):
        self_duality_product(_t([[0, 1], [0, 2]]), MEANS)


def test_class_numerical_rank_bounds_and_errors():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(40) % 4
    features = torch.randn(40, 6, generator=g, dtype=F64)
    expected = []
    for k in range(4):
        s = np.linalg.svd(features[labels == k].numpy(), compute_uv=False)
        expected.append(s.sum() ** 2 / (s**2).sum())
    assert float(class_numerical_rank(features, labels, 4)) == pytest.approx(np.mean(expected))
    collapsed = torch.randn(4, 6, generator=g, dtype=F64)[labels] * 7.0
    assert float(class_numerical_rank(collapsed, labels, 4)) == pytest.approx(1, rel=1e-12)
    features[labels == 2] = 0
    with pytest.raises(ValueError, match="class 2 has only zero features"):
        class_numerical_rank(features, labels, 4)
    with pytest.raises(ValueError, match=r"classes \[4\] have no samples"):
        class_numerical_rank(features, labels, 5)


def test_unknown_global_mean_of_is_named():
    for call in (
        lambda: class_means(X1, Y, 2, global_mean_of="weighted"),
        lambda: nc1(X1, Y, 2, global_mean_of="weighted"),
        lambda: variability_collapse_index(X1, Y, 2, global_mean_of="weighted"),
        lambda: collapse_metrics([(X2, X2, Y)], W_SIGN, None, 2, global_mean_of="weighted"),
    ):
        with pytest.raises(ValueError, match="unknown global_mean_of 'weighted'"):
            call()


# collapse_metrics on the imbalanced case with W = W_SIGN and b = (0, 1/2): logits
# (-h, h + 1/2) predict (0, 0, 1, 1) for h = (-2, -1, 0, 2), the nearest class means (0, 0, 0, 1).
HAND_STREAMED = {
    "samples": {
        "accuracy": 3 / 4,
        "ncc_mismatch": 1 / 4,
        "nc1": 4 / 45,
        "vci": 8 / 53,
        "class_numerical_rank": 1.0,  # every class lies on the line R e_1
        "nc2_means": math.sqrt(0.4),
        "nc2_classifier": 0.0,
        "nc3": 2 - 4 / SQRT5,
        "nc3_product": math.sqrt(2 - 4 / SQRT5),
        "bias_collapse": SQRT2 / 4,  # ||W mu_G + b|| = ||(1/4, -1/4) + (0, 1/2)||
        "equinorm_means": 0.5,  # norms 3/4, 9/4
        "equinorm_classifier": 0.0,
        "cosine_margin": 1.0,  # h - mu_G = (-7/4, -3/4, 1/4, 9/4): margins (2, 2, -2, 2)
        "nearest_etf_distance": math.sqrt(2 - 4 / SQRT5),
        "effective_rank": 1.0,
    },
    "classes": {
        "accuracy": 3 / 4,
        "ncc_mismatch": 1 / 4,
        "nc1": 1 / 9,
        "vci": 2 / 11,
        "class_numerical_rank": 1.0,
        "nc2_means": 0.0,
        "nc2_classifier": 0.0,
        "nc3": 0.0,
        "nc3_product": 0.0,
        "bias_collapse": SQRT5 / 2,  # ||(-1/2, 1/2) + (0, 1/2)||
        "equinorm_means": 0.0,
        "equinorm_classifier": 0.0,
        "cosine_margin": 2.0,  # h - mu_G = (-5/2, -3/2, -1/2, 3/2): every margin 2
        "nearest_etf_distance": 0.0,
        "effective_rank": 1.0,
    },
}


@pytest.mark.parametrize("global_mean_of", sorted(HAND_STREAMED))
def test_collapse_metrics_hand_values(global_mean_of: str):
    bias = _t([0.0, 0.5])
    logits = X2 @ W_SIGN.T + bias
    batches = [(X2[:3], logits[:3], Y[:3]), (X2[3:], logits[3:], Y[3:])]
    out = collapse_metrics(batches, W_SIGN, bias, 2, global_mean_of=global_mean_of)
    expected = HAND_STREAMED[global_mean_of]
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    skipped = collapse_metrics(batches, W_SIGN, bias, 2, class_rank=False)
    assert "class_numerical_rank" not in skipped
