#!/usr/bin/env bash
# Make .venv and install hpipe with its runtime and test extras.
#
# torch is installed first, as the CPU build where that can be had: a bare `torch`
# requirement on an ordinary index (PyPI, Linux x86_64) fetches a CUDA build of several GB.
#   1. PyTorch's CPU index reachable: torch==2.13.0+cpu from it (about 200 MB); the other
#      packages from the default index.
#   2. Otherwise (a machine that reaches only its default index): torch==2.13.0 from the
#      default index -- whatever build that index holds (a CUDA one on PyPI for Linux x86_64).
# TORCH_INDEX_URL=URL picks the index for torch yourself (e.g. a CUDA one); a torch already
# in .venv is kept (install the CUDA torch of your choice there first on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
reachable() {  # is this index answering? (5 s, no retries: an unreachable index must not stall the install)
  .venv/bin/python - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)
PY
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "install.sh: torch $TORCH_VERSION from $TORCH_INDEX_URL"
    .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" \
      --extra-index-url https://pypi.org/simple
  elif reachable "$CPU_INDEX"; then
    echo "install.sh: torch $TORCH_VERSION, CPU build, from $CPU_INDEX"
    .venv/bin/python -m pip install -q "torch==$TORCH_VERSION+cpu" --extra-index-url "$CPU_INDEX"
  else
    echo "install.sh: $CPU_INDEX is not reachable; torch $TORCH_VERSION from the default index" \
         "(on PyPI for Linux x86_64 that is a CUDA build of several GB)"
    .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
  fi
fi
.venv/bin/python -m pip install -q -e '.[runtime,test]'
