"""End-to-end runs of the toy task: real CLI, real torchrun, outputs, P-independence, server mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from p2p_fedrot.methods.procrustes import align_modules
from p2p_fedrot.config import load_config
from p2p_fedrot.data.federated import build_data
from p2p_fedrot.peers.models import build_bank
from p2p_fedrot.run.loop import Experiment, startup_header
from p2p_fedrot.peers.training import BankTrainer
from p2p_fedrot.comm.runtime import init_runtime

import launch

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


COMPARED = ["accuracy", "loss", "local_accuracy", "local_loss", "consensus_distance",
            "aggregation_error", "aggregation_error_rel", "bytes_sent"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "topology,method,peers,nproc",
    [("ring", "fedrot", 8, 2),
     ("server", "fedex", 3, 3)],  # process 0 hosts the hub alone: it must fold the residual too
)
def test_toy_run_is_identical_with_one_and_several_processes(tmp_path: Path, topology: str, method: str,
                                                             peers: int, nproc: int) -> None:
    common = ["run", TOY, "--set", f"peers={peers}", "--set", f"topology={topology}", "--set", f"method={method}",
              "--set", "rounds=4", "--set", "threads=1"]
    one = launch.run([*common, "--set", f"out={tmp_path / 'p1'}"])
    assert one.returncode == 0, one.stderr
    several = launch.run([*common, "--set", f"out={tmp_path / 'pn'}"], nproc=nproc)
    assert several.returncode == 0, several.stderr
    m1, mn = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "pn")
    assert len(m1) == len(mn) == 4
    for r1, rn in zip(m1, mn):
        for key in COMPARED:
            np.testing.assert_allclose(r1[key], rn[key], rtol=0, atol=1e-6, err_msg=key)
    assert m1[-1]["mean_accuracy"] > m1[0]["mean_accuracy"]
    for name in ("metrics.jsonl", "config.yaml", "topology.json", "summary.json"):
        assert (tmp_path / "pn" / name).is_file(), name
    summary = json.loads((tmp_path / "pn" / "summary.json").read_text())
    assert summary["processes"] == nproc and summary["wire_bytes_total"] > 0
    resolved = yaml.safe_load((tmp_path / "pn" / "config.yaml").read_text())
    assert resolved["peers"] == peers and resolved["rounds"] == 4
    for adapter in ["consensus", *(f"peer_{p:03d}" for p in range(1, peers))]:
        relative = Path("adapters") / adapter / "adapter_model.safetensors"
        assert_same_tensors(tmp_path / "p1" / relative, tmp_path / "pn" / relative)
    if method == "fedex":  # the base weights with every round's residual folded in
        relative = Path("adapters") / "method_state.safetensors"
        assert_same_tensors(tmp_path / "p1" / relative, tmp_path / "pn" / relative)


def assert_same_tensors(path: Path, other: Path) -> None:
    first, second = load_file(path), load_file(other)
    assert first.keys() == second.keys(), path
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=0, msg=f"{path}: {key}")


@pytest.mark.parametrize("topology", ["ring", "torus", "star", "erdos_renyi"])
def test_bytes_sent_is_degree_times_payload(tmp_path: Path, topology: str) -> None:
    config = load_config(TOY, ["peers=9" if topology == "torus" else "peers=8", f"topology={topology}",
                               "rounds=2", f"out={tmp_path}", "train.local_steps=1"])
    Experiment(config, init_runtime()).run()
    summary = json.loads((tmp_path / "summary.json").read_text())
    degrees = sum(d for _, d in json_graph_degrees(tmp_path / "topology.json"))
    for record in read_metrics(tmp_path):
        assert record["bytes_sent"] == degrees * summary["payload_bytes"]
    assert summary["payload_bytes"] == 4 * (4 * (32 + 64) + 4 * (64 + 64) + 64 * 10 + 10)


def json_graph_degrees(path: Path) -> list[tuple[int, int]]:
    edges = json.loads(path.read_text())["edges"]
    counts: dict[int, int] = {}
    for u, v in edges:
        counts[u] = counts.get(u, 0) + 1
        counts[v] = counts.get(v, 0) + 1
    return list(counts.items())


def hand_server_rounds(config, rounds: int, lam: float | None) -> torch.Tensor:
    """FedAvg (lam None) or FedRot-LoRA computed by hand: clients start from G, train, align, weighted mean."""
    clients = list(range(1, config.peers))
    data = build_data(config.data, clients, config.seed)
    bank = build_bank(config.model, list(range(config.peers)), data.input_dim, data.num_classes, config.seed,
                      torch.device("cpu"))
    trainer = BankTrainer(bank, {c: data.clients[c].train for c in clients}, config.train, config.seed)
    layout = bank.layout
    weights = np.array([len(data.clients[c].train) for c in clients], dtype=np.float64)
    weights /= weights.sum()
    global_flat = bank.flat(0).clone()
    for t in range(rounds):
        for c in clients:
            bank.flat(c).copy_(global_flat)
            trainer.train(t, [c], frozenset({"A", "B", "head"}))
            if lam is not None and t >= 1:
                side = "A" if t % 2 == 1 else "B"
                views = layout.a_views if side == "A" else layout.b_views
                As, Bs = layout.a_views(bank.flat(c)), layout.b_views(bank.flat(c))
                new_As, new_Bs = align_modules(As, Bs, views(global_flat), side, lam)
                for view, value in zip(As + Bs, new_As + new_Bs):
                    view.copy_(value)
        global_flat = sum(float(w) * bank.flat(c).double() for w, c in zip(weights, clients)).float()
    return global_flat


@pytest.mark.parametrize("method,lam", [("fedit", None), ("fedrot", 0.4)])
def test_server_mode_reproduces_the_federated_algorithm(tmp_path: Path, method: str, lam: float | None) -> None:
    overrides = ["peers=5", "topology=server", "rounds=3", f"method={method}", f"out={tmp_path}",
                 "train.batch_peers=false"]  # one peer at a time, as the hand computation
    if lam is not None:
        overrides.append(f"method_args.lam={lam}")
    config = load_config(TOY, overrides)
    experiment = Experiment(config, init_runtime())
    experiment.run()
    expected = hand_server_rounds(config, 3, lam)
    for peer in range(config.peers):  # the hub holds G and every client adopted it
        torch.testing.assert_close(experiment.hosted.states[peer].flat, expected, rtol=0, atol=2e-6)


def test_processes_must_agree_on_every_setting_but_out_threads_and_the_timeout(tmp_path: Path) -> None:
    def header(*overrides: str) -> dict[str, str]:
        return startup_header(load_config(TOY, [f"out={tmp_path}", *overrides]))

    reference = header()
    assert header(f"out={tmp_path / 'elsewhere'}", "threads=3", "comm.timeout_s=5") == reference
    assert reference["version of torch"] == torch.__version__
    for override in ("train.lr=0.5", "data.alpha=100", "model.lora.alpha=4", "rounds=7", "eval.every=2",
                     "comm.on_bad_payload=drop", "participation=0.5"):
        key = override.split("=")[0]
        assert {k for k in reference if header(override)[k] != reference[k]} == {key}, override


def test_a_diverging_peer_stops_the_run_with_the_cause(tmp_path: Path) -> None:
    result = launch.run(["run", TOY, "--set", "train.lr=1e20", "--set", "rounds=2", "--set", f"out={tmp_path}"])
    assert result.returncode == 2
    assert "p2p-fedrot: error: peer 0, round 0: the training loss became nan" in result.stderr
    assert "lower train.lr (now 1e+20)" in result.stderr and "Traceback" not in result.stderr


def test_an_out_below_a_file_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("kept")
    for out in (notes / "runs" / "toy", notes):
        result = launch.run(["run", TOY, "--set", f"out={out}", "--set", "rounds=1"])
        assert result.returncode == 2
        assert result.stderr == (f"p2p-fedrot: error: out={out} cannot be a folder: {notes} is a file; move that file "
                                 "away, or set out to another path\n")
    assert notes.read_text() == "kept"


def test_metrics_are_strict_json_even_without_local_test_splits(tmp_path: Path) -> None:
    """An empty local split has no accuracy: it is written as null, not as a bare NaN token."""
    config = load_config(TOY, ["rounds=1", "data.local_test_fraction=0", f"out={tmp_path}"])
    Experiment(config, init_runtime()).run()

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    (record,) = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["local_accuracy"] == [None] * 8 and all(a is not None for a in record["accuracy"])


def test_topology_json_lists_the_nonzero_weights_of_a_large_graph() -> None:
    from scipy import sparse

    from p2p_fedrot.graph.weights import mixing_matrix
    from p2p_fedrot.graph.weights import DENSE_SPECTRAL_LIMIT
    from p2p_fedrot.graph.schedule import written_mixing
    from p2p_fedrot.graph.topologies import build_topology

    small = mixing_matrix(build_topology("ring", 8, seed=0).graph_at(0))
    assert written_mixing([small]) == {"W": small.toarray().tolist()}
    n = DENSE_SPECTRAL_LIMIT + 2
    large = mixing_matrix(build_topology("ring", n, seed=0).graph_at(0))
    (key, entries), = written_mixing([large]).items()
    assert key == "W_entries" and len(entries) == 3 * n  # self and two neighbours per peer
    assert entries == sorted(entries) and all(type(i) is int and type(j) is int for i, j, _ in entries)
    rows, columns, weights = zip(*entries)
    rebuilt = sparse.csr_array((weights, (rows, columns)), shape=(n, n))
    assert (rebuilt != large).nnz == 0


def test_warmup_rounds_train_locally_before_the_first_exchange(tmp_path: Path) -> None:
    """During the warm-up nothing travels and the peers drift apart; afterwards they mix."""
    config = load_config(TOY, ["peers=4", "rounds=4", "train.warmup_rounds=2", "method=fedit", f"out={tmp_path}"])
    summary = Experiment(config, init_runtime()).run()
    records = read_metrics(tmp_path)
    assert [r["bytes_sent"] for r in records[:2]] == [0, 0] and all(r["bytes_sent"] > 0 for r in records[2:])
    assert records[1]["aggregation_error"] == 0.0 and records[1]["rotational_share"] is None
    assert records[2]["rotational_share"] is not None
    assert summary["payload_bytes"] > 0
