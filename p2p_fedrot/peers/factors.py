"""LoRA factors of one peer <-> one flat contiguous buffer.

Each peer's adapter parameters are rebound as views of a single 1-D tensor laid out as
``[A of every module | B of every module | trainable head | dense deltas]``; the dense deltas (one
full-shape dW per adapted module) exist only for methods that train them (FedGaLore). Training updates the buffer in place,
so sending, mixing and aligning need no gather/scatter copies, and a received buffer from another
peer can be read with the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

PARTS = ("A", "B", "head", "delta")  # buffer order


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
    delta: tuple[TensorSpec, ...] = ()  # dense dW per module (named as the base weight), after the head

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        """Every tensor in buffer order."""
        return self.a + self.b + self.head + self.delta

    @property
    def optimizer_numel(self) -> int:
        """Length of the buffer's prefix that elementwise optimizers step (all but the dense deltas,
        which have their own projected optimizer)."""
        return self.segments["delta"][0]

    def a_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [spec.view(flat) for spec in self.a]

    def b_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [spec.view(flat) for spec in self.b]

    def delta_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [spec.view(flat) for spec in self.delta]

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


def layout_of_state(state: Mapping[str, torch.Tensor], scalings: Mapping[str, float], prefix: str,
                    dense_shapes: Mapping[str, tuple[int, int]] | None = None) -> FactorLayout:
    """The flat layout of one adapter from its peft state dict (names as peft saves them, in model
    order): every A, then every B, then the trained head. ``scalings`` maps the adapted modules'
    names (without ``prefix``) to peft's alpha / r. With ``dense_shapes`` (module -> base weight
    shape) a dense delta per module follows, named ``<module>.weight`` as the base weight it adds to."""
    parts: dict[str, list[tuple[str, torch.Tensor]]] = {part: [] for part in PARTS}
    for name, tensor in state.items():
        part = "A" if ".lora_A." in name else "B" if ".lora_B." in name else "head"
        parts[part].append((name, tensor))
    if not parts["A"]:
        raise ValueError("the adapter has no LoRA factors")
    modules = tuple(name[len(prefix):].split(".lora_A.")[0] for name, _ in parts["A"])
    if dense_shapes is not None:
        parts["delta"] = [(f"{m}.weight", torch.empty(dense_shapes[m], device="meta")) for m in modules]
    offset = 0
    segments: dict[str, tuple[int, int]] = {}
    specs: dict[str, tuple[TensorSpec, ...]] = {}
    for part in PARTS:
        start = offset
        part_specs = []
        for name, tensor in parts[part]:
            part_specs.append(TensorSpec(name, tuple(tensor.shape), offset))
            offset += tensor.numel()
        segments[part] = (start, offset)
        specs[part] = tuple(part_specs)
    return FactorLayout(modules, tuple(scalings[m] for m in modules), specs["A"], specs["B"], specs["head"],
                        segments, offset, specs["delta"])
