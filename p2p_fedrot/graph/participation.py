"""Partial participation: which peers take part in a round, and the mixing they then do.

Presence is drawn from (seed, round), so every process (and a resumed run) draws the same peers
without a message. An absent peer neither trains nor mixes; its neighbours mix over the peers
that are there, their rows of W renormalised.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import sparse

from ..seeding import derive_seed
from .weights import canonical, from_entries, row_indices, row_sums


def present_peers(seed: int, round: int, peers: int, probability: float, always: Iterable[int] = ()) -> np.ndarray:
    """Boolean mask of the peers that take part in ``round`` (``always``: e.g. the server's hub)."""
    if probability >= 1.0:
        return np.ones(peers, dtype=bool)
    present = np.random.default_rng(derive_seed(seed, "participation", round)).random(peers) < probability
    present[list(always)] = True
    return present


def restrict(W: sparse.csr_array, present: np.ndarray) -> sparse.csr_array:
    """W for the present peers only: absent peers keep their value and send nothing; each present
    row keeps its weights on present peers, rescaled to sum to 1 (a row left with nothing keeps
    its own value). Works on the stored entries, so it costs O(edges), not O(N^2)."""
    if present.all():
        return W
    rows = row_indices(W)
    kept = present[rows] & present[W.indices]
    restricted = from_entries(rows[kept], W.indices[kept], W.data[kept], W.shape[0])
    sums = row_sums(restricted)
    restricted.data /= np.repeat(sums, np.diff(restricted.indptr))  # a row with no entries divides nothing
    return canonical(restricted + sparse.diags_array((sums == 0.0).astype(np.float64), format="csr"))
