"""Local optimisation and evaluation of one peer's adapter on the shared base model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import IGNORE_INDEX, Dataset
from .errors import ConfigError, DivergedError
from .factors import adapter_parameters
from .model import CAUSAL_LM, PeerModels, adapter_name
from .seeding import derive_seed


def logits_of(output) -> torch.Tensor:
    """HF models return an object with ``.logits``; plain modules return the tensor itself."""
    return getattr(output, "logits", output)


def batch_scores(models: PeerModels, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(summed loss, correct predictions, counted targets) of the active adapter on one batch.

    Classification counts examples; a causal LM counts next-token predictions (padding skipped).
    """
    logits = logits_of(models.model(**inputs)).float()
    if models.task == CAUSAL_LM:
        logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    loss_sum = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    counted = labels != IGNORE_INDEX
    correct = int(((logits.argmax(dim=-1) == labels) & counted).sum())
    return loss_sum, correct, int(counted.sum())


def autocast_for(device: torch.device, precision: str):
    """Mixed precision on GPU (bf16 where supported, or as configured); full fp32 otherwise."""
    if device.type == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    elif precision == "auto":
        precision = "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("model.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class PeerTrainer:
    """Owns one peer's optimizer (kept across rounds unless reset) and runs its local steps.

    Batches and dropout draw from seeds derived from (run seed, peer, round), so a peer computes
    the same thing whichever process hosts it.
    """

    def __init__(self, models: PeerModels, peer: int, data: Dataset, config: TrainConfig, seed: int,
                 precision: str = "auto", stream: int | None = None) -> None:
        self.models, self.peer, self.data, self.config, self.seed = models, peer, data, config, seed
        self.precision = precision
        self.stream = peer if stream is None else stream  # key of its batch and dropout seeds
        device = models.flats[peer].device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        a, b, head = adapter_parameters(models.model, adapter_name(peer))
        self.parts = {"A": [p for _, p in a], "B": [p for _, p in b], "head": [p for _, p in head]}
        params = [p for group in self.parts.values() for p in group]
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    def reset_optimizer(self) -> None:
        """Forget moments and step counts, as if the optimizer were new (its settings stay)."""
        self.optimizer.state.clear()

    def train(self, round: int, trained_parts: frozenset[str]) -> float:
        """Run ``local_steps`` optimizer steps on the given parts; returns the mean training loss."""
        models, config = self.models, self.config
        models.activate(self.peer)
        for part, params in self.parts.items():
            for p in params:
                p.requires_grad_(part in trained_parts)
        # Walk the parts in the layout's fixed order, never in the set's: a set of strings iterates
        # in an order that changes with each process's hash seed, and the clipping norm sums over
        # this list, so its float rounding (and every later round) would differ from run to run.
        trainable = [p for part, params in self.parts.items() if part in trained_parts for p in params]
        models.model.train()
        torch.manual_seed(derive_seed(self.seed, "dropout", self.stream, round))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "batches", self.stream, round))
        device = models.flats[self.peer].device
        losses = []
        for _ in range(config.local_steps):
            index = torch.randperm(len(self.data), generator=generator)[: config.batch_size]
            inputs = {k: v[index].to(device) for k, v in self.data.inputs.items()}
            labels = self.data.labels[index].to(device)
            with autocast_for(device, self.precision):
                loss_sum, _, count = batch_scores(models, inputs, labels)
            loss = loss_sum / max(count, 1)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if config.grad_clip is not None and trainable:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(loss.item())
        if not all(math.isfinite(value) for value in losses):
            raise DivergedError(
                f"peer {self.peer}, round {round}: the training loss became {losses[-1]} (losses of its local steps: "
                f"{', '.join(f'{v:.4g}' for v in losses)}); lower train.lr (now {config.lr:g}) or train.grad_clip "
                f"(now {config.grad_clip})"
            )
        return sum(losses) / len(losses) if losses else float("nan")


@dataclass
class EvalResult:
    accuracy: float  # classification accuracy, or next-token accuracy for a causal LM
    loss: float  # mean cross-entropy per example (per token for a causal LM)


@torch.no_grad()
def evaluate(models: PeerModels, peer: int, data: Dataset, batch_size: int, precision: str = "auto") -> EvalResult:
    """Accuracy and mean cross-entropy of ``peer``'s adapter on ``data``."""
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"))
    models.activate(peer)
    models.model.eval()
    device = models.flats[peer].device
    correct, counted, loss_total = 0, 0, 0.0
    for inputs, labels in data.batches(batch_size):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast_for(device, precision):
            loss_sum, right, count = batch_scores(models, inputs, labels.to(device))
        loss_total += float(loss_sum)
        correct += right
        counted += count
    return EvalResult(correct / max(counted, 1), loss_total / max(counted, 1))
