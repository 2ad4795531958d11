"""Byzantine peers inside a run: which clients lie, what their messages become at each honest
receiver, and the labels a label-flipping client trains on.

The adversary is omniscient and acts where a message is read. Every peer sends its own honestly
computed payload, so the bytes on the wire do not change; when an honest receiver assembles its
mixing row, each input from an adversary peer is replaced by the attack's payload, computed from
what that row holds in the same mixing step: the adversary's own payload (sign_flip, scaled,
gaussian, gauge_scale), the row's honest messages, the receiver's own included, as the ClippedGossip
code takes its target's and the target's good neighbours' models (alie, ipm), or the receiver's own
payload and its row's weights (dissensus). This is the threat model of the robust-gossip literature,
an adversary that knows every honest message before it sends its own; it lets an attack differ per
receiver, as dissensus must, and it does not depend on how peers are placed on processes. The
adversary's peers otherwise run as normal peers: they train, and their own rows mix what they
receive as sent. ``label_flip`` changes their training data instead of their messages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ..config import AdversaryConfig
from ..data.federated import FederatedData, flip_labels
from ..errors import ConfigError
from ..exact import MixInputs
from ..methods import available_methods, method_class
from ..peers.factors import FactorLayout
from ..robust import attacks
from ..seeding import derive_seed

HUB = 0  # the server topology's hub, always honest
KNOWS = "same step"  # what a forged message knows of the honest ones: those mixed in the same step


@dataclass(frozen=True)
class HonestRow:
    """What the adversary sees of an honest receiver's row in one mixing step."""

    messages: list[torch.Tensor]  # the honest payloads in sender order, the receiver's own included
    own: torch.Tensor | None  # the receiver's own payload (None: the server's hub, which mixes none)
    neighbours: MixInputs  # the honest neighbours' (weight, payload), the receiver's own left out
    byzantine_weight: float  # the weight the row gives its adversary inputs together


@dataclass(frozen=True)
class Forgery:
    """One forged message: the payload its adversary peer sent, the row that reads it, the attack's
    strength, and the seed of its noise, drawn from (run seed, round, step, sender, receiver)."""

    sent: torch.Tensor
    row: HonestRow
    strength: float
    layout: FactorLayout
    seed: int

    def noise(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def _dissensus(forgery: Forgery) -> torch.Tensor:
    row = forgery.row
    if row.own is None:
        raise ValueError("the dissensus attack needs the receiver's own payload in its row")
    return attacks.dissensus(row.own, row.neighbours, row.byzantine_weight, forgery.strength)


# attack -> the message it sends in place of its peer's own (config.ATTACK_STRENGTHS lists them all)
FORGERS: dict[str, Callable[[Forgery], torch.Tensor]] = {
    "sign_flip": lambda f: attacks.sign_flip(f.sent),
    "scaled": lambda f: attacks.scaled(f.sent, f.strength),
    "gaussian": lambda f: attacks.gaussian(f.sent, f.strength, f.noise()),
    "gauge_scale": lambda f: attacks.gauge_scale(f.sent, f.strength, f.layout),
    "alie": lambda f: attacks.alie(f.row.messages, f.strength),
    "ipm": lambda f: attacks.ipm(f.row.messages, f.strength),
    "dissensus": _dissensus,
}
IMITATING = frozenset({"alie", "ipm", "dissensus"})  # forged from the honest messages of the row


def check_adversary(config: AdversaryConfig, clients: Sequence[int], server: bool, method: str,
                    causal_lm: bool) -> None:
    """What the config alone cannot check: the adversary's peers against the clients, its attack
    against the method, the graph and the task."""
    peers, attack = config.peers, config.attack
    if server and HUB in peers:
        raise ConfigError(f"adversary.peers = {peers}: peer {HUB} is the server's hub, which is honest; name clients "
                          f"among {clients[0]}..{clients[-1]}")
    if peers and not set(clients) - set(peers):
        raise ConfigError(f"adversary.peers = {peers} names every client; leave at least one honest")
    if attack == "label_flip" and causal_lm:
        raise ConfigError("adversary.attack = label_flip flips class labels, which a causal LM (model.task: "
                          "causal_lm) has none of; choose a message attack")
    if attack in FORGERS and not method_class(method).sends_whole_buffers:
        accepting = [m for m in available_methods() if method_class(m).sends_whole_buffers]
        raise ConfigError(f"adversary.attack = {attack} forges whole buffers, which method {method} does not send; "
                          f"methods whose messages it forges: {', '.join(accepting)} (label_flip fits any)")
    if attack == "dissensus" and server:
        raise ConfigError("adversary.attack = dissensus pulls a gossip receiver away from its own state, and the "
                          "server's hub mixes none; use a gossip topology or another attack")


def poison(data: FederatedData, config: AdversaryConfig) -> None:
    """Label flipping: the adversary's clients train on labels C - 1 - y; their local test splits stay."""
    if config.attack == "label_flip":
        for peer in config.peers:
            shard = data.clients[peer]
            data.clients[peer] = replace(shard, train=flip_labels(shard.train, data.num_classes))


class Adversary:
    """The Byzantine clients of a run and the messages they forge for each honest receiver."""

    def __init__(self, config: AdversaryConfig, seed: int, layout: FactorLayout) -> None:
        self.peers = frozenset(config.peers)
        self.attack, self.strength = config.attack, config.strength
        self.seed, self.layout = seed, layout
        self.forge = FORGERS.get(config.attack)  # None: the messages stay as sent

    def honest(self, peer: int) -> bool:
        return peer not in self.peers

    def record(self) -> dict:
        """The adversary as summary.json describes it."""
        return {"peers": sorted(self.peers), "attack": self.attack, "strength": self.strength,
                "knows": KNOWS if self.forge is not None else None}

    def received(self, round: int, step: int, receiver: int, senders: Sequence[int], inputs: MixInputs) -> MixInputs:
        """Row ``receiver``'s (weight, payload) inputs, ordered as ``senders``, as the receiver reads them:
        each adversary peer's payload forged where the receiver is honest. A row with no honest
        message leaves the imitating attacks nothing to imitate: their messages stay as sent."""
        if self.forge is None or receiver in self.peers:
            return inputs
        liars = [n for n, sender in enumerate(senders) if sender in self.peers]
        if not liars:
            return inputs
        row = self._honest_row(receiver, senders, inputs, liars)
        if self.attack in IMITATING and not row.messages:
            return inputs
        forged = list(inputs)
        for n in liars:
            seed = derive_seed(self.seed, "attack", round, step, senders[n], receiver)
            forged[n] = (inputs[n][0], self.forge(Forgery(inputs[n][1], row, self.strength, self.layout, seed)))
        return forged

    @staticmethod
    def _honest_row(receiver: int, senders: Sequence[int], inputs: MixInputs, liars: list[int]) -> HonestRow:
        honest = [n for n in range(len(inputs)) if n not in liars]
        own = next((inputs[n][1] for n in honest if senders[n] == receiver), None)
        return HonestRow([inputs[n][1] for n in honest], own,
                         [inputs[n] for n in honest if senders[n] != receiver],
                         sum(inputs[n][0] for n in liars))

