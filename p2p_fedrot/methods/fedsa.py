"""FedSA-LoRA (Guo et al., 2025): A captures shared knowledge and is mixed; B stays on its peer.

Both factors train; only A (and the head) travel. Sends about half the LoRA bytes of fedit.
"""

from __future__ import annotations

from .base import Method, register

A_AND_HEAD = frozenset({"A", "head"})


@register
class FedSA(Method):
    name = "fedsa"

    def sent_parts(self, round: int) -> frozenset[str]:
        return A_AND_HEAD
