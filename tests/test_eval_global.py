"""Evaluation scores the global model (issue 16, item 1): each fragment's latest synchronised θ(t),
the same on every replica, not the replicas' local weights mid-round; ``--diloco-eval-model local``
keeps the local-model evaluation for studies."""
import pytest
import torch

from tests.harness import run_ranks

ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--lr", "3e-3", "--train-iters", "5", "--mock-data", "--vocab-size", "128",
        "--eval-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--diloco-local-steps", "4", "--diloco-streaming-fragments", "2"]


def _worker(rank, world_size, extra):
    import torch.distributed as dist

    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.loop import Trainer

    tr = Trainer.from_args(parse_args(ARGV + extra))
    full = lambda: {k: v.detach().clone() for k, v in tr.model.state_dict().items()  # noqa: E731
                    if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    # Independent reference of "the latest θ(t)": per parameter, its value at the last step after
    # which every replica held the same value (a sync makes them agree; inner steps make them differ).
    latest = full()
    for _ in range(5):
        tr.train_step()
        now = full()
        for k, v in now.items():
            every = [torch.empty_like(v) for _ in range(world_size)]
            dist.all_gather(every, v)
            if all(torch.equal(e, every[0]) for e in every):
                latest[k] = v.clone()
    local = full()
    seen = {}
    hook = tr.model.register_forward_pre_hook(lambda m, a: (seen.setdefault("w", full()), None)[1])
    result = tr.evaluate()
    hook.remove()
    return {"seen": seen["w"], "latest": latest, "local": local, "after": full(), "result": result}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["global", "local"])
def test_evaluation_scores_the_global_model(mode):
    res = run_ranks(2, "tests.test_eval_global:_worker",
                    {"extra": [] if mode == "global" else ["--diloco-eval-model", "local"]})
    for r in res:
        assert r["result"]["model"] == mode
        for k, v in r["after"].items():  # the local weights are back, bit for bit
            assert torch.equal(v, r["local"][k]), k
        expected = r["latest"] if mode == "global" else r["local"]
        for k, v in r["seen"].items():
            assert torch.equal(v, expected[k]), k
    # Mid-round (step 5: fragment 0 last synced at 2, fragment 1 at 4) the local weights differ
    # from the global model, and every replica evaluates the same global model.
    assert any(not torch.equal(res[0]["local"][k], res[0]["latest"][k]) for k in res[0]["local"])
    if mode == "global":
        for k in res[0]["seen"]:
            assert torch.equal(res[0]["seen"][k], res[1]["seen"][k]), k
        assert res[0]["result"]["loss"] == res[1]["result"]["loss"]
