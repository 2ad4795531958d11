"""Compare finished runs: runs that differ only in their seed form one group, reported as mean +/- std.

``summary.md`` holds the table, ``summary.json`` the same numbers for scripts, and the plots show
accuracy per round (a band over seeds), final accuracy against the spectral gap and against the bytes
sent, and the consensus distance per round beside what the mixing matrix alone would give.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from ..io import atomic_write_json, atomic_write_png, atomic_write_text
from ..provenance import describe
from ..run.outputs import require_folder_path
from .findings import findings_markdown, study_findings
from .groups import Group, effective_gap, group_runs, group_stats, load_run, mean_std, per_round
from .robustness import (is_robustness_study, panels_json, panels_markdown, plot_heatmaps, plot_strengths,
                         robustness_panels)

PER_ROUND_MAX_GROUPS = 30  # more lines than this make a per-round plot unreadable
LOG_FLOOR = 1e-15  # on a log axis, values at or below this (relative consensus at float noise) are left out
ALIGNMENT_PLOTS = {  # per-round diagnostics, plotted when some run recorded them
    "rotational_share": "rotational share of neighbour disagreement",
    "rotation_angle_mean": "mean ||R - I||_F of the rotations applied",
    "alignment_gain": "alignment gain (distance after / before)",
    "aggregation_error_rel": "relative aggregation error",
}


def _cell(stat: dict, spec: str, spread_if_zero: bool = True) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = format(stat["mean"], spec)
    if stat["n"] < 2 or (stat["std"] == 0 and not spread_if_zero):
        return text
    return f"{text} +/- {format(stat['std'], spec)}"


TABLE_COLUMNS = ("runs", "topology", "method", "n", "spectral gap", "mean acc", "min acc", "consensus (rel)",
                 "aggregation error (rel)", "MB sent", "wall s")


def table_rows(stats: list[dict]) -> list[list[str]]:
    """One row of cells per group, mean +/- std over its n seeds, in TABLE_COLUMNS order."""
    return [[s["label"], s["topology"], s["method"], str(len(s["runs"])),
             _cell(s["spectral_gap"], ".4f", spread_if_zero=False), _cell(s["final_mean_accuracy"], ".4f"),
             _cell(s["final_min_accuracy"], ".4f"), _cell(s["consensus_distance_rel"], ".2e"),
             _cell(s["aggregation_error_rel"], ".2e"), _cell(s["mb_sent"], ".2f"), _cell(s["wall_time_s"], ".1f")]
            for s in stats]


def summary_table(stats: list[dict]) -> str:
    """Markdown table: one row per group, mean +/- std over its n seeds."""
    header = "| " + " | ".join(TABLE_COLUMNS) + " |\n| --- | --- | --- |" + " ---: |" * (len(TABLE_COLUMNS) - 3) + "\n"
    return header + "\n".join("| " + " | ".join(row) + " |" for row in table_rows(stats)) + "\n"


def terminal_table(stats: list[dict]) -> str:
    """The same table in aligned columns, for a person reading a terminal."""
    rows = [list(TABLE_COLUMNS), *table_rows(stats)]
    widths = [max(len(row[k]) for row in rows) for k in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) if k < 3 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows) + "\n"


# ---------------------------------------------------------------- plots


def _figure(panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4 if panels == 1 else 4.6 * panels, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, sharey=True, squeeze=False)[0]
    return figure, (axes[0] if panels == 1 else list(axes))


def code_versions(runs: list[dict]) -> list[str]:
    """The code versions the runs recorded, each once (several when they come from different commits)."""
    return sorted({describe(run["summary"].get("code")) for run in runs})


def made_by(command: str | None, codes: list[str]) -> str:
    """What made a report: the command, and every code version of its runs."""
    return (f"made by: {command}\n" if command else "") + "code: " + "; ".join(codes)


def _save(figure, path: Path, stamp: str) -> None:
    """Write the figure with its provenance in small print under it."""
    wrapped = "\n".join(textwrap.fill(line, 150) for line in stamp.splitlines())
    figure.text(0.0, -0.01, wrapped, fontsize=5, color="dimgrey", ha="left", va="top")
    atomic_write_png(figure, path)


def plot_per_round(groups: list[Group], key: str, ylabel: str, path: Path, stamp: str, log: bool = False,
                   prediction: bool = False) -> None:
    """One line per group (mean over seeds, a band of +/- one std), one panel per method when the
    groups have several; with ``prediction``, beside each line the pure-gossip decay rho^(2t) from
    its first point (the consensus distance is squared). On a log axis, values at float-noise level
    (exact consensus) are left out."""
    from matplotlib.ticker import MaxNLocator

    methods = list(dict.fromkeys(group.method for group in groups))
    figure, panels = _figure(len(methods))
    panels = panels if len(methods) > 1 else [panels]
    lines = [(group, *per_round(group, key)) for group in groups]
    if log:
        lines = [(g, rounds, [m if m > LOG_FLOOR else math.nan for m in means], stds) for g, rounds, means, stds in lines]
    shown = [m for _, _, means, _ in lines for m in means if math.isfinite(m)]
    for method, axes in zip(methods, panels):
        # on a log axis a group at exact consensus has nothing to draw, and no legend entry either
        mine = [line for line in lines if line[0].method == method and any(math.isfinite(m) for m in line[2])]
        for (group, rounds, means, stds), colour in zip(mine, _colours(len(mine))):
            axes.plot(rounds, means, marker="o", markersize=3, color=colour, label=_panel_label(group, len(methods)))
            low, high = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
            axes.fill_between(rounds, [v if v > 0 or not log else math.nan for v in low], high, color=colour,
                              alpha=0.15, linewidth=0)
            if prediction and shown:
                predicted = predicted_decay(group, rounds, means, 0.1 * min(shown))
                axes.plot([r for r, _ in predicted], [v for _, v in predicted], linestyle="--", linewidth=1,
                          color=colour)
        if prediction:
            axes.plot([], [], linestyle="--", color="grey", label="mixing alone: first value x rho^(2t)")
        if log:
            axes.set_yscale("log")
        if len(methods) > 1:
            axes.set_title(method, fontsize=9)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("round")
        axes.grid(alpha=0.3)
        _legend(axes, len(mine) + prediction, beside=axes is panels[-1])
    panels[0].set_ylabel(ylabel)
    _save(figure, path, stamp)


def _panel_label(group: Group, methods: int) -> str:
    """The group's label without the method when each method has its own panel."""
    if methods == 1:
        return group.label
    parts = [part for part in group.label.split(", ") if not part.startswith("method=")]
    return ", ".join(parts) or group.topology


