"""Outer-loop correctness, each against plain PyTorch.

* bf16: a replica's outer delta is exactly 0 off its owned set (PPU slices, blocks plan).
* The last partial round is synchronised: after training every replica holds the one global
  model, equal to the plain-PyTorch Algorithm 1 with a final outer step on pending fragments.
* A non-finite round on one replica is skipped *and* that replica's inner optimizer state is
  reset, so training recovers.
* Distributed optimizer + bf16: the fp32 shard masters hold θ(t+1) exactly after a sync.
"""
import math

import pytest
import torch

from tests.harness import run_ranks
from tests.conftest import MODEL, _dist_opt_fp32, _make_trainer, _reference_algorithm1, data_flags


def _owned_mask_ppu(name, shape, n, N, ffn):
    """Independent statement of replica slice n's owned elements (paper §2.2.1, MLP slices, no GLU)."""
    mask = torch.ones(shape, dtype=torch.bool)
    f = ffn // N
    if name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias"):
        mask[:] = False
        mask[n * f:(n + 1) * f] = True
    elif name.endswith("mlp.linear_fc2.weight"):
        mask[:] = False
        mask[:, n * f:(n + 1) * f] = True
    return mask


# ------------------------------------------------------------ bf16: frozen parts' deltas are zero
def _bf16_delta_worker(rank, world_size, argv, case):
    import torch.distributed as dist

    from megatron_ppu.subnet import block_assignment

    t = _make_trainer(argv)
    loop = t.sync
    K = world_size
    captured = []
    for frag in loop.fragments:
        def reduce(deltas, channels, live, f=frag.index, orig=frag.reduce):
            red = orig(deltas, channels, live)
            captured.append((f, [d.clone() for d in deltas], [o.clone() for o in red.averaged]))
            return red

        frag.reduce = reduce
    t.train()
    me = t.layout.replica_index
    names = loop.fragments[0].names
    ffn = 4 * t.args.model.hidden_size
    report = []
    for f, deltas, averaged in captured:
        # every replica's contribution, gathered (plain torch from here on)
        mine = torch.cat([d.reshape(-1) for d in deltas])
        everyone = [torch.empty_like(mine) for _ in range(K)]
        dist.all_gather(everyone, mine, group=t.layout.replica_group)
        per_k = []
        for k in range(K):
            off, dk = 0, {}
            for n, d in zip(names, deltas):
                dk[n] = everyone[k][off:off + d.numel()].view_as(d)
                off += d.numel()
            per_k.append(dk)
        off_owned_max, owned_max, sum_err = 0.0, 0.0, 0.0
        for i, n in enumerate(names):
            if case == "ppu":
                owned = [_owned_mask_ppu(n, deltas[i].shape, k % 2, 2, ffn) for k in range(K)]
            else:  # blocks: replica k holds the layers in held[k], everything outside the blocks
                held = block_assignment(K, t.args.model.num_layers, 0.5, t.args.training.seed)
                if "decoder.layers." in n:
                    layer = int(n.split("decoder.layers.")[1].split(".")[0])
                    owned = [torch.full(deltas[i].shape, layer in held[k]) for k in range(K)]
                else:
                    owned = [torch.ones(deltas[i].shape, dtype=torch.bool) for k in range(K)]
            count = sum(o.float() for o in owned)
            for k in range(K):
                off_owned_max = max(off_owned_max, float(per_k[k][n][~owned[k]].abs().max())
                                    if (~owned[k]).any() else 0.0)
                if owned[k].any():
                    owned_max = max(owned_max, float(per_k[k][n][owned[k]].abs().max()))
            want = sum(per_k[k][n] for k in range(K)) / count.clamp(min=1)
            sum_err = max(sum_err, float((averaged[i] - want).abs().max()))
        report.append({"off_owned_max": off_owned_max, "owned_max": owned_max, "sum_err": sum_err})
    return {"replica": me, "syncs": report}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case,flags", [
    ("ppu", ["--ppu-slices", "2"]),
    ("blocks", ["--subnet-plan", "blocks", "--subnet-coverage", "0.5"]),
], ids=["ppu-half", "blocks-half"])
def test_bf16_nonowners_contribute_exactly_zero(tiny_data, case, flags):
    argv = MODEL + data_flags(tiny_data) + ["--bf16", "--train-iters", "6", "--diloco-local-steps", "2",
                                            "--hidden-dropout", "0", "--attention-dropout", "0"] + flags
    res = run_ranks(2, "tests.test_outer_correctness:_bf16_delta_worker", {"argv": argv, "case": case},
                    timeout=800)
    for r in res:
        assert len(r["syncs"]) == 3, r
        for i, s in enumerate(r["syncs"]):
            assert s["off_owned_max"] == 0.0, (f"sync {i + 1}: replica {r['replica']} contributes "
                                               f"{s['off_owned_max']:.3g} off its owned set")
            assert s["owned_max"] > 1e-5, s  # the owners did train
            assert s["sum_err"] == 0.0, s  # averaged = (sum over replicas) / m, exactly


