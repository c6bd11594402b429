"""Linear layers whose weight is a frozen simplex ETF (Liu, arXiv 2412.00884), and in-place
conversion of the ``nn.Linear`` layers of a model into them.

The simplex ETF of shape (out, in). With n = min(out, in) (n >= 2) and M_n the canonical ETF
sqrt(n/(n-1)) (I_n - 1 1^T/n) (`nearest_etf.etf.simplex_etf`), a frame U in St(max(out, in), n):

    out <= in:  W = (U M_out)^T         rows w_1..w_out are a simplex ETF in R^in:
                                        W W^T = M_out^2 = out/(out-1) (I - 1 1^T/out)
    out >  in:  W = U M_in              columns are a simplex ETF in R^out:
                                        W^T W = in/(in-1) (I - 1 1^T/in)

i.e. W or W^T is `etf_classifier(U)`. Every ETF vector has unit norm and pairs meet at
inner product -1/(n-1). The *canonical* frame is U = I[:, :n] (the first n standard basis
vectors), so a square h x h layer gets exactly M_h = sqrt(h/(h-1)) (I - 1 1^T/h) and a K x h
classifier (K <= h) gets [M_K, 0]. (Out > in + 1 admits no ETF of `out` rows, since their span
has dimension out - 1 > in; the column form is the ETF of the transposed map.)

The *nearest* ETF to a weight W is the one with the same shape minimising ||W - W_etf||_F over
the frame U. For out <= in, ||W^T - U M||^2 = const - 2 tr(U^T W^T M) with M = M_out, so
U* = polar(W^T M) = polar(W^T C), C = I - 1 1^T/n: exactly the nearest-ETF problem of
`nearest_etf.nearest_etf` with the columns of H = W^T as "class means" (its feasibility solve
U* = polar((2/sqrt(n-1)) Hn C), delta = 0). For out > in, H = W. The ETF keeps unit-norm
vectors (the canonical scale), so "nearest" changes only the orientation, not the scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nearest_etf._validation import check_choice, check_stiefel
from nearest_etf.etf import etf_classifier
from nearest_etf.nearest import nearest_etf

__all__ = [
    "ETF_MODES",
    "ETFLinear",
    "convert_to_etf",
    "etf_weight",
    "fix_last_layers",
    "linear_layer_names",
    "nearest_etf_weight",
    "trainable_parameters",
]

ETF_MODES = ("canonical", "nearest")


def _check_shape(out_features: int, in_features: int) -> None:
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if min(out_features, in_features) < 2:
        raise ValueError(
            f"a simplex ETF of shape (out, in) needs min(out, in) >= 2, got "
            f"({out_features}, {in_features})"
        )


def _from_frame(U: Tensor, out_features: int, in_features: int) -> Tensor:
    """W = (U M_out)^T (out <= in) or U M_in (out > in) from U [max(out, in), min(out, in)]."""
    W = etf_classifier(U)
    return W if out_features <= in_features else W.mT


def etf_weight(
    out_features: int,
    in_features: int,
    frame: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The simplex ETF weight [out, in] with frame U [max(out, in), min(out, in)] (orthonormal
    columns; default the canonical I[:, :n]). See the module docstring for the formula."""
    _check_shape(out_features, in_features)
    big, n = max(out_features, in_features), min(out_features, in_features)
    if frame is None:
        frame = torch.eye(big, n, dtype=dtype, device=device)
    elif frame.shape != (big, n):
        raise ValueError(
            f"an ETF of shape ({out_features}, {in_features}) needs a frame of shape "
            f"({big}, {n}), got {tuple(frame.shape)}"
        )
    else:
        frame = check_stiefel("frame", frame, frame.shape, frame.dtype)
        frame = frame.to(dtype=dtype or frame.dtype, device=device or frame.device)
    return _from_frame(frame, out_features, in_features)


