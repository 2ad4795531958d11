"""The peer bank: every hosted peer's LoRA factors and head, stacked, on one frozen base model.

peft keeps one module per adapter and walks all of them on every switch, so hosting N peers costs
O(N) per switch and O(N^2) per round. Here each adapted layer reads its factors from the rows of
one (peers x numel) tensor, laid out as ``FactorLayout`` says: a hosted peer costs its own
parameters, switching peers is choosing rows, and all hosted peers can run in one forward over
their concatenated batches (one batched matmul per layer). peft still decides which layers are
adapted, initialises the factors and names them as its adapter files do.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from .factors import FactorLayout, layout_of_state

if TYPE_CHECKING:
    from .prefix import PrefixCache

PEFT_PREFIX = "base_model.model."  # how peft names the wrapped model's modules in its adapter files
ADAPTER = "default"
ROW_ALIGNMENT = 16  # float32 elements per 64 bytes


@dataclass
class BankRun:
    """What the bank layers read during one forward: one tensor per layout entry with a leading
    dimension of rows (the peers being run), and how many examples of the batch each row owns."""

    tensors: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def split(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """``x`` as one (rows, examples, ...) tensor when every row has as many examples, else
        one piece per row."""
        if len(set(self.sizes)) == 1:
            return x.reshape(len(self.sizes), -1, *x.shape[1:])
        return list(x.split(self.sizes))


class LoRABankLinear(nn.Module):
    """A frozen layer plus each row's LoRA path: base(x) + s * B_i A_i dropout(x) for the rows' examples,
    and, when the layout has dense deltas, + dW_i x (the base weight's own update, no dropout).

    ``fan_in_fan_out``: the base stores its weight as (in, out) (a GPT-2 style Conv1D, as peft flags
    it), so an update of the (out, in) map must be transposed before it is added to that weight."""

    def __init__(self, base: nn.Module, a: int, b: int, scaling: float, dropout: nn.Module, run: BankRun,
                 delta: int | None = None, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scaling, self.dropout, self.run = base, a, b, scaling, dropout, run
        self.delta, self.fan_in_fan_out = delta, fan_in_fan_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        A, B = self.run.tensors[self.a], self.run.tensors[self.b]
        if self.delta is not None:
            result = result + _per_row_linear(x.to(A.dtype), self.run.tensors[self.delta], self.run)
        x = self.dropout(x.to(A.dtype))
        if A.shape[0] == 1:  # one peer: exactly peft's computation
            return result + F.linear(F.linear(x, A[0]), B[0]) * self.scaling
        pieces = self.run.split(x)
        if isinstance(pieces, torch.Tensor):
            flat = pieces.flatten(1, -2)
            delta = torch.bmm(torch.bmm(flat, A.transpose(1, 2)), B.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        else:
            delta = torch.cat([F.linear(F.linear(p, A[i]), B[i]) for i, p in enumerate(pieces)])
        return result + delta * self.scaling


def _per_row_linear(x: torch.Tensor, W: torch.Tensor, run: BankRun, b: torch.Tensor | None = None) -> torch.Tensor:
    """x W_i^T (+ b_i) for each row's share of the batch (W: rows x out x in)."""
    if W.shape[0] == 1:
        return F.linear(x, W[0], None if b is None else b[0])
    pieces = run.split(x)
    if isinstance(pieces, torch.Tensor):
        out = torch.bmm(pieces.flatten(1, -2), W.transpose(1, 2))
        if b is not None:
            out = out + b.unsqueeze(1)
        return out.reshape(*x.shape[:-1], -1)
    return torch.cat([F.linear(p, W[i], None if b is None else b[i]) for i, p in enumerate(pieces)])


class HeadBankLinear(nn.Module):
    """A trainable linear layer (classification head) whose weight and bias are the rows' own."""

    def __init__(self, weight: int, bias: int | None, run: BankRun) -> None:
        super().__init__()
        self.weight, self.bias, self.run = weight, bias, run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.run.tensors[self.bias] if self.bias is not None else None
        return _per_row_linear(x, self.run.tensors[self.weight], self.run, b)


class PeerStreams(TorchFunctionMode):
    """Random ops of a training forward (dropout, attention dropout) drawn per peer.

    Each row's share of the batch is run under a seed taken from that peer's own generator, so
    a peer gets the same masks whether it runs alone or beside others, on any process.
    """

    RANDOM = {F.dropout: "p", F.scaled_dot_product_attention: "dropout_p"}

    def __init__(self, run: BankRun, generators: Sequence[torch.Generator], device: torch.device) -> None:
        super().__init__()
        self.run, self.generators = run, generators
        self.devices = [device] if device.type == "cuda" else []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = self.RANDOM.get(func)
        if key is None or not self._active(func, key, args, kwargs):
            return func(*args, **kwargs)
        batch = sum(self.run.sizes)
        leading = args[0].shape[0]
        if leading % batch:
            raise RuntimeError(f"{func.__name__} got a tensor of shape {tuple(args[0].shape)} whose first dimension "
                               f"is not a multiple of the batch ({batch} examples): it cannot be split by peer")
        sizes = [s * (leading // batch) for s in self.run.sizes]
        outputs = []
        for row, generator in enumerate(self.generators):
            start = sum(sizes[:row])
            part = [self._rows(a, start, sizes[row], leading) for a in args]
            part_kwargs = {k: self._rows(v, start, sizes[row], leading) for k, v in kwargs.items()}
            seed = int(torch.randint(2**62, (), generator=generator))
            with torch.random.fork_rng(devices=self.devices):
                self._seed(seed)
                outputs.append(func(*part, **part_kwargs))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _seed(self, seed: int) -> None:
        """Seed the generators that the forward draws from: the CPU's and this device's.
        ``torch.manual_seed`` would also queue a call for every accelerator type that was never
        started, formatting the whole stack each time: deep in a model's forward, that was a fifth
        of a 100-round MiniLM run at batch 4 (2-3% at batch 16 and 64 tokens)."""
        torch.default_generator.manual_seed(seed)
        for device in self.devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)

    @staticmethod
    def _active(func, key: str, args: tuple, kwargs: dict) -> bool:
        if func is F.dropout:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            return bool(training) and p > 0
        return kwargs.get(key, args[4] if len(args) > 4 else 0.0) > 0

    @staticmethod
    def _rows(value, start: int, size: int, leading: int):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == leading:
            return value[start : start + size]
        return value


class PeerBank:
    """The process's base model with bank layers, the factor layout and every hosted peer's row."""

    def __init__(self, model: nn.Module, layout: FactorLayout, flats: torch.Tensor, peers: Sequence[int],
                 task: str, run: BankRun, adapter_config: str) -> None:
        self.model, self.layout, self.flats, self.task, self.run = model, layout, flats, task, run
        self.peers = list(peers)
        self.row_of = {peer: row for row, peer in enumerate(self.peers)}
        self.adapter_config = adapter_config  # peft's adapter_config.json, the same for every peer
        self.prefix: PrefixCache | None = None  # the frozen-prefix cache, when one is installed (prefix.py)

    @property
    def device(self) -> torch.device:
        return self.flats.device

    def flat(self, peer: int) -> torch.Tensor:
        """Peer's buffer: a view of its row, which training, mixing and aligning update in place."""
        return self.flats[self.row_of[peer]]

    def rows(self, peers: Sequence[int]) -> torch.Tensor:
        """The peers' rows, a view when they are consecutive (else a copy)."""
        index = [self.row_of[p] for p in peers]
        if index == list(range(index[0], index[0] + len(index))):
            return self.flats[index[0] : index[0] + len(index)]
        return self.flats[index]

    @contextlib.contextmanager
    def running(self, weights: torch.Tensor, sizes: Sequence[int], trained: Sequence[bool] | None = None) -> Iterator[list[torch.Tensor]]:
        """Run the model with ``weights`` (rows x numel), row i owning ``sizes[i]`` examples of the batch.

        With ``trained`` (one flag per layout entry) the entries are fresh leaves sharing the
        rows' storage, those flagged requiring gradients; they are yielded so the caller can read
        their ``.grad`` after backward.
        """
        entries = []
        for index, spec in enumerate(self.layout.specs):
            view = weights[:, spec.offset : spec.offset + spec.numel].view(weights.shape[0], *spec.shape)
            if trained is not None:
                view = view.detach().requires_grad_(trained[index])
            entries.append(view)
        self.run.tensors, self.run.sizes = entries, list(sizes)
        try:
            yield entries
        finally:
            self.run.tensors, self.run.sizes = [], []


def bank_model(peft_model: PeftModel, peers: Sequence[int], task: str, device: torch.device,
               dense_deltas: bool = False) -> PeerBank:
    """Turn a peft model with one adapter into a bank: its LoRA layers and saved heads are replaced by
    bank layers, and every peer's row starts from that adapter's initial values. With
    ``dense_deltas`` each adapted layer also reads a full-shape delta of its weight (starting at 0)."""
    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER)
    model = peft_model.base_model.model
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    unsupported = [name for name, m in lora_layers.items() if not isinstance(m, PeftLoraLinear)]
    if unsupported:
        raise ConfigError(f"model.lora.target_modules adapts {unsupported[0]} ({type(lora_layers[unsupported[0]].get_base_layer()).__name__}); "
                          "the peer bank adapts linear layers only: choose linear layers as targets")
    scalings = {name: float(m.scaling[ADAPTER]) for name, m in lora_layers.items()}
    dense = {name: tuple(m.get_base_layer().weight.shape) for name, m in lora_layers.items()} if dense_deltas else None
    layout = layout_of_state(state, scalings, PEFT_PREFIX, dense)
    run = BankRun()
    index = {spec.name: i for i, spec in enumerate(layout.specs)}
    for name, layer in lora_layers.items():
        key = PEFT_PREFIX + name
        dropout = layer.lora_dropout[ADAPTER]
        bank_layer = LoRABankLinear(layer.get_base_layer(), index[f"{key}.lora_A.weight"], index[f"{key}.lora_B.weight"],
                                    scalings[name], copy.deepcopy(dropout), run, index.get(f"{name}.weight"),
                                    layer.fan_in_fan_out)
        _replace(model, name, bank_layer)
    for name, wrapper in [(n, m) for n, m in model.named_modules() if hasattr(m, "modules_to_save")]:
        _replace(model, name, _bank_head(name, wrapper.modules_to_save[ADAPTER], index, run))
    model.requires_grad_(False)
    config_json = adapter_config_text(peft_model.peft_config[ADAPTER])
    init = torch.cat([state[spec.name].detach().reshape(-1).float() for spec in layout.specs if spec.name in state]
                     + [torch.zeros(spec.numel) for spec in layout.delta])
    # Each row starts on a 64-byte boundary: some CPU kernels round differently for operands at
    # other alignments, and a peer's row index (hence its offset) changes with the process count.
    stride = -(-layout.numel // ROW_ALIGNMENT) * ROW_ALIGNMENT
    flats = torch.zeros(len(peers), stride, device=device)[:, : layout.numel]
    flats.copy_(init.to(device).expand_as(flats))
    model.to(device)
    return PeerBank(model, layout, flats, peers, task, run, config_json)


def adapter_config_text(config: PeftConfig) -> str:
    """adapter_config.json as peft writes it for a saved adapter, with its sets sorted: peft writes
    target_modules in set order, which changes from one process to the next."""
    config = copy.deepcopy(config)
    config.inference_mode = True
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        written = json.loads((Path(folder) / "adapter_config.json").read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(written.get(key), list):
            written[key] = sorted(written[key])
    return json.dumps(written, indent=2, sort_keys=True) + "\n"


def _bank_head(name: str, head: nn.Module, index: dict[str, int], run: BankRun) -> nn.Module:
    """A copy of a saved (fully trained) module whose linear layers read the rows' own weights."""
    head = copy.deepcopy(head)
    linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    others = [n for n, m in head.named_modules() if not isinstance(m, nn.Linear) and any(m.parameters(recurse=False))]
    if others:
        raise ConfigError(f"the trained head {name} holds a {type(dict(head.named_modules())[others[0]]).__name__}; "
                          "the peer bank trains linear heads only")
    for sub, linear in linears:
        key = ".".join(filter(None, (PEFT_PREFIX + name, sub)))
        bias = index.get(f"{key}.bias") if linear.bias is not None else None
        layer = HeadBankLinear(index[f"{key}.weight"], bias, run)
        if sub:
            _replace(head, sub, layer)
        else:
            head = layer
    return head


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
