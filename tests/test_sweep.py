"""Seeded sweeps: the grid, skipping finished runs after a kill, and the report's statistics over seeds."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from p2p_fedrot.cli import main
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.study.sweep import cell_name, parse_grid, parse_seeds, plan

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--set", "peers=4", "--set", "rounds=2", "--set", "train.local_steps=1", "--set", "data.train_samples=400",
         "--set", "data.test_samples=100", "--set", "data.min_samples=5"]


def test_grid_values_are_yaml_so_a_mapping_is_one_value() -> None:
    key, values = parse_grid("topology=ring,{name: erdos_renyi, p: 0.2},complete")
    assert key == "topology" and values == ["ring", {"name": "erdos_renyi", "p": 0.2}, "complete"]
    assert cell_name([("topology", values[1]), ("method_args.lam", 0.4)]) == "topology-erdos_renyi-p0.2_lam-0.4"
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("topology", "topology=", "=ring", "topology=ring,ring"):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("0,x")


def test_plan_is_the_cartesian_product_over_seeds_and_checks_every_config_first(tmp_path: Path) -> None:
    grids = [parse_grid("topology=ring,complete"), parse_grid("method=fedit,fedrot,decaf")]
    runs = plan(TOY, grids, [0, 1], tmp_path, ["rounds=2"])
    assert len(runs) == 12 and len({run.folder for run in runs}) == 12
    first = runs[0]
    assert first.folder == tmp_path / "topology-ring_method-fedit" / "seed0"
    assert (first.config.topology, first.config.method, first.config.seed, first.config.rounds) == ("ring", "fedit", 0, 2)
    with pytest.raises(ConfigError, match="cell topology-ring_method-nosuch seed 0"):
        plan(TOY, [parse_grid("topology=ring"), parse_grid("method=nosuch")], [0], tmp_path, [])
    with pytest.raises(ConfigError, match="use --seeds"):
        plan(TOY, [parse_grid("seed=1,2")], [0], tmp_path, [])


def sweep_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "p2p_fedrot", "sweep", TOY, "--grid", "topology=ring,complete", "--seeds", "0,1",
            "--out", str(out), *SMALL, *extra]


@pytest.mark.slow
def test_a_killed_sweep_runs_only_what_is_missing_and_reports_over_seeds(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """Killed from outside as a process; then run again (here, in this process) twice."""
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(sweep_command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    summaries: list[Path] = []
    while not summaries and time.monotonic() < deadline and first.poll() is None:
        summaries = list(out.glob("*/seed*/summary.json"))
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the run it was in, as a crash would
    first.wait()
    assert len(summaries) == 1, "the first run did not finish in time"
    finished = {path: path.stat().st_mtime_ns for path in out.glob("*/seed*/summary.json")}
    assert len(finished) < 4
    capsys.readouterr()
    assert main(sweep_command(out)[3:]) == 0
    again = capsys.readouterr().out
    assert f"({len(finished)} already finished, {4 - len(finished)} to run" in again
    for path, mtime in finished.items():  # never run again
        assert path.stat().st_mtime_ns == mtime
    assert len(list(out.glob("*/seed*/summary.json"))) == 4
    report = json.loads((out / "report" / "summary.json").read_text())
    assert [group["label"] for group in report["groups"]] == ["topology=complete", "topology=ring"] or \
        [group["label"] for group in report["groups"]] == ["topology=ring", "topology=complete"]
    assert all(group["seeds"] == [0, 1] or group["seeds"] == [1, 0] for group in report["groups"])
    for plot in ("accuracy", "accuracy_vs_gap", "accuracy_vs_bytes", "consensus"):
        assert (out / "report" / f"{plot}.png").read_bytes()[:8] == PNG_MAGIC
    assert f"report: {out / 'report' / 'summary.md'}" in again
    assert main(sweep_command(out)[3:]) == 0
    assert "(4 already finished, 0 to run" in capsys.readouterr().out


def fixture_run(folder: Path, method: str, seed: int, accuracy: float, consensus_rel: float, gap: float) -> None:
    """A finished run folder written by hand, with known final numbers."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "out": str(folder), "method": method, "topology": "ring", "peers": 4, "rounds": 2,
              "threads": 1, "train": {"lr": 0.1}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"round": r, "mean_accuracy": accuracy - 0.1 * (1 - r), "consensus_distance_rel": consensus_rel * (2 - r),
                "aggregation_error_rel": 0.01 * (seed + 1)} for r in range(2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"method": method, "topology": "ring", "final_mean_accuracy": accuracy, "final_min_accuracy": accuracy - 0.05,
               "bytes_sent_total": 2_000_000 * (seed + 1), "wall_time_s": 1.0 + seed}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "topology.json").write_text(json.dumps({"spectral_gap": gap}))


