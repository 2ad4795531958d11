"""Partitions: reproducible, complete, disjoint, min_samples honoured, skew grows as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2p_fedrot.config import DataConfig
from p2p_fedrot.data.federated import build_data, partition_labels
from p2p_fedrot.errors import ConfigError

LABELS = np.random.default_rng(0).integers(0, 10, size=3000)


def split(partition: str, seed: int = 1, **kwargs) -> list[np.ndarray]:
    config = DataConfig(partition=partition, **kwargs)
    return partition_labels(LABELS, 12, config, np.random.default_rng(seed))


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_partition_is_complete_disjoint_and_reproducible(partition: str) -> None:
    parts = split(partition)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and len(np.unique(joined)) == len(LABELS)
    again = split(partition)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split(partition, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each peer's label histogram and the global one."""
    overall = np.bincount(LABELS, minlength=10) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - overall).sum() for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks_and_min_samples_holds() -> None:
    skews = [label_skew(split("dirichlet", alpha=a, min_samples=20)) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert min(len(p) for p in split("dirichlet", alpha=0.1, min_samples=20)) >= 20


def test_shards_give_few_labels_per_peer() -> None:
    parts = split("shards", shards_per_peer=2)
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 4


def test_more_peers_than_samples_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="min_samples"):
        partition_labels(LABELS[:50], 12, DataConfig(min_samples=10), np.random.default_rng(0))


def test_build_data_is_reproducible_and_every_client_has_a_local_test_split() -> None:
    a = build_data(DataConfig(), list(range(8)), seed=3)
    b = build_data(DataConfig(), list(range(8)), seed=3)
    for c in range(8):
        assert np.array_equal(a.clients[c].train.labels.numpy(), b.clients[c].train.labels.numpy())
        assert len(a.clients[c].local_test) > 0


def test_a_peer_left_without_training_data_is_named() -> None:
    config = DataConfig(partition="iid", train_samples=40, min_samples=1, local_test_fraction=0.99)
    with pytest.raises(ConfigError, match=r"peer 0 .*data\.local_test_fraction=0\.99.*none to train on.*data\.train_samples"):
        build_data(config, list(range(8)), seed=0)


def test_synthetic_test_set_does_not_depend_on_the_training_size() -> None:
    small, large = (build_data(DataConfig(train_samples=n), list(range(4)), seed=0) for n in (400, 2000))
    assert torch.equal(small.test.inputs["features"], large.test.inputs["features"])
    assert torch.equal(small.test.labels, large.test.labels)


def test_more_shards_than_samples_is_named() -> None:
    with pytest.raises(ConfigError, match=r"12 peers x data\.shards_per_peer=300 shards .* 3000"):
        split("shards", shards_per_peer=300)
