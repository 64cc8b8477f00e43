#!/usr/bin/env bash
# Tiny CPU run: 4 processes = 4 DiLoCo replicas (gloo), each training 1/4 of every MLP
# and 1/4 of the attention heads, Streaming DiLoCo with 3 fragments, on the embedded
# English corpus (or your data: add --data-path/--tokenizer-type/--tokenizer-model).
#   bash examples/train_tiny_cpu.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
exec .venv/bin/torchrun --nproc_per_node=4 pretrain_gpt_ppu.py \
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 \
    --seq-length 128 --max-position-embeddings 128 \
    --micro-batch-size 4 --global-batch-size 16 --train-iters 200 \
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.99 --clip-grad 1.0 \
    --ppu-slices 4 --ppu-slice-attention-heads \
    --diloco-local-steps 20 --diloco-outer-lr 0.7 --diloco-outer-momentum 0.9 \
    --diloco-streaming-fragments 3 \
    --eval-interval 100 --eval-iters 10 --log-interval 10 \
    "$@"
