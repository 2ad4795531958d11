"""Local training only: no peer ever communicates (the lower bound every method must beat)."""

from __future__ import annotations

from .base import Method, register


@register
class Local(Method):
    name = "local"

    def sent_parts(self, round: int) -> frozenset[str]:
        return frozenset()
