"""Multi-rank test harness: launch 2-4 CPU ranks with gloo, fail with the child's traceback.

``run_ranks(n, "tests.test_x:_worker", kwargs)`` starts ``n`` fresh Python
processes. Each initialises ``torch.distributed`` (gloo, TCP on localhost),
applies the CPU patches, calls ``_worker(rank=..., world_size=..., **kwargs)`` and
saves its return value. The parent kills every rank when the timeout expires,
checks every exit code, and returns the per-rank results.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, List, Optional

import torch

from megatron_ppu.testing.local_ranks import RankFailure, run_local_ranks  # noqa: F401 (RankFailure re-exported)

REPO = Path(__file__).resolve().parents[1]


def run_ranks(world_size: int, target: str, kwargs: Optional[dict] = None, *, timeout: float = 600.0,
              env: Optional[dict] = None) -> List[Any]:
    """Run ``target`` ("module:function") on ``world_size`` ranks; return each rank's result."""
    with tempfile.TemporaryDirectory(prefix="ppu-ranks-") as out:
        child_env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        cmd = [sys.executable, "-m", "tests.harness_worker", target, json.dumps(kwargs or {}), out]
        run_local_ranks(cmd, world_size, [str(Path(out) / f"rank{r}.log") for r in range(world_size)],
                        cwd=str(REPO), timeout=timeout, env=child_env, label=target)
        return [torch.load(Path(out) / f"result{r}.pt", weights_only=False) for r in range(world_size)]
