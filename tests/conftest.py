"""Settings every test shares: in-process tests start on one thread, so that test files run side by
side (scripts/test.sh runs one worker per core) without oversubscribing the cores. A run sets its own
thread count (``threads``, else the usable cores / local processes): tests that compare runs exactly
set ``threads=1``."""

import torch

torch.set_num_threads(1)
