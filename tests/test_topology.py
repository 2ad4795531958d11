import json
import logging
import time
import tracemalloc
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import yaml
from scipy import sparse

from p2p_fedrot.graph import topologies as topology_module
from p2p_fedrot.cli import main
from p2p_fedrot.graph.weights import mixing_matrix
from p2p_fedrot.graph.schedule import MixingSchedule
from p2p_fedrot.graph.topologies import (
    CATALOGUE,
    MAX_EDGES,
    TopologyError,
    available_topologies,
    build_topology,
    draw_topology,
    estimated_edges,
    topology_stats,
)

REQUIRED = {"ring", "line", "torus", "complete", "star", "server", "erdos_renyi", "small_world", "exponential",
            "random_regular", "edges", "random_matching", "one_peer_exponential", "barbell"}
# entries that cannot build from the catalogue alone at that size
OVERRIDES = {("edges", 8): {"edges": [[i, (i + 1) % 8] for i in range(8)]},
             ("edges", 16): {"edges": [[i, (i + 1) % 16] for i in range(16)]}}


def edge_set(graph: nx.Graph) -> set:
    return {tuple(sorted(edge)) for edge in graph.edges()}


def test_catalogue_has_the_required_entries_and_safe_yaml() -> None:
    assert REQUIRED <= set(available_topologies())
    for name in available_topologies():
        entry = yaml.safe_load((CATALOGUE / f"{name}.yaml").read_text(encoding="utf-8"))
        assert entry["description"] and entry["generator"] and "n" not in (entry.get("params") or {})


@pytest.mark.parametrize("peers", [8, 16])
@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_entry_builds_and_is_connected(name: str, peers: int) -> None:
    topology = build_topology({"name": name, **OVERRIDES.get((name, peers), {})}, peers, seed=0)
    assert topology.name == name and topology.peers == peers
    graphs = [topology.graph_at(round) for round in range(8)]
    assert all(sorted(graph.nodes) == list(range(peers)) for graph in graphs)
    if topology.static:
        assert all(graph is graphs[0] for graph in graphs) and nx.is_connected(graphs[0])
    else:  # schedules mix over rounds: their union is connected (every peer reaches every other)
        union = nx.compose_all(graphs)
        assert nx.is_strongly_connected(union) if union.is_directed() else nx.is_connected(union)


def test_barbell_is_two_cliques_joined_through_the_bridge() -> None:
    graph = build_topology({"name": "barbell", "bridge": 2}, 12, seed=0).graph_at(0)
    first, path, second = range(0, 5), [5, 6], range(7, 12)
    assert all(graph.has_edge(u, v) for u in first for v in first if u < v)
    assert all(graph.has_edge(u, v) for u in second for v in second if u < v)
    assert edge_set(graph) - edge_set(nx.complete_graph(first)) - edge_set(nx.complete_graph(second)) == {
        (4, path[0]), tuple(path), (path[1], 7)}
    assert estimated_edges("barbell", 12, {"bridge": 2}) == graph.number_of_edges()
    with pytest.raises(TopologyError, match="peers - bridge must be even"):
        build_topology("barbell", 15, seed=0)


def test_torus_8_falls_back_to_2_by_4() -> None:
    graph = build_topology("torus", 8, seed=0).graph_at(0)
    assert graph.number_of_edges() == 12 and {d for _, d in graph.degree()} == {3}


def test_torus_16_is_4_regular() -> None:
    graph = build_topology("torus", 16, seed=0).graph_at(0)
    assert graph.number_of_edges() == 32 and {d for _, d in graph.degree()} == {4}
    assert build_topology({"name": "torus", "rows": 2, "cols": 8}, 16, seed=0).params == {"rows": 2, "cols": 8}


def test_exponential_graph() -> None:
    graph = build_topology("exponential", 8, seed=0).graph_at(0)
    assert set(graph[0]) == {1, 2, 4, 6, 7} and {d for _, d in graph.degree()} == {5}


def test_server_and_star() -> None:
    server = build_topology("server", 8, seed=0)
    assert server.server and server.static and server.graph_at(0).degree(0) == 7
    assert not build_topology("star", 8, seed=0).server


def test_erdos_renyi_is_reproducible_from_the_seed() -> None:
    def draw(seed: int) -> set:
        return edge_set(build_topology({"name": "erdos_renyi", "p": 0.3}, 12, seed).graph_at(0))

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    assert all(nx.is_connected(build_topology("erdos_renyi", 12, seed).graph_at(0)) for seed in range(10))


