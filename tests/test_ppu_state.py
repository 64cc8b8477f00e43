"""Optimizer steps, memory held per rank, backward FLOPs, checkpoints, and config errors."""
import pytest
import torch

from megatron_ppu.config import PPUConfig, validate_ppu_config
from tests.harness import run_ranks


# ------------------------------------------- steps, frozen/owned, state bytes
def _state_worker(rank, world_size, variants):
    from megatron.core.optimizer import OptimizerConfig

    from megatron_ppu.optimizer import build_inner_optimizer, wrap_model_ddp
    from megatron_ppu.testing.accounting import measure_state_bytes, predict_state_bytes
    from megatron_ppu.ownership import build_ownership_plan
    from megatron_ppu.parallel import build_replica_layout
    from tests import gpt_utils as G

    G.init_parallel()
    layout = build_replica_layout(world_size)  # K = world size replicas, inner DP = 1
    rows = []
    for n_slices, heads, bf16 in variants:
        ppu = PPUConfig(n_slices, heads)
        cfg = G.make_config(swiglu=True, bf16=bf16)
        model = G.build_gpt(cfg, ppu if n_slices > 1 else None, layout.slice_index(n_slices))
        plan = build_ownership_plan(model, layout.num_replicas, n_slices, layout.replica_index)
        if bf16:  # as Megatron does: cast inputs/outputs around a bf16 model
            from megatron.core.transformer.module import Float16Module

            ddp = wrap_model_ddp(Float16Module(cfg, model), layout)
        else:
            ddp = wrap_model_ddp(model, layout)
        opt = build_inner_optimizer([ddp], OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1,
                                                           bf16=bf16, params_dtype=cfg.params_dtype), layout)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        for step in range(3):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            G.forward_backward(ddp, cfg, G.batch(seed=100 * rank + step))
            ok, _, _ = opt.step()
            assert ok
        for n, p in model.named_parameters():
            if n.endswith("_frozen"):
                assert torch.equal(p, start[n]), f"frozen {n} changed"
                assert p.grad is None and not hasattr(p, "main_grad"), n
            else:
                assert not torch.equal(p, start[n]), f"trainable {n} did not move"
        measured = measure_state_bytes([ddp], opt)
        predicted = predict_state_bytes(plan.owned_numel(), bf16=bf16)
        assert measured.trainable_elements == plan.owned_numel()
        assert measured.as_dict() == predicted.as_dict(), (measured, predicted)
        rows.append({"N": n_slices, "heads": heads, "bf16": bf16, "total": plan.total_numel(),
                     **measured.as_dict()})
    return rows


@pytest.mark.timeout(900)
def test_steps_freeze_frozen_move_owned_and_state_bytes_match_plan():
    variants = [(1, False, False), (2, False, False), (4, False, False), (4, True, False), (2, True, True)]
    results = run_ranks(4, "tests.test_ppu_state:_state_worker", {"variants": variants})
    by_n = {(r["N"], r["heads"], r["bf16"]): r for r in results[0]}
    full = by_n[(1, False, False)]
    # The N=1 model trains everything; PPU must hold strictly less, and heads slicing less again.
    assert full["trainable_elements"] == full["total"]
    assert by_n[(2, False, False)]["grads"] < full["grads"]
    assert by_n[(4, False, False)]["grads"] < by_n[(2, False, False)]["grads"]
    assert by_n[(4, True, False)]["grads"] < by_n[(4, False, False)]["grads"]
    for r in results[0]:
        print(f"N={r['N']} heads={r['heads']} bf16={r['bf16']}: trainable {r['trainable_elements']}/{r['total']} "
              f"grads {r['grads']} B, optimizer {r['optimizer']} B")


# ------------------------------------------------------------ backward FLOPs
def _flops_worker(rank, world_size, B, S, H, F, L, V, heads):
    from torch.utils.flop_counter import FlopCounterMode

    import tests.gpt_utils as G
    from megatron_ppu.config import PPUConfig

    G.init_parallel()
    cfg = G.make_config(swiglu=False, layers=L, hidden=H, ffn=F, heads=heads)
    out = {}
    for name, ppu in (("full", None), ("mlp4", PPUConfig(4, False)), ("mlp4_heads4", PPUConfig(4, True))):
        model = G.build_gpt(cfg, ppu, 1)
        tokens = torch.randint(0, G.VOCAB, (B, S))
        pos = torch.arange(S).expand(B, S)
        with FlopCounterMode(display=False) as fwd:
            loss = model(tokens, pos, None, labels=tokens).sum()
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        out[name] = (fwd.get_total_flops(), bwd.get_total_flops())
    return out


