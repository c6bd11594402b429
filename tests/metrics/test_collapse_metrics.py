import math

import numpy as np
import pytest
import torch

from nearest_etf.etf import etf_classifier, random_stiefel
from nearest_etf.metrics.collapse import (
    CollapseStatistics,
    bias_collapse,
    class_means,
    class_numerical_rank,
    classifier_etf_distance,
    collapse_metrics,
    cosine_margin,
    effective_rank,
    equinorm,
    etf_distance,
    nc1,
    ncc_accuracy,
    ncc_mismatch,
    nearest_etf_distance,
    self_duality,
    self_duality_product,
    variability_collapse_index,
)

F64 = torch.float64


def _etf_rows(d: int, K: int, seed: int = 0) -> torch.Tensor:
    """(U M_K)^T for a Haar U: the rows of an exact simplex ETF, [K, d]."""
    g = torch.Generator().manual_seed(seed)
    return etf_classifier(random_stiefel(d, K, generator=g, dtype=F64))


def _features(N: int = 90, d: int = 8, K: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % K
    centres = 3 * torch.randn(K, d, generator=g, dtype=F64)
    return centres[labels] + torch.randn(N, d, generator=g, dtype=F64), labels


def test_exact_etf_scores_zero_on_every_etf_metric():
    K, d = 6, 9
    mu_g = torch.linspace(-1, 1, d, dtype=F64)
    W = _etf_rows(d, K).to(F64)
    means = 2.5 * W + mu_g  # centred means are a scaled copy of W
    assert float(classifier_etf_distance(W)) == pytest.approx(0, abs=1e-12)
    assert float(etf_distance(means, mu_g)) == pytest.approx(0, abs=1e-12)
    assert float(nearest_etf_distance(means, mu_g)) == pytest.approx(0, abs=1e-6)
    assert float(self_duality(W, means, mu_g)) == pytest.approx(0, abs=1e-12)
    assert float(bias_collapse(W, -W @ mu_g, mu_g)) == pytest.approx(0, abs=1e-12)
    assert float(equinorm(W)) == pytest.approx(0, abs=1e-12)
    assert float(equinorm(means - mu_g)) == pytest.approx(0, abs=1e-12)


def test_hand_computed_values():
    # NC3 of W against -W (perfectly anti-dual) is ||2 W/||W|| ||^2 = 4.
    W = _etf_rows(5, 3).to(F64)
    assert float(self_duality(W, -W)) == pytest.approx(4.0, rel=1e-12)
    # ||W mu + b|| with W = I, mu = (1, 2), b = (-1, 0) is ||(0, 2)|| = 2.
    eye = torch.eye(2, dtype=F64)
    mu = torch.tensor([1.0, 2.0], dtype=F64)
    assert float(bias_collapse(eye, torch.tensor([-1.0, 0.0], dtype=F64), mu)) == 2.0
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_collapse(eye, torch.zeros(3, dtype=F64), mu)
    with pytest.raises(ValueError, match="3 rows but there are 4 classes"):
        self_duality(W, torch.zeros(4, 5, dtype=F64))
    assert float(bias_collapse(eye, None, mu)) == pytest.approx(math.sqrt(5))
    # row norms 1 and 3: std 1, mean 2.
    rows = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64)
    assert float(equinorm(rows)) == pytest.approx(0.5)
    # NCC: centres 0 and 10 on a line; nearest centres (0, 1, 1) vs predictions (0, 0, 1).
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64)
    features = torch.tensor([[1.0, 0.0], [9.0, 0.0], [6.0, 0.0]], dtype=F64)
    assert ncc_mismatch(features, torch.tensor([0, 0, 1]), means) == pytest.approx(1 / 3)
    # h = (2, 1), W = I: cos with w_0 is 2/sqrt(5), with w_1 is 1/sqrt(5).
    h = torch.tensor([[2.0, 1.0]], dtype=F64)
    margin0 = cosine_margin(h, torch.tensor([0]), eye)
    margin1 = cosine_margin(h, torch.tensor([1]), eye)
    assert float(margin0) == pytest.approx(1 / math.sqrt(5))
    assert float(margin1) == pytest.approx(-1 / math.sqrt(5))
    # a centring c = (1, 1) moves h to (1, 0): margin cos 1 - cos 90 = 1.
    assert float(cosine_margin(h, torch.tensor([0]), eye, torch.ones(2, dtype=F64))) == 1.0


