"""Who mixes with whom in each round: the graph's mixing steps, restricted to the peers present.

Every process computes the same schedule from the config and the seed, so the schedule itself is
never sent. A static graph's steps are built once; a time-varying graph's once per round.
"""

from __future__ import annotations

import numpy as np

from .mixing import DENSE_SPECTRAL_LIMIT, compose, mixing_matrix, server_mixing_steps, spectral_gap
from .participation import present_peers, restrict
from .topology import Topology, topology_stats

SCHEDULE_WINDOW = 64  # rounds averaged to plan with a time-varying graph's spectral gap


class MixingSchedule:
    """The mixing steps of every round (one gossip step, or the server's up and down steps)."""

    def __init__(self, topology: Topology, scheme: str, client_weights: list[int], seed: int,
                 participation: float) -> None:
        self.topology, self.scheme, self.client_weights = topology, scheme, client_weights
        self.seed, self.participation = seed, participation
        self.static_steps = self._build(0) if topology.static else None
        self._round, self._steps = -1, []

    def present_at(self, round: int) -> np.ndarray:
        """Which peers take part in the round (all but for participation < 1; the hub always)."""
        hub = [0] if self.topology.server else []
        return present_peers(self.seed, round, self.topology.peers, self.participation, hub)

    def graph_steps(self, round: int) -> list[np.ndarray]:
        """The round's mixing steps of the whole graph (what methods plan with and topology.json shows)."""
        return self.static_steps or self._build(round)

    def steps_at(self, round: int) -> list[np.ndarray]:
        """The round's mixing steps among the peers present, built once per round."""
        if self._round != round:
            steps, present = self.graph_steps(round), self.present_at(round)
            self._steps = steps if present.all() else [restrict(W, present) for W in steps]
            self._round = round
        return self._steps

    def round_mixing(self, round: int) -> np.ndarray:
        """One whole round's mixing among the peers present: the product of its steps (the server's
        is exact averaging)."""
        return compose(self.steps_at(round))

    def planning_gap(self) -> float:
        """The spectral gap methods plan with: one round's, or for a time-varying graph that of its
        average round over a window (a single random matching is disconnected; matchings mix)."""
        if self.topology.static:
            return spectral_gap(compose(self.graph_steps(0)))
        return spectral_gap(np.mean([compose(self.graph_steps(r)) for r in range(SCHEDULE_WINDOW)], axis=0))

    def record(self) -> dict:
        """Graph, mixing steps and spectral numbers of round 0 (all rounds, for static graphs), for
        topology.json. The spectral gap is that of one whole round, the product of its steps: the
        server's up-then-down exchange averages exactly, so its gap is 1."""
        topology = self.topology
        graph = topology.graph_at(0)
        steps = self.graph_steps(0)
        round_W = compose(steps)
        return {
            "name": topology.name,
            "peers": topology.peers,
            "server": topology.server,
            "static": topology.static,
            "params": topology.params,
            "mixing": "server (sample-weighted average)" if topology.server else self.scheme,
            "edges": sorted([sorted((int(u), int(v))) for u, v in graph.edges()]),
            **written_mixing(steps),
            "spectral_gap": spectral_gap(round_W),
            "stats": topology_stats(graph, round_W),
            "note": "" if topology.static else "time-varying: edges and W are those of round 0",
        }

    def _build(self, round: int) -> list[np.ndarray]:
        if self.topology.server:
            return server_mixing_steps(self.client_weights)
        return [mixing_matrix(self.topology.graph_at(round), self.scheme)]


def written_mixing(steps: list[np.ndarray]) -> dict:
    """The round's mixing steps for topology.json: dense rows for small graphs ("W"); above
    DENSE_SPECTRAL_LIMIT, (i, j, W_ij) of the nonzero entries ("W_entries"), so the file grows with the
    edges, not with N^2. One matrix, or a list of them for the server's two steps."""
    if len(steps[0]) <= DENSE_SPECTRAL_LIMIT:
        written = [W.tolist() for W in steps]
        key = "W"
    else:
        written = [[[int(i), int(j), float(W[i, j])] for i, j in zip(*np.nonzero(W))] for W in steps]
        key = "W_entries"
    return {key: written if len(steps) > 1 else written[0]}
