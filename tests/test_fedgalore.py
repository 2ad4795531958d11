"""FedGaLore: the GaLore step against the GaLore authors' package, exact full-space aggregation,
the second-moment sync, and runs that complete and resume bit for bit."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from p2p_fedrot.peers import galore
from p2p_fedrot.peers.adapters import add_dense_deltas, save_peer_adapters
from p2p_fedrot.config import TrainConfig, load_config
from p2p_fedrot.errors import ConfigError
from p2p_fedrot.peers.factors import layout_of_state
from p2p_fedrot.peers.galore import GaLoreSettings
from p2p_fedrot.methods import MethodContext, PeerState, make_method
from p2p_fedrot.peers.models import _base_model, build_bank
from p2p_fedrot.peers.optimizers import LiftedMoments, PeerOptimizers
from p2p_fedrot.run.loop import Experiment
from p2p_fedrot.comm.runtime import init_runtime

import launch
from launch import assert_identical_runs, toy_args
from test_bank import CASES, CPU, PEERS, batch_for, random_rows
from test_reproducibility import CONTRACT
from test_runner import TOY, read_metrics
from test_text_runs import DEMO

GALORE = ["method=fedgalore", "train.optimizer=adamw", "train.lr=0.01", "train.local_steps=3"]


def galore_torch_adamw() -> type:
    """galore-torch's AdamW, loaded without the package's __init__ (which imports bitsandbytes)."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        pytest.fail("galore-torch is not installed: run scripts/setup.sh")
    folder = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("galore_reference")
    package.__path__ = [str(folder)]
    sys.modules.setdefault("galore_reference", package)
    for name in ("galore_projector", "adamw"):
        full = f"galore_reference.{name}"
        if full not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[full] = module
            module_spec.loader.exec_module(module)
    return sys.modules["galore_reference.adamw"].AdamW


def one_module_layout(m: int, n: int, r: int = 2):
    """A layout with one adapted (m x n) weight: LoRA factors, a head and the dense delta."""
    state = {"w.lora_A.weight": torch.zeros(r, n), "w.lora_B.weight": torch.zeros(m, r), "head.weight": torch.zeros(3)}
    return layout_of_state(state, {"w": 1.0}, "", {"w": (m, n)})


def step_both(shape: tuple[int, int], rank: int, steps: int = 7, weight_decay: float = 0.01):
    """Our optimizer (2 rows, different gradients) and galore-torch on row 0's gradients."""
    torch.manual_seed(0)
    layout = one_module_layout(*shape)
    config = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=weight_decay)
    settings = GaLoreSettings(rank=rank, proj_every=3, scale=0.5)
    ours = PeerOptimizers(config, layout, rows=2, device=torch.device("cpu"), galore=settings)
    params = torch.zeros(2, layout.numel)
    start, end = layout.segments["delta"]
    params[:, start:end] = torch.randn(2, end - start) * 0.1
    reference = params[0, start:end].view(shape).clone().requires_grad_(True)
    group = {"params": [reference], "rank": rank, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}
    theirs = galore_torch_adamw()([group], lr=0.01, eps=galore.EPS, weight_decay=weight_decay,
                                  no_deprecation_warning=True)
    for _ in range(steps):
        grads = torch.zeros(2, layout.numel)
        grads[:, start:end] = torch.randn(2, end - start)
        ours.step(params, [0, 1], grads, frozenset({"delta"}))
        reference.grad = grads[0, start:end].view(shape).clone()
        theirs.step()
    return params[0, start:end].view(shape), reference.detach(), layout, ours


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])  # left, right, and right on a tie (galore's std rule)
def test_galore_step_matches_galore_torch(shape: tuple[int, int]) -> None:
    ours, theirs, _, _ = step_both(shape, rank=3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, torch.zeros_like(ours))


def test_full_rank_galore_is_plain_adam() -> None:
    shape = (6, 10)
    torch.manual_seed(1)
    layout = one_module_layout(*shape)
    ours = PeerOptimizers(TrainConfig(optimizer="adamw", lr=0.01), layout, 1, torch.device("cpu"),
                          GaLoreSettings(rank=6, proj_every=1, scale=1.0))
    params = torch.zeros(1, layout.numel)
    start, end = layout.segments["delta"]
    weight = torch.zeros(shape, requires_grad=True)
    adam = torch.optim.Adam([weight], lr=0.01, eps=galore.EPS)
    for _ in range(6):
        grad = torch.randn(shape)
        grads = torch.zeros(1, layout.numel)
        grads[0, start:end] = grad.flatten()
        ours.step(params, [0], grads, frozenset({"delta"}))
        weight.grad = grad.clone()
        adam.step()
    torch.testing.assert_close(params[0, start:end].view(shape), weight.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (6, 6)])
