#!/usr/bin/env bash
# Set up worldpm in ./.venv on a fresh machine: CPU torch first (an unpinned torch would pull GBs of CUDA
# wheels), then the package with its pinned dependencies and the test tools. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# On a machine with CUDA, install the torch build you need before running this script; 2.13.0 is kept then.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev]"
# DeepSpeed on CPU (the ZeRO-3 test runs there) compiles its shared-memory comm op on first use (~2 min on 2
# cores, then cached in ~/.cache/torch_extensions): build it once here rather than inside a test
DS_ACCELERATOR=cpu .venv/bin/python - <<'PY' 2>/dev/null || echo "note: DeepSpeed's CPU comm op was not built here (no C++ compiler?)"
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load()
PY
echo "worldpm set up in $(pwd)/.venv ($(.venv/bin/worldpm --help >/dev/null && echo ok))"
