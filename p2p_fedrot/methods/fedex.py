"""FedEx-LoRA (server): exact aggregation by folding the averaging residual into the frozen weights.

The hub averages the clients' factors (B_bar, A_bar) and computes, per module, the residual
sum_j p_j B_j A_j - B_bar A_bar that factor averaging loses. It sends B_bar, A_bar and the
residual; every client adopts the factors and adds scaling * residual to its frozen base weight,
so its effective weight is exactly W0 + scaling * sum_j p_j B_j A_j. The residual is a dense
d_out x d_in matrix per module: the down step costs far more bytes than fedit (counted in
bytes_sent).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..gossip import weighted_sum
from .base import Method, MethodContext, PeerState, register

HUB = 0


@register
class FedEx(Method):
    name = "fedex"
    server_only = True
    changes_base_weights = True

    def __init__(self, args: dict, context: MethodContext) -> None:
        super().__init__(args, context)
        layout = context.layout
        self.residual_numel = sum(b.shape[0] * a.shape[1] for a, b in zip(layout.a, layout.b))
        self.residual: torch.Tensor | None = None
        self.folded_round = -1

    def payload_numel(self, round: int, step: int, sender: int) -> int:
        extra = self.residual_numel if (step == 1 and sender == HUB) else 0
        return self.context.layout.numel + extra

    def pack(self, peer: PeerState, round: int, step: int, payload: torch.Tensor) -> torch.Tensor:
        if step == 1 and peer.peer == HUB:
            return torch.cat([payload, self.residual])
        return payload

    def combine(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
        layout = self.context.layout
        if peer.peer == HUB:  # up step: average, and keep what the average of factors loses
            averaged = weighted_sum(inputs)
            self.residual = self._residual(inputs, averaged)
            self._fold_once(round, self.residual)  # this process's base weights too, clients or not
            return averaged
        ((_, packed),) = inputs  # down step: the hub's factors plus its residual
        self._fold_once(round, packed[layout.numel :])
        return packed[: layout.numel].clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The base weights the folded residuals have changed."""
        return {f"base.{name}": weight for name, weight in self._base_weights().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, weight in self._base_weights().items():
                weight.copy_(tensors[f"base.{name}"])

    def _base_weights(self) -> dict[str, torch.Tensor]:
        modules = dict(self.context.model.named_modules())
        return {name: modules[name].base.weight for name in self.context.layout.modules}

    def _residual(self, inputs: Sequence[tuple[float, torch.Tensor]], averaged: torch.Tensor) -> torch.Tensor:
        layout = self.context.layout
        pieces = []
        for m in range(len(layout.modules)):
            exact = sum(w * (layout.b_views(x)[m] @ layout.a_views(x)[m]) for w, x in inputs)
            pieces.append((exact - layout.b_views(averaged)[m] @ layout.a_views(averaged)[m]).flatten())
        return torch.cat(pieces)

    def _fold_once(self, round: int, residual: torch.Tensor) -> None:
        """Add scaling * residual to the frozen weights once a round: every peer of a process shares them."""
        if self.folded_round == round:
            return
        self.folded_round = round
        layout = self.context.layout
        weights = self._base_weights()
        offset = 0
        for name, scaling, a, b in zip(layout.modules, layout.scalings, layout.a, layout.b):
            weight = weights[name]
            size = b.shape[0] * a.shape[1]
            delta = residual[offset : offset + size].view(b.shape[0], a.shape[1])
            with torch.no_grad():
                weight.add_(delta.to(weight.dtype), alpha=scaling)
            offset += size
