"""FFA-LoRA (Sun et al., 2024): freeze A at the shared random init; train and exchange only B.

With A identical on every peer, averaging B averages the products exactly (sum_j w_j B_j A =
B_bar A), so there is no aggregation error, at the price of a smaller trainable space. Sends B and
the head: about half the LoRA bytes of fedit.
"""

from __future__ import annotations

from .base import Method, register

B_AND_HEAD = frozenset({"B", "head"})


@register
class FFA(Method):
    name = "ffa"

    def trained_parts(self, round: int) -> frozenset[str]:
        return B_AND_HEAD

    def sent_parts(self, round: int) -> frozenset[str]:
        return B_AND_HEAD
