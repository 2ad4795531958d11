"""Frozen base model + one peft LoRA adapter per hosted peer.

The base weights are loaded once per process and shared; each peer is a named peft adapter
(``peer_007``) whose LoRA factors and head are rebound as views of that peer's flat buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .factors import FactorLayout, bind_to_flat, layout_of


class ToyMLP(nn.Module):
    """A small frozen MLP: two hidden layers that LoRA adapts and a trainable classification head."""

    def __init__(self, input_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = torch.nn.functional.gelu(self.fc1(features))
        hidden = torch.nn.functional.gelu(self.fc2(hidden))
        return self.head(hidden)


TOY_MODELS = {"toy:mlp": (ToyMLP, ["fc1", "fc2"], ["head"])}


def adapter_name(peer: int) -> str:
    return f"peer_{peer:03d}"


@dataclass
class PeerModels:
    """The shared peft model, the flat layout, and each hosted peer's buffer."""

    model: PeftModel
    layout: FactorLayout
    flats: dict[int, torch.Tensor]

    def activate(self, peer: int) -> None:
        self.model.set_adapter(adapter_name(peer))


def build_peer_models(config: ModelConfig, peers: list[int], input_dim: int, num_classes: int, seed: int, device: torch.device) -> PeerModels:
    """Build the base model once and give every hosted peer an adapter with the SAME initial factors.

    The base weights and the shared LoRA init come from ``seed`` so that every process (and every
    peer) starts from identical values, as the methods assume.
    """
    if config.name not in TOY_MODELS:
        raise ConfigError(f"unknown model model.name={config.name!r}; available: {', '.join(TOY_MODELS)}")
    builder, default_targets, heads = TOY_MODELS[config.name]
    torch.manual_seed(seed)
    base = builder(input_dim, config.hidden, num_classes)
    targets = config.lora.target_modules or default_targets
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(
            f"model.lora.target_modules {missing} match no module of {config.name}; "
            f"its modules are: {', '.join(sorted(n for n in names if n))}"
        )
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(targets),
        modules_to_save=heads,
    )
    first = adapter_name(peers[0])
    model = get_peft_model(base, lora, adapter_name=first)
    for peer in peers[1:]:
        model.add_adapter(adapter_name(peer), lora)
    model.to(device)
    layout = layout_of(model, first)
    init = torch.empty(layout.numel, device=device)
    bind_to_flat(model, first, layout, init)
    flats = {}
    for peer in peers:
        flats[peer] = init.clone()
        bind_to_flat(model, adapter_name(peer), layout, flats[peer])
        flats[peer].copy_(init)
    return PeerModels(model, layout, flats)
