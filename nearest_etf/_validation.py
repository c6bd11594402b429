"""Input checks and scale-safe norms shared by the public entry points.

Checks raise a ValueError/TypeError naming the problem, before any state is touched.

**dtype policy.** Every public entry point takes float16, bfloat16, float32 or float64 tensors.
float16 and bfloat16 inputs are computed in float32 (`check_float_tensor` casts them up, so the
results are float32 tensors or Python floats); any other dtype (integer, bool, complex) raises a
TypeError naming it.

**Scale safety.** A norm or a normalisation computed as sqrt(sum x_i^2) overflows for entries
above sqrt(max) of the dtype (1.8e19 in float32) and underflows below sqrt(tiny) (1.1e-19).
`pow2_scale` rescales by an exact power of two first (as LAPACK's nrm2 rescales), so
`scale_safe_norm` and `normalise` are exact in the sense of rounding over the whole range of the
dtype, and scale-invariant quantities are computed on the rescaled input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

from nearest_etf._blas import gram

SUPPORTED_DTYPES = (torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)

Dims = int | tuple[int, ...]
T = TypeVar("T")

# Raised by a backward asked for a graph of itself (create_graph=True): the closed forms give
# first derivatives only, and a silently partial second derivative would be wrong.
SECOND_ORDER_ERROR = (
    "second derivatives through the {what} are not implemented: its backward is a closed-form "
    "first derivative. Differentiate it once (create_graph=False), or detach it from the "
    "graph that needs higher derivatives"
)


def from_shorthand(
    kind: str, value: object, made: Mapping[str, Callable[[], T]], objects: str
) -> T:
    """The object a string shorthand names (`made[value]()`); ValueError for an unknown name,
    listing the shorthands and the `objects` that may be passed instead. For non-strings the
    caller checks the type itself."""
    if value not in made:
        raise ValueError(
            f"unknown {kind} {value!r}; choose one of {', '.join(map(repr, made))} or pass "
            f"{objects}"
        )
    return made[value]()  # type: ignore[index]


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_float_tensor(name: str, x: object) -> Tensor:
    """`x` as a float32/float64 tensor with finite entries (the dtype policy of the module
    docstring: float16/bfloat16 are returned cast to float32, differentiably). Raises TypeError
    for a non-tensor or another dtype, ValueError for NaN or inf entries."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype in LOW_PRECISION:
        x = x.float()
    elif x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    if not all_finite(x):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return x


def all_finite(x: Tensor) -> bool:
    """Whether every entry of x is finite, by one reduction instead of an elementwise isfinite
    pass: a finite sum proves it (NaN/inf propagate); only when it is not, look closer (the sum
    may have overflowed)."""
    return bool(torch.isfinite(x.detach().sum())) or bool(torch.isfinite(x).all())


def as_float64(name: str, x: object) -> Tensor:
    """A detached float64 CPU copy of a real tensor `x` (any floating dtype, or int64, int32,
    uint8 such as raw pixels) with finite entries; TypeError for another type or dtype,
    ValueError for NaN or inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int64, torch.int32, torch.uint8)):
        raise TypeError(f"{name} must be a real tensor, got {x.dtype}")
    x = x.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return x


def pow2_scale(x: Tensor, dim: Dims) -> Tensor:
    """c = 2^-e (no gradient, reduced dims kept) with max |x c| over `dim` in [1/2, 1): the exact
    rescaling of the module docstring. c = 1 for an all-zero slice; for a subnormal maximum, c is
    capped at the dtype's largest power of two (max |x c| is then below 1/2, still normal)."""
    return _pow2_scale_of_peak(max_abs(x.detach(), dim, keepdim=True))


def max_abs(x: Tensor, dim: Dims, keepdim: bool = False) -> Tensor:
    """max |x| over `dim` (an int or a tuple): by one full `aminmax` pass (no |x| temporary)
    when `dim` covers every dimension, else by abs().amax()."""
    dims = {d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim)}
    if x.numel() == 0 or len(dims) != x.ndim:
        return x.abs().amax(dim=dim, keepdim=keepdim)
    low, high = torch.aminmax(x)
    peak = torch.maximum(high, -low)
    return peak.reshape((1,) * x.ndim) if keepdim else peak


def _pow2_scale_of_peak(peak: Tensor) -> Tensor:
    """`pow2_scale` from the maxima max |x| (any shape, non-negative)."""
    exponent = torch.frexp(peak).exponent
    top = math.frexp(torch.finfo(peak.dtype).max)[1] - 1  # 2^top: the largest finite power of 2
    return torch.ldexp(torch.ones_like(peak), (-exponent).clamp(max=top))


def scale_safe_norm(x: Tensor, dim: Dims) -> Tensor:
    """||x||_2 over `dim` (a tuple for the Frobenius norm) without intermediate overflow or
    underflow: ||x c|| / c with c = `pow2_scale(x, dim)`; reduced dims removed."""
    c = pow2_scale(x, dim)
    return (torch.linalg.vector_norm(x * c, dim=dim, keepdim=True) / c).squeeze(dim)


