"""The process group: joining it (also after a torchrun restart), agreeing on the run, and
turning every failed collective into one line that names the processes and peers involved."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from ..config import differing, first_few
from ..errors import ConfigError, PeerError

if TYPE_CHECKING:
    from .auth import FrameKey

BOOTSTRAP_KEY = "p2p_fedrot/store"  # where process 0 publishes the address of this attempt's store
PROBE_TIMEOUT_S = 3.0  # how long to try one published store address before reading it again
HEARTBEAT_S = 1.0  # seconds between two heartbeats of a process
NCCL_BACKSTOP = 3.0  # NCCL's watchdog timeout, in message deadlines (see process_group_timeout)


class Heartbeat:
    """Every process bumps its own counter in the group's store once a second. After a collective
    fails without saying who broke it, the counters that stopped moving name the processes that
    died or were stopped (a store that cannot be reached names process 0, which hosts it). A
    process stuck in its own code keeps beating: the deadline names that one."""

    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.store.add(self._key(rank), 1)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="p2p_fedrot-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the beats before the store goes away: a beat still inside the store's C++ client while
        the interpreter shuts down can abort the process."""
        self._stopped.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)

    @staticmethod
    def _key(rank: int) -> str:
        return f"p2p_fedrot/heartbeat/{rank}"

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self.store.add(self._key(self.rank), 1)
            except Exception:  # the store's host is gone: the run is ending anyway
                return

    def silent(self) -> list[int]:
        """The other processes whose heartbeat did not move over three periods."""
        others = [r for r in range(self.world) if r != self.rank]
        try:
            before = [self.store.add(self._key(r), 0) for r in others]
            time.sleep(3 * HEARTBEAT_S)
            after = [self.store.add(self._key(r), 0) for r in others]
        except Exception:
            return [0] if self.rank != 0 else []
        return [r for r, b, a in zip(others, before, after) if a == b]


@dataclass(frozen=True)
class Runtime:
    """Process-level facts of a launch: rank, world size, device and backend."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group
    heartbeat: Heartbeat | None = None
    frame_key: FrameKey | None = field(default=None, repr=False)  # set by auth.authenticate with a launch secret

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def wire_device(self) -> torch.device:
        """Where messages and collectives live: the GPU for NCCL, host memory for Gloo (even on a GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


ProcessNamer = Callable[[int], str]  # process -> "process 1 (peers 4-7)"


def plain_process_name(process: int) -> str:
    return f"process {process}"


def failure_reason(exc: BaseException) -> str:
    """The first line of a torch / Gloo / NCCL error, classified for a person."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lowered = text.lower()
    if "connection closed" in lowered or "connection reset" in lowered or "broken pipe" in lowered:
        return f"its connection closed: it was killed, crashed or exited ({text})"
    if "timed out" in lowered or "timeout" in lowered or "failed to pass monitoredbarrier" in lowered:
        return f"it stopped answering ({text})"
    return text


def ranks_named_in(text: str) -> list[int]:
    """Processes Gloo names in a failed monitored barrier ("Ranks 1, 3 failed to pass ...")."""
    match = re.search(r"Ranks? ([\d, ]+) failed to pass", text)
    return sorted({int(r) for r in re.findall(r"\d+", match.group(1))}) if match else []


@contextlib.contextmanager
def collective(what: str, timeout_s: float, name: ProcessNamer = plain_process_name,
               heartbeat: Heartbeat | None = None) -> Iterator[None]:
    """Turn a failed or timed-out collective (bounded by the process-group timeout) into a PeerError.

    Gloo words a dead process and a hung one alike; the time it took tells them apart. When Gloo
    does not say which process failed, the heartbeats do.
    """
    since = time.monotonic()
    try:
        yield
    except PeerError:
        raise
    except RuntimeError as exc:  # torch's DistBackendError and Gloo / NCCL failures are RuntimeErrors
        waited = time.monotonic() - since  # before asking the heartbeats, which takes seconds
        finish_the_report_first()
        named = ranks_named_in(str(exc)) or (heartbeat.silent() if heartbeat else [])
        who = ", ".join(name(r) for r in named) if named else "another process"
        if waited < 0.9 * timeout_s:
            what_happened = f"left the group after {waited:.1f} s: it was killed, crashed or exited"
        else:
            what_happened = f"did not answer within {timeout_s:g} s: it is stopped or stuck"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PeerError(f"{what}: {who} {what_happened} ({detail}). Check the log of that process.") from None


def finish_the_report_first() -> None:
    """Ignore SIGTERM from now on: this process has met a peer failure and exits as soon as it has
    said which peer failed, which can take the heartbeats' seconds. torchrun sends SIGTERM to every
    survivor the moment it sees one worker die; without this the report would be cut off (torchrun
    still sends SIGKILL after its own grace period)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask under taskset, cgroups or a batch
    scheduler), not all the machine's cores."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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
    timeout = datetime.timedelta(seconds=timeout_s)
    with collective(f"joining the {world}-process group", timeout_s):
        store = attempt_store(rank, world, timeout_s) if torchrun_shares_its_store() else own_store(rank, world, timeout)
        if not dist.is_initialized():
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=process_group_timeout(backend, timeout_s), **kwargs)
        runtime = Runtime(rank, world, local_rank, local_world, device, backend, Heartbeat(store, rank, world))
        dist.all_reduce(torch.ones(1, device=runtime.wire_device))  # warm-up: NCCL builds its communicator here
    return runtime


