"""The hooks a method implements; the runner calls them in this order every round.

1. ``trained_parts(round)``  which factors the local optimizer may change (others are frozen)
2. ``before_send(peer, round)``  e.g. rotate the factors toward a reference (fedrot); returns the
   rotations applied (:class:`Aligned`)
3. ``sent_parts(round)``  which parts of the flat buffer travel to the neighbours
4. ``pack(peer, round, step, payload)``  what actually travels (default: those parts as they are)
5. ``combine_row(peer, round, inputs, own)``  the new value of those parts from the (weight, payload)
   pairs (``inputs[own]`` the receiver's own), any rotation of the receiver's own factors and the log
   of every rotation applied (:class:`Combined`); by default ``combine(peer, round, inputs)``, the
   weighted average that most methods override
6. ``settle(round, refused, reduce)``  on every process once mixing is done: change what all
   processes must hold alike (fedex's base weights), decided by all of them together

A new method is one small subclass registered with :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..exact import Reduce, exact_sum, weighted_sum
from ..peers.factors import PARTS, FactorLayout
from ..peers.galore import GaLoreSettings

ALL_PARTS = frozenset(PARTS)


class SecondMoments(Protocol):
    """A training peer's optimizer second moments of its dense deltas, in the full weight shape."""

    def lifted(self) -> torch.Tensor:
        """Every dense delta's second moment lifted to its weight's shape, flattened in layout order."""

    def receive(self, lifted: torch.Tensor) -> None:
        """Take these lifted moments in place of the peer's own (re-projected at its next step)."""


@dataclass
class PeerState:
    """One logical peer's trainable state as the methods see it."""

    peer: int
    flat: torch.Tensor  # the live buffer its adapter parameters are views of
    reference: torch.Tensor | None = None  # copy of ``flat`` at the start of the round
    moments: SecondMoments | None = None  # for methods that sync optimizer state; None for peers that do not train


@dataclass
class RotationLog:
    """Rotations a method applied, for the alignment diagnostics: a hook returns those it applied
    (:class:`Aligned`, :class:`Combined`) and the runner adds up a round's."""

    angles: list[float] = field(default_factory=list)  # ||R - I||_F of each rotation (one per module and aligned factor pair)
    # per aligned factor pair: distance of the fitted side to its reference after / before (each distance
    # summed over modules inside its square root; 1 where the side already sat on its reference)
    gains: list[float] = field(default_factory=list)

    def __add__(self, other: RotationLog) -> RotationLog:
        """Both logs, this one's entries first."""
        return RotationLog(self.angles + other.angles, self.gains + other.gains)


@dataclass
class Aligned:
    """What :meth:`Method.before_send` did to a peer's factors: the rotations (one r x r R per module:
    A <- R^T A, B <- B R) that its optimizer moments must follow, None where the factors kept their
    frame, and the log of the rotations applied."""

    rotations: list[torch.Tensor] | None = None
    log: RotationLog = field(default_factory=RotationLog)


@dataclass
class Combined:
    """A mixing row's new value of the sent parts, and the rotations (one r x r R per module: A <- R^T A,
    B <- B R) that the receiver's own factors went through in it, so that its optimizer moments can
    follow them as they follow :meth:`Method.before_send`'s; None where its own factors kept their frame.
    ``log`` holds every rotation the row applied, to its neighbours' factors as well as its own."""

    value: torch.Tensor
    rotations: list[torch.Tensor] | None = None
    log: RotationLog = field(default_factory=RotationLog)


@dataclass(frozen=True)
class MethodContext:
    """Run facts a method may need to configure itself."""

    layout: FactorLayout
    planning_gap: Callable[[], float]  # computes spectral_gap; read the property, which computes it once
    server: bool  # the topology is the star server mode
    model: nn.Module | None = None  # the process's base model with its bank layers, for methods that touch base weights

    @cached_property
    def spectral_gap(self) -> float:
        """1 - rho of one round's mixing (of the average round for time-varying graphs). Computed on
        first read: on thousands of peers the eigen-solve takes seconds that most methods never need."""
        return self.planning_gap()


