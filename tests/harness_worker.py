"""Child side of :mod:`tests.harness` (``python -m tests.harness_worker TARGET KWARGS OUTDIR``)."""
import importlib
import json
import multiprocessing
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    target, kwargs, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        if torch.cuda.is_available():  # scripts/gpu_check.sh: ranks share the GPU(s); gloo serves CUDA tensors
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        if not torch.cuda.is_available():
            from megatron_ppu.patches import apply_cpu_patches

            apply_cpu_patches()
        mod_name, fn_name = target.split(":")
        fn = getattr(importlib.import_module(mod_name), fn_name)
        result = fn(rank=rank, world_size=world, **kwargs)
        torch.save(result, os.path.join(out, f"result{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        # os._exit skips multiprocessing's exit handlers: stop this process's children first (e.g. the
        # spawn Manager behind megatron-core's checkpoint writer), or they outlive it, reparented to init
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(1)  # do not wait on peers that may be blocked in a collective
    return 0


if __name__ == "__main__":
    sys.exit(main())
