"""Megatron-LM parity of seeding, learning-rate schedule and sequence-parallel norms, each
against an independent reference.

* pipeline stages are seeded as Megatron-LM does (``seed + 100 x pipeline rank``, also for the
  model-parallel RNG tracker that attention dropout forks);
* ``--lr-decay-style WSD`` with Megatron's ``--lr-wsd-decay-iters``/``--lr-wsd-decay-style``
  follows the hand-derived warm-up / stable / decay schedule;
* ``--sequence-parallel`` builds and trains with the library's torch norms without any CPU patch
  of Megatron's ``WrappedTorchNorm``, and the norm weights stay identical across TP ranks.
"""
import math

import pytest
import torch

from tests.conftest import TINY, _make_trainer as _trainer
from tests.harness import run_ranks

SEED = 1234  # TINY's --seed


# --------------------------------------------------------------------------- seeds per pipeline stage
def _stage_seed_worker(rank, world_size, argv):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    t = _trainer(argv)
    params = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    return {"pp_rank": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
            "params": params, "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}


def _normal(seed, shape, std):
    """What ``torch.manual_seed(seed)`` and one normal(0, std) initialisation give in plain torch."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.init.normal_(torch.empty(*shape), mean=0.0, std=std)


def _corr(a, b):
    import torch

    a, b = a.double().flatten(), b.double().flatten()
    n = min(a.numel(), b.numel())
    return float(torch.corrcoef(torch.stack([a[:n], b[:n]]))[0, 1])


@pytest.mark.timeout(600)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the reference is Megatron's CPU initialisation "
                    "(use_cpu_initialization); on CUDA the weights come from the CUDA generators")
def test_pipeline_stages_are_seeded_like_megatron(tmp_path):
    import torch

    argv = TINY + ["--pipeline-model-parallel-size", "2", "--diloco-local-steps", "0", "--train-iters", "1",
                   "--data-cache-path", str(tmp_path / "cache")]
    res = sorted(run_ranks(2, "tests.test_megatron_parity:_stage_seed_worker", {"argv": argv}, timeout=500),
                 key=lambda r: r["pp_rank"])
    s0, s1 = res[0], res[1]
    assert (s0["pp_rank"], s1["pp_rank"]) == (0, 1)
    emb = s0["params"]["embedding.word_embeddings.weight"]  # stage 0's first initialised weight
    proj = s1["params"]["decoder.layers.0.self_attention.linear_proj.weight"]  # stage 1's first (see below)
    std, L = 0.02, 2
    std_out = std / math.sqrt(2 * L)  # Megatron's scaled init of output projections
    # Stage 1 is not a copy of stage 0 (before the fix: correlation 1.0 with the embedding's start).
    assert abs(_corr(proj / std_out, emb / std)) < 0.1
    # Independent reference: plain torch with Megatron-LM's seeds (initialize.py::_set_random_seed,
    # seed + 100 x pipeline rank; CPU initialisation draws the full weight from the default
    # generator). In Megatron's attention, linear_proj is built before linear_qkv, so it is the first
    # weight drawn on stage 1; the word embedding is the first on stage 0.
    assert torch.equal(emb, _normal(SEED, emb.shape, std))
    assert torch.equal(proj, _normal(SEED + 100, proj.shape, std_out))
    assert not torch.equal(proj, _normal(SEED, proj.shape, std_out))
    # The model-parallel RNG tracker (attention dropout, recompute) follows the stage's seed too:
    # Megatron's model_parallel_cuda_manual_seed(seed') keeps seed' + 2718 + tp_rank for it.
    for r in res:
        seed = SEED + 100 * r["pp_rank"]
        torch.manual_seed(seed + 2718 + r["tp_rank"])
        assert torch.equal(r["tracker"]["model-parallel-rng"], torch.get_rng_state())
        torch.manual_seed(seed)
        assert torch.equal(r["tracker"]["data-parallel-rng"], torch.get_rng_state())


# --------------------------------------------------------------------------- WSD learning-rate schedule
def _lr_worker(rank, world_size, runs, steps):
    out = []
    for argv in runs:
        t = _trainer(argv)
        lrs = []
        for _ in range(steps):
            lrs.append(t.optimizer.param_groups[0]["lr"])  # the lr the next optimizer step uses
            t.train_step()
        out.append(lrs)
    return out


def _wsd(i, *, lr, min_lr, warmup, decay, wsd, style):
    """Warm-up / stable / decay, hand-derived from Megatron-LM's documentation of WSD: linear
    warm-up from 0 over ``warmup`` steps, the peak until ``decay - wsd``, then ``wsd`` steps of
    annealing to ``min_lr``."""
    if i <= warmup:
        return lr * i / warmup
    if i <= decay - wsd:
        return lr
    r = (i - (decay - wsd)) / wsd
    coeff = {"linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r)),
             "exponential": 2 * 0.5 ** r - 1, "minus_sqrt": 1 - math.sqrt(r)}[style]
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.timeout(600)
def test_wsd_schedule_matches_hand_derived(tmp_path):
    iters, warmup, wsd = 10, 2, 4
    base = TINY + ["--diloco-local-steps", "0", "--train-iters", str(iters), "--lr-warmup-iters", str(warmup),
                   "--min-lr", "1e-4", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", str(wsd),
                   "--data-cache-path", str(tmp_path / "cache")]
    linear, default = run_ranks(1, "tests.test_megatron_parity:_lr_worker", {
        "runs": [base + ["--lr-wsd-decay-style", "linear"], base], "steps": iters}, timeout=500)[0]
    for got, style in ((linear, "linear"), (default, "exponential")):  # Megatron's default: exponential
        want = [_wsd(i, lr=1e-3, min_lr=1e-4, warmup=warmup, decay=iters, wsd=wsd, style=style)
                for i in range(iters)]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), style
    assert linear[7] != default[7]  # the style is passed through


def test_wsd_flags_are_validated():
    from megatron_ppu.training.arguments import parse_args

    base = TINY + ["--train-iters", "10"]
    with pytest.raises(ValueError, match="--lr-wsd-decay-iters"):
        parse_args(base + ["--lr-decay-style", "WSD"])
    with pytest.raises(ValueError, match="--lr-decay-style WSD"):
        parse_args(base + ["--lr-wsd-decay-iters", "4"])  # would be silently ignored
    with pytest.raises(ValueError, match="--lr-decay-style WSD"):
        parse_args(base + ["--lr-wsd-decay-style", "linear"])
    with pytest.raises(ValueError, match="--lr-wsd-decay-iters"):
        parse_args(base + ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "0"])
    with pytest.raises(SystemExit):  # argparse choices, as in Megatron-LM
        parse_args(base + ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4", "--lr-wsd-decay-style", "x"])
    samples = [x for x in base if x not in ("--train-iters", "10")] + ["--train-samples", "100"]
    with pytest.raises(ValueError, match="--lr-wsd-decay-samples"):  # Megatron-LM's sample-based WSD length
        parse_args(samples + ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4"])
    with pytest.raises(ValueError, match="--seed 0"):  # Megatron-LM: "Seed should be a positive integer"
        parse_args(base + ["--seed", "0"])
    a = parse_args(base + ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4"])
    assert (a.training.lr_wsd_decay_iters, a.training.lr_wsd_decay_style) == (4, "exponential")


# --------------------------------------------------------------------------- sequence-parallel norms
def _sp_worker(rank, world_size, runs):
    import torch
    from megatron.core.transformer import torch_norm

    # No CPU patch of Megatron's WrappedTorchNorm: undo one if some version of the patches applied it.
    original = getattr(torch_norm.WrappedTorchNorm.__new__, "__ppu_original__", None)
    if original is not None:
        torch_norm.WrappedTorchNorm.__new__ = staticmethod(original)
    out = []
    for argv in runs:
        t = _trainer(argv)
        from megatron_ppu.norms import TorchLayerNorm, TorchRMSNorm  # after the build: on old code the build fails first

        norms = {n: m for n, m in t.model.named_modules()
                 if "layernorm" in n.split(".")[-1] and list(m.parameters())}  # not the IdentityOp q/k norms
        info = {n: (type(m).__name__, isinstance(m, (TorchLayerNorm, TorchRMSNorm)),
                    all(getattr(p, "sequence_parallel", False) for p in m.parameters())) for n, m in norms.items()}
        losses = [t.train_step()["loss"] for _ in range(2)]
        values = {f"{n}.{k}": v.detach().clone() for n, m in norms.items() for k, v in m.named_parameters()}
        out.append({"info": info, "values": values, "losses": losses})
    return out


@pytest.mark.timeout(900)
def test_sequence_parallel_norms_without_cpu_patch(tmp_path):
    import torch

    base = TINY + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--diloco-local-steps", "0",
                   "--train-iters", "2", "--data-cache-path", str(tmp_path / "cache")]
    runs = [base + ["--normalization", "LayerNorm"], base + ["--normalization", "RMSNorm"]]
    r0, r1 = run_ranks(2, "tests.test_megatron_parity:_sp_worker", {"runs": runs}, timeout=800)
    for norm, a, b in zip(("LayerNorm", "RMSNorm"), r0, r1):
        names = set(a["info"])
        assert {"decoder.final_layernorm", "decoder.layers.0.input_layernorm",
                "decoder.layers.1.pre_mlp_layernorm"} <= names, names
        for n, (cls, ours, sp) in a["info"].items():
            assert ours and sp, (norm, n, cls)
            assert norm in cls, (norm, n, cls)
        assert all(l is not None and math.isfinite(l) for l in a["losses"] + b["losses"])
        assert a["values"].keys() == b["values"].keys()
        for k in a["values"]:
            # replicated across TP: identical only if the grads of each rank's sequence chunk were
            # all-reduced (Megatron's finalize_model_grads, for params marked sequence_parallel)
            assert torch.equal(a["values"][k], b["values"][k]), (norm, k)
            if k.endswith("weight"):
                assert not torch.equal(a["values"][k], torch.ones_like(a["values"][k])), (norm, k)  # it trained
