#!/usr/bin/env bash
# Create/refresh the project's virtual environment in .venv (idempotent, fast when up to date).
#   - a CUDA-enabled torch already on the system python is reused (venv with system site-packages);
#   - otherwise the CPU build torch==2.13.0 is installed first, so that no dependency
#     resolves an unpinned torch to the multi-GB CUDA wheels;
#   - then this package (editable) with its test extra: megatron-core==0.16.1,
#     sentencepiece, nltk, psutil, pytest, pytest-timeout, ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp_src=$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.ppu-setup-$stamp_src" ] && "$VENV/bin/python" -c "import megatron_ppu, megatron.core" 2>/dev/null; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[setup] reusing the system's CUDA torch"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
echo "[setup] installing megatron_ppu and its dependencies"
"$VPY" -m pip install -q -e ".[test]"
rm -f "$VENV"/.ppu-setup-*
touch "$VENV/.ppu-setup-$stamp_src"
