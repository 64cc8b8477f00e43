"""megatron_ppu.attention.SDPAttention (torch's scaled_dot_product_attention) against megatron-core's
DotProductAttention, the module it replaces, and against a plain float64 PyTorch attention.

* equality: forward output and the gradients of query, key and value, dropout 0, for fp32 and bf16,
  MHA and GQA, TP 1 and 2 (2 gloo ranks, each holding its half of the heads), plus an explicit
  attention mask, --apply-query-key-layer-scaling, an explicit softmax scale and sequence parallelism.
  Tolerances, as the max abs difference over a tensor divided by the max abs of the float64
  reference's tensor (output, dq, dk, dv; entries O(1)): fp32 5e-6 (measured on CPU: at most 5.4e-7);
  bf16 2e-2 against DotProductAttention, whose scores and softmax are rounded to bf16 when the
  softmax is not in fp32 while the SDPA kernels accumulate in fp32, and 1.6e-2 (two bf16 units
  in the last place) against the float64 reference (measured: at most 8.8e-3 for either).
* dropout > 0: applied to the attention probabilities with 1/(1-p) scaling (read back exactly with
  value = identity), drawn from the model-parallel RNG tracker as DotProductAttention does (TP ranks
  draw different masks, none under sequence parallelism, the default generator untouched otherwise),
  reproducible with the same seed, replayed by activation recompute, off in eval mode.
* whole model: a tiny GPT trained 3 iterations with --attention-backend flash vs local (TP 1 and
  TP 2 + sequence parallelism, 2 ranks) gives the same losses within 1e-5 relative (fp32).
* flags: --attention-backend flash/fused and --use-flash-attn are accepted, --use-flash-attn and
  flash/fused are refused with --deterministic-mode, as in Megatron-LM.

PPU_TEST_DEVICE=cuda (scripts/gpu_check.py) runs the equality and dropout checks on the GPU, with
the flash and fused kernels forced for bf16 (the flash kernel has no fp32: fp32 uses auto there).
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.harness import run_ranks

S, B, HEADS, HEAD_DIM = 64, 2, 8, 16
TOL_FP32 = 5e-6
TOL_BF16_VS_DPA = 2e-2
TOL_BF16_VS_REF = 1.6e-2


def _device():
    from tests.gpt_utils import DEVICE

    return DEVICE


def _cases():
    cuda = _device().type == "cuda"
    out = []
    for tp in (1, 2):
        for dtype in ("float32", "bfloat16"):
            for gqa in (False, True):
                backends = ["auto"] if cuda and dtype == "float32" else (["flash", "fused"] if cuda else ["flash"])
                for be in backends:
                    out.append(dict(name=f"tp{tp}-{dtype}-{'gqa' if gqa else 'mha'}-{be}", tp=tp, dtype=dtype, gqa=gqa,
                                    backend=be, mask=False, qk_scaling=False, sp=False, softmax_scale=None))
    extra = [dict(name="tp1-float32-gqa-mask", tp=1, dtype="float32", gqa=True, mask=True),
             dict(name="tp2-bfloat16-mha-mask", tp=2, dtype="bfloat16", gqa=False, mask=True),
             dict(name="tp1-float32-qk-layer-scaling", tp=1, dtype="float32", gqa=False, qk_scaling=True),
             dict(name="tp2-bfloat16-gqa-qk-layer-scaling", tp=2, dtype="bfloat16", gqa=True, qk_scaling=True),
             dict(name="tp2-float32-softmax-scale", tp=2, dtype="float32", gqa=True, softmax_scale=0.3),
             dict(name="tp2-bfloat16-gqa-sp", tp=2, dtype="bfloat16", gqa=True, sp=True)]
    for c in extra:
        full = {**dict(mask=False, qk_scaling=False, sp=False, softmax_scale=None), **c}
        full["backend"] = "auto" if cuda and (c["dtype"] == "float32" or c.get("mask")) else "flash"
        out.append(full)
    return out


def _config(tp, dtype, gqa, *, sp=False, qk_scaling=False, dropout=0.0):
    from megatron.core.transformer import TransformerConfig

    bf16 = dtype == "bfloat16"
    return TransformerConfig(
        num_layers=4, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=2 if gqa else None,
        ffn_hidden_size=4 * HEADS * HEAD_DIM, attention_dropout=dropout, hidden_dropout=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=sp, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=True, masked_softmax_fusion=False, apply_query_key_layer_scaling=qk_scaling,
        attention_softmax_in_fp32=qk_scaling)  # the trainer's default (False); layer scaling forces True


def _reference(q, k, v, mask, scale):
    """Plain float64 attention in megatron's layout: [s, b, np, hn] -> [s, b, np * hn]."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    masked = mask if mask is not None else torch.ones(q.size(0), k.size(0), dtype=torch.bool).triu(1).to(q.device)
    probs = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs, v)
    return out.reshape(q.size(0), q.size(1), -1)


