"""Datasets and non-IID partitions of them across peers.

Every process builds the same corpus and the same partition from the run seed, then keeps only the
shards of the peers it hosts: no data moves between processes and the split never depends on how
many processes there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..config import DataConfig
from ..console import announce
from ..errors import ConfigError
from ..seeding import derive_seed
from .sources import load_text_corpus

IGNORE_INDEX = -100  # target value the loss skips (padding in causal-LM targets)
DEFAULT_SYNTHETIC_SAMPLES = 4000  # synthetic training set size when data.train_samples is null


@dataclass(eq=False)
class Dataset:
    """Model inputs (a dict of equally long tensors, passed as keyword arguments) and labels.

    Text examples also carry ``ids``, their positions in ``corpus`` (every tokenised text of the run,
    training and test ones together): the frozen-prefix cache (peers/prefix.py) keys its entries by them.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    ids: torch.Tensor | None = None
    corpus: "Dataset | None" = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray | torch.Tensor | slice) -> "Dataset":
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        ids = None if self.ids is None else self.ids[index]
        return Dataset({k: v[index] for k, v in self.inputs.items()}, self.labels[index], ids, self.corpus)

    def batches(self, batch_size: int) -> Iterator["Dataset"]:
        for start in range(0, len(self), batch_size):
            yield self.subset(slice(start, start + batch_size))


