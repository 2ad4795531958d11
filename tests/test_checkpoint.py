"""A run stopped after a checkpoint and resumed computes exactly what an uninterrupted run does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from p2p_fedrot.run import checkpoint
from p2p_fedrot.peers import training
from p2p_fedrot.config import load_config
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.run.hosting import HostedPeers
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

import launch
from launch import assert_identical_runs, toy_args
from test_runner import COMPARED, TOY, read_metrics

ADAMW = ["train.optimizer=adamw", "train.lr=0.01", "train.local_steps=3"]


def run(out: Path, *overrides: str) -> Experiment:
    experiment = Experiment(load_config(TOY, [f"out={out}", *overrides]), init_runtime())
    experiment.run()
    return experiment


def assert_same_metrics(first: list[dict], second: list[dict]) -> None:
    assert [r["round"] for r in first] == [r["round"] for r in second]
    for r1, r2 in zip(first, second):
        for key in [*COMPARED, "bytes_sent_total"]:
            np.testing.assert_allclose(r1[key], r2[key], rtol=0, atol=1e-6, err_msg=f"round {r1['round']} {key}")


@pytest.mark.parametrize("setting", [
    ["method=fedrot", *ADAMW],  # factors, rotations and AdamW moments all carry over
    ["method=fedex", "topology=server", "peers=5"],  # base weights changed by the folded residuals
    ["method=centralized", *ADAMW],  # the pooled learner
])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path: Path, setting: list[str]) -> None:
    whole = run(tmp_path / "whole", "rounds=5", *setting)
    run(tmp_path / "split", "rounds=2", *setting)
    (tmp_path / "split" / "metrics.jsonl").open("a").write('{"round": 7, "stale": true}\n')  # trimmed on resume
    resumed = run(tmp_path / "split", "rounds=5", "resume=true", *setting)
    assert_same_metrics(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split"))
    for peer, state in whole.hosted.states.items():
        torch.testing.assert_close(resumed.hosted.states[peer].flat, state.flat, rtol=0, atol=1e-6)
    state_file = tmp_path / "split" / "adapters" / "method_state.safetensors"
    assert state_file.is_file() == ("method=fedex" in setting)
    if state_file.is_file():  # fedex's folded base weights are saved with the adapters
        saved = load_file(state_file)
        assert saved.keys() == whole.method.state_tensors().keys()
        for key, weight in whole.method.state_tensors().items():
            torch.testing.assert_close(saved[key], weight, rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["bytes_sent_total"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["bytes_sent_total"]


def test_only_the_newest_complete_checkpoint_is_kept(tmp_path: Path) -> None:
    run(tmp_path, "rounds=5", "checkpoint_every=2")
    folder = checkpoint.folder_of(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "round_0004"]
    assert json.loads((folder / "latest.json").read_text())["round"] == 4
    assert sorted(p.name for p in (folder / "round_0004").iterdir()) == [f"peer_{p:03d}.safetensors" for p in range(8)]


def test_a_run_killed_mid_way_resumes_from_its_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = run(tmp_path / "whole", "rounds=6", *ADAMW)
    train = HostedPeers.train

    def crash_in_round_five(self: HostedPeers, round: int, present) -> list[int]:
        if round == 5:
            raise KeyboardInterrupt
        return train(self, round, present)

    with monkeypatch.context() as patch:
        patch.setattr(HostedPeers, "train", crash_in_round_five)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "split", "rounds=6", "checkpoint_every=2", *ADAMW)  # checkpoints after rounds 2 and 4
    assert json.loads((checkpoint.folder_of(tmp_path / "split") / checkpoint.LATEST).read_text())["round"] == 3
    resumed = run(tmp_path / "split", "rounds=6", "checkpoint_every=2", "resume=true", *ADAMW)
    assert_same_metrics(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split"))
    torch.testing.assert_close(resumed.hosted.states[3].flat, whole.hosted.states[3].flat, rtol=0, atol=1e-6)


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(tmp_path, "rounds=3", "resume=true")
    run(tmp_path, "rounds=2")
    for resume in ("true", "auto"):
        with pytest.raises(ConfigError, match=r"belong to another run \(train\.lr is 0\.5 here but 0\.2 there\); "
                                              r"use another out, or --overwrite to replace them"):
            run(tmp_path, "rounds=3", f"resume={resume}", "train.lr=0.5")
    with pytest.raises(ConfigError, match="already finished 2 rounds, more than rounds=1; set rounds to at least 2"):
        run(tmp_path, "rounds=1")
    with pytest.raises(ConfigError, match="holds this run's checkpoint after round 2 and resume is false"):
        run(tmp_path, "rounds=3", "resume=false")


def test_a_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    run(tmp_path, "rounds=2")
    folder = checkpoint.folder_of(tmp_path)
    (folder / "round_0001" / "peer_003.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match=r"peer_003\.safetensors cannot be read .* damaged"):
        run(tmp_path, "rounds=3", "resume=true")
    (folder / checkpoint.LATEST).write_text('{"round": 1, "fol')
    with pytest.raises(ConfigError, match=r"latest\.json is not valid JSON"):
        run(tmp_path, "rounds=3", "resume=true")


def test_a_checkpoint_without_optimizer_state_is_named(tmp_path: Path) -> None:
    """A peer file lacking the optimizer's moments (an older format) stops the resume with its path."""
    run(tmp_path, "rounds=2", *ADAMW)
    path = checkpoint.latest(tmp_path).folder / "peer_005.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if k != "optimizer.second"}
    checkpoint.save_tensors(path, tensors)
    with pytest.raises(ConfigError, match=r"peer_005\.safetensors holds no optimizer\.second: .*--overwrite"):
        run(tmp_path, "rounds=3", *ADAMW)


