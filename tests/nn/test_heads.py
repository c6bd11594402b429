import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from nearest_etf.etf import etf_classifier, random_stiefel, simplex_etf
from nearest_etf.experiments.models import Classifier
from nearest_etf.nearest import nearest_etf
from nearest_etf.nn.heads import (
    FixedETFHead,
    ImplicitETFHead,
    LearnedHead,
    NonFiniteError,
    default_temperature,
    make_head,
)

F64 = torch.float64
D, K = 6, 4


def _batch(N: int = 12, d: int = D, seed: int = 0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % K
    centres = torch.randn(K, d, generator=g, dtype=dtype)
    return centres[labels] + 0.5 * torch.randn(N, d, generator=g, dtype=dtype), labels


def _heads(dtype=F64):
    torch.manual_seed(0)  # the learned heads' initialisation
    return [
        LearnedHead(D, K).to(dtype),
        LearnedHead(D, K, bias=False, normalize_rows=True, temperature=2.0).to(dtype),
        FixedETFHead(D, K).to(dtype),
        FixedETFHead(D, K, rotation="identity", temperature=None, momentum=None).to(dtype),
        ImplicitETFHead(D, K).to(dtype),
        ImplicitETFHead(D, K, average="cma", temperature=3.0, momentum=0.5).to(dtype),
        ImplicitETFHead(D, K, average="none", temperature=None).to(dtype),
    ]


N_HEADS = len(_heads())


@pytest.mark.parametrize("index", range(N_HEADS))
def test_common_module_behaviour(index):
    head = _heads()[index]
    x, y = _batch()
    logits = head(x, y)
    assert logits.shape == (12, K) and logits.dtype == F64
    head.eval()
    W, b = head.classifier()
    scaled = head.scale_features(x)
    torch.testing.assert_close(head(x), scaled @ W.T + b)
    if head.temperature is not None:
        torch.testing.assert_close(
            scaled.norm(dim=1), torch.full((12,), head.temperature, dtype=F64)
        )
    # state dict round trip into a fresh head of the same class and options
    fresh = copy.deepcopy(_heads()[index]).eval()
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh(x), head(x))
    # .to(dtype)
    assert head.to(torch.float32)(x.float()).dtype == torch.float32


@pytest.mark.parametrize("index", range(N_HEADS))
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_features_are_cast_up(index: int, low: torch.dtype) -> None:
    # As from a backbone under torch.autocast: the head computes in float32, the gradient
    # returns in the features' dtype, and the result equals feeding the cast-up features.
    x, y = _batch(dtype=torch.float32)
    x_low = x.to(low).requires_grad_(True)
    head = _heads(torch.float32)[index]
    reference = copy.deepcopy(head)
    logits = head(x_low, y)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference(x_low.detach().float(), y))
    logits.sum().backward()
    assert x_low.grad is not None and x_low.grad.dtype == low


@pytest.mark.parametrize("index", range(N_HEADS))
def test_heads_train_under_autocast(index: int) -> None:
    # the backbone runs in bfloat16; the head (SVD, custom backward included) in float32
    torch.manual_seed(0)
    backbone = nn.Linear(8, D)
    head = _heads(torch.float32)[index]
    x, y = torch.randn(12, 8), torch.arange(12) % K
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(backbone(x), y)
            loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logits.dtype == torch.float32 and math.isfinite(loss.item())
    assert backbone.weight.grad is not None and bool(torch.isfinite(backbone.weight.grad).all())


def test_fixed_head_is_the_simplex_etf_and_frozen():
    head = FixedETFHead(D, K)  # default: Haar-random rotation from seed 0
    R = random_stiefel(D, K, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head.weight, etf_classifier(R))
    M = simplex_etf(K)
    torch.testing.assert_close(head.weight @ head.weight.T, M.T @ M)  # unit rows, cos -1/(K-1)
    assert not torch.allclose(head.weight, FixedETFHead(D, K, seed=8).weight)
    identity = FixedETFHead(D, K, rotation="identity")
    torch.testing.assert_close(identity.weight, etf_classifier(torch.eye(D, K)))
    assert list(head.parameters()) == []


