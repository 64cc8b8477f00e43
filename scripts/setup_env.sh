#!/usr/bin/env bash
# Create/refresh the project's virtual environment in .venv (idempotent, fast when up to date).
# Interpreter and folder: scripts/venv.sh (PYTHON=python3.12 bash scripts/setup_env.sh makes
# .venv-py3.12 with megatron-core 0.19.x; the default python3, 3.11 here, makes .venv with 0.16.1).
#   - a CUDA-enabled torch already on the system python is reused (venv with system site-packages);
#   - otherwise torch==2.13.0 is installed first, so that no dependency resolves an unpinned
#     torch: on Python 3.11 the CPU build (about 200 MB); on Python 3.12 the only torch 2.13
#     wheel on PyPI is the CUDA build (about 3.3 GB with its nvidia-* packages), which runs on
#     the CPU too. (A pip constraint file capping torch, such as torch<=2.14.1, allows the pin.)
#   - then this package (editable) with its test extra: megatron-core (setup.py picks the
#     version by Python version), sentencepiece, nltk, psutil, pytest, pytest-timeout, ...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
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
  echo "[setup] installing torch==2.13.0 (Python 3.11: the CPU build; Python 3.12: PyPI's CUDA build, about 3.3 GB)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
echo "[setup] installing megatron_ppu and its dependencies"
"$VPY" -m pip install -q -e ".[test]"
rm -f "$VENV"/.ppu-setup-*
touch "$VENV/.ppu-setup-$stamp_src"
