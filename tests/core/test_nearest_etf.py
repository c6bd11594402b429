import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nearest_etf import (
    RiemannianAdamSolver,
    TrustRegions,
    etf_classifier,
    nearest_etf,
    nearest_etf_objective,
    random_stiefel,
    simplex_etf,
)
from nearest_etf.polar_decomposition import polar
from nearest_etf.synthetic import noisy_etf_problem

DT = torch.float64
BACKWARDS = ("analytic", "kkt", "cg")
# The dense KKT oracle builds its Hessian with vmapped, multithreaded BLAS: repeated evaluations
# differ at the 1e-13 level, which gradcheck would flag as nondeterminism.
NONDET = {"analytic": 0.0, "kkt": 1e-10, "cg": 0.0}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def objective(H: torch.Tensor, U: torch.Tensor, prox: torch.Tensor | None) -> float:
    return float(nearest_etf_objective(H / H.norm(), U, prox))


# --- forward: three solvers, one minimiser -------------------------------------------------


def test_closed_form_beats_random_frames() -> None:
    p = noisy_etf_problem(10, 4, seed=1)
    best = objective(p.H, nearest_etf(p.H, p.prox), p.prox)
    for _ in range(50):
        assert objective(p.H, random_stiefel(10, 4, dtype=DT), p.prox) >= best


def test_trust_regions_converged_matches_procrustes() -> None:
    p = noisy_etf_problem(12, 4, seed=2)
    U = nearest_etf(p.H, p.prox)
    solver = TrustRegions(max_iterations=200, min_gradient_norm=1e-12)
    U_tr = nearest_etf(p.H, p.prox, solver=solver)
    f, f_tr = objective(p.H, U, p.prox), objective(p.H, U_tr, p.prox)
    assert f <= f_tr + 1e-15
    assert (f_tr - f) / abs(f) <= 1e-9
    torch.testing.assert_close(U_tr, U, atol=1e-6, rtol=0)


def test_trust_regions_default_30_iterations_by_name() -> None:
    p = noisy_etf_problem(12, 4, seed=3)
    U_tr = nearest_etf(p.H, p.prox, solver="trust-regions")
    U = nearest_etf(p.H, p.prox)
    assert (objective(p.H, U_tr, p.prox) - objective(p.H, U, p.prox)) / objective(
        p.H, U, p.prox
    ) <= 1e-9
    assert TrustRegions().max_iterations == 30  # the reference code's setting


def test_riemannian_adam_warns_when_it_stops_before_the_tolerance() -> None:
    p = noisy_etf_problem(12, 4, seed=4)
    with pytest.warns(RuntimeWarning, match="max_iterations=3"):
        nearest_etf(p.H, p.prox, solver=RiemannianAdamSolver(max_iterations=3))


def test_riemannian_adam_reaches_the_minimiser() -> None:
    p = noisy_etf_problem(12, 4, seed=4)
    U = nearest_etf(p.H, p.prox)
    U_adam = nearest_etf(p.H, p.prox, solver="riemannian-adam")
    f = objective(p.H, U, p.prox)
    assert (objective(p.H, U_adam, p.prox) - f) / f <= 1e-7
    torch.testing.assert_close(U_adam, U, atol=2e-3, rtol=0)


def test_feasibility_solve_all_solvers_agree_on_classifier() -> None:
    p = noisy_etf_problem(9, 3, seed=5)
    W = etf_classifier(nearest_etf(p.H))
    converged = TrustRegions(max_iterations=100, min_gradient_norm=1e-10)
    for solver in (converged, RiemannianAdamSolver()):
        torch.testing.assert_close(
            etf_classifier(nearest_etf(p.H, solver=solver)), W, atol=1e-4, rtol=0
        )


# --- backward: three modes, one gradient -----------------------------------------------------


def grad_H(
    H: torch.Tensor,
    prox: torch.Tensor | None,
    G: torch.Tensor,
    backward: str,
    solver: str | TrustRegions = "procrustes",
    delta: float = 1e-3,
) -> torch.Tensor:
    H = H.clone().requires_grad_(True)
    (nearest_etf(H, prox, delta=delta, backward=backward, solver=solver) * G).sum().backward()
    return H.grad


@pytest.mark.parametrize("d,K", [(5, 3), (16, 6)])
def test_backward_modes_agree(d: int, K: int) -> None:
    p = noisy_etf_problem(d, K, seed=6)
    ref = grad_H(p.H, p.prox, p.G, "analytic")
    for backward in ("kkt", "cg"):
        assert relative(grad_H(p.H, p.prox, p.G, backward), ref) <= 1e-8


def test_backward_modes_agree_on_prox_gradient() -> None:
    p = noisy_etf_problem(7, 3, seed=7)
    grads = []
    for backward in BACKWARDS:
        prox = p.prox.clone().requires_grad_(True)
        (nearest_etf(p.H, prox, backward=backward) * p.G).sum().backward()
        grads.append(prox.grad)
    for g in grads[1:]:
        assert relative(g, grads[0]) <= 1e-8


