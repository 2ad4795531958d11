"""Real Hugging Face models through peft: adapters reload with identical logits, bad inputs are named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from p2p_fedrot.config import ModelConfig, load_config
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.peers.models import task_of
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SMALL = ["peers=4", "rounds=1", "train.local_steps=2", "data.train_samples=200", "data.test_samples=40",
         "data.min_samples=5", "model.max_length=32", "eval.batch_size=40"]


def run_small(tmp_path: Path, *extra: str) -> Experiment:
    config = load_config(DEMO, [*SMALL, f"out={tmp_path}", *extra])
    experiment = Experiment(config, init_runtime())
    experiment.run()
    return experiment


def test_saved_peer_adapter_reloads_with_the_same_logits(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    experiment = run_small(tmp_path)
    peer = 2
    batch = {k: v[:8] for k, v in experiment.data.test.inputs.items()}
    bank = experiment.bank
    bank.model.eval()
    with torch.no_grad(), bank.running(bank.rows([peer]), [8]):
        expected = bank.model(**batch).logits
    source = json.loads((tmp_path / "adapters" / "peer_002" / "adapter_config.json").read_text())["base_model_name_or_path"]
    torch.manual_seed(123)  # a different random head underneath: the adapter must carry the trained one
    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=5)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapters" / "peer_002").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["consensus"] + [f"peer_{i:03d}" for i in range(4)]
    peers = [load_file(tmp_path / "adapters" / f"peer_{i:03d}" / "adapter_model.safetensors") for i in range(4)]
    consensus = load_file(tmp_path / "adapters" / "consensus" / "adapter_model.safetensors")
    assert consensus.keys() == peers[0].keys() and any("lora_B" in key for key in consensus)
    for key, value in consensus.items():  # the plain average of the peers' factors and heads
        torch.testing.assert_close(value, torch.stack([p[key] for p in peers]).mean(dim=0), atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.name=packaged:gpt9", "unknown packaged model"),
        ("model.name=/nonexistent/model", "could not be loaded"),
        ("data.name=packaged:wikipedia", "packaged"),
        ("model.lora.target_modules=[nothing_here]", "query"),
        ("model.lora.r=1000", "model.lora.r=1000"),
        ("peers=500", "min_samples"),
        ("data.text_column=body", "body"),
        ("data.name=synthetic", "only model.name=toy:mlp reads"),
        ("model.task=causal_lm", "model.task=causal_lm needs a decoder language model"),
    ],
)
def test_bad_input_names_the_key_and_the_fix(tmp_path: Path, override: str, needle: str) -> None:
    if override.startswith("data.text_column"):
        csv = tmp_path / "d.csv"
        csv.write_text("text,label\nhello,a\nworld,b\n" * 30)
        override_list = [f"data.name={csv}", override, "data.test_samples=10", "data.min_samples=2"]
    else:
        override_list = [override]
    with pytest.raises(ConfigError) as info:
        config = load_config(DEMO, [*SMALL, f"out={tmp_path / 'run'}", *override_list])
        Experiment(config, init_runtime())
    assert needle in str(info.value), str(info.value)


def test_peers_not_divisible_by_processes_is_a_clear_error() -> None:
    from p2p_fedrot.comm.transport import Placement

    with pytest.raises(ConfigError, match="multiple of the process count"):
        Placement(peers=6, world=4, rank=0)


@pytest.mark.parametrize(
    ("hf_config", "decoder"),
    [
        ({"model_type": "llama"}, True),
        ({"model_type": "gpt2"}, True),
        ({"model_type": "bert", "is_decoder": True}, True),
        ({"model_type": "bert"}, False),
        ({"model_type": "roberta"}, False),
        ({"model_type": "t5"}, False),
    ],
)
def test_causal_lm_needs_a_decoder_in_a_local_folder(tmp_path: Path, hf_config: dict, decoder: bool) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    config = ModelConfig(name=str(tmp_path), task="causal_lm")
    if decoder:
        assert task_of(config) == "causal_lm"
    else:
        with pytest.raises(ConfigError, match=r"model\.task=causal_lm .*packaged:smollm2"):
            task_of(config)
