"""One rank of a `scripts/gpu_check.py` run: train with `pretrain_gpt_ppu.py`'s own code path, then
write what the check reports (losses, evaluation, peak CUDA memory, which Megatron classes and fused
paths were picked) as JSON.

    torchrun --nproc_per_node N scripts/gpu_check_worker.py OUT.json -- <trainer flags>

Only the last rank (which holds the loss) and rank 0 write; each writes OUT.json.rank<R>.
"""
from __future__ import annotations

import json
import logging
import os
import sys


def _describe(trainer) -> dict:
    import torch

    model = trainer.model
    opt = trainer.optimizer
    chained = getattr(opt, "chained_optimizers", [opt])
    norms = sorted({type(m).__name__ for n, m in model.named_modules() if "norm" in type(m).__name__.lower()})
    attention = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("core_attention")})
    cfg = model.config
    fused = {k: getattr(cfg, k, None) for k in ("bias_activation_fusion", "masked_softmax_fusion",
                                                 "bias_dropout_fusion", "gradient_accumulation_fusion",
                                                 "persist_layer_norm", "apply_rope_fusion")}
    return {
        "optimizer": type(opt).__name__,
        "chained": [type(o).__name__ for o in chained],
        "inner": sorted({type(getattr(o, "optimizer", o)).__name__ for o in chained}),
        "norms": norms,
        "core_attention": attention,
        "fused": fused,
        "param_devices": sorted({str(p.device.type) for p in model.parameters()}),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "max_memory_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


def main() -> int:
    out, rest = sys.argv[1], sys.argv[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_ppu.training.loop import run
    import torch.distributed as dist

    trainer = run(rest)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank in (0, world - 1):
        result = {"rank": rank, "world": world, "losses": list(trainer.losses),
                  "final_eval": trainer.final_eval, **_describe(trainer)}
        with open(f"{out}.rank{rank}", "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
