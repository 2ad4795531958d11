"""exact_sum: fsum within its documented bound, and the same bits whatever the order and split."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import pytest
import torch

from multiproc import local_reduce

from p2p_fedrot.exact import Reduce, exact_sum


class ThreadedGroup:
    """Threads standing in for processes: reduce() combines every thread's tensor, like an all-reduce."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world

    def reduce(self, rank: int) -> Reduce:
        def reduce(tensor: torch.Tensor, op: str) -> None:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            result = stacked.sum(0) if op == "sum" else stacked.amax(0)
            self.barrier.wait()  # every thread has read the slots before any refills them
            tensor.copy_(result)

        return reduce


def run_split(fn: Callable[[torch.Tensor, Reduce], object], parts: Sequence[torch.Tensor]) -> list:
    """fn(part, reduce) with each part on its own thread-"process"; the results by part."""
    group = ThreadedGroup(len(parts))
    with ThreadPoolExecutor(len(parts)) as pool:
        futures = [pool.submit(fn, part, group.reduce(rank)) for rank, part in enumerate(parts)]
        return [future.result() for future in futures]


def spread_values(k: int, width: int, seed: int) -> torch.Tensor:
    """Float32 summands spanning 12 orders of magnitude, both signs."""
    generator = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.empty(k, width).uniform_(-6, 6, generator=generator)
    return (torch.randn(k, width, generator=generator) * scales).float()


def test_exact_sum_is_fsum_within_the_documented_bound() -> None:
    x = spread_values(64, 50, seed=0).double()
    got = exact_sum(x, local_reduce, count=64)
    peak, bits = float(x.abs().max()), 62 - math.ceil(math.log2(64))
    for column in range(x.shape[1]):
        expected = math.fsum(x[:, column].tolist())
        bound = 64 * peak * 2.0**-bits + abs(expected) * 2.0**-53
        assert abs(float(got[column]) - expected) <= bound


def test_exact_sum_keeps_what_float_summation_loses() -> None:
    x = torch.tensor([1e16, 1.0, -1e16], dtype=torch.float64)
    assert float(x.sum()) == 0.0  # float64: the 1 is absorbed by 1e16
    assert float(exact_sum(x, local_reduce, count=3)) == 1.0


def test_exact_sum_has_the_same_bits_whatever_the_order_and_split() -> None:
    x = spread_values(40, 7, seed=1)
    reference = exact_sum(x, local_reduce, count=40)
    for seed in range(3):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(seed))
        assert not torch.equal(x[order].double().sum(0), x.double().sum(0))  # a float sum does depend on it
        assert torch.equal(exact_sum(x[order], local_reduce, count=40), reference)
        shuffled = x[order]
        for cuts in ([0, 13, 13, 40], [0, 10, 20, 30, 40], [0, 0, 39, 40]):
            parts = [shuffled[lo:hi] for lo, hi in zip(cuts, cuts[1:])]
            results = run_split(lambda part, reduce: exact_sum(part, reduce, count=40), parts)
            assert all(torch.equal(result, reference) for result in results)


def test_exact_sum_of_zeros_and_of_non_finite_values() -> None:
    assert torch.equal(exact_sum(torch.zeros(5, 3), local_reduce, count=5), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(exact_sum(torch.zeros(0, 3), local_reduce, count=0), torch.zeros(3, dtype=torch.float64))
    inf, nan = math.inf, math.nan
    for values, expected in (([1.0, inf], inf), ([-inf, 2.0], -inf), ([inf, -inf], nan), ([1.0, nan], nan)):
        parts = [torch.tensor([[3.0, 4.0]]), torch.tensor([[values[0], 0.0], [values[1], 1.0]])]
        for result in run_split(lambda part, reduce: exact_sum(part, reduce, count=3), parts):
            assert torch.equal(result.isnan(), torch.tensor([math.isnan(expected)] * 2))
            if not math.isnan(expected):
                assert result.tolist() == [expected, expected]


def test_exact_sum_refuses_more_summands_than_announced() -> None:
    with pytest.raises(ValueError, match="more than the announced 2 summands"):
        exact_sum(torch.ones(3, 2), local_reduce, count=2)
