"""The reproducibility contract, on real launches over 100 rounds, every round compared bit for bit:
(a) the same launch repeats, (b) any process count gives the same bits with equal threads, (c) a run
killed anywhere and resumed, by hand with another process count or by torchrun's own restart, ends
identical to an uninterrupted one. Each world size is launched once for (b) and (c) together: 4
processes under two torchrun agents as two nodes, 2 processes under a torchrun that restarts a killed
worker (every round is computed on 2 processes), and a run killed on 2 processes, again on 4 and
finished on 1. With all hosted peers in one forward (batch_peers: true) a launch still repeats bit
for bit, and process counts agree to float rounding."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import launch
from launch import assert_close_runs, assert_identical_runs, toy_args

ROUNDS = 100
CONTRACT = (f"rounds={ROUNDS}", "peers=8", "threads=1", "checkpoint_every=10", "train.local_steps=2",
            "train.optimizer=adamw", "train.lr=0.01", "data.train_samples=1600", "data.test_samples=400",
            "comm.timeout_s=60", "train.batch_peers=false")
BATCHED_ROUNDS = 20
BATCHED = (*(a for a in CONTRACT if not a.startswith(("rounds=", "train.batch_peers="))), f"rounds={BATCHED_ROUNDS}",
           "train.batch_peers=true")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run: what every other launch must reproduce."""
    out = tmp_path_factory.mktemp("contract") / "reference"
    result = launch.run(toy_args(out, *CONTRACT), hash_seed=1)
    assert result.returncode == 0, result.stderr
    assert len(launch.comparable_metrics(out)) == ROUNDS
    return out


def test_a_second_launch_repeats_the_reference_bit_for_bit(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "launch"  # with its own string-hash seed, as a separate shell draws
    result = launch.run(toy_args(out, *CONTRACT), hash_seed=110)
    assert result.returncode == 0, result.stderr
    assert_identical_runs(reference, out)


def test_two_torchrun_agents_as_two_nodes_match_one_process(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "two_nodes"
    for code, output in launch.two_nodes(toy_args(out, *CONTRACT), tmp_path):
        assert code == 0, output[-3000:]
    assert_identical_runs(reference, out)


def test_a_run_killed_twice_and_resumed_on_other_process_counts_ends_identical(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    for nproc, kill_at in ((2, 37), (4, 71)):  # killed mid-round, between checkpoints
        process = launch.start(toy_args(out, *CONTRACT), nproc=nproc, log=tmp_path / f"p{nproc}.log")
        launch.wait_for_round(process, out, kill_at)
        launch.kill_group(process)
    finished = launch.run(toy_args(out, *CONTRACT), nproc=1)  # resume: auto is the default
    assert finished.returncode == 0, finished.stderr
    assert "round  71/100" in finished.stdout and "round  70/100" not in finished.stdout  # from the round-70 checkpoint
    assert_identical_runs(reference, out)


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_identical(reference: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "restarted", tmp_path / "torchrun.log"
    # overwrite applies to the launch, not to each restart: the new workers still go on from the checkpoint
    agent = launch.start(toy_args(out, *CONTRACT, "overwrite=true"), nproc=2,
                         torchrun=["--standalone", "--max-restarts=1", launch.SLOW_MONITOR], log=log)
    launch.wait_for_round(agent, out, 45)
    workers = launch.workers_of(agent)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    assert agent.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "process 1 (peers 4-7)" in text  # the survivor named the dead worker before the restart
    assert text.count("round  41/100") == 2 and text.count("round   1/100") == 1  # went on from round 40
    assert_identical_runs(reference, out)


def test_batched_peers_repeat_bit_for_bit_and_agree_across_process_counts(tmp_path: Path) -> None:
    """Hosting other peers beside a peer changes the shapes its matmuls run in, so only float
    rounding may differ across process counts: 1e-5 relative after 20 rounds."""
    outs = {}
    for name, nproc in (("first", 1), ("again", 1), ("two", 2)):
        outs[name] = tmp_path / name
        result = launch.run(toy_args(outs[name], *BATCHED), nproc=nproc, hash_seed=7 + nproc + len(outs))
        assert result.returncode == 0, result.stderr
    assert_identical_runs(outs["first"], outs["again"])
    assert_close_runs(outs["first"], outs["two"], rtol=1e-5)
