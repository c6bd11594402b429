"""Losses used with the classifier heads (cross-entropy is torch's `F.cross_entropy`).

For logits z[N, K] and labels y[N]:

- MSE to one-hot:   L = (1/(N K)) sum_i ||z_i - e_{y_i}||^2   (torch's mean-reduced mse_loss).
- Dot regression (Yang et al., NeurIPS 2022), for a fixed or implicit ETF classifier with unit
  rows and features of norm tau, so that z_{i,y_i} = tau cos(h_i, w_{y_i}):
      L = (1/N) sum_i (z_{i,y_i} - s)^2 / (2 s),   s = scale = ||w|| ||h|| (tau for the ETF heads)
  minimised when every feature points at its class's classifier row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nearest_etf._validation import check_choice
from nearest_etf.nn.class_means import check_labels

__all__ = ["LOSSES", "dot_regression_loss", "loss_function", "mse_one_hot_loss"]


def _check(logits: Tensor, targets: Tensor) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {tuple(logits.shape)}")
    labels = check_labels(targets, logits.shape[0], logits.shape[1])
    return labels.to(device=logits.device, dtype=torch.long)


def mse_one_hot_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """mean over N*K entries of (z - onehot(y))^2 for logits z[N, K], labels y[N]."""
    labels = _check(logits, targets)
    return F.mse_loss(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))


def dot_regression_loss(logits: Tensor, targets: Tensor, scale: float = 1.0) -> Tensor:
    """mean_i (z_{i,y_i} - s)^2 / (2 s), s = scale > 0, for logits z[N, K], labels y[N]."""
    labels = _check(logits, targets)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    target_logit = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    return ((target_logit - scale) ** 2).mean() / (2 * scale)


LOSSES = ("ce", "mse", "dr")


def loss_function(name: str, scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss named "ce" (cross-entropy), "mse" (MSE to one-hot) or "dr" (dot regression with
    the given scale > 0), as a callable (logits, targets) -> scalar."""
    check_choice("loss", name, LOSSES)
    if name == "dr" and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if name == "ce":
        return F.cross_entropy
    if name == "mse":
        return mse_one_hot_loss
    return lambda logits, targets: dot_regression_loss(logits, targets, scale)
