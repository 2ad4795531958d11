"""The frozen-prefix cache: when LoRA adapts only blocks k and above, the embeddings and blocks below k
give every example the same output in every round, for every peer and every evaluation.

They run once per example, with their dropout OFF (a cached output cannot be redrawn per step: the
cached forward equals the plain forward of a model whose prefix dropout is off), and the hidden states
entering block k are kept. Training and evaluation then run only blocks k and up and the head, the
real HF modules, so the bank's LoRA layers and per-peer dropout work unchanged.

Examples are computed in fixed chunks of corpus positions, each padded to its own longest example:
an example's cached bits never depend on which peers a process hosts or how many processes run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..config import TrainConfig
from ..console import announce
from ..data.federated import Dataset, joined
from ..errors import ConfigError
from .bank import LoRABankLinear, PeerBank
from .models import transformer_blocks

CHUNK = 64  # examples computed together: fixed positions of the corpus, whatever a process needs
GB = 2**30


class Split:
    """A transformer cut in front of block ``k``: ``lower`` (embeddings, blocks < k) and ``upper``
    (blocks >= k and the head). Families say how to embed, what every block is given beside the hidden
    states (masks, positions: built with the HF model's own helpers) and what the head is."""

    def __init__(self, model: nn.Module, k: int) -> None:
        self.model, self.k = model, k
        self.blocks = transformer_blocks(model)[1]

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def lower_modules(self) -> list[nn.Module]:
        return [self.embeddings(), *self.blocks[: self.k]]

    @torch.no_grad()
    def lower(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states entering block k, dropout off."""
        with _evaluating(self.lower_modules()):
            hidden = self.embed(inputs)
            context = self.context(hidden, inputs["attention_mask"])
            for block in self.blocks[: self.k]:
                hidden = block(hidden, **context)
        return hidden

    def upper(self, hidden: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits from the hidden states entering block k."""
        context = self.context(hidden, inputs["attention_mask"])
        for block in self.blocks[self.k :]:
            hidden = block(hidden, **context)
        return self.head(hidden)

    def embeddings(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BertSplit(Split):
    """BertForSequenceClassification (MiniLM): the encoder's bidirectional mask, pooler, classifier."""

    def embeddings(self) -> nn.Module:
        return self.model.bert.embeddings

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.bert.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        mask, _ = self.model.bert._create_attention_masks(attention_mask, None, hidden, None, None, None)
        return {"attention_mask": mask}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self.model.dropout(self.model.bert.pooler(hidden)))


class LlamaSplit(Split):
    """LlamaForCausalLM (SmolLM2): the causal mask and rotary embeddings as LlamaModel builds them,
    final norm, lm_head."""

    def embeddings(self) -> nn.Module:
        return self.model.model.embed_tokens

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.model.embed_tokens(inputs["input_ids"])

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        from transformers.masking_utils import create_causal_mask

        inner = self.model.model
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=inner.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        return {"attention_mask": mask, "position_ids": positions,
                "position_embeddings": inner.rotary_emb(hidden, position_ids=positions)}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))


FAMILIES = {"BertForSequenceClassification": BertSplit, "LlamaForCausalLM": LlamaSplit}


class PrefixCache:
    """Hidden states entering block k for every example of ``corpus``, computed chunk by chunk on first use."""

    def __init__(self, split: Split, corpus: Dataset, length: int, device: torch.device) -> None:
        self.split, self.corpus = split, corpus
        self.states = torch.zeros(len(corpus), length, split.width, device=device)
        self.done = torch.zeros(-(-len(corpus) // CHUNK), dtype=torch.bool)

    def hidden(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        """The cached states of examples ``ids``, their first ``length`` positions."""
        for chunk in torch.unique(ids // CHUNK).tolist():
            if not self.done[chunk]:
                self._compute(chunk)
        return self.states[ids.to(self.states.device), :length]

    def _compute(self, chunk: int) -> None:
        batch = joined([self.corpus.subset(slice(chunk * CHUNK, (chunk + 1) * CHUNK))])
        inputs = {k: v.to(self.states.device) for k, v in batch.inputs.items()}
        hidden = self.split.lower(inputs)
        self.states[chunk * CHUNK : chunk * CHUNK + len(batch), : hidden.shape[1]] = hidden.float()
        self.done[chunk] = True


def forward(bank: PeerBank, batch: Dataset) -> Any:
    """The model's output on ``batch`` (moved to the bank's device): the upper part's logits where the
    batch's examples are cached, else what the whole model returns."""
    inputs = {k: v.to(bank.device) for k, v in batch.inputs.items()}
    cache = bank.prefix
    if cache is None or batch.corpus is not cache.corpus:
        return bank.model(**inputs)
    return cache.split.upper(cache.hidden(batch.ids, inputs["input_ids"].shape[1]), inputs)


def install(bank: PeerBank, corpus: Dataset | None, config: TrainConfig) -> None:
    """Give the bank a cache for ``corpus`` when ``train.prefix_cache`` allows it, the architecture
    is supported, some frozen blocks lie below every adapted module and the cache fits its bound.
    Otherwise the bank runs whole models; one line says why when a cache would have helped."""
    if config.prefix_cache == "auto" and bank.prefix is not None and bank.prefix.corpus is corpus:
        return
    bank.prefix = None
    if config.prefix_cache is False or corpus is None:
        return
    family = FAMILIES.get(type(bank.model).__name__)
    k = lowest_adapted_block(bank.model)
    if k == 0:
        return
    if family is None:
        announce(f"set-up: no frozen-prefix cache: it supports {', '.join(FAMILIES)}, not "
                 f"{type(bank.model).__name__}; every step runs the whole model")
        return
    split = family(bank.model, k)
    length = corpus.inputs["input_ids"].shape[1]
    size = len(corpus) * length * split.width * 4
    if size > config.prefix_cache_max_gb * GB:
        announce(f"set-up: no frozen-prefix cache: {len(corpus)} examples would take {size / GB:.2f} GB, over "
                 f"train.prefix_cache_max_gb={config.prefix_cache_max_gb:g}; raise it to use the cache")
        return
    announce(f"set-up: frozen-prefix cache: blocks 0..{k - 1} run once per example ({size / GB:.2f} GB at most)")
    bank.prefix = PrefixCache(split, corpus, length, bank.device)


def lowest_adapted_block(model: nn.Module) -> int:
    """The index of the lowest block holding a LoRA layer (0 when the model has no blocks)."""
    try:
        blocks = transformer_blocks(model)[1]
    except ConfigError:
        return 0
    adapted = [i for i, block in enumerate(blocks) if any(isinstance(m, LoRABankLinear) for m in block.modules())]
    return min(adapted, default=0)


@contextlib.contextmanager
def _evaluating(modules: list[nn.Module]) -> Iterator[None]:
    """``modules`` in eval mode (dropout off) meanwhile, their own modes restored after."""
    modes = [(m, m.training) for part in modules for m in part.modules()]
    for part in modules:
        part.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
