"""Local optimisation and evaluation of the hosted peers on the peer bank.

Peers train all at once (one forward and backward over their concatenated batches) or one at a
time; either way each peer draws its batches and dropout from seeds derived from (run seed, peer,
round), so it computes the same thing whichever process hosts it and whoever runs beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.federated import IGNORE_INDEX, Dataset, joined
from ..errors import ConfigError, DivergedError
from ..seeding import derive_seed
from . import prefix
from .bank import PeerBank, PeerStreams
from .factors import FactorLayout
from .galore import GaLoreSettings
from .models import CAUSAL_LM
from .optimizers import LiftedMoments, PeerOptimizers

EVAL_TOKENS = 2**16  # tokens per evaluation forward when peers are evaluated together


def logits_of(output) -> torch.Tensor:
    """HF models return an object with ``.logits``; plain modules return the tensor itself."""
    return getattr(output, "logits", output)


@dataclass
class Scores:
    """Per row of a batch: summed loss, correct predictions and counted targets."""

    loss: torch.Tensor
    correct: torch.Tensor
    counted: torch.Tensor


def batch_scores(bank: PeerBank, batch: Dataset, sizes: Sequence[int]) -> Scores:
    """Scores of each running row on its share of the batch.

    Classification counts examples; a causal LM counts next-token predictions (padding skipped).
    """
    logits = logits_of(prefix.forward(bank, batch)).float()
    labels = batch.labels.to(logits.device)
    if bank.task == CAUSAL_LM:
        logits, labels = logits[:, :-1], labels[:, 1:]
    counted = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    correct = (logits.argmax(dim=-1) == labels) & counted
    per_example = [t.reshape(len(labels), -1).sum(dim=1) for t in (loss.view(labels.shape), correct, counted)]
    return Scores(*(_per_row(t, sizes) for t in per_example))


def _per_row(values: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    if len(set(sizes)) == 1:
        return values.view(len(sizes), -1).sum(dim=1)
    return torch.stack([piece.sum() for piece in values.split(list(sizes))])


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


def part_flags(layout: FactorLayout, parts: frozenset[str]) -> list[bool]:
    """For each layout entry, whether its part is trained."""
    return [part in parts for part, specs in (("A", layout.a), ("B", layout.b), ("head", layout.head),
                                              ("delta", layout.delta)) for _ in specs]


CPU_BATCHING_WORK = 1e9  # base parameters x tokens of one peer's batch below which CPU steps are overhead-bound


def peers_per_forward(setting: str | bool | int, bank: PeerBank, data: Dataset, batch_size: int) -> int:
    """``train.batch_peers`` as the number of hosted peers that train in one forward (1: one at a
    time). auto: all of them on a GPU (sequential small batches leave it idle) and, on CPU, for
    small models, whose steps cost less than the per-peer Python overhead; one at a time for larger
    models on CPU, where a joint forward is no faster and holds every peer's activations at once
    (measured: docs/performance.md, many peers in one process)."""
    hosted = len(bank.peers)
    if setting is True or setting is False:
        return hosted if setting else 1
    if setting != "auto":
        return int(setting)
    if bank.device.type == "cuda":
        return hosted
    tokens = tokens_per_batch(data, batch_size)
    return hosted if sum(p.numel() for p in bank.model.parameters()) * tokens < CPU_BATCHING_WORK else 1


def tokens_per_batch(data: Dataset, batch_size: int) -> int:
    """Tokens in one batch of ``data`` (feature vectors count one per example)."""
    sample = next(iter(data.inputs.values()))
    return batch_size * (sample.shape[1] if sample.dim() > 1 else 1)


class LossScale:
    """fp16 loss scaling per peer (as torch's GradScaler does per optimizer): a row whose gradients
    overflow skips its step and halves its scale; 2,000 good steps in a row double it."""

    GROWTH_INTERVAL = 2000

    def __init__(self, rows: int, enabled: bool) -> None:
        self.enabled = enabled
        self.scale = torch.full((rows,), 2.0**16)
        self.good = torch.zeros(rows, dtype=torch.int64)

    def of(self, rows: Sequence[int]) -> torch.Tensor:
        return self.scale[list(rows)] if self.enabled else torch.ones(len(rows))

    def update(self, rows: Sequence[int], finite: torch.Tensor) -> None:
        if not self.enabled:
            return
        index = torch.tensor(list(rows))
        self.good[index] = torch.where(finite, self.good[index] + 1, 0)
        grow = self.good[index] >= self.GROWTH_INTERVAL
        self.scale[index] = torch.where(finite, torch.where(grow, self.scale[index] * 2, self.scale[index]),
                                        self.scale[index] / 2)
        self.good[index[grow]] = 0

    def state_of(self, row: int) -> dict[str, torch.Tensor]:
        """A row's scale and run of good steps, checkpointed with its optimizer: a resumed fp16 run
        must skip the same steps as an uninterrupted one."""
        if not self.enabled:
            return {}
        return {"loss_scale.scale": self.scale[row].clone(), "loss_scale.good": self.good[row].clone()}

    def load(self, row: int, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore a row from its checkpoint file (``where`` names it in errors)."""
        if not self.enabled:
            return
        if "loss_scale.scale" not in state or "loss_scale.good" not in state:
            raise ConfigError(f"{where} holds no fp16 loss scale: it was written by an older version of p2p_fedrot; "
                              "start afresh with --overwrite or another out")
        self.scale[row], self.good[row] = state["loss_scale.scale"], state["loss_scale.good"]


class BankTrainer:
    """Runs the local steps of the hosted peers that train, with each peer's own optimizer.

    ``datasets`` maps each training peer to its data; ``streams`` (default: the peer) keys its
    batch and dropout seeds (the pooled learner of the centralized baseline uses one outside the peers).
    Here the run's training settings meet the bank, so the trainer installs the frozen-prefix cache
    (prefix.py), which training and evaluation then share.
    """

    def __init__(self, bank: PeerBank, datasets: Mapping[int, Dataset], config: TrainConfig, seed: int,
                 precision: str = "auto", group: int = 1, streams: Mapping[int, int] | None = None,
                 galore: GaLoreSettings | None = None) -> None:
        self.bank, self.datasets, self.config, self.seed = bank, dict(datasets), config, seed
        self.precision, self.group = precision, group
        self.streams = {p: (streams or {}).get(p, p) for p in self.datasets}
        self.optimizers = PeerOptimizers(config, bank.layout, len(bank.peers), bank.device, galore)
        self.scales = LossScale(len(bank.peers), precision == "fp16")
        prefix.install(bank, _corpus_of(self.datasets.values()), config)

    @property
    def peers(self) -> list[int]:
        return list(self.datasets)

    def reset_optimizers(self, peers: Sequence[int]) -> None:
        """Forget moments and step counts, as if the optimizers were new (their settings stay)."""
        self.optimizers.reset([self.bank.row_of[p] for p in peers])

    def train(self, round: int, peers: Sequence[int], parts: frozenset[str]) -> dict[int, float]:
        """``local_steps`` optimizer steps of each peer on the given parts; their mean training losses."""
        peers = list(peers)
        groups = [peers[i : i + self.group] for i in range(0, len(peers), self.group)]
        losses: dict[int, list[float]] = {p: [] for p in peers}
        for group in groups:
            for peer, values in zip(group, self._train_group(round, group, parts)):
                losses[peer] = values
        for peer, values in losses.items():
            if not all(math.isfinite(v) for v in values):
                raise DivergedError(
                    f"peer {peer}, round {round}: the training loss became {values[-1]} (losses of its local steps: "
                    f"{', '.join(f'{v:.4g}' for v in values)}); lower train.lr (now {self.config.lr:g}) or "
                    f"train.grad_clip (now {self.config.grad_clip})"
                )
        return {p: sum(v) / len(v) if v else float("nan") for p, v in losses.items()}

    def _train_group(self, round: int, group: list[int], parts: frozenset[str]) -> list[list[float]]:
        bank, config = self.bank, self.config
        rows = [bank.row_of[p] for p in group]
        batches = {p: torch.Generator().manual_seed(derive_seed(self.seed, "batches", self.streams[p], round)) for p in group}
        dropout = [torch.Generator().manual_seed(derive_seed(self.seed, "dropout", self.streams[p], round)) for p in group]
        flags = part_flags(bank.layout, parts)
        bank.model.train()
        losses: list[list[float]] = [[] for _ in group]
        for _ in range(config.local_steps):
            drawn = [self._draw(p, batches[p]) for p in group]
            sizes = [len(d) for d in drawn]
            scale = self.scales.of(rows).to(bank.device)
            with bank.running(bank.rows(group), sizes, flags) as leaves, PeerStreams(bank.run, dropout, bank.device):
                with autocast_for(bank.device, self.precision):
                    scores = batch_scores(bank, joined(drawn), sizes)
                mean_loss = scores.loss / scores.counted.clamp(min=1)
                (mean_loss * scale).sum().backward()
            grads = torch.cat([(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).reshape(len(group), -1)
                               for leaf in leaves], dim=1)
            grads.div_(scale[:, None])
            finite = torch.isfinite(grads).all(dim=1) if self.scales.enabled else torch.ones(len(group), dtype=torch.bool)
            if config.grad_clip is not None:
                norms = torch.linalg.vector_norm(grads, dim=1)
                grads.mul_((config.grad_clip / (norms + 1e-6)).clamp(max=1.0)[:, None])
            stepping = [row for row, ok in zip(rows, finite.tolist()) if ok]
            if stepping:
                keep = finite.to(grads.device)
                self.optimizers.step(bank.flats, stepping, grads[keep] if not keep.all() else grads, parts)
            self.scales.update(rows, finite.cpu())
            for values, loss in zip(losses, mean_loss.tolist()):
                values.append(loss)
        return losses

    def _draw(self, peer: int, generator: torch.Generator) -> Dataset:
        data = self.datasets[peer]
        return data.subset(torch.randperm(len(data), generator=generator)[: self.config.batch_size])

    def rotate_moments(self, peer: int, rotations: list[torch.Tensor]) -> None:
        """The peer's factors were rotated (see Method.before_send and Combined): rotate its optimizer's
        first moment too."""
        self.optimizers.rotate(self.bank.row_of[peer], rotations)

    def second_moments(self, peer: int) -> LiftedMoments | None:
        """The peer's dense-delta second moments for a method that syncs them (None without dense deltas)."""
        dense = self.optimizers.dense
        return LiftedMoments(dense, self.bank.row_of[peer]) if dense is not None else None

    def optimizer_state(self, peer: int) -> dict[str, torch.Tensor]:
        """The peer's optimizer state and, in fp16, its loss scale."""
        row = self.bank.row_of[peer]
        return {**self.optimizers.state_of(row), **self.scales.state_of(row)}

    def load_optimizer_state(self, peer: int, state: dict[str, torch.Tensor], where: str) -> None:
        row = self.bank.row_of[peer]
        self.optimizers.load(row, state, where)
        self.scales.load(row, state, where)


@dataclass
class EvalResult:
    accuracy: float  # classification accuracy, or next-token accuracy for a causal LM
    loss: float  # mean cross-entropy per example (per token for a causal LM)


@torch.no_grad()
def evaluate(bank: PeerBank, datasets: Mapping[int, Dataset], batch_size: int, precision: str = "auto",
             group: int = 1) -> dict[int, EvalResult]:
    """Accuracy and mean cross-entropy of each peer's adapter on its dataset (peers may share one)."""
    bank.model.eval()
    peers = list(datasets)
    results = {}
    for chosen in _eval_groups(peers, datasets, batch_size, group):
        totals = torch.zeros(3, len(chosen), dtype=torch.float64)
        for present, batches in _joined_batches([datasets[p] for p in chosen], batch_size):
            sizes = [len(batch) for batch in batches]
            with bank.running(bank.rows([chosen[i] for i in present]), sizes), autocast_for(bank.device, precision):
                scores = batch_scores(bank, joined(batches), sizes)
            for row, values in enumerate((scores.loss, scores.correct, scores.counted)):
                totals[row, present] += values.double().cpu()
        for i, peer in enumerate(chosen):
            loss, correct, counted = totals[:, i].tolist()
            results[peer] = (EvalResult(correct / max(counted, 1), loss / max(counted, 1)) if counted
                             else EvalResult(float("nan"), float("nan")))
    return results


def _eval_groups(peers: list[int], datasets: Mapping[int, Dataset], batch_size: int, group: int) -> list[list[int]]:
    """Peers evaluated in one forward: up to ``group`` of them, as many as fit EVAL_TOKENS."""
    if group == 1 or not peers:
        return [[p] for p in peers]
    size = max(1, min(group, EVAL_TOKENS // max(tokens_per_batch(datasets[peers[0]], batch_size), 1)))
    return [peers[i : i + size] for i in range(0, len(peers), size)]


def _joined_batches(datasets: list[Dataset], batch_size: int) -> Iterator[tuple[list[int], list[Dataset]]]:
    """The i-th batch of every dataset that still has one: (which of them, their batches)."""
    streams = [d.batches(batch_size) for d in datasets]
    while True:
        present, batches = [], []
        for index, stream in enumerate(streams):
            batch = next(stream, None)
            if batch is not None:
                present.append(index)
                batches.append(batch)
        if not present:
            return
        yield present, batches


def _corpus_of(datasets: Iterable[Dataset]) -> Dataset | None:
    """The corpus the training datasets' examples come from (None for feature vectors)."""
    corpora = {id(d.corpus): d.corpus for d in datasets}
    return next(iter(corpora.values())) if len(corpora) == 1 else None
