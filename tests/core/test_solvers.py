"""Solver and backward objects: the results they report, their warnings when they stop short,
and the minimum-norm implicit gradient where the minimiser is not isolated (issue 14 items 1-2,
issue 15). Every value is checked against an independent oracle: the analytic polar backward,
the dense KKT pseudo-inverse, torch.linalg.pinv, or the closed-form minimiser."""

import contextlib
import warnings
from collections.abc import Iterator

import geoopt
import pytest
import torch

import nearest_etf.declarative.solvers as solvers_module
from nearest_etf import (
    Analytic,
    ConjugateGradient,
    DeclarativeNode,
    DenseKKT,
    ImplicitETFHead,
    Procrustes,
    RiemannianAdamSolver,
    SolverResult,
    TrustRegions,
    as_backward,
    as_solver,
    conjugate_gradient,
    etf_classifier,
    minimum_norm_solve,
    nearest_etf,
    nearest_etf_objective,
    random_stiefel,
)
from nearest_etf.experiments.dufm import DUFMProblem, optimise_locally, srg_point
from nearest_etf.nearest import _objective, _start_point, procrustes_target
from nearest_etf.polar_decomposition import polar
from nearest_etf.synthetic import noisy_etf_problem

DT = torch.float64


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def gap(H: torch.Tensor, U: torch.Tensor, prox: torch.Tensor | None) -> float:
    """Relative objective gap of U against the closed-form minimiser."""
    Hn = H / H.norm()
    best = float(nearest_etf_objective(Hn, nearest_etf(H, prox), prox))
    return (float(nearest_etf_objective(Hn, U, prox)) - best) / abs(best)


@contextlib.contextmanager
def no_runtime_warning() -> Iterator[None]:
    """Turns a RuntimeWarning (a solve that stopped short) into a test failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


# --- item 1: singular Hessians (minimisers that are not isolated) -----------------------------


@pytest.mark.parametrize("dtype", [DT, torch.float32])
def test_cg_on_class_means_with_two_distinct_values_matches_analytic(dtype) -> None:
    # Five classes, two distinct means: rank-1 centred means, four free directions, Proj(v)
    # largely in the Hessian's null space. Plain CG gave ||grad|| = 2.8e16 (analytic: 1.174).
    # The free directions are completed deterministically from the input's bits (docs/math.md
    # §2a), so the generic and the closed-form gradients agree exactly only for the same bits:
    # in float64 to rounding; in float32 (other bits after rounding) the generic backward must
    # still be the minimum-norm solve (no blow-up), and CG must equal the dense KKT solve.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 1, dtype=DT, generator=gen), torch.randn(8, 1, dtype=DT, generator=gen)
    H0 = torch.cat([a.repeat(1, 2), b.repeat(1, 3)], 1).to(dtype)
    G = torch.randn(5, 8, dtype=DT, generator=gen).to(dtype)
    grads = {}
    for backward in ("analytic", "kkt", "cg"):
        H = H0.clone().requires_grad_(True)
        with no_runtime_warning():
            (etf_classifier(nearest_etf(H, backward=backward)) * G).sum().backward()
        grads[backward] = H.grad
    if dtype == DT:
        assert relative(grads["kkt"], grads["analytic"]) <= 1e-10
        assert relative(grads["cg"], grads["analytic"]) <= 1e-10
    else:
        assert relative(grads["cg"], grads["kkt"]) <= 1e-4
        ratio = float(grads["cg"].norm() / grads["analytic"].norm())
        assert 0.5 < ratio < 2.0, ratio


def test_implicit_head_cg_first_step_on_a_batch_missing_classes() -> None:
    # Classes 3 and 4 are absent: their centred means are 0, the Hessian is singular. The cg
    # head's feature gradient was 393 against 0.275 for the analytic head.
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(12, 8, dtype=DT, generator=gen)
    labels = torch.tensor([0, 1, 2] * 4)
    grads = {}
    for backward in ("analytic", "kkt", "cg"):
        head = ImplicitETFHead(8, 5, backward=backward).to(DT)
        f = features.clone().requires_grad_(True)
        with no_runtime_warning():
            torch.nn.functional.cross_entropy(head(f, labels), labels).backward()
        grads[backward] = f.grad
    assert relative(grads["kkt"], grads["analytic"]) <= 1e-10
    assert relative(grads["cg"], grads["analytic"]) <= 1e-10


def _least_squares(x: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    A, b = x
    return (A @ y - b).square().sum()


def _minimum_norm_least_squares(objective, manifold, x, y0) -> torch.Tensor:
    A, b = x
    return torch.linalg.pinv(A) @ b


@pytest.mark.parametrize("backward", [DenseKKT(), ConjugateGradient()])
def test_least_squares_with_a_rank_deficient_design(backward: DenseKKT | ConjugateGradient):
    # y*(A, b) = pinv(A) b with A [6, 3] of rank 2: the minimisers form a line, the Hessian
    # 2 A^T A is singular. dL/db = pinv(A)^T v exactly; plain CG gave 1.4e13 for it (and 9e26
    # for dL/dA), the dense KKT 1.936 (right).
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 2, dtype=DT, generator=gen) @ torch.randn(2, 3, dtype=DT, generator=gen)
    b, v = torch.randn(6, dtype=DT, generator=gen), torch.randn(3, dtype=DT, generator=gen)
    node = DeclarativeNode(
        _least_squares, geoopt.Euclidean(), _minimum_norm_least_squares, backward
    )
    An, bn = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    with no_runtime_warning():
        (node((An, bn)) * v).sum().backward()
    assert relative(bn.grad, torch.linalg.pinv(A).T @ v) <= 1e-10
    Ak, bk = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    kkt = DeclarativeNode(_least_squares, geoopt.Euclidean(), _minimum_norm_least_squares, "kkt")
    (kkt((Ak, bk)) * v).sum().backward()
    assert relative(An.grad, Ak.grad) <= 1e-10


def _singular_system(inside: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A [12, 12] positive semidefinite of rank 7 and b in its range or not."""
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(12, 7, dtype=DT, generator=gen)
    S = B @ B.T
    b = S @ torch.randn(12, dtype=DT, generator=gen) if inside else torch.randn(12, dtype=DT)
    return S, b


