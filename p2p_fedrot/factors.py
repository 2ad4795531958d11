"""LoRA factors of one peer <-> one flat contiguous buffer.

Each peer's adapter parameters are rebound as views of a single 1-D tensor laid out as
``[A of every module | B of every module | trainable head]``. Training updates the buffer in place,
so sending, mixing and aligning need no gather/scatter copies, and a received buffer from another
peer can be read with the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

PARTS = ("A", "B", "head")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.shape)


@dataclass(frozen=True)
class FactorLayout:
    """Where every factor of a peer lives in its flat buffer; identical for all peers of a run."""

    modules: tuple[str, ...]  # LoRA-wrapped module names, in model order
    scalings: tuple[float, ...]  # peft's alpha / r per module (dW = scaling * B A)
    a: tuple[TensorSpec, ...]
    b: tuple[TensorSpec, ...]
    head: tuple[TensorSpec, ...]
    segments: dict[str, tuple[int, int]]  # part -> [start, end) in the buffer
    numel: int

    def a_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [spec.view(flat) for spec in self.a]

    def b_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [spec.view(flat) for spec in self.b]

    def ranges(self, parts: Iterable[str]) -> list[tuple[int, int]]:
        """Buffer ranges of the given parts, adjacent ranges merged, in buffer order."""
        wanted = set(parts)
        unknown = wanted - set(PARTS)
        if unknown:
            raise ValueError(f"unknown factor part(s) {sorted(unknown)}; valid: {PARTS}")
        merged: list[tuple[int, int]] = []
        for part in PARTS:
            start, end = self.segments[part]
            if part not in wanted or start == end:
                continue
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        return merged

    def payload_numel(self, parts: Iterable[str]) -> int:
        return sum(end - start for start, end in self.ranges(parts))

    def extract(self, flat: torch.Tensor, parts: Iterable[str]) -> torch.Tensor:
        """The parts of ``flat`` as one 1-D tensor: a view when contiguous, else one concatenation."""
        pieces = [flat[start:end] for start, end in self.ranges(parts)]
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if pieces else flat[:0]

    def insert(self, flat: torch.Tensor, parts: Iterable[str], payload: torch.Tensor) -> None:
        """Inverse of :meth:`extract`: copy a payload back into the parts of ``flat``."""
        cursor = 0
        for start, end in self.ranges(parts):
            flat[start:end].copy_(payload[cursor : cursor + end - start])
            cursor += end - start


def adapter_parameters(model: nn.Module, adapter: str) -> tuple[list, list, list]:
    """(A, B, head) lists of (name, parameter) of one peft adapter, in model order."""
    a, b, head = [], [], []
    for name, param in model.named_parameters():
        if f".lora_A.{adapter}." in name:
            a.append((name, param))
        elif f".lora_B.{adapter}." in name:
            b.append((name, param))
        elif f".modules_to_save.{adapter}." in name:
            head.append((name, param))
    return a, b, head


def layout_of(model: nn.Module, adapter: str) -> FactorLayout:
    """Describe the flat layout of ``adapter``'s trainable tensors in ``model``."""
    a, b, head = adapter_parameters(model, adapter)
    if not a:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}")
    modules = tuple(name.split(f".lora_A.{adapter}.")[0] for name, _ in a)
    lookup = dict(model.named_modules())
    scalings = tuple(float(lookup[m].scaling[adapter]) for m in modules)
    offset = 0
    segments: dict[str, tuple[int, int]] = {}
    specs: dict[str, tuple[TensorSpec, ...]] = {}
    for part, params in zip(PARTS, (a, b, head)):
        start = offset
        part_specs = []
        for name, param in params:
            part_specs.append(TensorSpec(name.replace(f".{adapter}.", "."), tuple(param.shape), offset))
            offset += param.numel()
        segments[part] = (start, offset)
        specs[part] = tuple(part_specs)
    return FactorLayout(modules, scalings, specs["A"], specs["B"], specs["head"], segments, offset)


def bind_to_flat(model: nn.Module, adapter: str, layout: FactorLayout, flat: torch.Tensor) -> None:
    """Make ``adapter``'s parameters views of ``flat`` (its current values are copied in first).

    Call before creating the peer's optimizer: the optimizer then updates the buffer directly.
    """
    if flat.numel() != layout.numel or flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"flat buffer must be 1-D contiguous with {layout.numel} elements")
    a, b, head = adapter_parameters(model, adapter)
    for (_, param), spec in zip(a + b + head, layout.a + layout.b + layout.head):
        view = spec.view(flat)
        view.copy_(param.detach().to(flat.dtype))
        param.data = view
