"""Who may speak: a launch secret (``P2P_FEDROT_SECRET``, in the environment only) that processes
prove they share at start-up, before any payload flows, and an HMAC-SHA256 on every frame between
processes.

torchrun's store and Gloo authenticate nobody: whoever reaches their ports can join a group or
write into a connection. With the secret, each process publishes a fresh random nonce, then a proof
HMAC(secret, its rank, every nonce) that only a holder of the secret can compute for this launch, and
checks every other process's proof. A plain hash of the secret would not do: it is the same in every
launch, so anyone who saw it once could replay it. The frames' key is derived from the secret and the
same nonces, so a frame recorded in one launch is worthless in another. Without the secret nothing
changes: no proof at start-up, no MAC on frames. The secret is never kept, printed or written; only
the derived key is kept, and it is never shown either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import struct
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError, PeerError
from .runtime import ProcessNamer, Runtime, collective, plain_process_name

SECRET_VARIABLE = "P2P_FEDROT_SECRET"
MIN_SECRET_CHARS = 16
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size  # 32
MAKE_SECRET = "python -c 'import secrets; print(secrets.token_hex(32))'"
FIX = f"set the same {SECRET_VARIABLE} on every node (or on none) and launch again"
# labels that keep the three uses of the secret apart: a value computed for one is no use for another
PROOF_LABEL = b"p2p_fedrot start-up proof\0"
KEY_LABEL = b"p2p_fedrot frame key\0"
FRAME_LABEL = b"p2p_fedrot frame\0"


class FrameKey:
    """This launch's key for frame MACs: derived from the secret and every process's start-up nonce."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:  # a runtime or a transport may be printed; the key must not be
        return "FrameKey(hidden)"

    def mac(self, context: bytes, pieces: Sequence[torch.Tensor]) -> bytes:
        """HMAC-SHA256 of ``context`` and the pieces' bytes as they travel."""
        digest = hmac.new(self._key, context, hashlib.sha256)
        for piece in pieces:
            digest.update(wire_bytes(piece))
        return digest.digest()

    def verifies(self, mac: bytes, context: bytes, pieces: Sequence[torch.Tensor]) -> bool:
        """True when ``mac`` is the MAC of ``context`` and ``pieces`` (compared in constant time)."""
        return hmac.compare_digest(mac, self.mac(context, pieces))


def frame_context(sender: int, receiver: int, round: int, step: int, count: int) -> bytes:
    """What a frame's MAC binds it to besides its bytes: its direction (sender and receiver processes),
    its round and mixing step, and its place among the frames of that direction, so that it cannot be
    replayed to another receiver, in another step, or twice."""
    return FRAME_LABEL + struct.pack("<5q", sender, receiver, round, step, count)


def wire_bytes(piece: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, read in place on the host (a GPU tensor is first copied to the
    host: its bytes must be read there)."""
    return memoryview(piece.detach().cpu().contiguous().view(torch.uint8).numpy())


def launch_secret() -> bytes | None:
    """The secret from the environment, or None. It is never a config key, so no config dump,
    summary or log can carry it."""
    value = os.environ.get(SECRET_VARIABLE)
    if value is None:
        return None
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(f"{SECRET_VARIABLE} holds {len(value)} characters; use at least {MIN_SECRET_CHARS} random "
                          f"ones, e.g. make one with {MAKE_SECRET} and export that same value on every node")
    return value.encode()


def authenticate(runtime: Runtime, timeout_s: float, name: ProcessNamer = plain_process_name) -> Runtime:
    """Prove, before any payload flows, that every process holds the same secret; returns the runtime
    with this launch's frame key, or as it is when no process has a secret. A process without the
    secret, or with another one, stops every process with one line naming it."""
    if not runtime.distributed:
        return runtime
    secret = launch_secret()
    offer = bytes([secret is not None]) + secrets.token_bytes(NONCE_BYTES)
    offers = all_gathered(runtime, offer, "comparing launch secrets", timeout_s, name)
    holders = [process for process, theirs in enumerate(offers) if theirs[0]]
    if not holders:
        return runtime
    if secret is None or len(holders) < runtime.world:
        raise PeerError(missing_line(holders, runtime.world, name))
    nonces = b"".join(theirs[1:] for theirs in offers)
    proofs = all_gathered(runtime, proof(secret, runtime.rank, nonces), "proving the launch secret", timeout_s, name)
    wrong = [process for process, theirs in enumerate(proofs)
             if process != runtime.rank and not hmac.compare_digest(theirs, proof(secret, process, nonces))]
    if wrong:
        raise PeerError(f"launch secret: {', '.join(name(p) for p in wrong)} "
                        f"{'holds' if len(wrong) == 1 else 'hold'} another {SECRET_VARIABLE} than "
                        f"{name(runtime.rank)}; {FIX}")
    key = hmac.new(secret, KEY_LABEL + nonces, hashlib.sha256).digest()
    return dataclasses.replace(runtime, frame_key=FrameKey(key))


def missing_line(holders: list[int], world: int, name: ProcessNamer) -> str:
    """The one line every process prints when some processes have a secret and others have none."""
    lacking = [process for process in range(world) if process not in holders]
    have = ", ".join(name(p) for p in holders)
    return (f"launch secret: {', '.join(name(p) for p in lacking)} {'has' if len(lacking) == 1 else 'have'} no "
            f"{SECRET_VARIABLE} in {'its' if len(lacking) == 1 else 'their'} environment while {have} "
            f"{'has' if len(holders) == 1 else 'have'} one; {FIX}")


def proof(secret: bytes, process: int, nonces: bytes) -> bytes:
    """What ``process`` shows to prove it holds ``secret`` in the launch whose nonces are ``nonces``."""
    return hmac.new(secret, PROOF_LABEL + struct.pack("<q", process) + nonces, hashlib.sha256).digest()


def all_gathered(runtime: Runtime, data: bytes, what: str, timeout_s: float, name: ProcessNamer) -> list[bytes]:
    """Every process's ``data`` (the same length everywhere), in process order, with a deadline. Raw
    bytes in a tensor, not objects: nothing received before the proof is unpickled."""
    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(runtime.wire_device)
    parts = [torch.empty_like(mine) for _ in range(runtime.world)]
    with collective(what, timeout_s, name, runtime.heartbeat):
        dist.all_gather(parts, mine)
    return [part.cpu().numpy().tobytes() for part in parts]
