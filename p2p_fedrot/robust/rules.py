"""Robust mixing rules: one receiver's new buffer from its row of (weight, payload) pairs.

A rule is called like :meth:`Method.combine_row <p2p_fedrot.methods.base.Method.combine_row>` reads
its inputs: ``rule(inputs, own, layout)``, the pairs ordered by sender, ``inputs[own]`` the receiver's
own, every payload a full buffer of ``layout``. With ``gauge: true`` (the default) the rule reads the
row gauge-fixed (:mod:`.gauge`) and its result goes back to the receiver's own gauge; with
``gauge: false`` it reads the factors as sent.

- ``plain``: sum_j w_j x_j, exactly :func:`p2p_fedrot.exact.weighted_sum` (the baseline).
- ``clip``: self-centred clipping (He, Karimireddy, Jaggi, arXiv 2202.01545): sum_j w_j z_j with
  z_j = x_j where d_j <= tau, else x_i + (tau / d_j)(x_j - x_i); d_j the distance of :mod:`.distance`.
  ``tau: auto`` is the authors' adaptive radius (epfml/byzantine-robust-decentralized-optimizer,
  codes/aggregator.py, SelfCenteredClipping.__call__): the second largest of the neighbours' distances
  (the receiver's own left out; the only one with a single neighbour), so the farthest neighbour is
  clipped to the next one's distance; the weights do not enter it. A number is a fixed radius.
- ``cs_plus``: CS+ (Gaucher, Dieuleveut, Hendrikx, arXiv 2410.10418; renaudgaucher/Byzantine-Robust-Gossip,
  aggregators/robust_gossip.py, cs_plus): the same clipped sum with tau the largest distance among
  the closest senders (the receiver first, at 0) whose weights add up to at most the row's total
  minus twice the Byzantine weight, 0 where there is none; the Byzantine weight is that of the ``b``
  heaviest neighbours. With uniform weights: the 2b farthest neighbours are clipped to the
  (2b+1)-th largest distance. b = 0 is plain mixing.
- ``trimmed_mean``: per coordinate, the b largest and the b smallest neighbours' values are dropped,
  the receiver's own always kept, and the kept values averaged with their mixing weights, renormalised:
  x_i + sum_kept w_j (x_j - x_i) / (w_i + sum_kept w_j). A receiver with at most 2b neighbours keeps its own.
- ``median``: per coordinate, the weighted median of all values, the receiver's own included with its
  weight: the smallest value whose cumulative weight reaches half the total; where it meets half
  exactly, the midpoint of that value and the next (uniform weights: the coordinate median of the
  ClippedGossip code's DeCM, the mean of the two middles for an even count; never torch.median,
  which returns the lower middle).

Floating operations run in a fixed order (sums over senders in sender order, sorts stable, ties
broken by sender order), so a row gives the same bits every time. Distances come from matmuls,
as deterministic as the methods' Procrustes fits for a fixed thread count. trimmed_mean and median
return identical inputs exactly for any weights; plain, clip and cs_plus sum w_j x_j as
:func:`~p2p_fedrot.exact.weighted_sum` does (clipping must equal plain bit for bit when it clips
nothing), which is exact on identical inputs only where the running sum of the weights' copies is
(weights 1/8, 1/8, 1/4, 1/2: yes; 1/3 each or 1/8 each: no).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..exact import MixInputs, weighted_sum
from ..peers.factors import FactorLayout
from .distance import row_distances
from .gauge import full_rank_modules, gauge_fix

WEIGHT_RTOL = 1e-12  # cumulative weights this close (relative to the row's total) count as equal


@dataclass(frozen=True)
class Row:
    """A receiver's row as a rule reads it: weights, payloads (gauge-fixed or as sent) and the receiver's index."""

    weights: list[float]
    payloads: list[torch.Tensor]
    own: int
    layout: FactorLayout
    products: tuple[bool, ...]  # per module: distance in product space (else the factors')

    @property
    def inputs(self) -> MixInputs:
        return list(zip(self.weights, self.payloads))

    @property
    def neighbours(self) -> list[int]:
        return [j for j in range(len(self.payloads)) if j != self.own]

    def distances(self) -> torch.Tensor:
        return row_distances(self.payloads, self.own, self.layout, self.products)


class Rule:
    """A robust rule: validated settings, then ``rule(inputs, own, layout)`` -> the receiver's new buffer."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}  # settings besides ``rule`` and ``gauge``, with their defaults

    def __init__(self, gauge: bool = True) -> None:
        if not isinstance(gauge, bool):
            raise ConfigError(f"robust.gauge = {gauge!r} must be true (rules read gauge-fixed factors) or false")
        self.gauge = gauge

    def __call__(self, inputs: Sequence[tuple[float, torch.Tensor]], own: int | None,
                 layout: FactorLayout) -> torch.Tensor:
        _check(inputs, own, layout)
        weights, payloads = [float(w) for w, _ in inputs], [x for _, x in inputs]
        if not self.gauge:
            return self.combine(Row(weights, payloads, own, layout, full_rank_modules(payloads[own], layout)))
        fixed, frame = gauge_fix(payloads, own, layout)
        return frame.restore(self.combine(Row(weights, fixed, own, layout, frame.fixed)))

    def combine(self, row: Row) -> torch.Tensor:
        raise NotImplementedError


def _check(inputs: Sequence[tuple[float, torch.Tensor]], own: int | None, layout: FactorLayout) -> None:
    if own is None or not 0 <= own < len(inputs):
        raise ValueError(f"a robust rule needs the receiver's own payload among its {len(inputs)} inputs; "
                         f"got own = {own!r} (rows without it, the server's hub and adopting clients, mix plainly)")
    sizes = {x.numel() for _, x in inputs}
    if sizes != {layout.numel}:
        raise ValueError(f"robust rules read full buffers of {layout.numel} values; got payloads of {sorted(sizes)}")


