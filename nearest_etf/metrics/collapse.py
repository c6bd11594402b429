"""Neural-collapse and spectral metrics on plain tensors (the project's one metrics module).

Conventions: features are row-major, ``features[N, d]`` with integer ``labels[N]`` in
``{0, ..., K-1}``; class means are returned as rows, ``means[K, d]`` (row k = mean of class k).
A column-major feature matrix H[d, N] (as in the DUFM) is passed as ``H.T``. Rates (accuracy,
NCC accuracy, NCC mismatch) are fractions in [0, 1], never percentages.

Formulas (docs/math.md §4; docs/metrics.md maps each to its name in the literature):

- mu_k the class means, n_k the class sizes, mu_G the global mean: by default the mean of the
  samples, sum_k n_k mu_k / N (`global_mean_of="samples"`), or the mean of the class means,
  sum_k mu_k / K (`global_mean_of="classes"`); the two agree for balanced classes. Functions
  that take class means without counts use the mean of the means unless given mu_G.
- NC1 = tr(Sigma_W Sigma_B^+) / K, Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
  Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T.
- VCI = 1 - tr(Sigma_T^+ Sigma_B) / rank(Sigma_B), Sigma_T = Sigma_W + Sigma_B (Xu & Liu 2023).
- Per-class numerical rank: mean_k (||H_k||_* / ||H_k||_F)^2, H_k the rows of class k.
- Distance to a simplex ETF of the centred means Mbar (rows mu_k - mu_G), via the Gram matrix
  so that it is rotation invariant: || G / ||G|| - M_K / ||M_K|| ||_F with G = Mbar Mbar^T.
  Because M_K^T M_K = sqrt(K/(K-1)) M_K, the normalised Gram of any simplex ETF U M_K is exactly
  M_K / ||M_K|| = C / sqrt(K-1); the distance is 0 iff the centred means are a scaled simplex ETF.
- Distance to an orthogonal frame of the uncentred means M (rows mu_k):
  || M M^T / ||M M^T|| - I_K / sqrt(K) ||_F; 0 iff the means are orthogonal with equal norms.
- Numerical rank at relative tolerance rtol: #{i : s_i > rtol * s_max}.
- Effective rank (Roy & Vetterli 2007): exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j.
- Classifier W[K, d] (rows w_k), bias b[K]: NC2 of W, || W W^T/||W W^T|| - M_K/||M_K|| ||_F;
  NC3 (self-duality, Papyan's form) || W/||W|| - Mbar/||Mbar|| ||_F^2, and NC3 in the product
  form || W Mbar^T/||W Mbar^T|| - C/sqrt(K-1) ||_F; bias collapse ||W mu_G + b||;
  equinorm std_k ||r_k|| / mean_k ||r_k||; NCC mismatch (NC4) = fraction of samples whose
  prediction differs from argmin_k ||h - mu_k||; cosine margin cos(w_y, h - mu_G) -
  max_{k != y} cos(w_k, h - mu_G); nearest-ETF distance ||Hn - U* M_K/sqrt(K)||_F (docs/math.md §2).
  `collapse_metrics` streams all of them over a data loader (`CollapseStatistics`).

Inputs: every float tensor is checked (finite; float16/bfloat16 computed in float32, other
non-float dtypes a TypeError), and the scale-invariant metrics are computed at an exact
power-of-two rescaling of their input, so they hold over the whole range of the dtype
(`nearest_etf._validation`). Metrics of the class means raise ValueError where all class means
coincide (the centred means vanish to rounding): NC1, VCI, the ETF and nearest-ETF distances,
NC3 and the NCC accuracy and mismatch are undefined there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypedDict, Unpack

import torch
from torch import Tensor

from nearest_etf._threads import is_small, single_threaded
from nearest_etf._validation import (
    check_choice,
    check_float_tensor,
    coincide,
    normalise,
    pow2_scale,
    scale_safe_norm,
)
from nearest_etf.etf import simplex_etf
from nearest_etf.nearest import nearest_etf, nearest_etf_objective
from nearest_etf.nn.class_means import check_labels, class_sums

__all__ = [
    "RANK_RTOL",
    "CollapseStatistics",
    "ScatterOptions",
    "bias_collapse",
    "class_means",
    "class_numerical_rank",
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
    "self_duality_product",
    "singular_values",
    "variability_collapse_index",
]

# Relative tolerance of the numerical rank: singular values <= RANK_RTOL * s_max count as zero.
RANK_RTOL = 1e-3

# The global mean mu_G of a feature set: the mean of the samples (each class weighs n_k / N) or
# the mean of the class means (each class weighs 1 / K).
_GLOBAL_MEANS = ("samples", "classes")


def _check_features(features: object, labels: object, num_classes: int) -> Tensor:
    """The checked features[N, d] (dtype policy, finite) for integer labels[N] in [0, K)."""
    features = check_float_tensor("features", features)
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, d], got {tuple(features.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    check_labels(labels, features.shape[0], num_classes, name="labels")
    return features


def _check_matrix(name: str, x: object) -> Tensor:
    x = check_float_tensor(name, x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a matrix, got shape {tuple(x.shape)}")
    return x


def _check_means(means: object, global_mean: object = None) -> tuple[Tensor, Tensor | None]:
    """Checked means[K, d] (K >= 2) and global_mean[d] (or None), in their common dtype."""
    means = check_float_tensor("means", means)
    if means.ndim != 2 or means.shape[0] < 2:
        raise ValueError(f"means must have shape [K, d] with K >= 2, got {tuple(means.shape)}")
    if global_mean is None:
        return means, None
    global_mean = check_float_tensor("global_mean", global_mean)
    if global_mean.shape != means.shape[1:]:
        raise ValueError(
            f"global_mean must have shape [{means.shape[1]}], got {tuple(global_mean.shape)}"
        )
    means, global_mean = _common_dtype(means, global_mean)
    return means, global_mean


def _common_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in their widest dtype (the module's rule for mixed float32/float64 inputs)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _check_counts(counts: Tensor) -> None:
    """ValueError naming the classes without samples (counts[K] == 0)."""
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no samples")


def _class_mean_rows(x: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """means[K, d] of the rows of x by class; ValueError naming the classes without samples."""
    sums, counts = class_sums(x, labels, num_classes)
    _check_counts(counts)
    return sums / counts.unsqueeze(1)


def _centred_means(means: Tensor, global_mean: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    """(c Mbar, c): the centred means Mbar = means - global_mean (default: the mean of the
    means) at the exact power-of-two scale c with max |c means|, |c global_mean| < 1, so nothing
    overflows; scale-invariant metrics use c Mbar as is. ValueError if all class means coincide
    (Mbar = 0 to rounding, `coincide`): `what` is undefined."""
    c = pow2_scale(means, (0, 1))
    if global_mean is not None:
        c = torch.minimum(c, pow2_scale(global_mean, 0))
    scaled = means * c
    centred = scaled - (scaled.mean(dim=0) if global_mean is None else global_mean * c)
    if bool(coincide(centred, scaled, (0, 1), means.shape[0])):
        raise ValueError(
            f"all class means coincide (the centred means are zero to rounding): {what} is "
            "undefined"
        )
    return centred, c


def class_means(
    features: Tensor, labels: Tensor, num_classes: int, global_mean_of: str = "samples"
) -> tuple[Tensor, Tensor]:
    """Class means and global mean of ``features[N, d]``.

    Returns ``(means[K, d], global_mean[d])`` with means[k] = mu_k, the mean of the rows of class
    k (every class must occur), and global_mean = mu_G: the mean of all N rows,
    sum_k n_k mu_k / N (``global_mean_of="samples"``, the default), or the mean of the class
    means, sum_k mu_k / K (``"classes"``); they differ only for imbalanced classes. The sums are
    taken at an exact power-of-two scale, so they do not overflow for features near the dtype's
    maximum.
    """
    check_choice("global_mean_of", global_mean_of, _GLOBAL_MEANS)
    features = _check_features(features, labels, num_classes)
    c = pow2_scale(features, (0, 1))
    x = features * c
    means = _class_mean_rows(x, labels, num_classes)
    global_mean = x.mean(dim=0) if global_mean_of == "samples" else means.mean(dim=0)
    return means / c, global_mean / c[0]


def _shift_and_scale(features: Tensor) -> Tensor:
    """c (h_i - h_1) with c the exact power-of-two scale of the features (no gradient through
    h_1 or c): the input of shift- and scale-invariant statistics; constant features give 0."""
    x = features * pow2_scale(features, (0, 1))
    return x - x[:1].detach()


def _class_means_coincide(features: Tensor, labels: Tensor, num_classes: int) -> bool:
    """Whether the class means of checked features[N, d] coincide (`coincide`), i.e. NC1, the
    NCC accuracy and the ETF distances are undefined."""
    x = _shift_and_scale(features)
    means = _class_mean_rows(x, labels, num_classes)
    return bool(coincide(means - x.mean(dim=0), means, (0, 1), num_classes))


class ScatterOptions(TypedDict, total=False):
    """The keyword options of the scatter statistics `nc1` and `variability_collapse_index`:
    ``rtol``, the pseudo-inverse cut-off relative to the largest eigenvalue (default None:
    eps * d), and ``global_mean_of``, mu_G as in `class_means` (default "samples")."""

    rtol: float | None
    global_mean_of: str


def _scaled_statistics(
    features: Tensor, labels: Tensor, num_classes: int, what: str, options: ScatterOptions
) -> tuple[Tensor, Tensor]:
    """(c (x - M_y), c Mbar) of the checked features of a scatter statistic `what`: the
    within-class deviations [N, d] and the centred means [K, d] (Mbar = means - mu_G, mu_G as
    the options' global_mean_of) of the features x shifted by their first row and rescaled by an
    exact power of two (`_shift_and_scale`), at the common power-of-two scale c of
    `_centred_means`. TypeError for an option that `ScatterOptions` does not name; ValueError if
    all class means coincide (`what` is undefined)."""
    unknown = sorted(options.keys() - ScatterOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"{what}: unexpected keyword arguments {unknown}")
    features = _check_features(features, labels, num_classes)
    global_mean_of = options.get("global_mean_of", "samples")
    check_choice("global_mean_of", global_mean_of, _GLOBAL_MEANS)
    x = _shift_and_scale(features)
    means = _class_mean_rows(x, labels, num_classes)
    global_mean = x.mean(dim=0) if global_mean_of == "samples" else None
    centred, c = _centred_means(means, global_mean, what)
    return (x - means[labels]) * c, centred


def nc1(
    features: Tensor, labels: Tensor, num_classes: int, **options: Unpack[ScatterOptions]
) -> Tensor:
    """NC1 = tr(Sigma_W Sigma_B^+) / K (scalar tensor; 0 for perfectly collapsed features).

    Papyan, Han & Donoho, PNAS 2020, Fig. 6 (docs/math.md §4). Sigma_W = (1/N) sum_i
    (h_i - mu_{y_i})(h_i - mu_{y_i})^T, Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T with
    mu_G as ``global_mean_of`` (`class_means`). ``rtol`` is the pseudo-inverse cut-off relative to
    the largest eigenvalue of Sigma_B (None: torch's default, eps * d); both are keyword options
    (`ScatterOptions`). Computed in the span of
    the class means, without d x d matrices (`_whitening`):
    tr(Sigma_W Sigma_B^+) / K = (1/N) ||(H - M_y) P||_F^2. NC1 is invariant to shifting and
    scaling the features, and is computed on features shifted by the first row and rescaled by
    an exact power of two (no overflow or underflow at any scale). ValueError if all class means
    coincide (Sigma_B = 0: NC1 undefined).
    """
    within, centred = _scaled_statistics(features, labels, num_classes, "NC1", options)
    return (within @ _whitening(centred, options.get("rtol"))).square().sum() / within.shape[0]


def _whitening(rows: Tensor, rtol: float | None) -> Tensor:
    """P = Q_r S_r^{-1} [d, r] from the thin SVD rows[m, d] = L S Q^T over the kept directions
    s_i^2 > rtol s_1^2, tested as s_i > sqrt(rtol) s_1 (no squares to underflow; rtol None:
    eps * d, torch.linalg.pinv's default on rows^T rows), so that (rows^T rows)^+ = P P^T and
    r is its numerical rank. For B = centred means, Sigma_B = B^T B / K gives
    Sigma_B^+ = K P P^T and tr(Sigma_W Sigma_B^+) / K = tr(P^T Sigma_W P)."""
    with single_threaded(is_small(rows, inner=min(rows.shape))):
        _, s, Qt = torch.linalg.svd(rows, full_matrices=False)
    cutoff = torch.finfo(s.dtype).eps * rows.shape[1] if rtol is None else rtol
    keep = s > cutoff**0.5 * s[0]
    return Qt[keep].mT / s[keep]


def _variability_collapse(within_root: Tensor, centred_means: Tensor, rtol: float | None) -> Tensor:
    """VCI = 1 - tr(Sigma_T^+ Sigma_B) / rank(Sigma_B) from within_root[m, d] with
    Sigma_W = R^T R and the centred means B[K, d], Sigma_B = B^T B / K. With Z = [R; B/sqrt(K)],
    Sigma_T = Sigma_W + Sigma_B = Z^T Z, so tr(Sigma_T^+ Sigma_B) = ||B/sqrt(K) P_Z||_F^2
    (`_whitening`; no d x d products, no squares); rank(Sigma_B) = the r of `_whitening(B)`."""
    between_root = centred_means / centred_means.shape[0] ** 0.5
    rank = _whitening(centred_means, rtol).shape[1]
    total = _whitening(torch.cat([within_root, between_root]), rtol)
    return 1 - (between_root @ total).square().sum() / rank


def variability_collapse_index(
    features: Tensor, labels: Tensor, num_classes: int, **options: Unpack[ScatterOptions]
) -> Tensor:
    """Variability collapse index VCI = 1 - tr(Sigma_T^+ Sigma_B) / rank(Sigma_B), in [0, 1]
    (scalar tensor; 0 for perfectly collapsed features).

    Xu & Liu, "Quantifying the variability collapse of neural networks", ICML 2023, as computed
    by the reference code of Markou, Ajanthan & Gould, NeurIPS 2024 (``nc/validate_NC.py``):
    Sigma_W and Sigma_B as in `nc1` (mu_G as ``global_mean_of``) and Sigma_T = Sigma_W + Sigma_B,
    the total covariance of the features when the classes are balanced. rank(Sigma_B) is the
    numerical rank at ``rtol``, min(d, K - 1) for centred means in general position (the
    reference code's denominator); ``rtol`` is also the pseudo-inverse cut-off of Sigma_T, both
    relative to the largest eigenvalue (None: eps * d); both are keyword options
    (`ScatterOptions`). For balanced classes
    tr(Sigma_T^+ Sigma_B) is the sum of the squared canonical correlations between the features
    and the one-hot labels, so VCI is invariant to invertible linear maps of the features (NC1
    is not: within-class deviations linearly independent of the class-mean directions leave VCI
    at 0). Computed without d x d products on the shifted, power-of-two rescaled features
    (`_variability_collapse`). ValueError if all class means coincide (Sigma_B = 0: VCI
    undefined).
    """
    within, centred = _scaled_statistics(features, labels, num_classes, "VCI", options)
    return _variability_collapse(within / within.shape[0] ** 0.5, centred, options.get("rtol"))


def class_numerical_rank(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class numerical rank mean_k (||H_k||_* / ||H_k||_F)^2 (scalar tensor), H_k[n_k, d] the
    (uncentred) feature rows of class k; each term lies in [1, min(n_k, d)] and is 1 iff the
    rows of the class are parallel, e.g. all equal to their mean (collapsed).

    The "numerical rank (nuclear/Frobenius)" of the reference code of Markou, Ajanthan & Gould,
    NeurIPS 2024 (``nc/validate_NC.py``). It is not `numerical_rank` (a count of singular values
    above a tolerance) and, the rows being uncentred, not invariant to shifting the features.
    Scale invariant: each class is rescaled by an exact power of two. ValueError if a class has
    no samples or only zero rows (the ratio is undefined).
    """
    features = _check_features(features, labels, num_classes)
    _check_counts(torch.bincount(labels, minlength=num_classes))
    ratios = []
    for k in range(num_classes):
        rows = features[labels == k]
        s = torch.linalg.svdvals(rows * pow2_scale(rows, (0, 1)))
        if float(s[0]) == 0.0:
            raise ValueError(
                f"class {k} has only zero features: its numerical rank "
                "(||H_k||_* / ||H_k||_F)^2 is undefined"
            )
        ratios.append(s.sum().square() / s.square().sum())
    return torch.stack(ratios).mean()


def _class_rank_of_grams(grams: Tensor) -> float:
    """mean_k (||H_k||_* / ||H_k||_F)^2 from the Gram matrices grams[K, d, d] = H_k^T H_k (no
    class all zero): ||H_k||_* = sum_i sqrt(lambda_i), ||H_k||_F^2 = tr(G_k). Eigenvalues below
    d eps lambda_max are rounding of the Gram matrix and count as zero (singular values below
    sqrt(d eps) s_1 are not resolved from it)."""
    eigenvalues = torch.linalg.eigvalsh(grams)
    floor = grams.shape[-1] * torch.finfo(grams.dtype).eps * eigenvalues[:, -1:]
    nuclear = eigenvalues.where(eigenvalues > floor, 0).sqrt().sum(dim=1)
    return float((nuclear.square() / grams.diagonal(dim1=1, dim2=2).sum(dim=1)).mean())


def singular_values(M: Tensor) -> Tensor:
    """Singular values of a matrix M[m, n], in decreasing order (length min(m, n))."""
    M = _check_matrix("M", M)
    with single_threaded(is_small(M, inner=min(M.shape))):
        return torch.linalg.svdvals(M)


def _scaled_singular_values(M: Tensor) -> Tensor:
    """Singular values of c M (c the exact power-of-two scale of M): for scale-invariant uses."""
    M = _check_matrix("M", M)
    return torch.linalg.svdvals(M * pow2_scale(M, (0, 1))) if M.numel() else M.new_zeros(0)


def numerical_rank(M: Tensor, rtol: float = RANK_RTOL) -> int:
    """#{i : s_i > rtol * s_max} for the singular values s of M[m, n] (0 for M = 0)."""
    return rank_of_singular_values(_scaled_singular_values(M), rtol)


def rank_of_singular_values(s: Tensor, rtol: float = RANK_RTOL) -> int:
    """#{i : s_i > rtol * s_max} for singular values s[r] in decreasing order (0 if all zero)."""
    s = check_float_tensor("s", s)
    if s.ndim != 1:
        raise ValueError(f"s must be a vector of singular values, got shape {tuple(s.shape)}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > rtol * s[0]).sum())


def effective_rank(M: Tensor) -> float:
    """Roy & Vetterli entropy effective rank exp(H(p)), p = s / sum(s), of M[m, n]."""
    s = _scaled_singular_values(M)
    total = s.sum()
    if float(total) == 0.0:
        raise ValueError("the effective rank of a zero matrix is undefined")
    p = s[s > 0] / total
    return float(torch.exp(-(p * torch.log(p)).sum()))


def _gram_distance(rows: Tensor, target: Tensor) -> Tensor:
    """|| G/||G|| - target ||_F for G = rows rows^T (rows nonzero), at an exact power-of-two
    scale of the rows (the normalised Gram is scale invariant)."""
    scaled = rows * pow2_scale(rows, (0, 1))
    return torch.linalg.matrix_norm(normalise(scaled @ scaled.T, (0, 1)) - target)


def _unit_etf_gram(K: int, like: Tensor) -> Tensor:
    """M_K / ||M_K||_F = C / sqrt(K - 1), the normalised Gram of any simplex ETF."""
    etf = simplex_etf(K, dtype=like.dtype, device=like.device)
    return etf / torch.linalg.matrix_norm(etf)


def etf_distance(means: Tensor, global_mean: Tensor | None = None) -> Tensor:
    """|| G/||G|| - M_K/||M_K|| ||_F, G = Mbar Mbar^T, Mbar = means[K, d] - global_mean.

    ``global_mean`` defaults to the mean of the class means (the global mean for balanced
    classes). The result lies in [0, 2] and is invariant to rotations and scaling of the means.
    ValueError if all class means coincide (Mbar = 0).
    """
    means, global_mean = _check_means(means, global_mean)
    centred, _ = _centred_means(means, global_mean, "the ETF distance")
    return _gram_distance(centred, _unit_etf_gram(means.shape[0], centred))


def orthogonal_frame_distance(means: Tensor) -> Tensor:
    """|| M M^T/||M M^T|| - I_K/sqrt(K) ||_F for the uncentred class means M = means[K, d]
    (ValueError if M = 0)."""
    means, _ = _check_means(means)
    if float(means.abs().max()) == 0.0:
        raise ValueError("all class means are zero (zero Gram matrix): distance undefined")
    K = means.shape[0]
    eye = torch.eye(K, dtype=means.dtype, device=means.device)
    return _gram_distance(means, eye / K**0.5)


# --- Classifier and collapse metrics (NC2 for W, NC3, bias collapse, NCC mismatch, margins),
# --- and their streaming evaluation over a data loader.


def _check_classifier(
    weight: object, num_features: int | None = None, num_classes: int | None = None
) -> Tensor:
    weight = check_float_tensor("weight", weight)
    if weight.ndim != 2 or weight.shape[0] < 2:
        raise ValueError(f"weight must have shape [K, d] with K >= 2, got {tuple(weight.shape)}")
    if num_features is not None and weight.shape[1] != num_features:
        raise ValueError(
            f"weight has width {weight.shape[1]} but the features have width {num_features}"
        )
    if num_classes is not None and weight.shape[0] != num_classes:
        raise ValueError(f"weight has {weight.shape[0]} rows but there are {num_classes} classes")
    return weight


def _check_nonzero_classifier(weight: Tensor, what: str) -> None:
    if float(weight.detach().abs().max()) == 0.0:
        raise ValueError(f"weight is zero: {what} is undefined")


def classifier_etf_distance(weight: Tensor) -> Tensor:
    """NC2 of the classifier: || W W^T/||W W^T|| - M_K/||M_K|| ||_F for weight W[K, d]
    (uncentred rows; 0 iff W is a scaled simplex ETF). ValueError if W = 0."""
    weight = _check_classifier(weight)
    _check_nonzero_classifier(weight, "the classifier's ETF distance")
    return _gram_distance(weight, _unit_etf_gram(weight.shape[0], weight))


def self_duality(weight: Tensor, means: Tensor, global_mean: Tensor | None = None) -> Tensor:
    """NC3 (self-duality) = || W/||W|| - Mbar/||Mbar|| ||_F^2 with W[K, d] and the centred means
    Mbar = means[K, d] - global_mean (default: mean of the means); in [0, 4], 0 iff W is a
    positive multiple of Mbar.

    Papyan, Han & Donoho, PNAS 2020, Fig. 5 (docs/math.md §4); the form of the project's
    experiment tables (key ``nc3``). `self_duality_product` is the form of Kothapalli's survey.
    Both normalisations are scale-safe; ValueError if W = 0 or all class means coincide.
    """
    means, global_mean = _check_means(means, global_mean)
    weight = _check_classifier(weight, means.shape[1], means.shape[0])
    _check_nonzero_classifier(weight, "NC3")
    centred, _ = _centred_means(means, global_mean, "NC3")
    return (normalise(weight, (0, 1)) - normalise(centred, (0, 1))).square().sum()


def self_duality_product(
    weight: Tensor, means: Tensor, global_mean: Tensor | None = None
) -> Tensor:
    """NC3 in the product form || W Mbar^T/||W Mbar^T|| - C/sqrt(K-1) ||_F, in [0, 2], with
    W[K, d], the centred means Mbar = means[K, d] - global_mean (default: mean of the means) and
    C = I_K - 1 1^T/K (C/sqrt(K-1) = M_K/||M_K||, the normalised Gram of a simplex ETF).

    The form of Zhu et al., NeurIPS 2021, of Kothapalli's survey (TMLR 2023) and of the
    reference code of Markou, Ajanthan & Gould, NeurIPS 2024 (``nc/validate_NC.py``). It is 0
    iff W Mbar^T is a positive multiple of C: W self-dual to Mbar (`self_duality` = 0) *and*
    Mbar a simplex ETF (`etf_distance` = 0) give 0, but W = Mbar with non-ETF means does not,
    so it mixes NC2 into NC3. Computed from the scale-safe normalisations of W and Mbar;
    ValueError if W = 0, all class means coincide, or W Mbar^T vanishes to rounding (every row
    of W orthogonal to every centred mean).
    """
    means, global_mean = _check_means(means, global_mean)
    weight = _check_classifier(weight, means.shape[1], means.shape[0])
    _check_nonzero_classifier(weight, "NC3 (product form)")
    centred, _ = _centred_means(means, global_mean, "NC3 (product form)")
    weight, centred = _common_dtype(weight, centred)
    dtype = weight.dtype
    product = normalise(weight, (0, 1)) @ normalise(centred, (0, 1)).mT
    # entries of a product of unit-norm matrices round by at most d * eps
    if float(product.detach().abs().max()) <= means.shape[1] * torch.finfo(dtype).eps:
        raise ValueError(
            "W Mbar^T vanishes (to rounding): the classifier rows are orthogonal to the centred "
            "means, NC3 (product form) is undefined"
        )
    etf_gram = _unit_etf_gram(means.shape[0], product)
    return torch.linalg.matrix_norm(normalise(product, (0, 1)) - etf_gram)


def bias_collapse(weight: Tensor, bias: Tensor | None, global_mean: Tensor) -> Tensor:
    """|| W mu_G + b ||_2 (0 when the bias cancels the global mean), W[K, d], b[K], mu_G[d]."""
    global_mean = check_float_tensor("global_mean", global_mean)
    weight = _check_classifier(weight, global_mean.shape[-1])
    weight, global_mean = _common_dtype(weight, global_mean)
    value = weight @ global_mean
    if bias is not None:
        bias = check_float_tensor("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        value = value + bias
    return scale_safe_norm(value, 0)


def equinorm(rows: Tensor, correction: int = 0) -> Tensor:
    """Equinorm: the coefficient of variation std_k ||r_k|| / mean_k ||r_k|| of the row norms of
    rows[K, d] (0 iff equal norms). Pass centred means (means - mu_G) or the classifier W.

    Papyan, Han & Donoho, PNAS 2020, Fig. 2 (docs/math.md §4). The std divides by
    K - ``correction``: 0 (default) is the population std; 1 the sample std of
    ``torch.std``/``np.std(ddof=1)``, larger by exactly sqrt(K / (K - 1)). Scale invariant
    (computed at an exact power-of-two scale); ValueError if every row is zero or ``correction``
    is not an int in [0, K).
    """
    rows = _check_matrix("rows", rows)
    K = rows.shape[0]
    if isinstance(correction, bool) or not isinstance(correction, int) or not 0 <= correction < K:
        raise ValueError(f"correction must be an int in [0, K) = [0, {K}), got {correction!r}")
    norms = torch.linalg.vector_norm(rows * pow2_scale(rows, (0, 1)), dim=1)
    if float(norms.max()) == 0.0:
        raise ValueError("every row is zero: the equinorm std/mean is undefined")
    return norms.std(correction=correction) / norms.mean()


def _ncc_predictions(features: Tensor, means: Tensor) -> Tensor:
    """argmin_k ||h_i - mu_k||^2 = argmin_k (||mu_k||^2 - 2 <h_i, mu_k>), shape [N], computed
    at one exact power-of-two scale of features and means (the argmin is scale invariant)."""
    c = torch.minimum(pow2_scale(features, (0, 1)), pow2_scale(means, (0, 1)))
    x, m = features * c, means * c
    return (m.square().sum(1) - 2 * x @ m.T).argmin(dim=1)


def _check_ncc_means(means: object, num_classes: int, features: Tensor, what: str) -> Tensor:
    """Checked means[K, d] for features[N, d] (at least one sample) that do not all coincide,
    in the features' dtype."""
    means = check_float_tensor("means", means)
    if means.shape != (num_classes, features.shape[1]):
        raise ValueError(
            f"means must have shape ({num_classes}, {features.shape[1]}), got {tuple(means.shape)}"
        )
    if not len(features):
        raise ValueError(f"{what} needs at least one sample; features have none")
    _centred_means(means, None, what)
    return means


def ncc_mismatch(features: Tensor, predictions: Tensor, means: Tensor) -> float:
    """NC4: the fraction in [0, 1] of samples whose predicted class (`predictions[N]`, e.g.
    argmax of the logits) differs from the nearest class centre argmin_k ||h_i - mu_k||
    (means[K, d]); Papyan, Han & Donoho, PNAS 2020, Fig. 7. ValueError if all class means
    coincide (every distance ties)."""
    features = _check_matrix("features", features)
    means = _check_matrix("means", means)
    means = _check_ncc_means(means, means.shape[0], features, "the NCC mismatch")
    check_labels(predictions, features.shape[0], means.shape[0], name="predictions")
    features, means = _common_dtype(features, means)
    return float((_ncc_predictions(features, means) != predictions).double().mean())


def ncc_accuracy(
    features: Tensor, labels: Tensor, num_classes: int, means: Tensor | None = None
) -> float:
    """Nearest-class-centre accuracy, the fraction in [0, 1] of samples with
    argmin_k ||h_i - mu_k|| = y_i, for features[N, d], labels[N] and class means[K, d]
    (default: the class means of these features, `class_means`). ValueError if all class means
    coincide (every distance ties)."""
    features = _check_features(features, labels, num_classes)
    if means is None:
        means, _ = class_means(features, labels, num_classes)
    means = _check_ncc_means(means, num_classes, features, "the NCC accuracy")
    features, means = _common_dtype(features, means)
    return float((_ncc_predictions(features, means) == labels).double().mean())


def _cosine_margins(
    features: Tensor, labels: Tensor, weight: Tensor, global_mean: Tensor | None
) -> Tensor:
    """cos(w_{y_i}, h_i - c) - max_{k != y_i} cos(w_k, h_i - c) per sample, c = global_mean
    (0 if None); shape [N]. Rows are normalised scale-safely (`normalise`); a zero row (h_i = c,
    or w_k = 0) has cosine 0 with every vector."""
    centred = features
    if global_mean is not None:
        features, global_mean = _common_dtype(features, global_mean)
        c = torch.minimum(pow2_scale(features, (0, 1)), pow2_scale(global_mean, 0))
        centred = features * c - global_mean * c
    cos = normalise(centred, 1) @ normalise(weight, 1).T
    true = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = cos.scatter(1, labels.unsqueeze(1), float("-inf")).amax(dim=1)
    return true - others


def cosine_margin(
    features: Tensor, labels: Tensor, weight: Tensor, global_mean: Tensor | None = None
) -> Tensor:
    """Average cosine margin mean_i [cos(w_{y_i}, h_i - c) - max_{k != y_i} cos(w_k, h_i - c)]
    for features[N, d], labels[N], classifier rows weight[K, d], c = global_mean (0 if None);
    positive iff on average the true class's direction is the closest. A zero row (h_i = c or
    w_k = 0) has cosine 0 with every vector."""
    features = _check_matrix("features", features)
    weight = _check_classifier(weight, features.shape[1])
    features = _check_features(features, labels, weight.shape[0])
    if not len(features):
        raise ValueError("the cosine margin needs at least one sample; features have none")
    if global_mean is not None:
        global_mean = check_float_tensor("global_mean", global_mean)
        if global_mean.shape != features.shape[1:]:
            raise ValueError(
                f"global_mean must have shape [{features.shape[1]}], got {tuple(global_mean.shape)}"
            )
    features, weight = _common_dtype(features, weight)
    return _cosine_margins(features, labels, weight, global_mean).mean()


def nearest_etf_distance(means: Tensor, global_mean: Tensor | None = None) -> Tensor:
    """|| Hn - U* M_K/sqrt(K) ||_F with Hn = Mbar^T/||Mbar|| (centred means as columns) and U*
    its nearest simplex ETF frame (`nearest_etf`, feasibility solve): the distance from the
    normalised centred means to the closest unit-norm simplex ETF, in [0, 2]. Needs d >= K;
    ValueError if all class means coincide."""
    means, global_mean = _check_means(means, global_mean)
    centred, _ = _centred_means(means, global_mean, "the nearest-ETF distance")
    Hn = normalise(centred.mT, (0, 1))
    with single_threaded(is_small(Hn)):
        U = nearest_etf(Hn.detach())
        return nearest_etf_objective(Hn, U).clamp_min(0).sqrt()


# Deviations below 2^-500 (3e-151) have squares below 2^-1000, within 2^22 of float64's smallest
# normal number: the scatter would lose precision to subnormals and then to zero.
_SCATTER_FLOOR = 2.0**-500


class CollapseStatistics:
    """Streaming class statistics of a feature set, accumulated batch by batch in float64:
    counts n_k, sums sum_{y_i=k} h_i and the scatter sum_i (h_i - s)(h_i - s)^T about a shift s
    (the first batch's mean, against cancellation). Then mu_k, mu_G and

        Sigma_W = (1/N) [sum_i (h_i - s)(h_i - s)^T - sum_k n_k (mu_k - s)(mu_k - s)^T]
        Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T   (as `nc1`),

    mu_G the mean of the samples or of the class means (``global_mean_of``, as `class_means`).
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.sums = torch.zeros(num_classes, num_features, dtype=torch.float64)
        self.scatter = torch.zeros(num_features, num_features, dtype=torch.float64)
        self.shift: Tensor | None = None

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch features[N, d], labels[N] (checked: dtype policy, finite). ValueError,
        leaving the statistics unchanged, if the batch's float64 sums or scatter overflow
        (entries beyond ~1e154) or its deviations from the mean are so small (below ~1e-150, not
        zero) that their squares underflow."""
        features = _check_features(features, labels, self.num_classes)
        if features.shape[1] != self.num_features:
            raise ValueError(f"features must have width {self.num_features}")
        x = features.detach().to(device="cpu", dtype=torch.float64)
        y = labels.detach().cpu()
        shift = x.mean(dim=0) if self.shift is None else self.shift
        sums, counts = class_sums(x, y, self.num_classes)
        sums = self.sums + sums
        centred = x - shift
        scatter = self.scatter + centred.T @ centred
        if not bool(torch.isfinite(scatter).all() & torch.isfinite(sums).all()):
            raise ValueError(
                "the feature statistics overflow float64 (entries beyond ~1e154): rescale the "
                "features"
            )
        spread = float(centred.abs().max()) if centred.numel() else 0.0
        if 0 < spread < _SCATTER_FLOOR:
            raise ValueError(
                f"the feature statistics underflow float64 (deviations from the mean up to "
                f"{spread:.3g}, below ~1e-150, whose squares lose precision): rescale the "
                "features"
            )
        self.shift, self.sums, self.scatter = shift, sums, scatter
        self.counts += counts

    def means(self, global_mean_of: str = "samples") -> tuple[Tensor, Tensor]:
        """(means[K, d], global_mean[d]), mu_G the mean of the samples (default) or of the class
        means (``"classes"``); every class must have been seen."""
        check_choice("global_mean_of", global_mean_of, _GLOBAL_MEANS)
        _check_counts(self.counts)
        means = self.sums / self.counts.unsqueeze(1)
        if global_mean_of == "classes":
            return means, means.mean(dim=0)
        return means, self.sums.sum(0) / self.counts.sum()

    def covariances(self, global_mean_of: str = "samples") -> tuple[Tensor, Tensor]:
        """(Sigma_W[d, d], Sigma_B[d, d]), mu_G of Sigma_B as ``global_mean_of`` (`means`)."""
        means, global_mean = self.means(global_mean_of)
        assert self.shift is not None
        centred_means = means - self.shift
        explained = centred_means.T @ (self.counts.unsqueeze(1) * centred_means)
        sigma_w = (self.scatter - explained) / self.counts.sum()
        between = means - global_mean
        return sigma_w, between.T @ between / self.num_classes


def _add_class_grams(grams: Tensor, x: Tensor, labels: Tensor) -> None:
    """grams[k] += X_k^T X_k for the rows X_k of x[N, d] in class k (in place)."""
    for k in labels.unique().tolist():
        rows = x[labels == k]
        grams[k] += rows.T @ rows


def collapse_metrics(
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    weight: Tensor,
    bias: Tensor | None,
    num_classes: int,
    rtol: float | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    global_mean_of: str = "samples",
    class_rank: bool = True,
) -> dict[str, float]:
    """All collapse metrics of a data set, streamed in two passes over `batches`.

    `batches` yields (features[N, d], logits[N, K], labels[N]) and must be re-iterable, yielding
    the same samples on each pass (a list, or an object whose __iter__ runs the model over a
    DataLoader); a one-shot iterator such as a generator raises TypeError, and a second pass
    with other class counts than the first raises ValueError. Features are those the classifier
    (weight[K, d], bias[K] or None) acts on. Pass 1 accumulates `CollapseStatistics`; pass 2
    the accuracy, NCC mismatch, cosine margins and, with ``class_rank``, the per-class Gram
    matrices X_k^T X_k (K d^2 float64 numbers: 84 MB for K = 10, d = 1024). Every tensor is
    checked (dtype policy, finite; NaN logits raise). mu_G is the mean of the samples or of the
    class means (``global_mean_of``, as `class_means`) in every metric that uses it.

    Returns floats (docs/metrics.md): accuracy (fraction of argmax logits = label), nc1, vci
    (`variability_collapse_index`), class_numerical_rank (only with ``class_rank``; from the
    Gram matrices, which resolve singular values down to sqrt(d eps) s_1 of each class),
    nc2_means (`etf_distance`), nc2_classifier, nc3 (`self_duality`), nc3_product
    (`self_duality_product`), bias_collapse, ncc_mismatch (fraction), equinorm_means,
    equinorm_classifier (population std), cosine_margin, nearest_etf_distance (NaN if d < K),
    effective_rank (of the centred means); with `loss_fn(logits, labels)` (mean-reduced) also
    loss, its mean over the samples. ValueError if all class means coincide (the metrics are
    undefined).
    """
    check_choice("global_mean_of", global_mean_of, _GLOBAL_MEANS)
    if isinstance(batches, Iterator):
        raise TypeError(
            f"collapse_metrics makes two passes over batches, but got a one-shot iterator "
            f"({type(batches).__name__}); pass a re-iterable: a list of batches, or an object "
            "whose __iter__ starts a new pass (e.g. over a DataLoader)"
        )
    stats: CollapseStatistics | None = None
    peak = torch.zeros(1, dtype=torch.float64)  # max |h| over the data: the Gram matrices' scale
    for batch in batches:
        if not isinstance(batch, list | tuple) or len(batch) != 3:
            size = len(batch) if hasattr(batch, "__len__") else "?"
            raise ValueError(
                "collapse_metrics needs batches of (features, logits, labels) triples, got a "
                f"{type(batch).__name__} of length {size} (a DataLoader of (x, y) yields "
                "inputs, not features: map it through the model)"
            )
        features, _, labels = batch
        if stats is None:
            stats = CollapseStatistics(_check_matrix("features", features).shape[1], num_classes)
        stats.update(features, labels)
        if class_rank and features.numel():
            peak = torch.maximum(peak, features.detach().abs().amax().to("cpu", torch.float64))
    if stats is None:
        raise ValueError("collapse_metrics got no batches")
    d = stats.num_features
    weight = _check_classifier(weight, d, num_classes)
    W = weight.detach().to(device="cpu", dtype=torch.float64)
    b = None if bias is None else check_float_tensor("bias", bias).detach().to("cpu", torch.float64)
    means, global_mean = stats.means(global_mean_of)
    _centred_means(means, global_mean, "the collapse metrics")
    sigma_w, _ = stats.covariances(global_mean_of)
    centred = means - global_mean
    whitening = _whitening(centred, rtol)
    grams = torch.zeros(num_classes, d, d, dtype=torch.float64) if class_rank else None
    scale = pow2_scale(peak, 0)  # the rescaled Gram entries are at most n_k: no overflow
    correct = mismatched = margin = loss = 0.0
    counts = torch.zeros_like(stats.counts)
    for features, logits, labels in batches:
        features = _check_features(features, labels, num_classes)
        logits = _check_matrix("logits", logits)
        if features.shape[1] != d or logits.shape != (len(features), num_classes):
            raise ValueError(
                f"pass 2 got features {tuple(features.shape)} and logits {tuple(logits.shape)}; "
                f"expected [N, {d}] and [N, {num_classes}]"
            )
        if not len(features):  # an empty batch adds nothing (as in the first pass)
            continue
        if loss_fn is not None:
            loss += float(loss_fn(logits, labels.to(logits.device))) * len(labels)
        x = features.detach().to(device="cpu", dtype=torch.float64)
        y = labels.detach().cpu()
        counts += torch.bincount(y, minlength=num_classes)
        predictions = logits.detach().argmax(dim=1).cpu()
        correct += float((predictions == y).sum())
        mismatched += float((_ncc_predictions(x, means) != predictions).sum())
        margin += float(_cosine_margins(x, y, W, global_mean).sum())
        if grams is not None:
            _add_class_grams(grams, x * scale, y)
    if not torch.equal(counts, stats.counts):
        raise ValueError(
            f"batches yielded other samples in the second pass (class counts "
            f"{stats.counts.long().tolist()}, then {counts.long().tolist()}): collapse_metrics "
            "needs a re-iterable that yields the same data on every pass"
        )
    total = float(stats.counts.sum())
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma_w)
    within_root = eigenvalues.clamp_min(0).sqrt().unsqueeze(1) * eigenvectors.mT
    rank: dict[str, float] = {}
    if grams is not None:
        empty = grams.diagonal(dim1=1, dim2=2).sum(dim=1) == 0
        if bool(empty.any()):
            raise ValueError(
                f"classes {torch.nonzero(empty).flatten().tolist()} have only zero features: "
                "their numerical rank (||H_k||_* / ||H_k||_F)^2 is undefined"
            )
        rank["class_numerical_rank"] = _class_rank_of_grams(grams)
    return {
        "accuracy": correct / total,
        "nc1": float(torch.trace(whitening.mT @ sigma_w @ whitening)),
        "vci": float(_variability_collapse(within_root, centred, rtol)),
        **rank,
        "nc2_means": float(etf_distance(means, global_mean)),
        "nc2_classifier": float(classifier_etf_distance(W)),
        "nc3": float(self_duality(W, means, global_mean)),
        "nc3_product": float(self_duality_product(W, means, global_mean)),
        "bias_collapse": float(bias_collapse(W, b, global_mean)),
        "ncc_mismatch": mismatched / total,
        "equinorm_means": float(equinorm(centred)),
        "equinorm_classifier": float(equinorm(W)),
        "cosine_margin": margin / total,
        "nearest_etf_distance": (
            float(nearest_etf_distance(means, global_mean)) if d >= num_classes else float("nan")
        ),
        "effective_rank": effective_rank(centred),
    } | ({} if loss_fn is None else {"loss": loss / total})
