"""log.tensorboard: every single number of metrics.jsonl as a TensorBoard scalar per round."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from p2p_fedrot.config import load_config
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.run.hosting import HostedPeers
from p2p_fedrot.run.outputs import TENSORBOARD, TensorBoardWriter
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def run(out: Path, *overrides: str) -> None:
    config = load_config(TOY, ["peers=4", "rounds=4", "train.local_steps=2", "log.tensorboard=true",
                               f"out={out}", *overrides])
    Experiment(config, init_runtime()).run()


def flat_numbers(record: dict, prefix: str = "") -> dict[str, float]:
    numbers = {}
    for key, value in record.items():
        if isinstance(value, dict):
            numbers.update(flat_numbers(value, f"{prefix}{key}/"))
        elif type(value) in (int, float) and prefix + key != "round":
            numbers[prefix + key] = value
    return numbers


def assert_board_matches_metrics(out: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    board = EventAccumulator(str(out / TENSORBOARD))
    board.Reload()
    expected = {tag: [(r["round"], value)] for r in records[:1] for tag, value in flat_numbers(r).items()}
    for record in records[1:]:
        for tag, value in flat_numbers(record).items():
            expected.setdefault(tag, []).append((record["round"], value))
    assert {"mean_accuracy", "consensus_distance", "seconds/train", "bytes_sent_total"} <= expected.keys()
    assert set(board.Tags()["scalars"]) == expected.keys()
    for tag, points in expected.items():
        logged = [(event.step, event.value) for event in board.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        np.testing.assert_array_equal([v for _, v in logged], np.float32([v for _, v in points]), err_msg=tag)


def test_event_files_hold_every_number_of_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="log.tensorboard needs the optional tensorboard package")
    run(tmp_path)
    assert_board_matches_metrics(tmp_path)


def test_a_resumed_run_continues_the_event_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run logs round 2 and dies before its checkpoint; the resumed run logs round 2 again
    in a new event file, which must replace the first one's, as metrics.jsonl replaces its line."""
    pytest.importorskip("tensorboard", reason="log.tensorboard needs the optional tensorboard package")
    train = HostedPeers.train

    def crash_in_round_three(self: HostedPeers, round: int, present) -> list[int]:
        if round == 3:
            raise KeyboardInterrupt
        return train(self, round, present)

    with monkeypatch.context() as patch:
        patch.setattr(HostedPeers, "train", crash_in_round_three)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, "checkpoint_every=2")
    run(tmp_path, "checkpoint_every=2")
    assert len(list((tmp_path / TENSORBOARD).iterdir())) == 2
    assert_board_matches_metrics(tmp_path)


def test_missing_tensorboard_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"log.tensorboard is true but the tensorboard package is not installed"):
        TensorBoardWriter(tmp_path, 0)
