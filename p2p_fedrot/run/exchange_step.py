"""A round's communication, one mixing step at a time: exchange the payloads, combine each hosted
mixing row, and on evaluated rounds measure, where the data already is, how far each mixing peer's
new adapter is from the exact W-weighted mix of the adapters its neighbourhood sent.

With an adversary, honest rows read its peers' messages forged (run/adversary.py) and only honest
rows are measured; with a robust rule, the rule mixes every row that reads the receiver's own payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy import sparse

from ..comm.faults import TAMPER, corrupted
from ..comm.routes import collect_mix_inputs, routes_of, row_entries
from ..comm.screening import BadPayload, PayloadRules
from ..comm.transport import Transport
from ..config import CommConfig
from ..exact import MixInputs
from ..graph.schedule import MixingSchedule
from ..methods.base import ALL_PARTS, Combined, Method, PeerState, RotationLog
from ..peers.factors import FactorLayout
from ..robust.rules import Rule
from .adversary import Adversary
from .metrics import aggregation_errors, rotational_disagreement

SentBuffers = dict[int, list[tuple[int, float, torch.Tensor]]]  # per measured row: (j, W_ij, buffer of j as sent)


@dataclass
class MixOutcome:
    """What mixing steps left behind on this process: the payloads refused, the rotations the method
    applied in the mix and, when measured, the (absolute, relative) aggregation errors of its mixing
    rows and the rotational part of each incoming edge's disagreement. One step's, or a round's
    when added up (:meth:`add`)."""

    dropped: list[dict] = field(default_factory=list)
    errors: list[tuple[float, float]] = field(default_factory=list)
    rotational: list[tuple[float, float]] = field(default_factory=list)  # (removed, total) per measured edge
    # (peer, one r x r R per module) for each hosted receiver whose own factors the method rotated, in
    # the order applied: its optimizer moments must follow (HostedPeers.follow_rotations)
    rotated: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)
    rotations: RotationLog = field(default_factory=RotationLog)  # every rotation the combines applied

    @property
    def refused(self) -> list[tuple[int, int]]:
        """(sender, receiver) of every payload this process's peers refused."""
        return [(bad["sender"], bad["receiver"]) for bad in self.dropped]

    def add(self, other: MixOutcome) -> None:
        """Append what a later step left behind."""
        self.dropped += other.dropped
        self.errors += other.errors
        self.rotational += other.rotational
        self.rotated += other.rotated
        self.rotations = self.rotations + other.rotations


@dataclass(frozen=True)
class MixingStep:
    """Mixing step ``k`` of a round: its weights and the parts of the buffers that travel."""

    round: int
    k: int
    W: sparse.csr_array
    parts: frozenset[str]


@dataclass
class Arrived:
    """A mixing step's exchange as it arrived: each hosted mixing row's (W_ij, payload of j) inputs,
    ordered by j, and the payloads its peers refused."""

    step: MixingStep
    inputs: dict[int, MixInputs]
    dropped: list[BadPayload]

    @property
    def refused(self) -> set[tuple[int, int]]:
        return {(bad.sender, bad.receiver) for bad in self.dropped}


@dataclass
class SentCopy:
    """What the error metric compares a step's mix with, kept before the mix overwrites it: for each
    row that mixes several inputs, the buffers its senders sent and its own buffer before the mix."""

    sent: SentBuffers
    before: dict[int, torch.Tensor]


def row_senders(W: sparse.csr_array, i: int, refused: set[tuple[int, int]]) -> list[int]:
    """Whose payloads row i mixes, in the order of its inputs: by ascending sender, itself included,
    without those it refused."""
    return [j for j, _ in row_entries(W, i) if (j, i) not in refused]


def own_input(W: sparse.csr_array, i: int, refused: set[tuple[int, int]]) -> int | None:
    """Where row i's own payload sits among its mix inputs; None where the row does not read it."""
    senders = row_senders(W, i, refused)
    return senders.index(i) if i in senders else None