def test_a_sync_rescales_the_moment_within_bounds_and_a_null_sync_changes_nothing(shape) -> None:
    torch.manual_seed(2)
    side = galore.side_of(shape, 3 if shape != (6, 6) else 6)
    P = galore.fit_projector(torch.randn(shape), 3, side) if side != "identity" else None
    V = torch.rand(galore.projected_shape(shape, 3 if side != "identity" else 6))
    own = galore.lift_second(V, P, side)
    assert torch.equal(galore.resync_second(V, own, own.clone(), P, side), V)
    for synced in (own * 1e6, own * 1e-6, own - 10.0, torch.rand(shape)):  # far larger, far smaller, negative, unrelated
        after = galore.resync_second(V, own, synced, P, side)
        assert (after >= 0).all()
        ratio = after / V
        assert (ratio <= galore.MAX_SYNC_RATIO * (1 + 1e-6)).all() and (ratio >= (1 - 1e-6) / galore.MAX_SYNC_RATIO).all()


def make_fedgalore(layout, **args):
    context = MethodContext(layout, lambda: 0.5, server=False)
    return make_method("fedgalore", args, context)


@pytest.mark.parametrize("args,needle", [({"sync": "median"}, "sync must be one of none, mean, shared"),
                                         ({"rank": 0}, "rank must be an integer >= 1"),
                                         ({"proj_every": 2.5}, "proj_every must be an integer"),
                                         ({"scale": -1}, "scale must be a positive number"),
                                         ({"ranks": 4}, "unknown method_args key 'ranks'")])