def test_random_matching_is_a_fresh_perfect_matching_agreed_on_by_all() -> None:
    topology = build_topology("random_matching", 10, seed=1)
    rounds = [edge_set(topology.graph_at(round)) for round in range(5)]
    for graph in map(topology.graph_at, range(5)):
        assert {d for _, d in graph.degree()} == {1} and graph.number_of_edges() == 5
    assert rounds[3] == edge_set(build_topology("random_matching", 10, seed=1).graph_at(3))
    assert len({frozenset(edges) for edges in rounds}) == 5
    assert rounds[0] != edge_set(build_topology("random_matching", 10, seed=2).graph_at(0))
    assert not topology.static


@pytest.mark.parametrize("suffix, write", [
    (".edges", nx.write_edgelist), (".graphml", nx.write_graphml),
    (".gml", nx.write_gml), (".adjlist", nx.write_adjlist)])
def test_graph_file_spec_is_relabelled_in_sorted_order(tmp_path: Path, suffix: str, write) -> None:
    path = tmp_path / f"net{suffix}"
    write(nx.relabel_nodes(nx.path_graph(11), {i: i + 10 for i in range(11)}), path)  # labels 10..20
    topology = build_topology(str(path), 11, seed=0)
    assert topology.name == "net" and edge_set(topology.graph_at(0)) == edge_set(nx.path_graph(11))
    via_edges = build_topology({"name": "edges", "path": str(path)}, 11, seed=0)
    assert edge_set(via_edges.graph_at(0)) == edge_set(nx.path_graph(11))
    with pytest.raises(TopologyError, match="has 11 nodes but the run has peers=8"):
        build_topology(path, 8, seed=0)


def test_topology_yaml_spec(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("generator: erdos_renyi\nparams: {p: 0.9}\n", encoding="utf-8")
    topology = build_topology(str(path), 6, seed=0)
    assert topology.name == "mine" and topology.params == {"p": 0.9}
    path.write_text("generator: cycle_graph\nweights: 3\n", encoding="utf-8")
    with pytest.raises(TopologyError, match="unknown keys \\['weights'\\]"):
        build_topology(str(path), 6, seed=0)


def test_inline_edges_and_graph_object() -> None:
    inline = build_topology({"name": "edges", "edges": [[0, 1], [1, 2], [2, 3]]}, 4, seed=0)
    assert edge_set(inline.graph_at(0)) == {(0, 1), (1, 2), (2, 3)}
    custom = build_topology(nx.relabel_nodes(nx.cycle_graph(5), dict(zip(range(5), "abcde"))), 5, seed=0)
    assert custom.name == "custom" and edge_set(custom.graph_at(0)) == edge_set(nx.cycle_graph(5))


def test_mapping_overrides_params() -> None:
    topology = build_topology({"name": "random_regular", "d": 4}, 10, seed=0)
    assert topology.params == {"d": 4} and {d for _, d in topology.graph_at(0).degree()} == {4}


@pytest.mark.parametrize("spec, peers, match", [
    ("hypercube", 8, "unknown topology 'hypercube'; available: barbell, complete, edges"),
    ({"name": "ring", "k": 2}, 8, r"unknown parameter\(s\) \['k'\]"),
    ({"name": "erdos_renyi", "q": 2}, 8, r"valid: \['p'\]"),
    ({"name": "erdos_renyi", "p": 1.5}, 8, "p must be in"),
    ({"name": "random_regular", "d": 3}, 7, "peers\\*d even"),
    ({"name": "random_regular", "d": 8}, 8, "d < peers"),
    ("torus", 7, "rows x cols with both >= 2"),
    ({"name": "torus", "rows": 3}, 8, "does not divide"),
    ("random_matching", 7, "even number of peers"),
    ({"name": "small_world", "k": 20}, 8, "topology 'small_world'.*failed"),
    ({"name": "edges", "edges": [[0, 9]]}, 4, "peer ids in 0..3"),
    ("edges", 4, "exactly one of 'edges'"),
    ({"p": 0.3}, 8, "needs a 'name' key"),
    ("missing.graphml", 8, "not found"),
    (3.5, 8, "got float"),
    ("ring", 0, "positive integer"),
])
def test_clear_errors(spec, peers: int, match: str) -> None:
    with pytest.raises(TopologyError, match=match):
        build_topology(spec, peers, seed=0)


def test_disconnected_graph_needs_allow_disconnected() -> None:
    spec = {"name": "edges", "edges": [[0, 1], [2, 3]]}
    with pytest.raises(TopologyError, match="'edges'.*disconnected.*allow_disconnected: true"):
        build_topology(spec, 4, seed=0)
    assert not nx.is_connected(build_topology(spec, 4, seed=0, allow_disconnected=True).graph_at(0))


def test_ring_stats() -> None:
    graph = build_topology("ring", 8, seed=0).graph_at(0)
    stats = topology_stats(graph, mixing_matrix(graph))
    assert list(stats) == STAT_KEYS
    expected = {"nodes": 8, "edges": 8, "directed": False, "connected": True, "degree_min": 2, "degree_max": 2, "diameter": 4,
                "doubly_stochastic": True}
    assert {key: stats[key] for key in expected} == expected
    assert stats["rho"] == pytest.approx((1 + 2 * 2 ** -0.5) / 3)  # k = 1 of (1 + 2 cos(2 pi k / 8)) / 3
    assert stats["spectral_gap"] == pytest.approx(1 - stats["rho"])


@pytest.mark.parametrize("name", ["random_matching", "one_peer_exponential"])
def test_the_record_of_a_time_varying_graph_carries_the_gap_of_its_mean_round(name: str) -> None:
    """Round 0 alone barely mixes (a matching is disconnected; one hop of 1 on 16 peers has gap 0.019),
    the rounds together do: topology.json keeps round 0's gap and adds the mean round's."""
    schedule = MixingSchedule(build_topology(name, 16, seed=0), "metropolis", [], seed=0, participation=1.0)
    record = schedule.record()
    assert record["spectral_gap"] < 0.05 and record["stats"]["spectral_gap"] == record["spectral_gap"]
    assert record["spectral_gap_of_mean_W"] > 0.2 and record["spectral_gap_of_mean_W"] == schedule.planning_gap()
    assert "spectral_gap_of_mean_W" in record["note"]


def test_the_record_of_a_static_graph_has_one_gap() -> None:
    record = MixingSchedule(build_topology("ring", 8, seed=0), "metropolis", [], seed=0, participation=1.0).record()
    assert record["spectral_gap_of_mean_W"] == record["spectral_gap"] == pytest.approx((1 - np.cos(np.pi / 4)) * 2 / 3)


def test_draw_topology_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "ring.png"
    draw_topology(nx.cycle_graph(6), path, title="ring")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in path.parent.iterdir()] == ["ring.png"]


