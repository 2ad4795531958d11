"""Every saved adapter names its classes as transformers does (config.json: id2label / label2id)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from p2p_fedrot.config import load_config
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]  # packaged:bbc_news's folders


def test_consensus_adapter_gives_named_predictions_with_peft(tmp_path: Path) -> None:
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = load_config(ROOT / "configs" / "demo.yaml",
                         ["peers=2", "rounds=1", "train.local_steps=1", "data.name=packaged:bbc_news",
                          "data.train_samples=60", "data.test_samples=8", "data.min_samples=5",
                          "model.max_length=16", f"out={tmp_path}"])
    exp = Experiment(config, init_runtime())
    exp.run()
    adapters = tmp_path / "adapters"
    for folder in ("consensus", "peer_000", "peer_001"):
        saved = json.loads((adapters / folder / "config.json").read_text())
        assert saved["id2label"] == {str(i): name for i, name in enumerate(BBC_CLASSES)}
        assert saved["label2id"] == {name: i for i, name in enumerate(BBC_CLASSES)}

    adapter = adapters / "consensus"  # the five lines of docs/outputs.md
    source = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    labels = AutoConfig.from_pretrained(adapter)
    base = AutoModelForSequenceClassification.from_pretrained(source, id2label=labels.id2label,
                                                              label2id=labels.label2id)
    model = PeftModel.from_pretrained(base, adapter).eval()
    inputs = AutoTokenizer.from_pretrained(source)(["Shares rose as the bank cut interest rates."] * 2,
                                                   padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        names = [model.config.id2label[int(i)] for i in model(**inputs).logits.argmax(-1)]

    consensus = exp.method.consensus(exp.hosted.client_rows(), len(exp.clients), exp.group.reduce).float()
    batch = {k: v for k, v in inputs.items() if k in exp.data.test.inputs}
    with torch.no_grad(), exp.bank.running(consensus[None], [2]):
        expected = exp.bank.model(**batch).logits.argmax(-1)
    assert names == [BBC_CLASSES[int(i)] for i in expected]


def test_synthetic_classes_are_named_by_their_ids(tmp_path: Path) -> None:
    from transformers import PretrainedConfig

    config = load_config(ROOT / "configs" / "toy.yaml", ["peers=2", "rounds=1", "train.local_steps=1",
                                                         "data.num_classes=3", f"out={tmp_path}"])
    Experiment(config, init_runtime()).run()
    saved = PretrainedConfig.from_pretrained(tmp_path / "adapters" / "consensus")
    assert saved.id2label == {0: "0", 1: "1", 2: "2"} and saved.label2id == {"0": 0, "1": 1, "2": 2}


def test_a_csv_dataset_names_its_classes_by_its_label_strings(tmp_path: Path) -> None:
    from p2p_fedrot.config import DataConfig, ModelConfig
    from p2p_fedrot.data.federated import build_data
    from p2p_fedrot.peers.models import load_tokenizer

    path = tmp_path / "mail.csv"
    rows = [("win money now", "spam"), ("lunch at noon?", "ham"), ("free prize", "spam"), ("see you at five", "ham")]
    path.write_text("text,label\n" + "".join(f"{text} {k},{label}\n" for k in range(10) for text, label in rows))
    data = build_data(DataConfig(name=str(path), train_samples=32, test_samples=8, min_samples=2), [0, 1], 0,
                      load_tokenizer(ModelConfig(name="packaged:minilm")), max_length=8)
    assert data.class_names == ["ham", "spam"]  # sorted, as the corpus numbers them
