"""What a study's numbers say, as numbers a reader can check: whether the order of the spectral gaps is
the order of the accuracies, how methods differ seed by seed on the same graph, and how fast measured
disagreement shrinks beside what mixing alone would give.

Seeds fix the data split and the initial adapters, so two methods run with one seed differ only in
the method: their difference per seed (paired) is a sharper comparison than two means with their
spreads.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from scipy.stats import rankdata, spearmanr

EXACT_UP_TO = 8  # graphs: up to this many, Spearman's p counts every ordering (8! = 40,320)

from .groups import Group, effective_gap, mean_std, per_round, settings_of

ACCURACY_KEYS = ("final_mean_accuracy", "final_min_accuracy")


def gap_order(stats: list[dict]) -> list[dict[str, Any]]:
    """Per method: its topologies sorted by spectral gap and by final mean accuracy, and Spearman's
    rank correlation between the two (None below three topologies)."""
    found = []
    for method in dict.fromkeys(s["method"] for s in stats):
        points = [s for s in stats if s["method"] == method and s["spectral_gap"]["mean"] is not None
                  and s["final_mean_accuracy"]["mean"] is not None]
        if len(points) < 2:
            continue
        by_gap = sorted(points, key=lambda s: s["spectral_gap"]["mean"])
        by_accuracy = sorted(points, key=lambda s: s["final_mean_accuracy"]["mean"])
        correlation, p_value = (spearman([s["spectral_gap"]["mean"] for s in points],
                                         [s["final_mean_accuracy"]["mean"] for s in points])
                                if len(points) >= 3 else (None, None))
        found.append({"method": method, "by_gap": [s["label"] for s in by_gap],
                      "by_accuracy": [s["label"] for s in by_accuracy],
                      "spearman": _number(correlation), "p_value": _number(p_value), "n": len(points)})
    return found


def spearman(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p. Up to EXACT_UP_TO points the p is exact, the
    share of all orderings of ys whose correlation is at least as strong (scipy's t approximation
    gives p = 0 for a perfect order of four graphs, where the truth is 1/12); beyond, scipy's."""
    correlation = float(spearmanr(xs, ys).statistic)
    if len(xs) > EXACT_UP_TO:
        return correlation, float(spearmanr(xs, ys).pvalue)
    x_ranks, y_ranks = rankdata(xs), rankdata(ys)
    if np.ptp(x_ranks) == 0 or np.ptp(y_ranks) == 0:
        return correlation, math.nan
    orderings = [np.corrcoef(x_ranks, order)[0, 1] for order in itertools.permutations(y_ranks)]
    return correlation, sum(abs(r) >= abs(correlation) - 1e-12 for r in orderings) / len(orderings)


def paired_differences(groups: list[Group], baseline: str) -> list[dict[str, Any]]:
    """For every group of another method than ``baseline``: its final accuracies minus the baseline's
    on the same settings, seed by seed (mean +/- std over the shared seeds, and how many are > 0)."""
    def others(group: Group) -> str:
        settings = {k: v for k, v in settings_of(group.runs[0]).items() if k not in ("method", "method_args")}
        return repr(sorted(settings.items(), key=lambda item: item[0]))

    baselines = {others(g): g for g in groups if g.method == baseline}
    found = []
    for group in groups:
        reference = baselines.get(others(group))
        if group.method == baseline or reference is None:
            continue
        mine, theirs = _by_seed(group), _by_seed(reference)
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        entry: dict[str, Any] = {"label": group.label, "topology": group.topology, "method": group.method,
                                 "baseline": baseline, "seeds": seeds}
        for key in ACCURACY_KEYS:
            differences = [mine[s][key] - theirs[s][key] for s in seeds
                           if mine[s].get(key) is not None and theirs[s].get(key) is not None]
            entry[key] = dict(zip(("mean", "std", "n"), mean_std(differences)))
            entry[key]["above"] = sum(d > 0 for d in differences)
            entry[key]["below"] = sum(d < 0 for d in differences)
        found.append(entry)
    return found


def _by_seed(group: Group) -> dict[int, dict]:
    return {run["config"]["seed"]: run["summary"] for run in group.runs}


