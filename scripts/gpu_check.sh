#!/usr/bin/env bash
# The first-GPU check (issue 13, item 9): on a machine with one NVIDIA GPU and no network, run
# scripts/gpu_check.py (single-rank NCCL bf16 training, save + resume, 2 ranks sharing the GPU with
# PPU 1/2, TP=2 + sequence parallelism, PP=2, the partial-layer gradient check on CUDA, the classes and
# fused paths Megatron picked, the SDPA attention vs DotProductAttention on CUDA and its bf16 benchmark,
# a 2-replica torchft kill and heal (2 jobs sharing the GPU), peak memory of DiLoCo vs PPU 1/4 vs PPU 1/4 + heads) and print a table.
# Finishes in under 8 minutes. On a machine without CUDA it says so and exits 3 without running anything.
#
#   bash scripts/gpu_check.sh                    # on the GPU machine
#   bash scripts/gpu_check.sh --download-wheels  # beforehand, on a machine with PyPI: megatron-core for
#                                                # the GPU machine's Python into .whl/ (git-ignored)
# Extra arguments go to scripts/gpu_check.py (--skip-memory, --budget-s S).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PY=${GPU_PYTHON:-3.12}
if [ "${1:-}" = "--download-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  PIP=".venv/bin/python -m pip"; [ -x .venv/bin/python ] || PIP="python3 -m pip"
  $PIP download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "megatron-core==0.16.1"
  ls -l .whl
  exit 0
fi
PY=""
for cand in .venv/bin/python python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=$cand; break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no CUDA device visible to torch (tried .venv/bin/python and python3); this check needs an NVIDIA GPU. Nothing was run." >&2
  exit 3
fi
SITE=${PPU_GPU_SITE:-/tmp/ppu-gpu-site}
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  if ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
  else
    echo "gpu_check: megatron-core is not installed for $PY and .whl/ holds no wheel; run" \
         "'bash scripts/gpu_check.sh --download-wheels' on a machine with PyPI first." >&2
    exit 4
  fi
fi
if ! "$PY" -c "import megatron_ppu.patches" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . >/dev/null
fi
export PYTHONUNBUFFERED=1
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
