"""Gram-based metrics equal the dense d x d definitions on small cases."""

from __future__ import annotations

import numpy as np
import torch

from p2p_fedrot.config import ModelConfig
from p2p_fedrot.metrics import aggregation_error, consensus_distance
from p2p_fedrot.model import build_peer_models


def random_peers(n: int):
    models = build_peer_models(ModelConfig(), list(range(n)), input_dim=16, num_classes=3, seed=0, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    for flat in models.flats.values():
        flat.copy_(torch.randn(flat.shape, generator=generator))
    return models.layout, [models.flats[p] for p in range(n)]


def dense_products(layout, flat):
    return [s * (b.double() @ a.double()) for s, a, b in zip(layout.scalings, layout.a_views(flat), layout.b_views(flat))]


def test_consensus_distance_matches_dense() -> None:
    layout, flats = random_peers(5)
    products = [dense_products(layout, f) for f in flats]
    expected = 0.0
    for m in range(len(layout.modules)):
        mean = sum(p[m] for p in products) / len(products)
        expected += sum(float(((p[m] - mean) ** 2).sum()) for p in products) / len(products)
    assert abs(consensus_distance(layout, flats) - expected) <= 1e-6 * expected
    assert consensus_distance(layout, [flats[0]] * 3) < 1e-9


W = np.array([[0.5, 0.25, 0.0, 0.25], [0.25, 0.5, 0.25, 0.0], [0.0, 0.25, 0.5, 0.25], [0.25, 0.0, 0.25, 0.5]])


def dense_errors(layout, sent, mixed, peers) -> tuple[float, float]:
    """Mean over peers of ||sum_j W_ij P_j - P'_i||_F and its ratio to ||sum_j W_ij P_j||_F, densely."""
    absolute, relative = [], []
    for i in peers:
        err2 = exact2 = 0.0
        for m in range(len(layout.modules)):
            exact = sum(W[i, j] * dense_products(layout, sent[j])[m] for j in range(len(sent)))
            err2 += float(((exact - dense_products(layout, mixed[i])[m]) ** 2).sum())
            exact2 += float((exact**2).sum())
        absolute.append(err2**0.5)
        relative.append((err2 / exact2) ** 0.5)
    return float(np.mean(absolute)), float(np.mean(relative))


def assert_matches_dense(layout, sent, mixed, peers) -> None:
    """The Gram-based errors are those computed densely, and large enough to be a real check."""
    absolute, relative = aggregation_error(layout, W, sent, mixed, peers)
    expected = dense_errors(layout, sent, mixed, peers)
    assert absolute > 1.0
    assert abs(absolute - expected[0]) <= 1e-6 * expected[0]
    assert abs(relative - expected[1]) <= 1e-6


def test_aggregation_error_of_factor_averaging_is_the_dense_definition() -> None:
    """Averaged factors: ||sum_j W_ij s B_j A_j - s (sum_j W_ij B_j)(sum_j W_ij A_j)||_F, mean over peers."""
    layout, sent = random_peers(4)
    averaged = [sum(W[i, j] * sent[j] for j in range(4)) for i in range(4)]
    assert_matches_dense(layout, sent, averaged, [0, 1, 2, 3])


def test_aggregation_error_of_a_peer_that_keeps_its_own_A() -> None:
    """Mixing only B leaves (sum_j W_ij B_j) A_i: the error counts the neighbours' A_j that were not mixed in."""
    layout, sent = random_peers(4)
    mixed = [flat.clone() for flat in sent]
    for i in range(4):
        for m, b in enumerate(layout.b_views(mixed[i])):
            b.copy_(sum(W[i, j] * layout.b_views(sent[j])[m] for j in range(4)))
    assert_matches_dense(layout, sent, mixed, [1, 3])


def test_aggregation_error_is_zero_when_the_products_are_averaged_exactly() -> None:
    layout, sent = random_peers(4)
    shared_a = [flat.clone() for flat in sent]
    for flat in shared_a:  # one A for every peer (as in ffa): averaging B averages the products
        for m, a in enumerate(layout.a_views(flat)):
            a.copy_(layout.a_views(sent[0])[m])
    averaged = [sum(W[i, j] * shared_a[j] for j in range(4)) for i in range(4)]
    absolute, relative = aggregation_error(layout, W, shared_a, averaged, [0, 1, 2, 3])
    assert absolute < 1e-5 and relative < 1e-6
