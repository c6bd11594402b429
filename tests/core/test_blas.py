"""gram(A) = A^T A on both of its paths (syrk for large CPU matrices, a general product
otherwise), against a float64 product of the same matrix."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from nearest_etf._blas import gram
from nearest_etf._threads import SMALL_WORK, is_small, single_threaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3), (600, 200), (3, 40, 8)])
def test_gram_is_the_symmetric_product(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    G = gram(A)
    reference = (A.double().mT @ A.double()).to(dtype)
    tol = {"atol": 1e-3, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(G, reference, **tol)
    assert torch.equal(G, G.mT) and G.dtype == dtype


def test_the_syrk_path_runs_and_keeps_blas_threads() -> None:
    A = torch.randn(600, 200, dtype=torch.float64)
    assert not is_small(A) and A.numel() * A.shape[1] > SMALL_WORK  # the syrk path
    before = [pool["num_threads"] for pool in threadpool_info()]
    with single_threaded():
        G = gram(A)
    assert [pool["num_threads"] for pool in threadpool_info()] == before
    torch.testing.assert_close(G, A.mT @ A)
    # not differentiable by design: the input's graph is not followed
    assert not gram(A.clone().requires_grad_(True)).requires_grad