@pytest.mark.timeout(900)
def test_backward_flops_match_appendix_c2():
    B, S, H, F, L, V, heads = 2, 16, 64, 256, 2, 128, 8
    res = run_ranks(1, "tests.test_ppu_state:_flops_worker",
                    dict(B=B, S=S, H=H, F=F, L=L, V=V, heads=heads))[0]

    # Paper App. C.2, matmul terms only (FlopCounterMode counts GEMMs; the embedding
    # lookup and softmax terms of the paper are not GEMMs).
    def fwd():
        return L * (8 * B * S * H * H + 4 * B * S * S * H + 4 * B * S * H * F) + 2 * B * S * H * V

    def bwd(rho_mlp, rho_attn):
        mha = 8 * B * S * S * H + (10 + 6 * rho_attn) * B * S * H * H
        ffn = 4 * B * S * H * F + 4 * rho_mlp * B * S * H * F
        return L * (mha + ffn) + 2 * (2 * B * S * H * V)

    assert res["full"][0] == fwd() and res["mlp4"][0] == fwd() and res["mlp4_heads4"][0] == fwd()
    assert res["full"][1] == bwd(1, 1)
    assert res["mlp4"][1] == bwd(0.25, 1)
    assert res["mlp4_heads4"][1] == bwd(0.25, 0.25)
    saved = 1 - res["mlp4"][1] / res["full"][1]
    print(f"backward FLOPs: full {res['full'][1]}, 1/4 MLPs {res['mlp4'][1]} ({100 * saved:.1f}% fewer), "
          f"1/4 MLPs + 1/4 heads {res['mlp4_heads4'][1]}")


# ----------------------------------------------------------------- checkpoints
def _ckpt_worker(rank, world_size, ckpt_dir):
    from megatron.core import dist_checkpointing

    import tests.gpt_utils as G
    from megatron_ppu.config import PPUConfig

    G.init_parallel(tp=2)
    cfg = G.make_config(swiglu=True, gqa=True, tp=2)
    ppu = G.build_gpt(cfg, PPUConfig(2, True), 1, seed=1)
    with torch.no_grad():  # make the owned and frozen parts distinguishable from init
        for n, p in ppu.named_parameters():
            p.add_(0.01 * (1 + (n.endswith("_owned"))))
    plain = G.build_gpt(cfg, None, seed=2)
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ppu.state_dict().values())
                   if isinstance(a, torch.Tensor))

    def roundtrip(src, dst, path):
        dist_checkpointing.save(src.sharded_state_dict(), path)
        loaded = dist_checkpointing.load(dst.sharded_state_dict(), path)
        dst.load_state_dict(loaded)
        s, d = src.state_dict(), dst.state_dict()
        assert s.keys() == d.keys()
        for k in s:
            if isinstance(s[k], torch.Tensor):
                assert torch.equal(s[k], d[k]), k

    import os
    a, b = os.path.join(ckpt_dir, "ppu"), os.path.join(ckpt_dir, "plain")
    if rank == 0:
        os.makedirs(a), os.makedirs(b)
    torch.distributed.barrier()
    roundtrip(ppu, plain, a)  # PPU -> plain megatron
    fresh = G.build_gpt(cfg, PPUConfig(2, True), 0, seed=3)  # other slice, other weights
    roundtrip(plain, fresh, b)  # plain megatron -> PPU
    return True


@pytest.mark.timeout(900)
def test_full_layout_checkpoint_moves_between_ppu_and_plain_megatron(tmp_path):
    assert run_ranks(2, "tests.test_ppu_state:_ckpt_worker", {"ckpt_dir": str(tmp_path)}) == [True, True]


# ------------------------------------------------------------------ validation
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs,needle", [
    (dict(ppu=PPUConfig(3), num_replicas=4), "does not divide the number of replicas"),
    (dict(ppu=PPUConfig(4), num_replicas=4, ffn_hidden_size=100, tensor_model_parallel_size=2), "--ffn-hidden-size as a multiple of 8"),
    (dict(ppu=PPUConfig(2, True), num_replicas=2, num_attention_heads=6, tensor_model_parallel_size=2), "--num-attention-heads"),
    (dict(ppu=PPUConfig(2, True), num_replicas=2, num_query_groups=2, tensor_model_parallel_size=2), "--num-query-groups"),
    (dict(ppu=PPUConfig(1, True), num_replicas=2), "need --ppu-slices > 1"),
    (dict(ppu=PPUConfig(2, False, False, "half"), num_replicas=2), "must be 'full' or 'detach'"),
    (dict(ppu=PPUConfig(0), num_replicas=2), "positive integer"),
    (dict(ppu=PPUConfig(2), num_replicas=2, num_moe_experts=8), "mixture-of-experts"),
    (dict(ppu=PPUConfig(2), num_replicas=2, gradient_accumulation_fusion=True), "no-gradient-accumulation-fusion"),
])
def test_invalid_configs_raise_value_error_naming_the_fix(kwargs, needle):
    base = dict(ffn_hidden_size=128, num_attention_heads=8, num_query_groups=None)
    base.update(kwargs)
    with pytest.raises(ValueError, match=needle.replace("-", r"\-").replace(".", r"\.").replace(">", ".")):
        validate_ppu_config(**base)
