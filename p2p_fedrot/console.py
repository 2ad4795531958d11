"""Progress lines on the terminal: printed once, by process 0 (or the only process).

Reads the process's rank from torch.distributed to decide who prints; it never communicates.
"""

from __future__ import annotations

import torch.distributed as dist


def announce(line: str) -> None:
    """Print a progress line at once, on process 0 alone (or the only process): every process runs
    the same set-up and rounds, so one of them tells."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)
