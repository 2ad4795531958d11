"""Settings every test shares: in-process runs use one thread, as every launched run of the suite
does (OMP_NUM_THREADS=1 in tests/launch.py), so that test files run side by side (scripts/test.sh
runs one worker per core) without oversubscribing the cores."""

import torch

torch.set_num_threads(1)
