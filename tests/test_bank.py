"""The peer bank computes what peft computes: for each peer, the same loss and gradients from the
same factors and batch, whether the peer runs alone or beside others; its files load in peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from p2p_fedrot.peers.adapters import save_peer_adapters
from p2p_fedrot.config import ModelConfig, TrainConfig
from p2p_fedrot.data.federated import Dataset
from p2p_fedrot.peers.models import _base_model, build_bank, load_tokenizer, random_rotation, task_of
from p2p_fedrot.peers.optimizers import PeerOptimizers
from p2p_fedrot.peers.training import BankTrainer, batch_scores, logits_of

CPU = torch.device("cpu")
PEERS = [0, 1, 2]
CASES = {
    "toy": ModelConfig(name="toy:mlp", hidden=16),
    "minilm": ModelConfig(name="packaged:minilm", max_length=16),
    "causal_lm": ModelConfig(name="packaged:smollm2", max_length=12),
}


def random_rows(bank, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(7)
    bank.flats.copy_(torch.randn(bank.flats.shape, generator=generator) * scale)


def batch_for(config: ModelConfig, peer: int, size: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A small batch per peer: feature vectors for the toy model, sentences for the text models."""
    if config.name == "toy:mlp":
        generator = torch.Generator().manual_seed(peer)
        return {"features": torch.randn(size, 8, generator=generator)}, torch.randint(0, 3, (size,), generator=generator)
    tokenizer = load_tokenizer(config)
    texts = [f"peer {peer} says sentence number {i} about the weather" for i in range(size)]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=config.max_length, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if task_of(config) == "causal_lm":
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    else:
        labels = torch.tensor([i % 3 for i in range(size)])
    return inputs, labels


def peft_loss_and_grads(config: ModelConfig, bank, peer: int, inputs, labels) -> tuple[float, dict[str, torch.Tensor]]:
    """The peer's mean loss and gradients computed by a plain peft model holding its factors."""
    torch.manual_seed(0)
    base, lora = _base_model(config, task_of(config), 8, 3)
    model = get_peft_model(base, lora)
    flat = bank.flat(peer)
    set_peft_model_state_dict(model, {spec.name: spec.view(flat).clone() for spec in bank.layout.specs})
    model.eval()
    logits = logits_of(model(**inputs)).float()
    if task_of(config) == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grads[name.replace(".default.", ".").replace(".modules_to_save.", ".")] = param.grad
    return float(loss.detach()), grads


@pytest.mark.parametrize("case", list(CASES))
def test_bank_gives_peft_loss_and_gradients_alone_and_together(case: str) -> None:
    config = CASES[case]
    # float32 rounding: the joint forward sums in another order than peft's per-peer one, and the
    # 30-layer causal LM carries that back through every layer (measured on 2 threads, factors of
    # scale 0.05: up to 1.2e-5 of a gradient's norm; a wrong row or peer is off by its whole norm)
    tolerance = 1e-4 if case == "causal_lm" else 1e-5
    bank = build_bank(config, PEERS, input_dim=8, num_classes=3, seed=0, device=CPU)
    random_rows(bank, 0.05 if case == "causal_lm" else 0.3)
    batches = [batch_for(config, p) for p in PEERS]
    expected = [peft_loss_and_grads(config, bank, p, *batches[p]) for p in PEERS]
    bank.model.eval()
    flags = [True] * len(bank.layout.specs)
    inputs = {k: torch.cat([b[0][k] for b in batches]) for k in batches[0][0]}
    labels = torch.cat([b[1] for b in batches])
    for together in (False, True):
        groups = [PEERS] if together else [[p] for p in PEERS]
        for group in groups:
            chosen = [p for p in group]
            group_inputs = inputs if together else batches[group[0]][0]
            group_labels = labels if together else batches[group[0]][1]
            sizes = [len(batches[p][1]) for p in chosen]
            with bank.running(bank.rows(chosen), sizes, flags) as leaves:
                scores = batch_scores(bank, Dataset(group_inputs, group_labels), sizes)
                mean = scores.loss / scores.counted
                mean.sum().backward()
            for row, peer in enumerate(chosen):
                loss, grads = expected[peer]
                assert abs(float(mean[row].detach()) - loss) <= 1e-6 * max(1.0, abs(loss))
                for spec, leaf in zip(bank.layout.specs, leaves):
                    want = grads[spec.name]
                    error = float((leaf.grad[row] - want).norm() / want.norm().clamp(min=1e-12))
                    assert error <= tolerance, (case, together, spec.name, error)


def test_adapters_written_from_the_bank_load_in_peft_and_give_the_peer_outputs(tmp_path: Path) -> None:
    config = CASES["toy"]
    bank = build_bank(config, PEERS, input_dim=8, num_classes=3, seed=0, device=CPU)
    random_rows(bank)
    save_peer_adapters(bank, PEERS, tmp_path)
    inputs, _ = batch_for(config, 0)
    bank.model.eval()
    for peer in PEERS:
        folder = tmp_path / f"peer_{peer:03d}"
        assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["fc1", "fc2"]
        torch.manual_seed(0)
        base, _ = _base_model(config, "classification", 8, 3)
        loaded = PeftModel.from_pretrained(base, folder).eval()
        with bank.running(bank.rows([peer]), [len(inputs["features"])]), torch.no_grad():
            mine = bank.model(**inputs)
        assert torch.allclose(loaded(**inputs), mine, atol=1e-6)


