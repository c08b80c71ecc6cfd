#!/usr/bin/env bash
# Install megatron-ct and its test extras into the current Python, keeping an installed torch.
#
# With no torch present, torch==2.13.0 is installed first: on our CPU machines that is a
# local CPU build, on a GPU machine PyPI's CUDA build. setup.py only asks for torch>=2.4,
# so an existing torch (CPU or CUDA) always satisfies it and pip never swaps it for
# multi-GB CUDA wheels. Transformer Engine, flash-attn and apex stay optional (extra 'gpu').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,tensorboard]"
"$PY" -c "import torch, megatron.core; print(f'megatron-ct ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}')" 2>/dev/null
