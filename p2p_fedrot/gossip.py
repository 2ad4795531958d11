"""One mixing step x_i <- sum_j W_ij x_j, split into "who needs whose payload" and the exchange.

Convention: W[i, j] != 0 with i != j means peer j sends to peer i. Symmetric gossip, the server's
up step (clients -> hub) and down step (hub -> clients) are all expressed this way.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from .transport import Route, Transport

MixInputs = list[tuple[float, torch.Tensor]]


def routes_of(W: np.ndarray) -> list[Route]:
    """Directed (source, destination) pairs of a mixing matrix."""
    return [(int(j), int(i)) for i, j in zip(*np.nonzero(W)) if i != j]


def keeps_own_value(W: np.ndarray, peer: int) -> bool:
    """True when row ``peer`` is the identity row: the peer receives nothing and stays as it is."""
    return W[peer, peer] == 1.0 and np.count_nonzero(W[peer]) == 1


def collect_mix_inputs(transport: Transport, W: np.ndarray, payloads: Mapping[int, torch.Tensor], step: str = "",
                       numel_of: Callable[[int], int] | None = None) -> dict[int, MixInputs]:
    """Exchange payloads along W's routes; for each hosted peer that mixes, its (W_ij, x_j) list.

    The list is ordered by j (the peer itself included), so summing it gives bit-identical results
    however peers are spread over processes.
    """
    received = transport.exchange(payloads, routes_of(W), step=step, numel_of=numel_of)
    received.update(payloads)
    inputs = {}
    for i in payloads:
        if not keeps_own_value(W, i):
            inputs[i] = [(float(W[i, j]), received[int(j)]) for j in np.flatnonzero(W[i])]
    return inputs


def weighted_sum(inputs: MixInputs) -> torch.Tensor:
    """sum_j W_ij x_j accumulated in the order given (the fixed order makes it reproducible)."""
    total = torch.zeros_like(inputs[0][1])
    for weight, payload in inputs:
        total.add_(payload, alpha=weight)
    return total


