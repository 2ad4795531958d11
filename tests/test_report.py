"""The report command on real runs: a table row per group of runs, plots, and clear errors."""

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
    rows = [line for line in table.splitlines() if line.startswith("| topology=")]
    assert len(rows) == 2
    assert "| topology=complete | complete | fedrot | 1 | 1.0000 |" in table  # complete graph: spectral gap 1
    for plot in ("accuracy.png", "consensus.png", "accuracy_vs_gap.png", "accuracy_vs_bytes.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == PNG_MAGIC
    assert "summary" not in capsys.readouterr().err


def test_a_report_of_runs_at_exact_consensus_has_no_consensus_plot_and_says_why(tmp_path: Path) -> None:
    """Server mode keeps every peer at the hub's model: a log plot of zeros has nothing to show."""
    runs = []
    for method in ("fedit", "fedrot"):
        out = tmp_path / method
        config = load_config(TOY, ["topology=server", f"method={method}", "rounds=2", "train.local_steps=1", f"out={out}"])
        Experiment(config, init_runtime()).run()
        runs.append(str(out))
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "summary.md").read_text()
    assert "No consensus plot: every run is at exact consensus" in text and "consensus.png" not in text
    assert not (tmp_path / "report" / "consensus.png").exists()
    assert (tmp_path / "report" / "accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_report_on_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err


def test_repeats_of_one_run_form_one_group_and_damage_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = []
    for group in ("a", "b"):
        out = tmp_path / group / "seed0"
        config = load_config(TOY, ["rounds=1", "train.local_steps=1", f"out={out}"])
        Experiment(config, init_runtime()).run()
        runs.append(str(out))
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "summary.md").read_text()
    assert "| runs | ring | fedrot | 2 |" in table and " +/- 0.0000 |" in table  # the same bits twice
    metrics = Path(runs[1]) / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 1, "mean_acc\n')
    capsys.readouterr()
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 2
    assert f"{metrics} line 2 is not valid JSON" in capsys.readouterr().err
