import copy

import numpy as np
import pytest
import torch

from nearest_etf.nn.class_means import ClassMeanTracker, class_sums

F64 = torch.float64


def _stream(K: int = 4, d: int = 3, steps: int = 6, seed: int = 0):
    """Batches of varying size; class 3 is absent from the first three batches, class 0 from
    batch 4."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for t in range(steps):
        classes = [k for k in range(K) if not (k == 3 and t < 3) and not (k == 0 and t == 4)]
        labels = torch.tensor(classes * (2 + t % 3))
        features = torch.randn(len(labels), d, generator=g, dtype=F64) + labels.unsqueeze(1)
        batches.append((features, labels))
    return batches


def _batch_centred_means(X: np.ndarray, y: np.ndarray, K: int) -> dict[int, np.ndarray]:
    """{k: mu_k - mu_G} for the classes present in the batch."""
    mu_g = X.mean(axis=0)
    return {k: X[y == k].mean(axis=0) - mu_g for k in range(K) if (y == k).any()}


def _oracle(batches, K: int, d: int, rule: str, min_alpha: float = 1e-4) -> np.ndarray:
    """The module docstring's update with a loop over classes, in numpy."""
    H = np.zeros((K, d))
    t = np.zeros(K, dtype=int)
    for features, labels in batches:
        for k, D_k in _batch_centred_means(features.numpy(), labels.numpy(), K).items():
            t[k] += 1
            alpha = {"ema": max(2 / (t[k] + 1), min_alpha), "cma": 1 / t[k], "none": 1.0}[rule]
            H[k] = alpha * D_k + (1 - alpha) * H[k]
    return H


@pytest.mark.parametrize("rule", ["ema", "cma", "none"])
def test_tracker_matches_loop_oracle(rule):
    batches = _stream()
    tracker = ClassMeanTracker(3, 4, average=rule).to(F64)
    for features, labels in batches:
        out = tracker(features, labels)
    expected = _oracle(batches, 4, 3, rule)
    np.testing.assert_allclose(tracker.means.numpy(), expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.detach().numpy(), expected / np.linalg.norm(expected), 1e-12)
    assert tracker.appearances.tolist() == [5, 6, 6, 3]


def test_cma_is_mean_of_per_batch_centred_means_and_none_is_last_seen():
    batches = _stream(steps=5)
    cma = ClassMeanTracker(3, 4, average="cma").to(F64)
    none = ClassMeanTracker(3, 4, average="none").to(F64)
    for features, labels in batches:
        cma(features, labels)
        none(features, labels)
    units = [_batch_centred_means(f.numpy(), y.numpy(), 4) for f, y in batches]
    class3 = [u[3] for u in units if 3 in u]  # class 3 appears in the last two batches
    np.testing.assert_allclose(cma.means[3].numpy(), np.mean(class3, axis=0), rtol=1e-12)
    np.testing.assert_allclose(none.means[1].numpy(), units[-1][1], rtol=1e-12)
    # class 0 is absent from batch 4: keeps its batch-3 value
    np.testing.assert_allclose(none.means[0].numpy(), units[3][0], rtol=1e-12)


def test_min_alpha_floor():
    batches = _stream(steps=6)
    tracker = ClassMeanTracker(3, 4, average="ema", min_alpha=0.45).to(F64)
    for features, labels in batches:
        tracker(features, labels)
    expected = _oracle(batches, 4, 3, "ema", min_alpha=0.45)
    np.testing.assert_allclose(tracker.means.numpy(), expected, rtol=1e-12)


def test_never_seen_class_is_zero_and_gradient_reaches_only_current_batch():
    tracker = ClassMeanTracker(3, 4).to(F64)
    batches = _stream()
    tracker(*batches[0])
    assert tracker.means[3].abs().max() == 0  # its mean is taken to be mu_G
    assert not tracker.means.requires_grad
    features, labels = batches[1]

    def fn(x):
        return copy.deepcopy(tracker).compute(x, labels).normalised

    assert torch.autograd.gradcheck(fn, (features.clone().requires_grad_(True),))


def test_class_sums_match_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 5, generator=g, dtype=F64)
    y = torch.randint(0, 4, (20,), generator=g)
    sums, counts = class_sums(x, y, 6)
    for k in range(6):
        torch.testing.assert_close(sums[k], x[y == k].sum(0))
        assert counts[k] == (y == k).sum()
    assert sums[4:].abs().max() == 0


def test_state_dict_round_trip_continues_identically():
    batches = _stream()
    a = ClassMeanTracker(3, 4).to(F64)
    for features, labels in batches[:3]:
        a(features, labels)
    b = ClassMeanTracker(3, 4).to(F64)
    b.load_state_dict(a.state_dict())
    for features, labels in batches[3:]:
        assert torch.equal(a(features, labels), b(features, labels))
    assert set(a.state_dict()) == {"means", "appearances", "global_mean"}


def test_errors_leave_state_unchanged():
    tracker = ClassMeanTracker(3, 4).to(F64)
    tracker(*_stream()[0])
    before = copy.deepcopy(tracker.state_dict())
    with pytest.raises(ValueError, match="coincide"):
        fresh = ClassMeanTracker(3, 4).to(F64)
        fresh(torch.ones(4, 3, dtype=F64), torch.tensor([0, 1, 2, 3]))
    assert fresh.appearances.sum() == 0
    bad = [
        (torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 2, 4]), ValueError, r"\[0, 4\)"),
        (torch.randn(4, 2, dtype=F64), torch.tensor([0, 1, 2, 3]), ValueError, "width 2"),
        (torch.full((4, 3), float("nan"), dtype=F64), torch.arange(4), ValueError, "non-finite"),
        (torch.randn(4, 3, dtype=F64), torch.arange(4.0), TypeError, "integer"),
        (torch.randn(4, 3, dtype=F64), None, ValueError, "labels"),
    ]
    for features, labels, error, message in bad:
        with pytest.raises(error, match=message):
            tracker(features, labels)
    for key, value in tracker.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="average"):
        ClassMeanTracker(3, 4, average="median")
