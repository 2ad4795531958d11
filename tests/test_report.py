"""The report command: a table row per run and two PNG plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p_fedrot.cli import main
from p2p_fedrot.config import load_config
from p2p_fedrot.runner import Experiment
from p2p_fedrot.runtime import init_runtime

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_compares_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = []
    for topology in ("ring", "complete"):
        out = tmp_path / topology
        config = load_config(TOY, [f"topology={topology}", "rounds=3", "train.local_steps=2", f"out={out}"])
        Experiment(config, init_runtime()).run()
        runs.append(str(out))
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ring") or line.startswith("| complete")]
    assert len(rows) == 2
    assert "| complete | complete | fedrot | 1.0000 |" in table  # complete graph: spectral gap 1
    for plot in ("accuracy.png", "consensus.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == PNG_MAGIC
    assert "summary" not in capsys.readouterr().err


def test_report_on_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err


def test_runs_with_the_same_folder_name_are_told_apart_and_damage_is_named(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    runs = []
    for group in ("a", "b"):
        out = tmp_path / group / "seed0"
        config = load_config(TOY, ["rounds=1", "train.local_steps=1", f"out={out}"])
        Experiment(config, init_runtime()).run()
        runs.append(str(out))
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "summary.md").read_text()
    assert f"| {runs[0]} |" in table and f"| {runs[1]} |" in table
    metrics = Path(runs[1]) / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 1, "mean_acc\n')
    capsys.readouterr()
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 2
    assert f"{metrics} line 2 is not valid JSON" in capsys.readouterr().err


def test_sweep_script_runs_one_value_each_and_reports_them(tmp_path: Path) -> None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts" / "sweep.sh"), str(TOY), "topology", "ring complete",
                           str(tmp_path), "--set", "rounds=1", "--set", "train.local_steps=1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "| ring | ring | fedrot |" in table and "| complete | complete | fedrot | 1.0000 |" in table