class _Normalise(torch.autograd.Function):
    """u = x / ||x|| with the closed-form vector-Jacobian product
    dL/dx = (g - u <u, g>) / ||x|| (g = dL/du, inner product over the normalised dims): four
    elementwise passes instead of autograd's chain through the rescaling, the norm and the
    division. Under create_graph (second derivatives) the same formula is evaluated with u and
    ||x|| recomputed differentiably from x, so higher derivatives are exact too."""

    @staticmethod
    def forward(x: Tensor, dim: Dims) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        c = pow2_scale(x, dim)
        y = x * c
        norm = torch.linalg.vector_norm(y, dim=dim, keepdim=True)
        norm = norm.where(norm > 0, torch.ones_like(norm))
        return y.div_(norm), c / norm  # u, and 1 / ||x|| (c for a zero slice)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Dims], output: tuple[Tensor, Tensor]) -> None:  # type: ignore[override]
        ctx.dim = inputs[1]
        ctx.save_for_backward(inputs[0], *output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g: Tensor, _: Tensor | None) -> tuple[Tensor, None]:  # type: ignore[override]
        x, u, inverse_norm = ctx.saved_tensors
        dim = ctx.dim
        if torch.is_grad_enabled():  # create_graph: a graph of the derivative in x
            u, inverse_norm = _normalise_differentiably(x, dim)
            return (g - u * (g * u).sum(dim=dim, keepdim=True)) * inverse_norm, None
        dot = (g * u).sum(dim=dim, keepdim=True)
        return torch.addcmul(g, u, dot, value=-1).mul_(inverse_norm), None


def _normalise_differentiably(x: Tensor, dim: Dims) -> tuple[Tensor, Tensor]:
    """(x / ||x||, 1 / ||x||) by differentiable torch operations (the scale-safe rescaling c is
    a constant power of two); a zero slice gives (0, c)."""
    c = pow2_scale(x, dim)
    norm = torch.linalg.vector_norm(x * c, dim=dim, keepdim=True)
    norm = norm.where(norm > 0, torch.ones_like(norm))
    return (x * c) / norm, c / norm


def normalise(x: Tensor, dim: Dims) -> Tensor:
    """x / ||x||_2 over `dim` (a tuple for the Frobenius norm), scale-safe (module docstring) and
    differentiable to any order, by the closed-form derivative (I - u u^T) / ||x|| of
    u = x / ||x||. An all-zero slice stays zero (its derivative there is taken as I / c, c the
    rescaling); callers that need a unit norm reject it first."""
    return _Normalise.apply(x, dim)[0]


def coincide(centred: Tensor, reference: Tensor, dim: Dims, count: int | Tensor) -> Tensor:
    """Whether means coincide: the centred means vanish to rounding over `dim`,
    max |centred| <= count * eps * max |reference| (`count` = how many means were averaged, the
    bound on the rounding of their mean). Scale-safe: maxima, no squares. Reduced dims removed."""
    eps = torch.finfo(centred.dtype).eps
    spread = max_abs(centred.detach(), dim)
    return spread <= count * eps * max_abs(reference.detach(), dim)


def check_class_means(H: object) -> Tensor:
    """H[..., d, K] with K >= 2, d >= K, finite, a float dtype (low precision cast to float32)
    and, per problem, centred means H C that do not vanish (`coincide`: all class means equal,
    nothing to fit). Checked at the scale of H, so tiny or huge H are accepted."""
    H = check_float_tensor("H", H)
    if H.ndim < 2:
        raise ValueError(
            f"H must have shape [..., d, K] (class means as columns), got {tuple(H.shape)}"
        )
    d, K = H.shape[-2:]
    if K < 2:
        raise ValueError(f"H has K={K} columns; a simplex ETF needs K >= 2 classes")
    if d < K:
        raise ValueError(
            f"H has d={d} rows and K={K} columns; St(d, K) needs d >= K (feature dim >= classes)"
        )
    peak = max_abs(H.detach(), (-2, -1), keepdim=True)
    if bool((peak == 0).any()):
        raise ValueError("H has zero Frobenius norm (H = 0): no class means, nothing to fit")
    scale = _pow2_scale_of_peak(peak)
    scaled = H.detach() * scale
    centred = scaled - scaled.mean(dim=-1, keepdim=True)  # H C, rescaled: |entries| < 2
    # the reference maximum is max |scaled| = peak * scale: no second pass over H
    if bool(coincide(centred, peak * scale, (-2, -1), K).any()):
        raise ValueError(
            "H has centred means H C = 0 (to rounding): all class means coincide, nothing to fit"
        )
    return H


def check_stiefel(
    name: str, U: object, shape: torch.Size, dtype: torch.dtype, atol: float = 1e-3
) -> Tensor:
    """U with the given shape/dtype (after the dtype policy) and orthonormal columns:
    max |U^T U - I| <= atol."""
    U = check_float_tensor(name, U)
    if U.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(U.shape)}")
    if U.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {U.dtype}")
    deviation = gram(U)
    deviation.diagonal(dim1=-2, dim2=-1).sub_(1)  # U^T U - I
    err = deviation.abs().amax()
    if float(err) > atol:
        raise ValueError(
            f"{name} must have orthonormal columns (U^T U = I); max |U^T U - I| = {float(err):.3g}"
        )
    return U


def check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """`value` if it is an int (not a bool) >= `minimum`; TypeError for another type, ValueError
    for a smaller int, each naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
