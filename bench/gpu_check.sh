#!/usr/bin/env bash
# One-shot GPU check: under 8 minutes on one H100/H200 that has only PyTorch (CUDA build), offline.
#
#   bash bench/build_gpu_wheels.sh [--upstream DIR]   # once, on a machine with PyPI access
#   bash bench/gpu_check.sh [OUT_DIR]                  # on the GPU machine, from the working tree
#
# Installs megatron-core and megatron-ct from the wheels in .whl/ (GPU_CHECK_WHEELS) into a private
# directory on PYTHONPATH (the image's own packages stay untouched; no network), plus pyyaml,
# psutil, packaging or numpy when the image lacks them; then runs bench/gpu_check.py:
# pretrain_ct.py on a LLaMA-7B-width slice (4 layers, hidden 4096, seq 4096, bf16, TP1) per
# attention backend (tokens/s, TFLOP/s, MFU, peak memory, loss vs local), the chunked vs plain
# loss at vocabulary 152k, packed documents with flex vs local, kernel micro-benchmarks, and
# upstream Megatron-LM's pretrain_gpt.py when .whl/Megatron-LM is there. Items that would overrun
# GPU_CHECK_BUDGET_S (440 s after this script starts) are skipped and listed.
# Output: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (default runs/gpu_check/), table printed.
set -uo pipefail
export GPU_CHECK_T0="$(date +%s)"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${1:-$REPO/runs/gpu_check}"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python

"$PY" - <<'EOF' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit("error: PyTorch is not installed for this python; gpu_check needs a CUDA build of torch")
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device; gpu_check needs one GPU")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name()}", flush=True)
EOF

if ! ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1 || ! ls "$WHEELS"/megatron_ct-*.whl >/dev/null 2>&1; then
  echo "error: no megatron-core / megatron-ct wheels in $WHEELS; build them with bench/build_gpu_wheels.sh" >&2
  exit 2
fi
export PIP_ROOT_USER_ACTION=ignore  # pip as root in a container: no advice needed
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/megatron_ct_gpu_check_site}"
rm -rf "$SITE" && mkdir -p "$SITE"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps --target "$SITE")
# pip picks the megatron-core wheel built for this interpreter (cp312 -> 0.19.x, cp311 -> 0.16.1).
if ! "${PIP[@]}" megatron-core megatron-ct; then
  echo "error: installing megatron-core/megatron-ct from $WHEELS failed (a wheel for python $("$PY" -c 'import sys; print(sys.version.split()[0])') missing?)" >&2
  exit 2
fi
for pair in yaml:pyyaml psutil:psutil packaging:packaging numpy:numpy; do
  mod="${pair%%:*}"; pkg="${pair##*:}"
  if ! "$PY" -c "import $mod" >/dev/null 2>&1; then
    "${PIP[@]}" "$pkg" || { echo "error: $pkg is missing and not in $WHEELS" >&2; exit 2; }
  fi
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import megatron.core, megatron_ct; print('megatron-core', megatron.core.__version__, '| megatron-ct from', megatron_ct.__file__)" || exit 2
echo "setup done in $(( $(date +%s) - GPU_CHECK_T0 ))s"

exec "$PY" "$REPO/bench/gpu_check.py" --out "$OUT"
