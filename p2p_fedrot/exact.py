"""Sums across processes whose bits do not depend on how the summands are split over processes.

Float addition is not associative, so an all-reduce of float partial sums changes in the last bits
with the number of processes (and with the order in which a backend combines them). Here every
summand is rounded to a multiple of one power-of-two quantum q, agreed by all processes from the
global max |summand|, and summed as int64: integer sums are exact, hence order-independent.

Precision: with ``bits = 62 - ceil(log2(count))`` and peak < 2^e, q = 2^(e - bits), so each summand
is off by at most q/2 <= peak * 2^-bits, and the int64 total (at most 2^62 in magnitude) cannot
overflow. The total is then rounded once to float64 (half an ulp of the result).

Only maths on tensors lives here: the all-reduce is passed in as ``reduce`` (comm.collectives gives
it over the process group). Beside it, the weighted sum every method mixes with, in a fixed order.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Reduce = Callable[[torch.Tensor, str], None]
"""In-place all-reduce of a tensor over every process, with op "sum" or "max"."""

MixInputs = list[tuple[float, torch.Tensor]]
"""A receiver's row of a mixing step: (W_ij, x_j) pairs in ascending j."""


def global_peaks(local: torch.Tensor, reduce: Reduce) -> list[float]:
    """Elementwise max over processes of local bounds on |summand|. NaN counts as inf: whether a
    backend's max keeps a NaN can depend on the order it compares in, while an inf always wins."""
    peaks = local.double().nan_to_num(nan=math.inf, posinf=math.inf)
    reduce(peaks, "max")
    return peaks.tolist()


def _times_power_of_two(x: torch.Tensor, n: int) -> torch.Tensor:
    """x * 2^n, exactly, in two steps so that neither factor over- or underflows float64."""
    return x * 2.0 ** (n // 2) * 2.0 ** (n - n // 2)


class FixedPointSum:
    """Accumulates summands in int64 at one quantum shared by every process; :meth:`total` combines.

    ``peak`` must be the same on every process (from :func:`global_peaks`) and bound every summand's
    |value| (one a little too small, say by rounding, is still safe: int64 keeps a spare bit);
    ``count`` is the number of summands over all processes. Every process calls :meth:`total` once,
    in the same order relative to its other reduces. A peak of inf or NaN (non-finite summands)
    gives a total full of the plain float sum of all values (NaN or +-inf) rather than a crash; a
    peak of 0 gives exact zeros without communicating.
    """

    def __init__(self, peak: float, count: int, shape: Sequence[int], device: torch.device) -> None:
        if peak > 0 and count < 1:
            raise ValueError(f"count must be at least 1 for nonzero summands, got {count}")
        self.peak, self.count, self.shape, self.added = peak, count, tuple(shape), 0
        self.finite = math.isfinite(peak)
        bits = 62 - (max(count, 1) - 1).bit_length()
        self.shift = bits - math.frexp(peak)[1] if self.finite else 0
        # int64 multiples of 2^-shift; or, for non-finite summands, their plain float sum
        self.acc = (torch.zeros(self.shape, dtype=torch.int64, device=device) if self.finite
                    else torch.zeros(1, dtype=torch.float64, device=device))

    def add(self, summands: torch.Tensor) -> None:
        """Add this process's summands, shape (k, *shape)."""
        self.added += summands.shape[0]
        if self.added > self.count:
            raise ValueError(f"more than the announced {self.count} summands")
        if self.peak == 0:
            return
        x = summands.double()
        if self.finite:
            self.acc += _times_power_of_two(x, self.shift).round().to(torch.int64).sum(0)
        else:
            self.acc += x.sum()

    def total(self, reduce: Reduce) -> torch.Tensor:
        """The sum over every process's summands, float64 of shape ``shape``."""
        return totals([self], reduce)[0]

    def _result(self) -> torch.Tensor:
        """The total from the accumulator once it holds every process's part."""
        if self.peak == 0:
            return torch.zeros(self.shape, dtype=torch.float64, device=self.acc.device)
        if not self.finite:
            return self.acc[0].expand(self.shape).clone()
        return _times_power_of_two(self.acc.double(), -self.shift)


def totals(sums: Sequence[FixedPointSum], reduce: Reduce) -> list[torch.Tensor]:
    """:meth:`FixedPointSum.total` of several accumulators in one all-reduce of their concatenation
    (a second one only for non-finite summands, which accumulate in float64): each keeps its own
    quantum and integer sums do not mix, so every total has the bits it would have alone, for one
    synchronisation instead of one per accumulator. Every process passes the same sequence."""
    for finite in (True, False):
        live = [s for s in sums if s.peak != 0 and s.finite == finite]
        if not live:  # peaks are global, so every process skips the same reduces
            continue
        flat = torch.cat([s.acc.flatten() for s in live])
        reduce(flat, "sum")
        for s, piece in zip(live, flat.split([s.acc.numel() for s in live])):
            s.acc = piece.view(s.acc.shape)
    return [s._result() for s in sums]


def exact_sum(summands: torch.Tensor, reduce: Reduce, count: int) -> torch.Tensor:
    """Sum over dim 0 of every process's ``summands`` (k, ...), k possibly 0; ``count`` is the total
    number of summands over all processes. float64, bit-identical whatever the split and order."""
    return exact_sums([summands], reduce, [count])[0]


def exact_sums(summands: Sequence[torch.Tensor], reduce: Reduce, counts: Sequence[int]) -> list[torch.Tensor]:
    """:func:`exact_sum` of several tensors with two all-reduces in all (their peaks, then their
    totals); each result has the bits it would have alone."""
    xs = [x.double() for x in summands]
    local = torch.stack([x.abs().amax() if x.numel() else x.new_zeros(()) for x in xs])
    accumulators = []
    for x, peak, count in zip(xs, global_peaks(local, reduce), counts):
        accumulator = FixedPointSum(peak, count, x.shape[1:], x.device)
        accumulator.add(x)
        accumulators.append(accumulator)
    return totals(accumulators, reduce)


def weighted_sum(inputs: MixInputs) -> torch.Tensor:
    """sum_j W_ij x_j accumulated in the order given (the fixed order makes it reproducible)."""
    total = torch.zeros_like(inputs[0][1])
    for weight, payload in inputs:
        total.add_(payload, alpha=weight)
    return total
