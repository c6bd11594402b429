"""Speed of the nearest-ETF solvers and backward modes, side by side in one run.

For each size (d, K), float64 unless said, one problem (`noisy_etf_problem`: noisy simplex-ETF
class means H, prox = the nearest ETF of an independently perturbed copy, random upstream G):

  forward   procrustes (closed form), trust-regions (pymanopt with the reference code's settings:
            at most 30 iterations, stopping at gradient norm 1e-6), trust-regions-30 (the same
            run for all 30 iterations: no gradient-norm stop), riemannian-adam (geoopt), each
            `nearest_etf(H, prox, solver=...)`;
  floor     one torch.linalg.svd of the d x K matrix A that procrustes decomposes;
  backward  analytic, cg, kkt (generic dense, only where dK <= 6000): dL/dH by
            torch.autograd.grad through `nearest_etf(H, prox, backward=...)`, and the reference
            paper's structured KKT solve (benchmarks/structured_kkt.py), all at the closed-form U;
  float32   procrustes + analytic forward+backward (`nearest_etf` with its input checks, the
            polar factor by the Gram route of nearest_etf/polar_decomposition.py) against one
            float32 SVD of A, timed interleaved.

Ratios are against procrustes (forward, floor) or analytic (backward); accuracy is the
relative objective gap and ||U - U_ref|| (forward) or the relative gradient error (backward)
against procrustes + analytic in float64. Every measurement runs in a worker process that is
killed after --skip-slow seconds ("> cap"); a method whose memory estimate exceeds 8 GB is not
run and its estimate is printed instead.

    .venv/bin/python benchmarks/solver_speed.py [--sizes 512x10,512x50,512x100,2048x1000]
        [--repeats 5] [--skip-slow 150] [--threads 2] [--out results/solver_speed]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from structured_kkt import structured_kkt_backward, structured_kkt_memory_bytes
from torch import Tensor
from tqdm import tqdm

from nearest_etf import TrustRegions, nearest_etf, nearest_etf_objective, procrustes_target
from nearest_etf.synthetic import noisy_etf_problem

DEFAULT_SIZES = ((512, 10), (512, 50), (512, 100), (2048, 1000))
DELTA = 1e-3
MEMORY_LIMIT_BYTES = 8 * 1024**3
DENSE_KKT_MAX_NUMEL = 6000
REPEAT_SHARE = 0.2  # timed repeats stop once a method has used this share of its cap
MIN_SAMPLE_SECONDS = 0.05  # fast calls are looped so that one sample lasts at least this

FORWARD = ("procrustes", "trust-regions", "trust-regions-30", "riemannian-adam")
# Solver arguments of nearest_etf for the forward methods that are not its named solvers.
_SOLVER_OPTIONS = {"trust-regions-30": TrustRegions(max_iterations=30, min_gradient_norm=0.0)}
BACKWARD = ("analytic", "cg", "kkt", "structured-kkt")
FLOAT32 = "float32 fwd+bwd"

TARGET_FORWARD = (512, 100, 300.0)  # procrustes >= 300x faster than trust-regions
TARGET_BACKWARD = (512, 50, 500.0)  # analytic >= 500x faster than structured KKT
TARGET_FLOAT32 = (2048, 1000, 1.0)  # float32 fwd+bwd <= 1x one SVD


@dataclass
class Row:
    """One line of the table. seconds: median time of one call (None when not run)."""

    d: int
    K: int
    stage: str  # forward | floor | backward | float32
    method: str
    seconds: float | None = None
    min_seconds: float | None = None
    samples: int = 0
    ratio: float | None = None  # seconds / reference seconds (> 1: slower than the reference)
    ratio_is_lower_bound: bool = False
    objective_gap: float | None = None
    solution_distance: float | None = None
    gradient_error: float | None = None
    memory_estimate_gb: float | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- worker side


def _dense_kkt_memory_bytes(d: int, K: int, dtype: torch.dtype = torch.float64) -> int:
    """The generic dense KKT backward holds the n x n Hessian from torch.func.hessian with its
    vmapped intermediates, the bordered (n + m) x (n + m) matrix and its LU copy (n = dK,
    m = K(K+1)/2): about 11 (n + m)^2 entries at peak (resident memory measured at 512x10 and
    300x20), rounded up to 12."""
    size = d * K + K * (K + 1) // 2
    return 12 * size * size * torch.empty(0, dtype=dtype).element_size()


def memory_estimate_bytes(method: str, d: int, K: int) -> int | None:
    """Peak-memory model of the methods that form dense matrices; None for the O(dK) ones."""
    if method == "structured-kkt":
        return structured_kkt_memory_bytes(d, K, torch.float64)
    if method == "kkt":
        return _dense_kkt_memory_bytes(d, K, torch.float64)
    return None


@dataclass
class _Problem:
    H: Tensor
    prox: Tensor
    G: Tensor
    Hn: Tensor
    U_ref: Tensor
    grad_ref: Tensor
    objective_ref: float


def _analytic_gradient(H: Tensor, prox: Tensor, G: Tensor) -> Tensor:
    """dL/dH for L = <G, nearest_etf(H, prox)>: procrustes forward + analytic backward."""
    leaf = H.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nearest_etf(leaf, prox, delta=DELTA), leaf, G)
    return grad


def _make_problem(d: int, K: int, noise: float) -> _Problem:
    problem = noisy_etf_problem(d, K, noise=noise / math.sqrt(d), seed=0, dtype=torch.float64)
    H, prox, G = problem.H, problem.prox, problem.G
    Hn = H / H.norm()
    U_ref = nearest_etf(H, prox, delta=DELTA)
    grad_ref = _analytic_gradient(H, prox, G)
    objective_ref = float(nearest_etf_objective(Hn, U_ref, prox, DELTA))
    return _Problem(H, prox, G, Hn, U_ref, grad_ref, objective_ref)


def _timed_calls(fn: Callable[[], Any], repeats: int, budget: float) -> tuple[list[float], Any]:
    """Seconds per call and the last output: one warm-up call, then up to `repeats` samples while
    the total stays within `budget`; calls faster than MIN_SAMPLE_SECONDS are looped per sample.
    When not even one sample fits, the warm-up call is the only measurement."""
    start = time.perf_counter()
    output = fn()
    first = time.perf_counter() - start
    loops = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(first, 1e-9)))
    samples: list[float] = []
    while len(samples) < repeats:
        last = samples[-1] * loops if samples else first * loops
        if time.perf_counter() - start + last > budget:
            break
        t0 = time.perf_counter()
        for _ in range(loops):
            output = fn()
        samples.append((time.perf_counter() - t0) / loops)
    return samples or [first], output


def _relative(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _measure(problem: _Problem, method: str, repeats: int, budget: float) -> dict[str, Any]:
    """Time one method on the problem and compare its output with procrustes + analytic."""
    H, prox, G, Hn = problem.H, problem.prox, problem.G, problem.Hn
    out: dict[str, Any] = {}
    if method in FORWARD:

        def solve() -> Tensor:
            with torch.no_grad(), warnings.catch_warnings():
                if method in _SOLVER_OPTIONS:  # stops on its cap by design: no warning per call
                    warnings.simplefilter("ignore", RuntimeWarning)
                solver = _SOLVER_OPTIONS.get(method, method)
                return nearest_etf(H, prox, delta=DELTA, solver=solver)

        out["samples"], U = _timed_calls(solve, repeats, budget)
        objective = float(nearest_etf_objective(Hn, U, prox, DELTA))
        out["objective_gap"] = (objective - problem.objective_ref) / abs(problem.objective_ref)
        out["solution_distance"] = float(torch.linalg.norm(U - problem.U_ref))
    elif method == "svd":
        A = procrustes_target(Hn, prox, DELTA)
        out["samples"], _ = _timed_calls(
            lambda: torch.linalg.svd(A, full_matrices=False), repeats, budget
        )
    elif method == "structured-kkt":
        norm = H.norm()

        def backward() -> Tensor:
            g = structured_kkt_backward(Hn, prox, problem.U_ref, DELTA, G)
            return (g - (g * Hn).sum() * Hn) / norm  # chain through Hn = H / ||H||

        out["samples"], grad = _timed_calls(backward, repeats, budget)
        out["gradient_error"] = _relative(grad, problem.grad_ref)
    elif method in BACKWARD:
        leaf = H.clone().requires_grad_(True)
        U = nearest_etf(leaf, prox, delta=DELTA, backward=method)
        out["samples"], (grad,) = _timed_calls(
            lambda: torch.autograd.grad(U, leaf, G, retain_graph=True), repeats, budget
        )
        out["gradient_error"] = _relative(grad, problem.grad_ref)
    else:
        raise ValueError(f"unknown method {method!r}")
    return out


def _measure_float32(problem: _Problem, repeats: int, budget: float) -> dict[str, Any]:
    """float32 procrustes + analytic forward+backward and one float32 SVD of A, interleaved so
    that both see the same machine load."""
    H, prox, G = (t.float() for t in (problem.H, problem.prox, problem.G))
    A = procrustes_target(H / H.norm(), prox, DELTA)

    def forward_backward() -> Tensor:
        return _analytic_gradient(H, prox, G)

    def svd() -> object:
        return torch.linalg.svd(A, full_matrices=False)

    start = time.perf_counter()
    svd()
    forward_backward()
    fb_samples: list[float] = []
    svd_samples: list[float] = []
    while len(fb_samples) < repeats:
        spent = time.perf_counter() - start
        if fb_samples and spent + fb_samples[-1] + svd_samples[-1] > budget:
            break
        for fn, samples in ((svd, svd_samples), (forward_backward, fb_samples)):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    grad = forward_backward().double()
    return {
        "samples": fb_samples,
        "svd_samples": svd_samples,
        "gradient_error": _relative(grad, problem.grad_ref),
    }


def _serve(conn: Connection, noise: float, threads: int) -> None:
    """Worker loop: receive (d, K, method, repeats, budget); build (or reuse) the size's problem
    and send "ready"; then measure and send the result."""
    torch.set_num_threads(threads)
    # One-time costs (lazy imports, first-call initialisation) must not land in a measurement
    # that is a single cold call: run every method once on a tiny problem first.
    tiny = _make_problem(8, 3, noise)
    for method in (*FORWARD, "svd", *BACKWARD):
        _measure(tiny, method, repeats=0, budget=0.0)
    cached: tuple[tuple[int, int], _Problem] | None = None
    while True:
        job = conn.recv()
        if job is None:
            return
        d, K, method, repeats, budget = job
        if cached is None or cached[0] != (d, K):
            cached = None  # free the previous size first
            cached = ((d, K), _make_problem(d, K, noise))
        problem = cached[1]
        conn.send("ready")
        try:
            if method == FLOAT32:
                result = _measure_float32(problem, repeats, budget)
            else:
                result = _measure(problem, method, repeats, budget)
        except (RuntimeError, ValueError) as error:  # reported in the table, not hidden
            result = {"error": f"{type(error).__name__}: {error}"}
        conn.send(result)


# ---------------------------------------------------------------------------- parent side


class _Worker:
    """A spawned measuring process; killed and replaced when a job exceeds its cap."""

    def __init__(self, noise: float, threads: int) -> None:
        self.noise, self.threads = noise, threads
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(child, self.noise, self.threads), daemon=True
        )
        self.process.start()
        child.close()

    def run(self, job: tuple[int, int, str, int, float], cap: float) -> dict[str, Any] | None:
        """The job's result, or None when the measurement did not finish within `cap` seconds
        (building the size's problem first is not counted)."""
        self.conn.send(job)
        if self.conn.recv() != "ready":
            raise RuntimeError("solver_speed worker out of step")
        if self.conn.poll(cap):
            return self.conn.recv()
        self.process.kill()
        self.process.join()
        self._start()
        return None

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=30)


