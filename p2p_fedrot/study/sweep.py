"""Seeded grids of runs: every combination of a few settings (a cell), each over several seeds.

Each run is a separate ``p2p-fedrot run`` process (torchrun when ``nproc`` > 1) writing to
``OUT/<cell>/seed<k>``, so runs are independent, can go in parallel, and a sweep that was stopped
goes on where it was: finished runs are skipped, a run cut off mid-way resumes from its checkpoint.
Single-process runs are forked from a server process that has imported torch, transformers and peft
once: importing them takes seconds, often longer than a small run itself.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..comm.runtime import usable_cores
from ..config import RunConfig, load_config
from ..errors import ConfigError
from ..graph.topologies import build_topology
from ..io import read_json
from ..methods import available_methods
from ..run.checkpoint import describe_differences
from ..run.outputs import CONFIG, SUMMARY, require_folder_path

LOGS = "logs"  # OUT/logs/<cell>_seed<k>.log: each run's own output
PRELOADED = ["p2p_fedrot.cli", "p2p_fedrot.run.loop"]  # what a forked run finds imported


@dataclass(frozen=True)
class PlannedRun:
    cell: str  # folder name of the cell, e.g. topology-ring_method-fedit
    seed: int
    folder: Path
    overrides: tuple[str, ...]  # --set items of this run, after the sweep's own
    config: RunConfig

    @property
    def label(self) -> str:
        return f"{self.cell}/seed{self.seed}"


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` -> (KEY, [V1, V2, ...]); values are YAML, so a mapping such as
    ``{name: erdos_renyi, p: 0.2}`` is one value and its comma does not split it."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        raise ConfigError(f"--grid {item!r} must look like KEY=V1,V2 (e.g. --grid topology=ring,torus)")
    try:
        values = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"--grid {item!r}: the values are not a valid YAML list ({reason}); quote the "
                          "argument and write mappings like {name: erdos_renyi, p: 0.2}") from None
    if len(values) != len({repr(v) for v in values}):
        raise ConfigError(f"--grid {item!r} lists a value twice")
    return key, values


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} lists a seed twice")
    return seeds


def value_name(value: Any) -> str:
    """A value as a folder-name fragment: ring, 0.1, erdos_renyi-p0.2."""
    if isinstance(value, dict):
        value = "-".join([str(value.get("name", ""))] + [f"{k}{v}" for k, v in value.items() if k != "name"])
    elif isinstance(value, (list, tuple)):
        value = "+".join(map(str, value))
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "empty"


def as_yaml(value: Any) -> str:
    """One value as the YAML text of a --set (ring, 0.2, {name: erdos_renyi, p: 0.2})."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def cell_name(assignments: Sequence[tuple[str, Any]]) -> str:
    """topology-ring_method-fedit: each grid key (its last dotted part) and value."""
    return "_".join(f"{key.split('.')[-1]}-{value_name(value)}" for key, value in assignments) or "base"


def plan(config_file: str, grids: Sequence[tuple[str, list[Any]]], seeds: Sequence[int], out: Path,
         overrides: Sequence[str]) -> list[PlannedRun]:
    """Every (cell, seed) run, its config resolved and validated now, so a bad value fails before any run."""
    require_folder_path(out, "--out")
    keys = [key for key, _ in grids]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid names a key twice ({', '.join(keys)}); give each key once with all its values")
    for key in ("seed", "out"):
        if key in keys:
            raise ConfigError(f"--grid {key}=... is not a grid key: the sweep sets it "
                              f"({'use --seeds' if key == 'seed' else 'use --out'})")
    cells: dict[str, list[tuple[str, Any]]] = {}
    for values in itertools.product(*(values for _, values in grids)):
        assignments = list(zip(keys, values))
        cell = cell_name(assignments)
        if cell in cells:
            raise ConfigError(f"grid values {cells[cell]} and {assignments} give the same folder name {cell!r}; "
                              "give values that differ in letters or digits")
        cells[cell] = assignments
    runs = []
    for seed in seeds:  # seed by seed, so a sweep stopped early has covered every cell with its first seeds
        for cell, assignments in cells.items():
            grid_sets = [f"{key}={as_yaml(value)}" for key, value in assignments]
            folder = out / cell / f"seed{seed}"
            run_sets = (*overrides, *grid_sets, f"seed={seed}", f"out={folder}")
            try:
                config = load_config(config_file, run_sets)
                check_buildable(config)
            except ConfigError as exc:
                raise ConfigError(f"cell {cell} seed {seed}: {exc}") from None
            runs.append(PlannedRun(cell, seed, folder, run_sets, config))
    return runs


def check_buildable(config: RunConfig) -> None:
    """What a run would only find out after loading its model: an unknown method or a bad graph."""
    if config.method not in available_methods():
        raise ConfigError(f"unknown method {config.method!r}; available: {', '.join(available_methods())}")
    build_topology(config.topology, config.peers, config.seed, config.allow_disconnected)


def is_finished(run: PlannedRun) -> bool:
    """True when the run's folder holds this run finished: the same run by the rule a resume uses
    (checkpoint.describe_differences) and all its rounds; the summary is written last, so a run cut
    off mid-way has none."""
    summary, config = run.folder / SUMMARY, run.folder / CONFIG
    if not (summary.is_file() and config.is_file()):
        return False
    same_run = not describe_differences(yaml.safe_load(config.read_text()) or {}, run.config.to_dict())
    return same_run and read_json(summary).get("rounds") == run.config.rounds


