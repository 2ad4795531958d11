"""The collectives a run needs beyond the neighbour exchange, each one named when it fails.

Every collective is preceded by a monitored barrier: a process that died or hangs before it is
then named (a plain gather or all-reduce cannot tell who broke it). With a single process each
is the identity.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .runtime import Runtime, collective

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class ProcessGroup:
    """Barrier, gather, broadcast and all-reduce over the run's processes, with deadlines."""

    def __init__(self, runtime: Runtime, timeout_s: float, name: Callable[[int], str]) -> None:
        self.runtime, self.timeout_s, self.name = runtime, timeout_s, name

    @property
    def rank(self) -> int:
        return self.runtime.rank

    def arrive(self, what: str) -> None:
        """Wait for every process; on Gloo the error names the processes that did not arrive."""
        if not self.runtime.distributed:
            return
        with collective(what, self.timeout_s, self.name, self.runtime.heartbeat):
            deadline = datetime.timedelta(seconds=self.timeout_s)
            if self.runtime.backend == "gloo":
                dist.monitored_barrier(timeout=deadline, wait_all_ranks=True)
            else:  # bounded by the message deadline, not by the later watchdog (process_group_timeout)
                dist.barrier(async_op=True).wait(timeout=deadline)

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        self.arrive(what)
        with collective(what, self.timeout_s, self.name, self.runtime.heartbeat):
            yield

    def gather_objects(self, obj: object, what: str) -> list:
        """Every process's ``obj`` on process 0, in process order (an empty list elsewhere)."""
        if not self.runtime.distributed:
            return [obj]
        out = [None] * self.runtime.world if self.rank == 0 else None
        with self.collective(what):
            dist.gather_object(obj, out, dst=0)
        return out or []

    def broadcast_object(self, obj: object, what: str) -> object:
        """Process 0's ``obj`` on every process."""
        if not self.runtime.distributed:
            return obj
        box = [obj]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def reduce(self, tensor: torch.Tensor, op: str, what: str = "combining metrics") -> None:
        """All-reduce ``tensor`` in place (op: sum or max), through the device collectives use."""
        if not self.runtime.distributed:
            return
        wire = tensor.to(self.runtime.wire_device)
        with self.collective(what):
            dist.all_reduce(wire, op=OPS[op])
        if wire is not tensor:
            tensor.copy_(wire)

    def max_seconds(self, seconds: dict[str, float]) -> dict[str, float]:
        """The slowest process sets the pace, so report its time per phase."""
        values = torch.tensor(list(seconds.values()), dtype=torch.float64)
        self.reduce(values, "max", "combining timings")
        return dict(zip(seconds, values.tolist()))