def test_bad_method_args_are_named(args: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        make_fedgalore(one_module_layout(6, 10), **args)


def test_mean_sync_of_identical_peers_is_the_identity() -> None:
    _, _, layout, optimizers = step_both((6, 10), rank=3, steps=4)
    dense = optimizers.dense
    before = dense.second[0][0].clone()
    P = dense.projectors[0][0]
    own = galore.lift_second(before, P, "left")
    method = make_fedgalore(layout, sync="mean", rank=3)
    flat = torch.zeros(layout.numel)
    state = PeerState(0, flat, moments=LiftedMoments(dense, 0))
    payload = method.pack(state, 0, 0, layout.extract(flat, method.sent_parts(0)))
    method.combine(state, 0, [(0.25, payload), (0.5, payload.clone()), (0.25, payload.clone())])
    synced = dense.pending[0].view(6, 10)
    torch.testing.assert_close(galore.resync_second(before, own, synced, P, "left"), before, rtol=1e-6, atol=0)


def test_shared_sync_syncs_what_all_peers_have_and_leaves_what_one_has() -> None:
    torch.manual_seed(3)
    u, v, u_own, v_own = torch.rand(6) + 0.5, torch.rand(10) + 0.5, torch.randn(6), torch.randn(10)
    u_own -= (u_own @ u) / (u @ u) * u  # a singular component of its own: output pattern and input
    v_own -= (v_own @ v) / (v @ v) * v  # direction that the common part does not use
    peers = [torch.outer(u, v) * (1 + 0.1 * k) for k in range(4)]
    peers[1] = peers[1] + 0.3 * torch.outer(u_own, v_own)  # present in peer 1 only
    weights = [0.25] * 4
    mean = sum(w * p for w, p in zip(weights, peers))
    joint = galore.joint_directions(weights, peers, rank=1)
    own, common = v_own / v_own.norm(), v / v.norm()
    assert (mean @ own).norm() > 0.05  # the plain mean hands a quarter of peer 1's own part to everyone
    for receiver in range(4):
        synced = galore.sync_joint(peers[receiver], mean, joint)
        torch.testing.assert_close(synced @ common, mean @ common, rtol=1e-5, atol=1e-7)  # the common part: synced
        torch.testing.assert_close(synced @ own, peers[receiver] @ own, rtol=1e-5, atol=1e-6)  # one's own: kept
    assert (galore.sync_joint(peers[0], mean, joint) @ own).norm() < 1e-6  # ...so peer 0 never receives it


@pytest.mark.parametrize("together", [False, True])
def test_saved_dense_deltas_rebuild_the_peer_model(tmp_path: Path, together: bool) -> None:
    """The bank's dense path adds dW x; the saved adapter plus add_dense_deltas gives the same outputs."""
    config = CASES["toy"]
    bank = build_bank(config, PEERS, input_dim=8, num_classes=3, seed=0, device=CPU, dense_deltas=True)
    random_rows(bank)
    assert [spec.name for spec in bank.layout.delta] == ["fc1.weight", "fc2.weight"]
    save_peer_adapters(bank, PEERS, tmp_path)
    batches = [batch_for(config, peer)[0] for peer in PEERS]
    bank.model.eval()
    with bank.running(bank.rows(PEERS), [4] * len(PEERS)), torch.no_grad():
        joint = bank.model(features=torch.cat([b["features"] for b in batches])).split(4)
    for peer, inputs, together_output in zip(PEERS, batches, joint):
        torch.manual_seed(0)
        base, _ = _base_model(config, "classification", 8, 3)
        loaded = PeftModel.from_pretrained(base, tmp_path / f"peer_{peer:03d}").eval()
        add_dense_deltas(loaded, tmp_path / f"peer_{peer:03d}")
        with bank.running(bank.rows([peer]), [4]), torch.no_grad():
            alone = bank.model(**inputs)
        mine = together_output if together else alone
        torch.testing.assert_close(loaded(**inputs), mine, atol=1e-5, rtol=1e-5)
        without = PeftModel.from_pretrained(_base_model(config, "classification", 8, 3)[0], tmp_path / f"peer_{peer:03d}")
        assert not torch.allclose(without(**inputs), mine, atol=1e-3)  # the deltas matter


def run(out: Path, *overrides: str) -> Experiment:
    experiment = Experiment(load_config(TOY, [f"out={out}", *GALORE, *overrides]), init_runtime())
    experiment.run()
    return experiment


@pytest.mark.parametrize("topology", ["ring", "server"])
@pytest.mark.parametrize("sync", ["none", "shared"])
def test_toy_runs_aggregate_exactly_in_the_full_space(tmp_path: Path, topology: str, sync: str) -> None:
    experiment = run(tmp_path, "rounds=3", f"topology={topology}", "peers=5", f"method_args={{sync: {sync}}}")
    records = read_metrics(tmp_path)
    assert len(records) == 3
    for record in records:
        assert record["aggregation_error_rel"] <= 1e-6  # float32 rounding of the mix; factor averaging: ~1e-1
    assert records[-1]["mean_accuracy"] > 0.2  # 10 classes: above chance
    layout = experiment.layout
    deltas = sum(spec.numel for spec in layout.delta)
    assert deltas == 32 * 64 + 64 * 64  # the toy MLP's two adapted weights, whole
    sent = layout.payload_numel({"delta", "head"}) + (deltas if sync != "none" else 0)
    assert json.loads((tmp_path / "summary.json").read_text())["payload_bytes"] == 4 * sent


def test_resume_keeps_the_projected_state_bit_for_bit(tmp_path: Path) -> None:
    setting = ["method_args={sync: shared, proj_every: 2}", "checkpoint_every=2"]
    whole = run(tmp_path / "whole", "rounds=5", *setting)
    run(tmp_path / "split", "rounds=3", *setting)
    resumed = run(tmp_path / "split", "rounds=5", "resume=true", *setting)
    for peer, state in whole.hosted.states.items():
        assert torch.equal(resumed.hosted.states[peer].flat, state.flat), f"peer {peer}"
    for peer in whole.hosted.trainer.peers:
        ours, theirs = whole.hosted.trainer.optimizer_state(peer), resumed.hosted.trainer.optimizer_state(peer)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"peer {peer} {key}"


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["ring", "server"])
def test_minilm_runs_complete(tmp_path: Path, topology: str) -> None:
    config = load_config(DEMO, [f"out={tmp_path}", f"topology={topology}", "peers=3", "rounds=3", "eval.every=1",
                                "train.local_steps=2", "data.train_samples=200", "data.test_samples=40",
                                "data.min_samples=5", "model.max_length=32", "method=fedgalore",
                                "model.lora.layers={top: 2}"])  # dense deltas above the cached frozen prefix
    Experiment(config, init_runtime()).run()
    records = read_metrics(tmp_path)
    assert records[-1]["round"] == 2
    assert records[-1]["aggregation_error_rel"] <= 1e-6
    assert (tmp_path / "adapters" / "peer_001" / "dense_deltas.safetensors").is_file()


@pytest.mark.slow
def test_fedgalore_gives_the_same_bits_on_one_and_two_processes(tmp_path: Path) -> None:
    """100 rounds with projector refits and shared moment syncs: every round identical for P = 1, 2."""
    settings = (*CONTRACT, "method=fedgalore", "method_args={sync: shared, proj_every: 3}")
    for nproc in (1, 2):
        result = launch.run(toy_args(tmp_path / f"p{nproc}", *settings), nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_identical_runs(tmp_path / "p1", tmp_path / "p2")
