"""Delayed outer syncs (issue 15 item 1): τ = --diloco-sync-delay, α = --diloco-merge-alpha.

* a constant-delta case, τ = 1, α = 0.5, derived by hand (semantics: docs/overlap.md);
* the library against a plain-PyTorch Algorithm 1 with delay and merge (GPT, PPU 1/2, F = 2);
* the overlap is real: a rank whose launch is late by 1 s does not hold up the other's launch,
  the wait absorbs it, and the main thread's collectives meanwhile do not mix with it;
* a non-finite Δ of a delayed sync skips its outer step on every replica (int8, error feedback);
* distributed optimizer + bf16 + inner DP: the merge lands exactly in the fp32 shard masters;
* a schedule that needs two fragments in flight is refused.
"""
import time

import pytest
import torch

from megatron_ppu.config import DiLoCoConfig, validate_diloco_config
from tests.harness import run_ranks


# --------------------------------------------------------------- hand-derived constant deltas
def _hand_delayed_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.sync.diloco import DiLoCoSync, StaticReplicas

    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    plan = build_ownership_plan(model, num_replicas=world_size, num_slices=1, replica_index=rank)
    cfg = DiLoCoConfig(local_steps=2, outer_lr=0.5, outer_momentum=0.9, num_replicas=world_size,
                       sync_delay=1, merge_alpha=0.5)
    loop = DiLoCoSync(model, plan, StaticReplicas(dist.group.WORLD), cfg)
    local, snap, reports = [], [], []
    for _ in range(5):
        with torch.no_grad():  # every inner step: replica 0 moves by +0.05, replica 1 by +0.15
            model.weight.add_(0.05 if rank == 0 else 0.15)
        reports.append([(r.step, r.applied_step, r.skipped) for r in loop.after_inner_step()])
        local.append(float(model.weight[0, 0]))
        snap.append(float(loop.fragments[0].snapshot[0][0, 0]))
    final = [(r.step, r.applied_step) for r in loop.finish()]
    return {"local": local, "snap": snap, "reports": reports, "final": final,
            "final_value": float(model.weight[0, 0]), "uniform": bool((model.weight == model.weight[0, 0]).all())}


@pytest.mark.timeout(300)
def test_delayed_sync_with_merge_by_hand():
    res = run_ranks(2, "tests.test_sync_overlap:_hand_delayed_worker", timeout=240)
    # H = 2, τ = 1, α = 0.5, lr 0.5, μ 0.9 (torch SGD: buf_1 = g_1); x_k local, θ the snapshot.
    # s=2: x = 1.1 / 1.3, launch with mean Δ = 0.2 (θ = 1 until the wait).
    # s=3: x = 1.15 / 1.45; wait: g = -0.2, buf = -0.2, θ = 1 + 0.5 (0.2 + 0.18) = 1.19;
    #      merge x = 1.19 + 0.5 (x - 1.19) = 1.17 / 1.32.
    # s=4: x = 1.22 / 1.47, launch with Δ = 0.03 / 0.28, mean 0.155.
    # s=5: x = 1.27 / 1.62; wait: g = -0.155, buf = -0.18 - 0.155 = -0.335,
    #      θ = 1.19 + 0.5 (0.155 + 0.3015) = 1.41825; merge x = 1.344125 / 1.519125.
    # finish: α > 0 keeps local progress, so a final (synchronous) sync: Δ = -0.074125 / 0.100875,
    #      mean 0.013375, buf = -0.3015 - 0.013375 = -0.314875,
    #      θ = 1.41825 + 0.5 (0.013375 + 0.2833875) = 1.56663125 on both replicas.
    want_local = {0: [1.05, 1.1, 1.17, 1.22, 1.344125], 1: [1.15, 1.3, 1.32, 1.47, 1.519125]}
    want_snap = [1.0, 1.0, 1.19, 1.19, 1.41825]
    for rank, r in enumerate(res):
        assert r["local"] == pytest.approx(want_local[rank], abs=1e-6), r["local"]
        assert r["snap"] == pytest.approx(want_snap, abs=1e-6), r["snap"]
        assert r["reports"] == [[], [], [(2, 3, False)], [], [(4, 5, False)]], r["reports"]
        assert r["final"] == [(5, 5)]
        assert r["uniform"] and r["final_value"] == pytest.approx(1.56663125, abs=1e-6)
    assert res[0]["final_value"] == res[1]["final_value"]


