"""Each method's defining invariant, on the toy model with real multi-peer rounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2p_fedrot.methods.procrustes import misfit
from p2p_fedrot.config import load_config
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.peers.factors import FactorLayout, layout_of_state
from p2p_fedrot.comm.routes import row_entries
from p2p_fedrot.exact import weighted_sum
from p2p_fedrot.methods import MethodContext, PeerState, make_method
from p2p_fedrot.methods.decaf import truncated_product_svd
from p2p_fedrot.methods.fedrot import FedRot
from p2p_fedrot.methods.base import RotationLog
from p2p_fedrot.run.exchange_step import MixOutcome
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def experiment(tmp_path: Path, *overrides: str) -> Experiment:
    config = load_config(TOY, ["rounds=4", "train.local_steps=3", f"out={tmp_path}", *overrides])
    return Experiment(config, init_runtime())


def train_round(exp: Experiment, round: int) -> RotationLog:
    """A round's train and align phases as the round loop runs them; the rotations aligning applied."""
    return exp.hosted.align(round, exp.hosted.train(round, exp.schedule.present_at(round)))


def mix_round(exp: Experiment, round: int, measure: bool = False) -> MixOutcome:
    """A round's mixing steps as the round loop runs them (exchange, combine, measure), untimed."""
    states, mixed = exp.hosted.states, MixOutcome()
    for step in exp.mixer.steps(round):
        arrived = exp.mixer.exchange(step, states)
        kept = exp.mixer.keep_sent(arrived, states) if measure else None
        mixed.add(exp.mixer.combine(arrived, states))
        if measure:
            mixed.add(exp.mixer.measure(kept, states))
    return mixed


def part(exp: Experiment, peer: int, name: str) -> torch.Tensor:
    start, end = exp.layout.segments[name]
    return exp.hosted.states[peer].flat[start:end].clone()


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def part_bytes(exp: Experiment, *names: str) -> int:
    return sum(exp.layout.segments[n][1] - exp.layout.segments[n][0] for n in names) * 4


def test_ffa_keeps_A_at_the_shared_init_and_sends_B_and_head(tmp_path: Path) -> None:
    exp = experiment(tmp_path, "method=ffa")
    initial_a = part(exp, 0, "A")
    summary = exp.run()
    for peer in range(8):
        assert torch.equal(part(exp, peer, "A"), initial_a)
    assert summary["payload_bytes"] == part_bytes(exp, "B", "head")  # fedit's payload less all of A
    assert all(m["aggregation_error"] < 1e-6 for m in metrics(tmp_path))  # shared A: exact averaging


def test_rolora_keeping_its_own_A_shows_in_the_aggregation_error(tmp_path: Path) -> None:
    """Mixing only B leaves each peer s B' A_i, B' = sum_j W_ij B_j, with its own A: each row's measured
    error is ||sum_j W_ij s B_j A_j - s B' A_i||, float32 rounding in round 0 where every A is the shared
    init, and large once the A_j have drifted apart (round 2 mixes B again)."""
    exp = experiment(tmp_path, "method=rolora")
    layout = exp.layout
    for round in range(3):
        train_round(exp, round)
        sent = {p: s.flat.clone() for p, s in exp.hosted.states.items()}
        outcome = mix_round(exp, round, measure=True)
        if round == 1:  # an A round
            continue
        (W,) = exp.schedule.steps_at(round)
        for i, (absolute, relative) in zip(sorted(sent), outcome.errors):
            row = row_entries(W, i)
            mixed = exp.hosted.states[i].flat
            assert torch.equal(layout.extract(mixed, frozenset({"A"})), layout.extract(sent[i], frozenset({"A"})))
            exact2 = error2 = 0.0
            for m, scaling in enumerate(layout.scalings):
                products = sum(w * layout.b_views(sent[j])[m].double() @ layout.a_views(sent[j])[m].double()
                               for j, w in row)
                mixed_b = sum(w * layout.b_views(sent[j])[m].double() for j, w in row)
                assert torch.allclose(layout.b_views(mixed)[m].double(), mixed_b, rtol=1e-6, atol=1e-7)
                kept = layout.b_views(mixed)[m].double() @ layout.a_views(sent[i])[m].double()  # stored B', own A
                exact2 += scaling**2 * float(products.square().sum())
                error2 += scaling**2 * float((products - kept).square().sum())
            assert absolute == pytest.approx(error2**0.5, rel=1e-6, abs=1e-12), (round, i)
            assert relative == pytest.approx((error2 / exact2) ** 0.5, rel=1e-6, abs=1e-12), (round, i)
            assert (relative < 1e-6) if round == 0 else (relative > 1e-5), (round, i, relative)


