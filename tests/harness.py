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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]


class RankFailure(AssertionError):
    """A rank exited non-zero or the job timed out."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, target: str, kwargs: Optional[dict] = None, *, timeout: float = 600.0,
              env: Optional[dict] = None) -> List[Any]:
    """Run ``target`` ("module:function") on ``world_size`` ranks; return each rank's result."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ppu-ranks-") as out:
        procs = []
        logs = []
        for rank in range(world_size):
            log = open(Path(out) / f"rank{rank}.log", "w+")
            child_env = dict(os.environ)
            child_env.update({
                "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": str(REPO) + os.pathsep + child_env.get("PYTHONPATH", ""),
            })
            child_env.update(env or {})
            cmd = [sys.executable, "-m", "tests.harness_worker", target, json.dumps(kwargs or {}), out]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT))
            logs.append(log)
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:  # also when the test itself is interrupted (pytest-timeout, Ctrl-C): no orphans
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if timed_out or failed:
            # Show the first failing rank's output in full (its traceback), others' tails.
            first = failed[0] if failed else 0
            msg = [f"{target} on {world_size} ranks: " + (f"timed out after {timeout:.0f}s" if timed_out
                   else f"ranks {failed} exited with {[procs[r].returncode for r in failed]}")]
            msg.append(f"--- rank {first} output ---\n{texts[first][-12000:]}")
            for r, t in enumerate(texts):
                if r != first:
                    msg.append(f"--- rank {r} (tail) ---\n{t[-1500:]}")
            raise RankFailure("\n".join(msg))
        return [torch.load(Path(out) / f"result{r}.pt", weights_only=False) for r in range(world_size)]