def _jobs(sizes: list[tuple[int, int]]) -> list[tuple[int, int, str, str]]:
    """(d, K, stage, method) in table order."""
    jobs = []
    for d, K in sizes:
        jobs += [(d, K, "forward", m) for m in FORWARD]
        jobs.append((d, K, "floor", "svd"))
        jobs += [(d, K, "backward", m) for m in BACKWARD]
        jobs.append((d, K, "float32", FLOAT32))
    return jobs


def _skip_reason(d: int, K: int, method: str) -> tuple[str, int | None]:
    """Why a method is not run at this size (empty when it is run), and its memory estimate."""
    estimate = memory_estimate_bytes(method, d, K)
    if method == "kkt" and d * K > DENSE_KKT_MAX_NUMEL:
        return f"not run: dK = {d * K} > {DENSE_KKT_MAX_NUMEL}", estimate
    if estimate is not None and estimate > MEMORY_LIMIT_BYTES:
        return f"not run: memory estimate {estimate / 1e9:.3g} GB > 8 GB", estimate
    return "", estimate


def run_benchmark(
    sizes: list[tuple[int, int]], repeats: int, cap: float, noise: float, threads: int
) -> list[Row]:
    rows: list[Row] = []
    worker = _Worker(noise, threads)
    try:
        for d, K, stage, method in tqdm(_jobs(sizes), desc="solver_speed", unit="job"):
            reason, estimate = _skip_reason(d, K, method)
            row = Row(d, K, stage, method, note=reason)
            if estimate is not None:
                row.memory_estimate_gb = estimate / 1e9
            rows.append(row)
            if reason:
                continue
            result = worker.run((d, K, method, repeats, cap * REPEAT_SHARE), cap)
            if result is None:
                row.note = f"skipped: > {cap:g} s (killed at the cap)"
                row.seconds, row.ratio_is_lower_bound = cap, True
                continue
            if "error" in result:
                row.note = result["error"]
                continue
            samples = result["samples"]
            row.seconds, row.min_seconds = statistics.median(samples), min(samples)
            row.samples = len(samples)
            row.objective_gap = result.get("objective_gap")
            row.solution_distance = result.get("solution_distance")
            row.gradient_error = result.get("gradient_error")
            if "svd_samples" in result:
                row.extra["svd_seconds"] = statistics.median(result["svd_samples"])
    finally:
        worker.close()
    _fill_ratios(rows)
    return rows


