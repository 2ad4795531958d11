"""Run a function on several real gloo ranks over loopback and collect what each returns."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from p2p_fedrot.study.sweep import fork_server

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "P2P_FEDROT_SECRET")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, outdir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    result = fn(rank, world, *args)
    torch.save(result, Path(outdir) / f"rank{rank}.pt")
    # Leave at once: after a peer failure, pending gloo receives may block a normal shutdown.
    os._exit(0)


@functools.cache
def shared_fork_server():
    """One fork server per test process, started on first use (None where the platform has none):
    its processes start with the package imported, as sweeps start their runs. They inherit this
    process's environment, which must hold no launch setting."""
    inherited = [key for key in LAUNCH_VARIABLES if key in os.environ]
    assert not inherited, f"a forked process would inherit {inherited} from the test process"
    return fork_server()


def spawn_ranks(fn, world: int, *args, timeout: float = 120.0, may_fail: tuple[int, ...] = ()) -> list:
    """Start ``world`` processes running ``fn(rank, world, *args)``; return their results by rank.

    A rank listed in ``may_fail`` may exit without a result (its entry is None); any other failure,
    or a group still running after ``timeout`` seconds, raises (and every rank is killed first).
    """
    start_method = "forkserver" if shared_fork_server() is not None else "spawn"
    with tempfile.TemporaryDirectory() as outdir:
        context = mp.start_processes(
            _entry, args=(fn, world, free_port(), outdir, args), nprocs=world, join=False, start_method=start_method
        )
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in context.processes):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world} ranks did not finish within {timeout} s")
            time.sleep(0.1)
        results = []
        for rank, process in enumerate(context.processes):
            path = Path(outdir) / f"rank{rank}.pt"
            if process.exitcode != 0 or not path.exists():
                if rank not in may_fail:
                    raise RuntimeError(f"rank {rank} failed with exit code {process.exitcode} (see its stderr above)")
                results.append(None)
            else:
                results.append(torch.load(path, weights_only=False))
        return results


def local_reduce(tensor: torch.Tensor, op: str) -> None:
    """A metrics reduce for one process: its values are already the totals."""


def distributed_reduce(tensor: torch.Tensor, op: str) -> None:
    """A metrics reduce over the default group, without the runner's error naming."""
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