def _run(module, q, k, v, mask, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad.detach() for t in (q, k, v)], out


def _equality_worker(rank, world_size, cases):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ppu.attention import SDPAttention
    from tests.gpt_utils import init_parallel

    dev = _device()
    results = {}
    for tp in (1, 2):
        init_parallel(tp)
        model_parallel_cuda_manual_seed(1234)
        for c in [c for c in cases if c["tp"] == tp]:
            dtype = getattr(torch, c["dtype"])
            cfg = _config(tp, c["dtype"], c["gqa"], sp=c["sp"], qk_scaling=c["qk_scaling"])
            kw = dict(config=cfg, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self",
                      softmax_scale=c["softmax_scale"])
            dpa, sdpa = DotProductAttention(**kw), SDPAttention(**kw, backend=c["backend"])
            np_, ng = HEADS // tp, (2 if c["gqa"] else HEADS) // tp
            g = torch.Generator().manual_seed(1000 * ps.get_tensor_model_parallel_rank() + len(results))
            q = torch.randn(S, B, np_, HEAD_DIM, generator=g)
            k, v = (torch.randn(S, B, ng, HEAD_DIM, generator=g) for _ in range(2))
            dout = torch.randn(S, B, np_ * HEAD_DIM, generator=g)
            mask = None
            if c["mask"]:  # causal plus right padding; key 0 is never masked (no all-masked query row)
                lengths = torch.tensor([S, S // 2 + 3])[:B]
                mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None] | \
                    (torch.arange(S)[None, None, None, :] >= lengths[:, None, None, None])
                mask = mask.to(dev)
            q, k, v, dout = (t.to(dev, dtype) for t in (q, k, v, dout))
            got, out = _run(sdpa, q, k, v, mask, dout)
            want, _ = _run(dpa, q, k, v, mask, dout)
            scale = c["softmax_scale"] or 1.0 / math.sqrt(HEAD_DIM)
            ref, _ = _run(lambda *a: _reference(*a, scale=scale), q, k, v, mask, dout)
            results[c["name"]] = {
                "shape": tuple(out.shape), "contiguous": out.is_contiguous(), "dtype": str(out.dtype),
                "vs_dpa": [float((a.float() - b.float()).abs().max()) for a, b in zip(got, want)],
                "vs_ref": [float((a.double() - b).abs().max()) for a, b in zip(got, ref)],
                "dpa_vs_ref": [float((a.double() - b).abs().max()) for a, b in zip(want, ref)],
                "ref_max": [float(b.abs().max()) for b in ref]}
    return results


@pytest.fixture(scope="module")
def equality():
    cases = _cases()
    return cases, run_ranks(2, "tests.test_attention:_equality_worker", {"cases": cases}, timeout=600)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [c["name"] for c in _cases()])
