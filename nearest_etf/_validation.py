"""Input checks shared by the public entry points: each raises a ValueError/TypeError naming
the problem, before any state is touched."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """Raise ValueError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_float_tensor(name: str, x: object) -> Tensor:
    """A float32/float64 tensor with finite entries."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    # One reduction instead of an elementwise isfinite pass: a finite sum proves every entry
    # finite (NaN/inf propagate); only when it is not, look closer (it may have overflowed).
    if not bool(torch.isfinite(x.detach().sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return x


def check_class_means(H: object) -> Tensor:
    """H[..., d, K] with K >= 2, d >= K, finite, and nonzero Frobenius norm per problem."""
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
    if bool((torch.linalg.matrix_norm(H) == 0).any()):
        raise ValueError("H has zero Frobenius norm: all class means coincide, nothing to fit")
    return H


def check_stiefel(
    name: str, U: object, shape: torch.Size, dtype: torch.dtype, atol: float = 1e-3
) -> Tensor:
    """U with the given shape/dtype and orthonormal columns: max |U^T U - I| <= atol."""
    U = check_float_tensor(name, U)
    if U.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(U.shape)}")
    if U.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {U.dtype}")
    eye = torch.eye(shape[-1], dtype=dtype, device=U.device)
    err = (U.detach().mT @ U.detach() - eye).abs().amax()
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