def test_fixed_head_gradient_flows_through_the_batch_mean():
    # z_i = W (h_i - mu_G): dL/dh_i = (G_i - mean_j G_j) W, the mean term from mu_G
    head = FixedETFHead(D, K, temperature=None)
    x, _ = _batch(dtype=torch.float32)
    x.requires_grad_(True)
    logits = head(x)
    torch.testing.assert_close(logits, (x - x.mean(0)) @ head.weight.T)
    G = torch.randn_like(logits)
    (logits * G).sum().backward()
    torch.testing.assert_close(x.grad, (G - G.mean(0)) @ head.weight)


def test_learned_head_row_normalisation():
    head = LearnedHead(D, K, normalize_rows=True)
    with torch.no_grad():
        head.weight.mul_(torch.arange(1.0, K + 1).unsqueeze(1))
    x, _ = _batch(dtype=torch.float32)
    head.eval()
    W, _ = head.classifier()
    torch.testing.assert_close(W.norm(dim=1), torch.ones(K))
    assert not torch.allclose(head.weight.norm(dim=1), torch.ones(K))  # eval does not mutate
    head.train()
    head(x)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(K))
    # gradient accumulation: a second forward before the backward must not break the first graph
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    first, second = head(x), head(2 * x)
    (first.square().sum() + second.square().sum()).backward()
    optimizer.step()
    assert not torch.allclose(head.weight.norm(dim=1), torch.ones(K))
    head(x)  # the first forward after the step projects again
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(K))


def test_implicit_head_solves_nearest_etf_with_prox():
    head = ImplicitETFHead(D, K, delta=0.1, temperature=None).to(F64)
    batches = [_batch(seed=s) for s in range(3)]
    x0, y0 = batches[0]
    head(x0, y0)
    H = head.tracker.means.mT
    torch.testing.assert_close(head.frame, nearest_etf(H, None))
    U_prev = head.frame.clone()
    x1, y1 = batches[1]
    logits = head(x1, y1)
    H = head.tracker.means.mT
    U = nearest_etf(H, U_prev, delta=0.1)
    torch.testing.assert_close(head.frame, U)
    W = etf_classifier(U)
    torch.testing.assert_close(head.weight, W)
    torch.testing.assert_close(logits, (x1 - x1.mean(0)) @ W.T)
    # running mean: the first step sets it, then m <- 0.9 m + 0.1 mu_G (momentum 0.1)
    running = 0.9 * x0.mean(0) + 0.1 * x1.mean(0)
    torch.testing.assert_close(head.running_mean, running)
    torch.testing.assert_close(head.bias, -W @ running)
    assert int(head.num_steps) == 2
    # eval mode uses W and b = -W m and does not touch the state
    state = copy.deepcopy(head.state_dict())
    head.eval()
    x2, _ = batches[2]
    torch.testing.assert_close(head(x2), (x2 - running) @ W.T)
    assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items())


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_mean_follows_batch_norm_convention(momentum):
    head = FixedETFHead(D, K, momentum=momentum).to(F64)
    means = []
    for seed in range(4):
        x, y = _batch(seed=seed)
        head(x, y)
        means.append(head.scale_features(x).mean(0))
    expected = means[0]
    for t, mean in enumerate(means[1:], start=2):
        rate = 1 / t if momentum is None else momentum
        expected = (1 - rate) * expected + rate * mean
    torch.testing.assert_close(head.running_mean, expected)
    assert "running_mean" in head.state_dict() and int(head.num_steps) == 4


