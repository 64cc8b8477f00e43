"""The local multi-rank launcher behind tests/harness.py and the benchmarks."""
import pytest

from megatron_ppu.testing.local_ranks import RankFailure
from tests.harness import run_ranks


def _one_rank_fails(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one fails on purpose")
    dist.barrier()  # rank 0 would wait here forever: the launcher must stop it
    return rank


def _all_ok(rank, world_size):
    return {"rank": rank, "world": world_size}


@pytest.mark.timeout(300)
def test_failing_rank_stops_the_job_with_its_traceback():
    with pytest.raises(RankFailure) as e:
        run_ranks(2, "tests.test_local_ranks:_one_rank_fails", timeout=240)
    msg = str(e.value)
    assert "rank one fails on purpose" in msg  # the failing rank's traceback
    assert "exited with" in msg and "timed out" not in msg  # stopped at the failure, not at the timeout


@pytest.mark.timeout(300)
def test_every_rank_returns_its_result():
    assert run_ranks(3, "tests.test_local_ranks:_all_ok") == [{"rank": r, "world": 3} for r in range(3)]


def _killed_after_spawn_manager(rank, world_size, pid_file):
    """As a rank killed after ``dist_checkpointing.save`` (megatron-core's results queue is a spawn
    ``Manager``): start a spawn Manager, write its server's pid, die by SIGKILL (no exit handlers)."""
    import multiprocessing
    import os
    import signal

    import psutil

    manager = multiprocessing.get_context("spawn").Manager()  # its server + a resource tracker
    assert manager.Queue() is not None
    with open(f"{pid_file}.{rank}", "w") as f:
        f.write(" ".join(str(c.pid) for c in psutil.Process().children()))
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(300)
def test_processes_a_killed_rank_started_do_not_outlive_the_job(tmp_path):
    import psutil

    with pytest.raises(RankFailure):
        run_ranks(1, "tests.test_local_ranks:_killed_after_spawn_manager", {"pid_file": str(tmp_path / "pid")},
                  timeout=240)
    pids = [int(p) for p in (tmp_path / "pid.0").read_text().split()]
    assert len(pids) == 2, pids  # the Manager's server and the resource tracker
    # ... gone once the launcher returns (a zombie is dead, waiting for init to reap it)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(psutil.Process(p).cmdline()) for p in alive]
