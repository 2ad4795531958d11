"""The robustness view of a report: honest accuracy per robust rule over (attack, number of adversaries).

A robustness study varies ``robust.rule``, ``adversary.attack`` and ``adversary.peers``; every other
setting that varies (the graph, the method) makes a panel of its own. A cell is the final accuracy
of the worst honest peer (metrics count honest peers only), mean over seeds: the number a party
that joins the network must plan for. ``attack: none`` with the same peers is the clean run,
measured on the same honest peers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .groups import Group, mean_std, settings_of, short_value

AXES = ("robust.rule", "adversary.attack", "adversary.peers")
WORST, MEAN = "final_min_accuracy", "final_mean_accuracy"


@dataclass
class Panel:
    """The groups that share every setting but the robustness axes."""

    title: str
    rules: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # adversaries per run (f)
    cells: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)


def is_robustness_study(groups: list[Group]) -> bool:
    """Whether the groups differ in a robust rule or an attack (a connectivity study does not)."""
    settings = [settings_of(group.runs[0]) for group in groups]
    return any(len({repr(s.get(key)) for s in settings}) > 1 for key in AXES[:2])


def robustness_panels(groups: list[Group], stopped: list[dict] = ()) -> list[Panel]:
    """One panel per combination of the other varying settings, its cells mean +/- std over the
    seeds that finished; ``stopped`` (runs that ended early: a payload the screen refused, a loss that
    stopped being finite, read as {"config": ...}) counts per cell."""
    finished = [(settings_of(group.runs[0]), group.runs) for group in groups]
    ended = [(settings_of(run), []) for run in stopped]
    settings = [setting for setting, _ in finished + ended]
    others = other_varying(settings, with_strength=strength_varies(settings))
    panels: dict[str, Panel] = {}
    for setting, runs in finished + ended:
        title = ", ".join(f"{key}={short_value(setting.get(key))}" for key in others) or "all runs"
        panel = panels.setdefault(title, Panel(title))
        rule, attack, count = setting["robust.rule"], setting["adversary.attack"], len(setting["adversary.peers"] or [])
        for values, value in ((panel.rules, rule), (panel.attacks, attack), (panel.counts, count)):
            if value not in values:
                values.append(value)
        cell = panel.cells.setdefault((rule, attack, count), {"peers": setting["adversary.peers"], "stopped": 0})
        if runs:
            cell.update({key: dict(zip(("mean", "std", "n"), mean_std(run["summary"].get(key) for run in runs)))
                         for key in (WORST, MEAN)})
        else:
            cell["stopped"] += 1
    for panel in panels.values():
        panel.attacks.sort(key=lambda attack: attack != "none")  # the clean column first
        panel.counts.sort()
    return list(panels.values())


def strength_varies(settings: list[dict[str, Any]]) -> bool:
    """Whether some attack runs at several strengths (otherwise each has its default, set by the attack)."""
    return any(len({repr(s.get("adversary.strength")) for s in settings if s["adversary.attack"] == attack}) > 1
               for attack in {s["adversary.attack"] for s in settings})


def other_varying(settings: list[dict[str, Any]], with_strength: bool) -> list[str]:
    """The settings besides the robustness axes that differ between the groups."""
    return [key for key in dict.fromkeys(k for s in settings for k in s)
            if key not in AXES and (key != "adversary.strength" or with_strength)
            and len({repr(s.get(key)) for s in settings}) > 1]


def plot_strengths(groups: list[Group], folder: Path, stamp: str, save: Callable) -> list[str]:
    """Where a study varies an attack's strength: the honest peers' final mean accuracy against it
    (mean +/- std over seeds), a line per rule, a panel per combination of the other settings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = [settings_of(group.runs[0]) for group in groups]
    if not strength_varies(settings):
        return []
    others = other_varying(settings, with_strength=False)
    lines: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for group, setting in zip(groups, settings):
        title = ", ".join([f"attack={setting['adversary.attack']}", f"f={len(setting['adversary.peers'] or [])}",
                           *(f"{key}={short_value(setting.get(key))}" for key in others)])
        mean, std, _ = mean_std(run["summary"].get(MEAN) for run in group.runs)
        if setting.get("adversary.strength") is not None and mean is not None:
            lines.setdefault(title, {}).setdefault(setting["robust.rule"], []).append(
                (float(setting["adversary.strength"]), mean, std))
    figure = Figure(figsize=(4.6 * len(lines), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, (title, rules) in zip(figure.subplots(1, len(lines), squeeze=False)[0], lines.items()):
        for rule, points in rules.items():
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=f"rule: {rule}")
        ax.set_xscale("log")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("adversary.strength (log scale)")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.axes[0].set_ylabel("honest peers' final mean accuracy (mean +/- std over seeds)")
    save(figure, folder / "robustness_strength.png", stamp)
    return ["robustness_strength"]


def panels_json(panels: list[Panel]) -> list[dict[str, Any]]:
    """The panels for summary.json: one entry per cell."""
    return [{"panel": panel.title, "rule": rule, "attack": attack, "adversaries": count, **cell}
            for panel in panels for (rule, attack, count), cell in panel.cells.items()]


def panels_markdown(panels: list[Panel]) -> str:
    """Per panel, a table: a row per (attack, f), a column per rule, the worst honest peer's final
    accuracy (mean over seeds) with the honest mean in brackets."""
    parts = []
    for panel in panels:
        rows = []
        for attack in panel.attacks:
            for count in panel.counts:
                cells = [panel.cells.get((rule, attack, count)) for rule in panel.rules]
                if any(cells):
                    rows.append(f"| {attack} | {count} | " + " | ".join(_text(cell) for cell in cells) + " |")
        parts.append(f"### {panel.title}\n\n| attack | f | " + " | ".join(panel.rules) + " |\n| --- | ---: |"
                     + " ---: |" * len(panel.rules) + "\n" + "\n".join(rows) + "\n")
    return ("## Robustness: worst honest peer (honest mean)\n\nFinal accuracy of the worst honest peer, mean over "
            "seeds, and in brackets the honest peers' mean accuracy; f adversaries; attack `none`: the clean run "
            "measured on the same honest peers. \"k stopped\": k seeds ended early (a payload over the norm screen, "
            "or a loss that stopped being finite), the defence failed there; the numbers beside are the other "
            "seeds'.\n\n" + "\n".join(parts))


def _text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    stopped = f"{cell['stopped']} stopped" if cell["stopped"] else ""
    if WORST not in cell or cell[WORST]["mean"] is None:
        return stopped or "n/a"
    return f"{cell[WORST]['mean']:.3f} ({cell[MEAN]['mean']:.3f})" + (f", {stopped}" if stopped else "")


def plot_heatmaps(panels: list[Panel], folder: Path, stamp: str, save: Callable) -> list[str]:
    """Per panel a figure, one heatmap per rule: rows f, columns attacks, colour and number the
    worst honest peer's final accuracy (mean over seeds); returns the plot names."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = colormaps["viridis"].with_extremes(bad="dimgrey")
    if all(len(panel.attacks) == 1 and len(panel.counts) == 1 for panel in panels):
        return [plot_rules_by_panel(panels, folder, stamp, save, colours)]
    names = []
    for index, panel in enumerate(panels):
        columns = min(3, len(panel.rules))
        rows = math.ceil(len(panel.rules) / columns)
        figure = Figure(figsize=(1.5 + 0.62 * len(panel.attacks) * columns, 0.9 + (0.4 * len(panel.counts) + 1.2) * rows),
                        layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False)
        image = None
        for k, rule in enumerate(panel.rules):
            ax = axes[k // columns][k % columns]
            image = _draw_cells(ax, [[panel.cells.get((rule, attack, count)) for attack in panel.attacks]
                                     for count in panel.counts], colours)
            ax.set_title(f"rule: {rule}", fontsize=8)
            ax.set_xticks(range(len(panel.attacks)), panel.attacks, rotation=45, ha="right", fontsize=6)
            ax.set_yticks(range(len(panel.counts)), [f"f={count}" for count in panel.counts], fontsize=6)
        for k in range(len(panel.rules), rows * columns):
            axes[k // columns][k % columns].set_visible(False)
        figure.suptitle(f"worst honest peer's final accuracy (mean over seeds; stop: a seed ended early); "
                        f"{panel.title}", fontsize=8)
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        name = "robustness" if len(panels) == 1 else f"robustness_{index + 1}"
        save(figure, folder / f"{name}.png", stamp)
        names.append(name)
    return names


def plot_rules_by_panel(panels: list[Panel], folder: Path, stamp: str, save: Callable, colours) -> str:
    """One attack and one f per panel (e.g. rules without an adversary on many graphs): a single
    heatmap, a row per panel and a column per rule, rather than heatmaps of one cell."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rules = list(dict.fromkeys(rule for panel in panels for rule in panel.rules))
    figure = Figure(figsize=(2.5 + 0.9 * len(rules), 1.2 + 0.3 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    image = _draw_cells(ax, [[panel.cells.get((rule, panel.attacks[0], panel.counts[0])) for rule in rules]
                             for panel in panels], colours)
    ax.set_xticks(range(len(rules)), [f"rule: {rule}" for rule in rules], rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(panels)), [panel.title for panel in panels], fontsize=7)
    panel = panels[0]
    ax.set_title(f"worst honest peer's final accuracy (mean over seeds); attack={panel.attacks[0]}, "
                 f"f={panel.counts[0]}", fontsize=8)
    figure.colorbar(image, ax=ax, shrink=0.8)
    save(figure, folder / "robustness.png", stamp)
    return "robustness"


def _draw_cells(ax, cells: list[list[dict[str, Any] | None]], colours):
    """A heatmap of cells, each coloured and labelled by the worst honest peer's accuracy: "stop"
    where a seed ended early, "-" where nothing ran. Returns the image, for a colour bar."""
    values = [[_worst(cell) for cell in row] for row in cells]
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap=colours, aspect="auto")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            value = values[r][c]
            label = ("-" if cell is None else "stop") if math.isnan(value) else f"{value:.2f}"
            ax.text(c, r, label, ha="center", va="center", fontsize=6,
                    color="white" if math.isnan(value) or value < 0.6 else "black")
    return image


def _worst(cell: dict[str, Any] | None) -> float:
    """A cell's number; NaN (drawn "stop", or "-" where nothing ran) where a seed stopped."""
    if cell is None or cell["stopped"] or WORST not in cell or cell[WORST]["mean"] is None:
        return math.nan
    return cell[WORST]["mean"]