# ---------------------------------------------------- final sync: the last partial round is synchronised
def _final_sync_worker(rank, world_size, scenarios):
    from megatron_ppu.config import DiLoCoConfig
    from megatron_ppu.parallel import build_replica_layout
    from tests import gpt_utils as G

    G.init_parallel()
    layout = build_replica_layout(world_size)
    K = world_size
    out = []
    for sc in scenarios:
        N, F, H, steps = sc["N"], sc["F"], sc["H"], sc["steps"]
        lr, wd, outer_lr, mu = 3e-3, 0.1, 0.7, 0.9
        r = G.DiLoCoRank(layout, DiLoCoConfig(H, outer_lr, mu, True, K, F), N=N, lr=lr, wd=wd)
        cfg = r.cfg
        for s in range(1, steps + 1):
            r.inner_step(s)
            r.loop.after_inner_step()
        pending = r.loop.finish()
        everyone = r.replica_states()
        if rank == 0:
            ref = _reference_algorithm1(cfg, K, N, H, F, steps, lr, wd, outer_lr, mu, seed=11, final_sync=True)
            worst = max(float((everyone[k][n] - want).abs().max()) for k in range(K) for n, want in ref[k].items())
            same = all(torch.equal(everyone[0][n], everyone[k][n]) for k in range(K) for n in everyone[0])
            out.append({**sc, "max_abs_diff": worst, "identical": same, "final_syncs": len(pending)})
    return out


@pytest.mark.timeout(900)
def test_final_sync_matches_plain_pytorch_algorithm1():
    scenarios = [dict(N=1, F=1, H=4, steps=6), dict(N=2, F=2, H=4, steps=6)]
    res = run_ranks(2, "tests.test_outer_correctness:_final_sync_worker", {"scenarios": scenarios}, timeout=800)[0]
    assert [r["final_syncs"] for r in res] == [1, 1]  # F=1: the round of steps 5-6; F=2: fragment 1 (steps 5-6)
    for r in res:
        assert r["identical"], r
        assert r["max_abs_diff"] < 1e-4, r


def _end_state_worker(rank, world_size, argv):
    import torch.distributed as dist

    t = _make_trainer(argv)
    t.train()
    sd = {k: v.float() for k, v in t.model.state_dict().items() if isinstance(v, torch.Tensor) and "_extra" not in k}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, sd, group=t.layout.replica_group)
    diff = max(float((everyone[0][n] - e[n]).abs().max()) for e in everyone for n in sd)
    return {"max_replica_diff": diff, "syncs": t.sync.stats()["syncs"], "iteration": t.iteration}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flags,iterations", [
    (["--train-iters", "6", "--diloco-streaming-fragments", "1"], 6),
    (["--train-iters", "6", "--diloco-streaming-fragments", "2"], 6),
    # an --exit-interval exit without --save cannot be resumed: it ends the run
    (["--train-iters", "8", "--exit-interval", "5"], 5),
], ids=["F1", "F2", "exit-without-save"])
def test_replicas_hold_one_model_after_training(tiny_data, flags, iterations):
    argv = MODEL + data_flags(tiny_data) + ["--diloco-local-steps", "4", "--ppu-slices", "2"] + flags
    res = run_ranks(2, "tests.test_outer_correctness:_end_state_worker", {"argv": argv}, timeout=800)
    for r in res:
        assert r["iteration"] == iterations
        assert r["max_replica_diff"] == 0.0, r