def _gradcheck_heads():
    """name -> head in its state before the checked step; float64, small sizes."""
    torch.manual_seed(0)
    heads = {
        "learned": LearnedHead(D, K),
        "learned-normalised": LearnedHead(D, K, normalize_rows=True, temperature=2.0),
        "fixed": FixedETFHead(D, K),
        "fixed-unnormalised": FixedETFHead(D, K, temperature=None),
        "implicit-first-step": ImplicitETFHead(D, K),
        "implicit": ImplicitETFHead(D, K, delta=0.2),
        "implicit-unnormalised": ImplicitETFHead(D, K, temperature=None),
        "implicit-cma": ImplicitETFHead(D, K, average="cma"),
        "implicit-none": ImplicitETFHead(D, K, average="none"),
    }  # (detach_frame=True is an ablation whose backward deliberately drops the path via U)
    for name, head in heads.items():
        head.to(F64)
        if name.startswith("implicit") and name != "implicit-first-step":
            for seed in (3, 4):  # earlier steps: tracked means and a prox
                head(*_batch(seed=seed))
    return heads


@pytest.mark.parametrize("name", list(_gradcheck_heads()))
def test_training_forward_gradient_matches_finite_differences(name):
    # The whole training forward h -> logits (normalisation, mu_G, tracker, nearest-ETF node)
    # against finite differences; every call runs on a fresh copy, as a step changes the state.
    head = _gradcheck_heads()[name]
    x, y = _batch(seed=2)

    def step(features):
        return copy.deepcopy(head)(features, y)

    assert torch.autograd.gradcheck(step, (x.clone().requires_grad_(True),))


def test_gradcheck_catches_a_detached_batch_mean():
    # the test above can fail: the head's function with mu_G treated as a constant in the
    # backward is not differentiated correctly, and gradcheck sees it
    head = FixedETFHead(D, K).to(F64)
    x, _ = _batch()

    def detached(features):
        f = head.scale_features(features)
        return f @ head.weight.T - head.weight @ f.detach().mean(0)

    torch.testing.assert_close(detached(x), head(x))
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(detached, (x.clone().requires_grad_(True),))


