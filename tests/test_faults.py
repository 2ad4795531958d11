"""Faulty neighbours on real launches: killed, stopped, launched with other settings, or sending bad
payloads (the fault drill), each ending in one line that names it, or, by policy, dropped."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

import launch
from launch import toy_args

SHORT = ("peers=8", "threads=1", "train.local_steps=2", "data.train_samples=1600", "data.test_samples=400")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("p2p-fedrot:")]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_or_stopped_neighbour_is_named_in_one_line(tmp_path: Path, how: str) -> None:
    """Two torchrun agents as two nodes: the second node's worker dies or stops; the first names it."""
    out, logs = tmp_path / "run", [tmp_path / "node0.log", tmp_path / "node1.log"]
    # a dead peer closes its connections: it must be named well before a deadline far enough away that
    # a loaded machine cannot blur the two; a stopped one is only seen at the deadline
    deadline = 20 if how == "killed" else 6
    agents = launch.start_two_nodes(toy_args(out, *SHORT, "rounds=400", f"comm.timeout_s={deadline}"), 1, logs)
    launch.wait_for_round(agents[0], out, 5)
    (victim,) = launch.workers_of(agents[1])
    os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    struck = time.monotonic()
    try:
        agents[0].wait(timeout=60)
    finally:
        for agent in agents:
            launch.kill_group(agent)
    noticed = time.monotonic() - struck
    text = logs[0].read_text()
    (line,) = error_lines(text)
    assert line.startswith("p2p-fedrot: peer failure: ") and "process 1 (peers 4-7)" in line, line
    assert "p2p_fedrot/" not in text  # no traceback through this package (torchrun reports its child's exit)
    if how == "killed":
        assert "killed, crashed or exited" in line or "connection closed" in line, line
        assert noticed < deadline / 2, noticed  # from the closed connection, not the deadline
    else:
        assert "stopped or stuck" in line or "no complete message within 6 s" in line, line
        assert 5 < noticed < 30, noticed


@pytest.mark.slow
def test_a_process_launched_with_other_settings_stops_every_process_at_start_up(tmp_path: Path) -> None:
    """Two torchrun agents (two nodes) whose commands differ in eval.every: both stop before round 1."""
    common = toy_args(tmp_path / "run", *SHORT, "rounds=3", "comm.timeout_s=60")
    start = time.monotonic()
    agents = launch.two_nodes([common, [*common, "--set", "eval.every=2"]], tmp_path, per_node=1)
    assert time.monotonic() - start < 50  # well before the 60 s timeout
    for code, output in agents:
        assert code != 0
        (line,) = error_lines(output)
        assert re.search(r"process 1 \(peers 4-7\) disagrees with process 0 on the configuration and package "
                         r"versions: eval\.every: '2' there, '1' on process 0", line), line
        assert "round   1/3" not in output


def drill(out: Path, kind: str, policy: str, nproc: int = 1) -> tuple[int, str]:
    fault = f"comm.inject_fault={{peer: 3, round: 2, kind: {kind}}}"
    result = launch.run(toy_args(out, *SHORT, "rounds=4", fault, f"comm.on_bad_payload={policy}"), nproc=nproc)
    return result.returncode, result.stdout + result.stderr


REASONS = {"nan": "NaN", "inf": "infinite values", "scale": "times the receiver's own", "truncate": "truncated"}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_bad_payload_stops_the_run_naming_its_sender(tmp_path: Path, kind: str) -> None:
    code, text = drill(tmp_path, kind, "fail")
    assert code == 1
    (line,) = error_lines(text)
    assert line.startswith("p2p-fedrot: peer failure: round 2 step 0: peer 3 on process 0 (peers 0-7) sent peer 2 "
                           "a bad payload: "), line
    assert REASONS[kind] in line and "comm.on_bad_payload: drop" in line, line
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The drill's run without a fault: its metrics, which every dropped-payload case is compared with."""
    out = tmp_path_factory.mktemp("clean")
    result = launch.run(toy_args(out, *SHORT, "rounds=4"))
    assert result.returncode == 0, result.stderr
    return launch.comparable_metrics(out)


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_dropped_payload_is_recorded_and_the_neighbours_go_on_without_it(tmp_path: Path, clean: list[dict],
                                                                          kind: str) -> None:
    code, text = drill(tmp_path / "drill", kind, "drop")
    assert code == 0, text
    drilled, reference = launch.comparable_metrics(tmp_path / "drill"), clean
    assert [r["dropped"] for r in drilled[:2]] == [[], []]
    assert [(d["round"], d["sender"], d["receiver"]) for d in drilled[2]["dropped"]] == [(2, 3, 2), (2, 3, 4)]
    assert REASONS[kind] in drilled[2]["dropped"][0]["reason"]
    assert drilled[:2] == reference[:2]  # nothing changes before the fault
    assert drilled[2]["accuracy"] != reference[2]["accuracy"]
    assert all(all(a == a for a in r["accuracy"]) for r in drilled)  # no NaN reached any peer


def test_clients_that_refuse_a_bad_hub_keep_their_own_values(tmp_path: Path) -> None:
    fault = "comm.inject_fault={peer: 0, round: 1, kind: nan}"
    result = launch.run(toy_args(tmp_path, *SHORT, "peers=5", "topology=server", "rounds=3", fault,
                                 "comm.on_bad_payload=drop"))
    assert result.returncode == 0, result.stderr
    record = launch.comparable_metrics(tmp_path)[1]
    assert [(d["sender"], d["receiver"]) for d in record["dropped"]] == [(0, c) for c in range(1, 5)]
    assert all(a == a for a in record["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "drop"])
def test_a_truncated_message_across_processes_is_caught(tmp_path: Path, policy: str) -> None:
    """Peer 3 borders process 1 (peer 4): the cut payload travels in a framed message over Gloo."""
    code, text = drill(tmp_path, "truncate", policy, nproc=2)
    if policy == "fail":
        assert code != 0
        assert any("peer 3 on process 0 (peers 0-3) sent peer 4 a bad payload" in line for line in error_lines(text))
    else:
        assert code == 0, text
        record = launch.comparable_metrics(tmp_path)[2]
        assert [(d["sender"], d["receiver"]) for d in record["dropped"]] == [(3, 2), (3, 4)]


def test_absent_peers_are_listed_and_processes_agree_on_them(tmp_path: Path) -> None:
    common = (*SHORT, "rounds=6", "participation=0.5", "seed=3")
    one = launch.run(toy_args(tmp_path / "one", *common))
    assert one.returncode == 0, one.stderr
    records = launch.comparable_metrics(tmp_path / "one")
    absent = [r["absent"] for r in records]
    assert all(len(a) < 8 for a in absent) and sum(map(len, absent)) > 0, absent
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["bytes_sent_total"] < 6 * 16 * summary["payload_bytes"]  # absent peers send nothing
    two = launch.run(toy_args(tmp_path / "two", *common), nproc=2)
    assert two.returncode == 0, two.stderr
    launch.assert_identical_runs(tmp_path / "one", tmp_path / "two")
