"""Neural-collapse and spectral metrics on plain tensors (the project's one metrics module).

Conventions: features are row-major, ``features[N, d]`` with integer ``labels[N]`` in
``{0, ..., K-1}``; class means are returned as rows, ``means[K, d]`` (row k = mean of class k).
A column-major feature matrix H[d, N] (as in the DUFM) is passed as ``H.T``.

Formulas (docs/math.md §4):

- NC1 = tr(Sigma_W Sigma_B^+) / K, Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
  Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T.
- Distance to a simplex ETF of the centred means Mbar (rows mu_k - mu_G), via the Gram matrix
  so that it is rotation invariant: || G / ||G|| - M_K / ||M_K|| ||_F with G = Mbar Mbar^T.
  Because M_K^T M_K = sqrt(K/(K-1)) M_K, the normalised Gram of any simplex ETF U M_K is exactly
  M_K / ||M_K|| = C / sqrt(K-1); the distance is 0 iff the centred means are a scaled simplex ETF.
- Distance to an orthogonal frame of the uncentred means M (rows mu_k):
  || M M^T / ||M M^T|| - I_K / sqrt(K) ||_F; 0 iff the means are orthogonal with equal norms.
- Numerical rank at relative tolerance rtol: #{i : s_i > rtol * s_max}.
- Effective rank (Roy & Vetterli 2007): exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j.
- Classifier W[K, d] (rows w_k), bias b[K]: NC2 of W, || W W^T/||W W^T|| - M_K/||M_K|| ||_F;
  NC3 (self-duality) || W/||W|| - Mbar/||Mbar|| ||_F^2; bias collapse ||W mu_G + b||;
  equinorm std_k ||r_k|| / mean_k ||r_k||; NCC mismatch (NC4) = percent of samples whose
  prediction differs from argmin_k ||h - mu_k||; cosine margin cos(w_y, h - mu_G) -
  max_{k != y} cos(w_k, h - mu_G); nearest-ETF distance ||Hn - U* M_K/sqrt(K)||_F (docs/math.md §2).
  `collapse_metrics` streams all of them over a data loader (`CollapseStatistics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from nearest_etf.etf import simplex_etf
from nearest_etf.nearest import nearest_etf, nearest_etf_objective
from nearest_etf.nn.class_means import check_labels, class_sums

__all__ = [
    "CollapseStatistics",
    "bias_collapse",
    "class_means",
    "classifier_etf_distance",
    "collapse_metrics",
    "cosine_margin",
    "effective_rank",
    "equinorm",
    "etf_distance",
    "nc1",
    "ncc_accuracy",
    "ncc_mismatch",
    "nearest_etf_distance",
    "numerical_rank",
    "orthogonal_frame_distance",
    "rank_of_singular_values",
    "self_duality",
    "singular_values",
]


def _check_features(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, d], got {tuple(features.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    check_labels(labels, features.shape[0], num_classes, name="labels")


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means and global mean of ``features[N, d]``.

    Returns ``(means[K, d], global_mean[d])`` with means[k] = mean of the rows of class k
    (every class must occur) and global_mean = mean of all N rows.
    """
    _check_features(features, labels, num_classes)
    sums, counts = class_sums(features, labels, num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no samples")
    return sums / counts.unsqueeze(1), features.mean(dim=0)


def nc1(features: Tensor, labels: Tensor, num_classes: int, rtol: float | None = None) -> Tensor:
    """NC1 = tr(Sigma_W Sigma_B^+) / K (scalar tensor; 0 for perfectly collapsed features).

    ``rtol`` is the pseudo-inverse cut-off relative to the largest eigenvalue of Sigma_B
    (None: torch's default, eps * d). Computed in the span of the class means, without d x d
    matrices (`_between_whitening`): tr(Sigma_W Sigma_B^+) / K = (1/N) ||(H - M_y) P||_F^2.
    """
    means, global_mean = class_means(features, labels, num_classes)
    within = (features - means[labels]) @ _between_whitening(means - global_mean, rtol)
    return within.square().sum() / features.shape[0]


def _between_whitening(centred_means: Tensor, rtol: float | None) -> Tensor:
    """P = Q_r S_r^{-1} [d, r] from the thin SVD centred_means[K, d] = L S Q^T over the kept
    directions s_i^2 > rtol s_1^2 (rtol None: eps * d, torch.linalg.pinv's default on
    Sigma_B). With Sigma_B = B^T B / K for B = centred_means, Sigma_B^+ = K P P^T, so
    tr(Sigma_W Sigma_B^+) / K = tr(P^T Sigma_W P)."""
    _, s, Qt = torch.linalg.svd(centred_means, full_matrices=False)
    cutoff = torch.finfo(s.dtype).eps * centred_means.shape[1] if rtol is None else rtol
    keep = s.square() > cutoff * s[0].square()
    return Qt[keep].mT / s[keep]


def singular_values(M: Tensor) -> Tensor:
    """Singular values of a matrix M[m, n], in decreasing order (length min(m, n))."""
    if M.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(M.shape)}")
    return torch.linalg.svdvals(M)


