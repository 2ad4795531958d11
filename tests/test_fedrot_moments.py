"""Receiver-side fedrot turns a receiver's own factors; its optimizer moments must turn with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2p_fedrot.run.loop import Experiment
from test_methods import FEDROT_SIDES, experiment, fedrot, mix_round, spun_row, train_round

# gossip fedrot aligning to the neighbourhood, from an init turned by a rotation per peer, with SGD momentum
# (Adam's second moment is elementwise and has no rotated counterpart, so only a first moment can follow exactly)
ROTATED_GOSSIP = ("method=fedrot", "method_args={reference: neighbours}", "model.lora.init=rotated",
                  "train.momentum=0.9", "peers=4", "rounds=2")


@pytest.mark.parametrize("side", FEDROT_SIDES)
@pytest.mark.parametrize("own", [0, 1, 2])
def test_neighbours_fedrot_reports_the_whole_rotation_of_the_receivers_own_factors(side: str, own: int) -> None:
    """Rotated copies of one buffer all land on one frame, so the mix is the receiver's own factors
    turned by the product of its iterations' rotations, which the result must carry for its row."""
    method = fedrot(lam=1.0, reference="neighbours", side=side, iters=3)
    layout = method.context.layout
    peer, inputs = spun_row(layout, seed=7)
    inputs.insert(own, inputs.pop(0))
    combined = method.combine_row(peer, 1, inputs, own)
    assert combined.rotations is not None and len(combined.rotations) == len(layout.modules)
    factors = zip(combined.rotations, layout.a_views(peer.flat), layout.b_views(peer.flat),
                  layout.a_views(combined.value), layout.b_views(combined.value))
    for R, a, b, mixed_a, mixed_b in factors:
        assert torch.linalg.matrix_norm(R - torch.eye(R.shape[0])) > 0.1
        torch.testing.assert_close(R.T @ R, torch.eye(R.shape[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed_a, R.T @ a, atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed_b, b @ R, atol=1e-5, rtol=0)


def test_pairwise_fedrot_keeps_the_receivers_frame() -> None:
    method = fedrot(lam=1.0, reference="pairwise", side="joint")
    peer, inputs = spun_row(method.context.layout, seed=8)
    assert method.combine_row(peer, 1, inputs, 0).rotations is None


def products(exp: Experiment) -> torch.Tensor:
    """Every hosted peer's B A of every module, in float64, as one vector."""
    layout = exp.layout
    return torch.cat([(b.double() @ a.double()).flatten() for p in exp.bank.peers
                      for a, b in zip(layout.a_views(exp.bank.flat(p)), layout.b_views(exp.bank.flat(p)))])


def test_turning_the_momentum_with_the_receivers_factors_keeps_training_frame_independent(tmp_path: Path) -> None:
    """Round 0's mix turns each receiver's own factors by R. Round 1's training from the mixed factors
    with the momentum turned by R must compute the same products as from the mixed factors turned back
    by R^T with the momentum training left (SGD is equivariant when factors and momentum share a frame).
    Mixed factors with the momentum left behind compute other products."""
    exp = experiment(tmp_path, *ROTATED_GOSSIP)
    hosted, bank, layout, optimizers = exp.hosted, exp.bank, exp.layout, exp.hosted.trainer.optimizers
    train_round(exp, 0)
    trained = optimizers.moment.clone()
    outcome = mix_round(exp, 0)
    assert sorted(peer for peer, _ in outcome.rotated) == hosted.clients
    hosted.follow_rotations(outcome.rotated)
    mixed, followed, steps = bank.flats.clone(), optimizers.moment.clone(), optimizers.steps.clone()
    assert not torch.equal(followed, trained)
    turned_back = mixed.clone()
    for peer, rotations in outcome.rotated:
        row = turned_back[bank.row_of[peer]]
        assert min(float(torch.linalg.matrix_norm(R - torch.eye(R.shape[0]))) for R in rotations) > 0.1
        for R, a, b in zip(rotations, layout.a_views(row), layout.b_views(row)):
            a.copy_(R @ a)
            b.copy_(b @ R.T)
    after = {}
    for name, flats, moment in (("followed", mixed, followed), ("turned back", turned_back, trained),
                                ("left behind", mixed, trained)):
        bank.flats.copy_(flats)
        optimizers.moment.copy_(moment)
        optimizers.steps.copy_(steps)
        train_round(exp, 1)
        after[name] = products(exp)
    scale = float(after["turned back"].abs().max())
    assert float((after["followed"] - after["turned back"]).abs().max()) < 1e-5 * scale
    assert float((after["left behind"] - after["turned back"]).abs().max()) > 1e-2 * scale


def test_the_round_loop_turns_the_moments_with_the_mix(tmp_path: Path) -> None:
    """Experiment.run passes each round's rotations of the receivers' own factors to their optimizers."""
    by_hand = experiment(tmp_path / "by_hand", *ROTATED_GOSSIP)
    for round in range(2):
        train_round(by_hand, round)
        by_hand.hosted.follow_rotations(mix_round(by_hand, round).rotated)
    run = experiment(tmp_path / "run", *ROTATED_GOSSIP)
    run.run()
    assert torch.equal(run.bank.flats, by_hand.bank.flats)
    assert torch.equal(run.hosted.trainer.optimizers.moment, by_hand.hosted.trainer.optimizers.moment)
