#!/usr/bin/env bash
# Build the offline bundle that bench/gpu_check.sh installs on a GPU machine with only PyTorch.
#
#   bash bench/build_gpu_wheels.sh                       # for Python 3.12 (GPU images) into .whl/
#   bash bench/build_gpu_wheels.sh --python 3.11         # another interpreter (repeatable: both fit)
#   bash bench/build_gpu_wheels.sh --upstream /path/to/Megatron-LM   # + the upstream baseline tree
#
# .whl/ is git-ignored; carry it with the working tree (the device runner's `carry: [".whl"]`).
# It holds, for the target Python on manylinux x86_64:
#   - megatron-core: the newest release setup.py allows for that Python (0.19.x for 3.12; the
#     0.16.1 pin for 3.11), downloaded as a wheel, not installed here;
#   - megatron-ct: this tree as a wheel (pure Python);
#   - pyyaml, psutil, packaging, numpy: what megatron-ct and megatron-core import beyond torch
#     (a bare `pip install torch` image has torch's own dependencies and triton, not these).
#     gpu_check.sh installs one only when the image lacks it.
# With --upstream, Megatron-LM's megatron/, pretrain_gpt.py, gpt_builders.py and model_provider.py
# (a git checkout, or a bare mirror) go to .whl/Megatron-LM for the optional baseline run.
# Needs network access to PyPI here, none on the GPU machine.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/.whl"
PYV=3.12
UPSTREAM=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYV="$2"; shift 2 ;;
    --upstream) UPSTREAM="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
BIN=(--no-deps --only-binary=:all: --python-version "$PYV" "${PLATFORMS[@]}" -d "$OUT")

if [ "${PYV//./}" -ge 312 ]; then MCORE="megatron-core>=0.16.1,<0.20"; else MCORE="megatron-core==0.16.1"; fi
echo "[1/3] $MCORE for Python $PYV"
python -m pip download --quiet "${BIN[@]}" "$MCORE"
echo "[2/3] runtime dependencies beyond torch: pyyaml psutil packaging numpy"
python -m pip download --quiet "${BIN[@]}" pyyaml psutil packaging numpy
echo "[3/3] megatron-ct wheel from $REPO"
python -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "$REPO"
rm -rf "$REPO/build" "$REPO"/*.egg-info  # setuptools' leftovers in the tree

if [ -n "$UPSTREAM" ]; then
  echo "[+] Megatron-LM tree from $UPSTREAM"
  rm -rf "$OUT/Megatron-LM" && mkdir -p "$OUT/Megatron-LM"
  FILES=(megatron pretrain_gpt.py gpt_builders.py model_provider.py)
  if git -C "$UPSTREAM" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$UPSTREAM" archive HEAD "${FILES[@]}" | tar -x -C "$OUT/Megatron-LM"
    git -C "$UPSTREAM" rev-parse HEAD > "$OUT/Megatron-LM/COMMIT"
  else
    for f in "${FILES[@]}"; do cp -r "$UPSTREAM/$f" "$OUT/Megatron-LM/"; done
  fi
  # Tests and docs are not needed to train; keep the carried tree small.
  find "$OUT/Megatron-LM" -name "tests" -type d -prune -exec rm -rf {} +
fi
echo "bundle in $OUT ($(du -sh "$OUT" | cut -f1)):"
ls -1 "$OUT"
