"""The packaged SmolLM2 causal LM: GGUF converted once, LoRA peers train and report perplexity."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from p2p_fedrot.config import load_config
from p2p_fedrot.peers.models import _held_stderr
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.slow
def test_smollm2_peers_train_and_report_perplexity(tmp_path: Path) -> None:
    config = load_config(DEMO, [
        "model.name=packaged:smollm2", "peers=2", "rounds=2", "train.local_steps=2", "train.batch_size=4",
        "data.train_samples=48", "data.test_samples=8", "data.min_samples=4", "model.max_length=32",
        "eval.every=1", "eval.batch_size=8", "train.lr=0.001", f"out={tmp_path}",
    ])
    experiment = Experiment(config, init_runtime())
    assert experiment.bank.task == "causal_lm"
    assert {m.rsplit(".", 1)[-1] for m in experiment.layout.modules} == {"q_proj", "v_proj"}
    experiment.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in records)
    assert records[-1]["mean_loss"] < records[0]["mean_loss"] + 0.5  # training does not blow up
    assert 0 < records[-1]["mean_accuracy"] < 1  # next-token accuracy
    assert (tmp_path / "adapters" / "peer_001" / "adapter_model.safetensors").is_file()


def test_the_gguf_conversion_bar_is_held_back_and_shown_only_on_failure(capfd: pytest.CaptureFixture) -> None:
    """The GGUF reader draws its own tqdm bar (tqdm.auto, to stderr) while SmolLM2 is converted."""
    from tqdm.auto import tqdm

    with _held_stderr():
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert capfd.readouterr().err == ""
    with pytest.raises(ValueError, match="bad tensor"), _held_stderr():
        sys.stderr.write("what the reader said\n")
        raise ValueError("bad tensor")
    assert capfd.readouterr().err == "what the reader said\n"
