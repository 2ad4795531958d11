"""Save peers' adapters in peft format (``PeftModel.from_pretrained`` loads them), atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .factors import bind_to_flat
from .model import PeerModels, adapter_name

CONSENSUS = "consensus"


def _save_adapter(models: PeerModels, adapter: str, target: Path) -> None:
    """peft writes a named adapter into <dir>/<name>/; stage it there, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        models.model.save_pretrained(staging, selected_adapters=[adapter])
        _sort_sets(staging / adapter / "adapter_config.json")
        if target.exists():  # move the old one aside first: a crash now leaves it in the staging folder
            os.replace(target, staging / "previous")
        os.replace(staging / adapter, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sort_sets(config_file: Path) -> None:
    """peft keeps target_modules as a set and writes it in hash order, which changes from one
    process to the next; sorted, the same adapter gives the same file."""
    config = json.loads(config_file.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_peer_adapters(models: PeerModels, peers: list[int], folder: Path) -> None:
    """One folder per peer: ``folder/peer_007/{adapter_config.json, adapter_model.safetensors}``."""
    for peer in peers:
        _save_adapter(models, adapter_name(peer), folder / adapter_name(peer))


def save_consensus_adapter(models: PeerModels, flats: list[torch.Tensor], folder: Path) -> None:
    """The plain average of the given peers' buffers (factors and head), saved as one more adapter."""
    first = next(iter(models.flats))
    mean = torch.stack(flats).mean(dim=0).to(models.flats[first].device)
    models.model.add_adapter(CONSENSUS, models.model.peft_config[adapter_name(first)])
    try:
        buffer = torch.empty_like(mean)
        bind_to_flat(models.model, CONSENSUS, models.layout, buffer)  # copies the new adapter's init in
        buffer.copy_(mean)
        _save_adapter(models, CONSENSUS, folder / CONSENSUS)
    finally:
        models.model.delete_adapter(CONSENSUS)