def process_group_timeout(backend: str, timeout_s: float) -> datetime.timedelta:
    """The process group's own timeout. NCCL's watchdog aborts the process when it expires, so it is
    set past the message deadline (a backstop): a peer that stays silent is then named by the
    exchange's or the barrier's own deadline first, and a slow collective is not mistaken for a dead
    peer. Gloo raises an ordinary error instead, which the deadline's wording already classifies."""
    return datetime.timedelta(seconds=timeout_s * (NCCL_BACKSTOP if backend == "nccl" else 1.0))


def own_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The store at MASTER_ADDR:MASTER_PORT, hosted by process 0 (a launch without a torchrun agent's store)."""
    for variable in ("MASTER_ADDR", "MASTER_PORT"):
        if variable not in os.environ:
            raise ConfigError(f"WORLD_SIZE is set but {variable} is not: launch with torchrun, or set MASTER_ADDR "
                              "and MASTER_PORT for every process")
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=rank == 0,
                         timeout=timeout)


def launch_id() -> str | None:
    """The torchrun launch this process belongs to (the same across its restarts), if any."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def torchrun_shares_its_store() -> bool:
    """True under a torchrun agent that hands its workers one TCP store for the whole launch."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def attempt_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """A store that is new for this attempt of the launch.

    torchrun's shared store outlives the workers: after a restart (``--max-restarts``) it still
    holds the addresses the dead workers published, so a group formed on it dials dead ports
    ("connection refused") until it times out. Process 0 therefore opens a fresh store for every
    attempt and publishes its address with a random token; the others read the address until it
    answers with that token: a stale record points at a closed port, or, if the port has been
    taken since, at a store without that record's token. This works on every node, whatever
    restart count each node's agent has reached.
    """
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    if rank == 0:
        token = uuid.uuid4().hex
        own = dist.TCPStore(os.environ["MASTER_ADDR"], 0, world, is_master=True, wait_for_workers=False,
                            timeout=datetime.timedelta(seconds=timeout_s))
        own.set("token", token)
        shared.set(BOOTSTRAP_KEY, f"{os.environ['MASTER_ADDR']} {own.port} {token}")
        return own
    deadline = time.monotonic() + timeout_s
    while True:
        host, port, token = shared.get(BOOTSTRAP_KEY).decode().split()
        if answers(host, int(port)):  # a quiet check first: a store client would log every refusal
            try:
                candidate = dist.TCPStore(host, int(port), world, is_master=False,
                                          timeout=datetime.timedelta(seconds=PROBE_TIMEOUT_S))
                if candidate.get("token").decode() == token:
                    candidate.set_timeout(datetime.timedelta(seconds=timeout_s))
                    return candidate
            except RuntimeError:  # torch's DistError is one
                pass  # the port was reused by something else
        if time.monotonic() > deadline:
            raise PeerError(f"process {rank}: process 0 published no reachable store within {timeout_s:g} s; "
                            "check that process 0 started and that its host accepts connections")
        time.sleep(0.2)


def answers(host: str, port: int) -> bool:
    """True when something accepts connections at host:port (an earlier attempt's store does not)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def agree(runtime: Runtime, header: Mapping[str, str], what: str, timeout_s: float,
          name: ProcessNamer = plain_process_name) -> None:
    """Every process shares its ``header`` (setting -> value); any difference stops all of them at once.

    Each process sees every header, so each raises the same error naming the differing settings,
    instead of one hanging later in a collective that the other never joins.
    """
    if not runtime.distributed:
        return
    headers: list = [None] * runtime.world
    with collective(f"agreeing on {what}", timeout_s, name, runtime.heartbeat):
        dist.all_gather_object(headers, dict(header))
    reference = headers[0]
    for process, other in enumerate(headers[1:], start=1):
        keys = differing(reference, other)
        if keys:
            shown = first_few([f"{k}: {other.get(k)!r} there, {reference.get(k)!r} on process 0" for k in keys], 5)
            raise PeerError(
                f"{name(process)} disagrees with process 0 on {what}: {shown}; launch every process with "
                "the same config, --set overrides and package versions (only out, threads and comm.timeout_s may differ)"
            )
