"""Subnetwork data parallelism: block/neuron plans, masking regimes, per-step sync."""
import pytest
import torch

from megatron_ppu.subnet import SubnetConfig, block_assignment, holders_per_block, validate_subnet_config
from tests.harness import run_ranks


# ------------------------------------------------------------ coverage invariants
@pytest.mark.timeout(30)
@pytest.mark.parametrize("K,L,coverage", [(2, 4, 0.5), (4, 4, 0.5), (4, 6, 0.5), (5, 5, 0.4), (3, 6, 1 / 3),
                                          (4, 8, 0.25), (4, 4, 1.0), (8, 4, 0.25)])
def test_block_assignment_is_balanced_and_reproducible(K, L, coverage):
    a = block_assignment(K, L, coverage, seed=7)
    b = round(coverage * L)
    assert len(a) == K and all(len(set(blocks)) == b for blocks in a)
    counts = holders_per_block(a, L)
    assert counts == [K * b // L] * L and min(counts) >= 1  # every block, same number of holders
    assert a == block_assignment(K, L, coverage, seed=7)
    if b < L:
        assert any(block_assignment(K, L, coverage, seed=s) != a for s in range(8))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cfg,N,K,L,needle", [
    (SubnetConfig("blocks", coverage=0.5), 1, 3, 4, "not a multiple of L"),
    (SubnetConfig("blocks", coverage=0.3), 1, 4, 4, "whole number"),
    (SubnetConfig("blocks", coverage=0.0), 1, 4, 4, "whole number"),
    (SubnetConfig("blocks", coverage=0.5), 2, 4, 4, "does not combine"),
    (SubnetConfig("neurons", masking="forward"), 1, 4, 4, "needs --ppu-slices"),
    (SubnetConfig("neurons", masking="backward"), 2, 4, 4, "is PPU"),
    (SubnetConfig("ppu", masking="forward"), 2, 4, 4, "backward masking by definition"),
    (SubnetConfig("ppu", coverage=0.5), 2, 4, 4, "applies to --subnet-plan blocks only"),
])
def test_invalid_subnet_plans_raise(cfg, N, K, L, needle):
    with pytest.raises(ValueError, match=needle):
        validate_subnet_config(cfg, num_slices=N, num_replicas=K, num_layers=L)


# ------------------- SDP per-step sync: mean over holders, then holders' values everywhere
def _full_layout_grads(model, plan):
    """This replica's local gradient of every parameter in Megatron's full layout, zeros where
    it holds nothing."""
    out = {}
    for name, own in plan.params.items():
        p = plan.tensors(name).parts[0]  # the owned part of a sliced weight, else the parameter
        full = torch.zeros(own.shape)
        if p.requires_grad:
            full[own.owned_mask()] = p.main_grad.detach().reshape(-1)
        out[name] = full
    return out