@pytest.mark.parametrize("method,schedule", [("rolora", ["B", "A", "B", "A"]), ("adf", ["B", "B", "A", "A"])])
def test_only_the_scheduled_factor_trains(tmp_path: Path, method: str, schedule: list[str]) -> None:
    exp = experiment(tmp_path, f"method={method}")
    for round, factor in enumerate(schedule):
        frozen = "A" if factor == "B" else "B"
        before = {p: (part(exp, p, factor), part(exp, p, frozen)) for p in range(8)}
        train_round(exp, round)
        for p in range(8):
            assert torch.equal(part(exp, p, frozen), before[p][1]), (round, p)
            if round > 0 or factor == "B":
                assert not torch.equal(part(exp, p, factor), before[p][0]), (round, p)
        mix_round(exp, round)
    sent = [exp.mixer.payload_bytes(r, 0, 4) for r in range(4)]
    if method == "rolora":
        assert sent == [part_bytes(exp, f, "head") for f in schedule]
    else:
        assert sent == [part_bytes(exp, "A", "B", "head")] * 4


def test_tad_interval_grows_as_the_graph_gets_sparser(tmp_path: Path) -> None:
    intervals = {t: experiment(tmp_path, "method=tad", "peers=16", f"topology={t}").method.switch_every
                 for t in ("ring", "torus", "complete")}
    assert intervals["ring"] > intervals["torus"] > intervals["complete"] == 1
    # a time-varying graph plans with its average round: one random matching alone never connects
    matching = experiment(tmp_path, "method=tad", "peers=16", "topology=random_matching").method.switch_every
    assert intervals["complete"] < matching < intervals["ring"]


def test_decaf_refactors_the_exact_mixed_product_like_a_dense_svd() -> None:
    g = torch.Generator().manual_seed(0)
    r, d_out, d_in, weights = 3, 12, 10, [0.5, 0.3, 0.2]
    Bs = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for _ in weights]
    As = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for _ in weights]
    mixed = sum(w * b @ a for w, b, a in zip(weights, Bs, As))
    u, s, vh = torch.linalg.svd(mixed)
    best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    B, A = truncated_product_svd(Bs, As, weights, r)
    torch.testing.assert_close(B @ A, best, atol=1e-10, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.diag(s[:r]), atol=1e-10, rtol=0)  # B = U S^1/2
    torch.testing.assert_close(A @ A.T, torch.diag(s[:r]), atol=1e-10, rtol=0)  # A = S^1/2 V^T


def test_decaf_never_forms_a_d_by_d_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """d = 200,000: a dense product would need 160 GB; every decomposition must be of thin or small matrices."""
    shapes = []
    real_qr, real_svd = torch.linalg.qr, torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "qr", lambda x, *a, **k: shapes.append(tuple(x.shape)) or real_qr(x, *a, **k))
    monkeypatch.setattr(torch.linalg, "svd", lambda x, *a, **k: shapes.append(tuple(x.shape)) or real_svd(x, *a, **k))
    d, r, n = 200_000, 4, 3
    g = torch.Generator().manual_seed(1)
    Bs = [torch.randn(d, r, generator=g) for _ in range(n)]
    As = [torch.randn(r, d, generator=g) for _ in range(n)]
    B, A = truncated_product_svd(Bs, As, [1 / n] * n, r)
    assert B.shape == (d, r) and A.shape == (r, d)
    assert all(min(shape) <= n * r for shape in shapes), shapes


def products(exp: Experiment, peer: int) -> list[torch.Tensor]:
    flat = exp.hosted.states[peer].flat
    return [b.double() @ a.double() for a, b in zip(exp.layout.a_views(flat), exp.layout.b_views(flat))]


