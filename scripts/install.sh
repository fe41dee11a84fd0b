#!/usr/bin/env bash
# Make .venv and install hpipe with its runtime and test extras.
# torch is pinned to the CPU build first: a bare `torch` requirement may pull a multi-GB CUDA build.
# On a GPU machine, install the CUDA torch of your choice into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0 || .venv/bin/python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install -q -e '.[runtime,test]'
