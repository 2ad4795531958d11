"""Partial participation: the same draw everywhere, and mixing over the peers that are there."""

from __future__ import annotations

import numpy as np

from p2p_fedrot.mixing import compose, mixing_matrix, server_mixing_steps
from p2p_fedrot.participation import present_peers, restrict
from p2p_fedrot.topology import build_topology


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
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    for peer in (1, 7):
        assert R[peer, peer] == 1.0 and np.count_nonzero(R[peer]) == 1  # keeps its value, receives nothing
        assert not R[present, peer].any()  # and sends nothing
    np.testing.assert_allclose(R[0], np.where(present, W[0], 0) / np.where(present, W[0], 0).sum())
    assert restrict(W, np.ones(8, dtype=bool)) is W  # everyone there: W untouched, bit for bit


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


def test_a_method_that_changes_the_shared_base_weights_needs_every_client(tmp_path) -> None:
    import pytest

    from p2p_fedrot.config import load_config
    from p2p_fedrot.errors import ConfigError
    from p2p_fedrot.runner import Experiment
    from p2p_fedrot.runtime import init_runtime

    from launch import TOY

    config = load_config(TOY, ["method=fedex", "topology=server", "peers=5", "participation=0.5", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="method fedex folds .* set participation: 1"):
        Experiment(config, init_runtime())
