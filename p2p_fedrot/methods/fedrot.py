"""FedRot-LoRA / DFedRot: rotate the factors toward a reference before they are averaged.

The reference is the peer's own state at the start of the round. After the previous gossip step
that state IS the W-weighted consensus of its neighbourhood (in server mode: the global model the
client adopted), so aligning to it costs no extra messages. Rotation R (soft orthogonal
Procrustes, see align.py) leaves each product B A unchanged, so local models are untouched while
the factors that get averaged agree better. Round 0 is never aligned; afterwards side A is fitted
on odd rounds and side B on even ones (``side: alternate``), or always the same side.

``reference: pairwise`` is the receiver-side ablation: nothing is rotated before sending; each
receiver rotates every incoming neighbour's factors toward its own before averaging (one
Procrustes problem per neighbour instead of one per peer).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..align import align_modules
from ..errors import ConfigError
from .base import Method, MethodContext, PeerState, adopts, register

SIDES = ("alternate", "A", "B")
REFERENCES = ("consensus", "pairwise")


@register
class FedRot(Method):
    name = "fedrot"
    params = {"lam": 0.4, "side": "alternate", "reference": "consensus"}

    def __init__(self, args: dict, context: MethodContext) -> None:
        super().__init__(args, context)
        lam = self.args["lam"]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ConfigError(f"method_args.lam = {lam!r} must be a number in [0, 1] (0: no alignment, 1: full rotation)")
        if self.args["side"] not in SIDES:
            raise ConfigError(f"method_args.side = {self.args['side']!r} must be one of {', '.join(SIDES)}")
        if self.args["reference"] not in REFERENCES:
            raise ConfigError(
                f"method_args.reference = {self.args['reference']!r} must be one of {', '.join(REFERENCES)}"
            )
        self.lam = float(lam)
        self.pairwise = self.args["reference"] == "pairwise"
        self.needs_reference = not self.pairwise

    def side_at(self, round: int) -> str:
        side = self.args["side"]
        if side != "alternate":
            return side
        return "A" if round % 2 == 1 else "B"

    def aligns(self, round: int) -> bool:
        return round >= 1 and self.lam > 0.0

    def before_send(self, peer: PeerState, round: int) -> None:
        if self.pairwise or not self.aligns(round) or peer.reference is None:
            return
        self.rotate(peer.flat, peer.reference, round)

    def combine(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
        """Pairwise reference: average each neighbour's factors rotated toward the receiver's (a client
        adopting the server's result takes it as it is, so that all clients hold the same factors)."""
        if self.pairwise and self.aligns(round) and not adopts(inputs):
            inputs = [(w, self.rotate(x.clone(), peer.flat, round)) for w, x in inputs]
        return super().combine(peer, round, inputs)

    def rotate(self, flat: torch.Tensor, reference: torch.Tensor, round: int) -> torch.Tensor:
        """Rotate the factors held in ``flat`` (in place) toward those of ``reference``; returns ``flat``."""
        layout = self.context.layout
        side = self.side_at(round)
        As, Bs = layout.a_views(flat), layout.b_views(flat)
        refs = layout.a_views(reference) if side == "A" else layout.b_views(reference)
        new_As, new_Bs = align_modules(As, Bs, refs, side, self.lam)
        for view, value in zip(As + Bs, new_As + new_Bs):
            view.copy_(value)
        return flat