@pytest.mark.parametrize("seed", range(8, 20))
def test_backward_modes_agree_without_prox_on_classifier_loss(seed: int) -> None:
    # The KKT system is singular here (the free direction); seeds 10 and 14 at (6, 3) gave a
    # wrong kkt gradient when an LU solve was tried first.
    p = noisy_etf_problem(6, 3, seed=seed)
    grads = []
    for backward in BACKWARDS:
        H = p.H.clone().requires_grad_(True)
        W = etf_classifier(nearest_etf(H, backward=backward))
        (W * p.G.T).sum().backward()
        grads.append(H.grad)
    for g in grads[1:]:
        assert relative(g, grads[0]) <= 1e-8


@pytest.mark.parametrize("backward", BACKWARDS)
def test_zero_delta_ignores_the_prox(backward: str) -> None:
    # delta = 0: the objective does not depend on the prox, so U and its gradient are those of
    # the feasibility solve (free direction U 1 detached), for any upstream gradient of U.
    p = noisy_etf_problem(6, 3, seed=4)
    U0 = nearest_etf(p.H, p.prox, delta=0.0, backward=backward)
    torch.testing.assert_close(U0, nearest_etf(p.H))
    with_prox = grad_H(p.H, p.prox, p.G, backward, delta=0.0)
    assert relative(with_prox, grad_H(p.H, None, p.G, backward)) <= 1e-8


def test_analytic_backward_at_iterative_solution() -> None:
    p = noisy_etf_problem(10, 4, seed=9)
    ref = grad_H(p.H, p.prox, p.G, "analytic")
    converged = TrustRegions(max_iterations=200, min_gradient_norm=1e-12)
    assert relative(grad_H(p.H, p.prox, p.G, "analytic", solver=converged), ref) <= 1e-8


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradcheck_with_prox(backward: str) -> None:
    p = noisy_etf_problem(5, 3, seed=10)
    H = p.H.clone().requires_grad_(True)
    prox = p.prox.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, q: nearest_etf(h, q, backward=backward), (H, prox), nondet_tol=NONDET[backward]
    )


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradcheck_feasibility_classifier(backward: str) -> None:
    p = noisy_etf_problem(5, 3, seed=11)
    H = p.H.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h: etf_classifier(nearest_etf(h, backward=backward)),
        (H,),
        nondet_tol=NONDET[backward],
    )


# --- exact collapse: repeated singular values --------------------------------------------------


@pytest.mark.parametrize("backward", BACKWARDS)
def test_exact_collapse_gradient_is_finite_and_correct(backward: str) -> None:
    d, K = 7, 4
    R = random_stiefel(d, K, generator=torch.Generator().manual_seed(0), dtype=DT)
    H = (3.0 * R @ simplex_etf(K, dtype=DT)).requires_grad_(True)  # a simplex ETF itself
    # Autograd through torch.linalg.svd is NaN here: K-1 equal singular values.
    naive = H.detach().clone().requires_grad_(True)
    L, _, Vh = torch.linalg.svd(naive - naive.mean(1, keepdim=True), full_matrices=False)
    (L @ Vh).sum().backward()
    assert not torch.isfinite(naive.grad).all()
    # Ours: finite and equal to finite differences, without and with the anchor.
    tol = NONDET[backward]
    assert torch.autograd.gradcheck(
        lambda h: etf_classifier(nearest_etf(h, backward=backward)), (H,), nondet_tol=tol
    )
    prox = nearest_etf(H.detach())
    assert torch.autograd.gradcheck(
        lambda h: nearest_etf(h, prox, backward=backward), (H,), nondet_tol=tol
    )


# --- properties -----------------------------------------------------------------------------

sizes = st.tuples(st.integers(2, 6), st.integers(0, 4), st.integers(0, 2**16))


