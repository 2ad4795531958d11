"""Config loading: overrides, types and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p_fedrot.config import load_config
from p2p_fedrot.errors import ConfigError

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def test_overrides_are_parsed_as_yaml_values() -> None:
    config = load_config(TOY, ["peers=16", "train.lr=0.05", "topology={name: erdos_renyi, p: 0.5}",
                               "model.lora.target_modules=[fc1]", "train.grad_clip=null"])
    assert config.peers == 16 and config.train.lr == 0.05
    assert config.topology == {"name": "erdos_renyi", "p": 0.5}
    assert config.model.lora.target_modules == ["fc1"] and config.train.grad_clip is None


def test_numbers_in_exponent_notation_are_numbers() -> None:
    """YAML 1.1 reads 1e-3 and 5e-5 as text; a config must still take them as the numbers they are."""
    config = load_config(TOY, ["train.lr=1e-3", "train.grad_clip=5e-5", "comm.timeout_s=1E2"])
    assert config.train.lr == 1e-3 and config.train.grad_clip == 5e-5 and config.comm.timeout_s == 100.0


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'"),
        ("peers=eight", "'peers'"),
        ("rounds=0", "rounds must be at least 1"),
        ("comm.backend=mpi", "comm.backend"),
        ("train.optimizer_state=sometimes", "train.optimizer_state must be method, keep or reset"),
        ("train=3", "'train' must be a mapping"),
        ("nonsense", "key=value"),
        ("train.lr=abc", "'train.lr' = 'abc' must be a number"),
        ("train.lr=.inf", "train.lr = inf must be a finite number"),
        ("comm.timeout_s=.nan", "comm.timeout_s = nan must be a finite number"),
        ("seed=-1", "seed = -1 must be in [0, 2**32)"),
        ("seed=4294967296", "must be in [0, 2**32)"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("train.momentum=-1", "train.momentum"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.hidden=0", "model.hidden"),
        ("model.task=regression", "model.task must be auto, classification or causal_lm"),
        ("data.min_samples=0", "data.min_samples must be >= 1"),
        ("data.shards_per_peer=0", "data.shards_per_peer must be >= 1"),
        ("data.num_classes=1", "data.num_classes must be >= 2"),
        ("data.features=0", "data.features must be >= 1"),
        ("data.class_separation=0", "data.class_separation must be positive"),
        ("model.name=packaged:minilm", "only model.name=toy:mlp reads"),
        ("data.name=packaged:bbc_news", "model.name=toy:mlp cannot read"),
        ("model.task=causal_lm", "model.task=causal_lm needs text data"),
    ],
)
def test_bad_values_are_named(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(TOY, [override])
    assert needle in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
