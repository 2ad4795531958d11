"""Typed run configuration: YAML file + ``--set key.sub=value`` overrides -> validated dataclasses.

Every key is declared here once, with its default, so that a typo in a YAML file or an override
is reported with the list of valid keys instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError
from .io import atomic_write_text


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the model's own default
    init: str = "shared"  # shared | per_peer (each peer its own draw) | rotated (shared, turned per peer)
    layers: Union[str, dict, list[int]] = "all"  # all | {top: k} | [block indices]: the blocks LoRA adapts


@dataclass
class ModelConfig:
    name: str = "toy:mlp"  # toy:mlp | packaged:minilm | packaged:smollm2 | HF model id | local folder
    task: str = "auto"  # auto | classification | causal_lm (auto: causal_lm for packaged:smollm2)
    hidden: int = 64  # toy model only
    max_length: int = 64  # tokens per text
    precision: str = "auto"  # auto (bf16 autocast on a GPU that supports it, else fp32) | fp32 | bf16 | fp16
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | packaged:bbc_news | packaged:health_tweets | packaged:sentiment | file | HF name
    text_column: str = "text"  # local files and HF datasets
    label_column: str = "label"
    split: str = "train"  # HF datasets split to read
    num_classes: int = 10  # synthetic data only
    features: int = 32  # synthetic data only
    train_samples: int | None = 4000  # at most this many training samples (null: all that remain)
    test_samples: int = 1000  # size of the shared held-out test set
    class_separation: float = 1.0  # synthetic data: distance scale of the class means
    partition: str = "dirichlet"  # iid | dirichlet | shards
    alpha: float = 0.5  # dirichlet concentration: smaller -> more label skew
    shards_per_peer: int = 2
    min_samples: int = 10
    local_test_fraction: float = 0.2


@dataclass
class TrainConfig:
    local_steps: int = 5
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    optimizer_state: str = "method"  # method (the method's rule) | keep (across rounds) | reset (every round)
    warmup_rounds: int = 0  # rounds of local training before the first exchange
    batch_peers: bool | str | int = "auto"  # true: all hosted peers in one forward | k: k at a time | false | auto
    prefix_cache: bool | str = "auto"  # auto: run the frozen blocks below the lowest adapted one once per example | false
    prefix_cache_max_gb: float = 4.0  # the cache's memory bound; a run whose cache would exceed it runs without it


@dataclass
class EvalConfig:
    every: int = 1
    batch_size: int = 256


BAD_PAYLOAD_POLICIES = ("fail", "drop")  # comm.on_bad_payload (comm/screening.py applies them)
FAULT_KINDS = ("nan", "inf", "scale", "truncate", "tamper")  # comm.inject_fault kinds (comm/faults.py makes them)


@dataclass
class CommConfig:
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 300.0
    validate: bool = True  # screen received payloads: declared size, finite values, norm ratio
    max_norm_ratio: float = 100.0  # a payload's norm may be at most this times the receiver's own
    on_bad_payload: str = "fail"  # fail (stop, naming the sender) | drop (mix without it, renormalise)
    inject_fault: dict | None = None  # drill: {peer: 3, round: 5, kind: nan | inf | scale | truncate | tamper}


# adversary.attack -> the default of adversary.strength (None: the attack takes none). robust/attacks.py
# computes the messages, run/adversary.py applies them; label_flip poisons the data instead.
ATTACK_STRENGTHS: dict[str, float | None] = {
    "none": None,  # the adversary's peers send honestly (they are still left out of the honest metrics)
    "sign_flip": None,  # -x
    "scaled": 10.0,  # strength * x
    "gaussian": 1.0,  # x + N(0, strength^2) noise
    "alie": 10.0,  # z: the honest messages' mean - z * their std (ALIE10 of the ClippedGossip experiments)
    "ipm": 0.1,  # eps: -eps * the honest messages' mean
    "dissensus": 1.5,  # eps: x_i - eps * the pull of i's honest neighbours / the weight of its Byzantine ones
    "gauge_scale": 5.0,  # c: (c A, B / c), the same products
    "label_flip": None,  # trains on label C - 1 - y
}


@dataclass
class AdversaryConfig:
    peers: list[int] = field(default_factory=list)  # the Byzantine clients, left out of every honest metric
    attack: str = "none"  # one of ATTACK_STRENGTHS
    strength: float | None = None  # None: the attack's default (ATTACK_STRENGTHS)

    def __post_init__(self) -> None:
        if self.strength is None:  # the resolved config records the strength the run used
            self.strength = ATTACK_STRENGTHS.get(self.attack)


@dataclass
class RobustConfig:
    """The robust mixing rule (robust/rules.py checks the settings against the rule)."""

    rule: str = "none"  # none (the method's own mixing) | plain | clip | cs_plus | trimmed_mean | median
    gauge: bool = True  # rules read gauge-fixed factors (balanced, aligned to the receiver)
    tau: Union[float, str] = "auto"  # clip: auto (ClippedGossip's adaptive radius) or a radius (.inf: none)
    b: int = 1  # cs_plus, trimmed_mean: the Byzantine neighbours each receiver assumes


@dataclass
class LogConfig:
    tensorboard: bool = False  # also write each metrics record as TensorBoard scalars in out/tensorboard


@dataclass
class RunConfig:
    seed: int = 0
    peers: int = 8
    rounds: int = 10
    out: str = "runs/run"
    topology: Union[str, dict] = "ring"
    mixing: str = "metropolis"
    allow_disconnected: bool = False
    method: str = "fedrot"
    method_args: dict = field(default_factory=dict)
    participation: float = 1.0  # probability that a peer takes part in a round (drawn from seed and round)
    checkpoint_every: int = 0  # rounds between checkpoints in out/checkpoint (0: only after the last round)
    resume: Union[bool, str] = "auto"  # auto: go on from this run's checkpoint in out | true: require it | false: refuse it
    overwrite: bool = False  # replace another run's outputs in out (otherwise that is an error)
    threads: int | None = None  # torch threads per process; None: cores / local processes
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/toy.yaml")
        with open(path, encoding="utf-8") as handle:
            try:
                raw = yaml.safe_load(handle) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys at its top level")
    for item in overrides:
        apply_override(raw, item)
    config = from_dict(RunConfig, raw, where)
    validate(config)
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so 3, 0.1, true, [q, v] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. --set train.lr=0.05)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None


def from_dict(cls: type, raw: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrongly typed values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, where, prefix + name)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, where, key + ".")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where, key)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: '{key}' = {value!r} has the wrong type; expected {_describe(hint)}")
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        return _float_from_text(value, where, key)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' = {value!r} must be true or false")
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' = {value!r} must be an integer")
    if not isinstance(value, expected):
        raise ConfigError(f"{where}: '{key}' = {value!r} has the wrong type; expected {_describe(hint)}")
    if expected is list:
        (item_type,) = typing.get_args(hint) or (Any,)
        if item_type is not Any and not all(isinstance(v, item_type) for v in value):
            raise ConfigError(f"{where}: '{key}' must be a list of {item_type.__name__}")
    return value


def _float_from_text(value: str, where: str, key: str) -> float:
    """YAML 1.1 reads 1e-3 (no dot, or no sign in the exponent) as text; accept it as the number it means."""
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: '{key}' = {value!r} must be a number") from None


UNBOUNDED = ("robust.tau",)  # float settings where .inf means "no bound"


def _finite_floats(config: Any, prefix: str = "") -> list[tuple[bool, str]]:
    """Every float setting must be finite (but those in UNBOUNDED, which may be +inf): inf or nan would
    only surface as a failure deep in a run."""
    checks = []
    for setting in dataclasses.fields(config):
        value, key = getattr(config, setting.name), prefix + setting.name
        if dataclasses.is_dataclass(value):
            checks += _finite_floats(value, f"{key}.")
        elif isinstance(value, float):
            ok = math.isfinite(value) or (key in UNBOUNDED and value == math.inf)
            checks.append((ok, f"{key} = {value} must be a finite number"))
    return checks


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def validate(config: RunConfig) -> None:
    """Range checks that the types alone do not express; each error names the key and the fix."""
    checks = [
        *_finite_floats(config),
        (0 <= config.seed < 2**32, f"seed = {config.seed} must be in [0, 2**32)"),
        (config.peers >= 2, "peers must be at least 2"),
        (config.rounds >= 1, "rounds must be at least 1"),
        (config.model.lora.r >= 1, "model.lora.r (the LoRA rank) must be at least 1"),
        (0.0 <= config.model.lora.dropout < 1.0, "model.lora.dropout must be in [0, 1)"),
        (config.model.lora.init in ("shared", "per_peer", "rotated"), "model.lora.init must be shared, per_peer or rotated"),
        (isinstance(config.train.warmup_rounds, int) and config.train.warmup_rounds >= 0,
         "train.warmup_rounds must be a whole number >= 0"),
        (config.train.local_steps >= 0, "train.local_steps must be >= 0"),
        (config.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (config.train.lr > 0, "train.lr must be positive"),
        (config.train.optimizer in ("sgd", "adamw"), "train.optimizer must be sgd or adamw"),
        (isinstance(config.train.batch_peers, bool) or config.train.batch_peers == "auto"
         or (isinstance(config.train.batch_peers, int) and config.train.batch_peers >= 1),
         "train.batch_peers must be true, false, auto or a number of peers per forward (>= 1)"),
        (config.train.optimizer_state in ("method", "keep", "reset"),
         "train.optimizer_state must be method, keep or reset"),
        (config.train.prefix_cache in ("auto", False), "train.prefix_cache must be auto or false"),
        (config.train.prefix_cache_max_gb > 0, "train.prefix_cache_max_gb must be positive (gigabytes)"),
        *_layers_checks(config.model.lora.layers),
        (config.train.grad_clip is None or config.train.grad_clip > 0, "train.grad_clip must be positive or null"),
        (config.eval.every >= 1, "eval.every must be >= 1 (rounds between evaluations)"),
        (config.comm.backend in ("auto", "gloo", "nccl"), "comm.backend must be auto, gloo or nccl"),
        (config.comm.timeout_s > 0, "comm.timeout_s must be positive (seconds to wait for a neighbour)"),
        (config.comm.max_norm_ratio > 1, "comm.max_norm_ratio must be above 1 (a neighbour's payload norm may be "
                                         "at most this times the receiver's own)"),
        (config.comm.on_bad_payload in BAD_PAYLOAD_POLICIES, f"comm.on_bad_payload must be one of {', '.join(BAD_PAYLOAD_POLICIES)}"),
        (0.0 < config.participation <= 1.0, "participation must be in (0, 1] (the probability that a peer takes "
                                            "part in a round)"),
        (config.resume in (True, False, "auto"), f"resume = {config.resume!r} must be auto, true or false"),
        (not (config.overwrite and config.resume is True), "resume: true (--resume) and overwrite: true (--overwrite) "
                                                           "contradict each other; give one of them"),
        *_fault_checks(config),
        *_adversary_checks(config),
        (config.data.partition in ("iid", "dirichlet", "shards"), "data.partition must be iid, dirichlet or shards"),
        (config.data.alpha > 0, "data.alpha (Dirichlet concentration) must be positive"),
        (0.0 <= config.data.local_test_fraction < 1.0, "data.local_test_fraction must be in [0, 1)"),
        (config.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: checkpoint only after the last round)"),
        (config.threads is None or config.threads >= 1, "threads must be >= 1 or null"),
        (config.model.max_length >= 8, "model.max_length must be at least 8 tokens"),
        (config.model.precision in ("auto", "fp32", "bf16", "fp16"), "model.precision must be auto, fp32, bf16 or fp16"),
        (config.data.train_samples is None or config.data.train_samples >= 1, "data.train_samples must be >= 1 or null"),
        (config.data.test_samples >= 1, "data.test_samples must be >= 1"),
        (config.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (0.0 <= config.train.momentum < 1.0, "train.momentum must be in [0, 1)"),
        (config.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (config.model.lora.alpha > 0, "model.lora.alpha (the LoRA scale numerator) must be positive"),
        (config.model.hidden >= 1, "model.hidden (the toy model's width) must be >= 1"),
        (config.model.task in ("auto", "classification", "causal_lm"),
         "model.task must be auto, classification or causal_lm"),
        (config.data.min_samples >= 1, "data.min_samples must be >= 1 (every peer needs training data)"),
        (config.data.shards_per_peer >= 1, "data.shards_per_peer must be >= 1"),
        *_pairing_checks(config),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _layers_checks(layers: Any) -> list[tuple[bool, str]]:
    """The shape of model.lora.layers; whether its blocks exist is checked against the model when it loads."""
    usage = "model.lora.layers must be all, {top: k} with k >= 1, or a non-empty list of block indices >= 0"
    if isinstance(layers, str):
        return [(layers == "all", f"{usage}; got {layers!r}")]
    if isinstance(layers, dict):
        top = layers.get("top")
        return [(set(layers) == {"top"} and type(top) is int and top >= 1, f"{usage}; got {layers!r}")]
    return [(bool(layers) and all(i >= 0 for i in layers) and len(set(layers)) == len(layers), f"{usage}; got {layers!r}")]


def _fault_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """The fault drill must name a real peer, round and kind, or it would silently never fire."""
    fault = config.comm.inject_fault
    if fault is None:
        return []
    usage = "comm.inject_fault must look like {peer: 3, round: 5, kind: nan} with kind one of " + ", ".join(FAULT_KINDS)
    if set(fault) != {"peer", "round", "kind"}:
        return [(False, f"{usage}; got keys {sorted(fault)}")]
    peer, round = fault["peer"], fault["round"]
    return [
        (fault["kind"] in FAULT_KINDS, f"{usage}; got kind {fault['kind']!r}"),
        (type(peer) is int and 0 <= peer < config.peers, f"comm.inject_fault.peer = {peer!r} must be a peer in "
                                                          f"0..{config.peers - 1}"),
        (type(round) is int and 0 <= round < config.rounds, f"comm.inject_fault.round = {round!r} must be a round "
                                                            f"in 0..{config.rounds - 1}"),
    ]


def _adversary_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """The adversary's peers and attack; what depends on the method and graph is checked when the run
    is built (run/adversary.py)."""
    adversary = config.adversary
    attack, peers, strength = adversary.attack, adversary.peers, adversary.strength
    if attack not in ATTACK_STRENGTHS:
        return [(False, f"adversary.attack = {attack!r} must be one of {', '.join(ATTACK_STRENGTHS)}")]
    takes_strength = ATTACK_STRENGTHS[attack] is not None
    return [
        (all(type(p) is int and 0 <= p < config.peers for p in peers) and len(set(peers)) == len(peers),
         f"adversary.peers = {peers!r} must list distinct peers in 0..{config.peers - 1}"),
        (len(peers) < config.peers, "adversary.peers must leave at least one honest peer"),
        (attack == "none" or bool(peers), f"adversary.attack = {attack} needs adversary.peers, the Byzantine "
                                          "clients (e.g. [3])"),
        (takes_strength or strength is None, f"adversary.strength = {strength!r}: attack {attack} takes none; "
                                             "leave it out"),
        (attack != "gaussian" or strength is None or strength > 0,
         "adversary.strength (the gaussian attack's standard deviation) must be positive"),
        (attack != "gauge_scale" or strength != 0, "adversary.strength (the gauge_scale attack's c) must be nonzero"),
    ]


def _pairing_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Synthetic feature vectors only fit the toy MLP, and text only fits a transformer."""
    synthetic, toy = config.data.name == "synthetic", config.model.name == "toy:mlp"
    if not synthetic:
        return [(not toy, f"data.name={config.data.name!r} is text, which model.name=toy:mlp cannot read; "
                 "set model.name to packaged:minilm, packaged:smollm2 or a Hugging Face model")]
    return [
        (toy, f"data.name=synthetic gives feature vectors that only model.name=toy:mlp reads, not "
              f"{config.model.name!r}; set model.name=toy:mlp, or data.name to a text corpus such as packaged:bbc_news"),
        (config.model.task != "causal_lm", "model.task=causal_lm needs text data and a decoder model such as "
                                           "packaged:smollm2; data.name=synthetic is for classification"),
        (config.data.num_classes >= 2, "data.num_classes must be >= 2"),
        (config.data.features >= 1, "data.features must be >= 1"),
        (config.data.class_separation > 0, "data.class_separation must be positive (0 makes the classes identical)"),
    ]


def with_defaults(config: typing.Mapping[str, Any]) -> dict[str, Any]:
    """A run's config as read back, every top-level setting it lacks at its default: a run written
    before a setting existed ran as its default says (so it still resumes and groups with new runs)."""
    return {**RunConfig().to_dict(), **config}


def dotted(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as flat dotted keys (``train.lr``); empty sections stay as values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def differing(old: typing.Mapping[str, Any], new: typing.Mapping[str, Any]) -> list[str]:
    """The keys (sorted) whose values differ between two flat settings maps; a missing key differs."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def first_few(items: typing.Sequence[str], limit: int) -> str:
    """"a; b; c (and 4 more)": the start of a list, for a one-line error."""
    shown = "; ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (defaults filled in) so a run can be repeated exactly."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
