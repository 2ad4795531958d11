"""The report command on real runs: a table row per group of runs, plots, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2p_fedrot.cli import main
from p2p_fedrot.config import load_config
from p2p_fedrot.study.report import group_runs, group_stats, load_run, per_round, predicted_decay, summary_table
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

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
    rows = [line for line in table.split("## Findings")[0].splitlines() if line.startswith("| topology=")]
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
    complete = metrics.read_text()
    metrics.write_text('{"round": 1, "mean_acc\n' + complete)
    capsys.readouterr()
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 2
    assert f"{metrics} line 1 is not valid JSON" in capsys.readouterr().err


def test_a_torn_last_metrics_line_is_ignored_and_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run killed while writing a record (after an earlier run of it had finished) leaves a torn
    last line: the report uses the complete lines and says so in one line."""
    out = tmp_path / "run"
    Experiment(load_config(TOY, ["rounds=2", "train.local_steps=1", f"out={out}"]), init_runtime()).run()
    assert main(["report", str(out), "--out", str(tmp_path / "whole")]) == 0
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 2, "mean_acc')
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "torn")]) == 0
    assert capsys.readouterr().err == (f"p2p-fedrot: note: ignored the torn last line of {metrics} (a write that a "
                                       "killed run did not finish); the report uses the complete lines before it\n")
    def findings(report: str) -> list[str]:  # the report less the command that made it, which names its --out
        return [line for line in (tmp_path / report / "summary.md").read_text().splitlines()
                if not line.startswith("made by:")]
    assert findings("torn") == findings("whole")


def test_time_varying_graphs_are_reported_at_the_gap_of_their_mean_round(tmp_path: Path) -> None:
    """One random matching is disconnected (gap 0) and one hop of one_peer_exponential barely mixes, but
    their rounds mix fast: the table, the accuracy-vs-gap points and the rho^(2t) line use the mean round's
    gap, and a topology.json written before it was recorded falls back to round 0's."""
    runs = []
    for topology in ("random_matching", "one_peer_exponential"):
        out = tmp_path / topology
        config = load_config(TOY, [f"topology={topology}", "peers=16", "rounds=2", "train.local_steps=1", f"out={out}"])
        Experiment(config, init_runtime()).run()
        runs.append(out)
    groups = group_runs([load_run(run) for run in runs])
    stats = [group_stats(group) for group in groups]
    table = summary_table(stats)
    for group, stat in zip(groups, stats):
        recorded = group.runs[0]["topology"]
        gap = recorded["spectral_gap_of_mean_W"]
        assert recorded["spectral_gap"] < 0.05 and gap > 0.2
        assert stat["spectral_gap"]["mean"] == gap  # the accuracy_vs_gap point and the table cell
        assert f"| {stat['label']} | {group.topology} | fedrot | 1 | {gap:.4f} |" in table
        rounds, means, _ = per_round(group, "consensus_distance_rel")
        (_, first), (_, second) = predicted_decay(group, rounds, means, floor=0.0)
        assert second / first == pytest.approx((1 - gap) ** 2)
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["groups"] == json.loads(json.dumps(stats))

    old = runs[0] / "topology.json"
    recorded = json.loads(old.read_text())
    old.write_text(json.dumps({key: value for key, value in recorded.items() if key != "spectral_gap_of_mean_W"}))
    assert group_stats(group_runs([load_run(runs[0])])[0])["spectral_gap"]["mean"] == recorded["spectral_gap"]
    assert main(["report", str(runs[0]), "--out", str(tmp_path / "old_report")]) == 0


