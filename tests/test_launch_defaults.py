"""Defaults a launch derives from where it runs: the threads of a process, the process group's timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import ROOT, TOY, environment
from p2p_fedrot.comm.runtime import process_group_timeout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to restrict a run to one")
def test_a_run_limited_to_one_cpu_uses_one_thread_whatever_the_machine_has(tmp_path: Path) -> None:
    """taskset, cgroups and batch schedulers give a process fewer CPUs than os.cpu_count() counts: one
    torch thread per counted core would then oversubscribe the CPUs it may really use."""
    first = min(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-m", "p2p_fedrot", "run", TOY, "--set", f"out={tmp_path}",
                           "--set", "rounds=1", "--set", "train.local_steps=1"],
                          cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, {first}))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["threads"] == 1


def test_nccl_s_watchdog_waits_longer_than_the_message_deadline() -> None:
    """NCCL's watchdog kills the process when the group's timeout expires: it must come after the
    deadline that names the silent peer. Gloo's timeout raises an ordinary error and stays the deadline."""
    assert process_group_timeout("nccl", 30).total_seconds() > 30
    assert process_group_timeout("gloo", 30).total_seconds() == 30