def test_random_matrices_match_numpy_formulas():
    g = np.random.default_rng(1)
    K, d = 4, 7
    W = g.standard_normal((K, d))
    means = g.standard_normal((K, d))
    mu = means.mean(axis=0)
    Wt, Mt = torch.from_numpy(W), torch.from_numpy(means)
    gram = W @ W.T
    M = math.sqrt(K / (K - 1)) * (np.eye(K) - 1 / K)
    expected_nc2 = np.linalg.norm(gram / np.linalg.norm(gram) - M / np.linalg.norm(M))
    assert float(classifier_etf_distance(Wt)) == pytest.approx(expected_nc2, rel=1e-12)
    c = means - mu
    expected_nc3 = np.sum((W / np.linalg.norm(W) - c / np.linalg.norm(c)) ** 2)
    assert float(self_duality(Wt, Mt)) == pytest.approx(expected_nc3, rel=1e-12)
    norms = np.linalg.norm(W, axis=1)
    assert float(equinorm(Wt)) == pytest.approx(norms.std() / norms.mean(), rel=1e-12)


def test_nearest_etf_distance_matches_nuclear_norm_closed_form():
    # min_U ||Hn - U C/sqrt(K-1)||^2 = ||Hn||^2 + 1 - (2/sqrt(K-1)) ||Hn C||_* (Procrustes).
    g = np.random.default_rng(2)
    K, d = 5, 8
    means = g.standard_normal((K, d))
    H = (means - means.mean(axis=0)).T
    Hn = H / np.linalg.norm(H)
    C = np.eye(K) - 1 / K
    nuclear = np.linalg.svd(Hn @ C, compute_uv=False).sum()
    expected = math.sqrt(2 - 2 / math.sqrt(K - 1) * nuclear)
    assert float(nearest_etf_distance(torch.from_numpy(means))) == pytest.approx(expected, 1e-9)


def test_ncc_mismatch_and_margin_match_brute_force_loops():
    features, labels = _features(seed=4)
    means, mu = class_means(features, labels, 5)
    W = torch.randn(5, 8, dtype=F64)
    preds = (features @ W.T).argmax(1)
    X, M = features.numpy(), means.numpy()
    ncc = [int(np.argmin([np.linalg.norm(x - m) for m in M])) for x in X]
    expected = np.mean([p != q for p, q in zip(preds.tolist(), ncc, strict=True)])
    assert ncc_mismatch(features, preds, means) == pytest.approx(expected)
    margins = []
    for x, y in zip(X - mu.numpy(), labels.tolist(), strict=True):
        cos = [float(w @ x / np.linalg.norm(w) / np.linalg.norm(x)) for w in W.numpy()]
        margins.append(cos[y] - max(c for k, c in enumerate(cos) if k != y))
    assert float(cosine_margin(features, labels, W, mu)) == pytest.approx(np.mean(margins))


def test_streaming_metrics_equal_in_memory_metrics():
    features, labels = _features(N=120, seed=5)
    K = 5
    W, b = torch.randn(K, 8, dtype=F64), torch.randn(K, dtype=F64)
    logits = features @ W.T + b
    batches = [
        (features[i : i + 17].float(), logits[i : i + 17], labels[i : i + 17])
        for i in range(0, 120, 17)
    ]
    out = collapse_metrics(batches, W, b, K)
    features32 = features.float().double()  # what the streaming pass saw
    means, mu = class_means(features32, labels, K)
    assert out["nc1"] == pytest.approx(float(nc1(features32, labels, K)), rel=1e-9)
    assert out["nc2_means"] == pytest.approx(float(etf_distance(means, mu)), rel=1e-9)
    assert out["nc2_classifier"] == pytest.approx(float(classifier_etf_distance(W)), rel=1e-12)
    assert out["nc3"] == pytest.approx(float(self_duality(W, means, mu)), rel=1e-9)
    assert out["bias_collapse"] == pytest.approx(float(bias_collapse(W, b, mu)), rel=1e-9)
    preds = logits.argmax(1)
    assert out["ncc_mismatch"] == pytest.approx(ncc_mismatch(features32, preds, means))
    assert out["cosine_margin"] == pytest.approx(float(cosine_margin(features32, labels, W, mu)))
    assert out["accuracy"] == pytest.approx(float((preds == labels).double().mean()))
    assert out["equinorm_means"] == pytest.approx(float(equinorm(means - mu)), rel=1e-9)
    assert out["nearest_etf_distance"] == pytest.approx(
        float(nearest_etf_distance(means, mu)), rel=1e-6
    )
    assert out["equinorm_classifier"] == pytest.approx(float(equinorm(W)), rel=1e-12)
    assert out["effective_rank"] == pytest.approx(effective_rank(means - mu), rel=1e-9)
    vci = variability_collapse_index(features32, labels, K)
    assert out["vci"] == pytest.approx(float(vci), rel=1e-9)
    rank = class_numerical_rank(features32, labels, K)
    assert out["class_numerical_rank"] == pytest.approx(float(rank), rel=1e-9)
    assert out["nc3_product"] == pytest.approx(float(self_duality_product(W, means, mu)), 1e-9)
    assert "loss" not in out
    with_loss = collapse_metrics(batches, W, b, K, loss_fn=torch.nn.functional.cross_entropy)
    expected = float(torch.nn.functional.cross_entropy(logits, labels))
    assert with_loss["loss"] == pytest.approx(expected, rel=1e-12)