def test_per_peer_optimizers_step_like_independent_torch_optimizers() -> None:
    """Three peers' rows stepped together equal three torch optimizers, each on its own copy."""
    layout = build_bank(CASES["toy"], PEERS, input_dim=8, num_classes=3, seed=0, device=CPU).layout
    for optimizer in ("adamw", "sgd"):
        config = TrainConfig(optimizer=optimizer, lr=0.01, momentum=0.9, weight_decay=0.1)
        rows = torch.randn(3, layout.numel)
        mine = PeerOptimizers(config, layout, 3, CPU)
        params = [torch.nn.Parameter(row.clone()) for row in rows]
        kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
        extra = {} if optimizer == "adamw" else {"momentum": 0.9}
        theirs = [kind([p], lr=0.01, weight_decay=0.1, foreach=False, **extra) for p in params]
        for _ in range(4):
            grads = torch.randn(3, layout.numel)
            mine.step(rows, [0, 1, 2], grads.clone(), frozenset({"A", "B", "head"}))
            for p, opt, g in zip(params, theirs, grads):
                p.grad = g.clone()
                opt.step()
        for row, p in zip(rows, params):
            assert torch.allclose(row, p.detach(), rtol=0, atol=1e-7), optimizer


@pytest.mark.parametrize("case", ["toy", "minilm"])
def test_batched_and_one_by_one_training_agree(case: str) -> None:
    """Same seeds, same batches, same dropout masks (LoRA dropout; MiniLM's own hidden and attention
    dropout too): training all peers at once equals training them one after the other up to float
    rounding."""
    config = CASES[case]
    config.lora.dropout = 0.2
    generator = torch.Generator().manual_seed(5)
    data = {p: Dataset(*batch_for(config, p, size=8)) if case == "minilm" else
            Dataset({"features": torch.randn(40, 8, generator=generator)}, torch.randint(0, 3, (40,), generator=generator))
            for p in PEERS}
    rounds = 3 if case == "toy" else 1
    results = []
    for group in (1, 2, 3):  # one at a time; two then one; all three in one forward
        bank = build_bank(config, PEERS, input_dim=8, num_classes=3, seed=0, device=CPU)
        # SGD: Adam divides by the root of tiny second moments and so magnifies rounding into 1e-4 steps
        trainer = BankTrainer(bank, data, TrainConfig(local_steps=2, batch_size=4, lr=0.1, momentum=0.9),
                              seed=1, group=group)
        for round in range(rounds):
            trainer.train(round, PEERS, frozenset({"A", "B", "head"}))
        results.append(bank.flats.clone())
    assert not torch.equal(results[0], build_bank(config, PEERS, 8, 3, 0, CPU).flats)
    for other in results[1:]:
        assert torch.allclose(results[0], other, rtol=1e-5, atol=1e-6)
    config.lora.dropout = 0.0


def test_init_modes_give_each_peer_its_own_or_a_rotated_start_whoever_hosts_it() -> None:
    """per_peer: independent draws from peft's distribution; rotated: the shared A turned by a rotation
    per peer (A^T A unchanged); both seeded per peer, so a process hosting peers 2-3 draws the same."""
    shared = build_bank(CASES["toy"], PEERS, 8, 3, seed=0, device=CPU)
    for mode in ("per_peer", "rotated"):
        config = ModelConfig(name="toy:mlp", hidden=16)
        config.lora.init = mode
        everyone = build_bank(config, [0, 1, 2, 3], 8, 3, seed=0, device=CPU)
        some = build_bank(config, [2, 3], 8, 3, seed=0, device=CPU)
        assert torch.equal(everyone.flat(2), some.flat(2)) and torch.equal(everyone.flat(3), some.flat(3))
        assert not torch.equal(everyone.flat(0), everyone.flat(1))
        for peer in range(4):
            assert all(b.abs().sum() == 0 for b in everyone.layout.b_views(everyone.flat(peer)))
            for a, a0 in zip(everyone.layout.a_views(everyone.flat(peer)), shared.layout.a_views(shared.flat(0))):
                if mode == "rotated":
                    torch.testing.assert_close(a.T @ a, a0.T @ a0, rtol=0, atol=1e-6)
                else:
                    assert a.abs().max() <= 1 / a.shape[1] ** 0.5 and not torch.equal(a, a0)


@pytest.mark.parametrize("follow", [True, False])
def test_rotating_the_factors_and_the_momentum_keeps_the_trajectory(follow: bool) -> None:
    """SGD's momentum is linear in the gradients, which rotate with the factors: rotating both after a
    round gives exactly the same products as never rotating. Leaving the momentum unrotated does not."""
    data = {0: Dataset({"features": torch.randn(64, 8, generator=torch.Generator().manual_seed(1))},
                       torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2)))}
    config = TrainConfig(local_steps=4, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.01)
    products = []
    for rotate in (False, True):
        bank = build_bank(CASES["toy"], [0], 8, 3, seed=0, device=CPU)
        trainer = BankTrainer(bank, data, config, seed=3)
        trainer.train(0, [0], frozenset({"A", "B", "head"}))
        if rotate:
            generator = torch.Generator().manual_seed(9)
            rotations = [random_rotation(a.shape[0], generator).float() for a in bank.layout.a_views(bank.flat(0))]
            for R, a, b in zip(rotations, bank.layout.a_views(bank.flat(0)), bank.layout.b_views(bank.flat(0))):
                a.copy_(R.T @ a)
                b.copy_(b @ R)
            if follow:
                trainer.rotate_moments(0, rotations)
        trainer.train(1, [0], frozenset({"A", "B", "head"}))
        layout = bank.layout
        products.append([b @ a for a, b in zip(layout.a_views(bank.flat(0)), layout.b_views(bank.flat(0)))])
    gap = max(float((p - q).abs().max()) for p, q in zip(*products))
    assert (gap < 1e-5) if follow else (gap > 1e-4), gap
