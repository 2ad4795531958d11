"""Partial participation and the mixing schedule: the same draw everywhere, mixing over the peers that
are there, and sparse steps at thousands of peers."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
from typing import Callable, TypeVar

import networkx as nx
import numpy as np
import pytest
from scipy import sparse

from p2p_fedrot.comm.routes import routes_of, row_entries
from p2p_fedrot.methods import MethodContext, make_method
from p2p_fedrot.graph.weights import compose, mixing_matrix, server_mixing_steps
from p2p_fedrot.graph.participation import present_peers, restrict
from p2p_fedrot.graph.schedule import MixingSchedule, written_mixing
from p2p_fedrot.graph.topologies import build_topology


def test_presence_is_a_function_of_seed_and_round_with_the_hub_always_there() -> None:
    draws = [present_peers(7, r, 200, 0.3, always=[0]) for r in range(20)]
    assert all(d[0] for d in draws)
    assert np.array_equal(draws[5], present_peers(7, 5, 200, 0.3, always=[0]))
    assert not np.array_equal(draws[5], draws[6])
    assert abs(np.mean([d[1:].mean() for d in draws]) - 0.3) < 0.03
    assert present_peers(7, 5, 10, 1.0).all()


def test_absent_peers_keep_their_value_and_present_rows_mix_only_present_peers() -> None:
    W = mixing_matrix(build_topology("ring", 8, seed=0).graph_at(0))
    present = np.array([True, False, True, True, True, True, True, False])
    R = restrict(W, present)
    dense, full = R.toarray(), W.toarray()
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    for peer in (1, 7):
        assert row_entries(R, peer) == [(peer, 1.0)]  # keeps its value, receives nothing
        assert not dense[present, peer].any()  # and sends nothing
    np.testing.assert_allclose(dense[2], np.where(present, full[2], 0) / np.where(present, full[2], 0).sum())
    assert row_entries(R, 0) == [(0, 1.0)]  # both neighbours absent: it keeps its own value
    assert restrict(W, np.ones(8, dtype=bool)) is W  # everyone there: W untouched, bit for bit


@pytest.mark.parametrize("probability", [0.2, 0.5, 0.9])
def test_restricted_rows_sum_to_one_and_absent_rows_are_the_identity(probability: float) -> None:
    W = mixing_matrix(nx.random_regular_graph(4, 300, seed=1))
    present = present_peers(3, 0, 300, probability)
    R = restrict(W, present)
    assert isinstance(R, sparse.csr_array) and (R.data != 0).all() and R.has_sorted_indices
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    absent = np.flatnonzero(~present)
    np.testing.assert_array_equal(R[absent][:, absent].toarray(), np.eye(len(absent)))
    assert R[absent].nnz == len(absent) and R[:, absent].nnz == len(absent)  # absent peers neither send nor receive


def test_server_mode_averages_the_clients_that_take_part() -> None:
    counts = np.array([30.0, 10, 25, 5, 40])
    present = np.array([True, True, False, True, False, True])  # hub 0 always; clients 2 and 4 absent
    X = np.random.default_rng(0).normal(size=(6, 3))
    round_W = compose([restrict(W, present) for W in server_mixing_steps(counts.tolist())])
    out = round_W @ X
    clients = [1, 3, 5]
    fedavg = (counts[[c - 1 for c in clients], None] * X[clients]).sum(axis=0) / counts[[c - 1 for c in clients]].sum()
    for node in (0, *clients):
        np.testing.assert_allclose(out[node], fedavg, rtol=0, atol=1e-12)
    for absent in (2, 4):
        np.testing.assert_array_equal(out[absent], X[absent])
    alone = [restrict(W, np.array([True, False, False, False, False, False])) for W in server_mixing_steps(counts)]
    assert all((W != sparse.eye_array(6)).nnz == 0 for W in alone)  # no client there: the hub keeps its value too


# ---------------------------------------------------------------- schedules of thousands of peers

SCALE = 4096  # a dense N x N float64 array would take 134 MB
T = TypeVar("T")


def traced(work: Callable[[], T]) -> tuple[T, float, int]:
    """(result, seconds, peak bytes that Python and numpy allocated) of ``work()``."""
    tracemalloc.start()
    try:
        started = time.perf_counter()
        result = work()
        return result, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["ring", "random_matching", "one_peer_exponential"])
def test_a_schedule_of_4096_peers_never_holds_a_dense_matrix(name: str) -> None:
    schedule = MixingSchedule(build_topology(name, SCALE, seed=0), "metropolis", [], seed=0, participation=0.5)

    def rounds() -> None:
        for round in range(3):
            (W,) = schedule.steps_at(round)
            assert isinstance(W, sparse.csr_array)
            assert 0 < len(routes_of(W)) <= 2 * SCALE  # at most two neighbours each, half of them absent
        written_mixing(schedule.graph_steps(0))

    _, seconds, peak = traced(rounds)
    assert peak < SCALE * SCALE * 8 / 4 and seconds < 3.0, (peak, seconds)


def test_the_planning_gap_of_4096_peers_averages_sparse_rounds() -> None:
    schedule = MixingSchedule(build_topology("random_matching", SCALE, seed=0), "metropolis", [], 0, 1.0)
    (gap, record), _, peak = traced(lambda: (schedule.planning_gap(), schedule.record()))
    assert peak < SCALE * SCALE * 8 / 4, peak
    assert 0.2 < gap < 0.6  # 64 matchings mix well: a single one is disconnected
    assert record["spectral_gap"] == pytest.approx(0.0, abs=1e-12) and len(record["W_entries"]) == 2 * SCALE


def test_a_time_varying_round_is_built_once() -> None:
    matchings = build_topology("random_matching", 16, seed=0)
    built = []

    def graph_of_round(round: int) -> nx.Graph:
        built.append(round)
        return matchings.graph_at(round)

    topology = dataclasses.replace(matchings, graph_of_round=graph_of_round)
    schedule = MixingSchedule(topology, "metropolis", [], seed=0, participation=0.5)
    schedule.planning_gap()  # the averaging window of the record's gap, built once at the start of a run
    built.clear()
    schedule.steps_at(0)
    schedule.present_at(0)
    schedule.record()
    schedule.steps_at(1)
    schedule.steps_at(1)
    assert built == [0, 1]


def test_the_spectral_gap_is_computed_only_for_a_method_that_reads_it() -> None:
    solves = []

    def planning_gap() -> float:
        solves.append(1)
        return 0.25

    make_method("fedit", {}, MethodContext(None, planning_gap, server=False))
    assert solves == []
    tad = make_method("tad", {"c": 1.0}, MethodContext(None, planning_gap, server=False))
    assert tad.switch_every == 2 and tad.context.spectral_gap == 0.25 and solves == [1]


def test_a_method_that_changes_the_shared_base_weights_needs_every_client(tmp_path) -> None:
    from p2p_fedrot.config import load_config
    from p2p_fedrot.errors import ConfigError
    from p2p_fedrot.run.loop import Experiment
    from p2p_fedrot.comm.runtime import init_runtime

    from launch import TOY

    config = load_config(TOY, ["method=fedex", "topology=server", "peers=5", "participation=0.5", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="method fedex folds .* set participation: 1"):
        Experiment(config, init_runtime())