def test_decaf_rounds_on_a_graph_give_the_truncated_svd_of_the_mixed_products(tmp_path: Path) -> None:
    exp = experiment(tmp_path, "method=decaf", "topology=erdos_renyi", "peers=6")
    (W,) = exp.schedule.steps_at(0)
    r = exp.config.model.lora.r
    for round in range(3):
        train_round(exp, round)
        before = {p: products(exp, p) for p in range(6)}
        mix_round(exp, round)
        for i in range(6):
            for m, mixed_after in enumerate(products(exp, i)):
                mixed = sum(W[i, j] * before[j][m] for j in range(6) if W[i, j] > 0)
                u, s, vh = torch.linalg.svd(mixed)
                best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
                torch.testing.assert_close(mixed_after, best, atol=1e-5, rtol=0)


def test_decaf_trains_end_to_end_on_a_ring(tmp_path: Path) -> None:
    experiment(tmp_path, "method=decaf", "rounds=6", "train.local_steps=10").run()
    records = metrics(tmp_path)
    assert records[-1]["mean_accuracy"] > records[0]["mean_accuracy"] + 0.1


def adam_steps(exp: Experiment, peer: int) -> set[int]:
    steps = exp.hosted.trainer.optimizer_state(peer)["optimizer.steps"]
    return {int(s) for s in steps if s > 0}


@pytest.mark.parametrize("method,rule,reset", [("fedit", "method", False), ("decaf", "method", True),
                                               ("decaf", "keep", False), ("fedit", "reset", True)])
def test_optimizer_state_follows_the_method_rule_or_the_config(tmp_path: Path, method: str, rule: str, reset: bool) -> None:
    exp = experiment(tmp_path, f"method={method}", "train.optimizer=adamw", "train.lr=0.01",
                     f"train.optimizer_state={rule}")
    for round in range(3):
        train_round(exp, round)
        mix_round(exp, round)
    assert adam_steps(exp, 0) == ({3} if reset else {9})  # 3 local steps a round, 3 rounds


def test_fedsa_never_sends_B(tmp_path: Path) -> None:
    exp = experiment(tmp_path, "method=fedsa")
    sent_payloads = []
    exchange = exp.mixer.transport.exchange
    exp.mixer.transport.exchange = lambda payloads, *args, **kwargs: sent_payloads.extend(payloads.values()) or exchange(payloads, *args, **kwargs)
    summary = exp.run()
    assert summary["payload_bytes"] == part_bytes(exp, "A", "head")
    assert all(p.numel() * 4 == part_bytes(exp, "A", "head") for p in sent_payloads)
    bs = [part(exp, p, "B") for p in range(8)]
    assert all(not torch.equal(bs[0], b) for b in bs[1:])  # B stays each peer's own


def test_fedrot_with_lam_zero_is_fedit_bit_for_bit(tmp_path: Path) -> None:
    fedit = experiment(tmp_path / "fedit", "method=fedit")
    fedit.run()
    fedrot = experiment(tmp_path / "fedrot", "method=fedrot", "method_args.lam=0")
    fedrot.run()
    for peer in range(8):
        assert torch.equal(fedit.hosted.states[peer].flat, fedrot.hosted.states[peer].flat)
    for a, b in zip(metrics(tmp_path / "fedit"), metrics(tmp_path / "fedrot")):
        assert a["accuracy"] == b["accuracy"] and a["consensus_distance"] == b["consensus_distance"]


def test_local_sends_nothing(tmp_path: Path) -> None:
    summary = experiment(tmp_path, "method=local").run()
    assert summary["bytes_sent_total"] == 0 and summary["wire_bytes_total"] == 0
    assert all(m["bytes_sent"] == 0 for m in metrics(tmp_path))


