"""Neighbour exchange between peers: in memory when co-hosted, one message per process pair otherwise.

N logical peers live on P processes (contiguous blocks: peer i on process i // (N/P)). A gossip step
is a set of directed routes (src -> dst). For every pair of processes that share a route, the
sender concatenates the payloads of its source peers into ONE contiguous message, and all messages
of the step are posted together in a single ``batch_isend_irecv``. Every wait has a deadline; a
neighbour that stays silent ends the run with an error that names the silent peers.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from .errors import ConfigError, PeerError

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


@dataclass(frozen=True)
class Runtime:
    """Process-level facts of a launch: rank, world size, device and backend."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def wire_device(self) -> torch.device:
        """Where messages and collectives live: the GPU for NCCL, host memory for Gloo (even on a GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def collective(what: str, timeout_s: float):
    """Turn a failed or timed-out collective (bounded by the process-group timeout) into a PeerError."""
    try:
        yield
    except PeerError:
        raise
    except RuntimeError as exc:  # torch's DistBackendError and gloo/NCCL failures are RuntimeErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PeerError(
            f"{what}: not every process took part within {timeout_s:g} s ({reason}); another process "
            "stopped or is stuck; check the logs of the other ranks"
        ) from None


def init_runtime(backend: str = "auto", timeout_s: float = 300.0) -> Runtime:
    """Join the torchrun process group if launched by torchrun, else run as one process.

    ``auto`` picks NCCL when CUDA is available (the device is set first and a collective warms the
    communicator up), else Gloo. The process-group timeout bounds every collective.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ConfigError("comm.backend=nccl needs CUDA GPUs; use comm.backend=gloo (or auto) on CPU")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    device = torch.device("cpu")
    if cuda and backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); NCCL needs one "
                "process per GPU: lower --nproc_per_node or host more peers per process"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if world == 1:
        return Runtime(0, 1, 0, 1, device, None)
    with collective(f"joining the {world}-process group", timeout_s):
        if not dist.is_initialized():
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        runtime = Runtime(rank, world, local_rank, local_world, device, backend)
        dist.all_reduce(torch.ones(1, device=runtime.wire_device))  # warm-up: NCCL builds its communicator here
    return runtime


Route = tuple[int, int]  # (source peer, destination peer)


class Transport:
    """Delivers per-peer payloads along directed routes, with a handshake and deadlines."""

    def __init__(self, placement: Placement, device: torch.device, timeout_s: float, fingerprint: int,
                 wire_device: torch.device | None = None) -> None:
        self.placement = placement
        self.device = device  # where payloads come from and received ones are delivered
        self.wire_device = device if wire_device is None else wire_device  # where messages travel from
        self.timeout_s = timeout_s
        self.fingerprint = fingerprint & 0x7FFFFFFFFFFFFFFF
        self.wire_bytes = 0  # bytes this process actually sent to other processes
        self._checked: set[int] = set()

    def exchange(self, payloads: Mapping[int, torch.Tensor], routes: Iterable[Route], step: str = "",
                 numel_of: Callable[[int], int] | None = None) -> dict[int, torch.Tensor]:
        """Deliver ``payloads[src]`` of every local source to the destinations named in ``routes``.

        ``payloads`` holds one 1-D tensor per local peer. ``numel_of(src)`` is the size of the
        payload peer ``src`` sends in this step (every process computes the same); by default all
        payloads have the size of the local ones. Returns, for every source with a route into a
        local peer, the payload as seen here (the same tensor for local sources, a view into the
        received message for remote ones). ``step`` labels errors.
        """
        if numel_of is None:
            common = self._common_numel(payloads)

            def numel_of(src: int) -> int:
                return common

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
        self._handshake(set(send_to) | set(recv_from), numel_of, step)
        dtype = next(iter(payloads.values())).dtype
        ops, targets, inboxes = [], [], []
        for process in sorted(set(send_to) | set(recv_from)):
            if process in send_to:
                message = torch.cat([payloads[s] for s in sorted(send_to[process])]).to(self.wire_device)
                ops.append(dist.P2POp(dist.isend, message, process))
                targets.append(process)
                self.wire_bytes += message.numel() * message.element_size()
            if process in recv_from:
                sources = sorted(recv_from[process])
                inbox = torch.empty(sum(numel_of(s) for s in sources), dtype=dtype, device=self.wire_device)
                ops.append(dist.P2POp(dist.irecv, inbox, process))
                targets.append(process)
                inboxes.append((sources, inbox))
        works = dist.batch_isend_irecv(ops)
        self._wait(works, targets, step)
        for sources, inbox in inboxes:
            for src, piece in zip(sources, inbox.to(self.device).split([numel_of(s) for s in sources])):
                result[src] = piece
        return result

    @staticmethod
    def _common_numel(payloads: Mapping[int, torch.Tensor]) -> int:
        sizes = {p.numel() for p in payloads.values()}
        if len(sizes) != 1:
            raise ValueError(f"local payloads differ in size ({sorted(sizes)}); pass numel_of to say who sends what")
        return sizes.pop()

    def _handshake(self, processes: set[int], numel_of: Callable[[int], int], step: str) -> None:
        """First contact with a process: swap (magic, fingerprint, payload size) and fail fast on a mismatch.

        The size is that of this process's first peer's payload in this step; the receiver
        compares it with the size it expects from that peer.
        """
        new = sorted(processes - self._checked)
        if not new:
            return
        numel = numel_of(self.placement.local_peers.start)
        mine = torch.tensor([HEADER_MAGIC, self.fingerprint, numel], dtype=torch.int64, device=self.wire_device)
        theirs = {p: torch.zeros(3, dtype=torch.int64, device=self.wire_device) for p in new}
        ops = [dist.P2POp(dist.isend, mine, p) for p in new] + [dist.P2POp(dist.irecv, theirs[p], p) for p in new]
        self._wait(dist.batch_isend_irecv(ops), new + new, f"{step} handshake".strip())
        for process, header in theirs.items():
            magic, fingerprint, their_numel = header.tolist()
            if magic != HEADER_MAGIC:
                raise PeerError(
                    f"process {process} (peers {self._peer_list(process)}) sent a message that is not a "
                    "p2p_fedrot header; is another program using this rendezvous port?"
                )
            if fingerprint != self.fingerprint:
                raise PeerError(
                    f"process {process} (peers {self._peer_list(process)}) runs a different configuration "
                    f"(fingerprint {fingerprint:#x} != ours {self.fingerprint:#x}); launch every process with "
                    "the same config and --set overrides (only out, threads and comm.* may differ)"
                )
            expected = numel_of(self.placement.peers_of(process).start)
            if their_numel != expected:
                raise PeerError(
                    f"process {process} (peers {self._peer_list(process)}) sends payloads of {their_numel} "
                    f"values, this process expects {expected}; the LoRA shapes differ between processes"
                )
        self._checked.update(new)

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
                silent = ", ".join(f"process {p} (peers {self._peer_list(p)})" for p in suspects)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise PeerError(
                    f"{step or 'exchange'}: no complete message within {self.timeout_s:g} s to/from "
                    f"{silent}; that neighbour stopped or is stuck ({reason}). Check its log; raise "
                    "comm.timeout_s if peers are only slow."
                ) from None

    def _peer_list(self, process: int) -> str:
        peers = self.placement.peers_of(process)
        return f"{peers.start}-{peers.stop - 1}" if len(peers) > 1 else str(peers.start)
