#!/usr/bin/env bash
# The paper's 1.3B configuration (GPT-3 XL) on 32 nodes, PPU 1/4 MLPs, Streaming DiLoCo.
#
# Every node is one DiLoCo replica (the paper: one GPU per node; with 8 GPUs per node,
# set GPUS_PER_NODE=8 and the 8 GPUs of a node form one replica with per-step
# all-reduce inside it: --diloco-replicas is the number of nodes).
#   Paper (§3.1, App. A.1): 24 layers, hidden 2048, 16 heads, seq 1024, vocab 32k,
#   global batch 512 x 1024 tokens, AdamW beta=(0.9, 0.99), wd 0.1, lr 3e-4 with 1,500
#   warm-up steps then cosine, outer Nesterov lr 0.4, momentum 0.9, H = 100,
#   8 streaming groups of 3 layers + embeddings (= 9 fragments here), activation recompute.
#   Tokens: 26B (Chinchilla for 1.3B) -> 26e9 / (512 * 1024) = 49,591 iterations.
#
# TORCHRUN=... replaces the launcher (tests use it to check that every flag parses).
# Run on every node (NODE_RANK = 0..31), e.g. from a job script:
#   MASTER_ADDR=node0 NODE_RANK=$i bash examples/pretrain_gpt_1.3b_32nodes_ppu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-1}
NNODES=${NNODES:-32}
NODE_RANK=${NODE_RANK:?set NODE_RANK}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
MASTER_PORT=${MASTER_PORT:-6000}
DATA_PATH=${DATA_PATH:?set DATA_PATH to a Megatron .bin/.idx prefix made by tools/preprocess_data.py}
TOKENIZER_MODEL=${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a 32k SentencePiece model (tools/train_tokenizer.py)}
CKPT=${CKPT:-checkpoints/gpt1.3b-ppu4}

MODEL_ARGS=(
    --num-layers 24 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 16
    --seq-length 1024 --max-position-embeddings 1024 --position-embedding-type rope
    --normalization RMSNorm --disable-bias-linear
    --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
)
TRAINING_ARGS=(
    --micro-batch-size $((512 / (NNODES * GPUS_PER_NODE))) --global-batch-size 512
    --train-iters 49591 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 1500
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.99 --clip-grad 1.0 --bf16
)
DATA_ARGS=(
    --data-path "$DATA_PATH" --split 990,9,1
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
)
PPU_ARGS=(
    --ppu-slices 4                       # add --ppu-slice-attention-heads for 1/4 MLPs + 1/4 heads
    --diloco-local-steps 100 --diloco-outer-lr 0.4 --diloco-outer-momentum 0.9
    --diloco-streaming-fragments 9 --diloco-replicas "$NNODES"
)
CKPT_ARGS=(
    --save "$CKPT" --load "$CKPT" --save-interval 1000
    --eval-interval 1000 --eval-iters 50 --log-interval 10 --tensorboard-dir "$CKPT/tensorboard"
)

exec ${TORCHRUN:-torchrun} --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    pretrain_gpt_ppu.py "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${PPU_ARGS[@]}" "${CKPT_ARGS[@]}"
