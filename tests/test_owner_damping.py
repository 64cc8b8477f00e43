"""The single-owner remedy ``--diloco-owner-damping γ`` (issue 16, item 4): the averaged outer delta
of an element trained by m < K replicas is scaled by (m / K)^γ.

Hand-built case: K = 2 replicas, PPU 1/2 MLPs (every MLP slice has m = 1 owner, everything else
m = 2), H = 1: one sync after the first inner step. The reference is plain PyTorch: the replicas'
local weights come from the same run without a sync (``--diloco-local-steps 100``), and the outer
step is torch.optim.SGD's first Nesterov step from θ(0) with pseudo-gradient −Δ̄,
θ(1) = θ(0) + lr (1 + μ) Δ̄, Δ̄ = Σ_k (θ_k − θ(0)) / m · (m / K)^γ.
"""
import pytest
import torch

from tests.harness import run_ranks

ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--lr", "1e-2", "--train-iters", "1", "--mock-data", "--vocab-size", "128",
        "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr-warmup-iters", "0",
        "--ppu-slices", "2", "--diloco-outer-lr", "0.5", "--diloco-outer-momentum", "0.9"]


def _worker(rank, world_size, gamma):
    import torch.distributed as dist

    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.loop import Trainer

    def weights(tr):
        return {k: v.detach().clone() for k, v in tr.model.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}

    ref = Trainer.from_args(parse_args(ARGV + ["--diloco-local-steps", "100"]))
    theta0 = weights(ref)
    ref.train_step()
    local = weights(ref)
    tr = Trainer.from_args(parse_args(ARGV + ["--diloco-local-steps", "1", "--diloco-owner-damping", str(gamma)]))
    tr.train_step()
    got = weights(tr)
    K = world_size
    worst, sliced_moved = 0.0, False
    for k, v in local.items():
        every = [torch.empty_like(v) for _ in range(K)]
        dist.all_gather(every, v)
        m = tr.plan.params[k].owners
        delta = sum(e.double() - theta0[k].double() for e in every) / m * (m / K) ** gamma
        want = (theta0[k].double() + 0.5 * 1.9 * delta).float()
        worst = max(worst, float((got[k] - want).abs().max()))
        sliced_moved |= m < K and bool((got[k] != theta0[k]).any())
    return {"worst": worst, "sliced_moved": sliced_moved,
            "sliced": sorted(k for k in local if tr.plan.params[k].owners < K)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_owner_damping_scales_the_outer_step_of_few_owner_elements(gamma):
    res = run_ranks(2, "tests.test_owner_damping:_worker", {"gamma": gamma})
    for r in res:
        assert r["sliced"] and all("mlp" in k for k in r["sliced"]), r["sliced"]  # the MLP slices have m = 1
        assert r["sliced_moved"]
        assert r["worst"] <= 1e-6, r