class Plain(Rule):
    name = "plain"

    def combine(self, row: Row) -> torch.Tensor:
        return weighted_sum(row.inputs)


def clipped_sum(row: Row, distances: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_j w_j z_j, z_j = x_j where d_j <= tau (so nothing clipped is exactly ``plain``), else
    x_i + (tau / d_j)(x_j - x_i), the receiver's x_i plus its step toward x_j clipped to length tau."""
    own = row.payloads[row.own]
    return weighted_sum([(weight, x if d <= tau else own + (x - own) * (tau / d))
                         for weight, x, d in zip(row.weights, row.payloads, distances.tolist())])


def adaptive_tau(distances: Sequence[float]) -> float:
    """The ClippedGossip code's radius from the neighbours' distances: the second largest, the only one
    for a single neighbour, inf (nothing to clip) for none."""
    ordered = sorted(distances)
    return ordered[-2] if len(ordered) >= 2 else ordered[-1] if ordered else math.inf


class Clip(Rule):
    name = "clip"
    params = {"tau": "auto"}

    def __init__(self, tau: Any = "auto", gauge: bool = True) -> None:
        super().__init__(gauge)
        if tau != "auto" and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0):
            raise ConfigError(f"robust.tau = {tau!r} must be auto (the ClippedGossip radius) or a number > 0 "
                              "(.inf: no clipping)")
        self.tau = None if tau == "auto" else float(tau)

    def combine(self, row: Row) -> torch.Tensor:
        distances = row.distances()
        tau = self.tau if self.tau is not None else adaptive_tau([float(distances[j]) for j in row.neighbours])
        return clipped_sum(row, distances, tau)


def cs_plus_tau(distances: Sequence[float], weights: Sequence[float], own: int, b: int) -> float:
    """CS+'s radius: the largest distance among the closest senders (stable order) whose cumulative
    weight stays within total - 2 * (weight of the b heaviest neighbours); 0 where none does, inf for
    a Byzantine weight of 0."""
    byzantine = sum(sorted((w for j, w in enumerate(weights) if j != own), reverse=True)[:b])
    if byzantine <= 0:
        return math.inf
    total = sum(weights)
    target = total - 2.0 * byzantine + WEIGHT_RTOL * total
    tau, cumulative = 0.0, 0.0
    for j in sorted(range(len(distances)), key=lambda j: (distances[j], j)):
        cumulative += weights[j]
        if cumulative > target:
            break
        tau = distances[j]
    return tau


class Assuming(Rule):
    """A rule told how many of a receiver's neighbours it should expect to be Byzantine (``b``)."""

    params = {"b": 1}
    b_means: ClassVar[str] = ""

    def __init__(self, b: Any = 1, gauge: bool = True) -> None:
        super().__init__(gauge)
        if isinstance(b, bool) or not isinstance(b, int) or b < 0:
            raise ConfigError(f"robust.b = {b!r} must be a whole number >= 0 ({self.b_means})")
        self.b = b


class CSPlus(Assuming):
    name = "cs_plus"
    b_means = "Byzantine neighbours each receiver assumes"

    def combine(self, row: Row) -> torch.Tensor:
        distances = row.distances()
        return clipped_sum(row, distances, cs_plus_tau(distances.tolist(), row.weights, row.own, self.b))


class TrimmedMean(Assuming):
    name = "trimmed_mean"
    b_means = "largest and smallest neighbour values dropped per coordinate"

    def combine(self, row: Row) -> torch.Tensor:
        own = row.payloads[row.own]
        neighbours = row.neighbours
        if len(neighbours) <= 2 * self.b:
            return own.clone()
        values = torch.stack([row.payloads[j] for j in neighbours])
        order = values.sort(dim=0, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(0, order, torch.arange(len(neighbours), device=own.device)[:, None].expand_as(order))
        kept = (ranks >= self.b) & (ranks < len(neighbours) - self.b)
        step = torch.zeros_like(own)
        norm = torch.full_like(own, row.weights[row.own])
        for keep, j in zip(kept, neighbours):
            step.add_(torch.where(keep, row.payloads[j] - own, 0.0), alpha=row.weights[j])
            norm.add_(keep.to(own.dtype), alpha=row.weights[j])
        return own + step / norm


class Median(Rule):
    name = "median"

    def combine(self, row: Row) -> torch.Tensor:
        values, order = torch.stack(row.payloads).sort(dim=0, stable=True)
        weights = torch.tensor(row.weights, dtype=torch.float64, device=values.device)[order]
        cumulative = weights.cumsum(0)
        total = sum(row.weights)
        half, slack = total / 2.0, WEIGHT_RTOL * total
        low = (cumulative < half - slack).sum(0, keepdim=True).clamp_max(len(row.payloads) - 1)
        high = (low + 1).clamp_max(len(row.payloads) - 1)
        at_half = (cumulative.gather(0, low) - half).abs() <= slack
        lower, upper = values.gather(0, low), values.gather(0, high)
        return torch.where(at_half, (lower + upper) * 0.5, lower)[0]


RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (Plain, Clip, CSPlus, TrimmedMean, Median)}


def make_rule(settings: Mapping[str, Any]) -> Rule:
    """The rule a ``robust:`` config section names, e.g. ``{rule: clip, tau: auto}``, its settings checked."""
    settings = dict(settings)
    name = settings.pop("rule", None)
    if name not in RULES:
        raise ConfigError(f"robust.rule = {name!r} must be one of {', '.join(RULES)}")
    valid = ["gauge", *RULES[name].params]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ConfigError(f"robust.{unknown[0]} is not a setting of rule {name}; its settings: {', '.join(valid)}")
    return RULES[name](**settings)
