"""The output folder: whether a run starts fresh, resumes or only finishes, and its files.

``resume: auto`` (the default) goes on from the checkpoint in ``out`` when it belongs to the same
run (the same config but for the free keys), so re-running a command, or torchrun restarting
crashed workers, continues where the run stopped. Outputs of a different run are never replaced
without ``overwrite``: that is an error naming the settings that differ.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..comm.runtime import launch_id
from ..config import RunConfig, save_config
from ..errors import ConfigError
from ..io import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl, to_json
from . import checkpoint
from .checkpoint import Checkpoint

ADAPTERS = "adapters"  # folder of out with every peer's adapter in peft format
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"  # folder of out with the metrics as TensorBoard event files (log.tensorboard)
SUMMARY = "summary.json"
CONFIG = "config.yaml"
WAY_OUT = "use another out, or --overwrite to replace them"


@dataclass(frozen=True)
class StartPlan:
    """Where a run begins: round 0, or the round after a checkpoint."""

    first_round: int
    checkpoint: Checkpoint | None = None

    @property
    def elapsed_s(self) -> float:
        return self.checkpoint.meta.get("elapsed_s", 0.0) if self.checkpoint else 0.0

    @property
    def bytes_total(self) -> int:
        return self.checkpoint.meta.get("bytes_total", 0) if self.checkpoint else 0

    @property
    def wire_bytes_total(self) -> int:
        return self.checkpoint.meta.get("wire_bytes_total", 0) if self.checkpoint else 0


def plan_start(config: RunConfig) -> StartPlan:
    """Decide from the files in ``out`` how this run starts (the same answer on every process)."""
    out, wanted = Path(config.out), config.to_dict()
    require_folder_path(out)
    found = checkpoint.latest(out)
    # torchrun restarts crashed workers with the same arguments: overwrite and resume: false apply to
    # the launch, not to each restart, which must go on from what this launch has checkpointed
    restarted = found is not None and launch_id() is not None and found.meta.get("launch") == launch_id()
    if config.overwrite and not restarted:
        return StartPlan(0)
    if found is not None:
        _require_same_run(wanted, found.meta["config"], f"the checkpoint in {checkpoint.folder_of(out)}")
        done = found.round + 1
        if config.resume is False and not restarted:
            raise ConfigError(f"{out} holds this run's checkpoint after round {done} and resume is false; set resume: "
                              f"auto (or true) to go on from it, or {WAY_OUT}")
        if done > config.rounds:
            raise ConfigError(f"the run in {out} already finished {done} rounds, more than rounds={config.rounds}; "
                              f"set rounds to at least {done}, or {WAY_OUT}")
        return StartPlan(done, found)
    if config.resume is True:
        raise ConfigError(f"resume: no checkpoint in {checkpoint.folder_of(out)}; run once without resume "
                          "(checkpoints are written every checkpoint_every rounds and at the end)")
    earlier = out / CONFIG
    if earlier.is_file() and any((out / name).exists() for name in (ADAPTERS, METRICS, SUMMARY)):
        _require_same_run(wanted, _read_config(earlier), f"the outputs in {out}")
    return StartPlan(0)


def require_folder_path(out: Path, setting: str = "out") -> None:
    """Name a file standing where ``out`` or one of its parents must be a folder, before anything is
    written (creating the folder would only say 'Not a directory' or 'File exists')."""
    for part in (out, *out.parents):
        if part.exists() and not part.is_dir():
            raise ConfigError(f"{setting}={out} cannot be a folder: {part} is a file; move that file away, or set "
                              f"{setting} to another path")


def _require_same_run(wanted: dict[str, Any], found: dict[str, Any], what: str) -> None:
    differences = checkpoint.describe_differences(found, wanted)
    if differences:
        raise ConfigError(f"{what} belong to another run ({differences}); {WAY_OUT}")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); {WAY_OUT}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} does not hold a run config; {WAY_OUT}")
    return loaded


def prepare(config: RunConfig, topology_record: dict, first_round: int) -> JsonlWriter:
    """Write config.yaml and topology.json; fresh outputs for round 0, else keep the metrics of
    the rounds before ``first_round``. Returns the metrics writer."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG)
    atomic_write_json(out / "topology.json", topology_record)
    metrics = out / METRICS
    if first_round == 0:  # plan_start allowed it: nothing of another run is here, or overwrite was asked
        for folder in (checkpoint.folder_of(out), out / ADAPTERS, out / TENSORBOARD):
            shutil.rmtree(folder, ignore_errors=True)
        (out / SUMMARY).unlink(missing_ok=True)
        return JsonlWriter(metrics)
    # a torn last line (a write the stopped run did not finish) goes too: its round is computed again
    records = read_jsonl(metrics).records if metrics.is_file() else []
    kept = [record for record in records if record["round"] < first_round]
    atomic_write_text(metrics, "".join(to_json(record) + "\n" for record in kept))
    return JsonlWriter(metrics, append=True)


class TensorBoardWriter:
    """Each metrics record's numbers as TensorBoard scalars (step: the round), in out/tensorboard.

    metrics.jsonl stays the record; this is a view of it for TensorBoard. A resumed run adds an
    event file that tells TensorBoard to drop the earlier files' steps from ``first_round`` on, as
    metrics.jsonl drops those rounds.
    """

    def __init__(self, out: Path, first_round: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("log.tensorboard is true but the tensorboard package is not installed; pip install "
                              "'p2p_fedrot[tensorboard]' (or tensorboard), or set log.tensorboard: false") from None
        self._writer = SummaryWriter(str(out / TENSORBOARD), purge_step=first_round or None)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record["round"])
        self._writer.flush()  # like metrics.jsonl, a killed run keeps every finished round

    def close(self) -> None:
        self._writer.close()


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The record's single numbers by tag, nested dicts flattened with '/' (seconds/train); per-peer
    lists stay in metrics.jsonl only, and the round is the step, not a tag."""
    found: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            found.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and prefix + key != "round":
            found[prefix + key] = float(value)
    return found


def last_record(out: Path) -> dict:
    """The newest round's metrics already on disk (a run that only finishes computes none)."""
    metrics = out / METRICS
    records = read_jsonl(metrics).records if metrics.is_file() else []
    return records[-1] if records else {}