def nearest_etf_weight(weight: Tensor) -> Tensor:
    """The simplex ETF of the shape of weight [out, in] nearest to it in Frobenius norm
    (unit-norm ETF vectors; frame from `nearest_etf.nearest_etf`, solved in float64). Same
    dtype and device as `weight`."""
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError("weight must be a matrix [out, in]")
    out_features, in_features = weight.shape
    _check_shape(out_features, in_features)
    W = weight.detach().to(torch.float64)
    U = nearest_etf(W.mT if out_features <= in_features else W)
    return _from_frame(U, out_features, in_features).to(weight.dtype)


class ETFLinear(nn.Linear):
    """y = x W^T + b with W [out, in] a fixed simplex ETF (`etf_weight`) and an optional
    trainable bias b [out] (initialised as in nn.Linear, U(-1/sqrt(in), 1/sqrt(in))).

    `weight` is an nn.Parameter with requires_grad=False: code that reads `module.weight` of an
    nn.Linear keeps working, autograd never computes its gradient and optimisers skip it.
    Pass `weight` to adopt a precomputed ETF (e.g. `nearest_etf_weight(W)`), else `frame`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        frame: Tensor | None = None,
        weight: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_shape(out_features, in_features)
        if weight is not None and frame is not None:
            raise ValueError("pass either weight (a precomputed ETF) or frame, not both")
        if weight is not None and weight.shape != (out_features, in_features):
            raise ValueError(
                f"weight must have shape ({out_features}, {in_features}), got {tuple(weight.shape)}"
            )
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if weight is None:
            weight = etf_weight(out_features, in_features, frame, dtype=dtype, device=device)
        self.weight = nn.Parameter(
            weight.detach().to(dtype=self.weight.dtype, device=self.weight.device).clone(),
            requires_grad=False,
        )

    def reset_parameters(self) -> None:
        """Re-initialise the bias as nn.Linear does; the ETF weight is fixed."""
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear modules (ETFLinear included) in registration order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def trainable_parameters(model: nn.Module) -> int:
    """Number of scalar parameters with requires_grad=True."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _to_etf(linear: nn.Linear, mode: str) -> ETFLinear:
    weight = nearest_etf_weight(linear.weight) if mode == "nearest" else None
    etf = ETFLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        weight=weight,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    if linear.bias is not None:
        etf.bias = linear.bias  # the same Parameter: an optimiser holding it keeps updating it
    etf.train(linear.training)
    return etf


def convert_to_etf(model: nn.Module, names: Sequence[str], mode: str = "canonical") -> None:
    """Replace the nn.Linear submodules `names` (qualified names as in `named_modules`) of
    `model` in place by ETFLinear layers of the same shape, keeping the module tree, the names
    and the bias (the same trainable Parameter). mode "canonical": the canonical ETF
    (`etf_weight`); "nearest": the ETF nearest to the layer's current weight
    (`nearest_etf_weight`). Layers that already are ETFLinear are left as they are.

    All names are checked before anything changes (ValueError/TypeError otherwise). An
    optimiser built earlier still holds the old weight Parameter: it no longer receives a
    gradient, so (with zero_grad(set_to_none=True)) torch's optimisers skip it.
    """
    check_choice("mode", mode, ETF_MODES)
    if isinstance(names, str):
        raise TypeError("names must be a sequence of module names, not a single string")
    modules = dict(model.named_modules())
    for name in names:
        if name == "":
            raise ValueError("cannot convert the model itself; name one of its submodules")
        if name not in modules:
            raise ValueError(f"the model has no submodule named {name!r}")
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(f"{name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
    for name in names:
        linear = modules[name]
        if isinstance(linear, ETFLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _to_etf(linear, mode))


def fix_last_layers(model: nn.Module, k: int, mode: str = "canonical") -> list[str]:
    """Convert the last k nn.Linear layers (registration order) of `model` to ETFs
    (`convert_to_etf`); returns their names."""
    names = linear_layer_names(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(names):
        raise ValueError(f"k must be an int in [0, {len(names)}] (the linear layers), got {k!r}")
    chosen = names[len(names) - k :]
    convert_to_etf(model, chosen, mode)
    return chosen
