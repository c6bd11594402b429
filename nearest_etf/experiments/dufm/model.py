"""The L-layer deep unconstrained features model (L-DUFM): loss, explicit gradients, init.

K classes, n samples per class (N = nK, sample j has label j // n), width d, L weight matrices:

    loss = fit + reg
    fit  = 1/(2N) || W_L s(W_{L-1} s( ... s(W_1 H_1))) - Y ||_F^2
    reg  = lambda_H/2 ||H_1||^2 + sum_l lambda_W_l/2 ||W_l||^2

H_1 [d, N] free, W_1..W_{L-1} [d, d], W_L [K, d], s = ReLU after every layer but the last
(L-1 ReLUs, none on H_1), no biases, Y = I_K kron 1_n^T [K, N].

Notation for the representations: H_1 is the input; Z_l = W_l H_l is the pre-activation and
H_{l+1} = s(Z_l) the post-activation of layer l = 1..L-1; Z_L = W_L H_L is the output.

The explicit backward (cheaper than autograd for these tiny matrices, where per-op overhead
dominates), with G_L = (Z_L - Y)/N:
    dW_L = G_L H_L^T + lambda_W_L W_L,  dH_L = W_L^T G_L,
    G_l = dH_{l+1} * 1[Z_l > 0],  dW_l = G_l H_l^T + lambda_W_l W_l,  dH_l = W_l^T G_l,
    dH_1 = W_1^T G_1 + lambda_H H_1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nearest_etf._validation import check_int

__all__ = ["DUFMProblem", "LossParts"]


@dataclass(frozen=True)
class LossParts:
    """The DUFM loss split into its data-fit and regularisation terms (floats)."""

    fit: float
    reg: float

    @property
    def total(self) -> float:
        return self.fit + self.reg


class DUFMProblem:
    """One L-DUFM instance. Parameters are lists ``[H_1, W_1, ..., W_L]`` of tensors.

    ``lambda_w`` is one value for every weight matrix or a sequence of L values.
    """

    def __init__(
        self,
        layers: int,
        classes: int,
        width: int,
        per_class: int = 1,
        lambda_h: float = 0.004,
        lambda_w: float | Sequence[float] = 0.004,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        self.layers = check_int("layers (number of weight matrices L)", layers, 2)
        self.classes = check_int("classes K", classes, 2)
        self.width = check_int("width d", width, 1)
        self.per_class = check_int("per_class n", per_class, 1)
        if width < classes:
            raise ValueError(f"width d={width} must be >= the number of classes K={classes}")
        lambdas_w = (
            [float(lambda_w)] * layers
            if isinstance(lambda_w, int | float)
            else [float(v) for v in lambda_w]
        )
        if len(lambdas_w) != layers:
            raise ValueError(f"lambda_w needs L={layers} values, got {len(lambdas_w)}")
        if lambda_h < 0 or any(v < 0 for v in lambdas_w):
            raise ValueError("regularisation strengths must be non-negative")
        self.lambda_h = float(lambda_h)
        self.lambda_w = tuple(lambdas_w)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_samples = classes * per_class
        self.labels = torch.arange(self.num_samples, device=self.device) // per_class
        self.targets = torch.eye(classes, dtype=dtype, device=self.device)[:, self.labels]

    def shapes(self) -> list[tuple[int, int]]:
        """Shapes of [H_1, W_1, ..., W_L]."""
        d = self.width
        return [(d, self.num_samples)] + [(d, d)] * (self.layers - 1) + [(self.classes, d)]

    def init(self, seed: int, scale: float) -> list[Tensor]:
        """Gaussian initialisation: every entry of H_1, W_1..W_L i.i.d. N(0, scale^2)."""
        if not scale > 0:
            raise ValueError(f"init scale must be positive, got {scale}")
        g = torch.Generator().manual_seed(seed)
        return [
            (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(
                dtype=self.dtype, device=self.device
            )
            for shape in self.shapes()
        ]

    def check_params(self, params: Sequence[Tensor]) -> None:
        got = [tuple(p.shape) for p in params]
        if got != self.shapes():
            raise ValueError(f"parameters must have shapes {self.shapes()}, got {got}")

    def representations(self, params: Sequence[Tensor]) -> list[tuple[str, Tensor]]:
        """Named representations [("H1", H_1), ("Z1", Z_1), ("H2", H_2), ..., ("Z{L}", output)],
        each [width, N] except the output [K, N]."""
        self.check_params(params)
        reps = [("H1", params[0])]
        h = params[0]
        for layer, W in enumerate(params[1:-1], start=1):
            z = W @ h
            h = torch.relu(z)
            reps += [(f"Z{layer}", z), (f"H{layer + 1}", h)]
        reps.append((f"Z{self.layers}", params[-1] @ h))
        return reps

    def loss(self, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(fit, reg) as differentiable scalar tensors, written directly from the definition."""
        output = self.representations(params)[-1][1]
        fit = ((output - self.targets) ** 2).sum() / (2 * self.num_samples)
        reg = self.lambda_h / 2 * (params[0] ** 2).sum()
        for lam, W in zip(self.lambda_w, params[1:], strict=True):
            reg = reg + lam / 2 * (W**2).sum()
        return fit, reg

    def loss_parts(self, params: Sequence[Tensor]) -> LossParts:
        fit, reg = self.loss(params)
        return LossParts(float(fit), float(reg))

    def loss_and_grad(
        self, params: Sequence[Tensor], columns: Tensor | None = None, with_loss: bool = True
    ) -> tuple[LossParts | None, list[Tensor]]:
        """Loss parts (None unless ``with_loss``) and explicit gradients
        [dH_1, dW_1, ..., dW_L] (no autograd).

        With ``columns`` (sample indices, for mini-batch SGD) the fit term is
        1/(2B) ||(output - Y)[:, columns]||^2 over the B chosen samples (an unbiased estimate of
        the full fit) while reg stays the full regulariser.
        """
        H1, weights = params[0], params[1:]
        h = H1 if columns is None else H1[:, columns]
        y = self.targets if columns is None else self.targets[:, columns]
        hs, masks = [h], []
        for W in weights[:-1]:
            z = W @ hs[-1]
            masks.append(z > 0)
            hs.append(z.clamp_min(0))
        residual = weights[-1] @ hs[-1] - y
        batch = residual.shape[1]
        parts = None
        if with_loss:
            reg = self.lambda_h / 2 * float((H1 * H1).sum()) + sum(
                lam / 2 * float((W * W).sum())
                for lam, W in zip(self.lambda_w, weights, strict=True)
            )
            parts = LossParts(float((residual * residual).sum()) / (2 * batch), reg)
        g = residual / batch
        grads_w = [g @ hs[-1].T + self.lambda_w[-1] * weights[-1]]
        g = weights[-1].T @ g
        for layer in range(self.layers - 2, -1, -1):
            g = g * masks[layer]
            grads_w.append(g @ hs[layer].T + self.lambda_w[layer] * weights[layer])
            g = weights[layer].T @ g
        grad_h = self.lambda_h * H1
        grad_h = grad_h + g if columns is None else grad_h.index_add(1, columns, g)
        return parts, [grad_h, *reversed(grads_w)]