def test_report_mean_and_std_over_seeds_match_a_hand_computation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    accuracies = {"fedit": [0.50, 0.60, 0.70], "fedrot": [0.62, 0.66, 0.67]}
    folders = []
    for method, values in accuracies.items():
        for seed, accuracy in enumerate(values):
            folder = tmp_path / method / f"seed{seed}"
            fixture_run(folder, method, seed, accuracy, consensus_rel=0.1 * (seed + 1), gap=0.05)
            folders.append(str(folder))
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    groups = json.loads((tmp_path / "report" / "summary.json").read_text())["groups"]
    assert [g["label"] for g in groups] == ["method=fedit", "method=fedrot"]
    for group, values in zip(groups, accuracies.values()):
        stat = group["final_mean_accuracy"]
        assert stat["n"] == 3
        assert stat["mean"] == pytest.approx(sum(values) / 3, abs=1e-15)
        mean = sum(values) / 3
        assert stat["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5, abs=1e-15)
        assert group["consensus_distance_rel"]["mean"] == pytest.approx(0.2)  # last round: 0.1, 0.2, 0.3
        assert group["mb_sent"]["mean"] == pytest.approx(4.0) and group["mb_sent"]["std"] == pytest.approx(2.0)
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "| method=fedit | ring | fedit | 3 | 0.0500 | 0.6000 +/- 0.1000 | 0.5500 +/- 0.1000 |" in table
    assert f"{statistics.fmean(accuracies['fedrot']):.4f} +/- {statistics.stdev(accuracies['fedrot']):.4f}" in table
    for plot in ("accuracy", "accuracy_vs_gap", "accuracy_vs_bytes", "consensus", "aggregation_error_rel"):
        assert (tmp_path / "report" / f"{plot}.png").read_bytes()[:8] == PNG_MAGIC


def test_a_run_forked_by_a_sweep_equals_the_same_run_in_a_fresh_process(tmp_path: Path) -> None:
    """Sweeps fork single-process runs from a server that has imported torch and peft: the same bits."""
    out = tmp_path / "sweep"
    assert main(["sweep", TOY, "--seeds", "4", "--out", str(out), "--grid", "robust.rule=clip", *SMALL,
                 "--set", "rounds=6"]) == 0
    fresh = tmp_path / "fresh"
    sets = [*SMALL, "--set", "rounds=6", "--set", "robust.rule=clip", "--set", "seed=4", "--set", f"out={fresh}",
            "--set", f"threads={yaml.safe_load((out / 'rule-clip' / 'seed4' / 'config.yaml').read_text())['threads']}"]
    done = subprocess.run([sys.executable, "-m", "p2p_fedrot", "run", TOY, *sets], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    timing = ("time", "_s", "seconds")
    forked, direct = ([{k: v for k, v in json.loads(line).items() if not any(t in k for t in timing)}
                       for line in (folder / "metrics.jsonl").read_text().splitlines()]
                      for folder in (out / "rule-clip" / "seed4", fresh))
    assert forked == direct and len(forked) == 6
    adapters = list(fresh.glob("adapters/*/adapter_model.safetensors"))
    assert len(adapters) == 5  # four peers and their consensus
    for adapter in adapters:
        assert adapter.read_bytes() == (out / "rule-clip" / "seed4" / adapter.relative_to(fresh)).read_bytes()


@pytest.mark.slow
def test_a_sweep_launches_each_run_on_several_processes(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    assert main(["sweep", TOY, "--grid", "method=fedit", "--seeds", "3", "--nproc", "2", "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "method-fedit" / "seed3" / "summary.json").read_text())
    # the CPUs this process may use / (1 job x 2 processes)
    assert summary["processes"] == 2 and summary["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert yaml.safe_load((out / "method-fedit" / "seed3" / "config.yaml").read_text())["seed"] == 3


@pytest.mark.slow
def test_a_sweep_told_to_stop_stops_its_runs(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    sweep = subprocess.Popen(sweep_command(out, "--set", "rounds=400"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/seed*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.1)
    sweep.terminate()
    text, _ = sweep.communicate(timeout=60)
    assert sweep.returncode != 0 and "stopped by signal" in text
    assert not left_in_group(sweep.pid, within_s=10)  # no run, and no fork server, left behind


def left_in_group(group: int, within_s: float) -> list[str]:
    """The live processes of a process group, once it has had ``within_s`` to empty (the fork
    server leaves when its parent has gone; an exited process waiting to be reaped does not count)."""
    deadline = time.monotonic() + within_s
    while True:
        ps = subprocess.run(["ps", "-eo", "pgid=,stat=,args="], capture_output=True, text=True).stdout.splitlines()
        left = [line for line in ps if line.split()[0] == str(group) and not line.split()[1].startswith("Z")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
