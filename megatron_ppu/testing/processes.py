"""Ending a launched job for tests and benchmarks: a torchrun job is a tree of processes."""
from __future__ import annotations

import os
import signal


def kill_process_tree(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL process ``pid``, every descendant (torchrun starts its workers in sessions of their
    own, so its process group alone misses them) and its process group, each by PID; then wait up
    to ``timeout`` seconds for the descendants to be gone."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for c in kids:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    psutil.wait_procs(kids, timeout=timeout)