# --------------------------------------------------------- non-finite rounds: skipped, training recovers
def _nan_worker(rank, world_size, argv, inject_at):
    import torch.distributed as dist

    t = _make_trainer(argv)
    orig = t._forward_step

    def forward_step(data_iterator, model):
        out, loss_func = orig(data_iterator, model)
        if t.layout.replica_index == 1 and t.iteration == inject_at:
            def poisoned(o):
                loss, d = loss_func(o)
                return loss * float("nan"), {k: v * float("nan") for k, v in d.items()}
            return out, poisoned
        return out, loss_func

    t._forward_step = forward_step
    skipped = []
    orig_sync = t.sync.sync

    def sync(f):
        r = orig_sync(f)
        skipped.append((r.step, r.skipped))
        return r

    t.sync.sync = sync
    t.train()
    state_finite = all(bool(torch.isfinite(v).all()) for opt in t.optimizer.chained_optimizers
                       for st in opt.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    params_finite = all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    return {"losses": list(t.losses), "syncs": skipped, "state_finite": state_finite, "params_finite": params_finite,
            "logger": dist.get_rank() == world_size - 1}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flags,inject_at,want_syncs,nan_losses", [
    # F = 1: replica 1's loss is NaN at iteration 2, its round (iterations 2-3) is skipped.
    (["--train-iters", "9", "--diloco-local-steps", "3"], 1, [(3, True), (6, False), (9, False)], (1, 3)),
    # F = 2: NaN at iteration 1 poisons both fragments; fragment 0's sync at 2 is skipped and the
    # poisoned replica also returns fragment 1 (not due yet) to its last synchronised values.
    (["--train-iters", "8", "--diloco-local-steps", "4", "--diloco-streaming-fragments", "2"], 0,
     [(2, True), (4, False), (6, False), (8, False), (8, False)], (0, 2)),  # last: fragment 0's final sync
], ids=["F1", "F2"])
def test_nan_on_one_replica_is_skipped_and_training_recovers(tiny_data, flags, inject_at, want_syncs, nan_losses):
    argv = MODEL + data_flags(tiny_data) + ["--ppu-slices", "2"] + flags
    res = run_ranks(2, "tests.test_outer_correctness:_nan_worker", {"argv": argv, "inject_at": inject_at},
                    timeout=800)
    for r in res:
        assert r["syncs"] == want_syncs, r["syncs"]
        assert r["state_finite"] and r["params_finite"], r
    losses = next(r for r in res if r["logger"])["losses"]  # the logger rank is replica 1's
    a, b = nan_losses
    assert all(math.isnan(x) for x in losses[a:b]), losses  # the poisoned replica's round
    assert all(math.isfinite(x) for x in losses[b:]), losses  # recovered after the skipped sync


# ------------------------------------------- distributed optimizer + bf16 under DiLoCo
def _dist_opt_worker(rank, world_size, argv):
    import torch.distributed as dist

    t = _make_trainer(argv)
    loop, K = t.sync, t.layout.num_replicas
    cfg = loop.config
    theta, _ = _dist_opt_fp32(t)  # θ(0)
    ref = {n: torch.nn.Parameter(v.clone(), requires_grad=False) for n, v in theta.items()}
    sgd = torch.optim.SGD(list(ref.values()), lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=True)
    checks = []
    orig_sync = loop.sync

    def sync(f):
        local, _ = _dist_opt_fp32(t)  # this replica's fp32 values θ_k(t, H)
        everyone = [None] * K
        dist.all_gather_object(everyone, local, group=t.layout.replica_group)
        me = t.layout.replica_index
        for n, p in ref.items():
            if n.endswith("_owned"):  # PPU 1/2, K = 2: this replica's slice, its only owner (m = K/N = 1)
                p.grad = -(everyone[me][n] - p.data)
            else:  # trained by every replica: m = K
                p.grad = -(sum(e[n] - p.data for e in everyone) / K)
        sgd.step()
        r = orig_sync(f)
        _, by_id = _dist_opt_fp32(t)
        worst, exact = 0.0, True
        params = dict(t.model.named_parameters())
        for n, p in ref.items():
            if id(params[n]) not in by_id:
                continue
            m, s, e = by_id[id(params[n])]
            want = p.data.reshape(-1)[s:e]
            exact &= torch.equal(m.detach(), want)
            worst = max(worst, float((m.detach() - want).abs().max()))
        checks.append({"step": r.step, "exact": exact, "max_diff": worst})
        return r

    loop.sync = sync
    t.train()
    return {"checks": checks}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("slices", ["1", "2"], ids=["diloco", "ppu-half"])
def test_distributed_optimizer_bf16_masters_hold_exact_outer_step(tiny_data, slices):
    argv = MODEL + data_flags(tiny_data) + ["--bf16", "--use-distributed-optimizer", "--diloco-replicas", "2",
                                            "--train-iters", "4", "--diloco-local-steps", "2",
                                            "--micro-batch-size", "2", "--ppu-slices", slices]
    res = run_ranks(4, "tests.test_outer_correctness:_dist_opt_worker", {"argv": argv}, timeout=850)
    for r in res:
        assert [c["step"] for c in r["checks"]] == [2, 4], r
        for c in r["checks"]:
            assert c["exact"], c