def test_implicit_head_general_path_agrees_with_the_closed_form_path():
    # backward="kkt" goes through nearest_etf's generic declarative node; the default takes the
    # polar-factor shortcut. Same frame, same feature gradient.
    x0, y0 = _batch(seed=1)
    x, y = _batch(seed=2)
    upstream = torch.randn(12, K, dtype=F64)
    grads, frames = [], []
    for backward in ("analytic", "kkt"):
        head = ImplicitETFHead(D, K, delta=0.1, backward=backward).to(F64)
        head(x0, y0)
        features = x.clone().requires_grad_(True)
        (head(features, y) * upstream).sum().backward()
        grads.append(features.grad)
        frames.append(head.frame)
    torch.testing.assert_close(frames[0], frames[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_implicit_head_declarative_path_changes_the_backbone_gradient():
    backbone = nn.Linear(5, D).to(F64)
    inputs = torch.randn(12, 5, dtype=F64)
    _, y = _batch()
    grads = []
    for detach in (False, True):
        head = ImplicitETFHead(D, K, detach_frame=detach).to(F64)
        head(backbone(inputs).detach(), y)  # a first step, so the next one has a prox
        backbone.zero_grad()
        nn.functional.cross_entropy(head(backbone(inputs), y), y).backward()
        grads.append(backbone.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-8)
    assert (grads[0] - grads[1]).norm() > 1e-4 * grads[0].norm()


@pytest.mark.parametrize("index", range(N_HEADS))
def test_bad_input_is_rejected_with_state_unchanged(index):
    head = _heads()[index]
    x, y = _batch()
    head(x, y)
    before = copy.deepcopy(head.state_dict())
    bad = [
        ((x, torch.where(y == 0, K, y)), ValueError, r"\[0, 4\)"),
        ((x, y - 1), ValueError, r"\[0, 4\)"),
        ((x[:, :-1], y), ValueError, "width 5"),
        ((torch.where(x > 1, float("nan"), x), y), ValueError, "non-finite"),
        ((torch.where(x > 1, float("inf"), x), y), ValueError, "non-finite"),
        ((x.float(), y), TypeError, "float32"),
        ((x, y.double()), TypeError, "integer"),
        ((x, y[:-1]), ValueError, "shape"),
    ]
    if isinstance(head, ImplicitETFHead):
        bad.append(((x,), ValueError, "needs targets"))
    if not isinstance(head, LearnedHead):  # mu_G of an empty batch would be 0/0
        bad.append(((x[:0], y[:0]), ValueError, "empty training batch"))
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            head(*args)
    after = head.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_steps_without_class_information_keep_the_frame():
    # every class mean equal to the global mean: the nearest ETF is undefined, the frame stays
    head = ImplicitETFHead(D, K).to(F64)
    x, y = _batch()
    logits = head(torch.ones_like(x), y)
    torch.testing.assert_close(logits, torch.zeros_like(logits), rtol=0, atol=1e-12)
    assert int(head.num_steps) == 1
    torch.testing.assert_close(head.frame, torch.eye(D, K, dtype=F64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no class information yet"):
        head.tracker(torch.ones_like(x), y)  # the tracker itself refuses to return zero means


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_features d >= num_classes"):
        ImplicitETFHead(3, 4)
    with pytest.raises(ValueError, match="average"):
        ImplicitETFHead(6, 4, average="mean")
    with pytest.raises(ValueError, match="rotation"):
        FixedETFHead(6, 4, rotation="haar")
    for temperature in (0.0, -1.0, float("inf"), float("nan")):  # one message for all
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            LearnedHead(6, 4, temperature=temperature)
    with pytest.raises(ValueError, match="'auto' or None"):
        FixedETFHead(6, 4, temperature="hot")
    for momentum in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"momentum must lie in \(0, 1\]"):
            ImplicitETFHead(6, 4, momentum=momentum)
    with pytest.raises(TypeError, match="num_classes"):
        LearnedHead(6, 4.0)
    with pytest.raises(TypeError, match=r"holds torch.float16 state.*\.float\(\)"):
        FixedETFHead(6, 4).half()(torch.randn(2, 6, dtype=torch.float16))
    with pytest.raises(ValueError, match="head"):
        make_head("linear", 6, 4)
    assert isinstance(make_head("implicit", 6, 4, delta=0.1), ImplicitETFHead)


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for inputs, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(inputs, y), y).backward()
        opt.step()


class _Net(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, D), nn.Tanh())
        self.head = head

    def forward(self, x, y=None):
        return self.head(self.body(x), y)


@pytest.mark.parametrize("average", ["ema", "cma", "none"])
def test_checkpoint_resumes_bit_exactly(average):
    def make():
        torch.manual_seed(0)
        net = _Net(ImplicitETFHead(D, K, average=average, temperature=2.0))
        return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(12, 5, generator=g), torch.randint(0, K, (12,), generator=g)) for _ in range(8)
    ]
    net, opt = make()
    _train(net, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(net, opt, batches[4:])

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed, resumed_opt = make()
    _train(resumed, resumed_opt, batches[:1])  # different state, overwritten by the load
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    _train(resumed, resumed_opt, batches[4:])
    assert int(resumed.head.num_steps) == 8
    for (name, a), b in zip(net.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("index", range(N_HEADS))
def test_training_mode_without_grad_changes_no_state(index):
    # a validation pass that forgets .eval(): training-mode logits, nothing moves
    head = _heads()[index]
    x, y = _batch()
    head(x, y)
    x2, y2 = _batch(seed=5)
    before = copy.deepcopy(head.state_dict())
    expected = copy.deepcopy(head)(x2, y2)  # the training step's logits
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            logits = head(x2, y2)
        torch.testing.assert_close(logits, expected.detach())
        after = head.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_learned_head_without_grad_does_not_project_the_rows():
    head = LearnedHead(D, K, normalize_rows=True).to(F64)
    x, y = _batch()
    with torch.no_grad():
        head.weight.mul_(3.0)
        scaled = head.weight.clone()
        logits = head(x, y)
    assert torch.equal(head.weight, scaled)  # not projected in place
    W = nn.functional.normalize(scaled, dim=1)
    torch.testing.assert_close(logits, x @ W.T + head.bias)
    head(x, y)  # a training step projects
    torch.testing.assert_close(head.weight, W)


@pytest.mark.parametrize("index", range(N_HEADS))
def test_non_finite_features_name_the_step(index):
    head = _heads()[index]
    x, y = _batch()
    for _ in range(2):
        head(x, y)
    before = copy.deepcopy(head.state_dict())
    with pytest.raises(NonFiniteError, match=r"training step 3: features have non-finite"):
        head(torch.where(x > 1, float("nan"), x), y)
    head.eval()
    with pytest.raises(NonFiniteError, match=r"\(eval mode\): features have non-finite"):
        head(torch.where(x > 1, float("inf"), x))
    assert all(torch.equal(head.state_dict()[k], v) for k, v in before.items())


def test_non_finite_classifier_is_reported_with_the_step():
    head = LearnedHead(D, K).to(F64)
    x, y = _batch()
    head(x, y)
    with torch.no_grad():
        head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="training step 2: non-finite logits"):
        head(x, y)
    assert int(head.num_steps) == 1


def _trained(head, steps=2):
    for seed in range(steps):
        head(*_batch(seed=seed))
    return head


@pytest.mark.parametrize("name", ["learned", "fixed", "implicit"])
def test_load_state_dict_of_another_size_changes_nothing(name):
    head = _trained(make_head(name, D, K).to(F64))
    before = copy.deepcopy(head.state_dict())
    other = _trained(make_head(name, D, K + 1).to(F64), steps=3).state_dict()
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        head.load_state_dict(other)
    # through a parent module (the usual model.load_state_dict) as well
    parent = Classifier(nn.Identity(), head)
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        parent.load_state_dict({f"head.{k}": v for k, v in other.items()})
    assert all(torch.equal(head.state_dict()[k], v) for k, v in before.items())


def test_load_state_dict_rejects_bad_values_and_changes_nothing():
    implicit = _trained(ImplicitETFHead(D, K).to(F64))
    fixed = _trained(FixedETFHead(D, K).to(F64))
    learned = _trained(LearnedHead(D, K).to(F64))
    good = {h: copy.deepcopy(h.state_dict()) for h in (implicit, fixed, learned)}
    fresh = _trained(ImplicitETFHead(D, K).to(F64), steps=5).state_dict()

    def bad(head, key, value):
        return {**good[head], key: value} if key in good[head] else None

    frame = fresh["frame"].clone()
    frame[:, 0] *= 2
    cases = [
        (
            implicit,
            {**fresh, "tracker.means": torch.full_like(fresh["tracker.means"], math.nan)},
            "tracker.means has non-finite",
        ),
        (implicit, {**fresh, "frame": frame}, "orthonormal"),
        (implicit, {**fresh, "running_mean": fresh["running_mean"] + math.inf}, "running_mean"),
        (implicit, {**fresh, "num_steps": torch.tensor(-1)}, "num_steps"),
        (
            implicit,
            {**fresh, "tracker.appearances": -fresh["tracker.appearances"] - 1},
            "appearances",
        ),
        (fixed, bad(fixed, "weight", torch.randn(K, D, dtype=F64)), "simplex-ETF"),
        (learned, bad(learned, "bias", torch.tensor([0.0, math.nan, 0.0, 0.0])), "bias"),
    ]
    for head, state, message in cases:
        with pytest.raises(RuntimeError, match=message):
            head.load_state_dict(state)
    # strict: a missing key is rejected before anything is copied; non-strict loads the rest
    partial = {k: v for k, v in fresh.items() if k != "num_steps"}
    with pytest.raises(RuntimeError, match="missing keys"):
        implicit.load_state_dict(partial)
    for head in good:
        assert all(torch.equal(head.state_dict()[k], v) for k, v in good[head].items())
    implicit.load_state_dict(partial, strict=False)
    assert torch.equal(implicit.frame, fresh["frame"]) and int(implicit.num_steps) == 2


def test_default_temperature_rule():
    # tau(K) makes the cross-entropy of perfectly collapsed features equal 1e-6
    for K_ in (2, 10, 100, 1000):
        tau = default_temperature(K_)
        collapsed = math.log1p((K_ - 1) * math.exp(-tau * K_ / (K_ - 1)))
        assert collapsed == pytest.approx(1e-6, rel=1e-6)
    assert default_temperature(10) == pytest.approx(14.41, abs=0.01)
    assert FixedETFHead(16, 10).temperature == default_temperature(10)
    assert ImplicitETFHead(16, 10).temperature == default_temperature(10)
    assert LearnedHead(16, 10).temperature is None
    assert LearnedHead(16, 10, temperature="auto").temperature == default_temperature(10)
    with pytest.raises(ValueError, match="collapsed_loss"):
        default_temperature(10, collapsed_loss=3.0)


def test_solve_every_reuses_the_frame_between_solves():
    torch.manual_seed(0)
    every = ImplicitETFHead(12, 4, solve_every=3)
    frames, tracked = [], []
    for _ in range(7):
        x, y = torch.randn(16, 12, requires_grad=True), torch.arange(16) % 4
        every(x, y).logsumexp(1).mean().backward()
        frames.append(every.frame.clone())
        tracked.append(every.tracker.means.clone())
    # steps 1, 2 and 4, 5 keep the frame of steps 0 and 3; solve steps move it
    assert torch.equal(frames[1], frames[0]) and torch.equal(frames[2], frames[0])
    assert torch.equal(frames[4], frames[3]) and torch.equal(frames[5], frames[3])
    assert not torch.equal(frames[3], frames[2]) and not torch.equal(frames[6], frames[5])
    # the tracker follows the class means at every step
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(tracked))
    with pytest.raises(ValueError, match="solve_every must be an int >= 1"):
        ImplicitETFHead(12, 4, solve_every=0)


