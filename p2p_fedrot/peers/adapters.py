"""Peers' adapters in peft's layout (``PeftModel.from_pretrained`` loads them), written atomically.

Each adapter is a folder with peft's adapter_config.json and adapter_model.safetensors holding the
factors and head under the names peft gives them. The bank writes them directly from its rows,
so a thousand adapters take seconds. A method that trains dense deltas (fedgalore) adds
dense_deltas.safetensors: dW per adapted weight, named as the base model's weight it adds to
(:func:`add_dense_deltas` applies them). A classifier's folder also holds config.json, the base
model's config with the data's class names as ``id2label`` / ``label2id``: transformers reads it
with ``AutoConfig.from_pretrained(folder)``, so predictions can be named without the run's data.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from .bank import PeerBank
from .factors import FactorLayout

CONFIG_FILE, WEIGHTS_FILE, DELTAS_FILE = "adapter_config.json", "adapter_model.safetensors", "dense_deltas.safetensors"
MODEL_CONFIG_FILE = "config.json"  # where transformers keeps a model's id2label / label2id
CONSENSUS = "consensus"


def adapter_name(peer: int) -> str:
    return f"peer_{peer:03d}"


def save_adapter(layout: FactorLayout, texts: dict[str, str], flat: torch.Tensor, target: Path) -> None:
    """One adapter folder (``texts``: its JSON files by name); a crash leaves either the old folder
    or the new one, never half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        flat = flat.detach().cpu()
        tensors = {spec.name: spec.view(flat).clone() for spec in layout.a + layout.b + layout.head}
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        files = [WEIGHTS_FILE, *texts]
        if layout.delta:
            save_file({spec.name: spec.view(flat).clone() for spec in layout.delta}, staging / DELTAS_FILE,
                      metadata={"format": "pt"})
            files.append(DELTAS_FILE)
        for name, text in texts.items():
            (staging / name).write_text(text)
        if target.exists():  # move the old one aside first: a crash now leaves it in the staging folder
            os.replace(target, staging / "previous")
        final = staging / "adapter"
        final.mkdir()
        for name in files:
            os.replace(staging / name, final / name)
        os.replace(final, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_peer_adapters(bank: PeerBank, peers: list[int], folder: Path, labels: Sequence[str] = ()) -> None:
    """One folder per peer: ``folder/peer_007/{adapter_config.json, adapter_model.safetensors}``, and
    config.json naming the classes when ``labels`` are given."""
    texts = adapter_texts(bank, labels)
    for peer in peers:
        save_adapter(bank.layout, texts, bank.flat(peer), folder / adapter_name(peer))


def save_consensus_adapter(bank: PeerBank, mean: torch.Tensor, folder: Path, labels: Sequence[str] = ()) -> None:
    """The average of the peers' buffers (factors and head), saved as one more adapter."""
    save_adapter(bank.layout, adapter_texts(bank, labels), mean, folder / CONSENSUS)


def adapter_texts(bank: PeerBank, labels: Sequence[str]) -> dict[str, str]:
    """peft's adapter_config.json, and for a classifier (``labels`` = class names by id) config.json."""
    texts = {CONFIG_FILE: bank.adapter_config}
    if labels:
        texts[MODEL_CONFIG_FILE] = label_config_text(bank.model, labels)
    return texts


def label_config_text(model: torch.nn.Module, labels: Sequence[str]) -> str:
    """The base model's config (an empty one for a model without, the toy MLP) with ``labels`` as
    id2label / label2id, written as ``save_pretrained`` writes it, so AutoConfig reads it back."""
    base = getattr(model, "config", None)
    config = copy.deepcopy(base) if isinstance(base, PretrainedConfig) else PretrainedConfig()
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: index for index, name in enumerate(labels)}
    return config.to_json_string()


@torch.no_grad()
def add_dense_deltas(model: torch.nn.Module, folder: Path) -> None:
    """Add an adapter folder's dense deltas (if it has any) to the base model's weights in place,
    the base model being the one the run adapted (before or after peft wraps it)."""
    path = Path(folder) / DELTAS_FILE
    if not path.exists():
        return
    weights = {name.removeprefix("base_model.model."): p for name, p in model.named_parameters()}
    weights.update({name.replace(".base_layer.", "."): p for name, p in weights.items() if ".base_layer." in name})
    for name, delta in load_file(path).items():
        if name not in weights:
            raise ValueError(f"{path} holds a delta for {name}, which the model has no weight for")
        weights[name].add_(delta.to(weights[name]))