class Method:
    """Base class: plain weighted averaging of every trained part (FedIT-style factor averaging)."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}  # accepted method_args and their defaults
    needs_reference: ClassVar[bool] = False
    server_only: ClassVar[bool] = False  # defined only for the star server topology
    pooled_data: ClassVar[bool] = False  # one learner on the union of the clients' data
    # combine re-derives the factors in a new basis each round, so the optimizer's moments, which
    # belong to the old basis, are dropped before local training (train.optimizer_state: method)
    resets_optimizer: ClassVar[bool] = False
    # changes the frozen base weights that all peers of a process share, so no client may sit a round out
    changes_base_weights: ClassVar[bool] = False
    # trains a full-shape delta of every adapted weight (the "delta" part) instead of LoRA factors
    dense_deltas: ClassVar[bool] = False
    galore: GaLoreSettings | None = None  # the projected optimizer of the dense deltas, for methods that train them
    # every message a client sends is its whole buffer as it holds it (what an attack forges in its place)
    sends_whole_buffers: ClassVar[bool] = False
    # combine_row is a weighted average of whole buffers (after rotations, which gauge fixing takes over):
    # a robust rule (robust/rules.py) may mix in its place
    averages_buffers: ClassVar[bool] = False

    def __init__(self, args: dict[str, Any], context: MethodContext) -> None:
        unknown = sorted(set(args) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            raise ConfigError(f"method {self.name}: unknown method_args key {unknown[0]!r}; valid keys: {valid}")
        if self.server_only and not context.server:
            raise ConfigError(f"method {self.name} aggregates on a server: use topology: server")
        self.args = {**self.params, **args}
        self.context = context

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State beyond the peers' buffers that a checkpoint must keep (the same on every process)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned, when a run resumes."""

    def trained_parts(self, round: int) -> frozenset[str]:
        return ALL_PARTS

    def sent_parts(self, round: int) -> frozenset[str]:
        """Parts that travel this round; the empty set means no communication at all."""
        return ALL_PARTS

    def before_send(self, peer: PeerState, round: int) -> Aligned:
        """Hook run on every training peer after local steps and before the exchange. A method that
        re-expresses the factors by rotations returns them, one r x r R per module (A <- R^T A,
        B <- B R), so that the peer's optimizer moments can follow, with their log; the default
        changes nothing."""
        return Aligned()

    def pack(self, peer: PeerState, round: int, step: int, payload: torch.Tensor) -> torch.Tensor:
        """The message ``peer`` sends in mixing step ``step`` (the server mode has two steps)."""
        return payload

    def payload_numel(self, round: int, step: int, sender: int) -> int:
        """Size of :meth:`pack`'s result for ``sender``; every process must compute the same."""
        return self.context.layout.payload_numel(self.sent_parts(round))

    def consensus(self, rows: torch.Tensor, count: int, reduce: Reduce) -> torch.Tensor:
        """The run's consensus adapter from every client's buffer (``rows``: this process's clients,
        ``count`` clients in all): the exact mean of the buffers, as averaging methods mix."""
        return exact_sum(rows.double(), reduce, count) / count

    def combine_row(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]],
                    own: int | None) -> Combined:
        """What the mixer calls for each mixing row. ``inputs[own]`` is the receiver's own payload (``own``
        is None where the row does not read it: the server's hub, a client adopting the hub's), so that
        no method has to recognise it by its value; the default leaves every frame as it is."""
        return Combined(self.combine(peer, round, inputs))

    def combine(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
        """New value of the sent parts from the (W_ij, x_j) pairs, ordered by j: sum_j W_ij x_j."""
        return weighted_sum(inputs)

    def settle(self, round: int, refused: Sequence[tuple[int, int]], reduce: Reduce) -> None:
        """Hook run on every process after the round's mixing, before anything reads its results.
        ``refused`` holds the (sender, receiver) pairs of the payloads this process's peers refused
        (``comm.on_bad_payload: drop``), which only this process knows: state that every process must
        hold alike changes here, by a decision all processes take together through ``reduce``."""


def adopts(inputs: Sequence[tuple[float, torch.Tensor]]) -> bool:
    """True when a peer simply takes one sender's payload (a client in the server's down step)."""
    return len(inputs) == 1 and inputs[0][0] == 1.0


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered class of method ``name``: what it is, before any run builds one."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_method(name: str, args: dict[str, Any], context: MethodContext) -> Method:
    return method_class(name)(dict(args or {}), context)


def trains_dense_deltas(name: str) -> bool:
    """Whether method ``name`` needs dense deltas in the peers' buffers (known before the bank is built)."""
    return name in _REGISTRY and _REGISTRY[name].dense_deltas


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
