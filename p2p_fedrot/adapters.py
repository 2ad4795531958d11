"""Peers' adapters in peft's layout (``PeftModel.from_pretrained`` loads them), written atomically.

Each adapter is a folder with peft's adapter_config.json and adapter_model.safetensors holding the
factors and head under the names peft gives them. The bank writes them directly from its rows,
so a thousand adapters take seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .bank import PeerBank
from .factors import FactorLayout

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
CONSENSUS = "consensus"


def adapter_name(peer: int) -> str:
    return f"peer_{peer:03d}"


def save_adapter(layout: FactorLayout, config_text: str, flat: torch.Tensor, target: Path) -> None:
    """One adapter folder; a crash leaves either the old folder or the new one, never half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        flat = flat.detach().cpu()
        tensors = {spec.name: spec.view(flat).clone() for spec in layout.specs}
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(config_text)
        if target.exists():  # move the old one aside first: a crash now leaves it in the staging folder
            os.replace(target, staging / "previous")
        final = staging / "adapter"
        final.mkdir()
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(staging / name, final / name)
        os.replace(final, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_peer_adapters(bank: PeerBank, peers: list[int], folder: Path) -> None:
    """One folder per peer: ``folder/peer_007/{adapter_config.json, adapter_model.safetensors}``."""
    for peer in peers:
        save_adapter(bank.layout, bank.adapter_config, bank.flat(peer), folder / adapter_name(peer))


def save_consensus_adapter(bank: PeerBank, mean: torch.Tensor, folder: Path) -> None:
    """The average of the peers' buffers (factors and head), saved as one more adapter."""
    save_adapter(bank.layout, bank.adapter_config, mean, folder / CONSENSUS)

