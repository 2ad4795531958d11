"""LoRA on chosen blocks (model.lora.layers) and the frozen-prefix cache: the cached forward computes
what the whole model computes with its prefix's dropout off, for every hosted peer, and runs with it
keep the reproducibility contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from launch import assert_identical_runs, kill_group, run, start, wait_for_round
from p2p_fedrot.peers import prefix
from p2p_fedrot.peers.adapters import save_peer_adapters
from p2p_fedrot.peers.bank import PeerStreams
from p2p_fedrot.config import LoraSettings, ModelConfig, TrainConfig, load_config
from p2p_fedrot.data.federated import as_corpus, joined
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.peers.models import _base_model, build_bank, load_tokenizer, task_of
from p2p_fedrot.peers.training import batch_scores, part_flags
from test_bank import random_rows

CPU = torch.device("cpu")
PEERS = [0, 1]
ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
TOP_TWO = {"minilm": ModelConfig(name="packaged:minilm", max_length=16, lora=LoraSettings(layers={"top": 2}, dropout=0.2)),
           "smollm2": ModelConfig(name="packaged:smollm2", max_length=12, lora=LoraSettings(layers={"top": 2}, dropout=0.2))}


def corpus_for(config: ModelConfig, size: int = 6):
    """A few sentences of different lengths, tokenised as build_data does, as a corpus."""
    tokenizer = load_tokenizer(config)
    texts = [("the weather today " * (1 + i % 3)) + f"number {i}" for i in range(size)]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=config.max_length, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if task_of(config) == "causal_lm":
        return as_corpus(inputs, encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100))
    return as_corpus(inputs, torch.tensor([i % 3 for i in range(size)]))


def test_layers_selects_blocks_and_the_adapters_load_in_peft(tmp_path: Path) -> None:
    config = ModelConfig(name="packaged:minilm", max_length=16, lora=LoraSettings(layers=[1, 4]))
    bank = build_bank(config, PEERS, 0, 3, 0, CPU)
    assert {name.split(".")[3] for name in bank.layout.modules} == {"1", "4"}
    random_rows(bank)
    save_peer_adapters(bank, [1], tmp_path)
    written = json.loads((tmp_path / "peer_001" / "adapter_config.json").read_text())
    assert written["layers_to_transform"] == [1, 4] and written["layers_pattern"] == "layer"
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(_base_model(config, "classification", 0, 3)[0], tmp_path / "peer_001").eval()
    batch = corpus_for(config)
    bank.model.eval()
    with bank.running(bank.rows([1]), [len(batch)]), torch.no_grad():
        mine = bank.model(**batch.inputs).logits
    assert torch.allclose(loaded(**batch.inputs).logits, mine, atol=1e-5)


@pytest.mark.parametrize("layers, message", [
    ({"top": 7}, r"more blocks than packaged:minilm has \(6\)"),
    ([2, 6], r"names block 6, but packaged:minilm has 6 blocks"),
])
def test_blocks_out_of_range_are_named(layers, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_bank(ModelConfig(name="packaged:minilm", lora=LoraSettings(layers=layers)), PEERS, 0, 3, 0, CPU)


def test_the_toy_model_has_no_blocks_to_choose() -> None:
    with pytest.raises(ConfigError, match="toy:mlp has no blocks"):
        build_bank(ModelConfig(lora=LoraSettings(layers={"top": 1})), PEERS, 8, 3, 0, CPU)
    with pytest.raises(ConfigError, match="model.lora.layers must be all"):
        load_config(None, ["model.lora.layers={top: 0}"])


def scores_and_grads(bank, batch, sizes: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each peer's mean loss and gradients on its share of ``batch``, dropout drawn per peer."""
    streams = [torch.Generator().manual_seed(11 + p) for p in PEERS]
    with bank.running(bank.rows(PEERS), sizes, part_flags(bank.layout, frozenset({"A", "B", "head"}))) as leaves, \
            PeerStreams(bank.run, streams, CPU):
        scores = batch_scores(bank, batch, sizes)
        mean = scores.loss / scores.counted
        mean.sum().backward()
    return mean.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("case", list(TOP_TWO))
