"""Per-step subnetwork data parallelism (SDP) with Megatron's distributed optimizer: every rank
clips by the same norm, the plain-torch norm of the synchronised gradient."""
import pytest

from tests.conftest import TINY, _make_trainer
from tests.harness import run_ranks


def _sdp_norm_worker(rank, world_size, argv):
    import torch
    import torch.distributed as dist

    t = _make_trainer(argv)
    # This rank's micro-batches of the first step (the stream is rewound afterwards).
    consumed = t.batches.consumed_samples
    batches = t.batches.next_step(t.num_microbatches)
    t.batches.consumed_samples = consumed
    # Plain torch: this rank's gradient of the mean micro-batch loss, by autograd.grad.
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    params = [p for _, p in t.model.named_parameters() if p.requires_grad]
    local = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in batches:
        out = t.model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        mask = b["loss_mask"].float()
        loss = (out.float() * mask).sum() / mask.sum().clamp(min=1)
        for acc, g in zip(local, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g.double() / len(batches))
    flat = torch.cat([g.flatten() for g in local])
    dist.all_reduce(flat)  # every parameter is held by every replica: the SDP gradient is the world mean
    flat /= world_size
    ref = float(flat.norm())
    stats = t.train_step()
    return {"grad_norm": stats["grad_norm"], "ref": ref, "names": names,
            "replica": t.layout.replica_index, "inner_rank": t.layout.inner_dp_rank}


@pytest.mark.timeout(900)
def test_sdp_with_distributed_optimizer_clips_by_one_global_norm(tmp_path):
    argv = TINY + ["--diloco-replicas", "2", "--subnet-sync", "step", "--use-distributed-optimizer",
                   "--global-batch-size", "16", "--train-iters", "1", "--clip-grad", "0.01",
                   "--data-cache-path", str(tmp_path / "cache")]
    res = run_ranks(4, "tests.test_sdp_distributed_optimizer:_sdp_norm_worker", {"argv": argv}, timeout=800)
    assert sorted((r["replica"], r["inner_rank"]) for r in res) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r["ref"] for r in res}) == 1
    norms = [r["grad_norm"] for r in res]
    assert len(set(norms)) == 1, norms  # every rank clips by the same factor
    assert norms[0] == pytest.approx(res[0]["ref"], rel=1e-5)