def test_solve_every_gradient_at_a_reuse_step_is_the_fixed_frame_gradient():
    # between solves the head is z = W (f - mu_G) with W from the held frame: gradcheck that
    # function (float64) through a fresh copy of the head state at every call
    torch.manual_seed(1)
    head = ImplicitETFHead(6, 3, solve_every=2).double()
    x0, y = torch.randn(9, 6, dtype=torch.float64), torch.arange(9) % 3
    head(x0, y)  # step 0 solves; step 1 reuses
    state = {k: v.clone() for k, v in head.state_dict().items()}

    def step(x: torch.Tensor) -> torch.Tensor:
        head.load_state_dict(state)
        return head(x, y)

    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(step, (x,))
    head.load_state_dict(state)
    step(x)
    torch.testing.assert_close(head.frame, state["frame"], rtol=0, atol=0)


def test_a_first_batch_of_one_class_keeps_the_initial_frame():
    # class-sorted data: the first batch holds one class, whose centred mean is zero, so the
    # nearest ETF is undefined; the head keeps its frame until a batch carries class information
    torch.manual_seed(2)
    head = ImplicitETFHead(12, 4)
    initial = head.frame.clone()
    x = torch.randn(8, 12, requires_grad=True)
    head(x, torch.full((8,), 3)).sum().backward()
    assert torch.equal(head.frame, initial) and x.grad is not None
    assert int(head.tracker.appearances[3]) == 1
    head(torch.randn(8, 12), torch.arange(8) % 4)
    assert not torch.equal(head.frame, initial)
    torch.testing.assert_close(head.frame.T @ head.frame, torch.eye(4), rtol=0, atol=1e-5)
