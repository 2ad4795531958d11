#!/usr/bin/env bash
# Run one config once per value of one key, then compare the runs in one report.
#   bash scripts/sweep.sh CONFIG KEY "VALUE1 VALUE2 ..." OUT [--set k=v ...]
# e.g. bash scripts/sweep.sh configs/toy.yaml topology "ring torus exponential complete" runs/topologies --set peers=16
# Each run goes to OUT/VALUE, the report to OUT/report. NPROC>1 launches every run with torchrun.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n 2,5p "$0" >&2
    exit 2
fi
config=$1 key=$2 values=$3 out=$4
shift 4
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NPROC=${NPROC:-1}
runs=()
for value in $values; do
    run="$out/$value"
    echo "== $key=$value -> $run"
    if [ "$NPROC" -gt 1 ]; then
        torchrun --standalone --nproc_per_node "$NPROC" -m p2p_fedrot run "$config" --set "$key=$value" --set "out=$run" "$@"
    else
        p2p-fedrot run "$config" --set "$key=$value" --set "out=$run" "$@"
    fi
    runs+=("$run")
done
p2p-fedrot report "${runs[@]}" --out "$out/report"
