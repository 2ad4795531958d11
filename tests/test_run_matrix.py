"""The run matrix: every registered method on every kind of graph it runs on, on 1 and 2 real
processes, must finish and give the same bits.

Each process count is one launch that runs every cell in turn (imports and the process group set
up once). A cell that waits for a message that never comes fails at its 20 s deadline, so a hang
shows up as that cell's error, never as a stuck suite. A method registered later is in the matrix
without editing this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import TOY, assert_identical_runs
from multiproc import spawn_ranks
from p2p_fedrot.config import load_config
from p2p_fedrot.methods import available_methods, method_class
from p2p_fedrot.run.loop import run_in
from p2p_fedrot.comm.runtime import init_runtime

# small enough that the whole matrix costs seconds per cell; batch_peers off and one thread make
# P = 1 and P = 2 bit-identical (the reproducibility contract)
COMMON = ("peers=4", "rounds=3", "eval.every=1", "threads=1", "train.batch_peers=false", "train.local_steps=2",
          "data.train_samples=400", "data.test_samples=100", "data.min_samples=5", "comm.timeout_s=20")
# a directed graph that changes every round, with peers sitting rounds out
TIME_VARYING = ("topology=one_peer_exponential", "participation=0.6")
# peer 2 (on the second process) sends a non-finite payload in round 1; its receivers mix without it
DRILL = ("comm.on_bad_payload=drop", "comm.inject_fault={peer: 2, round: 1, kind: nan}")
# every robust rule against an attack by peer 1, whose neighbours sit on both processes; every attack
# appears at least once
ROBUST_CELLS = {
    "fedit": {"plain": "gauge_scale", "clip": "alie", "cs_plus": "dissensus", "trimmed_mean": "gaussian",
              "median": "ipm"},
    "fedrot": {"plain": "sign_flip", "clip": "scaled", "cs_plus": "label_flip", "trimmed_mean": "dissensus",
               "median": "gaussian"},
}


def matrix() -> dict[str, tuple[str, ...]]:
    """Cell name -> overrides: every method on the server star, every gossip method on the ring, on a
    directed time-varying graph with partial participation, and on the ring with a dropped fault; and
    every robust rule under attack (trimmed_mean on the complete graph: on the ring's two neighbours
    it would trim them both and keep the receiver's own)."""
    cells = {}
    for method in available_methods():
        cells[f"{method}-server"] = (f"method={method}", "topology=server")
        if not method_class(method).server_only:
            cells[f"{method}-ring"] = (f"method={method}", "topology=ring")
            cells[f"{method}-time-varying"] = (f"method={method}", *TIME_VARYING)
            cells[f"{method}-ring-drop"] = (f"method={method}", "topology=ring", *DRILL)
    for method, rules in ROBUST_CELLS.items():
        for rule, attack in rules.items():
            graph = "complete" if rule == "trimmed_mean" else "ring"
            cells[f"{method}-{rule}-{attack}"] = (f"method={method}", f"topology={graph}", f"robust.rule={rule}",
                                                  "adversary.peers=[1]", f"adversary.attack={attack}")
    return cells


def run_cells(rank: int, world: int, cells: dict[str, tuple[str, ...]], root: str) -> dict[str, str]:
    """Every cell in turn on one launch; stops at the first failure and returns it (cell -> error)."""
    runtime = init_runtime("gloo", 20.0)
    for name, overrides in cells.items():
        try:
            run_in(runtime, load_config(TOY, [*COMMON, *overrides, f"out={Path(root) / name}"]))
        except Exception as exc:  # the cell's own one-line error is what the test reports
            return {name: f"{type(exc).__name__}: {exc}"}
    return {}


@pytest.mark.slow
def test_every_method_on_every_graph_gives_the_same_bits_on_one_and_two_processes(tmp_path: Path) -> None:
    cells = matrix()
    outcomes = {}
    for world in (1, 2):
        failures = spawn_ranks(run_cells, world, cells, str(tmp_path / f"P{world}"), timeout=900)
        outcomes[world] = {name: error for rank in failures for name, error in rank.items()}
        assert not outcomes[world], f"on {world} process(es): {outcomes[world]}"
    for name in cells:
        assert_identical_runs(tmp_path / "P1" / name, tmp_path / "P2" / name)

