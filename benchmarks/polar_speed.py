"""Candidates for the polar factor's forward and backward, side by side in one run.

For each size (d, K) and dtype, A is the nearest-ETF Procrustes target of `noisy_etf_problem`
(noise 1/sqrt(d) per entry, delta 1e-3; kappa = s_max / s_min is printed: about 4.6 at
2048x1000, 30 at 512x100, 240 at 512x10) and G a Gaussian upstream gradient:

  svd             one torch.linalg.svd(A): the reference of every ratio
  svd+vjp6        polar_svd, then the term-by-term backward (P^+ formed in the backward, six
                  K^3 products)
  svd+vjp         polar_svd with the current backward (P^+ saved, four K^3 products)
  gram32          A^T A and its eigh in float32 (float32 inputs; polished only where the guard
                  asks), + the current backward
  gram32+polish   gram32 with the Newton-Schulz polish forced (its cost where kappa > 5.7)
  gram64          A^T A and its eigh in float64, + the current backward
  polar           the package: torch.autograd through `polar(A)` (picks among the above and
                  runs small problems on one thread)

Each candidate is timed as forward alone and as forward + backward; every repeat runs every
candidate in turn (interleaved, so all see the same machine load; calls under 50 ms looped to
one sample of at least 50 ms) and the medians are reported. `--accuracy` adds, for spectra
log-spaced over [1/kappa, 1], the orthonormality error max|Q^T Q - I| and the distance
max|Q - Q_ref| of the SVD and Gram routes, Q_ref the polar factor from the float64 SVD (float32
inputs) or the float64 SVD route itself (float64 inputs).

    .venv/bin/python benchmarks/polar_speed.py [--sizes 2048x1000,512x100,512x10]
        [--dtypes float32,float64] [--threads 1] [--repeats 7] [--accuracy]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from nearest_etf import polar, procrustes_target, random_stiefel
from nearest_etf.polar_decomposition import _null_tolerance, polar_gram, polar_svd, polar_vjp
from nearest_etf.synthetic import noisy_etf_problem

DEFAULT_SIZES = ((2048, 1000), (512, 100), (512, 10))
DELTA = 1e-3
ACCURACY_KAPPAS = (2.0, 5.6, 5.8, 11.0, 15.0, 100.0)
MIN_SAMPLE_SECONDS = 0.05  # fast calls are looped so that one sample lasts at least this
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _vjp6(Q: Tensor, V: Tensor, s: Tensor, G: Tensor) -> Tensor:
    """The backward of docs/math.md §2b term by term: P^+ formed here, V^T Bk V and
    V ratio V^T, Q^T G P^+: six K^3 products besides the three d x K x K ones."""
    tol = _null_tolerance(s, Q.shape)
    QtG = Q.mT @ G
    Bk = (QtG - QtG.mT) / 2
    denom = s.unsqueeze(-1) + s.unsqueeze(-2)
    ratio = torch.where(denom > tol.unsqueeze(-1), (V.mT @ Bk @ V) / denom, torch.zeros_like(denom))
    Y = V @ ratio @ V.mT
    inv_s = torch.where(s > tol, 1.0 / s, torch.zeros_like(s))
    P_pinv = (V * inv_s.unsqueeze(-2)) @ V.mT
    return Q @ (2 * Y - QtG @ P_pinv) + G @ P_pinv


def _polish(Q: Tensor) -> Tensor:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    return Q + Q @ ((eye - Q.mT @ Q) / 2)


def _gram(A: Tensor, dtype: torch.dtype, force_polish: bool = False) -> tuple[Tensor, ...]:
    (Q, V, s, W), ok = polar_gram(A, dtype)
    if not bool(ok.all()):
        raise ValueError(f"the {dtype} Gram route fails its guard here")
    return (_polish(Q) if force_polish else Q), V, s, W


def _candidates(A: Tensor, G: Tensor) -> dict[str, tuple[Callable[[], object], ...]]:
    """name -> (forward, forward + backward) callables for A, G."""

    def svd() -> object:
        return torch.linalg.svd(A, full_matrices=False)

    def svd_vjp6() -> Tensor:
        Q, V, s = polar_svd(A)
        return _vjp6(Q, V, s, G)

    def svd_vjp() -> Tensor:
        Q, V, s = polar_svd(A)
        return polar_vjp(Q, V, s, G)

    def gram(dtype: torch.dtype, force_polish: bool = False) -> tuple[Callable[[], object], ...]:
        def forward() -> object:
            return _gram(A, dtype, force_polish)

        def both() -> Tensor:
            Q, V, s, W = _gram(A, dtype, force_polish)
            return polar_vjp(Q, V, s, G, W)

        return forward, both

    leaf = A.clone().requires_grad_(True)

    def package_forward() -> Tensor:
        with torch.no_grad():
            return polar(A)

    def package_both() -> Tensor:
        (grad,) = torch.autograd.grad(polar(leaf), leaf, G)
        return grad

    out: dict[str, tuple[Callable[[], object], ...]] = {
        "svd": (svd,),
        "svd+vjp6": (lambda: polar_svd(A), svd_vjp6),
        "svd+vjp": (lambda: polar_svd(A), svd_vjp),
    }
    gram_dtypes = [torch.float32, torch.float64] if A.dtype == torch.float32 else [torch.float64]
    for dtype in gram_dtypes:
        if bool(polar_gram(A, dtype)[1].all()):
            name = "gram32" if dtype == torch.float32 else "gram64"
            out[name] = gram(dtype)
            if dtype == A.dtype:
                out[f"{name}+polish"] = gram(dtype, force_polish=True)
    out["polar"] = (package_forward, package_both)
    return out


def time_candidates(A: Tensor, G: Tensor, repeats: int) -> dict[str, tuple[float, float | None]]:
    """name -> (median forward seconds, median forward + backward seconds or None). Calls faster
    than MIN_SAMPLE_SECONDS are looped so that one sample lasts about that long."""
    candidates = _candidates(A, G)
    loops: dict[tuple[str, int], int] = {}
    samples: dict[tuple[str, int], list[float]] = {}
    for name, fns in candidates.items():
        for i, fn in enumerate(fns):
            fn()  # warm-up
            start = time.perf_counter()
            fn()
            first = time.perf_counter() - start
            loops[(name, i)] = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(first, 1e-9)))
            samples[(name, i)] = []
    for _ in range(repeats):
        for name, fns in candidates.items():
            for i, fn in enumerate(fns):
                n = loops[(name, i)]
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[(name, i)].append((time.perf_counter() - start) / n)
    result = {}
    for name, fns in candidates.items():
        forward = statistics.median(samples[(name, 0)])
        both = statistics.median(samples[(name, 1)]) if len(fns) > 1 else None
        result[name] = (forward, both)
    return result


def problem(d: int, K: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """(A, G, kappa) of the nearest-ETF problem at (d, K) in dtype."""
    p = noisy_etf_problem(d, K, noise=1 / math.sqrt(d), seed=0, dtype=torch.float64)
    A = procrustes_target(p.H / p.H.norm(), p.prox, DELTA)
    s = torch.linalg.svdvals(A)
    return A.to(dtype), p.G.to(dtype), float(s[0] / s[-1])


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def speed_table(sizes: list[tuple[int, int]], dtypes: list[str], repeats: int) -> list[str]:
    lines = [
        f"{'d x K':>10} {'dtype':<8} {'kappa':>6}  {'candidate':<14} {'forward':>10} "
        f"{'/ svd':>6} {'fwd+bwd':>10} {'/ svd':>6}"
    ]
    lines.append("-" * len(lines[0]))
    for d, K in sizes:
        for name in dtypes:
            A, G, kappa = problem(d, K, DTYPES[name])
            times = time_candidates(A, G, repeats)
            svd = times["svd"][0]
            for candidate, (forward, both) in times.items():
                ratio_both = "-" if both is None else f"{both / svd:.2f}"
                lines.append(
                    f"{f'{d}x{K}':>10} {name:<8} {kappa:>6.3g}  {candidate:<14} "
                    f"{_ms(forward):>10} {forward / svd:>6.2f} {_ms(both):>10} {ratio_both:>6}"
                )
    return lines


def _spectrum_matrix(d: int, K: int, kappa: float, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(0)
    L = random_stiefel(d, K, generator=g, dtype=torch.float64)
    V = random_stiefel(K, K, generator=g, dtype=torch.float64)
    s = torch.logspace(0, -math.log10(kappa), K, dtype=torch.float64)
    return ((L * s) @ V.T).to(dtype)


def _errors(Q: Tensor, reference: Tensor) -> str:
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    orthonormality = float((Q.mT @ Q - eye).abs().amax())
    distance = float((Q - reference).abs().amax())
    return f"{orthonormality:.1e} {distance:.1e}"


def accuracy_table(sizes: list[tuple[int, int]], dtypes: list[str]) -> list[str]:
    lines = [
        f"{'d x K':>10} {'dtype':<8} {'kappa':>6}  "
        "svd: orth dist     gram same dtype: orth dist (guard)   gram float64: orth dist (guard)"
    ]
    lines.append("-" * len(lines[0]))
    for d, K in sizes:
        for name in dtypes:
            dtype = DTYPES[name]
            for kappa in ACCURACY_KAPPAS:
                A = _spectrum_matrix(d, K, kappa, dtype)
                reference = polar_svd(A.double())[0]
                cells = [_errors(polar_svd(A)[0], reference)]
                for compute in dict.fromkeys([dtype, torch.float64]):
                    (Q, *_), ok = polar_gram(A, compute)
                    cells.append(f"{_errors(Q, reference)} ({'pass' if bool(ok) else 'FAIL'})")
                lines.append(f"{f'{d}x{K}':>10} {name:<8} {kappa:>6.3g}  " + "     ".join(cells))
    return lines


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are DxK pairs like 512x10, got {text!r}") from None
    if not all(len(s) == 2 and s[0] >= s[1] >= 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"each size needs d >= K >= 2, got {text!r}")
    return sizes  # type: ignore[return-value]


def _parse_dtypes(text: str) -> list[str]:
    names = text.split(",")
    if not all(name in DTYPES for name in names):
        raise argparse.ArgumentTypeError(f"dtypes are float32 and/or float64, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=_parse_sizes, default=list(DEFAULT_SIZES), help="comma-separated DxK"
    )
    parser.add_argument("--dtypes", type=_parse_dtypes, default=list(DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats")
    parser.add_argument("--accuracy", action="store_true", help="also the accuracy table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"polar factor candidates: {args.threads} thread(s), median of {args.repeats} "
        f"interleaved repeats, 1-min load average {load:.2f}"
    )
    print("\n".join(speed_table(args.sizes, args.dtypes, args.repeats)))
    if args.accuracy:
        print("\naccuracy: max|Q^T Q - I| and max|Q - Q_ref|; guard: the Gram route's own verdict")
        print("\n".join(accuracy_table(args.sizes, args.dtypes)))
    print(f"1-min load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
