"""Centralized upper bound: one learner trained on the union of every client's data.

Every peer holds that one model (each process trains it once, identically), nothing is sent, and
the per-peer metrics show how the pooled model does on each peer's own test split.
"""

from __future__ import annotations

from .base import Method, register


@register
class Centralized(Method):
    name = "centralized"
    pooled_data = True

    def sent_parts(self, round: int) -> frozenset[str]:
        return frozenset()
