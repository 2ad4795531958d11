"""Clients holding the same adapter bits score the shared test set once, with unchanged numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2p_fedrot.run import hosting
from p2p_fedrot.config import load_config
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime
from p2p_fedrot.peers.training import evaluate

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def distinct_adapters(exp: Experiment) -> int:
    return len({exp.bank.flat(p).numpy().tobytes() for p in exp.hosted.clients})


@pytest.mark.parametrize("topology,identical", [("server", True), ("ring", False)])
def test_the_shared_test_is_scored_once_per_distinct_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             topology: str, identical: bool) -> None:
    config = load_config(TOY, ["rounds=2", "train.local_steps=3", f"topology={topology}", f"out={tmp_path}"])
    exp = Experiment(config, init_runtime())
    scored: list[list[int]] = []  # per evaluation: the peers scored on the shared test set

    def counting(bank, datasets, *args, **kwargs):
        if any(d is exp.data.test for d in datasets.values()):
            scored.append(list(datasets))
        return evaluate(bank, datasets, *args, **kwargs)

    monkeypatch.setattr(hosting, "evaluate", counting)
    exp.run()
    distinct = distinct_adapters(exp)
    assert distinct == (1 if identical else len(exp.hosted.clients))
    scored.clear()
    scores = exp.hosted.evaluate(config.rounds)
    assert sum(len(peers) for peers in scored) == distinct
    one_each = evaluate(exp.bank, {p: exp.data.test for p in exp.hosted.clients}, config.eval.batch_size,
                        config.model.precision, exp.per_forward)
    for p in exp.hosted.clients:
        assert scores[p][:2] == (one_each[p].accuracy, one_each[p].loss)
    assert len({scores[p][2:] for p in exp.hosted.clients}) > 1  # each client's own split is scored on its own


def test_equal_bits_group_and_a_hash_collision_does_not_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(TOY, ["peers=4", f"out={tmp_path}"])
    exp = Experiment(config, init_runtime())
    exp.bank.flat(2).add_(1.0)
    assert hosting.identical_rows(exp.bank, [0, 1, 2, 3]) == [[0, 1, 3], [2]]

    class Collide:
        def __init__(self, *args, **kwargs) -> None: ...

        def digest(self) -> bytes:
            return b"same"

    monkeypatch.setattr(hosting.hashlib, "blake2b", Collide)
    assert hosting.identical_rows(exp.bank, [0, 1, 2, 3]) == [[0, 1, 3], [2]]
    assert torch.equal(exp.bank.flat(0), exp.bank.flat(3))