def predicted_decay(group: Group, rounds: list[int], means: list[float], floor: float) -> list[tuple[int, float]]:
    """(round, value) of the decay rho^(2t) that the mixing matrix alone gives from the group's first
    plotted value, down to ``floor`` (none for exact averaging in one round, rho = 0)."""
    gap = mean_std(effective_gap(r) for r in group.runs)[0]
    start = next((k for k, m in enumerate(means) if math.isfinite(m)), None)
    if gap is None or start is None or gap >= 1.0:
        return []
    rho, first = 1.0 - gap, rounds[start]
    predicted = [(r, means[start] * rho ** (2 * (r - first))) for r in rounds[start:]]
    return [(r, v) for r, v in predicted if v >= floor]


def _colours(count: int) -> list:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(k % palette.N) for k in range(count)]


def _legend(axes, entries: int, beside: bool = True) -> None:
    """Inside the axes for a few lines, beside them for many (on a row of panels, the last one's);
    none for a panel with nothing drawn."""
    if not axes.get_legend_handles_labels()[0]:
        return
    if entries <= 6:
        axes.legend(fontsize=7)
    elif beside:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def plot_final_against(stats: list[dict], x_key: str, xlabel: str, path: Path, stamp: str) -> None:
    """Final mean accuracy (error bars over seeds) against ``x_key``, one series per method, each point
    named by its topology; a log x axis when the values span more than a decade."""
    figure, axes = _figure()
    named: set[str] = set()
    for method in dict.fromkeys(s["method"] for s in stats):
        points = sorted((s for s in stats if s["method"] == method and s[x_key]["mean"] is not None
                         and s["final_mean_accuracy"]["mean"] is not None), key=lambda s: s[x_key]["mean"])
        if not points:
            continue
        xs = [s[x_key]["mean"] for s in points]
        ys = [s["final_mean_accuracy"]["mean"] for s in points]
        axes.errorbar(xs, ys, yerr=[s["final_mean_accuracy"]["std"] for s in points],
                      xerr=[s[x_key]["std"] for s in points], marker="o", linestyle="none", capsize=3,
                      label=method)
        for x, y, s in zip(xs, ys, points):
            if s["topology"] not in named:  # one name per point of the first series
                axes.annotate(s["topology"], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        named |= {s["topology"] for s in points}
    xs = [s[x_key]["mean"] for s in stats if s[x_key]["mean"] is not None]
    if xs and min(xs) > 0 and max(xs) > 10 * min(xs):
        axes.set_xscale("log")
        xlabel += ", log scale"
    axes.set_xlabel(xlabel)
    axes.set_ylabel("final mean test accuracy (mean +/- std over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, path, stamp)


def _recorded(groups: list[Group], key: str, above: float | None = None) -> bool:
    """Whether some run recorded ``key`` in some round (older runs lack newer metrics), with a value
    over ``above`` when one is given."""
    values = (m.get(key) for g in groups for r in g.runs for m in r["metrics"])
    return any(v is not None and (above is None or v > above) for v in values)


@dataclass
class Report:
    """A written report: where its files are, and the table a terminal shows."""

    summary: Path
    plots: list[Path]
    table: str
    notes: str
    stamp: str

    def terminal_text(self) -> str:
        """The table in columns, the notes, the plot files and the provenance; no markdown."""
        return (self.table + "\n" + self.notes + "\n" + "\n".join(f"plot: {path}" for path in self.plots)
                + f"\nreport: {self.summary}\n{self.stamp}\n")


def write_report(run_dirs: list[str], out: str | os.PathLike, command: str | None = None,
                 stopped_dirs: Sequence[str] = ()) -> Report:
    """Write summary.md, summary.json and the plots into ``out``, each stamped with ``command`` and the
    code version of the runs. ``stopped_dirs``: runs of the same study that ended early, which a
    robustness study counts as defences that failed."""
    loaded = [load_run(d) for d in run_dirs]
    groups = group_runs(loaded)
    stats = [group_stats(g) for g in groups]
    codes = code_versions(loaded)
    stamp = made_by(command, codes)
    folder = Path(out)
    require_folder_path(folder, "--out")
    folder.mkdir(parents=True, exist_ok=True)
    robustness = is_robustness_study(groups)
    per_round_plots = len(groups) <= PER_ROUND_MAX_GROUPS
    plots, drifting = [], False
    if per_round_plots:
        plot_per_round(groups, "mean_accuracy", "mean test accuracy over peers", folder / "accuracy.png", stamp)
        consensus_key = "consensus_distance_rel" if _recorded(groups, "consensus_distance_rel") else "consensus_distance"
        drifting = _recorded(groups, consensus_key, above=LOG_FLOOR)  # server-mode runs are at exact consensus
        if drifting:
            plot_per_round(groups, consensus_key, consensus_key.replace("_", " "), folder / "consensus.png", stamp,
                           log=True, prediction=True)
        plots = ["accuracy", *(["consensus"] if drifting else [])]
    if not robustness:
        plot_final_against(stats, "spectral_gap", "spectral gap 1 - rho of the mixing matrix (mean over rounds)",
                           folder / "accuracy_vs_gap.png", stamp)
        plot_final_against(stats, "mb_sent", "MB sent in the run (all peers)", folder / "accuracy_vs_bytes.png", stamp)
        plots += ["accuracy_vs_gap", "accuracy_vs_bytes"]
    for key, label in ALIGNMENT_PLOTS.items():
        if per_round_plots and _recorded(groups, key):
            plot_per_round(groups, key, label, folder / f"{key}.png", stamp)
            plots.append(key)
    panels = []
    if robustness:  # a strength plot where an attack's strength varies: heatmaps of one cell say nothing
        panels = robustness_panels(groups, [_started_run(d) for d in stopped_dirs])
        plots += plot_strengths(groups, folder, stamp, _save) or plot_heatmaps(panels, folder, stamp, _save)
    seeds = sorted({len(g.runs) for g in groups})
    notes = "Plots: a band or error bar is +/- one std over seeds" + (
        "; the consensus plot leaves out runs at exact consensus (relative distance <= 1e-15), and its dashed "
        "lines are how fast mixing alone would shrink the first plotted value (rho^(2t), rho = 1 - spectral gap)"
        if drifting else ". No consensus plot: every run is at exact consensus (relative distance <= 1e-15), as in "
        "server mode" if per_round_plots else f". No per-round plots: {len(groups)} groups (over "
        f"{PER_ROUND_MAX_GROUPS}) would make them unreadable; metrics.jsonl of each run has the rounds") + ".\n"
    intro = (f"{len(groups)} group(s) of runs that differ only in their seed; mean +/- sample std over the "
             f"n seeds of each ({', '.join(map(str, seeds))}). Final values are those of the last evaluated "
             "round. The spectral gap is that of the mixing matrix averaged over rounds, which for a time-varying "
             "graph differs from any one round's (runs recorded before this average show round 0's).\n")
    stamp_lines = "".join(f"{line}  \n" for line in stamp.splitlines())
    found = {} if robustness else study_findings(stats, groups)
    findings = panels_markdown(panels) if robustness else findings_markdown(found)
    text = ("# p2p_fedrot report\n\n" + stamp_lines + "\n" + intro + "\n" + summary_table(stats) + "\n" + notes + "\n"
            + (findings + "\n" if findings else "")
            + "\n\n".join(f"![{name.replace('_', ' ')}]({name}.png)" for name in plots) + "\n")
    atomic_write_json(folder / "summary.json", {"made_by": {"command": command, "code": codes}, "groups": stats,
                                                "findings": found, **({"robustness": panels_json(panels)} if robustness else {})})
    atomic_write_text(folder / "summary.md", text)
    return Report(folder / "summary.md", [folder / f"{name}.png" for name in plots], terminal_table(stats),
                  intro + notes, stamp)


def _started_run(folder: str | os.PathLike) -> dict:
    """A run that ended early, as far as the report needs it: the config it started with."""
    return {"config": yaml.safe_load((Path(folder) / "config.yaml").read_text()) or {}}