def as_corpus(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> Dataset:
    """A corpus: every example's id is its position, and subsets of it keep those ids."""
    corpus = Dataset(inputs, labels, torch.arange(len(labels)))
    corpus.corpus = corpus
    return corpus


def pool(datasets: Sequence[Dataset]) -> Dataset:
    """All samples of several datasets, in order (the centralized baseline's training set)."""
    keys = datasets[0].inputs.keys()
    corpus = datasets[0].corpus
    ids = torch.cat([d.ids for d in datasets]) if all(d.corpus is corpus and d.ids is not None for d in datasets) else None
    return Dataset({k: torch.cat([d.inputs[k] for d in datasets]) for k in keys}, torch.cat([d.labels for d in datasets]),
                   ids, corpus if ids is not None else None)


def flip_labels(dataset: Dataset, num_classes: int) -> Dataset:
    """The same examples labelled C - 1 - y: the label-flipping attack's training data."""
    return Dataset(dataset.inputs, num_classes - 1 - dataset.labels, dataset.ids, dataset.corpus)


def joined(batches: Sequence[Dataset]) -> Dataset:
    """Batches side by side, padded to the longest example among them (not to ``model.max_length``):
    the attention mask hides padding, so only float rounding depends on it. Only trailing columns
    that no example uses are cut, so a tokenizer that pads on the left keeps its positions."""
    whole = pool(batches)
    mask = whole.inputs.get("attention_mask")
    if mask is None:
        return whole
    used = torch.nonzero(mask.any(dim=0))
    longest = int(used[-1]) + 1 if len(used) else 1
    inputs = {k: v[:, :longest] for k, v in whole.inputs.items()}
    labels = whole.labels[:, :longest] if whole.labels.dim() > 1 else whole.labels
    return Dataset(inputs, labels, whole.ids, whole.corpus)


@dataclass
class PeerData:
    train: Dataset
    local_test: Dataset


@dataclass
class FederatedData:
    """The shared held-out test set and, per client peer, its own train and local test split."""

    test: Dataset
    clients: dict[int, PeerData]
    class_names: list[str]  # name of class id i (the corpus's; "0".."K-1" for synthetic data)
    input_dim: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_data(config: DataConfig, clients: Sequence[int], seed: int, tokenizer=None, max_length: int = 64,
               causal_lm: bool = False) -> FederatedData:
    """Load the configured source and split its training part over ``clients``.

    Text sources are tokenised once per process (every hosted peer shares the tensors).
    For a causal LM the targets are the tokens themselves, while the partition still follows
    the corpus classes, so peers see different topics.
    """
    if config.name == "synthetic":
        train, test, classes = synthetic_classification(config, seed)
        class_names, input_dim = [str(c) for c in range(config.num_classes)], config.features
    else:
        if tokenizer is None:
            raise ConfigError(
                f"data.name={config.name!r} is a text corpus and needs a language model; set model.name to "
                "packaged:minilm, packaged:smollm2 or a Hugging Face model (toy:mlp reads data.name=synthetic)"
            )
        train, test, classes, class_names = text_datasets(config, seed, tokenizer, max_length, causal_lm)
        input_dim = 0
    rng = np.random.default_rng(derive_seed(seed, "partition"))
    parts = partition_labels(classes, len(clients), config, rng)
    peers = {}
    for client, index in zip(clients, parts):
        index = rng.permutation(index)
        n_test = int(round(len(index) * config.local_test_fraction))
        if n_test == len(index):
            raise ConfigError(
                f"peer {client} gets {len(index)} samples, {n_test} held out by data.local_test_fraction="
                f"{config.local_test_fraction}, so none to train on; use fewer peers, more data.train_samples, "
                "a smaller data.local_test_fraction or a higher data.min_samples"
            )
        peers[client] = PeerData(train.subset(index[n_test:]), train.subset(index[:n_test]))
    return FederatedData(test, peers, class_names, input_dim)


def text_datasets(config: DataConfig, seed: int, tokenizer, max_length: int, causal_lm: bool) -> tuple[Dataset, Dataset, np.ndarray, list[str]]:
    """Shuffle a corpus with the seed, hold out the shared test set, tokenise what is used."""
    announce(f"set-up: reading {config.name}")
    corpus = load_text_corpus(config.name, config.text_column, config.label_column, config.split)
    order = np.random.default_rng(derive_seed(seed, "corpus")).permutation(len(corpus.texts))
    if len(order) <= config.test_samples:
        raise ConfigError(
            f"data.name={config.name!r} has {len(order)} samples, not more than data.test_samples="
            f"{config.test_samples}; lower data.test_samples"
        )
    test_index = order[: config.test_samples]
    train_index = order[config.test_samples :][: config.train_samples]
    labels = np.asarray(corpus.labels, dtype=np.int64)

    used = np.concatenate([train_index, test_index])
    announce(f"set-up: tokenising {len(train_index)} training and {len(test_index)} test texts "
             f"(at most {max_length} tokens each)")
    encoded = tokenizer([corpus.texts[i] for i in used], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
    inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if causal_lm:
        targets = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    else:
        targets = torch.as_tensor(labels[used])
    texts = as_corpus(inputs, targets)
    split = len(train_index)
    return texts.subset(slice(0, split)), texts.subset(slice(split, None)), labels[train_index], list(corpus.class_names)


def synthetic_classification(config: DataConfig, seed: int) -> tuple[Dataset, Dataset, np.ndarray]:
    """Gaussian classes around random means: learnable but overlapping, so accuracy is informative."""
    rng = np.random.default_rng(derive_seed(seed, "synthetic"))
    k, d = config.num_classes, config.features
    if k < 2:
        raise ConfigError("data.num_classes must be at least 2")
    means = rng.normal(size=(k, d)) * config.class_separation

    def draw(n: int, stream: np.random.Generator) -> Dataset:
        labels = stream.integers(0, k, size=n)
        x = means[labels] + stream.normal(size=(n, d))
        return Dataset({"features": torch.tensor(x, dtype=torch.float32)}, torch.tensor(labels, dtype=torch.long))

    train = draw(config.train_samples or DEFAULT_SYNTHETIC_SAMPLES, rng)
    # the test set has a stream of its own, so runs with other training sizes are scored on the same one
    test = draw(config.test_samples, np.random.default_rng(derive_seed(seed, "synthetic-test")))
    return train, test, train.labels.numpy()


def partition_labels(labels: np.ndarray, peers: int, config: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Split sample indices over peers: ``iid``, ``dirichlet`` (label skew) or ``shards`` (k labels each)."""
    n = len(labels)
    if n < peers * config.min_samples:
        raise ConfigError(
            f"{n} training samples cannot give {peers} peers at least data.min_samples={config.min_samples} "
            "each; use fewer peers, a lower data.min_samples or a larger dataset"
        )
    if config.partition == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), peers)]
    if config.partition == "shards":
        return _shards(labels, peers, config.shards_per_peer, rng)
    return _dirichlet(labels, peers, config.alpha, config.min_samples, rng)


def _dirichlet(labels: np.ndarray, peers: int, alpha: float, min_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, split its samples with proportions ~ Dir(alpha); redraw until every peer has enough."""
    classes = np.unique(labels)
    for _ in range(1000):
        buckets: list[list[int]] = [[] for _ in range(peers)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(peers, alpha))) * len(idx)).astype(int)[:-1]
            for peer, chunk in enumerate(np.split(idx, cuts)):
                buckets[peer].extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min_samples:
            return [np.sort(np.array(b, dtype=np.int64)) for b in buckets]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {peers} peers data.min_samples={min_samples} "
        "samples in 1000 draws; raise data.alpha, lower data.min_samples or use fewer peers"
    )


def _shards(labels: np.ndarray, peers: int, per_peer: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sort by label, cut into peers * per_peer shards, deal each peer ``per_peer`` random shards."""
    if per_peer < 1:
        raise ConfigError("data.shards_per_peer must be at least 1")
    if peers * per_peer > len(labels):
        raise ConfigError(
            f"{peers} peers x data.shards_per_peer={per_peer} shards is more than the {len(labels)} training "
            "samples, so some shards would be empty; lower data.shards_per_peer or use more data"
        )
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, peers * per_peer)
    deal = rng.permutation(len(shards)).reshape(peers, per_peer)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]
