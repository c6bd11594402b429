"""Two CPU processes on the gloo backend (localhost only): the heads all-reduce their class sums
and counts, so both ranks solve the same problem as one process fed the union of the batches."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nearest_etf.nn.heads import FixedETFHead, ImplicitETFHead

F64 = torch.float64
D, K, STEPS = 7, 4, 3
SPLIT = 5  # rank 0 gets the first 5 rows of each global batch, rank 1 the other 11


def _global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    labels = torch.randint(0, K, (16,), generator=g)
    labels[:K] = torch.arange(K)
    features = torch.randn(K, D, generator=g, dtype=F64)[labels] + torch.randn(
        16, D, generator=g, dtype=F64
    )
    upstream = torch.randn(16, K, generator=g, dtype=F64)  # dL/dlogits
    return features, labels, upstream


def _run(head, rows: slice) -> dict[str, list[torch.Tensor]]:
    """STEPS training steps on `rows` of each global batch; the frame U, the bias and the
    gradient of sum(logits * upstream) w.r.t. the features after every step."""
    out: dict[str, list[torch.Tensor]] = {"U": [], "bias": [], "grad": []}
    for step in range(STEPS):
        features, labels, upstream = _global_batch(step)
        x = features[rows].clone().requires_grad_(True)
        (head(x, labels[rows]) * upstream[rows]).sum().backward()
        out["U"].append(head.frame.clone() if hasattr(head, "frame") else head.weight.clone())
        out["bias"].append(head.bias.clone())
        out["grad"].append(x.grad.clone())
    return out


def _make_heads():
    return {
        "implicit": ImplicitETFHead(D, K, delta=0.05).to(F64),
        "fixed": FixedETFHead(D, K, rotation="random").to(F64),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        results = {name: _run(head, rows) for name, head in _make_heads().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", ["implicit", "fixed"])
def test_ranks_agree_with_one_process_on_the_union(ranks, name):
    single = _run(_make_heads()[name], slice(None))
    for step in range(STEPS):
        # bitwise-identical classifier on both ranks (the all-reduced inputs are identical)
        assert torch.equal(ranks[0][name]["U"][step], ranks[1][name]["U"][step])
        assert torch.equal(ranks[0][name]["bias"][step], ranks[1][name]["bias"][step])
        torch.testing.assert_close(ranks[0][name]["U"][step], single["U"][step], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            ranks[0][name]["bias"][step], single["bias"][step], atol=1e-6, rtol=0
        )
        # each rank's feature gradient is that of the union's loss (the all-reduce backward
        # sums the ranks' upstream gradients)
        grad = torch.cat([ranks[0][name]["grad"][step], ranks[1][name]["grad"][step]])
        torch.testing.assert_close(grad, single["grad"][step], atol=1e-6, rtol=0)
