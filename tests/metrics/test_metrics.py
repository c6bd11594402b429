import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from nearest_etf.etf import random_stiefel, simplex_etf
from nearest_etf.metrics.collapse import (
    class_means,
    effective_rank,
    etf_distance,
    nc1,
    numerical_rank,
    orthogonal_frame_distance,
    rank_of_singular_values,
    singular_values,
    variability_collapse_index,
)

F64 = torch.float64


def _random_features(N: int = 60, d: int = 7, K: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % K
    features = torch.randn(N, d, generator=g, dtype=F64) + 3 * torch.randn(K, d, dtype=F64)[labels]
    return features, labels


def test_class_means_match_numpy_loop():
    features, labels = _random_features()
    means, global_mean = class_means(features, labels, 4)
    X, y = features.numpy(), labels.numpy()
    expected = np.stack([X[y == k].mean(axis=0) for k in range(4)])
    np.testing.assert_allclose(means.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(global_mean.numpy(), X.mean(axis=0), rtol=1e-12)


def test_nc1_matches_numpy_pinv_formula():
    features, labels = _random_features(seed=3)
    X, y = features.numpy(), labels.numpy()
    K = 4
    mu = np.stack([X[y == k].mean(axis=0) for k in range(K)])
    mu_g = X.mean(axis=0)
    sigma_w = sum(np.outer(x - mu[c], x - mu[c]) for x, c in zip(X, y, strict=True)) / len(X)
    sigma_b = sum(np.outer(m - mu_g, m - mu_g) for m in mu) / K
    expected = np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / K
    assert float(nc1(features, labels, K)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("global_mean_of", ["samples", "classes"])
def test_nc1_and_vci_match_numpy_on_imbalanced_classes(global_mean_of: str):
    # The reference code's formulas (dense d x d matrices, scipy pinv, VCI normalised by
    # min(d, K - 1)) on classes of 3 to 30 samples.
    g = np.random.default_rng(4)
    K, d = 4, 7
    y = np.repeat(np.arange(K), [3, 10, 30, 17])
    X = g.standard_normal((len(y), d)) + 3 * g.standard_normal((K, d))[y]
    mu = np.stack([X[y == k].mean(axis=0) for k in range(K)])
    mu_g = X.mean(axis=0) if global_mean_of == "samples" else mu.mean(axis=0)
    sigma_w = (X - mu[y]).T @ (X - mu[y]) / len(X)
    sigma_b = (mu - mu_g).T @ (mu - mu_g) / K
    expected_nc1 = np.trace(sigma_w @ scipy.linalg.pinv(sigma_b)) / K
    ratio = np.trace(scipy.linalg.pinv(sigma_w + sigma_b) @ sigma_b) / min(d, K - 1)
    features, labels = torch.from_numpy(X), torch.from_numpy(y)
    value = nc1(features, labels, K, global_mean_of=global_mean_of)
    assert float(value) == pytest.approx(expected_nc1, rel=1e-9)
    vci = variability_collapse_index(features, labels, K, global_mean_of=global_mean_of)
    assert float(vci) == pytest.approx(1 - ratio, rel=1e-9)
    means, global_mean = class_means(features, labels, K, global_mean_of=global_mean_of)
    np.testing.assert_allclose(means.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(global_mean.numpy(), mu_g, rtol=1e-12)


def test_nc1_hand_computed_and_collapsed():
    # d = 1, classes at -1 and +1 with spread a: Sigma_B = 1, Sigma_W = a^2, NC1 = a^2 / 2.
    a = 0.3
    features = torch.tensor([[-1 - a], [-1 + a], [1 - a], [1 + a]], dtype=F64)
    labels = torch.tensor([0, 0, 1, 1])
    assert float(nc1(features, labels, 2)) == pytest.approx(a**2 / 2, rel=1e-12)
    collapsed = torch.tensor([[-1.0], [-1.0], [1.0], [1.0]], dtype=F64)
    assert float(nc1(collapsed, labels, 2)) == 0.0


def test_etf_distance_zero_for_rotated_scaled_shifted_etf():
    K, d = 5, 9
    U = random_stiefel(d, K, generator=torch.Generator().manual_seed(1), dtype=F64)
    means = 3.7 * (U @ simplex_etf(K, dtype=F64)).T + torch.linspace(-1, 1, d, dtype=F64)
    assert float(etf_distance(means)) < 1e-12


def test_orthogonal_frame_centres_to_an_etf():
    # Centring an orthogonal frame gives C, whose normalised Gram is M_K / ||M_K||.
    means = 2.0 * torch.eye(6, dtype=F64)
    assert float(orthogonal_frame_distance(means)) < 1e-12
    assert float(etf_distance(means)) < 1e-12


def test_orthogonal_frame_distance_of_etf_hand_value():
    # K = 2: normalised Gram of the ETF is C = [[.5, -.5], [-.5, .5]];
    # ||C - I/sqrt(2)||^2 = 2 (1/2 - 1/sqrt(2))^2 + 2/4 = 2 - sqrt(2).
    means = simplex_etf(2, dtype=F64)
    assert float(orthogonal_frame_distance(means)) == pytest.approx(math.sqrt(2 - math.sqrt(2)))


def test_etf_distance_positive_for_non_etf():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    assert float(etf_distance(means)) > 0.1


def test_spectral_metrics_match_numpy_scipy():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(8, 5, generator=g, dtype=F64) @ torch.diag(
        torch.tensor([10.0, 3.0, 1.0, 1e-2, 1e-6], dtype=F64)
    )
    A = A @ torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))[0]
    s = singular_values(A)
    np.testing.assert_allclose(s.numpy(), scipy.linalg.svdvals(A.numpy()), rtol=1e-9, atol=1e-13)
    for rtol in (1e-8, 1e-4, 1e-2, 0.5):
        expected = np.linalg.matrix_rank(A.numpy(), tol=rtol * float(s[0]))
        assert numerical_rank(A, rtol) == expected
        assert rank_of_singular_values(s, rtol) == expected
    p = s.numpy() / s.numpy().sum()
    assert effective_rank(A) == pytest.approx(math.exp(scipy.stats.entropy(p)), rel=1e-12)


def test_effective_rank_of_identity_and_rank_one():
    assert effective_rank(torch.eye(7, dtype=F64)) == pytest.approx(7.0)
    assert effective_rank(torch.ones(4, 3, dtype=F64)) == pytest.approx(1.0)
    assert numerical_rank(torch.zeros(3, 3)) == 0
    assert rank_of_singular_values(torch.zeros(0)) == 0


def test_bad_inputs_raise():
    features, labels = _random_features()
    with pytest.raises(ValueError, match="labels must lie"):
        class_means(features, labels, 3)
    with pytest.raises(TypeError, match="integer"):
        class_means(features, labels.to(F64), 4)
    with pytest.raises(ValueError, match="no samples"):
        class_means(features, labels, 5)
    with pytest.raises(ValueError, match="shape"):
        class_means(features[0], labels, 4)
    with pytest.raises(ValueError, match="rtol"):
        numerical_rank(features, 0.0)
    with pytest.raises(ValueError, match="coincide"):
        etf_distance(torch.ones(3, 4))
    with pytest.raises(ValueError, match="matrix"):
        singular_values(torch.ones(3))


def test_distances_do_not_underflow_for_tiny_means():
    means = 1e-200 * simplex_etf(4, dtype=F64)
    assert float(etf_distance(means)) < 1e-12
    assert float(orthogonal_frame_distance(1e-200 * torch.eye(3, dtype=F64))) < 1e-12
