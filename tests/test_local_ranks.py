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