def _problem(K: int, extra: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = K + extra
    H = torch.randn(d, K, generator=g, dtype=DT)
    H = H - H.mean(1, keepdim=True)
    prox = random_stiefel(d, K, generator=g, dtype=DT)
    return H, prox


@given(sizes)
def test_property_orthonormal(size: tuple[int, int, int]) -> None:
    H, prox = _problem(*size)
    for U in (nearest_etf(H, prox), nearest_etf(H)):
        torch.testing.assert_close(U.T @ U, torch.eye(H.shape[1], dtype=DT))


@given(sizes)
def test_property_rotation_equivariance(size: tuple[int, int, int]) -> None:
    H, prox = _problem(*size)
    Rot = random_stiefel(
        H.shape[0], H.shape[0], generator=torch.Generator().manual_seed(size[2]), dtype=DT
    )
    torch.testing.assert_close(nearest_etf(Rot @ H, Rot @ prox), Rot @ nearest_etf(H, prox))


@given(sizes)
def test_property_permutation_equivariance(size: tuple[int, int, int]) -> None:
    H, prox = _problem(*size)
    perm = torch.randperm(H.shape[1], generator=torch.Generator().manual_seed(size[2]))
    torch.testing.assert_close(
        nearest_etf(H[:, perm], prox[:, perm]), nearest_etf(H, prox)[:, perm]
    )
    torch.testing.assert_close(
        etf_classifier(nearest_etf(H[:, perm])), etf_classifier(nearest_etf(H))[perm]
    )


@given(sizes, st.floats(1e-3, 1e3))
def test_property_scale_invariance(size: tuple[int, int, int], scale: float) -> None:
    H, prox = _problem(*size)
    torch.testing.assert_close(nearest_etf(scale * H, prox), nearest_etf(H, prox))


# --- dtypes, batches, devices ----------------------------------------------------------------


@pytest.mark.parametrize("backward", BACKWARDS)
def test_float32(backward: str) -> None:
    p = noisy_etf_problem(12, 4, seed=12, dtype=torch.float32)
    H = p.H.clone().requires_grad_(True)
    U = nearest_etf(H, p.prox, backward=backward)
    assert U.dtype == torch.float32
    (U * p.G).sum().backward()
    ref = grad_H(p.H.double(), p.prox.double(), p.G.double(), "analytic")
    assert relative(H.grad.double(), ref) <= 1e-3
    torch.testing.assert_close(U.T @ U, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_batch_matches_loop(backward: str) -> None:
    problems = [noisy_etf_problem(6, 3, seed=s) for s in range(6)]
    H = torch.stack([p.H for p in problems]).reshape(2, 3, 6, 3).requires_grad_(True)
    prox = torch.stack([p.prox for p in problems]).reshape(2, 3, 6, 3)
    G = torch.stack([p.G for p in problems]).reshape(2, 3, 6, 3)
    U = nearest_etf(H, prox, backward=backward)
    (U * G).sum().backward()
    for i, p in enumerate(problems):
        torch.testing.assert_close(U.reshape(6, 6, 3)[i], nearest_etf(p.H, p.prox))
        torch.testing.assert_close(H.grad.reshape(6, 6, 3)[i], grad_H(p.H, p.prox, p.G, "analytic"))


def test_batched_feasibility_is_deterministic() -> None:
    H = torch.stack([noisy_etf_problem(6, 3, seed=s).H for s in range(3)])
    U = nearest_etf(H)
    assert torch.equal(U, nearest_etf(H.clone()))
    torch.testing.assert_close(U.mT @ U, torch.eye(3, dtype=DT).expand(3, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backward", BACKWARDS)
def test_cuda_matches_cpu(backward: str) -> None:
    p = noisy_etf_problem(16, 5, seed=13)
    H = p.H.cuda().requires_grad_(True)
    U = nearest_etf(H, p.prox.cuda(), backward=backward)
    assert U.device.type == "cuda"
    (U * p.G.cuda()).sum().backward()
    torch.testing.assert_close(U.cpu(), nearest_etf(p.H, p.prox))
    assert relative(H.grad.cpu(), grad_H(p.H, p.prox, p.G, "analytic")) <= 1e-8


# --- bad input ------------------------------------------------------------------------------


def test_rejects_bad_input() -> None:
    H = torch.randn(6, 3, dtype=DT)
    prox = nearest_etf(H)
    cases = [
        (torch.randn(2, 3, dtype=DT), ValueError, "d >= K"),
        (torch.randn(5, 1, dtype=DT), ValueError, "K >= 2"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]]), ValueError, "non-finite"),
        (torch.ones(4, 3, dtype=torch.int64), TypeError, "float32 or float64"),
        (torch.zeros(4, 3), ValueError, "zero Frobenius norm"),
        (torch.randn(3), ValueError, r"\[..., d, K\]"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            nearest_etf(bad)
    with pytest.raises(ValueError, match="prox must have shape"):
        nearest_etf(H, prox[:, :2])
    with pytest.raises(ValueError, match="orthonormal"):
        nearest_etf(H, 2 * prox)
    with pytest.raises(TypeError, match="dtype"):
        nearest_etf(H, prox.float())
    with pytest.raises(ValueError, match="max_iterations"):
        RiemannianAdamSolver(max_iterations=0)
    with pytest.raises(ValueError, match=r"A\[..., d, K\]"):
        polar(torch.ones(3))
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        nearest_etf(H, prox, solver="newton")
    with pytest.raises(ValueError, match="unknown backward 'autograd'"):
        nearest_etf(H, prox, backward="autograd")
    with pytest.raises(ValueError, match="delta"):
        nearest_etf(H, prox, delta=-1.0)
    with pytest.raises(TypeError, match=r"H must be a torch\.Tensor"):
        nearest_etf([[1.0, 0.0], [0.0, 1.0]])  # type: ignore[arg-type]
