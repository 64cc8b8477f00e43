"""Compressed outer payloads through DiLoCo (issue 15 items 2-4), against plain-PyTorch references.

* int8 / fp8: the applied outer step equals the fp32 one within the quantization bound, computed
  here per block from every replica's Δ; the bytes handed are the hand-counted packed chunks;
* error feedback: with a constant Δ the cumulative error of R rounds stays within one round's
  bound, while without it it grows R-fold;
* a non-finite Δ on one replica still skips the outer step on every replica (and keeps the residual);
* checkpoint/resume is bit-exact with a delayed sync in flight at the save and with error
  feedback, the run killed with SIGKILL after the save.
"""
import json
import math
import os
import signal

import pytest
import torch

from tests.harness import RankFailure, run_ranks

LR, MU, BLOCK = 0.5, 0.9, 64
QMAX = {"int8": 127.0, "fp8": 448.0}


def _model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Linear(37, 11)  # 418 values: several blocks of 64, a padded tail
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def _delta(rank, shapes):
    """Replica ``rank``'s Δ, with magnitudes that differ by block (so block scales matter)."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for shape in shapes:
        d = torch.randn(shape, generator=g)
        scale = torch.logspace(-2, 0, d.numel()).view(shape)
        out.append(d * scale)
    return out


def _block_bound(per_rank, kind):
    """Per-element bound of |Σ_k Δ_k (quantized reduction) − Σ_k Δ_k| (flat, in the payload's order):
    each replica's quantization of its block plus the re-quantization of the summed block
    (int8: half a step, absmax/254; fp8 e4m3: half an ulp, |x|·2⁻⁴ ≤ absmax/16)."""
    n = per_rank[0].numel()
    nb = -(-n // BLOCK)
    pad = nb * BLOCK - n

    def amax(x):
        return torch.nn.functional.pad(x.abs(), (0, pad)).view(nb, BLOCK).amax(dim=1)

    step = (lambda a: a / 254.0) if kind == "int8" else (lambda a: a / 16.0 + a / QMAX["fp8"] / 1024.0)
    per_block = sum(step(amax(x)) for x in per_rank)
    per_block = per_block + step(amax(sum(per_rank)) + per_block)
    return per_block.repeat_interleave(BLOCK)[:n]


def _packed_bytes(n, world, block):
    """Hand count of what a rank hands to the quantized collectives: the payload padded to
    world chunks of C values (C a multiple of block), each with its fp32 scales; world - 1 chunks
    go into the all-to-all and one (the reduced chunk) into the all-gather."""
    chunk = math.ceil(n / (world * block)) * block
    return world * (chunk + 4 * chunk // block)


def _compressed_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_ppu.config import DiLoCoConfig
    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.sync.diloco import DiLoCoSync, StaticReplicas

    K = world_size
    out = {}
    # ---- one outer step, fp32 / int8 / fp8
    for kind in ("fp32", "int8", "fp8"):
        model = _model(seed=5)
        plan = build_ownership_plan(model, num_replicas=K, num_slices=1, replica_index=rank)
        loop = DiLoCoSync(model, plan, StaticReplicas(dist.group.WORLD), DiLoCoConfig(
            local_steps=1, outer_lr=LR, outer_momentum=MU, num_replicas=K, allreduce_dtype=kind,
            quantization_block=BLOCK))
        names = loop.fragments[0].names  # the payload's order
        params = dict(model.named_parameters())
        theta0 = [params[n].detach().clone() for n in names]
        deltas = _delta(rank, [t.shape for t in theta0])
        with torch.no_grad():
            for n, d in zip(names, deltas):
                params[n].add_(d)
        rep = loop.after_inner_step()[0]
        got = torch.cat([params[n].detach().reshape(-1) for n in names]) - torch.cat([t.reshape(-1) for t in theta0])
        mine = torch.cat([d.reshape(-1) for d in deltas])
        everyone = [torch.empty_like(mine) for _ in range(K)]
        dist.all_gather(everyone, mine)
        # Nesterov's first step (torch SGD: buf_1 = g_1 = -mean Δ): θ1 - θ0 = lr (1 + μ) mean Δ
        want = LR * (1 + MU) * sum(everyone) / K
        bound = LR * (1 + MU) * _block_bound(everyone, kind) / K if kind != "fp32" else None
        out[kind] = {"err": (got - want).abs(), "bound": bound, "handed": rep.bytes_handed,
                     "ring": rep.ring_bytes_sent, "stats": loop.stats(), "numel": mine.numel(),
                     "skipped": rep.skipped}
    # ---- error feedback: R rounds of the same Δ, plain SGD (lr 1, no momentum): θ_R - θ_0 = Σ_r mean_q
    R = 8
    for ef in (False, True):
        model = _model(seed=6)
        plan = build_ownership_plan(model, num_replicas=K, num_slices=1, replica_index=rank)
        loop = DiLoCoSync(model, plan, StaticReplicas(dist.group.WORLD), DiLoCoConfig(
            local_steps=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False, num_replicas=K,
            allreduce_dtype="int8", quantization_block=BLOCK, error_feedback=ef))
        names = loop.fragments[0].names
        params = dict(model.named_parameters())
        theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
        deltas = _delta(rank, [params[n].shape for n in names])
        for _ in range(R):
            with torch.no_grad():
                for n, d in zip(names, deltas):
                    params[n].add_(d)
            assert not loop.after_inner_step()[0].skipped
        moved = torch.cat([params[n].detach().reshape(-1) for n in names]) - theta0
        mine = torch.cat([d.reshape(-1) for d in deltas])
        everyone = [torch.empty_like(mine) for _ in range(K)]
        dist.all_gather(everyone, mine)
        out[f"ef={ef}"] = {"err": (moved - R * sum(everyone) / K).abs().max().item(),
                           "round_bound": (_block_bound(everyone, "int8") / K).max().item()}
        if ef:
            # ---- a non-finite Δ on replica 1: every replica skips, the residual is kept
            res_before = loop.fragments[0].residual.clone()
            before = {n: params[n].detach().clone() for n in names}
            with torch.no_grad():
                params[names[0]].add_(1.0)
                if rank == 1:
                    params[names[0]][0, 0] = float("nan")
            rep = loop.after_inner_step()[0]
            out["nan"] = {"skipped": rep.skipped,
                          "restored": all(torch.equal(params[n], before[n]) for n in names),
                          "residual_kept": torch.equal(loop.fragments[0].residual, res_before),
                          "residual_nonzero": bool(res_before.abs().sum() > 0)}
    return out


@pytest.mark.timeout(300)
def test_quantized_outer_step_within_bound_bytes_and_nonfinite_skip():
    res = run_ranks(2, "tests.test_diloco_compressed:_compressed_worker", timeout=240)
    for r in res:
        n = r["fp32"]["numel"]
        assert float(r["fp32"]["err"].max()) < 1e-5, r["fp32"]["err"].max()
        assert r["fp32"]["handed"] == 4 * n and r["fp32"]["ring"] == 4 * n  # 2 (K-1)/K = 1 for K = 2
        for kind in ("int8", "fp8"):
            q = r[kind]
            assert not q["skipped"]
            assert bool((q["err"] <= q["bound"] + 1e-6).all()), (kind, float((q["err"] - q["bound"]).max()))
            assert float(q["err"].max()) > 1e-5, kind  # it was quantized
            assert q["handed"] == _packed_bytes(n, 2, BLOCK), (kind, q["handed"])
            assert q["stats"]["bytes_handed"] == q["handed"] and q["stats"]["outer_bytes_sent"] == q["handed"]
            assert q["handed"] < r["fp32"]["handed"] / 2
        # error feedback: no-EF error grows with the rounds, EF's stays within ~one round's bound
        assert r["ef=True"]["err"] <= 1.5 * r["ef=True"]["round_bound"], r["ef=True"]
        assert r["ef=False"]["err"] > 3 * r["ef=True"]["err"], (r["ef=False"], r["ef=True"])
        assert r["nan"] == {"skipped": True, "restored": True, "residual_kept": True, "residual_nonzero": True}


# ------------------------------------------------ checkpoint / resume, killed with SIGKILL
TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3",
        "--lr-warmup-iters", "2", "--eval-iters", "1", "--log-interval", "100", "--eval-interval", "100",
        "--train-iters", "12", "--ppu-slices", "2"]


def _kill_resume_worker(rank, world_size, runs, out_dir):
    """Each run: train (optionally resuming); with ``kill_after``, SIGKILL this process after that
    iteration (the peers do the same at the same point). Results go to files, since a killed run
    returns nothing."""
    import torch.distributed as dist

    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.loop import Trainer, init_distributed

    for i, run in enumerate(runs):
        args = parse_args(run["argv"])
        init_distributed()
        t = Trainer.from_args(args)
        if args.checkpoint.load:
            t.load()
        saves = []
        orig_save, orig_step = t.save, t.train_step

        def save(t=t, orig_save=orig_save, saves=saves):
            saves.append({"iteration": t.iteration, "in_flight": t.sync._in_flight is not None})
            return orig_save()

        def train_step(t=t, orig_step=orig_step, run=run, saves=saves, i=i):
            out = orig_step()
            if run.get("kill_after") == t.iteration:
                with open(os.path.join(out_dir, f"saves{i}-{rank}.json"), "w") as f:
                    json.dump(saves, f)
                dist.barrier()  # both ranks got here; the save before is complete on every rank
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        t.save, t.train_step = save, train_step
        t.train()
        params = {k: v.detach().clone() for k, v in t.model.state_dict().items()
                  if isinstance(v, torch.Tensor) and "_extra_state" not in k}
        torch.save({"losses": list(t.losses), "eval": t.final_eval, "params": params, "saves": saves,
                    "logger": dist.get_rank() == world_size - 1, "stats": t.sync.stats()},
                   os.path.join(out_dir, f"run{i}-{rank}.pt"))
    return None


def _load(out_dir, i, world):
    rs = [torch.load(os.path.join(out_dir, f"run{i}-{r}.pt"), weights_only=False) for r in range(world)]
    return rs, next(r for r in rs if r["logger"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flags", [
    # H = 4, τ = 2: launched after 4 (and 8), applied after 6 (and 10); saved after 5, killed after 7
    ["--diloco-local-steps", "4", "--diloco-sync-delay", "2", "--diloco-merge-alpha", "0.5"],
    # the same schedule with an int8 payload and error feedback (the residual is non-zero at the save)
    ["--diloco-local-steps", "4", "--diloco-sync-delay", "2", "--diloco-allreduce-dtype", "int8",
     "--diloco-error-feedback", "--diloco-quantization-block", "64"],
], ids=["delay2-alpha0.5", "int8-error-feedback-delay2"])
def test_killed_with_sync_in_flight_resumes_bit_exact(tmp_path, flags):
    ck, out = str(tmp_path / "ck"), str(tmp_path / "out")
    os.makedirs(out)
    common = TINY + flags
    # A: uninterrupted. B: saves after 5 (a sync launched after 4 is in flight until 6), SIGKILL after 7.
    with pytest.raises(RankFailure) as e:
        run_ranks(2, "tests.test_diloco_compressed:_kill_resume_worker", {"runs": [
            {"argv": common},
            {"argv": common + ["--save", ck, "--save-interval", "5"], "kill_after": 7}], "out_dir": out},
            timeout=800)
    # killed by SIGKILL (a peer may instead see the closed connection and exit 1)
    assert "exited with [-9" in str(e.value) or "-9]" in str(e.value), str(e.value)[-3000:]
    for r in range(2):
        saves = json.load(open(os.path.join(out, f"saves1-{r}.json")))
        assert saves == [{"iteration": 5, "in_flight": True}], saves
    # C: resumes from the checkpoint of iteration 5
    os.makedirs(os.path.join(out, "c"))
    run_ranks(2, "tests.test_diloco_compressed:_kill_resume_worker", {"runs": [
        {"argv": common + ["--load", ck, "--save", ck]}], "out_dir": os.path.join(out, "c")}, timeout=800)
    full_all, full = _load(out, 0, 2)
    res_all, resumed = _load(os.path.join(out, "c"), 0, 2)
    assert resumed["losses"] == full["losses"][5:]  # bitwise
    assert resumed["eval"] == full["eval"]
    for a, b in zip(full_all, res_all):
        assert a["params"].keys() == b["params"].keys()
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), k
        assert b["stats"]["syncs"] == a["stats"]["syncs"] and b["stats"]["bytes_handed"] == a["stats"]["bytes_handed"]
