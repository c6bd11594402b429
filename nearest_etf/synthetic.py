"""Synthetic nearest-ETF problems shared by the demo, the tests and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nearest_etf.etf import random_stiefel, simplex_etf
from nearest_etf.nearest import nearest_etf

__all__ = ["NearestETFProblem", "noisy_etf_problem"]


@dataclass(frozen=True)
class NearestETFProblem:
    """H [d, K] centred class means, prox [d, K] a previous solution, G [d, K] an upstream
    gradient dL/dU."""

    H: Tensor
    prox: Tensor
    G: Tensor


def noisy_etf_problem(
    d: int,
    K: int,
    *,
    noise: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> NearestETFProblem:
    """Means mid-way through collapse: H = R M_K + noise * E C (R Haar on St(d, K), E Gaussian,
    C centring), prox = the nearest ETF of an independently perturbed copy, G Gaussian."""
    g = torch.Generator().manual_seed(seed)
    R = random_stiefel(d, K, generator=g, dtype=torch.float64)
    M = simplex_etf(K, dtype=torch.float64)

    def perturbed() -> Tensor:
        E = torch.randn(d, K, generator=g, dtype=torch.float64)
        return R @ M + noise * (E - E.mean(dim=1, keepdim=True))

    H = perturbed()
    prox = nearest_etf(perturbed())
    G = torch.randn(d, K, generator=g, dtype=torch.float64)
    return NearestETFProblem(*(t.to(dtype=dtype, device=device) for t in (H, prox, G)))
