"""Settings every test shares.

In-process runs use one thread, as every launched run of the suite does (OMP_NUM_THREADS=1 in
tests/launch.py), so that test files run side by side (scripts/test.sh runs one worker per core)
without oversubscribing the cores. Files holding the most slow end-to-end tests are collected
first: each worker takes whole files, and a long file started last would leave the other workers
idle while it finishes.
"""

from collections import Counter

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: each file keeps its own order
