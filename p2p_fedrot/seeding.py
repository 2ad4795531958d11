"""One run seed -> independent, reproducible streams for partitions, graphs, batches and dropout."""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for (purpose, keys), the same on every process and every Python run.

    Uses a stable hash of the purpose string (Python's ``hash`` is salted per process).
    """
    words = [seed & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *[k & 0xFFFFFFFF for k in keys]]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
