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

from ..config import TrainConfig
from ..errors import ConfigError
from . import galore
from .factors import PARTS, FactorLayout
from .galore import BETAS, EPS, GaLoreSettings


class PeerOptimizers:
    """Moments (rows x numel) and step counts (rows x parts) of every hosted peer; the dense deltas,
    when the layout has them, step with GaLore-Adam (:class:`DenseDeltaOptimizers`)."""

    def __init__(self, config: TrainConfig, layout: FactorLayout, rows: int, device: torch.device,
                 galore: GaLoreSettings | None = None) -> None:
        self.config, self.layout = config, layout
        adam = config.optimizer == "adamw"
        keeps_moment = adam or config.momentum != 0
        numel = layout.optimizer_numel
        self.moment = torch.zeros(rows, numel, device=device) if keeps_moment else None
        self.second = torch.zeros(rows, numel, device=device) if adam else None
        self.steps = torch.zeros(rows, len(PARTS), dtype=torch.int64)
        if layout.delta and galore is None:
            raise ConfigError("the peers' buffers hold dense deltas but the method gives no optimizer for them")
        self.dense = DenseDeltaOptimizers(layout, rows, device, galore, config) if layout.delta else None

    def reset(self, rows: Sequence[int]) -> None:
        """Forget moments and step counts of these rows, as if their optimizers were new."""
        for tensor in (self.moment, self.second):
            if tensor is not None:
                tensor[list(rows)] = 0.0
        self.steps[list(rows)] = 0
        if self.dense is not None:
            self.dense.reset(rows)

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
            if part == "delta":
                self.dense.step(params, block.index, grads[:, start:end], steps)
                continue
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
        if self.dense is not None:
            state.update(self.dense.state_of(row))
        return state

    def load(self, row: int, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore a row from its checkpoint file (``where`` names it in errors)."""
        expected = ["optimizer.steps"] + [key for key, tensor in (("optimizer.moment", self.moment),
                                                                   ("optimizer.second", self.second)) if tensor is not None]
        expected += self.dense.keys() if self.dense is not None else []
        missing = [key for key in expected if key not in state]
        if missing or state["optimizer.steps"].shape != self.steps[row].shape:
            what = f"no {missing[0]}" if missing else "step counts of another layout"
            raise ConfigError(f"{where} holds {what}: it was written by an older version of p2p_fedrot or "
                              f"with another train.optimizer or method; start afresh with --overwrite or another out")
        self.steps[row] = state["optimizer.steps"]
        for key, tensor in (("optimizer.moment", self.moment), ("optimizer.second", self.second)):
            if tensor is not None:
                tensor[row] = state[key].to(tensor.device)
        if self.dense is not None:
            self.dense.load(row, state)

    def state_bytes(self) -> int:
        """Bytes of one peer's optimizer state (its moments, and its dense deltas' projectors and moments)."""
        row = sum(t[0].numel() * t.element_size() for t in (self.moment, self.second) if t is not None)
        return row + (self.dense.state_bytes() if self.dense is not None else 0)


class DenseDeltaOptimizers:
    """GaLore-Adam state of every hosted peer's dense deltas: per module, the projectors and the
    projected moments of all rows, and the lifted second moments a sync delivered, waiting for the
    peer's next step (where they rescale its moments through the projector that step uses)."""

    def __init__(self, layout: FactorLayout, rows: int, device: torch.device, settings: GaLoreSettings,
                 config: TrainConfig) -> None:
        self.layout, self.settings, self.config = layout, settings, config
        self.shapes = [spec.shape for spec in layout.delta]
        self.sides = [galore.side_of(shape, settings.rank) for shape in self.shapes]
        self.projectors = [torch.zeros(rows, *p, device=device) if (p := galore.projector_shape(shape, settings.rank))
                           else None for shape in self.shapes]
        low = [galore.projected_shape(shape, settings.rank) for shape in self.shapes]
        self.moment = [torch.zeros(rows, *shape, device=device) for shape in low]
        self.second = [torch.zeros(rows, *shape, device=device) for shape in low]
        self.pending: dict[int, torch.Tensor] = {}  # row -> lifted second moments received, flattened in layout order

    def reset(self, rows: Sequence[int]) -> None:
        for tensor in self.moment + self.second:
            tensor[list(rows)] = 0.0
        for row in rows:
            self.pending.pop(row, None)

    def step(self, params: torch.Tensor, rows: Sequence[int], grads: torch.Tensor, steps: list[int]) -> None:
        """One GaLore-Adam step of each row's deltas (``grads``: rows x delta numel; ``steps``: each
        row's count including this step). A projector is refitted on the gradient every
        ``proj_every`` steps, starting with the first."""
        settings, config = self.settings, self.config
        for i, (row, step) in enumerate(zip(rows, steps)):
            received = self.pending.pop(row, None)
            offset = 0
            for m, (spec, side) in enumerate(zip(self.layout.delta, self.sides)):
                grad = grads[i, offset : offset + spec.numel].view(spec.shape)
                P = self._projector(m, row)
                own = galore.lift_second(self.second[m][row], P, side) if received is not None else None
                if P is not None and (step - 1) % settings.proj_every == 0:
                    P.copy_(galore.fit_projector(grad, settings.rank, side))
                if received is not None:  # the sync, seen through the projector this step uses
                    synced = received[offset : offset + spec.numel].view(spec.shape)
                    self.second[m][row].copy_(galore.resync_second(self.second[m][row], own, synced, P, side))
                param = params[row, spec.offset : spec.offset + spec.numel].view(spec.shape)
                galore.adam_step(param, grad, P, side, self.moment[m][row], self.second[m][row], step, config.lr,
                                 config.weight_decay, settings.scale)
                offset += spec.numel

    def lifted(self, row: int) -> torch.Tensor:
        """The row's second moments in full weight shape, flattened in layout order (a delivered but
        not yet used sync counts as the row's moments)."""
        if row in self.pending:
            return self.pending[row].clone()
        pieces = [galore.lift_second(self.second[m][row], self._projector(m, row), side).reshape(-1)
                  for m, side in enumerate(self.sides)]
        return torch.cat(pieces)

    def _projector(self, m: int, row: int) -> torch.Tensor | None:
        """Module m's projector of a row (None where the projector is the identity)."""
        return self.projectors[m][row] if self.projectors[m] is not None else None

    def receive(self, row: int, lifted: torch.Tensor) -> None:
        self.pending[row] = lifted.detach().to(self.moment[0].device, torch.float32).clone()

    def _saved(self) -> list[tuple[str, torch.Tensor]]:
        """(checkpoint key, tensor of all rows) of every per-row state tensor: each module's projected
        moments and, where it is not the identity, its projector."""
        saved = []
        for m in range(len(self.shapes)):
            saved += [(f"optimizer.dense.{m}.moment", self.moment[m]), (f"optimizer.dense.{m}.second", self.second[m])]
            if self.projectors[m] is not None:
                saved.append((f"optimizer.dense.{m}.projector", self.projectors[m]))
        return saved

    def keys(self) -> list[str]:
        return [key for key, _ in self._saved()]

    def state_of(self, row: int) -> dict[str, torch.Tensor]:
        state = {key: tensor[row].cpu() for key, tensor in self._saved()}
        if row in self.pending:
            state["optimizer.dense.pending"] = self.pending[row].cpu()
        return state

    def load(self, row: int, state: dict[str, torch.Tensor]) -> None:
        for key, tensor in self._saved():
            tensor[row] = state[key]
        self.pending.pop(row, None)
        if "optimizer.dense.pending" in state:
            self.receive(row, state["optimizer.dense.pending"])

    def state_bytes(self) -> int:
        """One row's projectors and projected moments (a synced run also holds, between the exchange
        and the next step, one lifted moment as large as the deltas)."""
        return sum(tensor[0].numel() * tensor.element_size() for _, tensor in self._saved())


class LiftedMoments:
    """One training peer's :class:`~.methods.base.SecondMoments`, backed by the process's optimizers."""

    def __init__(self, dense: DenseDeltaOptimizers, row: int) -> None:
        self.dense, self.row = dense, row

    def lifted(self) -> torch.Tensor:
        return self.dense.lifted(self.row)

    def receive(self, lifted: torch.Tensor) -> None:
        self.dense.receive(self.row, lifted)


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
