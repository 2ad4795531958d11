"""Gossip and transport on real gloo ranks over loopback: results must equal W x and not depend on P."""

from __future__ import annotations

import os
import signal
import threading
import time

import networkx as nx
import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy import sparse

from multiproc import spawn_ranks
from p2p_fedrot.errors import PeerError
from p2p_fedrot.comm.routes import collect_mix_inputs, keeps_own_value, routes_of, row_entries
from p2p_fedrot.exact import weighted_sum
from p2p_fedrot.graph.weights import mixing_matrix, server_mixing_steps
from p2p_fedrot.graph.participation import present_peers, restrict
from p2p_fedrot.graph.topologies import build_topology
from p2p_fedrot.comm.collectives import ProcessGroup
from p2p_fedrot.comm.runtime import Runtime, agree, collective, init_runtime
from p2p_fedrot.comm.transport import Placement, Transport

PEERS = 8
GRAPHS = {
    **{name: build_topology(name, PEERS, seed=0).graph_at(0) for name in ("ring", "torus", "star")},
    "irregular": nx.lollipop_graph(4, 4),
}


def known_vectors() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(PEERS, 5)).astype(np.float32)


def mix_cases(rank: int, world: int, cases: dict[str, list[sparse.csr_array]], X: np.ndarray) -> dict[str, dict]:
    """Apply each case's mixing steps to X on this rank's peers, one case after another on one process
    group; per case, the final vectors of this rank's peers and the bytes its transport sent."""
    runtime = init_runtime("gloo", timeout_s=30)
    placement = Placement(PEERS, world, rank)
    results = {}
    for case, steps in cases.items():
        transport = Transport(placement, runtime.device, timeout_s=30)
        values = {p: torch.tensor(X[p]) for p in placement.local_peers}
        for k, W in enumerate(steps):
            inputs, _ = collect_mix_inputs(transport, W, values, step=f"{case} step {k}", tag=(0, k))
            values.update({i: weighted_sum(pairs) for i, pairs in inputs.items()})
        results[case] = {"values": {p: v.numpy() for p, v in values.items()}, "wire_bytes": transport.wire_bytes}
    return results


COUNTS = [30, 10, 25, 5, 40, 12, 8]  # samples of clients 1..7 in server mode
CASES = {  # case -> its mixing steps
    **{name: [mixing_matrix(graph)] for name, graph in GRAPHS.items()},
    # partial participation: absent peers keep their value, the others mix over who is there
    "restricted torus": [restrict(mixing_matrix(GRAPHS["torus"]), present_peers(seed=5, round=0, peers=PEERS,
                                                                                   probability=0.5))],
    "server": list(server_mixing_steps(COUNTS)),
}


@pytest.fixture(scope="module")
def mixed() -> dict[tuple[str, int], tuple[np.ndarray, list[int]]]:
    """(case, process count) -> every peer's final vector and each process's wire bytes: every case
    on 1 process, and on 2 and 4 real gloo ranks (one launch per process count)."""
    X = known_vectors()
    runs = {1: [mix_cases(0, 1, CASES, X)], **{world: spawn_ranks(mix_cases, world, CASES, X, timeout=120)
                                                for world in (2, 4)}}
    found = {}
    for world, ranks in runs.items():
        for case in CASES:
            out = np.zeros_like(X)
            for result in ranks:
                for peer, value in result[case]["values"].items():
                    out[peer] = value
            found[case, world] = out, [result[case]["wire_bytes"] for result in ranks]
    return found


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_one_gossip_step_equals_W_x(mixed, name: str, world: int) -> None:
    out, wire = mixed[name, world]
    np.testing.assert_allclose(out, mixing_matrix(GRAPHS[name]) @ known_vectors().astype(np.float64), rtol=0, atol=1e-6)
    if world == 1:
        assert wire == [0]  # co-hosted peers exchange in memory


def test_routes_and_identity_rows_come_from_the_stored_entries() -> None:
    W = restrict(mixing_matrix(nx.path_graph(4)), np.array([True, True, False, True]))
    assert routes_of(W) == [(1, 0), (0, 1)]  # (source, destination) by destination then source
    assert [keeps_own_value(W, p) for p in range(4)] == [False, False, True, True]  # 3 lost its only neighbour
    up, down = server_mixing_steps([1, 0, 2])  # client 2 has no examples: it sends the hub nothing
    assert routes_of(up) == [(1, 0), (3, 0)] and routes_of(down) == [(0, 1), (0, 2), (0, 3)]
    assert row_entries(up, 0) == [(1, 1 / 3), (3, 2 / 3)] and row_entries(down, 2) == [(0, 1.0)]


def test_each_input_list_is_its_row_in_ascending_j() -> None:
    W = mixing_matrix(nx.lollipop_graph(4, 4))
    transport = Transport(Placement(PEERS, 1, 0), torch.device("cpu"), timeout_s=5)
    values = {p: torch.full((2,), float(p)) for p in range(PEERS)}
    inputs, dropped = collect_mix_inputs(transport, W, values)
    dense = W.toarray()
    assert not dropped and sorted(inputs) == list(range(PEERS))
    for i, pairs in inputs.items():
        assert [(w, int(x[0])) for w, x in pairs] == [(dense[i, j], j) for j in np.flatnonzero(dense[i])]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_gossip_over_a_restricted_step_equals_R_x(mixed, world: int) -> None:
    """Partial participation: absent peers keep their value, the others mix over who is there."""
    [R] = CASES["restricted torus"]
    out, _ = mixed["restricted torus", world]
    np.testing.assert_allclose(out, R @ known_vectors().astype(np.float64), rtol=0, atol=1e-6)