def test_sdpa_equals_dot_product_attention_forward_and_backward(equality, name):
    cases, per_rank = equality
    c = next(c for c in cases if c["name"] == name)
    for rank, res in enumerate(per_rank):
        r = res[name]
        np_ = HEADS // c["tp"]
        assert r["shape"] == (S, B, np_ * HEAD_DIM) and r["contiguous"] and r["dtype"] == f"torch.{c['dtype']}", r
        assert all(m > 0.05 for m in r["ref_max"]), r  # the tensors compared are not ~0
        if c["dtype"] == "float32":
            tol_dpa = tol_ref = TOL_FP32
        else:
            tol_dpa, tol_ref = TOL_BF16_VS_DPA, TOL_BF16_VS_REF
        what = ["output", "dq", "dk", "dv"]
        rel = {key: dict(zip(what, (d / m for d, m in zip(r[key], r["ref_max"])))) for key in ("vs_dpa", "vs_ref",
                                                                                                "dpa_vs_ref")}
        assert max(rel["vs_dpa"].values()) <= tol_dpa, (rank, rel)
        assert max(rel["vs_ref"].values()) <= tol_ref, (rank, rel)
        assert max(rel["dpa_vs_ref"].values()) <= tol_dpa, (rank, rel)  # the reference is megatron-core's too


# --------------------------------------------------------------------------- dropout
P = 0.5


