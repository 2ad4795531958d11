"""The launch secret on real launches: processes that share it run exactly as without it and never
write it anywhere; a process with another secret or none stops every process at start-up with one
line naming it; a frame altered on the wire is refused, naming its sender. And the frame MAC itself:
any byte of a frame, or any part of its context, changed, and it no longer verifies."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

import launch
from launch import toy_args
from p2p_fedrot.comm.auth import MAC_BYTES, SECRET_VARIABLE, FrameKey, frame_context, launch_secret
from p2p_fedrot.comm.runtime import Runtime
from p2p_fedrot.comm.transport import frame_header, is_sealed, seal
from p2p_fedrot.errors import ConfigError

SECRET = "5e1f0c3b9a7d4e2f8c6b1a0d9e8f7a6b"  # a test value; real ones come from secrets.token_hex(32)
OTHER = "0f9e8d7c6b5a49382716051a2b3c4d5e"
SHORT = ("peers=8", "threads=1", "train.batch_peers=false", "train.local_steps=2", "data.train_samples=1600",
         "data.test_samples=400", "rounds=4")
TAMPER = "comm.inject_fault={peer: 3, round: 2, kind: tamper}"  # peer 3 borders process 1's peer 4


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("p2p-fedrot:")]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run without a secret, the reference of the 2-process runs below: on 1 process, since
    process counts give the same bits (the reproducibility contract)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    result = launch.run(toy_args(out, *SHORT))
    assert result.returncode == 0, result.stderr
    return out


def test_a_run_with_the_secret_gives_the_same_bits_and_never_writes_it(plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = launch.run(toy_args(out, *SHORT), nproc=2, env={SECRET_VARIABLE: SECRET})
    assert result.returncode == 0, result.stderr
    launch.assert_identical_runs(plain, out)
    written = [path for path in out.rglob("*") if path.is_file()]
    assert written and not [path for path in written if SECRET.encode() in path.read_bytes()]
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("other", ["another", "none"])
def test_a_process_without_the_launch_secret_stops_every_process_at_start_up(tmp_path: Path, other: str) -> None:
    """Two torchrun agents (two nodes); the second has another secret or none."""
    args = toy_args(tmp_path / "run", *SHORT, "comm.timeout_s=60")
    envs = [{SECRET_VARIABLE: SECRET}, {SECRET_VARIABLE: OTHER} if other == "another" else {}]
    start = time.monotonic()
    agents = launch.two_nodes(args, tmp_path, per_node=1, envs=envs)
    assert time.monotonic() - start < 50  # well before the 60 s timeout
    names = ["process 0 (peers 0-3)", "process 1 (peers 4-7)"]
    for node, (code, output) in enumerate(agents):
        assert code != 0
        (line,) = error_lines(output)
        if other == "another":  # each names the other, whose secret differs from its own
            expected = (f"p2p-fedrot: peer failure: launch secret: {names[1 - node]} holds another "
                        f"P2P_FEDROT_SECRET than {names[node]}; set the same P2P_FEDROT_SECRET on every node")
        else:  # both name the one without
            expected = (f"p2p-fedrot: peer failure: launch secret: {names[1]} has no P2P_FEDROT_SECRET in its "
                        f"environment while {names[0]} has one; set the same P2P_FEDROT_SECRET on every node")
        assert line.startswith(expected), line
        assert "round   1/" not in output and SECRET not in output and OTHER not in output


def test_a_frame_altered_on_the_wire_is_refused_naming_its_sender(tmp_path: Path) -> None:
    result = launch.run(toy_args(tmp_path / "run", *SHORT, TAMPER), nproc=2, env={SECRET_VARIABLE: SECRET})
    assert result.returncode != 0
    lines = error_lines(result.stdout + result.stderr)
    assert any(re.match(r"p2p-fedrot: peer failure: round 2 step 0: a frame from process 0 \(peers 0-3\) failed "
                        r"authentication: its MAC does not match", line) for line in lines), lines
    assert len(launch.comparable_metrics(tmp_path / "run")) == 2  # rounds 0 and 1 ran; round 2 was refused


def test_without_the_secret_an_altered_frame_passes_screening_and_is_mixed(plain: Path, tmp_path: Path) -> None:
    """What docs/trust.md warns of: flipped signs keep the norm and finite values that screening checks."""
    result = launch.run(toy_args(tmp_path / "run", *SHORT, TAMPER), nproc=2)
    assert result.returncode == 0, result.stderr
    tampered, reference = launch.comparable_metrics(tmp_path / "run"), launch.comparable_metrics(plain)
    assert tampered[:2] == reference[:2] and all(r["dropped"] == [] for r in tampered)
    assert tampered[2]["consensus_distance"] != reference[2]["consensus_distance"]


def test_the_tamper_drill_needs_frames_between_processes(tmp_path: Path) -> None:
    result = launch.run(toy_args(tmp_path / "run", *SHORT, TAMPER))
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["p2p-fedrot: error: comm.inject_fault kind tamper alters frames between "
                                          "processes, and a single process sends none: launch two or more "
                                          "(torchrun --nproc_per_node=2)"]


def sealed_frame(key: FrameKey, context: bytes, dtype: torch.dtype) -> list[torch.Tensor]:
    """A frame as the transport sends it: header (with its MAC), then two payloads."""
    payloads = [torch.arange(5, dtype=dtype), torch.linspace(-1, 1, 3, dtype=dtype)]
    pieces = [frame_header((3, 0), [p.numel() for p in payloads], dtype, sealed=True), *payloads]
    seal(key, pieces, context)
    return pieces


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_byte_or_context_changed_fails_the_frame_mac(dtype: torch.dtype) -> None:
    key, context = FrameKey(bytes(range(32))), frame_context(1, 0, 3, 0, 7)
    pieces = sealed_frame(key, context, dtype)
    assert is_sealed(key, pieces, context)
    assert bytes(pieces[0].view(torch.uint8)[-MAC_BYTES:].tolist()) != bytes(MAC_BYTES)  # the MAC was written
    flipped = 0
    for k, piece in enumerate(pieces):
        raw = piece.view(torch.uint8)
        for i in range(raw.numel()):
            raw[i] ^= 0x01
            assert not is_sealed(key, pieces, context), f"piece {k} byte {i}"
            raw[i] ^= 0x01
            flipped += 1
    assert flipped == sum(p.numel() * p.element_size() for p in pieces)
    assert is_sealed(key, pieces, context)  # every byte restored
    for changed in [frame_context(1, 0, 4, 0, 7), frame_context(1, 0, 3, 1, 7), frame_context(1, 2, 3, 0, 7),
                    frame_context(2, 0, 3, 0, 7), frame_context(1, 0, 3, 0, 8), frame_context(0, 1, 3, 0, 7)]:
        assert not is_sealed(key, pieces, changed)  # another round, step, receiver, sender, count, direction
    assert not is_sealed(FrameKey(bytes(32)), pieces, context)  # another launch's key


def test_the_secret_is_read_from_the_environment_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_VARIABLE, raising=False)
    assert launch_secret() is None
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)
    assert launch_secret() == SECRET.encode()
    monkeypatch.setenv(SECRET_VARIABLE, "short-one")
    with pytest.raises(ConfigError, match="P2P_FEDROT_SECRET holds 9 characters; use at least 16") as caught:
        launch_secret()
    assert "short-one" not in str(caught.value)
    key = FrameKey(SECRET.encode())
    runtime = Runtime(0, 1, 0, 1, torch.device("cpu"), None, frame_key=key)
    assert SECRET not in repr(key) and SECRET not in repr(runtime) and "frame_key" not in repr(runtime)
