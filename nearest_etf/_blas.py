"""The Gram matrix A^T A by a symmetric rank-k update (BLAS syrk) on the CPU.

A general product `A.mT @ A` computes all n^2 entries of the symmetric n x n result; syrk
computes one triangle, half the multiply-adds. torch exposes no syrk, so large float32/float64
CPU matrices go through SciPy's BLAS wrappers (zero-copy views of the tensor's memory), with
SciPy's BLAS limited to torch's current intra-op thread count (benchmarks/solver_speed.py
measures the nearest-ETF solve that uses it). Other devices, dtypes, batches and small matrices
take `A.mT @ A`.
"""

from __future__ import annotations

import torch
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController
from torch import Tensor

from nearest_etf._threads import is_small

__all__ = ["gram"]

_CONTROLLER = ThreadpoolController()
_SYRK = {torch.float32: blas.ssyrk, torch.float64: blas.dsyrk}


def gram(A: Tensor) -> Tensor:
    """A^T A [..., n, n] for A[..., m, n], symmetric to the bit (not differentiable: for use
    inside autograd Functions and checks). By syrk for a large 2-D float32/float64 CPU matrix,
    whose upper triangle is then copied from the lower one."""
    if A.device.type != "cpu" or A.ndim != 2 or A.dtype not in _SYRK or is_small(A):
        return A.detach().mT @ A.detach()
    array = A.detach().contiguous().numpy()  # C order [m, n]: its transpose is Fortran [n, m]
    with _CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas"):
        lower = _SYRK[A.dtype](1.0, array.T, trans=0, lower=1)  # array.T @ array = A^T A
    lower = torch.from_numpy(lower)
    return lower.tril(-1).mT.add_(lower)
