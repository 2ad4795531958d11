"""TAD-LoRA: ADF-LoRA whose switch interval follows the graph, T = ceil(c / sqrt(1 - rho)).

Sparse graphs (small spectral gap 1 - rho) need more rounds of gossip before the frozen factor
has reached consensus, so they keep each phase longer. Same bytes as fedit.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .adf import ADF
from .base import register


@register
class TAD(ADF):
    name = "tad"
    params = {"c": 1.0}

    def interval(self) -> int:
        c = self.args["c"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0:
            raise ConfigError(f"method tad: c must be a positive number, got {c!r}")
        gap = self.context.spectral_gap
        if gap <= 0:
            raise ConfigError("method tad needs a graph whose mixing has a positive spectral gap (a connected one)")
        return math.ceil(c / math.sqrt(gap) - 1e-9)  # a float gap of 0.99999... must still give T = c
