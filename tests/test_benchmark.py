"""The benchmark script runs, and its byte counts show what one message per process pair saves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_benchmark_prints_side_by_side_figures() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARK), "--only", "align", "--only", "exchange", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"per-module / batched +[\d.]+x", done.stdout)) == 2, done.stdout
    sent = {name: (float(ours), float(naive)) for name, ours, naive in
            re.findall(r"^  (\w+) +one per pair .*?([\d.]+) MB out of process 0 \| one per route .*?([\d.]+) MB",
                       done.stdout, re.MULTILINE)}
    assert set(sent) == {"ring", "torus", "exponential", "complete"}, done.stdout
    assert sent["ring"][0] == sent["ring"][1]  # no ring payload is needed twice by one process
    assert sent["complete"][0] * 7 < sent["complete"][1]  # 8 remote peers need each payload: sent once, not 8 times


def test_scale_benchmark_times_whole_runs_in_both_modes(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    rows = [benchmark._scale_run("toy", 16, batched, str(tmp_path / f"batched_{batched}")) for batched in (True, False)]
    for row in rows:
        assert row["command_s"] > row["round_s"] > 0 and row["peak_mb"] > 50, row
    benchmark._plot_scale(rows, str(tmp_path / "scale.png"))
    assert (tmp_path / "scale.png").stat().st_size > 10_000
