"""Resuming with another learning-rate schedule is a clear error (not megatron-core's bare AssertionError),
and Megatron-LM's two ways out (--override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler) work."""
import pytest

from tests.harness import RankFailure, run_ranks

ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "4", "--mock-data", "--vocab-size", "128",
        "--eval-iters", "1", "--diloco-local-steps", "0"]


def _worker(rank, world_size, runs):
    from megatron_ppu.training.loop import run

    out = []
    for argv in runs:
        t = run(argv)
        out.append(t.optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.timeout(600)
def test_resume_with_another_schedule_names_the_flags(tmp_path):
    ck = ["--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck")]
    run_ranks(1, "tests.test_resume_errors:_worker",
              {"runs": [ARGV + ck + ["--lr", "1e-3", "--exit-interval", "2"]]})
    with pytest.raises(RankFailure) as e:
        run_ranks(1, "tests.test_resume_errors:_worker", {"runs": [ARGV + ck + ["--lr", "2e-3"]]})
    msg = str(e.value)
    assert "learning-rate schedule of this run differs" in msg and "--override-opt_param-scheduler" in msg
    assert "CheckpointError" in msg
    # Megatron-LM's override: this run's schedule (Megatron's default linear decay from 2e-3 to 0 over the
    # 4 iterations, no warm-up): after 3 steps lr = 2e-3 x (1 - 3/4).
    lrs = run_ranks(1, "tests.test_resume_errors:_worker",
                    {"runs": [ARGV + ck + ["--lr", "2e-3", "--override-opt_param-scheduler", "--exit-interval", "3"]]})
    assert lrs[0][0] == pytest.approx(2e-3 * (1 - 3 / 4))