def test_a_finished_run_is_not_computed_again(tmp_path: Path) -> None:
    """Re-running a finished command rewrites its adapters and summary from the checkpoint, bit for bit."""
    run(tmp_path, "rounds=3")
    summary = json.loads((tmp_path / "summary.json").read_text())
    adapter = (tmp_path / "adapters" / "peer_002" / "adapter_model.safetensors").read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "summary.json").unlink()  # as if the first run had died while saving its outputs
    again = run(tmp_path, "rounds=3")
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "adapters" / "peer_002" / "adapter_model.safetensors").read_bytes() == adapter
    rewritten = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_mean_accuracy", "final_min_accuracy", "bytes_sent_total", "payload_bytes"):
        assert rewritten[key] == summary[key], key
    assert again.hosted.states[2].flat.equal(load_file(checkpoint.latest(tmp_path).folder / "peer_002.safetensors")["flat"])


def test_outputs_of_another_run_are_replaced_only_when_asked(tmp_path: Path) -> None:
    run(tmp_path, "rounds=2", "peers=12")
    with pytest.raises(ConfigError, match=r"belong to another run \(peers is 8 here but 12 there\)"):
        run(tmp_path, "rounds=2", "peers=8")
    assert len(list((tmp_path / "adapters").iterdir())) == 13  # nothing was touched
    run(tmp_path, "rounds=2", "peers=8", "overwrite=true")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["consensus", *(f"peer_{p:03d}" for p in range(8))]
    kept = checkpoint.folder_of(tmp_path) / "round_0001"
    assert sorted(p.name for p in kept.iterdir()) == [f"peer_{p:03d}.safetensors" for p in range(8)]


def test_a_run_killed_while_writing_its_metrics_resumes_exactly(tmp_path: Path) -> None:
    """A kill in the middle of a metrics write leaves a torn last line: the resume drops it and
    computes that round again."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, rounds in ((whole, 6), (split, 4)):  # split: 4 rounds checkpointed ...
        result = launch.run(toy_args(out, f"rounds={rounds}", "checkpoint_every=2"))
        assert result.returncode == 0, result.stderr
    with (split / "metrics.jsonl").open("a") as metrics:  # ... then killed while writing the 5th round's record
        metrics.write('{"round": 4, "time_s": 1.5, "accuracy": [0.31, 0.2')
    resumed = launch.run(toy_args(split, "rounds=6", "checkpoint_every=2"))
    assert resumed.returncode == 0, resumed.stderr
    assert_identical_runs(whole, split)


def test_an_fp16_run_resumes_with_its_loss_scales(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In fp16 a peer's step depends on its loss scale (an overflow skips the step and halves it).
    Here fp16 autocast runs on CPU (runs refuse it there) and a scale doubles after 3 good steps
    instead of 2,000, so that the scales move, and steps are skipped, within 4 rounds."""
    monkeypatch.setattr(training, "autocast_for", lambda device, precision: torch.autocast(device.type, torch.float16))
    monkeypatch.setattr(training.LossScale, "GROWTH_INTERVAL", 3)
    fp16 = ["model.precision=fp16", "checkpoint_every=2"]
    whole = run(tmp_path / "whole", "rounds=4", *fp16)
    run(tmp_path / "split", "rounds=2", *fp16)
    run(tmp_path / "split", "rounds=4", *fp16)
    assert (whole.hosted.trainer.scales.scale != 2.0**16).any()
    assert_identical_runs(tmp_path / "whole", tmp_path / "split")


@pytest.mark.slow
def test_a_resumed_run_counts_the_wire_bytes_of_the_whole_run(tmp_path: Path) -> None:
    """On two processes factors travel between them; the bytes sent before the resume count too.
    Gossip of fixed-size factors on a fixed ring sends the same bytes every round, so 4 rounds
    resumed after 2 send twice what the first 2 sent."""
    wire = []
    for rounds in (2, 4):
        result = launch.run(toy_args(tmp_path, f"rounds={rounds}", "threads=1"), nproc=2)
        assert result.returncode == 0, result.stderr
        wire.append(json.loads((tmp_path / "summary.json").read_text())["wire_bytes_total"])
    assert "round   3/4" in result.stdout and "round   1/4" not in result.stdout  # resumed, not started over
    assert wire[0] > 0 and wire[1] == 2 * wire[0]


@pytest.mark.slow
def test_a_checkpoint_from_one_process_resumes_on_two(tmp_path: Path) -> None:
    common = ["run", TOY, "--set", "threads=1", *[x for o in ADAMW for x in ("--set", o)]]
    whole = launch.run([*common, "--set", "rounds=4", "--set", f"out={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr
    first = launch.run([*common, "--set", "rounds=2", "--set", f"out={tmp_path / 'split'}"])
    assert first.returncode == 0, first.stderr
    second = launch.run([*common, "--set", "rounds=4", "--set", f"out={tmp_path / 'split'}", "--resume"], nproc=2)
    assert second.returncode == 0, second.stderr
    assert_same_metrics(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split"))
    assert "round   3/4" in second.stdout and "round   1/4" not in second.stdout
