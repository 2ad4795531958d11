"""FedEx-LoRA (server): exact aggregation by folding the averaging residual into the frozen weights.

The hub averages the clients' factors (B_bar, A_bar) and computes, per module, the residual
sum_j p_j B_j A_j - B_bar A_bar that factor averaging loses. It sends B_bar, A_bar and the
residual; every client adopts the factors and scaling * residual is added to the frozen base weight,
so its effective weight is exactly W0 + scaling * sum_j p_j B_j A_j. The residual is a dense
d_out x d_in matrix per module: the down step costs far more bytes than fedit (counted in
bytes_sent).

The base weights are one copy per process, shared by its peers, and must stay alike on every process.
So the fold waits for the end of the round's mixing (:meth:`FedEx.settle`) and happens on every process
or on none: a round in which any client refused the hub's payload (``comm.on_bad_payload: drop``)
folds nothing, so clients that refused keep exactly their own model, and those that adopted the
factors lose that round's residual, as fedit would. The decision does not depend on how peers are
spread over processes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..exact import Reduce, weighted_sum
from ..peers.bank import LoRABankLinear
from .base import Method, MethodContext, PeerState, register

HUB = 0


@register
class FedEx(Method):
    name = "fedex"
    sends_whole_buffers = True
    server_only = True
    changes_base_weights = True

    def __init__(self, args: dict, context: MethodContext) -> None:
        super().__init__(args, context)
        layout = context.layout
        self.residual_numel = sum(b.shape[0] * a.shape[1] for a, b in zip(layout.a, layout.b))
        modules = dict(context.model.named_modules())
        self.layers: dict[str, LoRABankLinear] = {name: modules[name] for name in layout.modules}
        for name, layer in self.layers.items():
            if layer.base.weight.dtype != torch.float32:
                model = getattr(context.model, "name_or_path", type(context.model).__name__)
                raise ConfigError(
                    f"method fedex folds every round's residual into the base weights, but model {model} holds "
                    f"the weight of layer {name} in {layer.base.weight.dtype}, which rounds the residual off: "
                    "give model.name a float32 copy of the model (saved after model.float()), or choose a method "
                    "that keeps the base weights frozen (e.g. fedit)"
                )
        self.residual: torch.Tensor | None = None  # this round's, once this process holds it

    def payload_numel(self, round: int, step: int, sender: int) -> int:
        extra = self.residual_numel if (step == 1 and sender == HUB) else 0
        return self.context.layout.numel + extra

    def pack(self, peer: PeerState, round: int, step: int, payload: torch.Tensor) -> torch.Tensor:
        if step == 1 and peer.peer == HUB:
            if self.residual is None:  # the hub mixed nothing this round: its factors lost nothing
                self.residual = payload.new_zeros(self.residual_numel)
            return torch.cat([payload, self.residual])
        return payload

    def combine(self, peer: PeerState, round: int, inputs: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
        layout = self.context.layout
        if peer.peer == HUB:  # up step: average, and keep what the average of factors loses
            averaged = weighted_sum(inputs)
            self.residual = self._residual(inputs, averaged)
            return averaged
        ((_, packed),) = inputs  # down step: the hub's factors plus its residual
        self.residual = packed[layout.numel :]
        return packed[: layout.numel].clone()

    def settle(self, round: int, refused: Sequence[tuple[int, int]], reduce: Reduce) -> None:
        """Fold this round's residual into the base weights on every process, or on none: none when a
        client anywhere refused the hub's payload (its process never got the residual) or nothing was
        mixed (warm-up rounds)."""
        skip = torch.tensor([float(self.residual is None or any(sender == HUB for sender, _ in refused))])
        reduce(skip, "max")
        if not skip.item():
            self._fold(self.residual)
        self.residual = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The base weights the folded residuals have changed."""
        return {f"base.{name}": layer.base.weight for name, layer in self.layers.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.base.weight.copy_(tensors[f"base.{name}"])

    def _residual(self, inputs: Sequence[tuple[float, torch.Tensor]], averaged: torch.Tensor) -> torch.Tensor:
        layout = self.context.layout
        pieces = []
        for m in range(len(layout.modules)):
            exact = sum(w * (layout.b_views(x)[m] @ layout.a_views(x)[m]) for w, x in inputs)
            pieces.append((exact - layout.b_views(averaged)[m] @ layout.a_views(averaged)[m]).flatten())
        return torch.cat(pieces)

    def _fold(self, residual: torch.Tensor) -> None:
        """Add scaling * residual to the frozen weights, each (out, in) update in its weight's layout."""
        layout = self.context.layout
        offset = 0
        for name, scaling, a, b in zip(layout.modules, layout.scalings, layout.a, layout.b):
            layer = self.layers[name]
            size = b.shape[0] * a.shape[1]
            delta = residual[offset : offset + size].view(b.shape[0], a.shape[1])
            with torch.no_grad():
                layer.base.weight.add_(delta.T if layer.fan_in_fan_out else delta, alpha=scaling)
            offset += size
