"""Methods that update the frozen base weights (fedex's fold, fedgalore's dense deltas): weights stored
(in, out) by GPT-2's Conv1D, non-float32 bases, and base weights that every process must hold alike."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from multiproc import spawn_ranks
from p2p_fedrot.config import LoraSettings, ModelConfig, load_config
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.peers.bank import PeerBank
from p2p_fedrot.methods import Method, MethodContext, PeerState, make_method, trains_dense_deltas
from p2p_fedrot.peers.models import build_bank
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
C_ATTN = "transformer.h.0.attn.c_attn"


def tiny_gpt2(folder: Path, dtype: torch.dtype = torch.float32) -> str:
    """A one-layer GPT-2 saved in ``dtype``: its attention layers are Conv1D, c_attn stored as
    (in 8, out 24) and c_proj as (8, 8). Loading keeps the saved dtype."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=64, vocab_size=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).to(dtype).save_pretrained(folder)
    return str(folder)


def gpt2_bank(name: str, targets: list[str], method: str = "fedex") -> PeerBank:
    config = ModelConfig(name=name, lora=LoraSettings(r=2, alpha=4, target_modules=targets))
    return build_bank(config, [0, 1, 2], 0, 3, 0, torch.device("cpu"), trains_dense_deltas(method))


def fedex_on(bank: PeerBank) -> Method:
    return make_method("fedex", {}, MethodContext(bank.layout, lambda: 1.0, server=True, model=bank.model))


@pytest.mark.parametrize("target,stored", [("c_attn", (8, 24)), ("attn.c_proj", (8, 8))])
def test_fedex_folds_its_residual_into_a_conv1d_weight_in_the_weights_layout(tmp_path: Path, target: str,
                                                                              stored: tuple[int, int]) -> None:
    """The residual is an (out, in) update of the layer's map, folded by the hub's combine and the runner's
    settle: c_attn's (in, out) weight does not take it untransposed, the square c_proj would silently."""
    bank = gpt2_bank(tiny_gpt2(tmp_path), [target])
    (name,) = bank.layout.modules
    layer = dict(bank.model.named_modules())[name]
    assert tuple(layer.base.weight.shape) == stored
    fedex = fedex_on(bank)
    generator = torch.Generator().manual_seed(1)
    clients = [(0.25, torch.randn(bank.layout.numel, generator=generator)),
               (0.75, torch.randn(bank.layout.numel, generator=generator))]
    x = torch.randn(5, stored[0], generator=generator)
    with torch.no_grad():
        before = layer.base(x)
    fedex.combine(PeerState(0, bank.flat(0)), 0, clients)
    fedex.settle(0, [], lambda tensor, op: None)

    def product(flat: torch.Tensor) -> torch.Tensor:
        return bank.layout.b_views(flat)[0] @ bank.layout.a_views(flat)[0]

    mean = sum(w * flat for w, flat in clients)
    residual = sum(w * product(flat) for w, flat in clients) - product(mean)
    with torch.no_grad():
        torch.testing.assert_close(layer.base(x), before + bank.layout.scalings[0] * x @ residual.T, atol=1e-5, rtol=0)


def test_fedgalore_refuses_conv1d_targets_before_training(tmp_path: Path) -> None:
    name = tiny_gpt2(tmp_path)
    with pytest.raises(ConfigError, match=rf"^model\.name='{re.escape(name)}': layer {C_ATTN} stores its weight as "
                                          r"\(in, out\) \(a Conv1D\).*model\.lora\.target_modules"):
        gpt2_bank(name, ["c_attn"], "fedgalore")


def test_fedex_refuses_a_base_model_that_is_not_float32(tmp_path: Path) -> None:
    name = tiny_gpt2(tmp_path, torch.bfloat16)
    bank = gpt2_bank(name, ["c_attn"])
    with pytest.raises(ConfigError, match=rf"model {re.escape(name)} holds the weight of layer {C_ATTN} in "
                                          r"torch\.bfloat16.*float32 copy"):
        fedex_on(bank)


DRILL = ["method=fedex", "topology=server", "peers=4", "rounds=3", "threads=1", "train.local_steps=2",
         "data.train_samples=800", "data.test_samples=200", "comm.on_bad_payload=drop", "comm.timeout_s=60",
         "comm.inject_fault={peer: 0, round: 1, kind: nan}"]


def fedex_base_weights(rank: int, world: int, out: str) -> dict[str, dict[str, torch.Tensor]]:
    """Run the drill on this rank; the base weights it started from and ended with."""
    config = load_config(TOY, [*DRILL, f"out={out}"])
    experiment = Experiment(config, init_runtime(config.comm.backend, config.comm.timeout_s))
    initial = {key: weight.clone() for key, weight in experiment.method.state_tensors().items()}
    experiment.run()
    return {"initial": initial, "final": experiment.method.state_tensors()}


@pytest.mark.slow
def test_fedex_processes_fold_alike_when_one_process_refuses_the_hub(tmp_path: Path) -> None:
    """Two processes (hub 0 and client 1 | clients 2 and 3): in round 1 every client refuses the hub's
    corrupted payload. No process folds that round (rounds 0 and 2 do), so both end with the same bits,
    and with the weights of one process running every peer (to rounding: it trains its three clients
    in one batched forward, process 0 of two its one client alone)."""
    ranks = spawn_ranks(fedex_base_weights, 2, str(tmp_path / "two"), timeout=180)
    alone = fedex_base_weights(0, 1, str(tmp_path / "one"))
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(d["sender"], d["receiver"]) for d in records[1]["dropped"]] == [(0, 1), (0, 2), (0, 3)]
    for key, weight in ranks[0]["final"].items():
        assert torch.equal(weight.view(torch.int32), ranks[1]["final"][key].view(torch.int32)), key
        torch.testing.assert_close(weight, alone["final"][key], atol=1e-6, rtol=0, msg=key)
        assert not torch.equal(weight, ranks[0]["initial"][key]), key