STAT_KEYS = ["nodes", "edges", "directed", "connected", "degree_min", "degree_max", "diameter", "rho", "spectral_gap",
             "doubly_stochastic"]


def topology_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["topology", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_topology_command_prints_the_graph_statistics(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, _ = topology_cli(capsys, "ring", "--peers", "8", "--json", "--png", str(tmp_path / "ring.png"))
    stats = json.loads(out)
    assert code == 0 and list(stats) == STAT_KEYS
    assert (stats["nodes"], stats["edges"], stats["diameter"], stats["doubly_stochastic"]) == (8, 8, 4, True)
    assert stats["spectral_gap"] == pytest.approx((1 - np.cos(2 * np.pi / 8)) * 2 / 3)  # MH ring: 1/3 + 2/3 cos
    assert (tmp_path / "ring.png").is_file()


def test_topology_command_reports_the_server_round_and_refuses_disconnected_graphs(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = topology_cli(capsys, "server", "--peers", "9", "--json")
    assert code == 0 and json.loads(out)["spectral_gap"] == pytest.approx(1.0)  # exact averaging each round
    code, _, err = topology_cli(capsys, "{name: edges, edges: [[0, 1], [2, 3], [4, 5]]}", "--peers", "6")
    assert code == 2 and "allow_disconnected" in err


# ---------------------------------------------------------------- size guards for large graphs


def test_too_many_edges_is_refused_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def complete_graph(n, create_using=None):
        raise AssertionError("the graph must not be built")

    monkeypatch.setattr(nx, "complete_graph", complete_graph)
    started = time.perf_counter()
    with pytest.raises(TopologyError, match=r"topology 'complete' with 20000 peers would have about 199,990,000 "
                                            r"edges, over the limit of 10,000,000 .*fewer peers or a sparser graph"):
        build_topology("complete", 20000, seed=0)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(TopologyError, match="'erdos_renyi' with 8000 peers would have about 19,997,500 edges"):
        build_topology({"name": "erdos_renyi", "p": 0.625}, 8000, seed=0)
    assert MAX_EDGES == 10_000_000


@pytest.mark.parametrize("name, peers", [("complete", 9), ("ring", 9), ("line", 9), ("star", 9), ("torus", 12),
                                         ("random_regular", 10), ("small_world", 12), ("random_matching", 10),
                                         ("one_peer_exponential", 8), ("server", 9)])
def test_edge_estimates_match_the_built_graphs(name: str, peers: int) -> None:
    entry = yaml.safe_load((CATALOGUE / f"{name}.yaml").read_text(encoding="utf-8"))
    topology = build_topology(name, peers, seed=0)
    assert estimated_edges(entry["generator"], peers, topology.params) == topology.graph_at(0).number_of_edges()


def test_edge_estimates_bound_the_exponential_graph_and_skip_unknown_generators() -> None:
    assert estimated_edges("exponential", 16, {}) >= build_topology("exponential", 16, seed=0).graph_at(0).number_of_edges()
    assert estimated_edges("erdos_renyi", 100, {"p": "dense"}) is None  # the generator reports bad parameters
    assert estimated_edges("barabasi_albert_graph", 100, {"m": 2}) is None


def test_large_builds_are_announced(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(topology_module, "NOTICE_EDGES", 100)
    with caplog.at_level(logging.INFO, logger="p2p_fedrot"):
        build_topology("erdos_renyi", 40, seed=0)
    assert "building erdos_renyi on 40 peers (~0.0 M edges)..." in caplog.text


def test_stats_skip_the_diameter_of_a_large_graph() -> None:
    graph = build_topology("ring", 3000, seed=0).graph_at(0)
    W = mixing_matrix(graph)
    tracemalloc.start()
    try:
        stats = topology_stats(graph, W)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3000 * 3000 * 8 / 8  # far below one dense 3000 x 3000 array (72 MB)
    assert list(stats) == [*STAT_KEYS, "skipped"] and stats["diameter"] is None
    assert list(stats["skipped"]) == ["diameter"] and "all-pairs BFS over 3000 nodes" in stats["skipped"]["diameter"]
    assert stats["rho"] == pytest.approx((1 + 2 * np.cos(2 * np.pi / 3000)) / 3, abs=1e-12)
    assert stats["doubly_stochastic"] is True


def test_stats_report_an_unconverged_rho_as_null() -> None:
    n = 1200  # a directed ring's W: its eigenvalues crowd the unit circle, so ARPACK gives up
    W = sparse.csr_array(0.5 * sparse.identity(n) + 0.5 * sparse.eye(n, k=1) + 0.5 * sparse.eye(n, k=1 - n))
    with pytest.warns(UserWarning, match="did not converge"):
        stats = topology_stats(nx.cycle_graph(n), W)
    assert (stats["rho"], stats["spectral_gap"]) == (None, None) and "rho" in stats["skipped"]
    json.dumps(stats, allow_nan=False)


def test_topology_command_on_a_large_ring_prints_valid_json(capsys: pytest.CaptureFixture) -> None:
    code, out, err = topology_cli(capsys, "ring", "--peers", "5000", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["nodes"] == 5000 and stats["diameter"] is None and "diameter" in stats["skipped"]
    assert stats["spectral_gap"] == pytest.approx(2 / 3 * (1 - np.cos(2 * np.pi / 5000)), rel=1e-6)
    assert "p2p-fedrot: rho of the 5000 x 5000 mixing matrix with a sparse eigensolver..." in err
    code, out, _ = topology_cli(capsys, "ring", "--peers", "5000")
    assert code == 0 and "(diameter skipped: all-pairs BFS over 5000 nodes" in out and "5.264e-07" in out


def test_topology_command_fails_fast_on_oversized_requests(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, err = topology_cli(capsys, "complete", "--peers", "20000", "--json")
    assert code == 2 and out == "" and "199,990,000 edges" in err and len(err.splitlines()) == 1
    code, _, err = topology_cli(capsys, "ring", "--peers", "5000", "--png", str(tmp_path / "ring.png"))
    assert code == 2 and "drawings are limited to 1,000 peers" in err and not (tmp_path / "ring.png").exists()
    code, _, err = topology_cli(capsys, "server", "--peers", "1001")
    assert code == 2 and "at most 1,000 peers" in err and "'star'" in err
