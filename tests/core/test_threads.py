import pytest
import torch

from nearest_etf._threads import SMALL_WORK, is_small, single_threaded


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_single_threaded_sets_one_thread_and_restores(two_threads: None) -> None:
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with single_threaded(enabled=False):
        assert torch.get_num_threads() == 2


def test_single_threaded_restores_after_an_error(two_threads: None) -> None:
    with pytest.raises(RuntimeError, match="inside"), single_threaded():
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_single_threaded_nests(two_threads: None) -> None:
    with single_threaded():
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_is_small_counts_the_batch_and_the_inner_size() -> None:
    assert is_small(torch.zeros(512, 100))  # 5.1e6 multiply-adds
    assert not is_small(torch.zeros(2048, 1000))
    assert not is_small(torch.zeros(400, 512, 100))  # the batch adds up
    assert is_small(torch.zeros(SMALL_WORK // 4, 2), inner=2)
    assert not is_small(torch.zeros(SMALL_WORK // 4 + 1, 2), inner=2)
    assert is_small(torch.zeros(2048, 10), inner=10)


def test_polar_runs_small_problems_single_threaded(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nearest_etf import polar

    seen: list[int] = []
    matmul = torch.Tensor.__matmul__

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return matmul(a, b)

    A = torch.randn(50, 30, requires_grad=True)  # the float64 Gram route
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    polar(A).sum().backward()
    monkeypatch.undo()
    assert seen and set(seen) == {1}  # forward and backward
    assert torch.get_num_threads() == 2
