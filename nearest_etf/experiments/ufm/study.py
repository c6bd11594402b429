"""The unconstrained features model (UFM): how fast does each classifier head reach collapse?

The features are free parameters H[N, d] (n = N/K per class, labels y_i = i // n); only the head
on top decides how the geometry collapses (Markou, Ajanthan, Gould, NeurIPS 2024, UFM study).
Every method is trained the same way, full batch:

    f_i = tau * h_i / ||h_i||          (the heads' `temperature` normalisation, tau = feature_norm)
    loss = (1/N) sum_i CE(z_i, y_i)    (z = head(H, y); torch's cross-entropy, mean over samples)
    SGD (momentum) or Adam, weight decay feature_wd on H (default 0) and head_wd on a learned W, b.

Methods (all `nearest_etf.nn.heads` modules, each normalising H to F with the same tau):
``learned`` (`LearnedHead`, W and b trained), ``fixed`` (`FixedETFHead`, a Haar-random simplex
ETF drawn from the seed), ``implicit`` (`ImplicitETFHead`, nearest ETF of the EMA class means),
``implicit-cma`` (cumulative average), ``implicit-none`` (the current, exact full-batch means)
and ``implicit-k10`` (EMA, the frame re-solved only every 10th step: `solve_every=10`).
The same seed gives every method the same initial H.

Recorded at ``records`` steps spaced geometrically in t + 1 (`record_steps`: every early step,
sparser later; always 0 and T), on the normalised features of the forward pass that produced
the step's loss (`step_metrics`, all from `nearest_etf.metrics`): the loss, the training error,
NC1, the distance of the centred class means to the simplex ETF (`etf_distance`), NC2 of W,
NC3 self-duality between the head's W and the centred means, the equinorm of the centred means,
and the average cosine margin of the classifier.

A study (`run_study`) is a fair comparison: every method at one shared lr,
and every method at its own best lr from the same grid (chosen on a separate tuning seed by
`selection_score`, with the same step budget), each over the same evaluation seeds. A run
whose loss or parameters diverge (`runs.divergence`) stops there with its curve so far and the
step; `run_study` can skip runs finished before (`done`) and report each new one (`on_run`), which
is how the command writes as it goes and resumes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nearest_etf import metrics
from nearest_etf._validation import check_int
from nearest_etf.experiments._common.parallel import map_unordered
from nearest_etf.experiments._common.runs import divergence
from nearest_etf.nn.heads import NonFiniteError, make_head

__all__ = [
    "METHODS",
    "METRICS",
    "OPTIMIZERS",
    "UFM",
    "Study",
    "UFMConfig",
    "UFMRun",
    "check_study",
    "etf_loss_floor",
    "first_crossing",
    "run_study",
    "run_ufm",
    "selection_score",
    "step_metrics",
    "summarise_study",
    "thresholds",
    "ufm_head",
]

# the implicit methods: ImplicitETFHead options beyond the study's delta
_IMPLICIT_OPTIONS: dict[str, dict[str, object]] = {
    "implicit": {"average": "ema"},
    "implicit-cma": {"average": "cma"},
    "implicit-none": {"average": "none"},
    "implicit-k10": {"average": "ema", "solve_every": 10},
}
METHODS = ("learned", "fixed", *_IMPLICIT_OPTIONS)
OPTIMIZERS = ("sgd", "adam")
METRICS = (
    "loss",
    "error",
    "nc1",
    "etf_distance",
    "nc2_classifier",
    "nc3",
    "equinorm",
    "cosine_margin",
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Metrics whose area under the log10 curve ranks the learning rates (lower = faster collapse).
_SELECTION_METRICS = ("nc1", "etf_distance", "nc3")


@dataclass(frozen=True)
class UFMConfig:
    """Everything shared by the methods of one UFM study (the lr and the seed vary per run).

    classes K, dim d (>= K for the ETF heads), per_class n (N = nK free features), steps T,
    feature_norm tau (features are rescaled to norm tau before the head; None: no
    normalisation), feature_wd / head_wd the weight decays on H and on a learned W (and b),
    init_scale the std of h_ij * sqrt(d) at initialisation (rows of norm ~ init_scale), delta
    the proximal weight of the implicit heads, records the number of recorded steps.

    feature_wd defaults to 0: with the normalisation the loss does not depend on ||h_i||, so
    weight decay on H only shrinks it and raises the effective step lr/||h_i||^2 on the sphere;
    at 1e-4 (lr 3-10, momentum 0.9) the collapsed features destabilise after ~1000 steps.
    """

    classes: int = 10
    dim: int = 512
    per_class: int = 10
    steps: int = 200
    feature_norm: float | None = 1.0
    feature_wd: float = 0.0
    head_wd: float = 5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    init_scale: float = 1.0
    delta: float = 1e-3
    records: int = 40
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_int("classes", self.classes, 2)
        check_int("dim", self.dim, self.classes)
        check_int("per_class", self.per_class)
        check_int("steps", self.steps, 0)
        check_int("records", self.records, 2)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.feature_norm is not None and not self.feature_norm > 0:
            raise ValueError(f"feature_norm must be positive or None, got {self.feature_norm}")
        for name in ("feature_wd", "head_wd", "momentum", "delta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and non-negative, got {value}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {self.init_scale}")
        if self.feature_norm is not None and not math.isfinite(self.feature_norm):
            raise ValueError(f"feature_norm must be finite, got {self.feature_norm}")

    @property
    def num_samples(self) -> int:
        return self.classes * self.per_class

    def record_steps(self) -> list[int]:
        """The recorded steps: round((T+1)^(i/(M-1))) - 1 for i = 0..M-1 (M = records),
        deduplicated, with 0 and T; every step when M > T."""
        T, M = self.steps, self.records
        if M > T:
            return list(range(T + 1))
        return sorted({0, T} | {round((T + 1) ** (i / (M - 1))) - 1 for i in range(M)})

    def to_dict(self) -> dict:
        return asdict(self)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def ufm_head(method: str, config: UFMConfig, seed: int) -> nn.Module:
    """The head of ``method`` (a `nearest_etf.nn.heads` module) for d features and K classes, with
    the config's feature normalisation, initialised from ``seed``."""
    _check_method(method)
    options: dict = {"temperature": config.feature_norm}
    if method != "learned":
        # full batch: every batch mean is the data's mean, so the eval bias b = -W m takes the
        # last step's (momentum 1) and the recorded metrics use the classifier of the step
        options["momentum"] = 1.0
    if method == "fixed":
        options |= {"rotation": "random", "seed": seed}
    elif method in _IMPLICIT_OPTIONS:
        options |= {"delta": config.delta, **_IMPLICIT_OPTIONS[method]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the learned head's nn.Linear initialisation
        head = make_head(method.partition("-")[0], config.dim, config.classes, **options)
    return head.to(_DTYPES[config.dtype])


class UFM(nn.Module):
    """Free features H[N, d] (a parameter), fixed labels y[N] (y_i = i // n), and a head.

    ``forward()`` returns (F, logits): F = the features the classifier acts on (tau H/||H|| row
    by row, the head's normalisation), logits = head(H, y).
    """

    def __init__(self, config: UFMConfig, method: str, seed: int) -> None:
        super().__init__()
        self.config = config
        dtype = _DTYPES[config.dtype]
        generator = torch.Generator().manual_seed(seed)
        N, d = config.num_samples, config.dim
        scale = config.init_scale / math.sqrt(d)
        self.features = nn.Parameter(scale * torch.randn(N, d, generator=generator, dtype=dtype))
        labels = torch.arange(config.classes).repeat_interleave(config.per_class)
        self.register_buffer("labels", labels)
        self.head = ufm_head(method, config, seed)

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.head.scale_features(self.features), self.head(self.features, self.labels)


def _optimizer(model: UFM, lr: float) -> torch.optim.Optimizer:
    config = model.config
    groups = [{"params": [model.features], "weight_decay": config.feature_wd}]
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    if head_params:
        groups.append({"params": head_params, "weight_decay": config.head_wd})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)


