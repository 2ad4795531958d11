"""Byzantine peers and robust rules inside real runs: attacks forged at honest receivers, honest
metrics that leave the adversary out, robust rules in place of the method's mixing, and the
config errors that guard them. Toy runs, in process unless a test is about separate launches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import TOY, assert_identical_runs
from p2p_fedrot.comm.runtime import init_runtime
from p2p_fedrot.config import ATTACK_STRENGTHS, AdversaryConfig, load_config
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.robust.rules import RULES
from p2p_fedrot.run.adversary import FORGERS, Adversary
from p2p_fedrot.run.checkpoint import describe_differences
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.study.groups import group_runs
from test_run_matrix import matrix

FAST = ("rounds=3", "train.local_steps=3", "threads=1")


@pytest.fixture(autouse=True)
def one_thread():
    """threads=1 as run_in applies it (these tests build the Experiment themselves)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def experiment(out: Path, *overrides: str) -> Experiment:
    return Experiment(load_config(TOY, [*FAST, f"out={out}", *overrides]), init_runtime())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_clip_without_a_radius_is_plain_and_plain_without_gauge_is_the_method(tmp_path: Path) -> None:
    """Adapters, checkpoints and every metric, bit for bit (a sign-flipping peer makes the clipped rows
    differ); a run without the new sections keeps its records' and summary's keys."""
    attack = ("method=fedit", "rounds=2", "adversary.peers=[3]", "adversary.attack=sign_flip")
    runs = {"clip": (*attack, "robust.rule=clip", "robust.tau=.inf"), "plain": (*attack, "robust.rule=plain"),
            "plain-raw": ("method=fedit", "rounds=2", "robust.rule=plain", "robust.gauge=false"),
            "none": ("method=fedit", "rounds=2")}
    for name, overrides in runs.items():
        experiment(tmp_path / name, *overrides).run()
    assert_identical_runs(tmp_path / "clip", tmp_path / "plain")
    assert_identical_runs(tmp_path / "plain-raw", tmp_path / "none")
    assert summary(tmp_path / "clip")["robust"] == {"rule": "clip", "gauge": True, "tau": "inf"}
    assert not {"adversary_peers", "adversary_mean_accuracy"} & records(tmp_path / "none")[0].keys()
    assert not {"adversary", "robust"} & summary(tmp_path / "none").keys()


def test_honest_metrics_leave_the_adversary_out(tmp_path: Path) -> None:
    liars = [3, 6]
    exp = experiment(tmp_path, "adversary.peers=[3, 6]", "adversary.attack=scaled")
    exp.run()
    for record in records(tmp_path):
        honest = [a for p, a in zip(record["peers"], record["accuracy"]) if p not in liars]
        lying = [a for p, a in zip(record["peers"], record["accuracy"]) if p in liars]
        assert record["mean_accuracy"] == float(np.mean(honest)) and record["min_accuracy"] == min(honest)
        assert record["adversary_peers"] == liars and record["adversary_mean_accuracy"] == float(np.mean(lying))
        assert record["mean_loss"] == float(np.mean([x for p, x in zip(record["peers"], record["loss"])
                                                     if p not in liars]))
    # the consensus distance over the six honest peers, by hand from their final products
    layout, honest = exp.layout, [p for p in range(8) if p not in liars]
    products = [torch.cat([(s * b.double() @ a.double()).flatten() for s, a, b in
                           zip(layout.scalings, layout.a_views(exp.bank.flat(p)), layout.b_views(exp.bank.flat(p)))])
                for p in honest]
    mean = torch.stack(products).mean(0)
    by_hand = float(sum((x - mean).square().sum() for x in products)) / len(honest)
    assert records(tmp_path)[-1]["consensus_distance"] == pytest.approx(by_hand, rel=1e-9)
    result = summary(tmp_path)
    assert result["adversary"] == {"peers": liars, "attack": "scaled", "strength": 10.0, "knows": "same step"}
    assert result["final_mean_accuracy"] == records(tmp_path)[-1]["mean_accuracy"]


def mixed_buffers(exp: Experiment, adversary: Adversary | None) -> dict[int, torch.Tensor]:
    """Every peer's buffer after one mixing step of round 0 from the same trained state."""
    states = exp.hosted.states
    exp.mixer.adversary = adversary
    (step,) = exp.mixer.steps(0)
    exp.mixer.combine(exp.mixer.exchange(step, states), states)
    return {p: s.flat.clone() for p, s in states.items()}


@pytest.mark.parametrize("attack", sorted(FORGERS))
def test_each_attack_changes_what_the_liars_honest_neighbours_mix_and_nothing_else(tmp_path: Path,
                                                                                  attack: str) -> None:
    exp = experiment(tmp_path, "method=fedit")
    exp.hosted.align(0, exp.hosted.train(0, exp.schedule.present_at(0)))
    trained = {p: s.flat.clone() for p, s in exp.hosted.states.items()}
    clean = mixed_buffers(exp, None)
    for p, flat in trained.items():
        exp.hosted.states[p].flat.copy_(flat)
    adversary = Adversary(AdversaryConfig([3], attack), exp.config.seed, exp.layout)
    attacked = mixed_buffers(exp, adversary)
    changed = sorted(p for p in clean if not torch.equal(clean[p], attacked[p]))
    assert changed == [2, 4]  # the ring neighbours of peer 3; its own row mixes what it received


