"""What a Byzantine peer sends, from what it knows: pure functions of payloads (full buffers), random
ones drawn from a generator passed in, so that an attack repeats bit for bit.

The decentralized forms follow the ClippedGossip code (epfml/byzantine-robust-decentralized-optimizer,
codes/attacks.py): ALIE and IPM from the statistics of the honest messages a target receives, the
dissensus attack from the target's row. Sums over messages run in the order given. Label flipping
changes a peer's data, not its messages, and is not here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..exact import MixInputs, weighted_sum
from ..peers.factors import FactorLayout


def sign_flip(own: torch.Tensor) -> torch.Tensor:
    """-x. On LoRA factors (-A, -B) is the gauge c = -1: the products stay, the head flips."""
    return -own


def scaled(own: torch.Tensor, strength: float) -> torch.Tensor:
    """strength * x: every factor scaled, so each product by strength^2."""
    return own * strength


def gaussian(own: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """x plus independent N(0, std^2) noise on every value (a large std sends noise alone)."""
    noise = torch.randn(own.shape, generator=generator, dtype=own.dtype, device=generator.device)
    return own + std * noise.to(own.device)


def _mean(honest: Sequence[torch.Tensor]) -> torch.Tensor:
    if not honest:
        raise ValueError("the attack needs at least one honest message")
    return weighted_sum([(1.0, x) for x in honest]) / len(honest)


def alie(honest: Sequence[torch.Tensor], z: float) -> torch.Tensor:
    """A little is enough (Baruch et al. 2019): mean - z * std, coordinate-wise over the honest messages
    (std with n - 1, as torch.std; 0 for a single message)."""
    mean = _mean(honest)
    spread = weighted_sum([(1.0, (x - mean).square()) for x in honest])
    std = (spread / (len(honest) - 1)).sqrt() if len(honest) > 1 else spread
    return mean - z * std


def ipm(honest: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    """Inner-product manipulation (Xie et al. 2020): -eps * the honest messages' mean."""
    return -eps * _mean(honest)


def dissensus(receiver: torch.Tensor, honest: MixInputs, byzantine_weight: float, eps: float) -> torch.Tensor:
    """ClippedGossip's dissensus attack on one receiver i: x_i - eps * sum_j w_ij (x_j - x_i) / w_byz over
    its honest neighbours j, sent by every Byzantine neighbour (w_byz: the weight i gives them all
    together). With eps = 1 plain mixing leaves x_i where it is: the neighbours' pull is cancelled."""
    if byzantine_weight <= 0:
        raise ValueError(f"byzantine_weight must be > 0 (the receiver's weight on its Byzantine neighbours), "
                         f"got {byzantine_weight!r}")
    pull = torch.zeros_like(receiver)
    for weight, x in honest:
        pull.add_(x - receiver, alpha=weight)
    return receiver - (eps / byzantine_weight) * pull


def gauge_scale(own: torch.Tensor, c: float, layout: FactorLayout) -> torch.Tensor:
    """A -> c A, B -> B / c in every module, the head and dense deltas unchanged: every product B A is
    the same, so a product-space check passes it, while a factor average multiplies its cross terms by c."""
    if c == 0:
        raise ValueError("c must be nonzero: (0 A, B / 0) is no adapter")
    out = own.clone()
    for A, B in zip(layout.a_views(out), layout.b_views(out)):
        A.mul_(c)
        B.div_(c)
    return out
