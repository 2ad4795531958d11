"""Launch real runs of the CLI (alone, under torchrun, or as two torchrun agents acting as two
nodes), interrupt them from outside, and compare their outputs bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from multiproc import LAUNCH_VARIABLES, free_port, shared_fork_server
from p2p_fedrot.study.sweep import ForkedRun

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
TIMING_KEYS = ("time_s", "seconds")  # the only fields of metrics.jsonl allowed to differ between runs
# torchrun checks its workers every 0.1 s by default, and when one dies it stops the others at the next
# check: it may stop a survivor before the survivor has seen its neighbour go and named it. Tests that
# kill a worker give the survivors 2 s, as docs/reproducibility.md advises.
SLOW_MONITOR = "--monitor-interval=2"


def environment(hash_seed: int | str = "random", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean child environment (no launch secret unless ``extra`` sets one); each launch gets its own
    string-hash seed, as separate shells do."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(hash_seed)}
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)
    return {**env, **(extra or {})}


def command(args: list[str], nproc: int = 1, torchrun: list[str] | None = None) -> list[str]:
    if nproc == 1 and torchrun is None:
        return [sys.executable, "-m", "p2p_fedrot", *args]
    launcher = torchrun if torchrun is not None else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
            "-m", "p2p_fedrot", *args]


def start(args: list[str], nproc: int = 1, torchrun: list[str] | None = None, hash_seed: int | str = "random",
          log: Path | None = None, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start a launch in its own process group (so that it can be killed whole) writing to ``log``;
    ``env`` adds to its environment."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(args, nproc, torchrun), cwd=ROOT, env=environment(hash_seed, env), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)


def run(args: list[str], nproc: int = 1, timeout: float = 300, torchrun: list[str] | None = None,
        hash_seed: int | str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a launch to its end. A single process that asks for no string-hash seed and no environment
    of its own is forked, as sweeps fork their runs, from a server that has imported the package:
    a new process all the same, without the seconds a new Python spends importing torch and peft."""
    server = shared_fork_server() if nproc == 1 and torchrun is None and hash_seed is None and env is None else None
    if server is not None:
        return run_forked(server, args, timeout)
    return subprocess.run(command(args, nproc, torchrun), cwd=ROOT, env=environment("random" if hash_seed is None else hash_seed, env),
                          capture_output=True, text=True, timeout=timeout)


def run_forked(server, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as folder:
        output, errors = Path(folder) / "stdout", Path(folder) / "stderr"
        process = ForkedRun(server, args, output, errors)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            raise
        return subprocess.CompletedProcess(args, code, output.read_text(), errors.read_text())


def toy_args(out: Path, *overrides: str) -> list[str]:
    return ["run", TOY, "--set", f"out={out}", *[x for o in overrides for x in ("--set", o)]]


def start_two_nodes(args: list[str] | list[list[str]], per_node: int, logs: list[Path],
                    envs: list[Mapping[str, str]] | None = None) -> list[subprocess.Popen]:
    """The same command (or one per node) under two torchrun agents that meet at a c10d rendezvous
    on loopback, as two machines would; each agent starts ``per_node`` workers, with ``envs[k]``
    added to node k's environment."""
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=p2p-test",
                SLOW_MONITOR]
    per_agent = args if isinstance(args[0], list) else [args, args]
    envs = envs or [{}, {}]
    return [start(per_agent[k], per_node, launcher, log=logs[k], env=envs[k]) for k in range(2)]


def two_nodes(args: list[str] | list[list[str]], tmp_path: Path, per_node: int = 2,
              timeout: float = 300, envs: list[Mapping[str, str]] | None = None) -> list[tuple[int, str]]:
    """Run :func:`start_two_nodes` to the end; (exit code, output) of each agent."""
    logs = [tmp_path / f"node{k}.log" for k in range(2)]
    agents = start_two_nodes(args, per_node, logs, envs)
    return [(agent.wait(timeout=timeout), log.read_text()) for agent, log in zip(agents, logs)]


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for_round(process: subprocess.Popen, out: Path, rounds: int, timeout: float = 180) -> None:
    """Block until ``out`` has metrics for ``rounds`` rounds (the launch must still be running)."""
    deadline = time.monotonic() + timeout
    while metric_lines(out) < rounds:
        if process.poll() is not None:
            raise AssertionError(f"the launch ended (exit {process.returncode}) before round {rounds}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no round {rounds} within {timeout} s")
        time.sleep(0.02)


def workers_of(process: subprocess.Popen) -> list[int]:
    """The worker processes a torchrun agent started (its children running p2p_fedrot)."""
    found = subprocess.run(["pgrep", "-P", str(process.pid), "-f", "p2p_fedrot"], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


def descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for child in map(int, found) for d in (child, *descendants(child))]


def kill_group(process: subprocess.Popen) -> None:
    """Kill a launch and every process it started, at once (torchrun gives its workers sessions of
    their own, so killing its process group alone would leave them running)."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def comparable_metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in records]


def output_files(out: Path) -> dict[str, bytes]:
    """Every adapter and checkpoint file of a run, by relative path, as bytes."""
    files = {}
    for folder in ("adapters", "checkpoint"):
        for path in sorted((out / folder).rglob("*.safetensors")):
            files[str(path.relative_to(out))] = path.read_bytes()
        for path in sorted((out / folder).rglob("adapter_config.json")):
            files[str(path.relative_to(out))] = path.read_bytes()
    return files


def assert_close_runs(reference: Path, other: Path, rtol: float) -> None:
    """Every round's losses and consensus distance, and every adapter tensor, equal to ``rtol``
    (relative to the largest magnitude of each tensor or list)."""
    expected, got = comparable_metrics(reference), comparable_metrics(other)
    assert [r["round"] for r in got] == [r["round"] for r in expected]
    for want, have in zip(expected, got):
        for key in ("loss", "local_loss", "consensus_distance", "aggregation_error"):
            a, b = torch.tensor(want[key], dtype=torch.float64), torch.tensor(have[key], dtype=torch.float64)
            assert (a - b).abs().max() <= rtol * a.abs().max(), f"round {want['round']}: {key} {want[key]} vs {have[key]}"
    for folder in sorted((reference / "adapters").iterdir()):
        mine = load_file(folder / "adapter_model.safetensors")
        theirs = load_file(other / "adapters" / folder.name / "adapter_model.safetensors")
        for key, value in mine.items():
            assert (value - theirs[key]).abs().max() <= rtol * value.abs().max(), f"{folder.name} {key}"


def assert_identical_runs(reference: Path, other: Path) -> None:
    """Every round's metrics (timing aside), every adapter and every checkpoint tensor, bit for bit."""
    expected, got = comparable_metrics(reference), comparable_metrics(other)
    assert [r["round"] for r in got] == [r["round"] for r in expected]
    for want, have in zip(expected, got):
        assert have == want, f"round {want['round']} differs: " + ", ".join(
            k for k in want if have.get(k) != want[k])
    first, second = output_files(reference), output_files(other)
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"files differ: {differing[:5]}"
