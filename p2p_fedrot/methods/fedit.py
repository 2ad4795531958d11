"""FedIT: average both LoRA factors (and the head) with the mixing weights, no alignment.

Averaging A and B separately is not averaging B A; the gap is the aggregation error that fedrot
and the other methods try to shrink. Sends the whole buffer every round.
"""

from __future__ import annotations

from .base import Method, register


@register
class FedIT(Method):
    name = "fedit"
    sends_whole_buffers = True
    averages_buffers = True