def test_flexlora_needs_the_server_topology_and_matches_a_hand_step(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="topology: server"):
        experiment(tmp_path / "ring", "method=flexlora")
    exp = experiment(tmp_path / "server", "method=flexlora", "topology=server", "peers=5", "rounds=1")
    clients = list(range(1, 5))
    train_round(exp, 0)
    weights = np.array([len(exp.data.clients[c].train) for c in clients], dtype=np.float64)
    weights /= weights.sum()
    expected = []
    for m in range(len(exp.layout.modules)):
        As = [exp.layout.a_views(exp.hosted.states[c].flat)[m] for c in clients]
        Bs = [exp.layout.b_views(exp.hosted.states[c].flat)[m] for c in clients]
        product = sum(float(w) * b.double() @ a.double() for w, a, b in zip(weights, As, Bs))
        u, s, vh = torch.linalg.svd(product)
        r = As[0].shape[0]
        expected.append(u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
    mix_round(exp, 0)
    for node in range(5):
        for m, target in enumerate(expected):
            B = exp.layout.b_views(exp.hosted.states[node].flat)[m].double()
            A = exp.layout.a_views(exp.hosted.states[node].flat)[m].double()
            torch.testing.assert_close(B @ A, target, atol=1e-5, rtol=1e-4)


def test_pairwise_fedrot_undoes_neighbour_rotations_before_averaging(tmp_path: Path) -> None:
    """Neighbours holding rotated copies of a peer's factors: receiver-side alignment recovers them exactly."""
    exp = experiment(tmp_path, "method=fedrot", "method_args={lam: 1.0, reference: pairwise}")
    layout, state = exp.layout, exp.hosted.states[0]
    g = torch.Generator().manual_seed(0)
    state.flat.copy_(torch.randn(state.flat.shape, generator=g))
    inputs = [(0.5, state.flat.clone())]
    for weight in (0.3, 0.2):
        rotated = state.flat.clone()
        for a, b in zip(layout.a_views(rotated), layout.b_views(rotated)):
            q, _ = torch.linalg.qr(torch.randn(a.shape[0], a.shape[0], generator=g))
            q[:, 0] *= torch.linalg.det(q).sign()  # a rotation (det +1), as alignment only undoes those
            a.copy_(q.T @ a)
            b.copy_(b @ q)
        inputs.append((weight, rotated))
    mixed = exp.method.combine_row(state, 1, inputs, own=0)
    assert mixed.rotations is None  # pairwise leaves the receiver's own factors, and so its moments, as they are
    torch.testing.assert_close(mixed.value, state.flat, atol=1e-4, rtol=1e-4)
    plain = sum(w * x for w, x in inputs)
    assert (plain - state.flat).abs().max() > 0.1  # without alignment the average is damaged


def test_pairwise_fedrot_in_server_mode_leaves_every_client_with_the_global_factors(tmp_path: Path) -> None:
    exp = experiment(tmp_path, "method=fedrot", "method_args={reference: pairwise}", "topology=server", "peers=5")
    exp.run()
    for client in range(1, 5):
        assert torch.equal(exp.hosted.states[client].flat, exp.hosted.states[0].flat)
    errors = [m["aggregation_error"] for m in metrics(tmp_path)]
    assert all(e > 0 for e in errors[1:])  # the hub averages factors, not products


# fedrot on a hand-made layout: three modules, two ranks, a head; no training, so these run in milliseconds
MODULES = {"q": (4, 12, 10), "v": (4, 8, 8), "o": (2, 6, 9)}  # name: (r, d_in, d_out)
WEIGHTS = (0.4, 0.35, 0.25)
FEDROT_SIDES = ("A", "B", "joint")


def small_layout() -> FactorLayout:
    state = {f"{m}.lora_A.weight": torch.zeros(r, d_in) for m, (r, d_in, _) in MODULES.items()}
    state |= {f"{m}.lora_B.weight": torch.zeros(d_out, r) for m, (r, _, d_out) in MODULES.items()}
    state["head.weight"] = torch.zeros(3, 5)
    return layout_of_state(state, dict.fromkeys(MODULES, 1.0), "")


def fedrot(**args) -> FedRot:
    return make_method("fedrot", args, MethodContext(small_layout(), lambda: 0.5, server=False))


def spun(layout: FactorLayout, flat: torch.Tensor, g: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """A copy of ``flat`` with every module's factors turned by a random rotation: the same products
    (up to ``noise``), misaligned factors."""
    out = flat.clone()
    for a, b in zip(layout.a_views(out), layout.b_views(out)):
        q, _ = torch.linalg.qr(torch.randn(a.shape[0], a.shape[0], generator=g))
        q[:, 0] *= torch.linalg.det(q).sign()  # a rotation (det +1), as alignment only undoes those
        a.copy_(q.T @ a + noise * torch.randn(a.shape, generator=g))
        b.copy_(b @ q + noise * torch.randn(b.shape, generator=g))
    return out


def spun_row(layout: FactorLayout, seed: int,
             noise: float = 0.0) -> tuple[PeerState, list[tuple[float, torch.Tensor]]]:
    """A receiver and its row: its own buffer first, then neighbours holding rotated copies of it."""
    g = torch.Generator().manual_seed(seed)
    peer = PeerState(0, torch.randn(layout.numel, generator=g))
    return peer, [(WEIGHTS[0], peer.flat)] + [(w, spun(layout, peer.flat, g, noise)) for w in WEIGHTS[1:]]


def relative_aggregation_error(layout: FactorLayout, inputs: list[tuple[float, torch.Tensor]],
                               mixed: torch.Tensor) -> float:
    """||sum_j w_j B_j A_j - B' A'||_F / ||sum_j w_j B_j A_j||_F over all modules, in float64."""
    exact2 = error2 = 0.0
    for m in range(len(layout.modules)):
        exact = sum(w * layout.b_views(x)[m].double() @ layout.a_views(x)[m].double() for w, x in inputs)
        got = layout.b_views(mixed)[m].double() @ layout.a_views(mixed)[m].double()
        exact2 += float(exact.square().sum())
        error2 += float((exact - got).square().sum())
    return (error2 / exact2) ** 0.5


@pytest.mark.parametrize("side", FEDROT_SIDES)
@pytest.mark.parametrize("reference", ["pairwise", "neighbours"])
def test_receiver_side_fedrot_averages_rotated_copies_without_aggregation_error(reference: str, side: str) -> None:
    method = fedrot(lam=1.0, reference=reference, side=side)
    peer, inputs = spun_row(method.context.layout, seed=1)
    mixed = method.combine_row(peer, 1, inputs, own=0).value
    assert relative_aggregation_error(method.context.layout, inputs, mixed) <= 1e-6
    assert relative_aggregation_error(method.context.layout, inputs, weighted_sum(inputs)) > 0.1  # fedit
    head = slice(*method.context.layout.segments["head"])
    assert torch.equal(mixed[head], weighted_sum(inputs)[head])
    if reference == "pairwise":  # every neighbour is turned back onto the receiver's own factors
        torch.testing.assert_close(mixed, peer.flat, atol=1e-5, rtol=0)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(inputs, spun_row(method.context.layout, seed=1)[1]))


@pytest.mark.parametrize("side", (*FEDROT_SIDES, "alternate"))
@pytest.mark.parametrize("reference", ["consensus", "pairwise", "neighbours"])
def test_fedrot_with_lam_zero_rotates_nothing_for_every_reference_and_side(reference: str, side: str) -> None:
    method = fedrot(lam=0.0, reference=reference, side=side)
    peer, inputs = spun_row(method.context.layout, seed=2)
    peer.reference = inputs[1][1].clone()
    flat = peer.flat.clone()
    for round in (0, 1, 2):
        aligned = method.before_send(peer, round)
        assert torch.equal(peer.flat, flat)
        combined = method.combine_row(peer, round, inputs, own=0)
        assert torch.equal(combined.value, weighted_sum(inputs))
        assert aligned.rotations is None and combined.rotations is None
        assert aligned.log == RotationLog() and combined.log == RotationLog()


@pytest.mark.parametrize("side", FEDROT_SIDES)
def test_generalized_procrustes_never_raises_its_objective(side: str) -> None:
    """sum_j w_j ||X_j R_j - mean||^2 of the fitted side after 0, 1, 2, ... iterations, on noisy rotated copies."""
    layout = small_layout()
    _, inputs = spun_row(layout, seed=3, noise=0.3)
    weights = [w for w, _ in inputs]
    start = tuple([torch.stack(batch) for batch in zip(*(views(x) for _, x in inputs))]
                  for views in (layout.a_views, layout.b_views))
    objectives = [gpa_objective(start, weights, side)]
    for iters in range(1, 8):
        method = fedrot(lam=1.0, reference="neighbours", side=side, iters=iters)
        objectives.append(gpa_objective(method.generalized_procrustes(start, weights, side)[0], weights, side))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[-1] < 0.9 * objectives[0]


def gpa_objective(factors: tuple[list[torch.Tensor], list[torch.Tensor]], weights: list[float], side: str) -> float:
    mean = tuple([sum(w * x for w, x in zip(weights, batch)) for batch in part] for part in factors)
    return float((torch.tensor(weights) * misfit(*factors, *mean, side)).sum())


def test_joint_fedrot_turns_a_rotated_copy_back_onto_its_reference() -> None:
    method = fedrot(lam=1.0, side="joint", reference="consensus")
    layout = method.context.layout
    g = torch.Generator().manual_seed(4)
    reference = torch.randn(layout.numel, generator=g)
    peer = PeerState(0, spun(layout, reference, g), reference)
    aligned = method.before_send(peer, 0)
    torch.testing.assert_close(peer.flat, reference, atol=1e-5, rtol=0)
    assert aligned.rotations is not None and len(aligned.rotations) == len(MODULES)
    assert len(aligned.log.angles) == len(MODULES) and min(aligned.log.angles) > 0.1
    assert len(aligned.log.gains) == 1 and aligned.log.gains[0] < 1e-5


def test_round_zero_aligns_unless_the_fitted_reference_is_zero() -> None:
    """At LoRA init B = 0: side B (alternate's round-0 side) has nothing to fit and gets R = I exactly;
    side A fits from round 0."""
    layout = small_layout()
    g = torch.Generator().manual_seed(5)
    reference = torch.randn(layout.numel, generator=g)
    for b in layout.b_views(reference):
        b.zero_()
    trained = spun(layout, reference, g, noise=0.1)
    for side, rotates in (("B", False), ("alternate", False), ("A", True), ("joint", True)):
        method = fedrot(lam=0.5, side=side, reference="consensus")
        peer = PeerState(0, trained.clone(), reference)
        log = method.before_send(peer, 0).log
        assert torch.equal(peer.flat, trained) != rotates, side
        if rotates:
            assert len(log.angles) == len(MODULES) and min(log.angles) > 0.01
        else:  # logged as applied rotations that are exactly the identity
            assert log.angles == [0.0] * len(MODULES) and log.gains == [1.0]


@pytest.mark.parametrize("reference", ["consensus", "pairwise", "neighbours"])
def test_rotation_log_sees_misaligned_copies_and_not_identical_ones(reference: str) -> None:
    method = fedrot(lam=0.5, reference=reference, side="joint")
    layout = method.context.layout
    g = torch.Generator().manual_seed(6)
    own = torch.randn(layout.numel, generator=g)
    identical, rotated = [own.clone(), own.clone()], [spun(layout, own, g), spun(layout, own, g)]
    for copies, misaligned in ((identical, False), (rotated, True)):
        peer = PeerState(0, own.clone(), copies[0].clone())
        if reference == "consensus":
            peer.flat.copy_(copies[1])
            log = method.before_send(peer, 1).log
            pairs = 1
        else:
            log = method.combine_row(peer, 1, [(w, x) for w, x in zip(WEIGHTS, [peer.flat, *copies])], own=0).log
            pairs = 2 if reference == "pairwise" else 3  # pairwise leaves the receiver's own factors as they are
        assert len(log.angles) == pairs * len(MODULES) and len(log.gains) == pairs
        if misaligned:
            assert min(log.angles) > 0.1 and max(log.gains) < 1.0
        else:
            assert max(log.angles) < 1e-4
    fedit, peer = make_method("fedit", {}, method.context), PeerState(0, own.clone(), own.clone())
    assert fedit.before_send(peer, 1).log == RotationLog()
    assert fedit.combine_row(peer, 1, [(w, x) for w, x in zip(WEIGHTS, [peer.flat, *rotated])], own=0).log == RotationLog()


def test_fedrot_method_args_are_checked() -> None:
    for args, key in (({"reference": "everyone"}, "reference"), ({"side": "C"}, "side"), ({"iters": 0}, "iters"),
                      ({"iters": 1.5}, "iters"), ({"iters": True}, "iters"), ({"lam": 2}, "lam")):
        with pytest.raises(ConfigError, match=f"method_args.{key} = "):
            fedrot(**args)
    gossip = fedrot()
    assert gossip.args == {"lam": "auto", "side": "auto", "reference": "auto", "iters": 2}
    assert (gossip.reference, gossip.lam, gossip.side_at(0), gossip.needs_reference) == ("neighbours", 1.0, "joint", False)
    server = make_method("fedrot", {}, MethodContext(small_layout(), lambda: 1.0, server=True))
    assert (server.reference, server.lam, server.side_at(1), server.needs_reference) == ("consensus", 0.4, "A", True)


def test_neighbours_fedrot_runs_on_a_ring_and_logs_its_rotations(tmp_path: Path) -> None:
    exp = experiment(tmp_path, "method=fedrot", "method_args={lam: 1.0, reference: neighbours, side: joint}",
                     "rounds=2")
    exp.run()
    assert not exp.method.needs_reference
    for record in metrics(tmp_path):  # every round's mix logged its rotations (no gain where nothing was logged)
        assert record["alignment_gain"] is not None and np.isfinite(record["alignment_gain"])
        assert np.isfinite(record["rotation_angle_mean"]) and np.isfinite(record["rotation_angle_max"])


def test_fedex_effective_weights_are_the_exact_average_of_products(tmp_path: Path) -> None:
    exp = experiment(tmp_path, "method=fedex", "topology=server", "peers=5", "rounds=1")
    layout, clients = exp.layout, list(range(1, 5))
    modules = dict(exp.bank.model.named_modules())
    base_before = [modules[m].base.weight.detach().clone() for m in layout.modules]
    train_round(exp, 0)
    weights = np.array([len(exp.data.clients[c].train) for c in clients], dtype=np.float64)
    weights /= weights.sum()
    exact = [sum(float(w) * s * layout.b_views(exp.hosted.states[c].flat)[m].double() @ layout.a_views(exp.hosted.states[c].flat)[m].double()
                 for w, c in zip(weights, clients))
             for m, s in enumerate(layout.scalings)]
    mix_round(exp, 0)
    exp.method.settle(0, [], exp.group.reduce)  # the runner's call after mixing: the fold happens here
    for m, (name, s) in enumerate(zip(layout.modules, layout.scalings)):
        base_after = modules[name].base.weight.detach().double()
        for c in clients:
            effective = base_after + s * layout.b_views(exp.hosted.states[c].flat)[m].double() @ layout.a_views(exp.hosted.states[c].flat)[m].double()
            torch.testing.assert_close(effective, base_before[m].double() + exact[m], atol=1e-5, rtol=0)
    for round in range(1, 3):  # later rounds fold again on top of what earlier rounds folded
        base_before = [modules[m].base.weight.detach().double().clone() for m in layout.modules]
        train_round(exp, round)
        trained = {c: products(exp, c) for c in clients}
        mix_round(exp, round)
        exp.method.settle(round, [], exp.group.reduce)
        for m, (name, s) in enumerate(zip(layout.modules, layout.scalings)):
            exact = base_before[m] + s * sum(float(w) * trained[c][m] for w, c in zip(weights, clients))
            effective = modules[name].base.weight.detach().double() + s * products(exp, 1)[m]
            torch.testing.assert_close(effective, exact, atol=1e-5, rtol=0)
    residual_bytes = 4 * sum(b.shape[0] * a.shape[1] for a, b in zip(layout.a, layout.b))
    factor_bytes = 4 * layout.numel
    assert exp.mixer.round_bytes(0, 4) == 4 * factor_bytes + 4 * (factor_bytes + residual_bytes)  # 4 clients up, hub down


def test_centralized_is_one_learner_on_the_pooled_data(tmp_path: Path) -> None:
    from p2p_fedrot.data.federated import pool
    from p2p_fedrot.run.hosting import POOLED_STREAM
    from p2p_fedrot.peers.training import BankTrainer, evaluate

    exp = experiment(tmp_path / "run", "method=centralized", "rounds=3")
    config = exp.config
    hand = experiment(tmp_path / "hand", "method=local", "rounds=3")  # fresh models, same init
    everything = pool([hand.data.clients[p].train for p in range(8)])
    assert len(everything) == sum(len(hand.data.clients[p].train) for p in range(8))
    learner = BankTrainer(hand.bank, {0: everything}, config.train, config.seed, streams={0: POOLED_STREAM})
    for round in range(3):
        learner.train(round, [0], frozenset({"A", "B", "head"}))
    summary = exp.run()
    for peer in range(8):
        assert torch.equal(exp.hosted.states[peer].flat, hand.hosted.states[0].flat)
    assert summary["bytes_sent_total"] == 0
    by_hand = evaluate(hand.bank, {0: hand.data.test}, config.eval.batch_size)[0]
    scores = exp.hosted.evaluate(3)  # the shared test is scored once, for every client
    assert all(scores[p][:2] == (by_hand.accuracy, by_hand.loss) for p in range(8)), (scores, by_hand)
    assert len({scores[p][2:] for p in range(8)}) > 1  # each client's own split is scored on its own


def test_aligning_to_the_neighbours_repairs_a_rotated_init(tmp_path: Path) -> None:
    """Peers start from one init turned by a random rotation each: the same function, misaligned
    factors. The diagnostics see it (almost all disagreement is rotational); fedit averages the
    misaligned factors, while fedrot aligning to the neighbourhood (lam 1) cuts the round-0 error
    tenfold and ends at least as accurate."""
    runs = {}
    for name, args in (("fedit", ["method=fedit"]),
                       ("neighbours", ["method=fedrot", "method_args.reference=neighbours", "method_args.lam=1"])):
        experiment(tmp_path / name, "peers=16", "rounds=10", "train.local_steps=10", "model.lora.init=rotated",
                   *args).run()
        runs[name] = metrics(tmp_path / name)
    fedit, aligned = runs["fedit"], runs["neighbours"]
    assert fedit[0]["rotational_share"] > 0.9 and fedit[0]["rotation_angle_max"] == 0.0
    assert aligned[0]["aggregation_error_rel"] * 10 <= fedit[0]["aggregation_error_rel"]
    assert aligned[0]["rotation_angle_mean"] > 1.0 and aligned[0]["alignment_gain"] < 0.5
    assert aligned[-1]["mean_accuracy"] >= fedit[-1]["mean_accuracy"]


def test_decaf_gives_two_peers_holding_one_product_the_same_factors() -> None:
    """The SVD fixes singular pairs only up to sign: with the sign convention, factors of one product
    come out identical however the inputs were expressed (flipped or rotated)."""
    from p2p_fedrot.methods.decaf import truncated_product_svd
    from p2p_fedrot.peers.models import random_rotation

    generator = torch.Generator().manual_seed(2)
    B, A = torch.randn(12, 4, generator=generator), torch.randn(4, 9, generator=generator)
    rotation = random_rotation(4, generator).float()
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0])
    first = truncated_product_svd([B], [A], [1.0], 4)
    for b, a in ((B @ rotation, rotation.T @ A), (B * flips, flips[:, None] * A)):
        second = truncated_product_svd([b], [a], [1.0], 4)
        torch.testing.assert_close(second[0], first[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(second[1], first[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(first[0] @ first[1], B @ A, atol=1e-4, rtol=0)


def test_decaf_consensus_adapter_is_the_truncated_svd_of_the_mean_product(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    exp = experiment(tmp_path, "method=decaf", "peers=4", "rounds=2")
    exp.run()
    adapters = tmp_path / "adapters"
    peers = [load_file(adapters / f"peer_{p:03d}" / "adapter_model.safetensors") for p in range(4)]
    consensus = load_file(adapters / "consensus" / "adapter_model.safetensors")
    for a_spec, b_spec in zip(exp.layout.a, exp.layout.b):
        mean = sum(p[b_spec.name].double() @ p[a_spec.name].double() for p in peers) / 4
        u, s, vh = torch.linalg.svd(mean)
        r = a_spec.shape[0]
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        got = consensus[b_spec.name].double() @ consensus[a_spec.name].double()
        assert (got - best).norm() <= 1e-5 * best.norm()
        assert (got - mean).norm() > 1e-3 * mean.norm()  # the peers differ: the mean has more than rank r
