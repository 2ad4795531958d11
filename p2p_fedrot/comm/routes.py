"""One mixing step x_i <- sum_j W_ij x_j, split into "who needs whose payload" and the exchange.

Convention: W[i, j] != 0 with i != j means peer j sends to peer i. Symmetric gossip, the server's
up step (clients -> hub) and down step (hub -> clients) are all expressed this way. W is a
canonical CSR step (see mixing.canonical): each peer reads only its own row's stored entries.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from scipy import sparse

from ..errors import PeerError
from ..exact import MixInputs
from ..graph.weights import row_indices
from .screening import BadPayload, PayloadRules, PayloadScreen
from .transport import Route, Transport

def routes_of(W: sparse.csr_array) -> list[Route]:
    """Directed (source, destination) pairs of a mixing step: its stored off-diagonal entries."""
    rows = row_indices(W)
    sent = W.indices != rows
    return list(zip(W.indices[sent].tolist(), rows[sent].tolist()))


def row_entries(W: sparse.csr_array, i: int) -> list[tuple[int, float]]:
    """(j, W_ij) of row i's stored entries by ascending j (i itself included): read from the CSR
    arrays in O(row), so a peer never scans all N columns."""
    start, stop = W.indptr[i], W.indptr[i + 1]
    return list(zip(W.indices[start:stop].tolist(), W.data[start:stop].tolist()))


def keeps_own_value(W: sparse.csr_array, peer: int) -> bool:
    """True when row ``peer`` is the identity row: the peer receives nothing and stays as it is."""
    return row_entries(W, peer) == [(peer, 1.0)]


def collect_mix_inputs(transport: Transport, W: sparse.csr_array, payloads: Mapping[int, torch.Tensor],
                       step: str = "", numel_of: Callable[[int], int] | None = None, *,
                       outgoing: Mapping[int, torch.Tensor] | None = None, rules: PayloadRules = PayloadRules(),
                       tag: tuple[int, int] = (0, 0),
                       tampered: frozenset[int] = frozenset()) -> tuple[dict[int, MixInputs], list[BadPayload]]:
    """Exchange payloads along W's routes; for each hosted peer that mixes, its (W_ij, x_j) list.

    ``payloads`` are the hosted peers' own values; ``outgoing`` what they send (the same unless a
    fault drill corrupts it); ``tampered`` the peers whose frames the drill alters on the wire
    (Transport.exchange). Each received payload is screened; a bad one raises a PeerError
    naming its sender, or with ``on_bad_payload: drop`` is left out and the rest of the row is
    renormalised (the drops are returned). Each list is ordered by j (the peer itself included),
    so summing it gives bit-identical results however peers are spread over processes.
    """
    outgoing = payloads if outgoing is None else outgoing
    if numel_of is None:
        common = common_numel(payloads)

        def numel_of(src: int) -> int:
            return common

    received = transport.exchange(outgoing, routes_of(W), step=step, numel_of=numel_of, tag=tag, tampered=tampered)
    screen = PayloadScreen(rules, received, payloads, numel_of)
    inputs, dropped = {}, []
    for i in payloads:
        if keeps_own_value(W, i):
            continue
        pairs, refused = [], 0
        for j, weight in row_entries(W, i):
            if j == i:
                pairs.append((weight, payloads[i]))
                continue
            problem = screen.problem(j, i)
            if problem is None:
                pairs.append((weight, received[j]))
            elif rules.on_bad_payload == "drop":
                dropped.append(BadPayload(j, i, problem))
                refused += 1
            else:
                where = transport.placement.process_name(transport.placement.owner(j))
                raise PeerError(f"{step or 'exchange'}: peer {j} on {where} sent peer {i} a bad payload: {problem}. "
                                "Set comm.on_bad_payload: drop to mix without it")
        if pairs:  # a row that refused everything (a client adopting a bad hub) keeps its own value
            inputs[i] = renormalised(pairs) if refused else pairs
    return inputs, dropped


def renormalised(pairs: MixInputs) -> MixInputs:
    """Rescale the weights of a row that lost some entries so that they sum to 1 again."""
    total = sum(weight for weight, _ in pairs)
    return [(weight / total, payload) for weight, payload in pairs]


def common_numel(payloads: Mapping[int, torch.Tensor]) -> int:
    """The one size all ``payloads`` share (the default expectation when no numel_of is given)."""
    sizes = {p.numel() for p in payloads.values()}
    if len(sizes) != 1:
        raise ValueError(f"local payloads differ in size ({sorted(sizes)}); pass numel_of to say who sends what")
    return sizes.pop()