def run_arguments(run: PlannedRun, config_file: str, threads: int | None) -> list[str]:
    """The run's ``p2p-fedrot`` arguments: ``run CONFIG --set ...``."""
    sets = [*run.overrides, *([f"threads={threads}"] if threads else [])]
    return ["run", config_file, *itertools.chain.from_iterable(("--set", s) for s in sets)]


def command(run: PlannedRun, config_file: str, nproc: int, threads: int | None) -> list[str]:
    """The run's command line: this Python's p2p_fedrot, under torchrun for several processes."""
    arguments = ["-m", "p2p_fedrot", *run_arguments(run, config_file, threads)]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *arguments]
    return [sys.executable, *arguments]


class ForkedRun:
    """A single-process run in a process forked from a server that has imported ``PRELOADED``;
    it answers like ``subprocess.Popen`` (pid, poll, returncode, terminate, wait). Its output goes
    to ``log``, its errors too unless ``errors`` names a file of their own."""

    def __init__(self, context: multiprocessing.context.ForkServerContext, arguments: list[str], log: Path,
                 errors: Path | None = None):
        self.arguments = arguments
        self.process = context.Process(target=_run_in_child, args=(arguments, str(log), errors and str(errors)),
                                       daemon=False)
        self.process.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(["p2p-fedrot", *self.arguments], timeout or 0)
        return self.process.exitcode


def _run_in_child(arguments: list[str], log: str, errors: str | None = None) -> None:
    """A forked run: its output to its log (its errors to ``errors`` if given), line by line, then
    ``p2p-fedrot`` as in a fresh process."""
    for path, streams in ([(log, (1,)), (errors, (2,))] if errors else [(log, (1, 2))]):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for stream in streams:
            os.dup2(descriptor, stream)
        os.close(descriptor)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = ["p2p-fedrot", *arguments]
    runpy.run_module("p2p_fedrot", run_name="__main__", alter_sys=True)  # python -m p2p_fedrot, which exits


def start_run(run: PlannedRun, config_file: str, nproc: int, threads: int | None, log: Path, env: dict,
              server: multiprocessing.context.ForkServerContext | None):
    """Launch one run: forked from ``server`` when there is one (single-process runs), else as a new command."""
    if server is not None:
        return ForkedRun(server, run_arguments(run, config_file, threads), log)
    with open(log, "w") as output:
        return subprocess.Popen(command(run, config_file, nproc, threads), stdout=output, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)


def fork_server() -> multiprocessing.context.ForkServerContext | None:
    """A context whose processes fork from one server that imported ``PRELOADED``; None where the
    platform has no fork server (each run then starts a new Python)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # as p2p-fedrot sets it; read when the server imports torch
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    return context


def default_threads(runs: Sequence[PlannedRun], jobs: int, nproc: int) -> int | None:
    """Split the cores between the runs that go at once, unless the config sets threads itself."""
    if any(run.config.threads for run in runs):
        return None
    return max(1, usable_cores() // (jobs * nproc))


def run_sweep(runs: Sequence[PlannedRun], config_file: str, out: Path, jobs: int = 1, nproc: int = 1,
              echo=print) -> list[PlannedRun]:
    """Run every unfinished run, ``jobs`` at a time; returns the runs that failed (their logs say why)."""
    if jobs < 1 or nproc < 1:
        raise ConfigError(f"--jobs ({jobs}) and --nproc ({nproc}) must be at least 1")
    todo = [run for run in runs if not is_finished(run)]
    echo(f"sweep: {len(runs)} runs in {out} ({len(runs) - len(todo)} already finished, {len(todo)} to run, "
         f"{jobs} at a time)")
    threads = default_threads(todo, jobs, nproc)
    (out / LOGS).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = fork_server() if nproc == 1 and todo else None
    waiting, running, failed = list(todo), {}, []
    previous = signal.signal(signal.SIGTERM, _stop)  # a sweep told to stop takes its runs in flight with it
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                run = waiting.pop(0)
                log = out / LOGS / f"{run.cell}_seed{run.seed}.log"
                running[start_run(run, config_file, nproc, threads, log, env, server)] = (run, log, time.perf_counter())
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                run, log, started = running.pop(process)
                if process.returncode != 0:
                    failed.append(run)
                finished = len(todo) - len(waiting) - len(running)
                echo(f"[{finished}/{len(todo)}] {run.label}: {_outcome(run, process.returncode, log)} "
                     f"({time.perf_counter() - started:.0f} s)")
    finally:  # interrupted: stop the runs in flight (each resumes from its checkpoint next time)
        for process in running:
            process.terminate()
            process.wait()
        signal.signal(signal.SIGTERM, previous)  # as it was for the caller (run_sweep may be called from Python)
    return failed


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"sweep: stopped by signal {signum}; the same command goes on where it was")


def _outcome(run: PlannedRun, returncode: int, log: Path) -> str:
    if returncode != 0:
        return f"FAILED with exit code {returncode}; see {log}"
    accuracy = read_json(run.folder / SUMMARY).get("final_mean_accuracy")
    return f"final mean accuracy {'n/a' if accuracy is None else format(accuracy, '.4f')}"