class Mixer:
    """Runs the method's pack / exchange / combine along the schedule's mixing steps."""

    def __init__(self, method: Method, schedule: MixingSchedule, layout: FactorLayout, transport: Transport,
                 probe: Transport, comm: CommConfig, warmup_rounds: int = 0, adversary: Adversary | None = None,
                 rule: Rule | None = None) -> None:
        self.method, self.schedule, self.layout, self.comm = method, schedule, layout, comm
        self.warmup_rounds = warmup_rounds  # rounds of local training only, before the first exchange
        self.adversary, self.rule = adversary, rule
        self.transport = transport
        self.probe = probe  # carries whole buffers for the error metric when payloads are partial (not counted)
        self.rules = PayloadRules(comm.validate, comm.max_norm_ratio, comm.on_bad_payload)

    def steps(self, round: int) -> list[MixingStep]:
        """The round's mixing steps; none when nothing travels (the warm-up, a method that sends nothing)."""
        parts = self.sent_parts(round)
        if not parts:
            return []
        return [MixingStep(round, k, W, parts) for k, W in enumerate(self.schedule.steps_at(round))]

    def exchange(self, step: MixingStep, states: dict[int, PeerState]) -> Arrived:
        """Every hosted peer packs its payload and sends it along the step's routes; what each hosted
        mixing row receives is screened."""
        round, k = step.round, step.k
        payloads = {p: self.method.pack(s, round, k, self.layout.extract(s.flat, step.parts)) for p, s in states.items()}
        outgoing, tampered = self.drill(payloads, round)
        inputs, dropped = collect_mix_inputs(
            self.transport, step.W, payloads, step=f"round {round} step {k}",
            numel_of=lambda src: self.method.payload_numel(round, k, src),
            outgoing=outgoing, rules=self.rules, tag=(round, k), tampered=tampered)
        if self.adversary is not None:
            refused = {(bad.sender, bad.receiver) for bad in dropped}
            inputs = {i: self.adversary.received(round, k, i, row_senders(step.W, i, refused), row)
                      for i, row in inputs.items()}
        return Arrived(step, inputs, dropped)

    def keep_sent(self, arrived: Arrived, states: dict[int, PeerState]) -> SentCopy:
        """Copies of what the error metric needs, taken before :meth:`combine` overwrites the buffers."""
        sent = self.sent_buffers(arrived, states)
        if self.adversary is not None:  # honest metrics: the adversary's own rows are not measured
            sent = {i: row for i, row in sent.items() if self.adversary.honest(i)}
        return SentCopy(sent, {i: states[i].flat.clone() for i in sent})

    def combine(self, arrived: Arrived, states: dict[int, PeerState]) -> MixOutcome:
        """Each hosted mixing row's new value of the sent parts; returns the step's outcome: the
        payloads refused in its exchange and the rotations its combines applied."""
        step, refused = arrived.step, arrived.refused
        outcome = MixOutcome(dropped=[bad.as_record(step.round) for bad in arrived.dropped])
        # every row's inputs are read before any row is written: local inputs are views of buffers
        updates = {i: self.combine_row(states[i], step.round, inputs, own_input(step.W, i, refused))
                   for i, inputs in arrived.inputs.items()}
        for i, combined in updates.items():
            self.layout.insert(states[i].flat, step.parts, combined.value)
            if combined.rotations is not None:
                outcome.rotated.append((i, combined.rotations))
            outcome.rotations = outcome.rotations + combined.log
        return outcome

    def combine_row(self, state: PeerState, round: int, inputs: MixInputs, own: int | None) -> Combined:
        """The method's combine, or the robust rule in its place where the row reads the receiver's own
        payload; the rule's result keeps the receiver's gauge, so no rotation follows it."""
        if self.rule is None or own is None:
            return self.method.combine_row(state, round, inputs, own)
        return Combined(self.rule(inputs, own, self.layout))

    def measure(self, kept: SentCopy, states: dict[int, PeerState]) -> MixOutcome:
        """Aggregation error of each row, and the rotational part of the disagreement on each edge
        j -> i between what j sent and what i held (the server's hub: the model the clients started from)."""
        outcome = MixOutcome()
        rows = {i: [(w, x) for _, w, x in triples] for i, triples in kept.sent.items()}
        outcome.errors += list(aggregation_errors(self.layout, rows, {i: states[i].flat for i in kept.sent}).values())
        for i, triples in kept.sent.items():
            outcome.rotational += [rotational_disagreement(self.layout, kept.before[i], x)
                                   for j, _, x in triples if j != i]
        return outcome

    def sent_buffers(self, arrived: Arrived, states: dict[int, PeerState]) -> SentBuffers:
        """For each row that mixes several inputs, its (j, W_ij, buffer of j as sent) triples: the
        payloads themselves (copied) when they are whole buffers, else whole buffers fetched over the probe.

        Whether the probe runs is decided from W and the method alone, the same on every process: a
        process with no mixing row of its own (the server's clients in the up step) must still send the
        buffers that another process's rows measure, or that process waits for them to the deadline."""
        step, refused = arrived.step, arrived.refused
        round, k = step.round, step.k
        rows = {i: inputs for i, inputs in arrived.inputs.items() if len(inputs) > 1}
        senders = {i: row_senders(step.W, i, refused) for i in rows}
        routes = routes_of(step.W)
        whole = step.parts == ALL_PARTS and all(self.method.payload_numel(round, k, src) == self.layout.numel
                                                for src, _ in routes)
        if whole or not routes:  # copies: mixing then overwrites the buffers that local inputs view
            return {i: [(j, w, x.clone()) for j, (w, x) in zip(senders[i], inputs)] for i, inputs in rows.items()}
        buffers = {p: s.flat.clone() for p, s in states.items()}
        received = self.probe.exchange(buffers, routes, numel_of=lambda src: self.layout.numel,
                                       step=f"round {round} step {k} (metrics)", tag=(round, -1 - k))
        received.update(buffers)
        return {i: [(j, w, received[j]) for j, (w, _) in zip(senders[i], inputs)] for i, inputs in rows.items()}

    def sent_parts(self, round: int) -> frozenset[str]:
        """What travels this round: nothing during the warm-up, then what the method sends."""
        return frozenset() if round < self.warmup_rounds else self.method.sent_parts(round)

    def drill(self, payloads: dict[int, torch.Tensor], round: int) -> tuple[dict[int, torch.Tensor], frozenset[int]]:
        """What the hosted peers send, one payload corrupted if ``comm.inject_fault`` says so, and whose
        frames the transport alters on the wire (the tamper kind)."""
        fault = self.comm.inject_fault
        if not fault or fault["round"] != round or fault["peer"] not in payloads:
            return payloads, frozenset()
        if fault["kind"] == TAMPER:
            return payloads, frozenset({fault["peer"]})
        bad = corrupted(payloads[fault["peer"]], fault["kind"], self.comm.max_norm_ratio)
        return {**payloads, fault["peer"]: bad}, frozenset()

    def round_bytes(self, round: int, element_size: int) -> int:
        """Bytes all peers send in a round: one payload per directed route of every mixing step."""
        if not self.sent_parts(round):
            return 0
        return sum(self.method.payload_numel(round, k, src) * element_size
                   for k, W in enumerate(self.schedule.steps_at(round)) for src, _ in routes_of(W))

    def payload_bytes(self, round: int, sender: int, element_size: int) -> int:
        """Size of one peer's message in the round's first step (what a gossip peer sends each neighbour)."""
        return self.method.payload_numel(round, 0, sender) * element_size if self.method.sent_parts(round) else 0