# ------------------------------------------- plain-PyTorch Algorithm 1 with delay and merge (GPT)
def _reference_delayed(cfg, K, N, H, F, steps, lr, wd, outer_lr, mu, tau, alpha, seed):
    """K replicas in one process, plain torch: masked AdamW inner steps; fragment f's Δ is taken
    after step s (s mod H = offset_f), the count-normalised mean gives θ(t+1) by torch-semantics
    Nesterov SGD, applied after step s + τ: the trained elements of replica k become
    lerp(θ(t+1), x_k, α), every other element θ(t+1). At the end: the in-flight sync is applied,
    then every fragment with steps since its last sync (or just merged with α > 0) gets one
    synchronous outer step."""
    from tests import gpt_utils as G
    from tests.test_diloco import _ref_fragments, _ref_owned_mask, _reference_inner_step

    model = G.build_gpt(cfg, None, seed=seed)
    names = [n for n, _ in model.named_parameters()]
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = [{n: _ref_owned_mask(n, theta0[n].shape, k % N, N, cfg) for n in names} for k in range(K)]
    count = {n: sum(masks[k][n].to(torch.float32) for k in range(K)) for n in names}
    reps = []
    for k in range(K):
        params = {n: theta0[n].clone().requires_grad_(True) for n in names}
        groups = [{"params": [params[n] for n in names if not (params[n].dim() == 1 or n.endswith(".bias"))],
                   "weight_decay": wd},
                  {"params": [params[n] for n in names if params[n].dim() == 1 or n.endswith(".bias")],
                   "weight_decay": 0.0}]
        reps.append((params, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)))
    frags = _ref_fragments(names, F)
    snaps = [{n: theta0[n].clone() for n in fr} for fr in frags]
    bufs = [dict() for _ in frags]
    last_sync = [0 for _ in frags]
    pending = None  # (fragment, due step, launch step, averaged deltas)

    def outer_step(f, deltas):
        for n in frags[f]:
            g = -deltas[n]
            bufs[f][n] = g.clone() if n not in bufs[f] else mu * bufs[f][n] + g
            snaps[f][n] = snaps[f][n] - outer_lr * (g + mu * bufs[f][n])

    def averaged(f):
        return {n: sum((reps[k][0][n].detach() - snaps[f][n]) * masks[k][n] for k in range(K)) / count[n]
                for n in frags[f]}

    def apply_delayed(f, deltas, s):
        outer_step(f, deltas)
        for k, (params, _) in enumerate(reps):
            with torch.no_grad():
                for n in frags[f]:
                    params[n].copy_(torch.where(masks[k][n], torch.lerp(snaps[f][n], params[n], alpha), snaps[f][n]))
        return s if alpha == 0 else None

    for s in range(1, steps + 1):
        _reference_inner_step(model, reps, masks, s)
        for launch in (False, True, False):  # wait, launch, and with τ = 0 apply at once (Algorithm 1)
            if not launch and pending is not None and pending[1] == s:
                f, _, launched, d = pending
                pending = None
                at = apply_delayed(f, d, s)
                last_sync[f] = launched if at is None else at
            for f in range(len(frags)) if launch else ():
                if s % H == ((f + 1) * H // len(frags)) % H:
                    assert pending is None
                    pending = (f, s + tau, s, averaged(f))
    merged = None
    if pending is not None:  # end of training: the sync in flight is applied now
        f, _, launched, d = pending
        at = apply_delayed(f, d, steps)
        last_sync[f] = launched if at is None else at
        merged = f if alpha > 0 else None  # its merged values differ between replicas: a final sync
    for f in range(len(frags)):
        if last_sync[f] < steps or f == merged:
            outer_step(f, averaged(f))
            for params, _ in reps:
                with torch.no_grad():
                    for n in frags[f]:
                        params[n].copy_(snaps[f][n])
    return [{n: p.detach() for n, p in params.items()} for params, _ in reps]


def _delayed_algo1_worker(rank, world_size, scenarios):
    from megatron_ppu.parallel import build_replica_layout
    from tests import gpt_utils as G

    G.init_parallel()
    layout = build_replica_layout(world_size)
    K = world_size
    out = []
    for sc in scenarios:
        N, F, H, steps, tau, alpha = sc["N"], sc["F"], sc["H"], sc["steps"], sc["tau"], sc["alpha"]
        lr, wd, outer_lr, mu = 3e-3, 0.1, 0.7, 0.9
        r = G.DiLoCoRank(layout, DiLoCoConfig(H, outer_lr, mu, True, K, F, sync_delay=tau, merge_alpha=alpha), N=N)
        cfg = r.cfg
        for s in range(1, steps + 1):
            r.inner_step(s)
            r.loop.after_inner_step()
        r.loop.finish()
        everyone = r.replica_states()
        if rank == 0:
            ref = _reference_delayed(cfg, K, N, H, F, steps, lr, wd, outer_lr, mu, tau, alpha, seed=11)
            worst = max(float((everyone[k][n] - want).abs().max()) for k in range(K) for n, want in ref[k].items())
            same = all(torch.equal(everyone[0][n], everyone[k][n]) for k in range(K) for n in everyone[0])
            # the same reference without the delay: the delay must matter (else the test proves nothing)
            plain = _reference_delayed(cfg, K, N, H, F, steps, lr, wd, outer_lr, mu, 0, 0.0, seed=11)
            gap = max(float((plain[0][n] - want).abs().max()) for n, want in ref[0].items())
            out.append({**sc, "max_abs_diff": worst, "identical": same, "delay_effect": gap})
    return out


@pytest.mark.timeout(900)
def test_delayed_merge_matches_plain_pytorch_algorithm1():
    scenarios = [dict(N=2, F=2, H=4, steps=8, tau=1, alpha=0.5), dict(N=1, F=1, H=3, steps=7, tau=2, alpha=0.0)]
    res = run_ranks(2, "tests.test_sync_overlap:_delayed_algo1_worker", {"scenarios": scenarios}, timeout=800)[0]
    for r in res:
        assert r["identical"], r
        assert r["delay_effect"] > 1e-3, r
        assert r["max_abs_diff"] < 1e-4, r  # same tolerance as test_diloco's Algorithm 1 check


# ------------------------------------------------------------------- the overlap is real
def _overlap_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.sync.diloco import DiLoCoSync, StaticReplicas

    # on a GPU (scripts/gpu_check.sh) the payload is a CUDA tensor: the worker's own stream is used
    model = torch.nn.Linear(64, 64, bias=False).to("cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        model.weight.fill_(1.0)
    plan = build_ownership_plan(model, num_replicas=world_size, num_slices=1, replica_index=rank)
    cfg = DiLoCoConfig(local_steps=2, outer_lr=0.5, outer_momentum=0.9, num_replicas=world_size, sync_delay=1)
    loop = DiLoCoSync(model, plan, StaticReplicas(dist.group.WORLD), cfg)
    dist.barrier()
    with torch.no_grad():
        model.weight.add_(0.1 * (rank + 1))
    loop.after_inner_step()  # step 1: nothing due
    with torch.no_grad():
        model.weight.add_(0.1 * (rank + 1))
    if rank == 1:
        time.sleep(1.0)  # the slow rank launches 1 s late
    t0 = time.perf_counter()
    launched = loop.after_inner_step()  # step 2: launch
    launch_s = time.perf_counter() - t0
    in_flight = loop._in_flight is not None
    t0 = time.perf_counter()
    applied = loop.after_inner_step()  # step 3: wait + apply
    wait_s = time.perf_counter() - t0
    # Second round: while the reduction runs on the worker, the main thread runs its own collective
    # on the default group; with shared groups the two would mix (wrong sums or a hang).
    with torch.no_grad():
        model.weight.add_(0.1 * (rank + 1))
    loop.after_inner_step()  # step 4: launch
    main_sum = torch.full((1000,), float(rank + 1))
    dist.all_reduce(main_sum)
    applied2 = loop.after_inner_step()  # step 5: apply
    return {"launch_s": launch_s, "wait_s": wait_s, "launched": launched, "in_flight": in_flight,
            "applied": [(r.step, r.applied_step) for r in applied + applied2],
            "main_sum_ok": bool((main_sum == 3.0).all()), "weight": model.weight.detach().cpu().clone(),
            "side_stream": loop.delayed.stream is not None, "cuda": torch.cuda.is_available(), "stats": loop.stats()}


@pytest.mark.timeout(300)
def test_delayed_launch_overlaps_and_the_wait_absorbs_a_slow_rank():
    res = run_ranks(2, "tests.test_sync_overlap:_overlap_worker", timeout=240)
    fast = res[0]
    assert fast["launched"] == [] and fast["in_flight"]
    assert fast["launch_s"] < 0.5, fast["launch_s"]  # did not wait for the slow rank (1 s late)
    assert fast["wait_s"] > 0.5, fast["wait_s"]  # the wait absorbed the delay
    for r in res:
        assert r["applied"] == [(2, 3), (4, 5)], r["applied"]
        assert r["main_sum_ok"]
    assert torch.equal(res[0]["weight"], res[1]["weight"])  # α = 0: both take θ(t+1)
    assert all(r["side_stream"] == r["cuda"] for r in res)  # CUDA payload: the worker's own stream
    # The counters: the fast rank's first background reduction could only finish once the slow rank
    # joined (1 s later), so it ran >= 0.5 s; its wait lies inside that interval; the slow rank found
    # its peer waiting, so its reductions were quicker.
    fs, ss = fast["stats"], res[1]["stats"]
    assert fs["comm_background_s"] > 0.5, fs
    assert fs["comm_wait_s"] <= fs["comm_background_s"] + 0.05, fs
    assert ss["comm_background_s"] < fs["comm_background_s"], (ss, fs)


def _delayed_nan_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.sync.diloco import DiLoCoSync, StaticReplicas

    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    plan = build_ownership_plan(model, num_replicas=world_size, num_slices=1, replica_index=rank)
    cfg = DiLoCoConfig(local_steps=2, outer_lr=0.5, outer_momentum=0.9, num_replicas=world_size,
                       sync_delay=1, merge_alpha=0.5, allreduce_dtype="int8", error_feedback=True)
    loop = DiLoCoSync(model, plan, StaticReplicas(dist.group.WORLD), cfg)
    seen = []
    for s in range(1, 6):
        with torch.no_grad():
            model.weight.add_(0.1)
            if s == 2 and rank == 1:
                model.weight[0, 0] = float("nan")  # replica 1's Δ of the sync launched after step 2
        seen.append([(r.step, r.applied_step, r.skipped) for r in loop.after_inner_step()])
        if s == 3:
            at_skip = model.weight.detach().clone()
    return {"reports": seen, "at_skip": at_skip, "final": model.weight.detach().clone()}


@pytest.mark.timeout(300)
def test_delayed_nonfinite_delta_skips_on_every_replica():
    res = run_ranks(2, "tests.test_sync_overlap:_delayed_nan_worker", timeout=240)
    for r in res:
        assert r["reports"] == [[], [], [(2, 3, True)], [], [(4, 5, False)]], r["reports"]
        assert torch.equal(r["at_skip"], torch.ones(2, 2))  # θ(t) restored, the τ local steps dropped
        assert bool(torch.isfinite(r["final"]).all())


# ------------------------------------------------------------------- schedule errors
@pytest.mark.timeout(30)
@pytest.mark.parametrize("cfg,needle", [
    # F = 2, H = 4: fragments sync at steps 2 and 4, a gap of 2; τ = 2 keeps two in flight
    (DiLoCoConfig(local_steps=4, streaming_fragments=2, sync_delay=2), r"--diloco-sync-delay 2 would keep two"),
    # F = 3, H = 8: offsets 2, 5, 0 -> smallest gap 2
    (DiLoCoConfig(local_steps=8, streaming_fragments=3, sync_delay=2), r"--diloco-sync-delay < 2"),
    (DiLoCoConfig(local_steps=4, sync_delay=4), r"--diloco-sync-delay < 4"),
    (DiLoCoConfig(local_steps=4, merge_alpha=0.5), r"--diloco-sync-delay > 0"),
])
def test_schedule_needing_two_fragments_in_flight_is_refused(cfg, needle):
    with pytest.raises(ValueError, match=needle):
        validate_diloco_config(cfg)
    validate_diloco_config(DiLoCoConfig(local_steps=4, streaming_fragments=2, sync_delay=1))  # gap 2: fine


# --------------------------- distributed optimizer + bf16 + inner DP: the merge on fp32 shard masters
MOCK = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3",
        "--lr-warmup-iters", "2", "--eval-iters", "1", "--log-interval", "100", "--eval-interval", "100"]


def _sharded_merge_worker(rank, world_size, argv):
    import torch.distributed as dist

    from tests.test_outer_correctness import _dist_opt_fp32, _make_trainer

    t = _make_trainer(argv)
    loop = t.sync
    alpha = loop.config.merge_alpha
    checks = []
    orig = loop._complete

    def complete():
        local, _ = _dist_opt_fp32(t)  # this replica's fp32 values before the merge (every element exact)
        r = orig()
        after, _ = _dist_opt_fp32(t)
        frag = loop.fragments[r.fragment]
        snap = {n: s.data for n, s in zip(frag.names, frag.snapshot)}  # θ(t+1)
        params = dict(t.model.named_parameters())
        names = [n for n in frag.names if n in after]
        res = loop.fragments[r.fragment].residual
        rows = [torch.empty_like(res) for _ in range(dist.get_world_size(t.layout.inner_dp_group))]
        dist.all_gather(rows, res.contiguous(), group=t.layout.inner_dp_group)
        checks.append({
            "step": (r.step, r.applied_step), "skipped": r.skipped, "names": len(names),
            # fp32 masters hold lerp(θ(t+1), local, α) exactly; the bf16 weights hold it rounded
            "masters_exact": all(torch.equal(after[n], torch.lerp(snap[n], local[n], alpha)) for n in names),
            "bf16_rounded": all(torch.equal(params[n].detach(), after[n].to(params[n].dtype)) for n in names),
            "moved": max(float((after[n] - snap[n]).abs().max()) for n in names),
            "residual_same_on_inner_dp": all(torch.equal(rows[0], x) for x in rows),
            "residual_nonzero": bool(res.abs().sum() > 0)})
        return r

    loop._complete = complete
    t.train()
    return {"checks": checks}


@pytest.mark.timeout(900)
def test_distributed_optimizer_bf16_merge_writes_fp32_shard_masters():
    argv = MOCK + ["--bf16", "--use-distributed-optimizer", "--diloco-replicas", "2", "--train-iters", "5",
                   "--diloco-local-steps", "2", "--diloco-sync-delay", "1", "--diloco-merge-alpha", "0.5",
                   "--diloco-allreduce-dtype", "int8", "--diloco-error-feedback", "--diloco-quantization-block", "64"]
    res = run_ranks(4, "tests.test_sync_overlap:_sharded_merge_worker", {"argv": argv}, timeout=850)
    for r in res:
        # launched after 2 and 4, applied after 3 and 5 (the second inside the run, not at finish)
        assert [c["step"] for c in r["checks"]] == [(2, 3), (4, 5)], r["checks"]
        for c in r["checks"]:
            assert not c["skipped"] and c["names"] > 0, c
            assert c["masters_exact"] and c["bf16_rounded"], c
            assert c["moved"] > 0, c  # α > 0: the local values differ from θ(t+1)
            assert c["residual_same_on_inner_dp"] and c["residual_nonzero"], c


# ------------------------------------------------ a peer dies while a delayed sync is in flight
def _peer_death_worker(rank, world_size, out):
    """Rank 1 dies (``os._exit``, no cleanup: as a crash) after its inner step 2, before taking part in
    the sync launched at step 2; rank 0 launched it and waits for it at step 3 (τ = 1). Each rank
    writes its own result and leaves without the harness's final barrier."""
    import json
    import os

    import torch.distributed as dist

    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.sync.diloco import DiLoCoSync, StaticReplicas

    model = torch.nn.Linear(64, 64, bias=False)
    plan = build_ownership_plan(model, num_replicas=world_size, num_slices=1, replica_index=rank)
    cfg = DiLoCoConfig(local_steps=2, outer_lr=0.5, outer_momentum=0.9, num_replicas=world_size, sync_delay=1)
    loop = DiLoCoSync(model, plan, StaticReplicas(dist.group.WORLD), cfg)
    res = {"error": None, "step": None, "seconds": None}
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(0.01)
        if rank == 1 and step == 2:
            break
        t0 = time.monotonic()
        try:
            loop.after_inner_step()
        except RuntimeError as e:  # what gloo raises on the background thread, re-raised at the wait
            res = {"error": str(e)[:400], "step": step, "seconds": time.monotonic() - t0}
            break
    with open(os.path.join(out, f"peer{rank}.json"), "w") as f:
        json.dump(res, f)
    os._exit(0)


@pytest.mark.timeout(300)
def test_peer_death_with_sync_in_flight_fails_fast_on_the_survivor(tmp_path):
    """Not a hang until the group timeout (10 min by default): the survivor's wait raises the
    background reduction's error, within seconds, on the training thread."""
    import json
    import sys

    from tests.harness import REPO, run_local_ranks

    cmd = [sys.executable, "-m", "tests.harness_worker", "tests.test_sync_overlap:_peer_death_worker",
           json.dumps({"out": str(tmp_path)}), str(tmp_path)]
    run_local_ranks(cmd, 2, [str(tmp_path / f"rank{r}.log") for r in range(2)], cwd=str(REPO), timeout=240,
                    env={"PYTHONPATH": str(REPO)}, label="peer death")
    r0 = json.loads((tmp_path / "peer0.json").read_text())
    assert r0["step"] == 3, r0  # launched at step 2 (returns at once), raised at the wait after step 3
    assert "closed by peer" in r0["error"].lower() or "connection reset" in r0["error"].lower(), r0
    assert r0["seconds"] < 30, r0