def test_gauge_scaling_ruins_factor_averaging_and_gauge_fixing_undoes_it(tmp_path: Path) -> None:
    """Measured on the toy ring after 8 rounds: clean 0.54, attacked 0.10, gauge-fixed plain 0.55."""
    common = ("method=fedit", "rounds=8", "train.local_steps=10", "adversary.peers=[3]")
    attack = ("adversary.attack=gauge_scale", "adversary.strength=100")
    runs = {"clean": common, "attacked": (*common, *attack), "fixed": (*common, *attack, "robust.rule=plain")}
    accuracy = {}
    for name, overrides in runs.items():
        experiment(tmp_path / name, *overrides).run()
        accuracy[name] = summary(tmp_path / name)["final_mean_accuracy"]
    assert accuracy["attacked"] < accuracy["clean"] - 0.2
    assert abs(accuracy["fixed"] - accuracy["clean"]) < 0.05


def test_the_gaussian_attack_draws_from_its_own_seeds(tmp_path: Path) -> None:
    """Twice in one process, the global generator moved in between: the same bits (the run matrix
    compares separate launches on 1 and 2 processes)."""
    for name, global_seed in (("first", 1), ("second", 2)):
        torch.manual_seed(global_seed)
        experiment(tmp_path / name, "rounds=2", "adversary.peers=[3]", "adversary.attack=gaussian").run()
    assert_identical_runs(tmp_path / "first", tmp_path / "second")


def test_label_flip_flips_only_the_adversarys_training_labels(tmp_path: Path) -> None:
    clean = experiment(tmp_path / "clean").data
    flipped = experiment(tmp_path / "flipped", "adversary.peers=[3]", "adversary.attack=label_flip").data
    for peer, shard in clean.clients.items():
        got = flipped.clients[peer]
        expected = 9 - shard.train.labels if peer == 3 else shard.train.labels
        assert torch.equal(got.train.labels, expected), peer
        assert torch.equal(got.local_test.labels, shard.local_test.labels)


@pytest.mark.parametrize("overrides,needle", [
    (("adversary.attack=bitflip", "adversary.peers=[1]"), "adversary.attack = 'bitflip' must be one of"),
    (("adversary.attack=sign_flip", "adversary.peers=[8]"), "adversary.peers = [8] must list distinct peers in 0..7"),
    (("adversary.attack=sign_flip",), "adversary.attack = sign_flip needs adversary.peers"),
    (("adversary.attack=sign_flip", "adversary.peers=[1]", "adversary.strength=2"),
     "adversary.strength = 2.0: attack sign_flip takes none"),
    (("robust.tau=nan",), "robust.tau = nan must be a finite number"),
])
def test_bad_adversary_settings_are_one_line_config_errors(overrides: tuple[str, ...], needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TOY, list(overrides))
    assert needle in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides,needle", [
    (("method=ffa", "robust.rule=clip"), "robust.rule = clip replaces a weighted average of whole buffers, which "
                                         "method ffa does not mix; robust rules mix with adf, fedit, fedrot, tad"),
    (("method=fedit", "topology=server", "robust.rule=median"), "in server mode the hub mixes none"),
    (("robust.rule=mean",), "robust.rule = 'mean' must be one of plain, clip"),
    (("robust.rule=median", "robust.b=2"), "robust.b is not a setting of rule median"),
    (("robust.tau=2",), "robust.tau is set but robust.rule is none"),
    (("method=fedsa", "adversary.peers=[1]", "adversary.attack=alie"), "method fedsa does not send"),
    (("topology=server", "adversary.peers=[0]", "adversary.attack=ipm"), "peer 0 is the server's hub"),
    (("topology=server", "adversary.peers=[1]", "adversary.attack=dissensus"), "the server's hub mixes none"),
])
def test_settings_the_method_or_graph_cannot_take_are_one_line_config_errors(tmp_path: Path,
                                                                             overrides: tuple[str, ...],
                                                                             needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        experiment(tmp_path, *overrides)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_report_labels_name_attack_and_rule_and_runs_older_than_them_group_with_clean_ones(tmp_path: Path) -> None:
    clean = load_config(TOY, []).to_dict()
    older = {key: value for key, value in clean.items() if key not in ("adversary", "robust")}
    attacked = load_config(TOY, ["adversary.peers=[3]", "adversary.attack=alie", "robust.rule=clip"]).to_dict()
    runs = [{"config": config, "folder": tmp_path / name}
            for name, config in (("older", older), ("clean", clean), ("attacked", attacked))]
    groups = group_runs(runs)
    assert [len(group.runs) for group in groups] == [2, 1]
    assert "adversary.attack=none" in groups[0].label and "robust.rule=none" in groups[0].label
    assert "adversary.attack=alie" in groups[1].label and "robust.rule=clip" in groups[1].label
    # and a checkpoint written before the sections existed still belongs to the same run
    assert describe_differences(older, clean) == ""
    assert "adversary.attack is 'alie' here but 'none' there" in describe_differences(older, attacked)


def test_every_attack_has_a_default_and_the_run_matrix_covers_every_rule_and_attack() -> None:
    assert set(FORGERS) == set(ATTACK_STRENGTHS) - {"none", "label_flip"}
    cells = [dict(o.split("=", 1) for o in overrides) for overrides in matrix().values()]
    assert {c["robust.rule"] for c in cells if "robust.rule" in c} == set(RULES)
    assert {c["adversary.attack"] for c in cells if "adversary.attack" in c} == set(ATTACK_STRENGTHS) - {"none"}
