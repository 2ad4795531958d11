"""Checkpoints that let a stopped run go on exactly where it ended, on any number of processes.

Every random draw of a round is seeded from (seed, peer, round), so a peer's future depends only
on its buffer, its optimizer state and the method's shared state. A checkpoint holds those, per
peer, in ``out/checkpoint/round_XXXX/`` (safetensors), plus ``latest.json``, written last and
atomically, which names the newest complete folder: a crash while saving leaves the previous
checkpoint in force. Per-peer files make the checkpoint independent of how peers were placed on
processes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..config import differing, dotted, first_few, with_defaults
from ..errors import ConfigError
from ..io import atomic_write_bytes, atomic_write_json, read_json

LATEST = "latest.json"
SHARED = "shared.safetensors"
# Keys that may change when a run is resumed: they do not alter what a round computes.
FREE_KEYS = ("rounds", "out", "resume", "overwrite", "checkpoint_every", "threads", "eval", "log", "comm.backend",
             "comm.timeout_s")


def folder_of(out: Path) -> Path:
    return out / "checkpoint"


def peer_file(folder: Path, peer: int) -> Path:
    return folder / f"peer_{peer:03d}.safetensors"


def save_peer(folder: Path, peer: int, flat: torch.Tensor, optimizer_state: dict[str, torch.Tensor]) -> None:
    """A peer's buffer and its optimizer's state (moments and step counts; empty for a peer that does not train)."""
    save_tensors(peer_file(folder, peer), {"flat": flat, **optimizer_state})


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def save_shared(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The method's own state (e.g. fedex's base weights), the same on every process."""
    if tensors:
        save_tensors(folder / SHARED, tensors)


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config as dotted keys (``train.lr``), without the keys a resumed run may change."""
    return {key: value for key, value in dotted(with_defaults(config)).items()
            if not any(key == free or key.startswith(free + ".") for free in FREE_KEYS)}


def describe_differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    """"train.lr is 0.5 here but 0.1 there; ...": how two run configs differ, the free keys aside
    ("" when they describe the same run)."""
    old, new = comparable(before), comparable(now)
    return first_few([f"{k} is {new.get(k)!r} here but {old.get(k)!r} there" for k in differing(old, new)], 4)


def commit(out: Path, round: int, meta: dict[str, Any]) -> None:
    """Point ``latest.json`` at the folder of ``round`` (complete by now), then drop older folders."""
    root = folder_of(out)
    atomic_write_json(root / LATEST, {"round": round, "folder": round_folder(out, round).name, **meta})
    for old in root.glob("round_*"):
        if old.name != round_folder(out, round).name:
            shutil.rmtree(old, ignore_errors=True)


def round_folder(out: Path, round: int) -> Path:
    return folder_of(out) / f"round_{round:04d}"


@dataclass
class Checkpoint:
    """A committed checkpoint: the last finished round and where its tensors are."""

    round: int
    folder: Path
    meta: dict[str, Any]

    def peer(self, peer: int) -> dict[str, torch.Tensor]:
        path = peer_file(self.folder, peer)
        if not path.is_file():
            raise ConfigError(f"checkpoint {self.folder} has no file for peer {peer}; it is incomplete: use "
                              "another out, or --overwrite to start the run again")
        return _load(path)

    def shared(self) -> dict[str, torch.Tensor]:
        path = self.folder / SHARED
        return _load(path) if path.is_file() else {}


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error type for a damaged header or body
        raise ConfigError(f"checkpoint file {path} cannot be read ({exc}); it is damaged: use another out, or "
                          "--overwrite to start the run again") from None


def latest(out: Path) -> Checkpoint | None:
    """The committed checkpoint in ``out``, or None when there is none."""
    path = folder_of(out) / LATEST
    if not path.is_file():
        return None
    meta = read_json(path)
    if not isinstance(meta, dict) or not {"round", "folder", "config"} <= meta.keys():
        raise ConfigError(f"{path} lacks round, folder or config; it is damaged: use another out, or --overwrite to "
                          "start the run again")
    return Checkpoint(meta["round"], folder_of(out) / meta["folder"], meta)
