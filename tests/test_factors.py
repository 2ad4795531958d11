"""Flat factor buffers: a peer's buffer is its bank row, the model reads it, parts extract and insert."""

from __future__ import annotations

import torch

from p2p_fedrot.config import ModelConfig
from p2p_fedrot.peers.models import build_bank


def toy_bank(peers=(0, 1)):
    return build_bank(ModelConfig(), list(peers), input_dim=16, num_classes=3, seed=0, device=torch.device("cpu"))


def test_a_peers_buffer_is_its_bank_row_and_the_layers_read_it() -> None:
    bank = toy_bank()
    flat = bank.flat(1)
    assert flat.data_ptr() == bank.flats[1].data_ptr()
    features = torch.randn(5, 16)
    bank.model.eval()
    with torch.no_grad(), bank.running(bank.rows([1]), [5]):
        before = bank.model(features=features)
    flat.add_(0.1)  # B starts at zero: now peer 1's LoRA path contributes
    with torch.no_grad(), bank.running(bank.rows([1]), [5]):
        after_1 = bank.model(features=features)
    with torch.no_grad(), bank.running(bank.rows([0]), [5]):
        after_0 = bank.model(features=features)
    assert not torch.allclose(before, after_1)
    assert torch.equal(before, after_0)  # another peer's row is untouched


def test_all_peers_start_from_the_same_factors() -> None:
    bank = toy_bank((0, 1, 2))
    assert torch.equal(bank.flat(0), bank.flat(1)) and torch.equal(bank.flat(1), bank.flat(2))
    a = bank.layout.a_views(bank.flat(0))
    assert all(v.abs().sum() > 0 for v in a)  # A random, B zero: the peft init
    assert all(v.abs().sum() == 0 for v in bank.layout.b_views(bank.flat(0)))


def test_layout_segments_extract_and_insert() -> None:
    layout = toy_bank().layout
    flat = torch.arange(layout.numel, dtype=torch.float32)
    a_start, a_end = layout.segments["A"]
    assert layout.ranges(["A", "B", "head"]) == [(0, layout.numel)]
    assert layout.ranges(["A", "head"]) == [layout.segments["A"], layout.segments["head"]]
    whole = layout.extract(flat, ["A", "B", "head"])
    assert whole.data_ptr() == flat.data_ptr()  # contiguous parts: a view, no copy
    payload = layout.extract(flat, ["A", "head"])
    assert payload.numel() == layout.payload_numel(["A", "head"])
    target = torch.zeros_like(flat)
    layout.insert(target, ["A", "head"], payload)
    b_start, b_end = layout.segments["B"]
    assert torch.equal(target[a_start:a_end], flat[a_start:a_end])
    assert torch.all(target[b_start:b_end] == 0)
