#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow end-to-end tests included: one pytest worker
# per usable core (at most 4), each taking whole test files, so that a file's shared reference runs
# are made once. Extra arguments go to pytest (e.g. -n 0 runs everything in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
workers=$(python -c "import os; print(min(4, len(os.sched_getaffinity(0))))")
python -m pytest -q -n "$workers" --dist loadfile "$@"