def _sdp_sync_worker(rank, world_size, plan_name):
    import torch.distributed as dist

    from megatron_ppu.config import PPUConfig
    from megatron_ppu.optimizer import wrap_model_ddp
    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.parallel import build_replica_layout
    from megatron_ppu.subnet import apply_block_plan, block_holders_fn
    from megatron_ppu.sync.sdp import SDPSync
    from tests import gpt_utils as G

    G.init_parallel()
    K, L, lr = world_size, 4, 0.5
    layout = build_replica_layout(K)
    k = layout.replica_index
    blocks = plan_name.startswith("blocks")
    masking = "forward" if plan_name in ("blocks-forward", "neurons") else "backward"
    cfg = G.make_config(layers=L, swiglu=not blocks, gqa=plan_name == "ppu-heads")
    ppu, N = None, 1
    if plan_name == "neurons":
        ppu, N = PPUConfig(num_slices=2, mlp_forward_masking=True), 2
    elif plan_name == "ppu-heads":
        ppu, N = PPUConfig(num_slices=2, slice_attention_heads=True), 2
    model = G.build_gpt(cfg, ppu, slice_index=k % N)
    holders = None
    if blocks:
        assignment = block_assignment(K, L, 0.5, seed=3)
        apply_block_plan(model, assignment[k], masking)
        holders = block_holders_fn(assignment, L, K)
    plan = build_ownership_plan(model, K, N, k, (lambda n: len(holders(n))) if blocks else None)
    ddp = wrap_model_ddp(model, layout)
    w0 = {n: v.detach().clone() for n, v in model.state_dict().items() if n in plan.params}
    G.forward_backward(ddp, cfg, G.batch(seed=50 + rank))
    grads = _full_layout_grads(model, plan)
    masks = {n: own.owned_mask() for n, own in plan.params.items()}
    everyone = [None] * K
    dist.all_gather_object(everyone, (grads, masks))

    sync = SDPSync(model, plan, layout, holders_fn=holders, lazy=masking == "forward")
    sent = sync.sync_gradients()
    norm = sync.grad_norm()
    # The clipping norm is the norm of the whole synchronised gradient, each element counted once.
    ref_sq = 0.0
    for n in plan.params:
        total = sum(everyone[j][0][n] for j in range(K))
        count = sum(everyone[j][1][n].to(torch.float32) for j in range(K))
        ref_sq += float((total / count).double().pow(2).sum())
    assert abs(norm - ref_sq ** 0.5) <= 1e-5 * ref_sq ** 0.5, (norm, ref_sq ** 0.5)
    for p in model.parameters():  # identical plain SGD step on every holder
        if p.requires_grad:
            p.data.add_(p.main_grad, alpha=-lr)
    sent += sync.refresh()
    final = {n: v for n, v in model.state_dict().items() if n in plan.params}
    checked = 0
    for n in plan.params:
        # Plain-PyTorch reference: W0 - lr x (mean over the replicas holding each element of their
        # local gradients); every replica, holder or not, must end with it.
        total = sum(everyone[j][0][n] for j in range(K))
        count = sum(everyone[j][1][n].to(torch.float32) for j in range(K))
        assert count.min() >= 1, n
        expected = w0[n] - lr * total / count
        torch.testing.assert_close(final[n], expected, rtol=1e-5, atol=1e-6)
        checked += int(not masks[n].all())  # elements this replica does not hold were refreshed
    model_bytes = sum(v.numel() * v.element_size() for v in w0.values())
    return {"checked_not_held": checked, "sent": sent, "ddp": 2 * (K - 1) / K * model_bytes,
            "stats": sync.stats()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("plan_name", ["blocks-backward", "blocks-forward", "neurons", "ppu-heads"])
def test_sdp_sync_is_mean_over_holders_then_refresh(plan_name):
    res = run_ranks(4, "tests.test_subnet:_sdp_sync_worker", {"plan_name": plan_name})
    assert all(r["checked_not_held"] > 0 for r in res)
    for r in res:
        # Sub-group collectives: less traffic than DDP's all-reduce of the whole model.
        assert 0 < r["sent"] < r["ddp"], r
        assert r["stats"]["grad_bytes_sent"] > 0 and r["stats"]["refresh_bytes_sent"] > 0


# ------------------------------- skipped blocks: no FLOPs, no grads, no optimizer state
def _skip_worker(rank, world_size):
    from megatron.core.optimizer import OptimizerConfig
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ppu.optimizer import build_inner_optimizer, wrap_model_ddp
    from megatron_ppu.testing.accounting import measure_state_bytes, predict_state_bytes
    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.parallel import build_replica_layout
    from megatron_ppu.subnet import apply_block_plan
    from tests import gpt_utils as G

    G.init_parallel()
    layout = build_replica_layout(1)
    tokens = torch.randint(0, G.VOCAB, (2, G.SEQ))
    pos = torch.arange(G.SEQ).expand(2, G.SEQ)

    def flops(model):
        with FlopCounterMode(display=False) as f:
            model(tokens, pos, None, labels=tokens).sum()
        fwd = f.get_total_flops()
        loss = model(tokens, pos, None, labels=tokens).sum()
        with FlopCounterMode(display=False) as b:
            loss.backward()
        return fwd, b.get_total_flops()

    out = {}
    two_layer = G.build_gpt(G.make_config(layers=2))  # independent reference: a model with just 2 blocks
    out["ref2"] = flops(two_layer)
    full = G.build_gpt(G.make_config(layers=4))
    out["full"] = flops(full)
    full.eval()
    with torch.no_grad():
        out["full_eval_loss"] = float(full(tokens, pos, None, labels=tokens).mean())
    for masking in ("forward", "backward"):
        cfg = G.make_config(layers=4)
        model = G.build_gpt(cfg)
        apply_block_plan(model, [1, 3], masking)
        out[masking] = flops(model)
        model.eval()  # evaluation runs the full model on every replica, whatever it holds
        with torch.no_grad():
            out[masking + "_eval_loss"] = float(model(tokens, pos, None, labels=tokens).mean())
        model.train()
        model.zero_grad(set_to_none=True)
        plan = build_ownership_plan(model, 1, 1, 0, owners_fn=lambda n: 1)
        ddp = wrap_model_ddp(model, layout)
        opt = build_inner_optimizer([ddp], OptimizerConfig(optimizer="adam", lr=1e-3), layout)
        G.forward_backward(ddp, cfg, G.batch())
        opt.step()
        layer_params = sum(p.numel() for p in model.decoder.layers[0].parameters())
        assert plan.owned_numel() == plan.total_numel() - 2 * layer_params
        got = measure_state_bytes([ddp], opt).as_dict()
        assert got == predict_state_bytes(plan.owned_numel(), bf16=False).as_dict(), got
    return out


@pytest.mark.timeout(900)
def test_skipped_blocks_cost_no_flops_and_no_state():
    r = run_ranks(1, "tests.test_subnet:_skip_worker")[0]
    assert r["forward"] == r["ref2"]  # forward masking: exactly the FLOPs of a 2-block model
    assert r["backward"][0] == r["full"][0]  # backward masking: full forward ...
    assert r["ref2"][1] < r["backward"][1] < r["full"][1]  # ... dgrad through all, wgrad for 2 of 4
    # Same seed, same weights: in evaluation a masked model is the full model.
    assert r["forward_eval_loss"] == r["backward_eval_loss"] == r["full_eval_loss"]


# ------------------------------------------------ neuron plan, forward masking
def _neuron_worker(rank, world_size):
    import torch.nn.functional as F

    from megatron_ppu.layers import PPUMLPColumnParallelLinear, PPUMLPRowParallelLinear
    from tests import gpt_utils as G

    G.init_parallel()
    cfg = G.make_config()
    init = torch.nn.init.normal_
    fc1 = PPUMLPColumnParallelLinear(64, 128, config=cfg, init_method=init, bias=True, gather_output=False,
                                     skip_bias_add=True, num_slices=4, slice_index=2, forward_mask=True)
    fc2 = PPUMLPRowParallelLinear(128, 64, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                                  skip_bias_add=True, num_slices=4, slice_index=2, forward_mask=True)
    with torch.no_grad():
        for p in list(fc1.parameters()) + list(fc2.parameters()):
            p.normal_()
    W, b1 = fc1.state_dict()["weight"], fc1.state_dict()["bias"]
    V, b2 = fc2.state_dict()["weight"], fc2.state_dict()["bias"]
    x = torch.randn(5, 3, 64)

    def mlp():
        h, bias = fc1(x)
        y, bias2 = fc2(F.gelu(h + bias))
        return y + bias2

    owned = slice(64, 96)  # slice 2 of 4 of 128 hidden units
    fc1.train(), fc2.train()
    ref_train = 4 * (F.gelu(x @ W[owned].t() + b1[owned]) @ V[:, owned].t()) + b2
    torch.testing.assert_close(mlp(), ref_train, rtol=1e-4, atol=1e-4)
    fc1.eval(), fc2.eval()
    torch.testing.assert_close(mlp(), F.gelu(x @ W.t() + b1) @ V.t() + b2, rtol=1e-4, atol=1e-4)  # eval: full MLP
    fc1.train(), fc2.train()
    mlp().sum().backward()
    assert fc1.weight_frozen.grad is None and fc2.weight_frozen.grad is None
    return True


@pytest.mark.timeout(900)
def test_neuron_forward_masking_matches_plain_torch():
    assert run_ranks(1, "tests.test_subnet:_neuron_worker") == [True]


# ----------------------------------------------------------- end to end (trainer)
def _e2e_worker(rank, world_size, argv):
    import torch.distributed as dist

    from megatron_ppu.training.loop import run

    t = run(argv)
    # Megatron's full layout (the owned/frozen split of parameters() differs between replicas).
    v = torch.cat([x.reshape(-1).float() for k, x in t.model.state_dict().items()
                   if isinstance(x, torch.Tensor) and "_extra_state" not in k])
    g = [torch.empty_like(v) for _ in range(world_size)]
    dist.all_gather(g, v)
    return {"losses": t.losses, "identical": all(torch.equal(g[0], x) for x in g)}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("extra", [
    ["--subnet-plan", "blocks", "--subnet-coverage", "0.5", "--subnet-sync", "step"],
    ["--subnet-plan", "blocks", "--subnet-coverage", "0.5", "--subnet-masking", "forward", "--subnet-sync", "step"],
    ["--subnet-plan", "neurons", "--subnet-masking", "forward", "--ppu-slices", "2", "--subnet-sync", "step"],
    # 4 ranks = 2 replicas x inner-DP 2: the holder groups are built per inner-DP position
    ["--subnet-plan", "blocks", "--subnet-coverage", "0.5", "--subnet-sync", "step", "--diloco-replicas", "2"],
], ids=["blocks-backward", "blocks-forward", "neurons-forward", "blocks-backward-innerdp2"])
def test_sdp_per_step_training_keeps_replicas_identical(extra):
    argv = ["--mock-data", "--vocab-size", "128", "--num-layers", "4", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "6",
            "--eval-iters", "1", "--log-interval", "3", "--lr", "1e-3", "--lr-warmup-iters", "1"] + extra
    res = run_ranks(4 if "--diloco-replicas" in extra else 2, "tests.test_subnet:_e2e_worker", {"argv": argv})
    # The same model on every rank at the end (forward masking: refreshed before the final evaluation).
    assert all(r["identical"] for r in res)
    losses = res[-1]["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra,needle", [
    (["--diloco-outer-lr", "0.4"], "--diloco-outer-lr would be ignored"),
    (["--diloco-allreduce-dtype", "bf16"], "--diloco-allreduce-dtype would be ignored"),
    (["--fp16"], "does not support --fp16"),
])
def test_outer_flags_are_refused_with_per_step_sync(extra, needle):
    from megatron_ppu.training.arguments import parse_args

    with pytest.raises(ValueError, match=needle):
        parse_args(["--subnet-plan", "blocks", "--subnet-coverage", "0.5", "--subnet-sync", "step"] + extra)
