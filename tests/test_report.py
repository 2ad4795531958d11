"""The report command: a table row per run and two PNG plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p_fedrot.cli import main
from p2p_fedrot.config import load_config
from p2p_fedrot.runner import Experiment
from p2p_fedrot.transport import init_runtime

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
