"""Finished runs grouped over seeds: a run folder read back, runs that differ only in their seed
as one group, and a group's final numbers and per-round series as mean +/- std over seeds."""

from __future__ import annotations

import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..config import dotted, with_defaults
from ..errors import ConfigError
from ..io import read_json, read_jsonl

# settings that do not make two runs different experiments: the seed is what a group varies over
NOT_GROUPED = ("seed", "out", "threads", "resume", "overwrite", "checkpoint_every", "log.tensorboard", "comm.timeout_s")


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
    metrics = read_jsonl(folder / "metrics.jsonl")
    if metrics.torn:
        print(f"p2p-fedrot: note: ignored the torn last line of {folder / 'metrics.jsonl'} (a write that a killed "
              "run did not finish); the report uses the complete lines before it", file=sys.stderr)
    return {
        "folder": folder,
        "metrics": metrics.records,
        "summary": read_json(folder / "summary.json"),
        "config": yaml.safe_load((folder / "config.yaml").read_text()),
        "topology": read_json(folder / "topology.json"),
    }


@dataclass
class Group:
    """Runs of one experiment over seeds."""

    label: str
    runs: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.runs[0]["summary"]["method"]

    @property
    def topology(self) -> str:
        return self.runs[0]["summary"]["topology"]


def settings_of(run: dict) -> dict[str, Any]:
    """Dotted settings, with the topology kept whole (a name or a mapping such as {name: ..., p: 0.2})."""
    config = with_defaults(run["config"])
    topology = config.pop("topology", None)
    settings = {key: value for key, value in dotted(config).items() if key not in NOT_GROUPED}
    return {"topology": topology, **settings}


def group_runs(runs: list[dict]) -> list[Group]:
    """Runs with equal settings but for the seed, in the order first seen, each group labelled by the
    settings that tell it apart from the others (its folder's name when there is one group)."""
    keyed: dict[str, tuple[dict, Group]] = {}
    for run in runs:
        settings = settings_of(run)
        key = repr(sorted(settings.items(), key=lambda item: item[0]))
        keyed.setdefault(key, (settings, Group("")))[1].runs.append(run)
    groups = [group for _, group in keyed.values()]
    varying = [k for k in dict.fromkeys(k for settings, _ in keyed.values() for k in settings)
               if len({repr(s.get(k)) for s, _ in keyed.values()}) > 1]
    for settings, group in keyed.values():
        if varying:
            group.label = ", ".join(f"{k}={short_value(settings.get(k))}" for k in varying)
        else:
            group.label = _common_name(group.runs)
    return groups


def short_value(value: Any) -> str:
    """ring, or erdos_renyi(p=0.2) for a mapping with a name."""
    if isinstance(value, dict):
        rest = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value.get('name', '')}({rest})"
    return str(value)


def _common_name(runs: list[dict]) -> str:
    """A folder name for a lone group: its runs' own, or their parent's for OUT/<cell>/seed<k>."""
    names = {run["folder"].resolve().name for run in runs}
    if len(names) == 1 and len(runs) == 1:
        return names.pop()
    parents = {run["folder"].resolve().parent.name for run in runs}
    return parents.pop() if len(parents) == 1 else "runs"


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) over the values that exist; std is 0 for one value."""
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return None, None, 0
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0, len(known)


def _last(run: dict, key: str) -> float | None:
    return run["metrics"][-1].get(key) if run["metrics"] else None


def effective_gap(run: dict) -> float | None:
    """The run's spectral gap per round: that of its mean W over rounds, which for a time-varying
    graph is far from round 0's (a single random matching has gap 0). topology.json files from
    before that field hold round 0's alone, which is then used."""
    topology = run["topology"]
    return topology.get("spectral_gap_of_mean_W", topology.get("spectral_gap"))


def group_stats(group: Group) -> dict[str, Any]:
    """A group's final numbers as {name: {"mean", "std", "n"}}, plus what identifies it."""
    measures = {
        "final_mean_accuracy": [r["summary"].get("final_mean_accuracy") for r in group.runs],
        "final_min_accuracy": [r["summary"].get("final_min_accuracy") for r in group.runs],
        "consensus_distance_rel": [_last(r, "consensus_distance_rel") for r in group.runs],
        "aggregation_error_rel": [_last(r, "aggregation_error_rel") for r in group.runs],
        "mb_sent": [r["summary"]["bytes_sent_total"] / 1e6 for r in group.runs],
        "wall_time_s": [r["summary"].get("wall_time_s") for r in group.runs],
        "spectral_gap": [effective_gap(r) for r in group.runs],
    }
    stats = {name: dict(zip(("mean", "std", "n"), mean_std(values))) for name, values in measures.items()}
    return {"label": group.label, "topology": group.topology, "method": group.method,
            "seeds": [r["config"]["seed"] for r in group.runs], "runs": [str(r["folder"]) for r in group.runs],
            **stats}


def per_round(group: Group, key: str) -> tuple[list[int], list[float], list[float]]:
    """(rounds, mean, std) of ``key`` over the group's seeds, at the rounds every seed recorded."""
    series = [{m["round"] + 1: m.get(key) for m in run["metrics"]} for run in group.runs]
    rounds = sorted(set.intersection(*(set(s) for s in series)))
    means, stds = [], []
    for r in rounds:
        mean, std, _ = mean_std(s[r] for s in series)
        means.append(math.nan if mean is None else mean)
        stds.append(math.nan if std is None else std)
    return rounds, means, stds
