"""FedGaLore: GaLore clients, exact full-space aggregation, synchronised second moments.

Peers train a dense delta dW of every adapted weight (the LoRA factors stay at B = 0, unused)
with GaLore-Adam, and the head as usual; deltas and head are averaged with the mixing weights,
which is exact in the full space (no product error). With ``sync`` the peers also send their
optimizer's second moments lifted to the full weight shape (see :mod:`..galore`), and each
receiver takes their combination: ``mean`` (the mixing-weighted mean) or ``shared`` (per weight,
the receiver's own moment with its component along the ``shared_rank`` input directions the
neighbourhood's moments have in common replaced by the mean's: the shared signal is synchronised,
what is the peer's own is kept; see :func:`..galore.joint_directions`). ``none`` is the plain
"GaLore clients + averaging" baseline. The lift and both combinations are this project's reading of
the method (its paper has no public code).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..exact import weighted_sum
from ..peers.factors import TensorSpec
from ..peers.galore import GaLoreSettings, joint_component, joint_directions, sync_joint
from .base import Method, MethodContext, PeerState, register

SYNCS = ("none", "mean", "shared")
HUB = 0  # the server topology's hub
DENSE_AND_HEAD = frozenset({"delta", "head"})


@register
class FedGaLore(Method):
    name = "fedgalore"
    params = {"rank": None, "proj_every": 10, "scale": 0.25, "sync": "shared", "shared_rank": 1}
    dense_deltas = True

    def __init__(self, args: dict, context: MethodContext) -> None:
        super().__init__(args, context)
        layout = context.layout
        rank = self.args["rank"] if self.args["rank"] is not None else layout.a[0].shape[0]  # the LoRA r
        checks = [
            (isinstance(rank, int) and rank >= 1, f"rank must be an integer >= 1 (got {rank!r})"),
            (isinstance(self.args["proj_every"], int) and self.args["proj_every"] >= 1,
             f"proj_every must be an integer >= 1 (got {self.args['proj_every']!r})"),
            (isinstance(self.args["scale"], (int, float)) and self.args["scale"] > 0,
             f"scale must be a positive number (got {self.args['scale']!r})"),
            (self.args["sync"] in SYNCS, f"sync must be one of {', '.join(SYNCS)} (got {self.args['sync']!r})"),
            (isinstance(self.args["shared_rank"], int) and self.args["shared_rank"] >= 1,
             f"shared_rank must be an integer >= 1 (got {self.args['shared_rank']!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"method fedgalore: method_args {message}")
        self.galore = GaLoreSettings(rank, self.args["proj_every"], float(self.args["scale"]))
        self.sync = self.args["sync"]
        self.moments_numel = sum(spec.numel for spec in layout.delta) if self.sync != "none" else 0
        self.joint_numel = sum(spec.shape[1] * self.joint_rank(spec) for spec in layout.delta)
        # what the server's hub (which does not train) combined this round: moments, joint directions
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def trained_parts(self, round: int) -> frozenset[str]:
        return DENSE_AND_HEAD

    def sent_parts(self, round: int) -> frozenset[str]:
        return DENSE_AND_HEAD

    def payload_numel(self, round: int, step: int, sender: int) -> int:
        joint = self.joint_numel if self._sends_joint(step, sender) else 0
        return self.context.layout.payload_numel(DENSE_AND_HEAD) + self.moments_numel + joint

    def _sends_joint(self, step: int, sender: int) -> bool:
        """The server's down step with ``shared``: the hub also sends the joint directions it found."""
        return self.sync == "shared" and self.context.server and step == 1 and sender == HUB

    def pack(self, peer: PeerState, round: int, step: int, payload: torch.Tensor) -> torch.Tensor:
        """Deltas and head, then (when synced) the sender's lifted second moments: its optimizer's,
        or, for the hub, the combination it made of the clients' this round (and their joint directions)."""
        if not self.moments_numel:
            return payload
        if peer.moments is not None:
            pieces = [payload, peer.moments.lifted().to(payload)]
        else:
            moments, joint = self.held.get(peer.peer, (payload.new_zeros(self.moments_numel),
                                                       payload.new_zeros(self.joint_numel)))
            pieces = [payload, moments.to(payload)] + ([joint.to(payload)] if self._sends_joint(step, peer.peer) else [])
        return torch.cat(pieces)

    def combine(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
        cut = self.context.layout.payload_numel(DENSE_AND_HEAD)
        mixed = weighted_sum([(w, x[:cut]) for w, x in inputs])
        if self.moments_numel:
            moments = [(w, x[cut : cut + self.moments_numel]) for w, x in inputs]
            if self.sync == "mean":
                self._deliver(peer, weighted_sum(moments), None)
            elif self.context.server and peer.peer != HUB:  # a client adopting the hub's shared moments
                ((_, packed),) = inputs
                self._deliver(peer, moments[0][1], self._split(packed[cut + self.moments_numel :], joint=True))
            else:
                self._deliver(peer, weighted_sum(moments), self._joint_directions(moments))
        return mixed

    def _joint_directions(self, moments: list[tuple[float, torch.Tensor]]) -> list[torch.Tensor]:
        weights = [w for w, _ in moments]
        per_peer = [self._split(x) for _, x in moments]
        return [joint_directions(weights, [blocks[m] for blocks in per_peer], self.args["shared_rank"])
                for m in range(len(self.context.layout.delta))]

    def _deliver(self, peer: PeerState, mean: torch.Tensor, joint: list[torch.Tensor] | None) -> None:
        """Hand the combination to the peer's optimizer: the mean, or, with joint directions, the
        peer's own moments with their joint component replaced by the mean's. The hub keeps the
        mean's joint component and the directions, to send them to the clients."""
        if joint is None:
            if peer.moments is not None:
                peer.moments.receive(mean)
            else:
                self.held[peer.peer] = (mean, mean.new_zeros(0))
            return
        means = self._split(mean)
        if peer.moments is not None:
            owns = self._split(peer.moments.lifted())
            peer.moments.receive(torch.cat([sync_joint(own, m, q).reshape(-1) for own, m, q in zip(owns, means, joint)]))
        else:
            restricted = [joint_component(m, q).to(m.dtype).reshape(-1) for m, q in zip(means, joint)]
            self.held[peer.peer] = (torch.cat(restricted), torch.cat([q.to(mean.dtype).reshape(-1) for q in joint]))

    def _split(self, flat: torch.Tensor, joint: bool = False) -> list[torch.Tensor]:
        """Per-weight blocks of a flat run of lifted moments (m x n each), or of joint directions (n x k)."""
        blocks, offset = [], 0
        for spec in self.context.layout.delta:
            shape = (spec.shape[1], self.joint_rank(spec)) if joint else spec.shape
            size = shape[0] * shape[1]
            blocks.append(flat[offset : offset + size].view(shape))
            offset += size
        return blocks

    def joint_rank(self, spec: TensorSpec) -> int:
        return min(self.args["shared_rank"], spec.shape[1])
