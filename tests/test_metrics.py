"""Gram-based metrics equal the dense d x d definitions on small cases."""

from __future__ import annotations

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


def test_aggregation_error_matches_dense() -> None:
    layout, flats = random_peers(4)
    weights = [0.1, 0.2, 0.3, 0.4]
    err2, exact2 = 0.0, 0.0
    for m, s in enumerate(layout.scalings):
        mixed = sum(w * dense_products(layout, f)[m] for w, f in zip(weights, flats))
        a_bar = sum(w * layout.a_views(f)[m].double() for w, f in zip(weights, flats))
        b_bar = sum(w * layout.b_views(f)[m].double() for w, f in zip(weights, flats))
        err2 += float(((mixed - s * b_bar @ a_bar) ** 2).sum())
        exact2 += float((mixed**2).sum())
    absolute, relative = aggregation_error(layout, weights, flats)
    assert abs(absolute - err2**0.5) <= 1e-5 * err2**0.5
    assert abs(relative - (err2 / exact2) ** 0.5) <= 1e-5
    assert aggregation_error(layout, [0.5, 0.5], [flats[0], flats[0]])[0] < 1e-4