def robust_run(folder: Path, rule: str, attack: str, peers: list[int], seed: int, worst: float | None,
               strength: float | None = None) -> str:
    """A run folder written by hand: finished with a known worst honest accuracy, or (worst None)
    stopped early, which leaves only its config."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "out": str(folder), "method": "fedit", "topology": "torus", "peers": 16, "rounds": 2,
              "adversary": {"peers": peers, "attack": attack, "strength": strength}, "robust": {"rule": rule}}
    (folder / "config.yaml").write_text(json.dumps(config))
    if worst is not None:
        (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "mean_accuracy": worst + 0.1}) + "\n")
        (folder / "summary.json").write_text(json.dumps({
            "method": "fedit", "topology": "torus", "final_mean_accuracy": worst + 0.1, "final_min_accuracy": worst,
            "bytes_sent_total": 1000, "wall_time_s": 1.0}))
        (folder / "topology.json").write_text(json.dumps({"spectral_gap": 0.4}))
    return str(folder)


def test_a_robustness_report_gives_the_worst_honest_peer_per_rule_attack_and_f(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    worst = {("none", "none", 1): [0.70, 0.72], ("none", "alie", 1): [0.10, 0.20], ("clip", "none", 1): [0.71, 0.73],
             ("clip", "alie", 1): [0.60, None], ("clip", "alie", 2): [0.50, 0.54]}
    folders = [robust_run(tmp_path / f"{rule}_{attack}_{f}" / f"seed{seed}", rule, attack, [7, 12][:f], seed, value)
               for (rule, attack, f), values in worst.items() for seed, value in enumerate(values)]
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    assert "1 folder(s) hold a run that has not finished" in capsys.readouterr().err
    cells = {(c["rule"], c["attack"], c["adversaries"]): c
             for c in json.loads((tmp_path / "report" / "summary.json").read_text())["robustness"]}
    assert cells.keys() == worst.keys()
    assert cells[("none", "alie", 1)]["final_min_accuracy"]["mean"] == pytest.approx(0.15, abs=1e-12)
    assert cells[("clip", "alie", 2)]["final_mean_accuracy"]["mean"] == pytest.approx(0.62, abs=1e-12)
    assert cells[("clip", "alie", 1)]["stopped"] == 1 and cells[("clip", "alie", 1)]["final_min_accuracy"]["n"] == 1
    text = (tmp_path / "report" / "summary.md").read_text()
    assert "| alie | 1 | 0.150 (0.250) | 0.600 (0.700), 1 stopped |" in text
    assert "| alie | 2 | - | 0.520 (0.620) |" in text
    assert (tmp_path / "report" / "robustness.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "report" / "accuracy_vs_gap.png").exists()  # one graph: nothing to plot against gaps


def test_a_study_of_attack_strengths_plots_accuracy_against_the_strength(tmp_path: Path) -> None:
    folders = [robust_run(tmp_path / f"{rule}_{c}" / f"seed{seed}", rule, "gauge_scale", [7], seed, 0.5 + 0.01 * seed, c)
               for rule in ("none", "plain") for c in (2.0, 5.0) for seed in range(2)]
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    cells = json.loads((tmp_path / "report" / "summary.json").read_text())["robustness"]
    assert sorted((c["panel"], c["rule"]) for c in cells) == sorted(
        (f"adversary.strength={c}", rule) for rule in ("none", "plain") for c in (2.0, 5.0))
    assert (tmp_path / "report" / "robustness_strength.png").read_bytes()[:8] == PNG_MAGIC
    assert not list((tmp_path / "report").glob("robustness_[0-9]*.png"))  # no heatmaps of a single cell


def test_rules_without_an_adversary_on_several_graphs_make_one_heatmap(tmp_path: Path) -> None:
    folders = []
    for topology in ("ring", "torus"):
        for rule in ("none", "clip"):
            folder = tmp_path / f"{topology}_{rule}"
            robust_run(folder, rule, "none", [], 0, 0.5)
            config = json.loads((folder / "config.yaml").read_text())
            (folder / "config.yaml").write_text(json.dumps({**config, "topology": topology}))
            folders.append(str(folder))
    assert main(["report", *folders, "--out", str(tmp_path / "report")]) == 0
    cells = json.loads((tmp_path / "report" / "summary.json").read_text())["robustness"]
    assert sorted((c["panel"], c["rule"], c["adversaries"]) for c in cells) == [
        ("topology=ring", "clip", 0), ("topology=ring", "none", 0), ("topology=torus", "clip", 0),
        ("topology=torus", "none", 0)]
    assert [p.name for p in (tmp_path / "report").glob("robustness*.png")] == ["robustness.png"]
