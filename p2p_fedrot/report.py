"""Compare finished runs: a Markdown table and plots of accuracy and consensus distance per round."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import ConfigError
from .io import atomic_write_png, atomic_write_text, read_json, read_jsonl


def load_run(run_dir: str | os.PathLike) -> dict:
    """The metrics, summary, config and topology of one run folder."""
    folder = Path(run_dir)
    needed = ["metrics.jsonl", "summary.json", "config.yaml", "topology.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"{folder} is not a finished run folder (missing {', '.join(missing)}); "
            "pass folders written by `p2p-fedrot run`"
        )
    return {
        "name": folder.name,
        "metrics": read_jsonl(folder / "metrics.jsonl"),
        "summary": read_json(folder / "summary.json"),
        "config": yaml.safe_load((folder / "config.yaml").read_text()),
        "topology": read_json(folder / "topology.json"),
    }


def summary_table(runs: list[dict]) -> str:
    """Markdown table: one row per run with its graph, method and final numbers."""
    header = ("| run | topology | method | spectral gap | mean acc | min acc | consensus dist | MB sent | wall s |\n"
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    rows = []
    for run in runs:
        s, last = run["summary"], run["metrics"][-1] if run["metrics"] else {}
        rows.append(
            f"| {run['name']} | {s['topology']} | {s['method']} | {run['topology']['spectral_gap']:.4f} | "
            f"{_fmt(s.get('final_mean_accuracy'))} | {_fmt(s.get('final_min_accuracy'))} | "
            f"{_fmt(last.get('consensus_distance'), '.2e')} | {s['bytes_sent_total'] / 1e6:.2f} | "
            f"{s['wall_time_s']:.1f} |"
        )
    return header + "\n".join(rows) + "\n"


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


ALIGNMENT_PLOTS = {  # per-round diagnostics, plotted when some run recorded them
    "rotational_share": "rotational share of neighbour disagreement",
    "rotation_angle_mean": "mean ||R - I||_F of the rotations applied",
    "alignment_gain": "alignment gain (distance after / before)",
    "aggregation_error_rel": "relative aggregation error",
}


def plot_runs(runs: list[dict], key: str, ylabel: str, path: Path, log: bool = False) -> None:
    """One line per run of ``key`` against the round number, saved as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run in runs:
        rounds = [m["round"] + 1 for m in run["metrics"]]
        values = [float("nan") if m.get(key) is None else m[key] for m in run["metrics"]]
        if log:  # exact consensus (0) has no place on a log axis: leave that point out
            values = [v if v > 0 else float("nan") for v in values]
        axes.plot(rounds, values, marker="o", markersize=3, label=run["name"])
    if log:
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    atomic_write_png(figure, path)


def write_report(run_dirs: list[str], out: str | os.PathLike) -> Path:
    """Write summary.md and its plots (accuracy, consensus distance, alignment diagnostics) into ``out``."""
    runs = [load_run(d) for d in run_dirs]
    if len({run["name"] for run in runs}) < len(runs):  # e.g. a/seed0 and b/seed0: name them by path
        for run, run_dir in zip(runs, run_dirs):
            run["name"] = str(run_dir).rstrip("/")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, "mean_accuracy", "mean test accuracy over peers", folder / "accuracy.png")
    plot_runs(runs, "consensus_distance", "consensus distance", folder / "consensus.png", log=True)
    plots = ["accuracy", "consensus"]
    for key, label in ALIGNMENT_PLOTS.items():
        if any(m.get(key) is not None for run in runs for m in run["metrics"]):
            plot_runs(runs, key, label, folder / f"{key}.png")
            plots.append(key)
    text = "# p2p_fedrot report\n\n" + summary_table(runs) + "\n"
    text += "\n\n".join(f"![{name.replace('_', ' ')}]({name}.png)" for name in plots) + "\n"
    atomic_write_text(folder / "summary.md", text)
    return folder / "summary.md"