def test_the_cached_forward_gives_the_loss_and_gradients_of_the_whole_model(case: str) -> None:
    config = TOP_TWO[case]
    bank = build_bank(config, PEERS, 0, 3, 0, CPU)
    random_rows(bank, 0.05)
    corpus = corpus_for(config)
    prefix.install(bank, corpus, TrainConfig())
    cache = bank.prefix
    assert cache is not None and cache.split.k == len(cache.split.blocks) - 2
    batch = joined([corpus.subset([0, 2, 4]), corpus.subset([5, 1, 3])])
    bank.model.train()
    cached = scores_and_grads(bank, batch, [3, 3])
    bank.prefix = None
    with prefix._evaluating(cache.split.lower_modules()):
        whole = scores_and_grads(bank, batch, [3, 3])
    assert torch.allclose(cached[0], whole[0], rtol=1e-5, atol=0)
    for got, want in zip(cached[1], whole[1]):
        for row in range(len(PEERS)):
            assert float((got[row] - want[row]).norm()) <= 1e-5 * float(want[row].norm()), case


def test_a_cache_over_its_bound_is_not_built_and_says_so(capsys: pytest.CaptureFixture) -> None:
    config = TOP_TWO["minilm"]
    bank = build_bank(config, PEERS, 0, 3, 0, CPU)
    prefix.install(bank, corpus_for(config), TrainConfig(prefix_cache_max_gb=1e-6))
    assert bank.prefix is None
    assert "no frozen-prefix cache" in capsys.readouterr().out
    prefix.install(bank, corpus_for(config), TrainConfig(prefix_cache=False))
    assert bank.prefix is None


def test_batches_are_padded_to_their_longest_example() -> None:
    corpus = corpus_for(TOP_TWO["minilm"])
    lengths = corpus.inputs["attention_mask"].sum(dim=1)
    batch = joined([corpus.subset([0, 3]), corpus.subset([1])])
    assert batch.inputs["input_ids"].shape[1] == int(lengths[[0, 3, 1]].max()) < corpus.inputs["input_ids"].shape[1]
    assert batch.ids.tolist() == [0, 3, 1]


CACHED_ROUNDS = 100
EVAL_EVERY = 5  # every round trains, mixes and is compared through the adapters; records every 5th


def minilm_args(out: Path, *extra: str) -> list[str]:
    settings = ["peers=4", f"rounds={CACHED_ROUNDS}", "train.local_steps=1", "train.batch_size=4",
                "train.batch_peers=false", "data.train_samples=64", "data.test_samples=8", "data.min_samples=4",
                "model.max_length=12", "model.lora.layers={top: 2}", "model.lora.dropout=0.1", "threads=1",
                f"eval.every={EVAL_EVERY}", "eval.batch_size=8", "checkpoint_every=10", f"out={out}", *extra]
    return ["run", DEMO, *[x for s in settings for x in ("--set", s)]]


@pytest.mark.slow
def test_cached_runs_keep_the_contract_over_100_rounds_and_a_bound_turns_the_cache_off(tmp_path: Path) -> None:
    """MiniLM with a cached prefix and LoRA dropout above it, 100 rounds: a run killed after round 75
    on 2 processes and resumed on 1 ends identical to an uninterrupted run on 1, so rounds 1-70
    give the same bits on 2 processes as on 1, and the resume loses nothing."""
    one, killed = tmp_path / "one", tmp_path / "killed"
    result = run(minilm_args(one))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "set-up: frozen-prefix cache: blocks 0..3" in result.stdout, result.stdout
    process = start(minilm_args(killed), nproc=2, log=tmp_path / "killed.log")
    wait_for_round(process, killed, 75 // EVAL_EVERY)  # the record of round 75, between checkpoints
    kill_group(process)
    assert "set-up: frozen-prefix cache: blocks 0..3" in (tmp_path / "killed.log").read_text()
    resumed = run(minilm_args(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "set-up: frozen-prefix cache: blocks 0..3" in resumed.stdout, resumed.stdout
    assert "round  71/100" in resumed.stdout and "round  70/100" not in resumed.stdout  # from the round-70 checkpoint
    assert_identical_runs(one, killed)
    bounded = run(minilm_args(tmp_path / "bounded", "rounds=1", "train.prefix_cache_max_gb=1e-6"))
    assert bounded.returncode == 0, bounded.stderr[-3000:]
    assert "set-up: no frozen-prefix cache: " in bounded.stdout, bounded.stdout
