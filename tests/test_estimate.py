"""Tests of the analytical cost model (megatron_ppu/estimate.py).

Expected values are computed by hand in the tests (arithmetic written out), from
plain torch modules, or taken from the paper; none is copied from a run of the
code under test.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megatron_ppu import estimate as E


def tiny_model(**kw):
    """1 layer, hidden 4, 2 heads, ffn 16, vocab 10, tied, no biases, LayerNorm, rope."""
    base = dict(num_layers=1, hidden_size=4, num_attention_heads=2, ffn_hidden_size=16,
                vocab_size=10, make_vocab_size_divisible_by=1, seq_length=3,
                tie_embeddings=True, swiglu=False, add_bias_linear=False,
                normalization="LayerNorm", position_embedding_type="rope")
    base.update(kw)
    return E.ModelShape(**base)


def cfg_of(model, precision=None, **kw):
    train = {k: kw.pop(k) for k in list(kw) if k in E.TrainShape.__dataclass_fields__}
    ppu = dict(replicas=kw.pop("replicas", 2), **kw)
    return E.EstimateConfig(model=model, train=E.TrainShape(**train), ppu=E.PPUShape(**ppu),
                            precision=precision or E.Precision.paper())


# ---------------------------------------------------------------- parameters, by hand


@pytest.mark.timeout(60)
def test_tiny_parameter_count_by_hand():
    # embedding 10*4 = 40
    # layer: LN1 (w+b) 2*4 = 8, QKV 3*4*4 = 48, W_O 4*4 = 16, LN2 8,
    #        fc1 16*4 = 64, fc2 4*16 = 64                          -> 208
    # final LN 8                                                    -> total 256
    pc = E.count_parameters(cfg_of(tiny_model(), slices=1))
    assert pc.total == 256 and pc.trainable == 256
    # 1/2 MLPs: half of fc1 and of fc2 frozen: 256 - (64 + 64) / 2 = 192
    assert E.count_parameters(cfg_of(tiny_model(), slices=2)).trainable == 192
    # 1/2 MLPs + 1/2 heads: also half of QKV frozen: 192 - 48 / 2 = 168
    assert E.count_parameters(cfg_of(tiny_model(), slices=2, slice_attention_heads=True)).trainable == 168
    # 1/4 MLPs with 4 replicas: 256 - 128 * 3/4 = 160
    assert E.count_parameters(cfg_of(tiny_model(), slices=4, replicas=4)).trainable == 160


@pytest.mark.timeout(60)
def test_tiny_parameter_count_variants_by_hand():
    # Untied output (+10*4 = 40), biases (QKV 12, W_O 4, fc1 16, fc2 4 = 36),
    # learned positions (3*4 = 12): 256 + 40 + 36 + 12 = 344.
    m = tiny_model(tie_embeddings=False, add_bias_linear=True, position_embedding_type="learned_absolute")
    pc = E.count_parameters(cfg_of(m, slices=2, slice_attention_heads=True))
    assert pc.total == 344
    # frozen halves: fc1 w+b (64+16)/2 = 40, fc2 weight 64/2 = 32 (its bias is not sliced),
    # QKV w+b (48+12)/2 = 30  -> 344 - 102 = 242
    assert pc.trainable == 242
    # SwiGLU: fc1 has 2*16 rows: 128 weights -> 256 - 64 + 128 = 320; 1/4: (128+64)*3/4 = 144 frozen
    pc = E.count_parameters(cfg_of(tiny_model(swiglu=True), slices=4, replicas=4))
    assert (pc.total, pc.trainable) == (320, 176)
    # GQA: 2 heads, 1 query group, kv_channels 2: Q 4 + K 2 + V 2 = 8 rows of 4 -> QKV 32 (not 48)
    pc = E.count_parameters(cfg_of(tiny_model(num_query_groups=1), slices=1))
    assert pc.total == 256 - 48 + 32
    # RMSNorm has no bias: three norms of 4 instead of 8 -> 256 - 12 = 244
    assert E.count_parameters(cfg_of(tiny_model(normalization="RMSNorm"))).total == 244


@pytest.mark.timeout(60)
def test_tensor_and_pipeline_parallel_counts_by_hand():
    # TP=2: QKV (48), W_O (16), fc1 (64), fc2 (64) and the embedding (40) halve; norms do not:
    # 24 + 8 + 32 + 32 + 20 + 3 norms * 8 = 140 per rank
    m = tiny_model(num_layers=2)
    pc = E.count_parameters(cfg_of(m, tensor_model_parallel_size=2))
    per_layer_rank = 24 + 8 + 32 + 32 + 8 + 8
    assert pc.per_stage_total_rank == [20 + 2 * per_layer_rank + 8]
    # PP=2 with tied embeddings: stage 0 has the embedding and layer 0, the last stage layer 1,
    # the final norm and a copy of the embedding (not counted twice in the total).
    pc = E.count_parameters(cfg_of(m, pipeline_model_parallel_size=2))
    assert pc.per_stage_total_rank == [40 + 208, 208 + 8 + 40]
    assert pc.total == 40 + 2 * 208 + 8


# ------------------------------------------- trainable counts vs a real torch module


class _Block(nn.Module):
    def __init__(self, h, heads, groups, kv, f, swiglu, bias):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        # Megatron's fused QKV layout: per query group [q heads..., k, v], each kv rows.
        self.qkv = nn.Linear(h, (heads + 2 * groups) * kv, bias=bias)
        self.proj = nn.Linear(heads * kv, h, bias=bias)
        self.fc1 = nn.Linear(h, 2 * f if swiglu else f, bias=bias)
        self.fc2 = nn.Linear(f, h, bias=bias)


class _TinyGPT(nn.Module):
    def __init__(self, L, h, heads, groups, kv, f, V, swiglu, bias, tied, positions):
        super().__init__()
        self.emb = nn.Embedding(V, h)
        self.pos = nn.Embedding(positions, h) if positions else None
        self.layers = nn.ModuleList(_Block(h, heads, groups, kv, f, swiglu, bias) for _ in range(L))
        self.final_norm = nn.LayerNorm(h)
        self.out = None if tied else nn.Linear(h, V, bias=False)


def _owned_elements(net, n, N, heads, groups, kv, f, swiglu, slice_heads):
    """Elements replica slice n trains, by indexing the real tensors."""
    owned = 0
    for name, p in net.named_parameters():
        leaf = name.split(".")[-2:]
        if leaf[0] == "fc1":
            rows = torch.zeros(p.shape[0], dtype=torch.bool)
            halves = [0, f] if swiglu else [0]
            for off in halves:
                rows[off + n * f // N: off + (n + 1) * f // N] = True
            owned += p[rows].numel()
        elif leaf == ["fc2", "weight"]:
            owned += p[:, n * f // N:(n + 1) * f // N].numel()
        elif leaf[0] == "qkv" and slice_heads:
            per_group = (heads // groups + 2) * kv
            g0, g1 = n * groups // N, (n + 1) * groups // N
            owned += p[g0 * per_group: g1 * per_group].numel()
        else:
            owned += p.numel()
    return owned


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", [
    dict(heads=4, groups=4, kv=3, f=24, swiglu=False, bias=True, tied=True, N=2, slice_heads=True),
    dict(heads=4, groups=2, kv=3, f=24, swiglu=True, bias=False, tied=False, N=2, slice_heads=True),
    dict(heads=8, groups=4, kv=2, f=32, swiglu=True, bias=True, tied=True, N=4, slice_heads=True),
    dict(heads=4, groups=4, kv=3, f=24, swiglu=False, bias=True, tied=False, N=4, slice_heads=False),
])
def test_trainable_counts_match_torch_module(shape):
    s = dict(shape)
    L, h, V, positions = 2, 12, 50, 7
    net = _TinyGPT(L, h, s["heads"], s["groups"], s["kv"], s["f"], V, s["swiglu"], s["bias"],
                   s["tied"], positions)
    model = E.ModelShape(num_layers=L, hidden_size=h, num_attention_heads=s["heads"],
                         num_query_groups=s["groups"], kv_channels=s["kv"], ffn_hidden_size=s["f"],
                         vocab_size=V, make_vocab_size_divisible_by=1, seq_length=positions,
                         tie_embeddings=s["tied"], swiglu=s["swiglu"], add_bias_linear=s["bias"],
                         normalization="LayerNorm", position_embedding_type="learned_absolute")
    pc = E.count_parameters(cfg_of(model, slices=s["N"], replicas=s["N"],
                                   slice_attention_heads=s["slice_heads"]))
    assert pc.total == sum(p.numel() for p in net.parameters())
    for n in range(s["N"]):  # every slice is the same size
        assert pc.trainable == _owned_elements(net, n, s["N"], s["heads"], s["groups"], s["kv"],
                                               s["f"], s["swiglu"], s["slice_heads"])


# ---------------------------------------------------------------- memory, by hand


@pytest.mark.timeout(60)
def test_memory_paper_precision_by_hand():
    # P = 256, P_train = 192 (1/2 MLPs). Paper precision: fp32 weights 4*256 = 1024,
    # bf16 grads 2*192 = 384, Adam m+v fp32 8*192 = 1536, outer momentum fp32 4*256 = 1024,
    # snapshot of the trainable part fp32 4*192 = 768.
    me = E.estimate_memory(cfg_of(tiny_model(), slices=2, outer_state_placement="device"))
    assert (me.weights, me.master_weights, me.gradients, me.optimizer_state) == (1024, 0, 384, 1536)
    assert (me.outer_momentum, me.snapshot) == (1024, 768)
    assert me.model_state == 1024 + 384 + 1536 + 1024 + 768
    # Offloaded to the host: nothing of the outer state on the device, all of it on the host.
    me = E.estimate_memory(cfg_of(tiny_model(), slices=2, outer_state_placement="host"))
    assert (me.outer_momentum, me.snapshot, me.host_total) == (0, 0, 1024 + 768)
    assert me.model_state == 1024 + 384 + 1536
    # snapshot_scope="all": the snapshot covers the 256 parameters: 4*256
    me = E.estimate_memory(cfg_of(tiny_model(), slices=2, outer_state_placement="device",
                                  snapshot_scope="all"))
    assert me.snapshot == 1024
    # DDP: no outer state at all
    me = E.estimate_memory(cfg_of(tiny_model(), outer_optimizer=False))
    assert me.model_state == 1024 + 2 * 256 + 8 * 256


@pytest.mark.timeout(60)
def test_memory_megatron_precision_by_hand():
    # bf16 weights 2*256 = 512, fp32 master of the 192 trainable 4*192 = 768,
    # fp32 grads 4*192 = 768, Adam 8*192 = 1536.
    me = E.estimate_memory(cfg_of(tiny_model(), E.Precision.megatron(bf16=True), slices=2,
                                  outer_optimizer=True, outer_state_placement="host"))
    assert (me.weights, me.master_weights, me.gradients, me.optimizer_state) == (512, 768, 768, 1536)
    # fp32 training: weights are the master copy
    me = E.estimate_memory(cfg_of(tiny_model(), E.Precision.megatron(bf16=False), slices=2,
                                  outer_state_placement="host"))
    assert (me.weights, me.master_weights, me.gradients) == (1024, 0, 768)


@pytest.mark.timeout(60)
def test_streaming_stages_the_largest_fragment_by_hand():
    # 2 layers, F = 2: fragments {layer 0}, {layer 1}, {embedding 40 + final LN 8 = 48}.
    # A layer has 208 parameters, 208 - 64 = 144 trainable with 1/2 MLPs.
    # Staged on device: momentum 4*208 = 832, snapshot 4*144 = 576.
    # Host: momentum 4*(2*208 + 48) = 1856, snapshot 4*(2*144 + 48) = 1344.
    me = E.estimate_memory(cfg_of(tiny_model(num_layers=2), slices=2, streaming_fragments=2,
                                  outer_state_placement="stream"))
    assert (me.outer_momentum, me.snapshot) == (832, 576)
    assert (me.host_outer_momentum, me.host_snapshot) == (1856, 1344)


@pytest.mark.timeout(60)
def test_activation_memory_matches_korthikanti():
    # Korthikanti et al. 2022, t = 1, MHA, FFN = 4h, dropout on, bf16:
    # per layer 34 s b h + 5 a s^2 b bytes; plus embedding-dropout mask s b h,
    # final-norm and output-layer inputs 2 s b h each, fp32 logits 4 s b v.
    s, b, h, a, L, v = 8, 2, 16, 4, 3, 32
    m = E.ModelShape(num_layers=L, hidden_size=h, num_attention_heads=a, vocab_size=v,
                     make_vocab_size_divisible_by=1, seq_length=s, dropout=True)
    extras = s * b * h + 4 * s * b * h + 4 * s * b * v
    layer = 34 * s * b * h + 5 * a * s * s * b
    none = E.activation_bytes(cfg_of(m, micro_batch_size=b))
    assert none == L * layer + extras
    # selective: the 5 a s^2 b attention core is recomputed, one layer's core is live at a time
    sel = E.activation_bytes(cfg_of(m, micro_batch_size=b, recompute_granularity="selective"))
    assert sel == L * 34 * s * b * h + 5 * a * s * s * b + extras
    # full: only layer inputs (2 s b h each) are kept, plus one layer during its recompute
    full = E.activation_bytes(cfg_of(m, micro_batch_size=b, recompute_granularity="full"))
    assert full == L * 2 * s * b * h + layer + extras


# ---------------------------------------------------------------- FLOPs


@pytest.mark.timeout(60)
def test_flops_paper_formulas_by_hand():
    # App. C.2 with B = 2, S = 3, H = 4, D_ff = 16, V = 10, L = 1, N = 2, heads sliced:
    B, S, H, D, V, rho = 2, 3, 4, 16, 10, 0.5
    emb = B * S * H                                          # 24
    mha = 8 * B * S * H * H + 4 * B * S * S * H              # 768 + 288 = 1056
    ffn = 4 * B * S * H * D                                  # 1536
    out = 2 * B * S * H * V + 3 * B * S * V                  # 480 + 180 = 660
    fwd = emb + mha + ffn + out                              # 3276
    mha_b = 8 * B * S * S * H + (10 + 6 * rho) * B * S * H * H   # 576 + 13*96 = 1824
    ffn_b = 4 * B * S * H * D + 4 * rho * B * S * H * D      # 1536 + 768 = 2304
    bwd = 2 * emb + mha_b + ffn_b + 2 * out                  # 48 + 1824 + 2304 + 1320 = 5496
    fl = E.estimate_flops(cfg_of(tiny_model(), micro_batch_size=2, slices=2,
                                 slice_attention_heads=True))
    assert fl.tokens_per_step == 6
    assert fl.forward == fwd == 3276
    assert fl.backward == bwd == 5496
    # dense backward: rho = 1 -> (10+6)*96 = 1536 + 576, ffn 3072 -> 48 + 2112 + 3072 + 1320
    assert fl.backward_dense == 6552
    # full recompute adds one forward of the layers (mha + ffn)
    fl = E.estimate_flops(cfg_of(tiny_model(), micro_batch_size=2, recompute_granularity="full"))
    assert fl.recompute == mha + ffn


class _PlainBlock(nn.Module):
    """Attention + MLP of one transformer layer in plain torch, with the Q/K/V columns split
    into N head groups and fc1 rows / fc2 columns split into N slices as separate tensors,
    so a slice can be frozen (requires_grad=False) on its own."""

    def __init__(self, h, heads, f, N):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda *shape: nn.Parameter(torch.randn(*shape, generator=g) * 0.1)  # noqa: E731
        self.h, self.heads, self.N = h, heads, N
        self.wq = nn.ParameterList(r(h // N, h) for _ in range(N))
        self.wk = nn.ParameterList(r(h // N, h) for _ in range(N))
        self.wv = nn.ParameterList(r(h // N, h) for _ in range(N))
        self.wo = r(h, h)
        self.w1 = nn.ParameterList(r(f // N, h) for _ in range(N))
        self.w2 = nn.ParameterList(r(h, f // N) for _ in range(N))

    def forward(self, x):
        B, S, h = x.shape
        d = h // self.heads

        def heads(ws):
            return torch.cat([F.linear(x, w) for w in ws], -1).view(B, S, self.heads, d).transpose(1, 2)

        q, k, v = heads(self.wq), heads(self.wk), heads(self.wv)
        a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1)
        u = (a @ v).transpose(1, 2).reshape(B, S, h)
        x = x + F.linear(u, self.wo)
        return x + sum(F.linear(F.gelu(F.linear(x, w1)), w2) for w1, w2 in zip(self.w1, self.w2))


def _measure(block, x):
    with FlopCounterMode(display=False) as fwd:
        y = block(x)
    with FlopCounterMode(display=False) as bwd:
        y.square().sum().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("N,slice_heads", [(2, False), (4, False), (4, True)])
def test_flops_match_torch_flop_counter(N, slice_heads):
    B, S, h, heads, f = 2, 8, 16, 4, 64
    model = E.ModelShape(num_layers=1, hidden_size=h, num_attention_heads=heads, ffn_hidden_size=f,
                         vocab_size=8, make_vocab_size_divisible_by=1, seq_length=S)
    tokens = B * S

    # Full backward: every weight and the input require grad.
    full = _PlainBlock(h, heads, f, N)
    x = torch.randn(B, S, h, requires_grad=True)
    fwd_full, bwd_full = _measure(full, x)
    dense = E.layer_flop_terms(cfg_of(model, slices=1), tokens)
    assert fwd_full == sum(c["forward"] for c in dense.values())
    assert bwd_full == sum(c["dgrad"] + c["wgrad"] for c in dense.values())

    # PPU backward: only slice 0 of the MLP (and of Q/K/V when heads are sliced) trains.
    ppu = _PlainBlock(h, heads, f, N)
    frozen = [ppu.w1, ppu.w2] + ([ppu.wq, ppu.wk, ppu.wv] if slice_heads else [])
    for plist in frozen:
        for w in list(plist)[1:]:
            w.requires_grad_(False)
    x = torch.randn(B, S, h, requires_grad=True)  # the input Jacobian is still needed
    fwd_ppu, bwd_ppu = _measure(ppu, x)
    assert fwd_ppu == fwd_full  # the forward pass stays full
    terms = E.layer_flop_terms(cfg_of(model, slices=N, replicas=N, slice_attention_heads=slice_heads),
                               tokens)
    predicted_saving = sum(c["wgrad"] * (1 - c["rho"]) for c in terms.values())
    assert bwd_full - bwd_ppu == predicted_saving
    # and by hand: 1/N of the 4 B S h f MLP weight-gradient FLOPs remain
    hand = (1 - 1 / N) * 4 * tokens * h * f + ((1 - 1 / N) * 6 * tokens * h * h if slice_heads else 0)
    assert bwd_full - bwd_ppu == hand


@pytest.mark.timeout(60)
def test_fifteen_percent_fewer_flops():
    # Paper App. C.2 closed form per token for the 1.3B model (B = S-independent except attention):
    S, H, L, D, V = 1024, 2048, 24, 8192, 32000

    def per_token(rho_mlp, rho_attn):
        fwd = H + L * (8 * H * H + 4 * S * H + 4 * H * D) + 2 * H * V + 3 * V
        bwd = (2 * H + L * (8 * S * H + (10 + 6 * rho_attn) * H * H + 4 * H * D * (1 + rho_mlp))
               + 2 * (2 * H * V + 3 * V))
        return fwd + bwd

    full = per_token(1, 1)
    expected = {"1/4 mlps": per_token(0.25, 1) * 26 / (full * 26),
                "1/2 mlps": per_token(0.5, 1) * 26 / (full * 28),
                "1/2 mlps + 1/2 heads": per_token(0.5, 0.5) * 28 / (full * 28),
                "1/4 mlps + 1/4 heads": per_token(0.25, 0.25) * 28 / (full * 26)}
    comps = E.paper_flops_comparisons()
    assert {c.ours for c in comps} == set(expected)
    for c in comps:
        assert c.total_flops_ratio == pytest.approx(expected[c.ours], rel=1e-12)
        assert 13 < c.fewer_percent < 17  # "consistently 15 % fewer"
    quarter = next(c for c in comps if c.ours == "1/4 mlps")
    assert quarter.fewer_percent == pytest.approx(15, abs=0.5)


# ---------------------------------------------------------------- the paper's table


@pytest.mark.timeout(60)
def test_paper_table_reproduced():
    rows = {r.name: r for r in E.paper_table()}
    assert len(rows) == 7
    for name, n, heads, tok, ppl, mem, trn in E.PAPER_TABLE_1:
        r = rows[name]
        # the table rounds to 2 digits ("1.3" for the full model)
        assert r.trainable_b == pytest.approx(trn, rel=0.025), name
        assert r.memory_gb == pytest.approx(mem, rel=0.02), name  # "within a few percent"
    for name in rows:
        if name != "Streaming DiLoCo":
            assert rows[name].memory_gb == pytest.approx(rows[name].paper_memory_gb, rel=0.01)
    # §2.1: "roughly 18 GB" for full-model training without an outer optimizer (DDP)
    check = E.paper_comm_check()
    assert check.ddp_memory_gb == pytest.approx(18, rel=0.02)
    # App. B: 1.75 s per DDP step at 2.875 GB/s, 0.0175 s amortised; §3.2 "roughly 2x"
    assert check.ddp_comm_s_nominal == pytest.approx(1.75, rel=0.005)
    assert check.ddp_comm_s_model == pytest.approx(1.75, rel=0.03)
    assert check.amortized_sync_s == pytest.approx(0.0175, rel=0.03)
    assert 1.8 < check.speedup < 2.5


# ---------------------------------------------------------------- communication


@pytest.mark.timeout(60)
def test_ring_allreduce_formula():
    # App. B: 2 (K-1)/K * M / B with M = 2 bytes * 1.3e9, K = 32, B = 2.875e9 B/s
    assert E.ring_allreduce_time(2.6e9, 32, 2.875e9) == pytest.approx(2 * 31 / 32 * 2.6 / 2.875)
    assert E.ring_allreduce_time(2.6e9, 32, 2.875e9) == pytest.approx(1.75, abs=0.005)
    assert E.ring_allreduce_bytes_sent(100.0, 1) == 0.0  # nobody to talk to
    assert E.ring_allreduce_bytes_sent(100.0, 2) == 100.0  # send half, then the other half
    assert E.ring_allreduce_bytes_sent(100.0, 4) == 150.0
    with pytest.raises(ValueError, match="bandwidth"):
        E.ring_allreduce_time(1.0, 2, 0.0)


@pytest.mark.timeout(60)
def test_comm_and_simulated_time_by_hand():
    # tiny model: 256 params; paper precision sends bf16: M = 512 bytes; K = 4, B = 64 B/s
    cfg = cfg_of(tiny_model(), replicas=4, local_steps=10, micro_batch_size=2)
    c = E.estimate_communication(cfg, 64.0)
    assert c.ddp_grad_bytes == c.sync_bytes == 512
    assert c.sync_bytes_sent == 2 * 3 / 4 * 512 == 768
    assert c.sync_s == 768 / 64 == 12.0
    assert c.amortized_sync_s == 1.2
    # low-comm: compute + sync/H, no overlap; tokens/step = 4 replicas * 2 * 3 = 24
    t = E.simulate_step_time(cfg, 64.0, compute_s_per_step=0.5, tokens=240)
    assert t.step_s == pytest.approx(0.5 + 1.2)
    assert (t.global_tokens_per_step, t.steps) == (24, 10)
    assert t.time_to_tokens_s == pytest.approx(17.0)
    # DDP: max(compute, comm) with perfect overlap
    ddp = cfg_of(tiny_model(), replicas=4, outer_optimizer=False)
    assert E.simulate_step_time(ddp, 64.0, 0.5).step_s == 12.0
    assert E.simulate_step_time(ddp, 64.0, 20.0).step_s == 20.0


# ---------------------------------------------------------------- bad configs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs,model_kw,match", [
    (dict(slices=4, replicas=6), {}, "does not divide the number of replicas"),
    (dict(slices=3, replicas=3), {}, "divisible by --ppu-slices 3"),
    (dict(slices=4, replicas=4, slice_attention_heads=True), {}, "head groups"),
    (dict(slices=2, tensor_model_parallel_size=2), dict(ffn_hidden_size=4 * 2 + 2), "multiple of 4"),
    (dict(slice_attention_heads=True), {}, "need --ppu-slices > 1"),
    (dict(pipeline_model_parallel_size=2), {}, "divide num_layers"),
    (dict(tensor_model_parallel_size=4), {}, "lower the TP size"),
    (dict(streaming_fragments=2), {}, "at most one fragment per layer"),
    (dict(slices=2, outer_optimizer=False), {}, "need the outer optimizer"),
    (dict(recompute_granularity="some"), {}, "recompute_granularity"),
    (dict(outer_state_placement="gpu"), {}, "outer_state_placement"),
    (dict(), dict(num_attention_heads=3), "hidden_size 4 is not divisible by num_attention_heads"),
    (dict(), dict(num_query_groups=3, num_attention_heads=2), "num_query_groups"),
    (dict(), dict(normalization="BatchNorm"), "normalization"),
    (dict(replicas=0), {}, "positive integer"),
])
def test_bad_configs_raise_with_the_fix(kwargs, model_kw, match):
    with pytest.raises(ValueError, match=match):
        cfg_of(tiny_model(**model_kw), **kwargs)


@pytest.mark.timeout(60)
def test_bad_precision_raises():
    with pytest.raises(ValueError, match="precision.grad_dtype"):
        cfg_of(tiny_model(), E.Precision(grad_dtype="fp8"))


# ---------------------------------------------------------------- CLI


@pytest.mark.timeout(60)
def test_cli_paper_table_and_json(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "estimate.py"
    spec = importlib.util.spec_from_file_location("estimate_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)

    assert cli.main(["--paper-table"]) == 0
    out = capsys.readouterr().out
    for name, *_rest in E.PAPER_TABLE_1:
        assert name in out
    assert "19.36" in out and "10.41" in out

    # the trainer's flags (its parser): a run given model flags needs --lr and --train-iters too
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--vocab-size", "100", "--mock-data",
            "--lr", "1e-3", "--train-iters", "10",
            "--ppu-slices", "2", "--ppu-slice-attention-heads", "--diloco-replicas", "4",
            "--diloco-streaming-fragments", "3", "--bandwidth-gbps", "8", "--bf16",
            "--step-compute-seconds", "0.1", "--json"]
    assert cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["ppu"]["slices"] == 2
    assert d["config"]["ppu"]["streaming_fragments"] == 2  # trainer's F=3 = embeddings + 2 layer groups
    assert d["comm"]["bandwidth_bytes_per_s"] == 1e9  # 8 Gbit/s = 1 GB/s
    assert d["memory_bytes"]["total"] > d["memory_bytes"]["model_state"] > 0
    assert d["time"]["step_s"] > 0.1

    with pytest.raises(SystemExit):
        cli.main(argv[:-1] + ["--diloco-replicas", "3"])
    assert "does not divide the number of replicas" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_outer_sync_bytes_follow_the_allreduce_dtype():
    # tiny model: 256 parameters on the rank (test_tiny_parameter_count_by_hand), K = 2 replicas
    n, k = 256, 2
    sync = {}
    for dtype in ("fp32", "bf16", "int8", "fp8"):
        pr = E.Precision(**{**E.Precision.paper().__dict__, "outer_comm_dtype": dtype})
        sync[dtype] = E.estimate_communication(cfg_of(tiny_model(), pr, replicas=k, quantization_block=64)).sync_bytes
    assert sync["fp32"] == 4 * n and sync["bf16"] == 2 * n
    # int8 / fp8: 1 byte per value + one fp32 scale per block of 64, each of the K chunks padded to
    # whole blocks: chunk = ceil(256 / (2 * 64)) * 64 = 128 values -> 2 x (128 + 4 * 128 / 64) = 272 bytes
    assert sync["int8"] == sync["fp8"] == 2 * (128 + 4 * 2) == 272
    # one replica: no collective; the payload is 256 + 4 * 4 scales
    pr = E.Precision(**{**E.Precision.paper().__dict__, "outer_comm_dtype": "int8"})
    assert E.estimate_communication(cfg_of(tiny_model(), pr, replicas=1, quantization_block=64)).sync_bytes == 272


@pytest.mark.timeout(120)
def test_shape_from_parsed_trainer_args():
    from megatron_ppu.training.arguments import parse_args

    argv = ["--mock-data", "--vocab-size", "100", "--num-layers", "4", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-3",
            "--train-iters", "5", "--swiglu", "--global-batch-size", "16", "--ppu-slices", "2",
            "--diloco-replicas", "2", "--diloco-streaming-fragments", "3", "--diloco-allreduce-dtype", "bf16"]
    cfg = E.shape_from_args(parse_args(argv, world_size=4), 4)
    # Megatron-LM's SwiGLU width: int(8 x 64 / 3 / 64) x 64 = 128 (not 4h = 256)
    assert cfg.model.ffn == 128 and cfg.model.vocab_size == 100
    # DP 4, micro-batch 2: 16 / (2 x 4) = 2 micro-batches; K = 2; F = 3 is embeddings + 2 layer groups
    assert cfg.train.num_microbatches == 2 and cfg.ppu.replicas == 2 and cfg.ppu.streaming_fragments == 2
    assert cfg.ppu.local_steps == 50  # the trainer's default H
    assert cfg.precision.outer_comm_dtype == "bf16" and cfg.ppu.slices == 2
    ddp = E.shape_from_args(parse_args(argv[:-8] + ["--diloco-local-steps", "0"], world_size=4), 4)
    assert not ddp.ppu.outer_optimizer and ddp.ppu.replicas == 4  # DDP all-reduces over every DP rank