def test_conjugate_gradient_reports_a_breakdown_on_an_inconsistent_singular_system() -> None:
    S, b = _singular_system(inside=False)
    found = conjugate_gradient(lambda w: S @ w, b, rtol=1e-12, max_iterations=100)
    assert not found.converged
    assert "breakdown" in found.stopping_reason
    assert found.relative_residual > 0.1
    assert float(found.solution.norm()) < 1e6  # the unbounded step was not taken


@pytest.mark.parametrize("inside", [True, False])
def test_minimum_norm_solve_is_the_pseudo_inverse(inside: bool) -> None:
    S, b = _singular_system(inside)
    found = minimum_norm_solve(lambda w: S @ w, b, rtol=1e-12, max_iterations=100)
    assert found.converged
    want = torch.linalg.pinv(S, hermitian=True) @ b
    assert relative(found.solution, want) <= 1e-8


def test_conjugate_gradient_on_a_consistent_singular_system_converges() -> None:
    S, b = _singular_system(inside=True)
    found = conjugate_gradient(lambda w: S @ w, b, rtol=1e-12, max_iterations=100)
    assert found.converged and found.relative_residual <= 1e-12
    assert relative(found.solution, torch.linalg.pinv(S, hermitian=True) @ b) <= 1e-8


def test_cg_backward_warns_when_capped_short_of_its_tolerance() -> None:
    p = noisy_etf_problem(16, 6, seed=6)
    H = p.H.clone().requires_grad_(True)
    U = nearest_etf(H, p.prox, backward=ConjugateGradient(max_iterations=2))
    with pytest.warns(RuntimeWarning, match=r"relative residual .* > rtol .*max_iterations=2"):
        (U * p.G).sum().backward()


def test_cg_backward_carries_its_tolerance() -> None:
    p = noisy_etf_problem(16, 6, seed=6)
    grads = {}
    for name, backward in (("analytic", Analytic()), ("loose", ConjugateGradient(rtol=1e-4))):
        H = p.H.clone().requires_grad_(True)
        (nearest_etf(H, p.prox, backward=backward) * p.G).sum().backward()
        grads[name] = H.grad
    error = relative(grads["loose"], grads["analytic"])
    assert 1e-12 < error <= 1e-2  # stopped at its own (loose) tolerance, not the default one


# --- item 2: solvers that stop short ----------------------------------------------------------


def _orthogonal_group_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """(H, prox) at d = K = 5 with prox in the other component of O(5) than the minimiser."""
    gen = torch.Generator().manual_seed(0)
    H = torch.randn(5, 5, dtype=DT, generator=gen)
    H = H - H.mean(1, keepdim=True)
    prox = random_stiefel(5, 5, generator=gen, dtype=DT)
    assert float(torch.det(prox) * torch.det(nearest_etf(H, prox))) < 0
    return H, prox


