"""The merge diagnostic (issue 16, item 3; ``--diloco-merge-diagnostic``) on a hand-built
2-replica case: plain DiLoCo (N = 1), H = 2, one sync after the second inner step.

The three numbers are checked against an independent reference computed here in plain PyTorch:

* the replicas' local weights at the sync are those of the same run without a sync in its first
  two steps (``--diloco-local-steps 100``: the inner steps do not depend on the outer loop);
* the plain merge is θ(0) + mean_k(θ_k − θ(0)) and the outer step is torch.optim.SGD's first
  Nesterov step from θ(0) with pseudo-gradient −Δ̄: θ(1) = θ(0) + lr (1 + μ) Δ̄;
* each loss is the model's plain forward (``model(tokens, position_ids, None, labels=...)``) on the
  probe batches with those weights loaded, masked mean per micro-batch, mean over micro-batches
  and over replicas — not the trainer's pipeline schedule.
"""
import pytest
import torch

from tests.harness import run_ranks

ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--lr", "1e-2", "--train-iters", "2", "--mock-data", "--vocab-size", "128",
        "--eval-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr-warmup-iters", "0",
        "--diloco-outer-lr", "0.7", "--diloco-outer-momentum", "0.9"]


def _worker(rank, world_size):
    import torch.distributed as dist

    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.loop import Trainer

    def weights(tr):
        return {k: v.detach().clone() for k, v in tr.model.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}

    # Reference local weights: two inner steps without any sync.
    ref = Trainer.from_args(parse_args(ARGV + ["--diloco-local-steps", "100"]))
    theta0 = weights(ref)
    for _ in range(2):
        ref.train_step()
    local = weights(ref)

    tr = Trainer.from_args(parse_args(ARGV + ["--diloco-local-steps", "2", "--diloco-merge-diagnostic"]))
    assert all(torch.equal(v, theta0[k]) for k, v in weights(tr).items())  # same initialisation
    seen = []
    hook = tr.model.register_forward_pre_hook(
        lambda m, a: None if torch.is_grad_enabled() else seen.append(weights(tr)))
    for _ in range(2):
        tr.train_step()
    hook.remove()
    report = tr.sync.totals.last
    m = report.merge

    # Independent reference: the merge and the first Nesterov step, by hand.
    mean_delta = {}
    for k, v in local.items():
        every = [torch.empty_like(v) for _ in range(world_size)]
        dist.all_gather(every, v)
        mean_delta[k] = sum(e.double() - theta0[k].double() for e in every) / world_size
    plain = {k: (theta0[k].double() + d).float() for k, d in mean_delta.items()}
    outer = {k: (theta0[k].double() + 0.7 * 1.9 * d).float() for k, d in mean_delta.items()}

    def loss_of(w):
        tr.model.load_state_dict({**tr.model.state_dict(), **w})
        tr.model.eval()
        with torch.no_grad():
            per_batch = []
            for b in tr.probe_batches:
                out = tr.model(b["tokens"], b["position_ids"], None, labels=b["labels"])
                mask = b["loss_mask"].float()
                per_batch.append(float((out.float() * mask).sum() / mask.sum()))
        t = torch.tensor([sum(per_batch) / len(per_batch)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / world_size

    return {"diag": {"local": m.local, "plain": m.plain_merge, "outer": m.outer_step, "gain": m.gain},
            "ref": {"local": loss_of(local), "plain": loss_of(plain), "outer": loss_of(outer)},
            "probe_weights_vs_ref": [max(float((s[k] - w[k]).abs().max()) for k in w)
                                     for s, w in zip(seen, (local, plain, outer))],
            "num_probes": len(seen) // max(1, len(tr.probe_batches)),
            "trace": tr.merge_trace, "report": [report.applied_step, report.fragment],
            "replicas_differ": any(not torch.equal(local[k], theta0[k]) for k in local)}


@pytest.mark.timeout(600)
def test_merge_diagnostic_numbers_match_a_hand_built_two_replica_case():
    res = run_ranks(2, "tests.test_merge_diagnostic:_worker", {})
    for r in res:
        assert r["replicas_differ"]
        assert r["num_probes"] == 3, r  # local, plain merge, outer step: one probe pass each
        for got, want in zip(r["probe_weights_vs_ref"], (0.0, 1e-6, 1e-6)):
            assert got <= want, r["probe_weights_vs_ref"]  # the probes scored exactly those weights
        for key in ("local", "plain", "outer"):
            assert r["diag"][key] == pytest.approx(r["ref"][key], rel=1e-5, abs=1e-6), (key, r)
        assert r["diag"]["gain"] == pytest.approx(r["ref"]["local"] - r["ref"]["outer"], abs=1e-5)
        # Trainer.merge_trace: one entry for the one sync (after inner step 2, fragment 0), those numbers
        assert r["report"] == [2, 0] and r["trace"] == [
            {"iteration": 2, "fragment": 0, "local": r["diag"]["local"], "plain_merge": r["diag"]["plain"],
             "outer_step": r["diag"]["outer"], "gain": r["diag"]["gain"]}], r["trace"]
    assert res[0]["diag"] == res[1]["diag"]  # the same numbers on every replica
    # the outer step (lr 0.7 x 1.9 = 1.33 x the mean delta) moved the model past the plain merge
    assert res[0]["diag"]["outer"] != res[0]["diag"]["plain"]