def consensus_contraction(groups: list[Group], key: str = "consensus_distance_rel") -> list[dict[str, Any]]:
    """Per group that is not at exact consensus: the measured shrink factor of the relative consensus
    distance per round over its second half of evaluated rounds (geometric mean), beside rho^2, the
    factor mixing alone gives per round (the distance is squared). Training adds disagreement every
    round, so a measured factor near 1 above rho^2 means drift and mixing balance."""
    found = []
    for group in groups:
        rounds, means, _ = per_round(group, key)
        kept = [(r, m) for r, m in zip(rounds, means) if math.isfinite(m) and m > 1e-15]
        gap = mean_std(effective_gap(run) for run in group.runs)[0]
        if len(kept) < 2 or gap is None:
            continue
        (start, first), (end, last) = kept[(len(kept) - 1) // 2], kept[-1]
        if end == start:
            continue
        found.append({"label": group.label, "topology": group.topology, "method": group.method,
                      "rounds": [start, end], "measured_per_round": (last / first) ** (1.0 / (end - start)),
                      "mixing_alone_per_round": (1.0 - gap) ** 2, "final": last})
    return found


def _number(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def study_findings(stats: list[dict], groups: list[Group]) -> dict[str, list[dict[str, Any]]]:
    """All three, for summary.json (paired against the first method the groups name)."""
    methods = list(dict.fromkeys(g.method for g in groups))
    return {"gap_order": gap_order(stats),
            "paired_differences": paired_differences(groups, methods[0]) if len(methods) > 1 else [],
            "consensus_contraction": consensus_contraction(groups)}


def findings_markdown(found: dict[str, list[dict[str, Any]]]) -> str:
    """The three findings of :func:`study_findings` as short markdown tables (empty sections are left out)."""
    parts = []
    order = found["gap_order"]
    if any(entry["n"] >= 3 for entry in order):
        rows = [f"| {e['method']} | {e['n']} | {_fixed(e['spearman'], '.2f')} | {_fixed(e['p_value'], '.3f')} | "
                f"{'yes' if e['by_gap'] == e['by_accuracy'] else 'no'} | {' < '.join(_topology(l) for l in e['by_accuracy'])} |"
                for e in order if e["n"] >= 3]
        parts.append("### Does the order of the gaps give the order of the accuracies?\n\n"
                     "| method | graphs | Spearman rho | p (exact, two-sided) | same order | graphs by final mean accuracy |\n"
                     "| --- | ---: | ---: | ---: | --- | --- |\n" + "\n".join(rows) + "\n")
    paired = found["paired_differences"]
    if paired:
        rows = [f"| {p['label']} | {p['method']} - {p['baseline']} | {len(p['seeds'])} | "
                + " | ".join(f"{_signed(p[k])} ({p[k]['above']} up, {p[k]['below']} down)" for k in ACCURACY_KEYS) + " |"
                for p in paired]
        parts.append("### Methods on the same graph, seed by seed\n\n"
                     "Each seed fixes the data split and the initial adapters, so the difference per seed isolates "
                     "the method. Mean +/- std over seeds of the difference.\n\n"
                     "| runs | difference | seeds | final mean accuracy | final min accuracy |\n"
                     "| --- | --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n")
    contraction = found["consensus_contraction"]
    if contraction:
        rows = [f"| {c['label']} | {c['rounds'][0]}-{c['rounds'][1]} | {c['measured_per_round']:.3f} | "
                f"{c['mixing_alone_per_round']:.3f} | {c['final']:.2e} |" for c in contraction]
        parts.append("### Measured disagreement beside mixing alone\n\n"
                     "Per-round factor of the relative consensus distance over the second half of the evaluated "
                     "rounds (geometric mean), and rho^2, the factor mixing alone would give; local training adds "
                     "disagreement every round, which mixing alone leaves out.\n\n"
                     "| runs | rounds | measured factor per round | mixing alone (rho^2) | final distance |\n"
                     "| --- | --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n")
    return "## Findings in numbers\n\n" + "\n".join(parts) if parts else ""


def _fixed(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _signed(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:+.4f}" + (f" +/- {stat['std']:.4f}" if stat["n"] > 1 else "")


def _topology(label: str) -> str:
    """A group label without its method part, for lists of graphs."""
    parts = [part for part in label.split(", ") if not part.startswith("method=")]
    return ", ".join(parts) or label