def _dropout_worker(rank, world_size):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ppu.attention import SDPAttention
    from tests.gpt_utils import init_parallel

    dev = _device()
    init_parallel(2)
    out = {}
    rng_state = torch.cuda.get_rng_state if dev.type == "cuda" else torch.get_rng_state  # what dropout draws from
    # one head per rank, value = identity (sk = head dim): the output rows ARE the dropped-out probabilities
    s = hd = 64
    g = torch.Generator().manual_seed(7)  # the same inputs on both TP ranks
    q = torch.randn(s, 1, 1, hd, generator=g).to(dev)
    k = torch.randn(s, 1, 1, hd, generator=g).to(dev)
    v = torch.eye(s).reshape(s, 1, 1, hd).to(dev)
    scale = 1.0 / math.sqrt(hd)

    def seeded(seed):
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)

    def build(cls, sp, **kw):
        from megatron.core.transformer import TransformerConfig

        cfg = TransformerConfig(num_layers=1, hidden_size=2 * hd, num_attention_heads=2, ffn_hidden_size=8,
                                attention_dropout=P, tensor_model_parallel_size=2, sequence_parallel=sp,
                                use_cpu_initialization=True, masked_softmax_fusion=False)
        return cls(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", **kw)

    probs = _reference(q, k, v, None, scale).reshape(s, s).float()  # row i = softmax probabilities of query i
    for sp in (False, True):
        sdpa, dpa = build(SDPAttention, sp), build(DotProductAttention, sp)
        r = {}
        seeded(11)
        before = rng_state()
        a = sdpa(q, k, v, None).reshape(s, s)
        r["default_generator_untouched"] = torch.equal(before, rng_state())
        seeded(11)
        r["same_seed_same"] = torch.equal(a, sdpa(q, k, v, None).reshape(s, s))
        seeded(12)
        r["other_seed_differs"] = not torch.equal(a, sdpa(q, k, v, None).reshape(s, s))
        kept = a != 0
        causal = torch.ones(s, s, dtype=torch.bool).tril().to(dev)
        r["kept_are_scaled_probs"] = float((a[kept] - probs[kept] / (1 - P)).abs().max())
        r["nothing_above_diagonal"] = not bool(kept[~causal].any())
        r["dropped_fraction"] = float(1 - kept[causal].float().mean())
        sdpa.eval()
        r["eval_no_dropout"] = float((sdpa(q, k, v, None).reshape(s, s) - probs).abs().max())
        sdpa.train()
        # activation recompute (selective: core attention) replays the same mask in the backward pass
        seeded(13)
        qq = q.clone().requires_grad_(True)
        direct = sdpa(qq, k, v, None)
        direct.sum().backward()
        seeded(13)
        qc = q.clone().requires_grad_(True)
        ckpt = tensor_parallel.checkpoint(lambda x, kk, vv: sdpa(x, kk, vv, None), False, qc, k, v)
        ckpt.sum().backward()
        r["recompute_same_out"] = torch.equal(direct, ckpt)
        r["recompute_same_grad"] = torch.equal(qq.grad, qc.grad)
        seeded(11)
        r["sdpa_out"] = a.cpu()
        seeded(11)
        before = rng_state()
        r["dpa_out"] = dpa(q, k, v, None).reshape(s, s).cpu()
        r["dpa_default_generator_untouched"] = torch.equal(before, rng_state())
        out["sp" if sp else "no_sp"] = r
    return out


@pytest.mark.timeout(900)
def test_dropout_is_on_the_probabilities_reproducible_and_tp_aware_as_in_dot_product_attention():
    res = run_ranks(2, "tests.test_attention:_dropout_worker", {}, timeout=600)
    for rank, per in enumerate(res):
        for mode, r in per.items():
            ctx = (rank, mode)
            assert r["same_seed_same"] and r["other_seed_differs"], ctx
            assert r["kept_are_scaled_probs"] < 1e-5, (ctx, r["kept_are_scaled_probs"])
            assert r["nothing_above_diagonal"], ctx
            # 2,080 causal entries, each dropped with P = 0.5: the fraction's std is 0.011
            assert abs(r["dropped_fraction"] - P) < 0.06, (ctx, r["dropped_fraction"])
            assert r["eval_no_dropout"] < 1e-5, ctx
            assert r["recompute_same_out"] and r["recompute_same_grad"], ctx
            # the default generator is left alone exactly when DotProductAttention leaves it alone (tracker fork)
            assert r["default_generator_untouched"] == r["dpa_default_generator_untouched"] == (mode == "no_sp"), ctx
    for mode in ("no_sp", "sp"):
        # same inputs, same seeds: TP ranks draw different masks from the tracker, the same from the
        # default generator under sequence parallelism; DotProductAttention does the same
        same = torch.equal(res[0][mode]["sdpa_out"], res[1][mode]["sdpa_out"])
        same_dpa = torch.equal(res[0][mode]["dpa_out"], res[1][mode]["dpa_out"])
        assert same == same_dpa == (mode == "sp"), mode


# --------------------------------------------------------------------------- whole model
TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "2",
        "--lr", "1e-3", "--lr-warmup-iters", "1", "--eval-iters", "1", "--log-interval", "100",
        "--eval-interval", "100", "--train-iters", "3", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--diloco-local-steps", "0"]
MODEL_RUNS = {
    "tp1-flash": ["--attention-backend", "flash"],
    "tp1-local": ["--attention-backend", "local"],
    "tp1-default": [],
    "tp2-sp-flash": ["--attention-backend", "flash", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "tp2-sp-local": ["--attention-backend", "local", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
}


def _model_worker(rank, world_size, runs):
    from megatron_ppu.training.loop import run

    out = {}
    for name, argv in runs.items():
        t = run(argv)
        out[name] = {"losses": [float(x) for x in t.losses],
                     "core_attention": sorted({type(m).__name__ for n, m in t.model.named_modules()
                                               if n.endswith("core_attention")})}
    return out


@pytest.mark.timeout(900)
def test_tiny_gpt_trains_the_same_with_flash_and_local_attention():
    res = run_ranks(2, "tests.test_attention:_model_worker", {"runs": {k: TINY + v for k, v in MODEL_RUNS.items()}},
                    timeout=850)
    last = res[-1]  # the logger rank holds the losses
    for name in MODEL_RUNS:
        want = "DotProductAttention" if name.endswith("local") else "SDPAttention"  # the default is auto: SDPA
        assert all(r[name]["core_attention"] == [want] for r in res), (name, [r[name] for r in res])
        assert len(last[name]["losses"]) == 3 and all(math.isfinite(x) for x in last[name]["losses"]), last[name]
    for a, b in (("tp1-flash", "tp1-local"), ("tp1-default", "tp1-local"), ("tp2-sp-flash", "tp2-sp-local")):
        assert last[a]["losses"] == pytest.approx(last[b]["losses"], rel=1e-5), (a, last[a], last[b])
    assert last["tp1-default"]["losses"] == last["tp1-flash"]["losses"]  # auto and flash: the same kernel on CPU


# --------------------------------------------------------------------------- flags
BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "2", "--mock-data", "--vocab-size", "128"]


@pytest.mark.timeout(120)
def test_attention_flags_map_as_in_megatron_lm():
    from megatron_ppu.attention import SDPAttention, core_attention_for
    from megatron_ppu.training.arguments import parse_args

    assert parse_args(BASE).model.attention_backend == "auto"  # Megatron-LM's default
    for be in ("flash", "fused", "unfused", "local", "auto"):
        assert parse_args(BASE + ["--attention-backend", be]).model.attention_backend == be
        built = core_attention_for(be)
        assert getattr(built, "func", built).__name__ == ("SDPAttention" if be in ("auto", "flash", "fused")
                                                           else "DotProductAttention")
        if be in ("auto", "flash", "fused"):
            assert built.func is SDPAttention and built.keywords == {"backend": be}
    a = parse_args(BASE + ["--use-flash-attn"])  # accepted, logged with the reason; attention from --attention-backend
    assert a.model.attention_backend == "auto"
    assert [f for f, _, _ in a.accepted] == ["--use-flash-attn"] and "legacy" in a.accepted[0][2]
    with pytest.raises(ValueError, match="--use-flash-attn cannot be used with --deterministic-mode"):
        parse_args(BASE + ["--use-flash-attn", "--deterministic-mode"])
    for be in ("flash", "fused"):
        with pytest.raises(ValueError, match=f"--attention-backend {be} cannot be used with --deterministic-mode"):
            parse_args(BASE + ["--attention-backend", be, "--deterministic-mode"])
    parse_args(BASE + ["--deterministic-mode"])  # auto: torch's deterministic math kernel on CUDA
    with pytest.raises(ValueError, match="attention-backend"):
        core_attention_for("sdpa")


@pytest.mark.timeout(120)
def test_kernel_restriction_and_its_error_up_to_the_cuda_call():
    """What SDPAttention does on CUDA, on CPU tensors: the kernels each backend allows, the restricted call
    (the same result as torch's own choice) and the ValueError naming the flag when no allowed kernel can run
    (torch's CPU flash kernel has no dropout)."""
    from torch.nn.attention import SDPBackend

    from megatron_ppu.attention import _cuda_kernels, sdpa

    assert _cuda_kernels("auto", False) is None
    assert _cuda_kernels("flash", False) == [SDPBackend.FLASH_ATTENTION]
    assert _cuda_kernels("fused", False) == [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    assert _cuda_kernels("auto", True) == [SDPBackend.MATH]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=g) for _ in range(3))
    free = sdpa(q, k, v, None, 0.0, True, 0.25)
    forced = sdpa(q, k, v, None, 0.0, True, 0.25, [SDPBackend.FLASH_ATTENTION], "flash")
    ref = _reference(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), None, 0.25)
    assert torch.allclose(forced.permute(2, 0, 1, 3).reshape(32, 2, -1).double(), ref, atol=1e-5)
    assert torch.equal(free, forced)  # torch's CPU choice is its flash kernel
    with pytest.raises(ValueError, match=r"--attention-backend flash: none of torch's \['FLASH_ATTENTION'\] kernels"):
        sdpa(q, k, v, None, 0.5, True, 0.25, [SDPBackend.FLASH_ATTENTION], "flash")


@pytest.mark.timeout(600)
def test_attention_benchmark_runs_both_backends_and_writes_its_table(tmp_path):
    """benchmarks/attention.py as scripts/gpu_check.py runs it (there with --device cuda --dtype bf16), small."""
    import json
    import subprocess
    import sys

    from tests.harness import REPO

    p = subprocess.run([sys.executable, "benchmarks/attention.py", "--seq", "128", "256", "--repeats", "1",
                        "--heads", "2", "--head-dim", "32", "--out", str(tmp_path / "att")], cwd=str(REPO),
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "att.json").read_text())["rows"]
    assert sorted((r["seq"], r["module"]) for r in rows) == [
        (128, "DotProductAttention"), (128, "SDPAttention"), (256, "DotProductAttention"), (256, "SDPAttention")]
    assert all(r["step_s"] > 0 and r["peak_bytes"] >= 0 and r["score_matrix_bytes"] == 2 * r["seq"] ** 2 * 4
               for r in rows)
    md = (tmp_path / "att.md").read_text()
    assert "| 128 |" in md and "| 256 |" in md and "local / flash" in md
