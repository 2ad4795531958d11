"""Flat factor buffers: parameters are views, training writes through, parts extract and insert."""

from __future__ import annotations

import torch

from p2p_fedrot.config import ModelConfig
from p2p_fedrot.model import adapter_name, build_peer_models


def toy_models(peers=(0, 1)):
    return build_peer_models(ModelConfig(), list(peers), input_dim=16, num_classes=3, seed=0, device=torch.device("cpu"))


def test_parameters_are_views_of_the_flat_buffer() -> None:
    models = toy_models()
    flat = models.flats[1]
    params = [p for n, p in models.model.named_parameters() if f".{adapter_name(1)}." in n]
    end = flat.data_ptr() + flat.numel() * flat.element_size()
    assert params and all(flat.data_ptr() <= p.data_ptr() < end for p in params)
    flat.add_(1.0)  # B starts at zero, so after the write-through every B entry is exactly 1
    state = dict(models.model.named_parameters())
    name = next(n for n in state if f"lora_B.{adapter_name(1)}" in n)
    assert torch.equal(state[name], torch.ones_like(state[name]))
    other = next(n for n in state if f"lora_B.{adapter_name(0)}" in n)
    assert torch.all(state[other] == 0)  # another peer's buffer is untouched


def test_all_peers_start_from_the_same_factors() -> None:
    models = toy_models((0, 1, 2))
    assert torch.equal(models.flats[0], models.flats[1]) and torch.equal(models.flats[1], models.flats[2])
    a = models.layout.a_views(models.flats[0])
    assert all(v.abs().sum() > 0 for v in a)  # A random, B zero: the peft init
    assert all(v.abs().sum() == 0 for v in models.layout.b_views(models.flats[0]))


def test_layout_segments_extract_and_insert() -> None:
    layout = toy_models().layout
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