def _find(rows: list[Row], d: int, K: int, method: str) -> Row | None:
    return next((r for r in rows if (r.d, r.K, r.method) == (d, K, method)), None)


def _fill_ratios(rows: list[Row]) -> None:
    for row in rows:
        if row.seconds is None:
            continue
        if row.stage == "float32":
            row.ratio = row.seconds / row.extra["svd_seconds"]
            continue
        reference = _find(
            rows, row.d, row.K, "analytic" if row.stage == "backward" else "procrustes"
        )
        if reference is not None and reference.seconds and not reference.ratio_is_lower_bound:
            row.ratio = row.seconds / reference.seconds


# ---------------------------------------------------------------------------- reporting


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt(x: float | None, spec: str = ".1e") -> str:
    return "-" if x is None else format(x, spec)


def _table_lines(rows: list[Row]) -> list[str]:
    header = (
        f"{'d x K':>10} {'stage':<8} {'method':<16} {'time':>10} {'min':>10} {'n':>3} "
        f"{'vs ref':>9} {'obj gap':>9} {'|U-Uref|':>9} {'grad err':>9}  note"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{'>' if r.ratio_is_lower_bound else ''}{r.ratio:.3g}x"
        seconds = f">{r.seconds:g} s" if r.ratio_is_lower_bound else _fmt_seconds(r.seconds)
        note = r.note
        if r.stage == "float32" and r.seconds is not None:
            note = f"ratio = fwd+bwd / one float32 SVD ({_fmt_seconds(r.extra['svd_seconds'])})"
        elif r.samples == 1 and not r.ratio_is_lower_bound:
            note = (note + "; " if note else "") + "one call: no repeat fits the repeat budget"
        lines.append(
            f"{f'{r.d}x{r.K}':>10} {r.stage:<8} {r.method:<16} {seconds:>10} "
            f"{_fmt_seconds(r.min_seconds):>10} "
            f"{r.samples or '-':>3} {ratio:>9} {_fmt(r.objective_gap):>9} "
            f"{_fmt(r.solution_distance):>9} {_fmt(r.gradient_error):>9}  {note}"
        )
    return lines


@dataclass
class Target:
    name: str
    value: float | None
    threshold: float
    at_least: bool  # True: value >= threshold passes; False: value <= threshold
    lower_bound: bool = False

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a (not measured)"
        ok = self.value >= self.threshold if self.at_least else self.value <= self.threshold
        return "PASS" if ok else "FAIL"

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        value = "-" if self.value is None else f"{'>' if self.lower_bound else ''}{self.value:.3g}x"
        return f"{self.name}: {value} (target {sign} {self.threshold:g}x)  {self.verdict}"


def evaluate_targets(rows: list[Row]) -> list[Target]:
    def speedup(d: int, K: int, slow: str) -> tuple[float | None, bool]:
        row = _find(rows, d, K, slow)
        if row is None or row.ratio is None:
            return None, False
        return row.ratio, row.ratio_is_lower_bound

    d, K, need = TARGET_FORWARD
    fwd, fwd_lb = speedup(d, K, "trust-regions")
    fwd30, fwd30_lb = speedup(d, K, "trust-regions-30")
    d2, K2, need2 = TARGET_BACKWARD
    bwd, bwd_lb = speedup(d2, K2, "structured-kkt")
    d3, K3, need3 = TARGET_FLOAT32
    f32 = _find(rows, d3, K3, FLOAT32)
    return [
        Target(
            f"forward: procrustes vs trust-regions at {d}x{K}, speed-up", fwd, need, True, fwd_lb
        ),
        Target(
            f"forward: procrustes vs trust-regions-30 (all 30 iterations) at {d}x{K}, speed-up",
            fwd30,
            need,
            True,
            fwd30_lb,
        ),
        Target(
            f"backward: analytic vs structured KKT at {d2}x{K2}, speed-up", bwd, need2, True, bwd_lb
        ),
        Target(
            f"float32 fwd+bwd / one SVD at {d3}x{K3}",
            None if f32 is None else f32.ratio,
            need3,
            False,
        ),
    ]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys((r.d, r.K) for r in rows))
    panels = (("forward", (*FORWARD, "svd")), ("backward", BACKWARD))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (title, methods) in zip(axes, panels, strict=True):
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs, ys, hatched = [], [], []
            for j, (d, K) in enumerate(sizes):
                row = _find(rows, d, K, method)
                if row is not None and row.seconds is not None:
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    ys.append(row.seconds)
                    hatched.append(row.ratio_is_lower_bound)
            bars = ax.bar(xs, ys, width, label=method)
            for bar, lower in zip(bars, hatched, strict=True):
                if lower:
                    bar.set_hatch("//")
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room for the legend above the bars
        ax.set_xticks(range(len(sizes)), [f"{d}x{K}" for d, K in sizes])
        ax.set_ylabel("seconds per call (median)")
        ax.set_title(f"{title} (hatched: killed at the cap, a lower bound)")
        ax.legend(fontsize=8, ncol=len(methods), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[Row], targets: list[Target], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in rows]
    with open(out / "solver_speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in records[0] if k != "extra"])
        writer.writeheader()
        for record in records:
            writer.writerow({k: v for k, v in record.items() if k != "extra"})
    targets_json = [{**asdict(t), "verdict": t.verdict} for t in targets]
    payload = {**meta, "rows": records, "targets": targets_json}
    (out / "solver_speed.json").write_text(json.dumps(payload, indent=2))
    _plot(rows, out / "solver_speed.png")


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        try:
            d, K = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"sizes are DxK pairs like 512x10, got {item!r}"
            ) from None
        if not d >= K >= 2:
            raise argparse.ArgumentTypeError(f"each size needs d >= K >= 2, got {item!r}")
        sizes.append((d, K))
    return sizes


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated DxK (default 512x10,512x50,512x100,2048x1000)",
    )
    parser.add_argument(
        "--repeats", type=_positive(int), default=5, help="timed calls per method after a warm-up"
    )
    parser.add_argument(
        "--skip-slow",
        type=_positive(float),
        default=150.0,
        metavar="SECONDS",
        help="per-method time cap: a measurement still running after it is killed and reported "
        f"as skipped; repeats stop once a method has used {REPEAT_SHARE:.0%}% of it (default 150)",
    )
    parser.add_argument(
        "--noise",
        type=_positive(float),
        default=1.0,
        help="norm of the noise on each class mean relative to the ETF signal (default 1)",
    )
    parser.add_argument(
        "--threads",
        type=_positive(int),
        default=os.cpu_count() or 1,
        help="torch threads in the measuring process (default: all logical CPUs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write CSV, JSON and PNG here")
    args = parser.parse_args(argv)
    # On a shared machine, OpenMP threads that spin at barriers while another process holds the
    # core turn a 5 ms SVD into a second; sleeping waits keep timings meaningful. The spawned
    # worker inherits this before its OpenMP runtime starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # numpy's OpenBLAS (used only by pymanopt inside trust-regions) has its own thread pool;
    # alternating with torch's on 2 cores it makes trust-regions 2-10x slower and erratic, which
    # would flatter the closed form. One BLAS thread is trust-regions' fastest setting here.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "load_average_start": os.getloadavg(),
        "sizes": args.sizes,
        "repeats": args.repeats,
        "cap_seconds": args.skip_slow,
        "noise": args.noise,
        "threads": args.threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "openblas_num_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "delta": DELTA,
    }
    start = time.perf_counter()
    rows = run_benchmark(args.sizes, args.repeats, args.skip_slow, args.noise, args.threads)
    meta["wall_seconds"] = time.perf_counter() - start
    meta["load_average_end"] = os.getloadavg()
    targets = evaluate_targets(rows)

    machine = meta["machine"]
    print(
        f"\nnearest-ETF solver speed: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"torch {machine['torch']} ({args.threads} threads, OMP_WAIT_POLICY="
        f"{meta['omp_wait_policy']}, OPENBLAS_NUM_THREADS={meta['openblas_num_threads']}), "
        "float64 unless said, "
        f"delta = {DELTA:g}, cap {args.skip_slow:g} s per method"
    )
    print("\n".join(_table_lines(rows)))
    print(
        "time: median seconds per call (n timed calls after a warm-up), min: fastest call; "
        "vs ref: median time / procrustes "
        "(forward, floor) or / analytic (backward, float64); obj gap: relative objective excess "
        "over procrustes; grad err: relative error of dL/dH against analytic (float64)"
    )
    print("\ntargets")
    for target in targets:
        print("  " + target.line())
    load0, load1 = meta["load_average_start"][0], meta["load_average_end"][0]
    print(
        f"\nwall time {meta['wall_seconds']:.0f} s; 1-min load average {load0:.2f} at start, "
        f"{load1:.2f} at end"
    )
    if args.out is not None:
        write_outputs(rows, targets, meta, args.out)
        print(f"wrote {args.out}/solver_speed.csv, .json, .png")


if __name__ == "__main__":
    main()
