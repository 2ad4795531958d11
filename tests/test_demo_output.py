"""The demo prints what a person wants to read: its set-up steps, its rounds and their long phases,
and where the report is; no third-party warnings or progress bars."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the demo's model, data and method at a size that runs in well under a minute on 2 cores
REDUCED = ["peers=4", "rounds=1", "data.train_samples=200", "data.min_samples=5", "train.local_steps=2"]
PROGRESS_BAR = re.compile(r"%\||[\u2580-\u259f]")  # tqdm's "42%|" and the blocks it draws bars with
SET_UP = ["set-up: already done", "run: configs/demo.yaml on 2 processes", "set-up: loading the tokenizer of",
          "set-up: reading packaged:bbc_news", "set-up: tokenising 200 training and 200 test texts",
          "set-up: loading packaged:minilm"]


@pytest.mark.slow
def test_the_demo_prints_its_own_progress_and_no_third_party_noise(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # as in a fresh shell: the demo itself must keep torchrun quiet
    settings = [arg for setting in [*REDUCED, f"out={out}"] for arg in ("--set", setting)]
    result = subprocess.run(["bash", "scripts/demo.sh", *settings], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)
    text = result.stdout
    assert result.returncode == 0, text[-3000:]
    lines = text.splitlines()
    noise = [line for line in lines if "Warning" in line or "warning:" in line.lower() or PROGRESS_BAR.search(line)]
    assert not noise, text
    for start in SET_UP:
        assert sum(line.startswith(start) for line in lines) == 1, (start, text)  # process 0 alone tells
    for phase in ("trained", "evaluated"):
        assert any(re.fullmatch(rf"round 1/1: process 0 {phase} 2 peers in [\d.]+ s", line) for line in lines), text
    assert any(line.startswith("round   1/1 | acc mean") for line in lines), text
    assert f"report: {out}/report/summary.md" in lines and f"plot: {out}/report/accuracy.png" in lines, text
    assert any(line.startswith("made by: p2p-fedrot report ") for line in lines), text
    assert lines[-1] == f"metrics: {out}/metrics.jsonl", text
    assert (out / "report" / "summary.md").is_file()
