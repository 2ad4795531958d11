"""ADF-LoRA: a schedule shared by all peers trains only B, or only A, for ``switch_every`` rounds.

Unlike RoLoRA both factors (and the head) are mixed every round, so the frozen factor also drifts
toward consensus while the other one trains. Sends everything: the same bytes as fedit.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method, MethodContext, register
from .rolora import scheduled_factor


@register
class ADF(Method):
    name = "adf"
    sends_whole_buffers = True
    averages_buffers = True
    params = {"switch_every": 2}

    def __init__(self, args: dict, context: MethodContext) -> None:
        super().__init__(args, context)
        self.switch_every = self.interval()
        if isinstance(self.switch_every, bool) or not isinstance(self.switch_every, int) or self.switch_every < 1:
            raise ConfigError(f"method {self.name}: switch_every must be a positive integer, got {self.switch_every!r}")

    def interval(self) -> int:
        return self.args["switch_every"]

    def trained_parts(self, round: int) -> frozenset[str]:
        return frozenset({scheduled_factor(round, self.switch_every), "head"})
