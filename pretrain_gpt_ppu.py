#!/usr/bin/env python
"""Pre-train a Megatron-Core GPT with DiLoCo and Partial Parameter Updates.

Embedded default (small GPT on the embedded English corpus, CPU, 2 replicas, PPU 1/2 MLPs):
    torchrun --nproc_per_node=2 pretrain_gpt_ppu.py --ppu-slices 2

Your Megatron launch, made low-communication (H=100 local steps, 1/4 MLPs per replica):
    torchrun --nproc_per_node=8 --nnodes=32 ... pretrain_gpt_ppu.py <Megatron flags> \\
        --ppu-slices 4 --diloco-local-steps 100

Synchronous DDP baseline with the same flags: --diloco-local-steps 0 (and --ppu-slices 1).
See README.md and `python pretrain_gpt_ppu.py --help`.
"""
import sys

from megatron_ppu.training.loop import main

if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # user errors: flags, data, checkpoints; the message names the fix
        print(f"pretrain_gpt_ppu.py: error: {e}", file=sys.stderr)
        sys.exit(2)
