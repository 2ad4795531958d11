"""A study's findings in numbers (gap order, paired method differences, consensus contraction), and
every report stamped with the command and the code that made it; on runs with known numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from p2p_fedrot.cli import main
from p2p_fedrot.study.findings import consensus_contraction, gap_order, paired_differences
from p2p_fedrot.study.groups import group_runs, group_stats, load_run

GAPS = {"ring": 0.05, "torus": 0.4, "complete": 1.0}
CODE = {"version": "0.1.0", "commit": "a" * 40, "modified": False}


def finished_run(folder: Path, method: str, topology: str, seed: int, accuracy: float,
                 consensus: list[float] | None = None, code: dict | None = CODE) -> str:
    """A run folder written by hand, with known final numbers; consensus per evaluated round 4, 8, ..."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "out": str(folder), "method": method, "topology": topology, "peers": 4, "rounds": 20}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    consensus = consensus or [0.1] * 5
    records = [{"round": 4 * k + 3, "mean_accuracy": accuracy, "consensus_distance_rel": value}
               for k, value in enumerate(consensus)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"method": method, "topology": topology, "final_mean_accuracy": accuracy,
               "final_min_accuracy": accuracy - 0.1 * seed, "bytes_sent_total": 1_000_000, "wall_time_s": 1.0,
               **({"code": code} if code else {})}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "topology.json").write_text(json.dumps({"spectral_gap": GAPS[topology]}))
    return str(folder)


def grouped(folders: list[str]):
    groups = group_runs([load_run(f) for f in folders])
    return groups, [group_stats(g) for g in groups]


def test_methods_are_compared_seed_by_seed_on_the_same_graph(tmp_path: Path) -> None:
    accuracies = {"fedit": [0.50, 0.60, 0.70], "fedrot": [0.52, 0.59, 0.75]}
    folders = [finished_run(tmp_path / method / f"seed{seed}", method, "ring", seed, value)
               for method, values in accuracies.items() for seed, value in enumerate(values)]
    folders.append(finished_run(tmp_path / "alone" / "seed0", "fedrot", "torus", 0, 0.9))  # no fedit to pair with
    groups, _ = grouped(folders)
    (paired,) = paired_differences(groups, "fedit")
    differences = [b - a for a, b in zip(*accuracies.values())]
    assert paired["topology"] == "ring" and paired["seeds"] == [0, 1, 2]
    mean = paired["final_mean_accuracy"]
    assert mean["mean"] == pytest.approx(statistics.fmean(differences), abs=1e-15)
    assert mean["std"] == pytest.approx(statistics.stdev(differences), abs=1e-15)
    assert (mean["above"], mean["below"]) == (2, 1)
    assert paired["final_min_accuracy"]["mean"] == pytest.approx(statistics.fmean(differences), abs=1e-15)


def test_the_order_of_the_gaps_is_compared_with_the_order_of_the_accuracies(tmp_path: Path) -> None:
    ordered = {"ring": 0.6, "torus": 0.7, "complete": 0.8}
    swapped = {"ring": 0.7, "torus": 0.6, "complete": 0.8}
    folders = [finished_run(tmp_path / f"{method}-{topology}", method, topology, 0, value)
               for method, values in (("fedit", ordered), ("fedrot", swapped)) for topology, value in values.items()]
    _, stats = grouped(folders)
    fedit, fedrot = gap_order(stats)
    assert fedit["spearman"] == pytest.approx(1.0) and fedit["by_gap"] == fedit["by_accuracy"]
    assert fedit["p_value"] == pytest.approx(2 / 6)  # of the 6 orders of three graphs, 2 are as strong (+-1)
    assert fedrot["spearman"] == pytest.approx(0.5)  # one swap among three: 1 - 6 * 2 / (3 * 8)
    assert fedrot["p_value"] == pytest.approx(1.0)  # every order of three has |rho| >= 0.5
    assert [label.split(", ")[0] for label in fedrot["by_accuracy"]] == ["topology=torus", "topology=ring",
                                                                         "topology=complete"]


def test_measured_consensus_decay_is_set_beside_mixing_alone(tmp_path: Path) -> None:
    factor = 0.9  # per round: the distance at rounds 4, 8, ..., 20 falls by factor^4 between evaluations
    series = [0.2 * factor ** (4 * k) for k in range(5)]
    groups, _ = grouped([finished_run(tmp_path / "ring", "fedit", "ring", 0, 0.6, consensus=series)])
    (found,) = consensus_contraction(groups)
    assert found["rounds"] == [12, 20]  # the second half of the evaluated rounds (1-based)
    assert found["measured_per_round"] == pytest.approx(factor, rel=1e-12)
    assert found["mixing_alone_per_round"] == pytest.approx((1 - GAPS["ring"]) ** 2)


def test_a_report_names_its_command_and_every_code_version_and_the_terminal_gets_paths(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = {"version": "0.1.0", "commit": "b" * 40, "modified": True}
    folders = [finished_run(tmp_path / "fedit", "fedit", "ring", 0, 0.6),
               finished_run(tmp_path / "fedrot", "fedrot", "ring", 0, 0.6, code=other),
               finished_run(tmp_path / "old", "fedrot", "torus", 0, 0.6, code=None)]
    out = tmp_path / "report"
    assert main(["report", *folders, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    command = f"p2p-fedrot report {' '.join(folders)} --out {out}"
    made_by = (f"made by: {command}\ncode: code version not recorded; p2p_fedrot 0.1.0 at commit aaaaaaaaaaaa; "
               "p2p_fedrot 0.1.0 at commit bbbbbbbbbbbb (with local changes)")
    assert made_by in printed
    assert f"plot: {out / 'accuracy_vs_gap.png'}" in printed and "![" not in printed
    summary = (out / "summary.md").read_text()
    assert made_by.replace("\n", "  \n") in summary
    assert json.loads((out / "summary.json").read_text())["made_by"]["command"] == command


@pytest.mark.parametrize("command", ["report", "sweep"])
def test_an_out_under_a_file_is_named_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          command: str) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder must go")
    run = finished_run(tmp_path / "run", "fedit", "ring", 0, 0.6)
    source = [run] if command == "report" else [str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"),
                                                "--seeds", "0"]
    assert main([command, *source, "--out", str(blocker / "report")]) == 2
    assert capsys.readouterr().err == (f"p2p-fedrot: error: --out={blocker / 'report'} cannot be a folder: {blocker} "
                                       "is a file; move that file away, or set --out to another path\n")
