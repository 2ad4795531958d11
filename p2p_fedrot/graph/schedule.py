"""Who mixes with whom in each round: the graph's mixing steps, restricted to the peers present.

Every process computes the same schedule from the config and the seed, so the schedule itself is
never sent. A static graph's steps are built once; a time-varying graph's once per round. Steps
are sparse (CSR) and spectral numbers are computed only when asked for, so a schedule of
thousands of peers costs milliseconds per round.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
from scipy import sparse

from .participation import present_peers, restrict
from .topologies import Topology, edge_pairs, topology_stats
from .weights import DENSE_SPECTRAL_LIMIT, compose, mixing_matrix, row_indices, server_mixing_steps, spectral_gap

SCHEDULE_WINDOW = 64  # rounds whose mean W gives a time-varying graph's spectral gap (planning and reports)


class MixingSchedule:
    """The mixing steps of every round (one gossip step, or the server's up and down steps)."""

    def __init__(self, topology: Topology, scheme: str, client_weights: list[int], seed: int,
                 participation: float) -> None:
        self.topology, self.scheme, self.client_weights = topology, scheme, client_weights
        self.seed, self.participation = seed, participation
        self._built_round, self._built = -1, (nx.Graph(), [])  # the latest round's graph and steps
        self._round, self._steps = -1, []  # the latest round's steps among the peers present
        self._planning_gap: float | None = None  # one eigen-solve, shared by the methods and record()

    def present_at(self, round: int) -> np.ndarray:
        """Which peers take part in the round (all but for participation < 1; the hub always)."""
        hub = [0] if self.topology.server else []
        return present_peers(self.seed, round, self.topology.peers, self.participation, hub)

    def graph_steps(self, round: int) -> list[sparse.csr_array]:
        """The round's mixing steps of the whole graph (what methods plan with and topology.json shows)."""
        return self._graph_and_steps(round)[1]

    def steps_at(self, round: int) -> list[sparse.csr_array]:
        """The round's mixing steps among the peers present, built once per round."""
        if self._round != round:
            steps, present = self.graph_steps(round), self.present_at(round)
            self._steps = steps if present.all() else [restrict(W, present) for W in steps]
            self._round = round
        return self._steps

    def planning_gap(self) -> float:
        """The spectral gap methods plan with and reports judge consensus by: one round's, or for a
        time-varying graph that of the mean W of its first SCHEDULE_WINDOW rounds, an estimate of the
        expected W (a single random matching is disconnected; matchings mix). An eigen-solve, done
        once: call it only when the number is needed."""
        if self._planning_gap is None:
            window = range(1 if self.topology.static else SCHEDULE_WINDOW)
            total = compose(self.graph_steps(0))
            for round in window[1:]:  # in round order, so every process adds the same bits
                total = total + compose(self.graph_steps(round))
            self._planning_gap = spectral_gap(total / len(window))
        return self._planning_gap

    def record(self) -> dict:
        """Graph, mixing steps and spectral numbers of round 0 (all rounds, for static graphs), for
        topology.json, and the gap of the mean W (planning_gap), which reports use: round 0 of a
        time-varying graph says little of how its rounds mix. A round's spectral gap is that of the
        product of its steps: the server's up-then-down exchange averages exactly, so its gap is 1."""
        topology = self.topology
        mean_gap = None if topology.static else self.planning_gap()  # first, so round 0 is the round left built
        graph, steps = self._graph_and_steps(0)
        stats = topology_stats(graph, compose(steps))
        return {
            "name": topology.name,
            "peers": topology.peers,
            "server": topology.server,
            "static": topology.static,
            "params": topology.params,
            "mixing": "server (sample-weighted average)" if topology.server else self.scheme,
            "edges": edge_pairs(graph),
            **written_mixing(steps),
            "spectral_gap": stats["spectral_gap"],  # round 0's; null when the eigensolver did not settle it
            "spectral_gap_of_mean_W": stats["spectral_gap"] if topology.static else mean_gap,
            "stats": stats,
            "note": "" if topology.static else "time-varying: edges, W, spectral_gap and stats are those of round 0; "
                    f"spectral_gap_of_mean_W is that of the mean W of rounds 0..{SCHEDULE_WINDOW - 1}",
        }

    def _graph_and_steps(self, round: int) -> tuple[nx.Graph, list[sparse.csr_array]]:
        """The round's graph and mixing steps, built once: for the whole run when the graph is static,
        else once per round (the latest is kept, which steps_at and record then share)."""
        wanted = 0 if self.topology.static else round
        if self._built_round != wanted:
            graph = self.topology.graph_at(wanted)
            steps = server_mixing_steps(self.client_weights) if self.topology.server \
                else [mixing_matrix(graph, self.scheme)]
            self._built_round, self._built = wanted, (graph, steps)
        return self._built


def written_mixing(steps: list[sparse.csr_array]) -> dict:
    """The round's mixing steps for topology.json: dense rows for small graphs ("W"); above
    DENSE_SPECTRAL_LIMIT, [i, j, W_ij] of the stored entries ("W_entries", read straight from the
    CSR), so the file grows with the edges, not with N^2. One matrix, or a list of them for the
    server's two steps."""
    if steps[0].shape[0] <= DENSE_SPECTRAL_LIMIT:
        written = [W.toarray().tolist() for W in steps]
        key = "W"
    else:
        written = [[list(entry) for entry in zip(row_indices(W).tolist(), W.indices.tolist(), W.data.tolist())]
                   for W in steps]
        key = "W_entries"
    return {key: written if len(steps) > 1 else written[0]}
