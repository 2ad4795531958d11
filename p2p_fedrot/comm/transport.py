"""Neighbour exchange between peers: in memory when co-hosted, one message per process pair otherwise.

N logical peers live on P processes (contiguous blocks: peer i on process i // (N/P)). A gossip step
is a set of directed routes (src -> dst). For every pair of processes that share a route, the
sender sends ONE framed message: a small header, then the payloads of its source peers in peer
order, each posted as it lies in memory (no copy into a message buffer: on large payloads that
copy cost more than the send). All messages of the step are posted together in a single
``batch_isend_irecv``. Every wait has a deadline; a neighbour that stays silent, dies or sends a
malformed message ends the run with one line that names it.

The header holds magic, round, step and the size of every payload in the message, and every
payload has the length the receiver expects (a short payload is padded): the receiver reads the
sizes the sender declared instead of trusting the buffer (Gloo would accept a shorter message into
a longer buffer without a word, and NCCL needs equal lengths on both ends).

With a launch secret (auth.py) the header ends with an HMAC-SHA256 of its fields and of every
payload as it travels, bound to the direction, round, step and count of the frame; the receiver
checks it before it reads anything else. Without one, frames carry no MAC and are as before.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from ..errors import ConfigError, PeerError
from .auth import MAC_BYTES, FrameKey, frame_context, wire_bytes
from .faults import altered_on_the_wire
from .runtime import failure_reason

HEADER_MAGIC = 0x50325046  # "P2PF"


@dataclass(frozen=True)
class Placement:
    """Which process hosts which logical peer."""

    peers: int
    world: int
    rank: int

    def __post_init__(self) -> None:
        if self.peers % self.world != 0:
            raise ConfigError(
                f"peers={self.peers} cannot be split evenly over {self.world} processes; "
                f"choose a peer count that is a multiple of the process count (torchrun --nproc_per_node)"
            )

    @property
    def per_process(self) -> int:
        return self.peers // self.world

    def owner(self, peer: int) -> int:
        return peer // self.per_process

    def peers_of(self, process: int) -> range:
        return range(process * self.per_process, (process + 1) * self.per_process)

    @property
    def local_peers(self) -> range:
        return self.peers_of(self.rank)

    def process_name(self, process: int) -> str:
        """"process 1 (peers 4-7)": how errors name a process, by the peers a user configured."""
        peers = self.peers_of(process)
        shown = f"{peers.start}-{peers.stop - 1}" if len(peers) > 1 else str(peers.start)
        return f"process {process} (peer{'s' if len(peers) > 1 else ''} {shown})"


Route = tuple[int, int]  # (source peer, destination peer)


class Transport:
    """Delivers per-peer payloads along directed routes, with framed messages and deadlines."""

    def __init__(self, placement: Placement, device: torch.device, timeout_s: float,
                 wire_device: torch.device | None = None, key: FrameKey | None = None) -> None:
        self.placement = placement
        self.device = device  # where payloads come from and received ones are delivered
        self.wire_device = device if wire_device is None else wire_device  # where messages travel from
        self.timeout_s = timeout_s
        self.wire_bytes = 0  # bytes this process actually sent to other processes
        self.key = key  # with a launch secret: every frame carries a MAC under this launch's key
        self._frames: dict[tuple[int, int], int] = {}  # frames so far per (sender, receiver) process: in each MAC

    def exchange(self, payloads: Mapping[int, torch.Tensor], routes: Iterable[Route], numel_of: Callable[[int], int],
                 step: str = "", tag: tuple[int, int] = (0, 0),
                 tampered: frozenset[int] = frozenset()) -> dict[int, torch.Tensor]:
        """Deliver ``payloads[src]`` of every local source to the destinations named in ``routes``.

        ``payloads`` holds one 1-D tensor per local peer. ``numel_of(src)`` is the size of the
        payload peer ``src`` is expected to send in this step (every process computes the same).
        Returns, for every source with a
        route into a local peer, the payload as seen here: the same tensor for local sources, a
        view into the received message for remote ones, with the size its sender declared (which
        the caller checks). ``tag`` is (round, step): a message of another round is an error.
        ``step`` labels errors. The payloads of the sources in ``tampered`` are altered after their
        frame's MAC is computed, as on the wire (the tamper drill).
        """
        local = set(self.placement.local_peers)
        result: dict[int, torch.Tensor] = {}
        send_to: dict[int, set[int]] = {}
        recv_from: dict[int, set[int]] = {}
        for src, dst in routes:
            src_local, dst_local = src in local, dst in local
            if dst_local and src_local:
                result[src] = payloads[src]
            elif src_local:
                send_to.setdefault(self.placement.owner(dst), set()).add(src)
            elif dst_local:
                recv_from.setdefault(self.placement.owner(src), set()).add(src)
        if not send_to and not recv_from:
            return result
        dtype = next(iter(payloads.values())).dtype
        sealed = self.key is not None
        ops, targets, inboxes = [], [], []
        for process in sorted(set(send_to) | set(recv_from)):
            if process in send_to:
                sources = sorted(send_to[process])
                # the header, then each payload as it is (no copy into one buffer); a short payload
                # (the truncate drill) is padded to the length its receiver posted: NCCL needs equal
                # counts on both ends, and the header keeps the true sizes
                pieces = [frame_header(tag, [payloads[s].numel() for s in sources], dtype, sealed),
                          *(padded(payloads[s], numel_of(s)) for s in sources)]
                pieces = [piece.to(self.wire_device).contiguous() for piece in pieces]
                if sealed:
                    seal(self.key, pieces, self._context(self.placement.rank, process, tag))
                pieces[1:] = [altered_on_the_wire(piece) if src in tampered else piece
                              for src, piece in zip(sources, pieces[1:])]
                for piece in pieces:
                    ops.append(dist.P2POp(dist.isend, piece, process))
                    targets.append(process)
                    self.wire_bytes += piece.numel() * piece.element_size()
            if process in recv_from:
                sources = sorted(recv_from[process])
                header = torch.empty(header_numel(len(sources), dtype, sealed), dtype=dtype, device=self.wire_device)
                bodies = [torch.empty(numel_of(s), dtype=dtype, device=self.wire_device) for s in sources]
                for piece in (header, *bodies):
                    ops.append(dist.P2POp(dist.irecv, piece, process))
                    targets.append(process)
                context = self._context(process, self.placement.rank, tag) if sealed else b""
                inboxes.append((process, sources, header, bodies, context))
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:  # posting fails at once when a neighbour's connection is already closed
            raise PeerError(f"{step or 'exchange'}: could not post messages to {self._names(sorted(set(targets)))}; "
                            f"{failure_reason(exc)}") from None
        self._wait(works, targets, step)
        for process, sources, header, bodies, context in inboxes:
            for src, piece in zip(sources, self._unframe(process, sources, header, bodies, context, tag, step)):
                result[src] = piece
        return result

    def _context(self, sender: int, receiver: int, tag: tuple[int, int]) -> bytes:
        """The MAC context of the next frame from ``sender`` to ``receiver`` (both ends count alike)."""
        count = self._frames.get((sender, receiver), 0)
        self._frames[(sender, receiver)] = count + 1
        return frame_context(sender, receiver, *tag, count)

    def _unframe(self, process: int, sources: list[int], header: torch.Tensor, bodies: list[torch.Tensor],
                 context: bytes, tag: tuple[int, int], step: str) -> list[torch.Tensor]:
        """The payloads of a received message, each with the size its sender declared; with a launch
        secret, only once its MAC (over ``context`` and the frame) has been checked."""
        if self.key is not None and not is_sealed(self.key, [header, *bodies], context):
            raise PeerError(
                f"{step or 'exchange'}: a frame from {self._names([process])} failed authentication: its MAC "
                "does not match its header and payloads under this launch's key (altered on the wire, forged "
                "or replayed); nothing in it was used. Check what can reach the connections between nodes")
        magic, round, mixing_step, count, *sizes = header.view(torch.int64)[: 4 + len(sources)].tolist()
        problem = ""
        if magic != HEADER_MAGIC or count != len(sources):
            problem = "a message that is not a p2p_fedrot frame (another program on this port, or a corrupted stream)"
        elif (round, mixing_step) != tuple(tag):
            problem = f"a message of round {round} step {mixing_step} while this is round {tag[0]} step {tag[1]}"
        elif any(not 0 <= size <= body.numel() for size, body in zip(sizes, bodies)):
            problem = f"payload sizes {sizes} that do not fit the {[b.numel() for b in bodies]} values expected"
        if problem:
            raise PeerError(f"{step or 'exchange'}: {self._names([process])} sent {problem}")
        return [body[:size].to(self.device) for size, body in zip(sizes, bodies)]

    def _wait(self, works: list, targets: list[int], step: str) -> None:
        """Wait for every operation until one shared deadline; ``targets[k]`` is op k's peer process."""
        deadline = time.monotonic() + self.timeout_s
        for k, work in enumerate(works):
            remaining = max(deadline - time.monotonic(), 0.001)
            try:
                work.wait(timeout=datetime.timedelta(seconds=remaining))
            except Exception as exc:  # torch raises RuntimeError / DistBackendError subclasses
                # Gloo returns one work per op; NCCL coalesces the batch into a single work.
                suspects = [targets[k]] if len(works) == len(targets) else sorted(set(targets))
                raise PeerError(
                    f"{step or 'exchange'}: no complete message within {self.timeout_s:g} s to/from "
                    f"{self._names(suspects)}; {failure_reason(exc)}. Check that neighbour's log; raise "
                    "comm.timeout_s if peers are only slow."
                ) from None

    def _names(self, processes: list[int]) -> str:
        return ", ".join(self.placement.process_name(p) for p in processes)