def test_start_point_is_moved_into_the_minimisers_component() -> None:
    H, prox = _orthogonal_group_problem()
    Hn = H / H.norm()
    start = _start_point(Hn, prox, 1e-3)
    assert float(torch.det(start) * torch.det(polar(procrustes_target(Hn, prox, 1e-3)))) > 0
    assert int(((start - prox).abs().amax(0) > 0).sum()) == 1  # one column reflected
    torch.testing.assert_close(start.T @ start, torch.eye(5, dtype=DT))


@pytest.mark.parametrize(
    "solver", [TrustRegions(), RiemannianAdamSolver()], ids=["trust-regions", "adam"]
)
def test_iterative_solvers_reach_the_minimiser_on_the_orthogonal_group(solver) -> None:
    # Started in the other component, trust regions ended 2.6e-3 above the minimum, silently.
    H, prox = _orthogonal_group_problem()
    with no_runtime_warning():
        U = nearest_etf(H, prox, solver=solver)
    assert gap(H, U, prox) <= 1e-9


def test_trust_regions_warns_on_its_iteration_cap() -> None:
    p = noisy_etf_problem(12, 4, seed=3)
    solver = TrustRegions(max_iterations=1, min_gradient_norm=1e-12)
    Hn = p.H / p.H.norm()
    with pytest.warns(RuntimeWarning, match=r"stopped above its tolerance: \|\|grad\|\| = "):
        result = solver(_nearest_objective, geoopt.Stiefel(), (Hn, p.prox), p.prox)
    assert result.converged is False
    assert result.iterations == 1
    assert "max iterations" in result.stopping_reason
    assert result.gradient_norm > 1e-12


def _nearest_objective(x: tuple[torch.Tensor, ...], U: torch.Tensor) -> torch.Tensor:
    return _objective(1e-3, x, U)


@pytest.mark.parametrize(
    "solver",
    [
        Procrustes(),
        TrustRegions(max_iterations=100, min_gradient_norm=1e-10),
        RiemannianAdamSolver(),
    ],
    ids=["procrustes", "trust-regions", "adam"],
)
def test_solver_results_report_what_they_reached(solver) -> None:
    p = noisy_etf_problem(12, 4, seed=4)
    Hn = p.H / p.H.norm()
    with no_runtime_warning():
        result = solver(_nearest_objective, geoopt.Stiefel(), (Hn, p.prox), p.prox)
    assert isinstance(result, SolverResult) and result.converged is True
    U = result.point
    assert result.cost == pytest.approx(float(nearest_etf_objective(Hn, U, p.prox)), rel=1e-12)
    grad = torch.func.grad(lambda V: nearest_etf_objective(Hn, V, p.prox))(U)
    rgrad = grad - U @ ((U.T @ grad + grad.T @ U) / 2)
    assert result.gradient_norm == pytest.approx(float(rgrad.norm()), rel=1e-3, abs=1e-12)
    assert result.gradient_norm <= getattr(solver, "min_gradient_norm", 1e-8)
    assert gap(p.H, U, p.prox) <= 1e-7
    assert result.iterations == 0 if isinstance(solver, Procrustes) else result.iterations > 0


