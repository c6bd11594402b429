"""Neural-collapse and spectral metrics on plain tensors (the project's one metrics module).

Conventions: features are row-major, ``features[N, d]`` with integer ``labels[N]`` in
``{0, ..., K-1}``; class means are returned as rows, ``means[K, d]`` (row k = mean of class k).
A column-major feature matrix H[d, N] (as in the DUFM) is passed as ``H.T``.

Formulas (math.md section 4):

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from nearest_etf.etf import simplex_etf

__all__ = [
    "class_means",
    "effective_rank",
    "etf_distance",
    "nc1",
    "numerical_rank",
    "orthogonal_frame_distance",
    "singular_values",
]


def _check_features(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, d], got {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must have shape [N]={features.shape[0]}, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means and global mean of ``features[N, d]``.

    Returns ``(means[K, d], global_mean[d])`` with means[k] = mean of the rows of class k
    (every class must occur) and global_mean = mean of all N rows.
    """
    _check_features(features, labels, num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no samples")
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    means = sums / counts.to(features.dtype).unsqueeze(1)
    return means, features.mean(dim=0)


def nc1(features: Tensor, labels: Tensor, num_classes: int, rtol: float | None = None) -> Tensor:
    """NC1 = tr(Sigma_W Sigma_B^+) / K (scalar tensor; 0 for perfectly collapsed features).

    ``rtol`` is the pseudo-inverse cut-off relative to the largest eigenvalue of Sigma_B
    (None: torch's default, eps * d).
    """
    means, global_mean = class_means(features, labels, num_classes)
    within = features - means[labels]
    sigma_w = within.T @ within / features.shape[0]
    between = means - global_mean
    sigma_b = between.T @ between / num_classes
    pinv = torch.linalg.pinv(sigma_b, rtol=rtol, hermitian=True)
    return torch.trace(sigma_w @ pinv) / num_classes


def singular_values(M: Tensor) -> Tensor:
    """Singular values of a matrix M[m, n], in decreasing order (length min(m, n))."""
    if M.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(M.shape)}")
    return torch.linalg.svdvals(M)


def numerical_rank(M: Tensor, rtol: float = 1e-3) -> int:
    """#{i : s_i > rtol * s_max} for the singular values s of M[m, n] (0 for M = 0)."""
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    s = singular_values(M)
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