def header_numel(sources: int, dtype: torch.dtype, sealed: bool = False) -> int:
    """Elements of ``dtype`` that hold a frame header for a message with ``sources`` payloads (and
    a MAC when ``sealed``)."""
    return ((4 + sources) * 8 + (MAC_BYTES if sealed else 0)) // torch.empty(0, dtype=dtype).element_size()


def padded(payload: torch.Tensor, numel: int) -> torch.Tensor:
    """``payload`` itself, or a copy padded with zeros to ``numel`` values when it is shorter."""
    if payload.numel() >= numel:
        return payload
    return torch.cat([payload, payload.new_zeros(numel - payload.numel())])


def frame_header(tag: tuple[int, int], sizes: list[int], dtype: torch.dtype, sealed: bool = False) -> torch.Tensor:
    """(magic, round, step, count, size...) as int64, reinterpreted as ``dtype`` to travel with the
    payloads; when ``sealed``, followed by room for the MAC (zeros until :func:`seal`)."""
    mac_room = [0] * (MAC_BYTES // 8) if sealed else []
    fields = torch.tensor([HEADER_MAGIC, *tag, len(sizes), *sizes, *mac_room], dtype=torch.int64)
    return fields.view(dtype)


def seal(key: FrameKey, pieces: list[torch.Tensor], context: bytes) -> None:
    """Write a frame's MAC into the last bytes of its header (``pieces[0]``, made with room for it):
    over the header's fields and every payload, as they travel."""
    header = pieces[0].view(torch.uint8)
    mac = key.mac(context, [header[:-MAC_BYTES], *pieces[1:]])
    header[-MAC_BYTES:] = torch.frombuffer(bytearray(mac), dtype=torch.uint8).to(header.device)


def is_sealed(key: FrameKey, pieces: list[torch.Tensor], context: bytes) -> bool:
    """True when a received frame (header, then payloads) carries the MAC of its bytes and ``context``."""
    header = pieces[0].view(torch.uint8)
    return key.verifies(bytes(wire_bytes(header[-MAC_BYTES:])), context, [header[:-MAC_BYTES], *pieces[1:]])
