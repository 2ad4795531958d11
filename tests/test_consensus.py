"""Gossip of random vectors against the spectral prediction, and the directed one-peer exponential graph."""

from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest

from p2p_fedrot.cli import main
from p2p_fedrot.graph.weights import is_doubly_stochastic, mixing_matrix, second_eigenvalue_modulus
from p2p_fedrot.graph.topologies import build_topology


def simulate(capsys: pytest.CaptureFixture, spec: str, peers: int, rounds: int) -> dict:
    assert main(["topology", spec, "--peers", str(peers), "--simulate", str(rounds), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["simulated_consensus_error"]) == len(result["predicted_consensus_error"]) == rounds + 1
    return result


@pytest.mark.parametrize("spec", ["complete", "one_peer_exponential", "server"])
def test_exact_averaging_graphs_reach_consensus(capsys: pytest.CaptureFixture, spec: str) -> None:
    result = simulate(capsys, spec, 16, 4)
    assert result["simulated_consensus_error"][0] == 1.0
    assert result["simulated_consensus_error"][4] < 1e-12 and result["predicted_consensus_error"][4] < 1e-12


def test_one_peer_exponential_needs_all_its_hops(capsys: pytest.CaptureFixture) -> None:
    result = simulate(capsys, "one_peer_exponential", 16, 4)
    assert min(result["simulated_consensus_error"][:4]) > 1e-3  # three hops are not enough for 16 peers


def test_ring_contracts_by_rho_per_round(capsys: pytest.CaptureFixture) -> None:
    result = simulate(capsys, "ring", 16, 20)
    error = result["simulated_consensus_error"]
    rho = result["rho"]
    measured = (error[20] / error[10]) ** (1 / 10)
    assert abs(measured - rho) <= 0.1 * rho
    assert result["predicted_consensus_error"][20] == pytest.approx(rho**20)


def test_simulation_prints_a_table_beside_the_prediction(capsys: pytest.CaptureFixture) -> None:
    assert main(["topology", "torus", "--peers", "16", "--simulate", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("measured" in line and "predicted" in line for line in lines)
    assert lines[-1].split()[0] == "3"


def test_one_peer_exponential_is_directed_one_out_one_in() -> None:
    topology = build_topology("one_peer_exponential", 16, seed=0)
    for round, hop in enumerate([1, 2, 4, 8, 1]):
        graph = topology.graph_at(round)
        assert graph.is_directed()
        assert set(graph.edges()) == {(i, (i + hop) % 16) for i in range(16)}
        W = mixing_matrix(graph).toarray()
        receive_from_i_minus_hop = np.roll(np.eye(16), -hop, axis=1)
        assert np.array_equal(W, (np.eye(16) + receive_from_i_minus_hop) / 2)  # W = (I + P) / 2
        assert is_doubly_stochastic(W)
    product = np.eye(16)
    for round in range(4):
        product = mixing_matrix(topology.graph_at(round)).toarray() @ product
    assert np.abs(product - 1 / 16).max() < 1e-15


def test_one_peer_exponential_keeps_the_top_hop_when_n_is_not_a_power_of_two() -> None:
    topology = build_topology("one_peer_exponential", 12, seed=0)
    hops = [{(v - u) % 12 for u, v in topology.graph_at(round).edges()} for round in range(5)]
    assert hops == [{1}, {2}, {4}, {8}, {1}]


def test_directed_rho_is_that_of_the_shift() -> None:
    graph = build_topology("one_peer_exponential", 8, seed=0).graph_at(0)
    assert second_eigenvalue_modulus(mixing_matrix(graph)) == pytest.approx(math.cos(math.pi / 8))
    assert not nx.is_strongly_connected(build_topology("one_peer_exponential", 8, seed=0).graph_at(2))