def test_procrustes_warns_on_an_objective_it_does_not_solve() -> None:
    # A Brockett term -tr(U^T S U N) is not constant on St(d, K): polar(-grad f(0)) = polar(-C)
    # is not its minimiser.
    S, C = torch.randn(6, 6, dtype=DT), torch.randn(6, 3, dtype=DT)
    N = torch.tensor([3.0, 2.0, 1.0], dtype=DT)

    def brockett(x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return -((U.T @ (x + x.T) @ U).diagonal() * N).sum() + (C * U).sum()

    with pytest.warns(RuntimeWarning, match="not Procrustes"):
        result = Procrustes()(brockett, geoopt.Stiefel(), S, torch.zeros(6, 3, dtype=DT))
    assert result.converged is False


def test_node_solve_exposes_the_result_with_a_differentiable_point() -> None:
    p = noisy_etf_problem(7, 3, seed=7)
    Hn = (p.H / p.H.norm()).requires_grad_(True)
    solver = TrustRegions(max_iterations=100, min_gradient_norm=1e-10)
    node = DeclarativeNode(_nearest_objective, geoopt.Stiefel(), solver, "kkt")
    result = node.solve((Hn, p.prox), p.prox)
    assert result.converged is True and result.iterations > 0
    assert "min grad norm" in result.stopping_reason
    (result.point * p.G).sum().backward()
    Hn_ref = Hn.detach().clone().requires_grad_(True)
    (polar(procrustes_target(Hn_ref, p.prox, 1e-3)) * p.G).sum().backward()
    assert relative(Hn.grad, Hn_ref.grad) <= 1e-8


def test_a_plain_callable_solver_returning_a_tensor_is_unknown() -> None:
    X = torch.randn(5, 3, dtype=DT, requires_grad=True)
    node = DeclarativeNode(
        lambda x, U: -(x * U).sum(), geoopt.Stiefel(), lambda o, m, x, y0: polar(x)
    )
    result = node.solve(X)
    assert result.converged is None and result.gradient_norm is None
    (result.point.sum()).backward()
    X_ref = X.detach().clone().requires_grad_(True)
    polar(X_ref).sum().backward()
    assert relative(X.grad, X_ref.grad) <= 1e-8


# --- the API: objects with their settings, one function per kind ------------------------------


def test_shorthands_map_to_objects() -> None:
    assert as_solver("procrustes") == Procrustes()
    assert as_solver("trust-regions") == TrustRegions()
    assert as_solver("riemannian-adam") == RiemannianAdamSolver()
    solver = TrustRegions(max_iterations=50)
    assert as_solver(solver) is solver
    assert as_backward("analytic") == Analytic()
    assert as_backward("kkt") == DenseKKT()
    assert as_backward("cg") == ConjugateGradient()
    backward = ConjugateGradient(rtol=1e-8, max_iterations=20)
    assert as_backward(backward) is backward
    node = DeclarativeNode(_nearest_objective, geoopt.Stiefel(), "trust-regions", "kkt")
    assert node.solver == TrustRegions() and node.backward == DenseKKT()


def test_the_same_objects_work_in_nearest_etf_and_the_node() -> None:
    p = noisy_etf_problem(8, 3, seed=2)
    solver = TrustRegions(max_iterations=50, min_gradient_norm=1e-10)
    backward = ConjugateGradient(rtol=1e-12)
    H = p.H.clone().requires_grad_(True)
    (nearest_etf(H, p.prox, solver=solver, backward=backward) * p.G).sum().backward()
    H_ref = p.H.clone().requires_grad_(True)
    (nearest_etf(H_ref, p.prox) * p.G).sum().backward()
    assert relative(H.grad, H_ref.grad) <= 1e-6


def test_bad_solver_and_backward_raise() -> None:
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        as_solver("newton")
    with pytest.raises(TypeError, match="solver must be"):
        as_solver(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backward 'lu'"):
        as_backward("lu")
    with pytest.raises(TypeError, match="backward must be"):
        as_backward(TrustRegions())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="analytic backward is the nearest-ETF closed form"):
        DeclarativeNode(_nearest_objective, geoopt.Stiefel(), Procrustes(), "analytic")
    with pytest.raises(ValueError, match="max_iterations"):
        TrustRegions(max_iterations=0)
    with pytest.raises(ValueError, match="rtol"):
        ConjugateGradient(rtol=0.0)
    with pytest.raises(ValueError, match="max_iterations"):
        ConjugateGradient(max_iterations=-1)
    with pytest.raises(ValueError, match="lr_factor"):
        RiemannianAdamSolver(lr_factor=2.0)


def test_riemannian_adam_is_a_deprecated_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solvers_module, "_warned_deprecated_alias", False)
    with pytest.warns(DeprecationWarning, match="RiemannianAdamSolver"):
        from nearest_etf import RiemannianAdam
    assert RiemannianAdam is RiemannianAdamSolver
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert solvers_module.RiemannianAdam is RiemannianAdamSolver  # warned once only


# --- the other iterative solves of the package --------------------------------------------------


def test_dufm_local_optimisation_warns_when_lbfgs_stops_on_its_cap() -> None:
    problem = DUFMProblem(3, 6, 6)
    start = srg_point(problem)
    with pytest.warns(RuntimeWarning, match=r"L-BFGS-B stopped short after 1 iterations"):
        local = optimise_locally(problem, start, gd_steps=0, max_iter=1)
    assert problem.loss_parts(local).total <= problem.loss_parts(start).total