def numerical_rank(M: Tensor, rtol: float = 1e-3) -> int:
    """#{i : s_i > rtol * s_max} for the singular values s of M[m, n] (0 for M = 0)."""
    return rank_of_singular_values(singular_values(M), rtol)


def rank_of_singular_values(s: Tensor, rtol: float = 1e-3) -> int:
    """#{i : s_i > rtol * s_max} for singular values s[r] in decreasing order (0 if all zero)."""
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > rtol * s[0]).sum())


def effective_rank(M: Tensor) -> float:
    """Roy & Vetterli entropy effective rank exp(H(p)), p = s / sum(s), of M[m, n]."""
    s = singular_values(M)
    total = s.sum()
    if float(total) == 0.0:
        raise ValueError("the effective rank of a zero matrix is undefined")
    p = s[s > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def _normalised_gram(means: Tensor) -> Tensor:
    if means.ndim != 2 or means.shape[0] < 2:
        raise ValueError(f"means must have shape [K, d] with K >= 2, got {tuple(means.shape)}")
    peak = means.abs().max()
    if float(peak) == 0.0:
        raise ValueError("all class means coincide (zero Gram matrix): distance undefined")
    scaled = means / peak  # the normalised Gram is scale invariant; this avoids underflow
    gram = scaled @ scaled.T
    return gram / torch.linalg.matrix_norm(gram)


def etf_distance(means: Tensor, global_mean: Tensor | None = None) -> Tensor:
    """|| G/||G|| - M_K/||M_K|| ||_F, G = Mbar Mbar^T, Mbar = means[K, d] - global_mean.

    ``global_mean`` defaults to the mean of the class means (the global mean for balanced
    classes). The result lies in [0, 2] and is invariant to rotations and scaling of the means.
    """
    centre = means.mean(dim=0) if global_mean is None else global_mean
    gram = _normalised_gram(means - centre)
    etf = simplex_etf(means.shape[0], dtype=means.dtype, device=means.device)
    return torch.linalg.matrix_norm(gram - etf / torch.linalg.matrix_norm(etf))


def orthogonal_frame_distance(means: Tensor) -> Tensor:
    """|| M M^T/||M M^T|| - I_K/sqrt(K) ||_F for the uncentred class means M = means[K, d]."""
    gram = _normalised_gram(means)
    K = means.shape[0]
    eye = torch.eye(K, dtype=means.dtype, device=means.device)
    return torch.linalg.matrix_norm(gram - eye / K**0.5)


# --- Classifier and collapse metrics (NC2 for W, NC3, bias collapse, NCC mismatch, margins),
# --- and their streaming evaluation over a data loader.


def _check_classifier(
    weight: Tensor, num_features: int | None = None, num_classes: int | None = None
) -> None:
    if weight.ndim != 2 or weight.shape[0] < 2:
        raise ValueError(f"weight must have shape [K, d] with K >= 2, got {tuple(weight.shape)}")
    if num_features is not None and weight.shape[1] != num_features:
        raise ValueError(
            f"weight has width {weight.shape[1]} but the features have width {num_features}"
        )
    if num_classes is not None and weight.shape[0] != num_classes:
        raise ValueError(f"weight has {weight.shape[0]} rows but there are {num_classes} classes")


def _centred(means: Tensor, global_mean: Tensor | None) -> Tensor:
    return means - (means.mean(dim=0) if global_mean is None else global_mean)


def classifier_etf_distance(weight: Tensor) -> Tensor:
    """NC2 of the classifier: || W W^T/||W W^T|| - M_K/||M_K|| ||_F for weight W[K, d]
    (uncentred rows; 0 iff W is a scaled simplex ETF)."""
    _check_classifier(weight)
    return etf_distance(weight, torch.zeros_like(weight[0]))


def self_duality(weight: Tensor, means: Tensor, global_mean: Tensor | None = None) -> Tensor:
    """NC3 = || W/||W|| - Mbar/||Mbar|| ||_F^2 with W[K, d] and the centred means
    Mbar = means[K, d] - global_mean (default: mean of the means); in [0, 4]."""
    _check_classifier(weight, means.shape[1], means.shape[0])
    centred = _centred(means, global_mean)
    return (
        (weight / torch.linalg.matrix_norm(weight) - centred / torch.linalg.matrix_norm(centred))
        .square()
        .sum()
    )


def bias_collapse(weight: Tensor, bias: Tensor | None, global_mean: Tensor) -> Tensor:
    """|| W mu_G + b ||_2 (0 when the bias cancels the global mean), W[K, d], b[K], mu_G[d]."""
    _check_classifier(weight, global_mean.shape[-1])
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    value = weight @ global_mean
    return torch.linalg.vector_norm(value if bias is None else value + bias)


def equinorm(rows: Tensor) -> Tensor:
    """std/mean of the row norms ||r_k|| of rows[K, d] (population std; 0 iff equal norms).
    Pass centred means (means - mu_G) or the classifier W."""
    norms = torch.linalg.vector_norm(rows, dim=1)
    return norms.std(correction=0) / norms.mean()


def _ncc_predictions(features: Tensor, means: Tensor) -> Tensor:
    """argmin_k ||h_i - mu_k||^2 = argmin_k (||mu_k||^2 - 2 <h_i, mu_k>), shape [N]."""
    return (means.square().sum(1) - 2 * features @ means.T).argmin(dim=1)


def ncc_mismatch(features: Tensor, predictions: Tensor, means: Tensor) -> float:
    """NC4: percent of samples whose predicted class (`predictions[N]`, e.g. argmax of the
    logits) differs from the nearest class centre argmin_k ||h_i - mu_k|| (means[K, d])."""
    if predictions.shape != features.shape[:1]:
        raise ValueError(f"predictions must have shape [{features.shape[0]}]")
    return 100.0 * float((_ncc_predictions(features, means) != predictions).double().mean())


def ncc_accuracy(
    features: Tensor, labels: Tensor, num_classes: int, means: Tensor | None = None
) -> float:
    """Nearest-class-centre accuracy, the fraction in [0, 1] of samples with
    argmin_k ||h_i - mu_k|| = y_i, for features[N, d], labels[N] and class means[K, d]
    (default: the class means of these features, `class_means`)."""
    if means is None:
        means, _ = class_means(features, labels, num_classes)  # checks features and labels
    else:
        _check_features(features, labels, num_classes)
        if means.shape != (num_classes, features.shape[1]):
            raise ValueError(
                f"means must have shape ({num_classes}, {features.shape[1]}), "
                f"got {tuple(means.shape)}"
            )
        if means.dtype != features.dtype:
            raise TypeError(f"means has dtype {means.dtype} but features have {features.dtype}")
    return float((_ncc_predictions(features, means) == labels).double().mean())


def _cosine_margins(
    features: Tensor, labels: Tensor, weight: Tensor, global_mean: Tensor | None
) -> Tensor:
    """cos(w_{y_i}, h_i - c) - max_{k != y_i} cos(w_k, h_i - c) per sample, c = global_mean
    (0 if None); shape [N]."""
    centred = features if global_mean is None else features - global_mean
    cos = (
        torch.nn.functional.normalize(centred, dim=1)
        @ torch.nn.functional.normalize(weight, dim=1).T
    )
    true = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = cos.scatter(1, labels.unsqueeze(1), float("-inf")).amax(dim=1)
    return true - others


def cosine_margin(
    features: Tensor, labels: Tensor, weight: Tensor, global_mean: Tensor | None = None
) -> Tensor:
    """Average cosine margin mean_i [cos(w_{y_i}, h_i - c) - max_{k != y_i} cos(w_k, h_i - c)]
    for features[N, d], labels[N], classifier rows weight[K, d], c = global_mean (0 if None);
    positive iff on average the true class's direction is the closest."""
    _check_features(features, labels, weight.shape[0])
    _check_classifier(weight, features.shape[1])
    return _cosine_margins(features, labels, weight, global_mean).mean()


def nearest_etf_distance(means: Tensor, global_mean: Tensor | None = None) -> Tensor:
    """|| Hn - U* M_K/sqrt(K) ||_F with Hn = Mbar^T/||Mbar|| (centred means as columns) and U*
    its nearest simplex ETF frame (`nearest_etf`, feasibility solve): the distance from the
    normalised centred means to the closest unit-norm simplex ETF, in [0, 2]. Needs d >= K."""
    H = _centred(means, global_mean).mT
    Hn = H / torch.linalg.matrix_norm(H)
    U = nearest_etf(Hn.detach())
    return nearest_etf_objective(Hn, U).clamp_min(0).sqrt()


class CollapseStatistics:
    """Streaming class statistics of a feature set, accumulated batch by batch in float64:
    counts n_k, sums sum_{y_i=k} h_i and the scatter sum_i (h_i - s)(h_i - s)^T about a shift s
    (the first batch's mean, against cancellation). Then mu_k, mu_G and

        Sigma_W = (1/N) [sum_i (h_i - s)(h_i - s)^T - sum_k n_k (mu_k - s)(mu_k - s)^T]
        Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T   (as `nc1`).
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.sums = torch.zeros(num_classes, num_features, dtype=torch.float64)
        self.scatter = torch.zeros(num_features, num_features, dtype=torch.float64)
        self.shift: Tensor | None = None

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch features[N, d], labels[N]."""
        _check_features(features, labels, self.num_classes)
        if features.shape[1] != self.num_features:
            raise ValueError(f"features must have width {self.num_features}")
        x = features.detach().to(device="cpu", dtype=torch.float64)
        y = labels.detach().cpu()
        if self.shift is None:
            self.shift = x.mean(dim=0)
        sums, counts = class_sums(x, y, self.num_classes)
        self.counts += counts
        self.sums += sums
        centred = x - self.shift
        self.scatter += centred.T @ centred

    def means(self) -> tuple[Tensor, Tensor]:
        """(means[K, d], global_mean[d]); every class must have been seen."""
        if bool((self.counts == 0).any()):
            missing = torch.nonzero(self.counts == 0).flatten().tolist()
            raise ValueError(f"classes {missing} have no samples")
        return self.sums / self.counts.unsqueeze(1), self.sums.sum(0) / self.counts.sum()

    def covariances(self) -> tuple[Tensor, Tensor]:
        """(Sigma_W[d, d], Sigma_B[d, d])."""
        means, global_mean = self.means()
        assert self.shift is not None
        centred_means = means - self.shift
        explained = centred_means.T @ (self.counts.unsqueeze(1) * centred_means)
        sigma_w = (self.scatter - explained) / self.counts.sum()
        between = means - global_mean
        return sigma_w, between.T @ between / self.num_classes


def collapse_metrics(
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    weight: Tensor,
    bias: Tensor | None,
    num_classes: int,
    rtol: float | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """All collapse metrics of a data set, streamed in two passes over `batches`.

    `batches` yields (features[N, d], logits[N, K], labels[N]) and must be re-iterable (a list,
    or an object whose __iter__ runs the model over a DataLoader); features are those the
    classifier (weight[K, d], bias[K] or None) acts on. Pass 1 accumulates `CollapseStatistics`;
    pass 2 the accuracy, NCC mismatch and cosine margins. Returns floats: accuracy (%), nc1,
    nc2_means (`etf_distance`), nc2_classifier, nc3, bias_collapse, ncc_mismatch (%),
    equinorm_means, equinorm_classifier, cosine_margin, nearest_etf_distance (NaN if d < K),
    effective_rank (of the centred means); with `loss_fn(logits, labels)` (mean-reduced) also
    loss, its mean over the samples.
    """
    stats: CollapseStatistics | None = None
    for features, _, labels in batches:
        if stats is None:
            stats = CollapseStatistics(features.shape[1], num_classes)
        stats.update(features, labels)
    if stats is None:
        raise ValueError("collapse_metrics got no batches")
    _check_classifier(weight, stats.num_features, num_classes)
    means, global_mean = stats.means()
    sigma_w, _ = stats.covariances()
    whitening = _between_whitening(means - global_mean, rtol)
    W = weight.detach().to(device="cpu", dtype=torch.float64)
    b = None if bias is None else bias.detach().to(device="cpu", dtype=torch.float64)
    correct = mismatched = margin = loss = 0.0
    for features, logits, labels in batches:
        if loss_fn is not None:
            loss += float(loss_fn(logits, labels.to(logits.device))) * len(labels)
        x = features.detach().to(device="cpu", dtype=torch.float64)
        y = labels.detach().cpu()
        predictions = logits.detach().argmax(dim=1).cpu()
        correct += float((predictions == y).sum())
        mismatched += float((_ncc_predictions(x, means) != predictions).sum())
        margin += float(_cosine_margins(x, y, W, global_mean).sum())
    total = float(stats.counts.sum())
    centred = means - global_mean
    d = stats.num_features
    return {
        "accuracy": 100.0 * correct / total,
        "nc1": float(torch.trace(whitening.mT @ sigma_w @ whitening)),
        "nc2_means": float(etf_distance(means, global_mean)),
        "nc2_classifier": float(classifier_etf_distance(W)),
        "nc3": float(self_duality(W, means, global_mean)),
        "bias_collapse": float(bias_collapse(W, b, global_mean)),
        "ncc_mismatch": 100.0 * mismatched / total,
        "equinorm_means": float(equinorm(centred)),
        "equinorm_classifier": float(equinorm(W)),
        "cosine_margin": margin / total,
        "nearest_etf_distance": (
            float(nearest_etf_distance(means, global_mean)) if d >= num_classes else float("nan")
        ),
        "effective_rank": effective_rank(centred),
    } | ({} if loss_fn is None else {"loss": loss / total})
