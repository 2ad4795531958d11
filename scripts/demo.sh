#!/usr/bin/env bash
# The default experiment: set up if needed, run configs/demo.yaml on 2 processes (torchrun, Gloo on
# CPU: 8 peers of packaged MiniLM on BBC news, ring, DFedRot), then write the report.
# Extra arguments go to `p2p-fedrot run`, e.g. --set topology=torus --set method=fedit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# OMP_NUM_THREADS: torchrun's own default, given here so that it does not print a banner about it
# (the run sets its thread count itself: the `threads` setting)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=${CONFIG:-configs/demo.yaml}
OUT=${OUT:-runs/demo}
NPROC=${NPROC:-2}
for arg in "$@"; do  # a --set out=DIR among the extra arguments moves the report along with the run
    case $arg in out=*) OUT=${arg#out=} ;; esac
done
echo "run: $CONFIG on $NPROC processes, outputs in $OUT"
torchrun --standalone --nproc_per_node "$NPROC" -m p2p_fedrot run "$CONFIG" --set "out=$OUT" "$@"
p2p-fedrot report "$OUT" --out "$OUT/report"
echo "metrics: $OUT/metrics.jsonl"
