"""RoLoRA (Chen et al., 2025): alternate rounds that train and mix only B, then only A.

Mixing one factor while the other is the same on every peer averages products exactly. Rounds
start with B, because with B = 0 at init the gradient of A is zero. The head trains and travels
every round. Sends one factor per round: about half the LoRA bytes of fedit.
"""

from __future__ import annotations

from .base import Method, register


def scheduled_factor(round: int, every: int = 1) -> str:
    """B for the first ``every`` rounds, then A, then B again, ..."""
    return "B" if (round // every) % 2 == 0 else "A"


@register
class RoLoRA(Method):
    name = "rolora"

    def trained_parts(self, round: int) -> frozenset[str]:
        return frozenset({scheduled_factor(round), "head"})

    def sent_parts(self, round: int) -> frozenset[str]:
        return self.trained_parts(round)
