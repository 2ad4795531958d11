"""Each hosted peer's own optimizer, kept as rows beside the peer bank.

A peer's SGD or AdamW behaves exactly like an independent ``torch.optim`` one over its factor
parts: elementwise moments, its own step count per part (a part that sits a round out keeps its
count, as a parameter without a gradient does in torch), decoupled weight decay. Rows of many
peers step together with the same elementwise arithmetic, so stepping one row or many gives the
same update.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import TrainConfig
from .errors import ConfigError
from .factors import PARTS, FactorLayout

BETAS = (0.9, 0.999)  # AdamW's defaults in torch
EPS = 1e-8


class PeerOptimizers:
    """Moments (rows x numel) and step counts (rows x parts) of every hosted peer."""

    def __init__(self, config: TrainConfig, layout: FactorLayout, rows: int, device: torch.device) -> None:
        self.config, self.layout = config, layout
        adam = config.optimizer == "adamw"
        keeps_moment = adam or config.momentum != 0
        self.moment = torch.zeros(rows, layout.numel, device=device) if keeps_moment else None
        self.second = torch.zeros(rows, layout.numel, device=device) if adam else None
        self.steps = torch.zeros(rows, len(PARTS), dtype=torch.int64)

    def reset(self, rows: Sequence[int]) -> None:
        """Forget moments and step counts of these rows, as if their optimizers were new."""
        for tensor in (self.moment, self.second):
            if tensor is not None:
                tensor[list(rows)] = 0.0
        self.steps[list(rows)] = 0

    @torch.no_grad()
    def step(self, params: torch.Tensor, rows: Sequence[int], grads: torch.Tensor, parts: frozenset[str]) -> None:
        """One step of the given rows of ``params`` (the bank) with their gradients (len(rows) x numel)."""
        block = _Rows(rows)
        for column, part in enumerate(PARTS):
            start, end = self.layout.segments[part]
            if part not in parts or start == end:
                continue
            self.steps[block.index, column] += 1
            steps = self.steps[block.index, column].tolist()
            sliced = [block.read(t, start, end) if t is not None else None for t in (params, self.moment, self.second)]
            param, moment, second = sliced
            grad = grads[:, start:end]
            if self.config.optimizer == "adamw":
                _adamw(param, grad, moment, second, steps, self.config)
            else:
                _sgd(param, grad, moment, steps, self.config)
            for tensor, value in zip((params, self.moment, self.second), sliced):
                if tensor is not None:
                    block.write(tensor, start, end, value)

    @torch.no_grad()
    def rotate(self, row: int, rotations: list[torch.Tensor]) -> None:
        """Follow a rotation of the row's factors (A <- R^T A, B <- B R per module) with its first
        moment (SGD momentum, Adam's m), which is linear in the gradients and so rotates exactly.
        Adam's second moment is a per-coordinate square with no rotated counterpart; it is kept."""
        if self.moment is None:
            return
        moment = self.moment[row]
        for R, a, b in zip(rotations, self.layout.a_views(moment), self.layout.b_views(moment)):
            R = R.to(moment)
            a.copy_(R.T @ a)
            b.copy_(b @ R)

    def state_of(self, row: int) -> dict[str, torch.Tensor]:
        """One row's state, for its checkpoint file."""
        state = {"optimizer.steps": self.steps[row].clone()}
        for key, tensor in (("optimizer.moment", self.moment), ("optimizer.second", self.second)):
            if tensor is not None:
                state[key] = tensor[row].cpu()
        return state

    def load(self, row: int, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore a row from its checkpoint file (``where`` names it in errors)."""
        missing = [key for key in ("optimizer.steps", "optimizer.moment", "optimizer.second")
                   if key not in state and (key == "optimizer.steps" or getattr(self, key.split(".")[1]) is not None)]
        if missing:
            raise ConfigError(f"{where} holds no {missing[0]}: it was written by an older version of p2p_fedrot or "
                              f"with another train.optimizer; start afresh with --overwrite or another out")
        self.steps[row] = state["optimizer.steps"]
        for key, tensor in (("optimizer.moment", self.moment), ("optimizer.second", self.second)):
            if tensor is not None:
                tensor[row] = state[key].to(tensor.device)


class _Rows:
    """Rows of a (rows x numel) tensor: views when consecutive, else gathered and written back."""

    def __init__(self, rows: Sequence[int]) -> None:
        self.index = list(rows)
        first = self.index[0]
        self.range = slice(first, first + len(self.index)) if self.index == list(range(first, first + len(self.index))) else None

    def read(self, tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if self.range is not None:
            return tensor[self.range, start:end]
        return tensor[self.index, start:end]

    def write(self, tensor: torch.Tensor, start: int, end: int, value: torch.Tensor) -> None:
        if self.range is None:
            tensor[self.index, start:end] = value


def _adamw(param: torch.Tensor, grad: torch.Tensor, moment: torch.Tensor, second: torch.Tensor,
           steps: list[int], config: TrainConfig) -> None:
    """torch's single-tensor AdamW, one step per row (bias corrections from each row's own count)."""
    beta1, beta2 = BETAS
    param.mul_(1 - config.lr * config.weight_decay)
    moment.lerp_(grad, 1 - beta1)
    second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if len(set(steps)) == 1:
        step = steps[0]
        step_size = config.lr / (1 - beta1**step)
        denominator = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(EPS)
        param.addcdiv_(moment, denominator, value=-step_size)
        return
    counts = torch.tensor(steps, dtype=torch.float64)[:, None]
    step_size = (config.lr / (1 - beta1**counts)).to(param)
    correction = (1 - beta2**counts).sqrt().to(param)
    param.sub_(step_size * moment / (second.sqrt() / correction).add_(EPS))


def _sgd(param: torch.Tensor, grad: torch.Tensor, moment: torch.Tensor | None, steps: list[int],
         config: TrainConfig) -> None:
    """torch's single-tensor SGD (no dampening, no Nesterov); the momentum buffer starts as the first gradient."""
    if config.weight_decay:
        grad = grad.add(param, alpha=config.weight_decay)
    if moment is not None:
        first = torch.tensor([s == 1 for s in steps], device=param.device)[:, None]
        moment.copy_(torch.where(first, grad, moment * config.momentum + grad))
        grad = moment
    param.add_(grad, alpha=-config.lr)