def step_metrics(
    features: Tensor, labels: Tensor, num_classes: int, W: Tensor, b: Tensor
) -> dict[str, float]:
    """The recorded metrics (but the loss) of features[N, d] under the classifier W[K, d], b[K],
    from `nearest_etf.metrics`: training error, NC1, NC2 of the centred means (`etf_distance`)
    and of W, NC3 (`self_duality`), equinorm of the centred means, average cosine margin."""
    means, global_mean = metrics.class_means(features, labels, num_classes)
    predictions = (features @ W.T + b).argmax(dim=1)
    return {
        "error": float((predictions != labels).double().mean()),
        "nc1": float(metrics.nc1(features, labels, num_classes)),
        "etf_distance": float(metrics.etf_distance(means, global_mean)),
        "nc2_classifier": float(metrics.classifier_etf_distance(W)),
        "nc3": float(metrics.self_duality(W, means, global_mean)),
        "equinorm": float(metrics.equinorm(means - global_mean)),
        "cosine_margin": float(metrics.cosine_margin(features, labels, W, global_mean)),
    }


@dataclass
class UFMRun:
    """One trained UFM: the recorded steps and one list per metric of `METRICS`; a diverged
    run has the step where it stopped and why."""

    method: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    diverged: bool = False
    seconds: float = 0.0
    diverged_step: int | None = None
    divergence: str | None = None

    def final(self, metric: str) -> float:
        return self.curves[metric][-1] if self.curves[metric] else math.nan

    @property
    def key(self) -> tuple[str, float, int]:
        return (self.method, self.lr, self.seed)

    def to_dict(self) -> dict:
        """The run as plain JSON-serialisable values (`from_dict` inverts it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> UFMRun:
        return cls(**record)


def run_ufm(config: UFMConfig, method: str, lr: float, seed: int, progress: bool = False) -> UFMRun:
    """Train the UFM of ``method`` at learning rate ``lr`` from ``seed`` for ``config.steps``.

    Deterministic for a given (config, method, lr, seed) on a given machine and thread count.
    Stops early with ``diverged=True`` (and the step and reason) when the loss or a parameter
    becomes non-finite or exceeds the divergence bound (`runs.divergence`), or the head meets
    non-finite features or logits (`NonFiniteError`).
    """
    _check_method(method)
    _check_lr(lr)
    model = UFM(config, method, seed)
    optimizer = _optimizer(model, lr)
    run = UFMRun(method=method, lr=lr, seed=seed)
    start = time.perf_counter()
    bar = tqdm(
        total=config.steps,
        disable=not progress,
        desc=f"{method} lr={lr:g} seed={seed}",
        unit="step",
        leave=False,
        mininterval=0.5,
    )
    record = set(config.record_steps())
    for step in range(config.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        try:
            F, logits = model()
        except NonFiniteError:  # the head met non-finite features or produced such logits
            run.diverged = True
            break
        loss = nn.functional.cross_entropy(logits, model.labels)
        reason = divergence(float(loss.detach()), model.parameters())
        if reason is not None:
            run.diverged, run.diverged_step, run.divergence = True, step, reason
            break
        if step in record:
            W, b = model.head.classifier()
            values = step_metrics(F.detach(), model.labels, config.classes, W, b)
            values["loss"] = float(loss.detach())
            run.steps.append(step)
            for name in METRICS:
                run.curves[name].append(values[name])
            bar.set_postfix(loss=f"{values['loss']:.4f}", nc1=f"{values['nc1']:.2e}", refresh=False)
        if step == config.steps:
            break
        loss.backward()
        optimizer.step()
        bar.update()
    bar.close()
    run.seconds = time.perf_counter() - start
    return run


def selection_score(run: UFMRun, config: UFMConfig) -> float:
    """How slowly a run collapses: sum over m in (NC1, ETF distance, NC3) of the mean over the
    recorded (log-spaced) steps of log10(max(m_t, c_m) / c_m), c_m the metric's threshold
    (`thresholds`). 0 iff all three are below their thresholds from step 0; what happens below
    a threshold (e.g. float32 noise floors) does not count. +inf for a diverged run."""
    if run.diverged or not run.steps:
        return math.inf
    limits = thresholds(config)
    total = 0.0
    for name in _SELECTION_METRICS:
        cut = limits[name][1]
        values = run.curves[name]
        total += sum(math.log10(max(v, cut) / cut) for v in values) / len(values)
    return total


def etf_loss_floor(num_classes: int, feature_norm: float) -> float:
    """Cross-entropy of perfectly collapsed features of norm tau on a unit-row simplex ETF
    classifier: log(1 + (K-1) exp(-tau K/(K-1))), the loss the ETF heads approach."""
    K = num_classes
    return math.log1p((K - 1) * math.exp(-feature_norm * K / (K - 1)))


def thresholds(config: UFMConfig) -> dict[str, tuple[str, float]]:
    """The stated collapse thresholds: metric -> ("<=" or ">=", value) of the summary table.

    loss <= the ETF floor + 0.01 (`etf_loss_floor`; no floor without feature normalisation),
    error <= 0, NC1, ETF distance, NC3 and equinorm <= 1e-3, average cosine margin >= 0.99 of
    its collapsed value K/(K-1) (cos(h, w_y) = 1, cos(h, w_j) = -1/(K-1)).
    """
    K = config.classes
    found: dict[str, tuple[str, float]] = {}
    if config.feature_norm is not None:
        found["loss"] = ("<=", etf_loss_floor(K, config.feature_norm) + 1e-2)
    found["error"] = ("<=", 0.0)
    for name in ("nc1", "etf_distance", "nc3", "equinorm"):
        found[name] = ("<=", 1e-3)
    found["cosine_margin"] = (">=", 0.99 * K / (K - 1))
    return found


def first_crossing(run: UFMRun, metric: str, op: str, value: float) -> int | None:
    """The first recorded step at which ``metric`` is ``op`` ("<=" or ">=") ``value``."""
    compare: Callable[[float], bool] = (
        (lambda v: v <= value) if op == "<=" else (lambda v: v >= value)
    )
    for step, v in zip(run.steps, run.curves[metric], strict=True):
        if compare(v):
            return step
    return None


@dataclass
class Study:
    """The runs of a study, keyed by (method, lr, seed), and how they are grouped.

    ``tuning[method][lr]`` is the selection score on the tuning seed; ``best_lr[method]`` its
    argmin; ``comparisons`` maps "shared-lr" and "best-lr" to {method: lr}.
    """

    config: UFMConfig
    methods: list[str]
    seeds: list[int]
    tune_seed: int
    lr_grid: list[float]
    shared_lr: float
    runs: dict[tuple[str, float, int], UFMRun]
    tuning: dict[str, dict[float, float]]
    best_lr: dict[str, float]

    @property
    def comparisons(self) -> dict[str, dict[str, float]]:
        return {
            "shared-lr": {m: self.shared_lr for m in self.methods},
            "best-lr": dict(self.best_lr),
        }

    def group(self, comparison: str, method: str) -> list[UFMRun]:
        lr = self.comparisons[comparison][method]
        return [self.runs[(method, lr, seed)] for seed in self.seeds]


def _run_task(task: tuple[UFMConfig, str, float, int]) -> UFMRun:
    return run_ufm(*task)


def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rates (lr) must be finite numbers > 0, got {lr}")


Key = tuple[str, float, int]


def _run_all(
    config: UFMConfig,
    keys: Iterable[Key],
    workers: int,
    progress: bool,
    desc: str,
    done: Mapping[Key, UFMRun],
    on_run: Callable[[UFMRun], None] | None,
    executor: str = "process",
    ray_address: str | None = None,
) -> dict[Key, UFMRun]:
    """Every run of `keys` (deduplicated): those in `done` as they are, the others trained and
    reported to `on_run` as each finishes (in this process with workers=1 and the process
    executor, else on `executor`)."""
    keys = list(dict.fromkeys(keys))
    found = {key: done[key] for key in keys if key in done}
    keys = [key for key in keys if key not in done]
    if workers == 1 and executor == "process":
        bar = tqdm(keys, desc=desc, unit="run", disable=not progress)
        results: Iterable[UFMRun] = (
            run_ufm(config, m, lr, s, progress=progress) for m, lr, s in bar
        )
    else:
        tasks = [(config, m, lr, s) for m, lr, s in keys]
        results = tqdm(
            map_unordered(_run_task, tasks, executor, workers, ray_address),
            total=len(tasks),
            desc=desc,
            unit="run",
            disable=not progress,
        )
    for run in results:
        found[run.key] = run
        if on_run is not None:
            on_run(run)
    return found


def check_study(
    methods: Sequence[str],
    seeds: Sequence[int],
    lr_grid: Sequence[float],
    shared_lr: float,
    tune_seed: int,
    workers: int,
) -> None:
    """`ValueError` naming the first bad setting of a study (see `run_study`)."""
    for method in methods:
        _check_method(method)
    if not methods or not seeds or not lr_grid:
        raise ValueError("methods, seeds and lr_grid must be non-empty")
    for name, values in (("methods", methods), ("lr_grid", lr_grid), ("seeds", seeds)):
        if len(set(values)) < len(values):
            raise ValueError(f"{name} lists a value twice: {list(values)}")
    if tune_seed in seeds:
        raise ValueError(f"tune_seed {tune_seed} must differ from the evaluation seeds {seeds}")
    for lr in [*lr_grid, shared_lr]:
        _check_lr(lr)
    check_int("workers", workers)


def run_study(
    config: UFMConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    lr_grid: Sequence[float],
    shared_lr: float,
    tune_seed: int = 1000,
    workers: int = 1,
    progress: bool = True,
    done: Mapping[Key, UFMRun] | None = None,
    on_run: Callable[[UFMRun], None] | None = None,
    executor: str = "process",
    ray_address: str | None = None,
) -> Study:
    """Tune each method's lr on ``tune_seed`` over ``lr_grid`` (same steps), then run every
    method over ``seeds`` at ``shared_lr`` and at its best lr. Runs in ``workers`` processes
    (each single-threaded) or, with workers=1, in this process with a bar over the steps;
    ``executor`` "ray" runs them on Ray (a local instance with ``workers`` CPUs, or the cluster
    at ``ray_address``), "serial" in this process without the step bar.
    Runs in ``done`` (keyed by (method, lr, seed)) are used instead of trained again; every
    newly trained run is passed to ``on_run`` when it finishes."""
    check_study(methods, seeds, lr_grid, shared_lr, tune_seed, workers)
    done = done or {}
    methods, seeds, lr_grid = list(methods), list(seeds), sorted(set(lr_grid))
    tune_keys = [(m, lr, tune_seed) for m in methods for lr in lr_grid] if len(lr_grid) > 1 else []
    execution = {"executor": executor, "ray_address": ray_address}
    runs = _run_all(config, tune_keys, workers, progress, "lr tuning", done, on_run, **execution)
    tuning = {
        m: {
            lr: selection_score(runs[(m, lr, tune_seed)], config) if tune_keys else 0.0
            for lr in lr_grid
        }
        for m in methods
    }
    best_lr = {m: min(tuning[m], key=lambda lr, m=m: tuning[m][lr]) for m in methods}
    eval_keys = [(m, lr, s) for m in methods for lr in (shared_lr, best_lr[m]) for s in seeds]
    runs.update(
        _run_all(config, eval_keys, workers, progress, "evaluation", done, on_run, **execution)
    )
    return Study(config, methods, seeds, tune_seed, lr_grid, shared_lr, runs, tuning, best_lr)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values) or not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.pstdev(finite) if len(finite) > 1 else 0.0


def summarise_study(study: Study) -> list[dict]:
    """One row per (comparison, method): lr, diverged runs, and per metric the median over
    seeds of the first step crossing its threshold (None if a seed never crosses; the number of
    seeds that cross) and the final value's mean and std over seeds."""
    limits = thresholds(study.config)
    rows = []
    for comparison, lrs in study.comparisons.items():
        for method in study.methods:
            group = study.group(comparison, method)
            row: dict = {
                "comparison": comparison,
                "method": method,
                "lr": lrs[method],
                "seeds": len(group),
                "diverged": sum(r.diverged for r in group),
                "seconds": statistics.fmean(r.seconds for r in group),
            }
            for metric in METRICS:
                if metric in limits:
                    op, value = limits[metric]
                    steps = [first_crossing(r, metric, op, value) for r in group]
                    crossed = [s for s in steps if s is not None]
                    row[f"{metric}_crossed"] = len(crossed)
                    row[f"{metric}_step"] = (
                        statistics.median(crossed) if len(crossed) == len(group) else None
                    )
                mean, std = _mean_std([r.final(metric) for r in group])
                row[f"{metric}_final_mean"] = mean
                row[f"{metric}_final_std"] = std
            rows.append(row)
    return rows
