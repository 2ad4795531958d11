#!/usr/bin/env bash
# Set up if needed, then run the default experiment on 2 processes (torchrun, Gloo on CPU).
# Extra arguments are passed to `p2p-fedrot run`, e.g. --set topology=torus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
CONFIG=${CONFIG:-configs/toy.yaml}
OUT=${OUT:-runs/demo}
NPROC=${NPROC:-2}
torchrun --standalone --nproc_per_node "$NPROC" -m p2p_fedrot run "$CONFIG" --set "out=$OUT" "$@"
echo "metrics: $OUT/metrics.jsonl  summary: $OUT/summary.json"
