"""Local optimisation and evaluation of one peer's adapter on the shared base model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import Dataset
from .factors import adapter_parameters
from .model import PeerModels, adapter_name
from .seeding import derive_seed


def logits_of(output) -> torch.Tensor:
    """HF models return an object with ``.logits``; plain modules return the tensor itself."""
    return getattr(output, "logits", output)


class PeerTrainer:
    """Owns one peer's optimizer (kept across rounds) and runs its local steps.

    Batches and dropout draw from seeds derived from (run seed, peer, round), so a peer computes
    the same thing whichever process hosts it.
    """

    def __init__(self, models: PeerModels, peer: int, data: Dataset, config: TrainConfig, seed: int) -> None:
        self.models, self.peer, self.data, self.config, self.seed = models, peer, data, config, seed
        a, b, head = adapter_parameters(models.model, adapter_name(peer))
        self.parts = {"A": [p for _, p in a], "B": [p for _, p in b], "head": [p for _, p in head]}
        params = [p for group in self.parts.values() for p in group]
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    def train(self, round: int, trained_parts: frozenset[str]) -> float:
        """Run ``local_steps`` optimizer steps on the given parts; returns the mean training loss."""
        models, config = self.models, self.config
        models.activate(self.peer)
        for part, params in self.parts.items():
            for p in params:
                p.requires_grad_(part in trained_parts)
        trainable = [p for part in trained_parts for p in self.parts[part]]
        models.model.train()
        torch.manual_seed(derive_seed(self.seed, "dropout", self.peer, round))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "batches", self.peer, round))
        device = models.flats[self.peer].device
        losses = []
        for _ in range(config.local_steps):
            index = torch.randperm(len(self.data), generator=generator)[: config.batch_size]
            inputs = {k: v[index].to(device) for k, v in self.data.inputs.items()}
            labels = self.data.labels[index].to(device)
            loss = F.cross_entropy(logits_of(models.model(**inputs)), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None and trainable:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            self.optimizer.step()
            losses.append(loss.item())
        return sum(losses) / len(losses) if losses else float("nan")


@dataclass
class EvalResult:
    accuracy: float
    loss: float


@torch.no_grad()
def evaluate(models: PeerModels, peer: int, data: Dataset, batch_size: int) -> EvalResult:
    """Accuracy and mean cross-entropy of ``peer``'s adapter on ``data``."""
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"))
    models.activate(peer)
    models.model.eval()
    device = models.flats[peer].device
    correct, loss_sum = 0, 0.0
    for inputs, labels in data.batches(batch_size):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        labels = labels.to(device)
        logits = logits_of(models.model(**inputs))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return EvalResult(correct / len(data), loss_sum / len(data))
