"""Metrics equal their dense d x d definitions, and the consensus distance has the same bits for any
number of processes the peers are split over."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from multiproc import distributed_reduce, local_reduce, spawn_ranks
from p2p_fedrot.run import metrics
from p2p_fedrot.peers.factors import FactorLayout, TensorSpec
from p2p_fedrot.run.metrics import aggregation_errors, consensus_distance
from p2p_fedrot.exact import Reduce, exact_sum
from test_reduction import run_split, spread_values

PEERS = 8


def toy_layout() -> FactorLayout:
    """Two LoRA modules (r=4; 8 -> 6 and 6 -> 5) and a head, laid out as [A | B | head]."""
    shapes = [(4, 8, 6), (4, 6, 5)]  # (r, d_in, d_out)
    a, b, offset = [], [], 0
    for m, (r, d_in, _) in enumerate(shapes):
        a.append(TensorSpec(f"m{m}.lora_A.weight", (r, d_in), offset))
        offset += r * d_in
    a_end = offset
    for m, (r, _, d_out) in enumerate(shapes):
        b.append(TensorSpec(f"m{m}.lora_B.weight", (d_out, r), offset))
        offset += d_out * r
    b_end = offset
    head = (TensorSpec("head.weight", (3,), offset),)
    segments = {"A": (0, a_end), "B": (a_end, b_end), "head": (b_end, offset + 3), "delta": (offset + 3, offset + 3)}
    return FactorLayout(("m0", "m1"), (2.0, 0.75), tuple(a), tuple(b), head, segments, offset + 3)


LAYOUT = toy_layout()


def random_flats(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, LAYOUT.numel, generator=torch.Generator().manual_seed(seed))


def close_flats() -> torch.Tensor:
    """Peers 1e-5 apart: a distance taken as a difference of Gram terms would cancel."""
    return random_flats(1, seed=1) + 1e-5 * random_flats(PEERS, seed=2)


def dense_products(flat: torch.Tensor) -> list[torch.Tensor]:
    factors = zip(LAYOUT.scalings, LAYOUT.a_views(flat), LAYOUT.b_views(flat))
    return [s * (b.double() @ a.double()) for s, a, b in factors]


def dense_consensus(flats: torch.Tensor) -> tuple[float, float]:
    """(distance, mean squared norm of the products) from dense d x d products."""
    products = [dense_products(flat) for flat in flats]
    total = norms = 0.0
    for m in range(len(LAYOUT.modules)):
        mean = sum(p[m] for p in products) / len(products)
        total += sum(float(((p[m] - mean) ** 2).sum()) for p in products)
        norms += sum(float((p[m] ** 2).sum()) for p in products)
    return total / len(products), norms / len(products)


def test_consensus_distance_matches_the_dense_definition() -> None:
    for flats in (random_flats(PEERS), close_flats()):
        expected, scale = dense_consensus(flats)
        distance, relative = consensus_distance(LAYOUT, flats, PEERS, local_reduce)
        assert abs(distance - expected) <= 1e-9 * expected
        assert relative == pytest.approx(expected / scale, rel=1e-9)
    assert consensus_distance(LAYOUT, torch.zeros(3, LAYOUT.numel), 3, local_reduce) == (0.0, 0.0)


def test_consensus_distance_of_identical_peers_is_zero() -> None:
    flats = random_flats(1).expand(5, -1)
    assert max(consensus_distance(LAYOUT, flats, 5, local_reduce)) < 1e-12


def test_consensus_distance_has_the_same_bits_for_any_split_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    flats = random_flats(PEERS)
    reference = consensus_distance(LAYOUT, flats, PEERS, local_reduce)
    for cuts in ([0, 4, 8], [0, 3, 3, 8], [0, 0, 8], [0, 2, 4, 6, 8]):  # a process may host no peer
        parts = [flats[lo:hi] for lo, hi in zip(cuts, cuts[1:])]
        results = run_split(lambda part, reduce: consensus_distance(LAYOUT, part, PEERS, reduce), parts)
        assert results == [reference] * len(parts)
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 1)  # one peer per chunk
    assert consensus_distance(LAYOUT, flats, PEERS, local_reduce) == reference


def split_checks(block: slice, reduce: Reduce) -> tuple[torch.Tensor, float, float]:
    """exact_sum of spread summands, and the consensus distance of spread and of close peers, for the
    ``block`` of them this process hosts."""
    return (exact_sum(spread_values(PEERS, 7, seed=3)[block], reduce, PEERS),
            consensus_distance(LAYOUT, random_flats(PEERS)[block], PEERS, reduce),
            consensus_distance(LAYOUT, close_flats()[block], PEERS, reduce))


def split_worker(rank: int, world: int) -> tuple[torch.Tensor, float, float]:
    """This rank's contiguous block, reduced over the real process group."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return split_checks(slice(rank * PEERS // world, (rank + 1) * PEERS // world), distributed_reduce)


