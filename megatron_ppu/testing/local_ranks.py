"""Run N processes of one command as the ranks of a local torch.distributed job.

Used by the multi-rank tests (``tests/harness.py``) and the benchmarks
(``benchmarks/common.py``): each rank gets ``RANK``/``WORLD_SIZE``/``MASTER_*`` for a
TCP store on localhost, one thread by default, and a log file. The caller learns of
every failure: a rank that exits non-zero stops the job (its peers, blocked in a
collective, are killed a few seconds later), a job past its timeout is killed, and
no rank outlives the call (also when the caller is interrupted), nor any process a rank
started: each rank leads its own process group, killed by its id at the end. (A rank killed
or ended with ``os._exit`` after a ``dist_checkpointing.save`` leaves megatron-core's
results-queue ``Manager`` server, a spawn process, and its resource tracker alive, reparented
to init: its ``Finalize`` runs only at a normal interpreter exit.)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional, Sequence


class RankFailure(RuntimeError):
    """A rank exited non-zero, or the job timed out. The message holds the failing rank's
    log and the other ranks' log tails."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_process_groups(pgids: Sequence[int], wait_s: float = 10.0) -> None:
    """SIGKILL what is left in each process group (what a rank started and left behind, also if
    reparented to init), then wait up to ``wait_s`` seconds until the groups are empty."""
    left = list(pgids)
    deadline = time.monotonic() + wait_s
    while left:
        for g in list(left):
            try:
                os.killpg(g, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # empty (or not ours any more)
                left.remove(g)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def run_local_ranks(cmd: Sequence[str], world_size: int, log_paths: Sequence[str], *, cwd: str,
                    timeout: float, env: Optional[Dict[str, str]] = None, threads_per_rank: int = 1,
                    grace_s: float = 5.0, label: str = "") -> List[str]:
    """Start ``cmd`` once per rank, wait, and return each rank's log text (rank order).

    ``env`` is added to the environment of every rank. Raises :class:`RankFailure` if a
    rank exits non-zero (after ``grace_s`` seconds for the others to report their error)
    or if the job runs past ``timeout`` seconds.
    """
    assert len(log_paths) == world_size, (log_paths, world_size)
    port = free_port()
    procs, logs = [], []
    timed_out = False
    try:
        for rank in range(world_size):
            log = open(log_paths[rank], "w+")
            logs.append(log)
            child_env = dict(os.environ)
            child_env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                              "OMP_NUM_THREADS": str(threads_per_rank), "MKL_NUM_THREADS": str(threads_per_rank),
                              "PYTHONWARNINGS": "ignore"})
            child_env.update(env or {})
            procs.append(subprocess.Popen(list(cmd), cwd=cwd, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # process group = the rank's pid
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if any(p.poll() not in (None, 0) for p in procs):
                # One rank failed; its peers are likely blocked in a collective.
                end = time.monotonic() + grace_s
                while time.monotonic() < end and any(p.poll() is None for p in procs):
                    time.sleep(0.1)
                break
            time.sleep(0.05)
    finally:  # also when the caller is interrupted (pytest-timeout, Ctrl-C): no orphans
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        _kill_process_groups([p.pid for p in procs])
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if timed_out or failed:
        first = failed[0] if failed else 0
        msg = [f"{label or cmd[-1]} on {world_size} ranks: "
               + (f"timed out after {timeout:.0f}s" if timed_out
                  else f"ranks {failed} exited with {[procs[r].returncode for r in failed]}"),
               f"--- rank {first} output ---\n{texts[first][-12000:]}"]
        msg += [f"--- rank {r} (tail) ---\n{t[-1500:]}" for r, t in enumerate(texts) if r != first]
        raise RankFailure("\n".join(msg))
    return texts