def test_messages_are_one_per_process_pair(mixed) -> None:
    """On a ring over 2 processes, each process sends one message holding its two boundary peers."""
    _, wire = mixed["ring", 2]
    # process 0 hosts 0-3: peers 0 and 3 border process 1 (peers 7 and 4) -> 2 payloads of 5 floats,
    # after a header of 4 + 2 int64 (magic, round, step, count, one size per payload)
    assert wire == [2 * 5 * 4 + 6 * 8] * 2


@pytest.mark.parametrize("world", [1, 2, 4])
def test_server_mode_equals_fedavg_by_hand(mixed, world: int) -> None:
    out, _ = mixed["server", world]
    counts = np.array(COUNTS, dtype=np.float64)
    fedavg = (counts[:, None] * known_vectors()[1:].astype(np.float64)).sum(axis=0) / counts.sum()
    for node in range(PEERS):
        np.testing.assert_allclose(out[node], fedavg, rtol=0, atol=1e-6)


def misbehaving_worker(rank: int, world: int, mode: str) -> dict | None:
    """Rank 1 misbehaves (stays silent, dies, or runs another config); rank 0 must fail fast and clearly."""
    runtime = init_runtime("gloo", timeout_s=60)
    placement = Placement(4, world, rank)
    transport = Transport(placement, runtime.device, timeout_s=3)
    if mode == "mismatch":
        start = time.monotonic()
        header = {"train.lr": "0.5" if rank == 1 else "0.1", "seed": "0"}
        try:
            agree(runtime, header, "the configuration", 30, placement.process_name)
            outcome = "no error"
        except PeerError as exc:
            outcome = str(exc)
        return {"outcome": outcome, "elapsed": time.monotonic() - start}
    if rank == 1 and mode == "silent":
        time.sleep(6)  # longer than the 3 s deadline of rank 0
        return None
    if rank == 1 and mode == "killed":
        os._exit(1)
    start = time.monotonic()
    try:
        payloads = {p: torch.ones(3) for p in placement.local_peers}
        collect_mix_inputs(transport, mixing_matrix(nx.cycle_graph(4)), payloads, step="round 0")
        outcome = "no error"
    except PeerError as exc:
        outcome = str(exc)
    return {"outcome": outcome, "elapsed": time.monotonic() - start}


@pytest.mark.parametrize("mode", ["silent", "killed"])
def test_absent_or_killed_peer_ends_with_clear_error_within_timeout(mode: str) -> None:
    start = time.monotonic()
    results = spawn_ranks(misbehaving_worker, 2, mode, timeout=60, may_fail=(1,))
    outcome = results[0]
    assert "process 1 (peers 2-3)" in outcome["outcome"], outcome
    assert outcome["elapsed"] < 3 + 2.0, outcome  # the 3 s deadline, not the 60 s group timeout
    assert time.monotonic() - start < 45


def dies_inside_a_collective(rank: int, world: int) -> str | None:
    """Rank 1 dies after the barrier that precedes a collective, so Gloo's error does not say who
    broke it and rank 0 asks the heartbeats (seconds); meanwhile rank 0 gets SIGTERM, as torchrun
    sends every survivor the moment it sees a worker die."""
    runtime = init_runtime("gloo", timeout_s=60)
    placement = Placement(4, world, rank)
    ProcessGroup(runtime, 60, placement.process_name).arrive("ready")
    if rank == 1:
        os._exit(1)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        with collective("combining metrics", 60, placement.process_name, runtime.heartbeat):
            dist.all_reduce(torch.ones(1))  # rank 1 never joins it
    except PeerError as exc:
        return str(exc)
    return "no error"


def test_a_survivor_told_to_stop_still_names_the_peer_that_died() -> None:
    outcome, _ = spawn_ranks(dies_inside_a_collective, 2, timeout=60, may_fail=(1,))
    assert outcome.startswith("combining metrics: process 1 (peers 2-3) left the group"), outcome


def test_config_mismatch_fails_fast_on_both_sides() -> None:
    results = spawn_ranks(misbehaving_worker, 2, "mismatch", timeout=60)
    for rank in (0, 1):
        assert results[rank]["outcome"].startswith("process 1 (peers 2-3) disagrees with process 0 on the configuration: "
                                                   "train.lr: '0.5' there, '0.1' on process 0"), results[rank]
        assert results[rank]["elapsed"] < 3


def test_gloo_messages_stay_in_host_memory_even_on_a_gpu() -> None:
    """Gloo moves host memory only; NCCL moves GPU memory. The compute device is not the wire's."""
    gpu = torch.device("cuda", 0)
    assert Runtime(0, 2, 0, 2, gpu, "gloo").wire_device == torch.device("cpu")
    assert Runtime(0, 2, 0, 2, gpu, "nccl").wire_device == gpu