@pytest.mark.parametrize("world", [2, 4])
def test_split_over_real_processes_has_the_same_bits_as_one_process(world: int) -> None:
    summed, spread, near = split_checks(slice(None), local_reduce)
    for result in spawn_ranks(split_worker, world, timeout=60):
        assert torch.equal(result[0], summed) and result[1:] == (spread, near)


# ------------------------------------------------------------------ aggregation errors
W = torch.tensor([[0.5, 0.25, 0.0, 0.25], [0.25, 0.5, 0.25, 0.0], [0.0, 0.25, 0.5, 0.25], [0.25, 0.0, 0.25, 0.5]])


def mixing_rows(sent: torch.Tensor, peers: list[int]) -> dict[int, list[tuple[float, torch.Tensor]]]:
    return {i: [(float(W[i, j]), sent[j]) for j in range(len(sent)) if W[i, j] != 0] for i in peers}


def dense_errors(sent: torch.Tensor, mixed: torch.Tensor, peers: list[int]) -> dict[int, tuple[float, float]]:
    """||sum_j W_ij P_j - P'_i||_F and its ratio to ||sum_j W_ij P_j||_F, densely, over all modules."""
    errors = {}
    for i in peers:
        error2 = exact2 = 0.0
        for m in range(len(LAYOUT.modules)):
            exact = sum(float(W[i, j]) * dense_products(sent[j])[m] for j in range(len(sent)))
            error2 += float(((exact - dense_products(mixed[i])[m]) ** 2).sum())
            exact2 += float((exact**2).sum())
        errors[i] = (error2**0.5, (error2 / exact2) ** 0.5)
    return errors


def assert_matches_dense(sent: torch.Tensor, mixed: torch.Tensor, peers: list[int]) -> None:
    got = aggregation_errors(LAYOUT, mixing_rows(sent, peers), dict(enumerate(mixed)))
    expected = dense_errors(sent, mixed, peers)
    assert got.keys() == expected.keys()
    for i in peers:
        assert got[i][0] > 1.0  # large enough to be a real check
        assert got[i] == pytest.approx(expected[i], rel=1e-9)


def test_aggregation_errors_of_factor_averaging_are_the_dense_definition() -> None:
    """P'_i = s (sum_j W_ij B_j)(sum_j W_ij A_j): the loss of averaging factors instead of products."""
    sent = random_flats(4)
    assert_matches_dense(sent, W @ sent, [0, 1, 2, 3])


def test_aggregation_errors_of_a_peer_that_keeps_its_own_A() -> None:
    """Mixing only B leaves (sum_j W_ij B_j) A_i: the error counts the neighbours' A_j not mixed in."""
    sent = random_flats(4)
    mixed = sent.clone()
    start, end = LAYOUT.segments["B"]
    mixed[:, start:end] = W @ sent[:, start:end]
    assert_matches_dense(sent, mixed, [1, 3])


def test_aggregation_error_is_zero_when_the_products_are_averaged_exactly() -> None:
    """One A for every peer (as in ffa): averaging B averages the products (values exact in float32)."""
    sent = torch.randint(-64, 64, (4, LAYOUT.numel), generator=torch.Generator().manual_seed(4)) / 16.0
    start, end = LAYOUT.segments["A"]
    sent[:, start:end] = sent[0, start:end]
    errors = aggregation_errors(LAYOUT, mixing_rows(sent, [0, 1, 2, 3]), dict(enumerate(W @ sent)))
    assert dense_consensus(sent)[0] > 1.0  # the peers' products do differ
    assert all(absolute < 1e-9 and relative < 1e-9 for absolute, relative in errors.values())


def test_aggregation_error_of_a_peer_mixing_only_itself_is_zero() -> None:
    sent = random_flats(4)
    assert aggregation_errors(LAYOUT, {2: [(1.0, sent[2])]}, {2: sent[2].clone()}) == {2: (0.0, 0.0)}


def test_rotational_disagreement_is_all_of_a_pure_rotation_and_none_of_identical_factors() -> None:
    from p2p_fedrot.peers.models import random_rotation

    generator = torch.Generator().manual_seed(4)
    own = torch.randn(LAYOUT.numel, generator=generator)
    turned = own.clone()
    for a, b in zip(LAYOUT.a_views(turned), LAYOUT.b_views(turned)):
        rotation = random_rotation(a.shape[0], generator).float()
        a.copy_(rotation.T @ a)
        b.copy_(b @ rotation)
    removed, total = metrics.rotational_disagreement(LAYOUT, own, turned)
    assert total > 1.0 and abs(removed / total - 1.0) < 1e-6
    assert metrics.rotational_disagreement(LAYOUT, own, own.clone()) == (0.0, 0.0)
    noisy = own + 0.1 * torch.randn(LAYOUT.numel, generator=generator)  # not a rotation: little is removed
    removed, total = metrics.rotational_disagreement(LAYOUT, own, noisy)
    assert 0.0 <= removed < 0.5 * total