def test_streaming_metrics_with_the_mean_of_class_means_on_imbalanced_classes():
    g = torch.Generator().manual_seed(6)
    K, d = 4, 6
    labels = torch.arange(K).repeat_interleave(torch.tensor([5, 40, 12, 23]))
    features = 3 * torch.randn(K, d, generator=g, dtype=F64)[labels]
    features = features + torch.randn(len(labels), d, generator=g, dtype=F64)
    W = torch.randn(K, d, generator=g, dtype=F64)
    logits = features @ W.T
    batches = [
        (features[i : i + 16], logits[i : i + 16], labels[i : i + 16]) for i in range(0, 80, 16)
    ]
    out = collapse_metrics(batches, W, None, K, global_mean_of="classes")
    means, mu = class_means(features, labels, K, global_mean_of="classes")
    assert float(mu.sub(means.mean(0)).abs().max()) < 1e-14
    nc1_classes = nc1(features, labels, K, global_mean_of="classes")
    assert out["nc1"] == pytest.approx(float(nc1_classes), rel=1e-9)
    assert out["nc1"] != pytest.approx(float(nc1(features, labels, K)), rel=1e-3)
    vci = variability_collapse_index(features, labels, K, global_mean_of="classes")
    assert out["vci"] == pytest.approx(float(vci), rel=1e-9)
    assert out["nc2_means"] == pytest.approx(float(etf_distance(means)), rel=1e-9)
    assert out["nc3"] == pytest.approx(float(self_duality(W, means)), rel=1e-9)
    assert out["equinorm_means"] == pytest.approx(float(equinorm(means - mu)), rel=1e-9)
    assert out["cosine_margin"] == pytest.approx(float(cosine_margin(features, labels, W, mu)))


def test_streaming_covariance_is_exact_for_collapsed_classes():
    # every sample sits on its class mean: Sigma_W = 0 exactly (up to rounding), NC1 = 0.
    K, d = 3, 4
    means = torch.randn(K, d, dtype=F64) + 100.0  # far from 0: tests the shifted accumulation
    labels = torch.arange(30) % K
    stats = CollapseStatistics(d, K)
    for chunk in torch.arange(30).split(7):
        stats.update(means[labels[chunk]], labels[chunk])
    sigma_w, _ = stats.covariances()
    assert float(sigma_w.abs().max()) < 1e-10


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="weight"):
        classifier_etf_distance(torch.ones(1, 3))
    with pytest.raises(ValueError, match="width"):
        self_duality(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="no batches"):
        collapse_metrics([], torch.randn(3, 4), None, 3)
    stats = CollapseStatistics(4, 3)
    with pytest.raises(ValueError, match=r"labels must lie"):
        stats.update(torch.randn(2, 4), torch.tensor([0, 3]))
    stats.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        stats.means()


def test_streaming_statistics_refuse_underflowing_features():
    # squares of deviations below ~1e-150 lose precision in float64: refused, not misreported
    stats = CollapseStatistics(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="underflow float64"):
        stats.update(torch.randn(4, 4, dtype=F64) * 1e-160, labels)
    assert stats.shift is None and float(stats.counts.sum()) == 0  # unchanged
    stats.update(torch.randn(4, 4, dtype=F64) * 1e-140, labels)  # still exact enough: accepted


def test_empty_batches_and_mixed_dtypes():
    # an empty batch adds nothing in either pass; an empty feature set is refused by name;
    # float32 and float64 inputs are computed in the wider dtype, by every metric alike
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(12) % 3
    H = torch.randn(12, 5, generator=g, dtype=F64) + 3 * torch.eye(3, 5, dtype=F64)[labels]
    W = torch.randn(3, 5, generator=g, dtype=F64)
    Z = H @ W.T
    full = collapse_metrics([(H, Z, labels)], W, None, 3)
    padded = collapse_metrics([(H, Z, labels), (H[:0], Z[:0], labels[:0])], W, None, 3)
    assert full == padded
    with pytest.raises(ValueError, match="at least one sample"):
        ncc_accuracy(H[:0], labels[:0], 3, class_means(H, labels, 3)[0])
    with pytest.raises(ValueError, match="at least one sample"):
        cosine_margin(H[:0], labels[:0], W)
    means, mu = class_means(H, labels, 3)
    assert ncc_accuracy(H.float(), labels, 3, means) == ncc_accuracy(H, labels, 3, means)
    torch.testing.assert_close(
        bias_collapse(W, None, mu.float()), bias_collapse(W, None, mu), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        cosine_margin(H.float(), labels, W), cosine_margin(H, labels, W), rtol=1e-6, atol=0
    )
