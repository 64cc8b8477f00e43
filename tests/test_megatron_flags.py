"""Megatron-LM launch flags: every flag implemented, accepted with a reason, or refused with one;
Megatron-LM's defaults outside the embedded default run; the implemented flags' meanings; and a
compatibility run of a dozen of Megatron-LM's own GPT configurations (flag lists copied below)."""
import math
import re

import pytest

from tests.harness import run_ranks

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "128"]
TINY = BASE + ["--lr", "1e-3", "--train-iters", "3", "--eval-iters", "1", "--log-interval", "1",
               "--diloco-local-steps", "0"]


def _parse(argv):
    from megatron_ppu.training.arguments import parse_args

    return parse_args(argv)


# --------------------------------------------------------------------------- every flag is known
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tag,count", [("core_v0.16.1", 680), ("core_v0.19.0", 845)])
def test_every_megatron_lm_flag_is_implemented_accepted_or_refused(tag, count):
    """Each of Megatron-LM's parser flags at ``tag``, given alone to the embedded run with the
    parser of that tag's flags: it parses (implemented or accepted with a logged reason) or is
    refused by name with a reason; never "unrecognized". Reference: Megatron-LM's own parser,
    dumped per tag (megatron_lm_flags_<tag>.py)."""
    from megatron_ppu.training.arguments import build_parser, implemented_flags, parse_args
    from megatron_ppu.training.megatron_lm_flags import table

    impl = implemented_flags()
    flags = table(tag)
    assert len(flags) == count
    parser = build_parser(megatron_lm_tag=tag)
    for flag, (_, _, nargs, _) in flags.items():
        if flag in impl:
            continue
        argv = [flag] + ({0: [], 1: ["7"], "?": ["7"], "*": ["7"], "+": ["7"]}.get(nargs) or ["7"] * nargs)
        try:
            a = parse_args(argv, parser=parser)
        except ValueError as e:
            msg = str(e)
            assert "unrecognized" not in msg, msg
            line = next(ln for ln in msg.splitlines() if ln.strip().startswith(flag))
            assert len(line.split(": ", 1)[1]) > 10, line  # a reason
            continue
        (got,) = [x for x in a.accepted if x[0] == flag]
        assert len(got[2]) > 10  # the reason logged at start-up


def test_flag_tables_per_tag_and_the_installed_version_picks_one():
    """Megatron-LM's parser from core_v0.16.1 to core_v0.19.0: 193 flags added, 28 removed
    (counted from the two dumps); every added flag has a verdict that names a feature (not the
    generic "not implemented" of an unclassified flag); the installed megatron-core (its package
    metadata, an independent reading) picks the table."""
    import importlib.metadata

    from megatron_ppu.training.arguments import build_parser, implemented_flags
    from megatron_ppu.training.megatron_compat import verdict
    from megatron_ppu.training.megatron_lm_flags import MEGATRON_LM_TAG, table, tag_for_version

    old, new = table("core_v0.16.1"), table("core_v0.19.0")
    added, removed = set(new) - set(old), set(old) - set(new)
    assert (len(added), len(removed)) == (193, 28)
    assert {"--legacy-tokenizer", "--tokenizer-hf-use-fast", "--use-legacy-models"} <= removed
    assert {"--eval-micro-batch-size", "--flight-recorder-dump-path", "--use-mup"} <= added
    impl = implemented_flags()
    for flag in sorted(added - set(impl)):
        kind, why = verdict(flag, True if new[flag][2] == 0 else "7", new)
        assert "not implemented by megatron_ppu (Megatron-LM's" not in why, (flag, why)
    assert [tag_for_version(v) for v in ("0.16.1", "0.16.0", "0.17.0rc0", "0.18.2", "0.19.2")] == \
        ["core_v0.16.1", "core_v0.16.1", "core_v0.19.0", "core_v0.19.0", "core_v0.19.0"]
    installed = importlib.metadata.version("megatron-core")
    want = "core_v0.16.1" if tuple(int(x) for x in installed.split(".")[:2]) < (0, 17) else "core_v0.19.0"
    assert MEGATRON_LM_TAG == want and build_parser().megatron_lm_tag == want
    other = ({"core_v0.16.1", "core_v0.19.0"} - {want}).pop()
    only_other = sorted(set(table(other)) - set(table(want)) - set(impl))[0]
    with pytest.raises(ValueError, match="unrecognized"):  # the installed version's parser, as Megatron-LM's
        _parse([only_other])


def test_unknown_flag_is_unrecognized_and_refusals_are_all_named_at_once():
    with pytest.raises(ValueError) as e:
        _parse(["--context-parallel-size", "2", "--num-experts", "8", "--no-such-flag",
                "--transformer-impl", "transformer_engine", "--rampup-batch-size", "8", "8", "1000"])
    msg = str(e.value)
    assert "--no-such-flag" in msg and "unrecognized" in msg
    assert "--context-parallel-size 2: context parallelism" in msg
    assert "--num-experts 8: mixture of experts" in msg
    assert "--transformer-impl transformer_engine: Transformer Engine" in msg
    assert "--rampup-batch-size 8 8 1000: batch-size ramp-up is not supported" in msg


def test_no_effect_flags_are_accepted_with_reason_and_default_values_of_refused_features():
    a = _parse(["--num-workers", "6", "--use-mcore-models", "--context-parallel-size", "1", "--ckpt-format",
                "torch_dist", "--manual-gc"])
    got = {f: why for f, _, why in a.accepted}
    assert set(got) == {"--num-workers", "--use-mcore-models", "--context-parallel-size", "--ckpt-format",
                        "--manual-gc"}
    assert "default" in got["--context-parallel-size"]
    with pytest.raises(ValueError, match="--ckpt-format torch: checkpoint format"):
        _parse(["--ckpt-format", "torch"])


def test_docs_flags_table_is_current():
    """docs/flags.md's table is the one generated from the classification (regenerate with
    `python tools/flags_table.py docs --write docs/flags.md`)."""
    import importlib.util

    from tests.harness import REPO

    spec = importlib.util.spec_from_file_location("flags_table", REPO / "tools" / "flags_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    text = (REPO / "docs" / "flags.md").read_text()
    assert text.split(tool.TABLE_BEGIN)[1].split(tool.TABLE_END)[0].strip() == tool.markdown_table().strip()


# --------------------------------------------------------------------------- defaults
# Megatron-LM's values where ours differ on purpose (documented in docs/flags.md).
DELIBERATE = {
    "--transformer-impl": "local",  # the only implementation with partial layers; TE is refused
    "--attention-backend": "auto",  # same meaning (repr of the enum in the dump)
    "--split": "969,30,1",  # Megatron-LM's validate_args sets None to '969, 30, 1'
    "--distributed-timeout-minutes": 10,
    "--num-query-groups": None,  # Megatron-LM's 1 is read only with --group-query-attention; same meaning
    "--disable-bias-linear": False,  # Megatron-LM stores it inverted (add_bias_linear=True); same meaning
}


def test_defaults_outside_the_embedded_run_are_megatron_lms():
    """Against Megatron-LM's parser (the generated table): every implemented flag that is also
    Megatron-LM's has Megatron-LM's default once a data or model flag is given."""
    import dataclasses

    from megatron_ppu.training.arguments import GROUPS, field_flag
    from megatron_ppu.training.megatron_lm_flags import MEGATRON_LM_FLAGS

    a = _parse(TINY)
    assert not a.embedded_default
    checked = 0
    for cls, group in zip(GROUPS, ("model", "training", "precision", "parallel", "data", "checkpoint")):
        for f in dataclasses.fields(cls):
            flag = field_flag(f)
            if flag not in MEGATRON_LM_FLAGS or flag in DELIBERATE or flag in TINY:  # TINY's are given
                continue
            ours = getattr(getattr(a, group), f.name)
            theirs = MEGATRON_LM_FLAGS[flag][3]
            assert ours == theirs, (flag, ours, theirs)
            checked += 1
    assert checked >= 40
    a = _parse(BASE + ["--lr", "1e-3", "--train-iters", "3"])
    t, c = a.training, a.checkpoint
    assert (t.adam_beta2, t.weight_decay, t.lr_decay_style, t.lr_warmup_iters, c.eval_iters, c.log_interval) == \
        (0.999, 0.01, "linear", 0, 100, 100)


def test_embedded_default_applies_only_without_data_and_model_flags():
    from megatron_ppu.training.arguments import EMBEDDED_DEFAULT

    e = _parse(["--ppu-slices", "2", "--lr", "1e-3"])
    assert e.embedded_default
    assert (e.model.num_layers, e.training.adam_beta2, e.training.weight_decay, e.training.lr_decay_style,
            e.training.lr_warmup_iters, e.checkpoint.eval_iters, e.checkpoint.log_interval) == \
        (4, 0.99, 0.1, "cosine", 30, 10, 10)
    assert e.training.lr == 1e-3  # given flags win over the named config
    for extra in (["--mock-data", "--vocab-size", "64"], ["--num-layers", "4"]):
        with pytest.raises(ValueError, match="required: Megatron-LM has no default"):
            _parse(["--ppu-slices", "2"] + extra)
    assert set(EMBEDDED_DEFAULT) >= {"adam_beta2", "weight_decay", "lr_decay_style", "lr_warmup_iters",
                                     "eval_iters", "log_interval"}


# --------------------------------------------------------------------------- schedules
def _megatron_lr(k, *, lr, min_lr, warmup_samples, decay_samples, gbs, style):
    """Megatron-LM's learning rate after k iterations, counted in samples as Megatron-LM does
    (get_optimizer_param_scheduler + OptimizerParamScheduler.get_lr), written out by hand."""
    n = k * gbs
    if warmup_samples > 0 and n <= warmup_samples:
        return lr * n / warmup_samples
    if n > decay_samples:
        return min_lr
    r = (n - warmup_samples) / (decay_samples - warmup_samples)
    coeff = 1.0 - r if style == "linear" else 0.5 * (math.cos(math.pi * r) + 1.0)
    return min_lr + coeff * (lr - min_lr)


def _scheduler_lrs(argv, gbs, steps):
    import torch

    from megatron_ppu.optimizer import build_param_scheduler
    from megatron_ppu.training.schedule import lr_schedule

    t = _parse(argv).training
    s = lr_schedule(t, gbs)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sch = build_param_scheduler(opt, lr=t.lr, min_lr=t.min_lr, warmup_steps=s["warmup_steps"],
                                decay_steps=s["decay_steps"], decay_style=t.lr_decay_style, init_lr=t.lr_warmup_init)
    out = []
    for _ in range(steps):
        sch.step(1)
        out.append(opt.param_groups[0]["lr"])
    return s, out


@pytest.mark.parametrize("flags,gbs,warm,decay", [
    (["--train-iters", "40", "--lr-decay-iters", "30", "--lr-warmup-fraction", "0.1"], 8, 0.1 * 30 * 8, 30 * 8),
    (["--train-samples", "300", "--lr-decay-samples", "200", "--lr-warmup-samples", "20"], 8, 20, 200),
    (["--train-samples", "300", "--lr-warmup-fraction", "0.05"], 8, 0.05 * 300, 300),
], ids=["iters-warmup-fraction", "samples", "samples-warmup-fraction"])
@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_lr_schedule_matches_megatron_lm_sample_counting(flags, gbs, warm, decay, style):
    argv = BASE + ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", style] + flags
    s, lrs = _scheduler_lrs(argv, gbs, 45)
    if "--train-samples" in flags:
        assert s["train_iters"] == 300 // gbs  # Megatron-LM: train_samples // global batch
    for k, got in enumerate(lrs, start=1):
        want = _megatron_lr(k, lr=1e-3, min_lr=1e-4, warmup_samples=warm, decay_samples=decay, gbs=gbs, style=style)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (k, got, want)


def test_schedule_flag_conflicts_are_megatron_lms_errors():
    base = BASE + ["--lr", "1e-3"]
    for extra, needle in ((["--train-iters", "5", "--lr-warmup-samples", "3"], "need sample-based"),
                          (["--train-samples", "50", "--lr-decay-iters", "3"], "need iteration-based"),
                          (["--train-iters", "5", "--lr-warmup-fraction", ".1", "--lr-warmup-iters", "2"],
                           "one of --lr-warmup-fraction"),
                          (["--train-iters", "5", "--train-samples", "50"], "mutually exclusive")):
        with pytest.raises(ValueError, match=needle):
            _parse(base + extra)


def test_dense_gpt_flops_is_megatron_lms_formula():
    from megatron_ppu.training.metrics import dense_gpt_flops

    # By hand, Megatron-LM's num_floating_point_operations for B=2, s=16, L=3, h=8, ffn=32, 2 heads
    # (kv 4, no GQA), vocab 64, no SwiGLU: 2*16*(3*(6*8*32*2 + 6*(8*24 + 8*16/2*2 + 8*8)) + 6*8*64)
    attn = 6 * (8 * (8 + 8 + 8) + 8 * 16 + 8 * 8)
    want = 2 * 16 * (3 * (6 * 8 * 32 * 2 + attn) + 6 * 8 * 64)
    got = dense_gpt_flops(batch_size=2, seq_length=16, num_layers=3, hidden_size=8, ffn_hidden_size=32,
                          num_attention_heads=2, num_query_groups=2, kv_channels=4, swiglu=False, padded_vocab_size=64)
    assert got == want


# --------------------------------------------------------------------------- implemented flags, end to end
def _flags_worker(rank, world_size, runs):
    """Run each argv; report what Megatron's meaning of the flags says should be visible."""
    import logging

    import torch

    from megatron_ppu.training.loop import run
    from megatron_ppu.training.metrics import params_norm

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("megatron_ppu.train")
    log.setLevel(logging.INFO)
    log.addHandler(Keep())
    out = []
    for argv in runs:
        del lines[:]
        t = run(argv)
        cfg = t.config
        groups = [{"lr": g["lr"], "max_lr": g.get("max_lr"), "embed": any(
            getattr(p, "is_embedding_or_output_parameter", False) for p in g["params"])}
            for g in t.optimizer.param_groups]
        rope = getattr(t.model, "rotary_pos_emb", None)
        out.append({
            "losses": list(t.losses), "ffn": cfg.ffn_hidden_size, "act": cfg.activation_func.__name__,
            "softmax_fp32": cfg.attention_softmax_in_fp32, "qk_scaling": cfg.apply_query_key_layer_scaling,
            "qk_layernorm": cfg.qk_layernorm, "rotary_interleaved": cfg.rotary_interleaved,
            "deterministic": cfg.deterministic_mode, "backend": cfg.attention_backend.name,
            "norm_eps": [m.eps for m in t.model.modules() if "norm" in type(m).__name__.lower() and hasattr(m, "eps")],
            "q_norm": any("q_layernorm" in n for n, _ in t.model.named_parameters()),
            "rope_dim": None if rope is None else int(rope.inv_freq.numel() * 2),
            "rope_inv_freq0": None if rope is None else float(rope.inv_freq[1]),
            "groups": groups, "params_norm": params_norm(t.model),
            "torch_norm": float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in t.model.parameters()))),
            "log": "\n".join(lines),
        })
    return out


@pytest.mark.timeout(900)
def test_implemented_flags_set_megatrons_fields_and_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    a = TINY + ["--position-embedding-type", "rope", "--rotary-percent", "0.5", "--rotary-base", "100",
                "--rotary-interleaved", "--qk-layernorm", "--squared-relu", "--attention-softmax-in-fp32",
                "--apply-query-key-layer-scaling", "--deterministic-mode", "--attention-backend", "unfused",
                "--decoupled-lr", "5e-4", "--decoupled-min-lr", "5e-5", "--lr-warmup-fraction", "0.5",
                "--log-params-norm", "--log-num-zeros-in-grad", "--log-throughput", "--log-timers-to-tensorboard",
                "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--tensorboard-dir", str(tb),
                "--num-workers", "4", "--use-mcore-models", "--norm-epsilon", "1e-6"]
    b = TINY + ["--swiglu"]
    r1, r2 = run_ranks(1, "tests.test_megatron_flags:_flags_worker", {"runs": [a, b]}, timeout=800)[0]
    assert (r1["act"], r1["softmax_fp32"], r1["qk_scaling"], r1["qk_layernorm"], r1["rotary_interleaved"],
            r1["deterministic"], r1["backend"], r1["q_norm"]) == \
        ("squared_relu", True, True, True, True, True, "local", True)
    assert r1["norm_eps"] and set(r1["norm_eps"]) == {1e-6}  # every norm, q/k norms included
    assert set(r2["norm_eps"]) == {1e-5}  # Megatron-LM's default
    assert r1["rope_dim"] == 8  # rotary_percent 0.5 of kv_channels 16
    assert r1["rope_inv_freq0"] == pytest.approx(1.0 / 100 ** (2 / 8))  # base 100 over the rotated 8 dims
    # decoupled LR: embedding/output groups peak at --decoupled-lr; after 3 of 3 iterations (warm-up
    # 1.5, linear decay over 1.5 more) every group sits at its own minimum
    emb = [g for g in r1["groups"] if g["embed"]]
    rest = [g for g in r1["groups"] if not g["embed"] and g["max_lr"] is not None]
    assert emb and rest and all(g["max_lr"] == 5e-4 for g in emb) and all(g["max_lr"] == 1e-3 for g in rest)
    assert all(g["lr"] == pytest.approx(5e-5) for g in emb) and all(g["lr"] == pytest.approx(0.0) for g in rest)
    assert r1["params_norm"] == pytest.approx(r1["torch_norm"], rel=1e-9)
    # Megatron-LM's default MLP width with SwiGLU: int(4h * 2/3 / 64) * 64 (h=64 -> 128)
    assert r2["ffn"] == 128 and r2["act"] == "silu" and not r2["softmax_fp32"]
    out = r1["log"]
    assert "accepted: --num-workers 4: batches are read in the training process" in out
    assert "accepted: --use-mcore-models: megatron_ppu always builds megatron-core models" in out
    assert re.search(r"learning rate: 6\.667E-04 .*params norm: [\d.]+ \| num zeros: [\d.]+ \| throughput per GPU", out)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"params-norm", "num-zeros", "throughput", "forward-backward-time", "optimizer-time",
            "mem-max-rss-bytes", "lm loss validation", "lm loss validation ppl"} <= tags, tags


# --------------------------------------------------------------------------- compatibility with Megatron-LM's configs
# Flag lists copied from Megatron-LM core_v0.16.1: tests/functional_tests/test_cases/gpt/<name>/model_config.yaml
# (MODEL_ARGS, turned into argv as its _run_training.sh does; ${...} paths replaced by placeholders) and
# examples/gpt3/train_gpt3_175b_distributed.sh, examples/llama/train_llama3_8b_h100_fp8.sh.
_FT_COMMON = (
    "--num-layers 12 --hidden-size 512 --num-attention-heads 8 --log-params-norm --log-num-zeros-in-grad "
    "--log-validation-ppl-to-tensorboard --log-timers-to-tensorboard --tensorboard-dir /out/tensorboard "
    "--micro-batch-size 4 --global-batch-size 32 --seq-length 1024 --max-position-embeddings 1024 --train-iters 50 "
    "--timing-log-level 0 --lr-decay-iters 320000 --save /out/ckpt --load /out/ckpt "
    "--data-path /data/text/the_pile/shard00/my-gpt3_00_text_document --vocab-file /data/bpe/vocab.json "
    "--merge-file /data/bpe/merges.txt --split 949,50,1 --distributed-backend nccl --lr 0.00015 "
    "--lr-decay-style cosine --min-lr 1e-05 --weight-decay 1e-2 --clip-grad 1.0 --lr-warmup-fraction 0.01 "
    "--log-interval 1 --save-interval 10000 --eval-interval 1000 --eval-iters 10").split()
_TE = "--no-gradient-accumulation-fusion --attention-softmax-in-fp32 --use-mcore-models --ckpt-format torch_dist"
CONFIGS = {
    "gpt3_mcore_tp1_pp2": "--transformer-impl local --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 "
    "--deterministic-mode --no-gradient-accumulation-fusion --use-mcore-models --ckpt-format torch_dist "
    "--dist-ckpt-optim-fully-reshardable --dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 "
    "--apply-query-key-layer-scaling --log-memory-to-tensorboard",
    "gpt3_mcore_tp1_pp2_fp16": "--transformer-impl local --tensor-model-parallel-size 1 "
    "--pipeline-model-parallel-size 2 --deterministic-mode --no-gradient-accumulation-fusion --use-mcore-models "
    "--ckpt-format torch_dist --dist-ckpt-strictness log_all --data-cache-path /out/cache --fp16 "
    "--apply-query-key-layer-scaling --log-memory-to-tensorboard",
    "gpt3_mcore_te_tp2_pp2": "--transformer-impl transformer_engine --tensor-model-parallel-size 2 "
    "--pipeline-model-parallel-size 2 --deterministic-mode " + _TE + " --dist-ckpt-optim-fully-reshardable "
    "--dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 --attention-backend unfused "
    "--log-memory-to-tensorboard",
    "gpt3_mcore_te_tp1_pp4_swiglu": "--transformer-impl transformer_engine --tensor-model-parallel-size 1 "
    "--pipeline-model-parallel-size 4 --swiglu --ckpt-fully-parallel-load --async-save --deterministic-mode " + _TE +
    " --dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 --attention-backend unfused "
    "--log-memory-to-tensorboard",
    "gpt3_mcore_te_tp1_pp2_rope_embeddings_interleaved_no_fusion": "--transformer-impl transformer_engine "
    "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --position-embedding-type rope "
    "--rotary-interleaved --no-rope-fusion --deterministic-mode " + _TE + " --dist-ckpt-optim-fully-reshardable "
    "--dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 --attention-backend unfused "
    "--log-memory-to-tensorboard",
    "gpt3_mcore_te_tp4_pp1_qk_layernorm_test_mode": "--transformer-impl transformer_engine "
    "--tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --qk-layernorm --test-mode --deterministic-mode "
    + _TE + " --dist-ckpt-optim-fully-reshardable --dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 "
    "--attention-backend unfused --log-memory-to-tensorboard",
    "gpt3_mcore_te_tp1_pp1_uniform_full_recompute": "--transformer-impl transformer_engine "
    "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --recompute-granularity full "
    "--recompute-method uniform --recompute-num-layers 1 --deterministic-mode " + _TE +
    " --dist-ckpt-optim-fully-reshardable --dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 "
    "--attention-backend unfused --log-memory-to-tensorboard",
    "gpt3_mcore_te_tp1_pp4_untie_embeddings_and_outputs": "--transformer-impl transformer_engine "
    "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --untie-embeddings-and-output-weights "
    "--deterministic-mode " + _TE + " --dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 "
    "--attention-backend unfused --log-memory-to-tensorboard",
    # refused features (the message must name them)
    "gpt3_mcore_te_tp2_pp1_cp2_nondeterministic": "--transformer-impl transformer_engine "
    "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --context-parallel-size 2 --sequence-parallel "
    "--hidden-dropout 0.0 --attention-dropout 0.0 " + _TE + " --dist-ckpt-optim-fully-reshardable "
    "--dist-ckpt-strictness log_all --data-cache-path /out/cache --bf16 --attention-backend flash "
    "--log-memory-to-tensorboard",
    "gpt3_mcore_te_tp1_pp4_vp1_decoupled_lr": "--transformer-impl transformer_engine --tensor-model-parallel-size 1 "
    "--pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 1 --decoupled-lr 0.0002 "
    "--deterministic-mode --no-gradient-accumulation-fusion --attention-softmax-in-fp32 --ckpt-format torch "
    "--data-cache-path /out/cache --bf16 --attention-backend unfused --log-memory-to-tensorboard",
    "gpt3_mcore_tp1_pp1_fsdp2_resume_torch_dist_te": "--transformer-impl transformer_engine "
    "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --use-torch-fsdp2 --deterministic-mode "
    "--no-gradient-accumulation-fusion --no-async-tensor-model-parallel-allreduce "
    "--use-checkpoint-opt_param-scheduler --use-mcore-models --ckpt-format torch_dist "
    "--dist-ckpt-optim-fully-reshardable --dist-ckpt-strictness log_all --data-cache-path /out/cache --fp16 "
    "--apply-query-key-layer-scaling --log-memory-to-tensorboard",
}
CONFIGS = {k: _FT_COMMON + v.split() for k, v in CONFIGS.items()}
CONFIGS["gpt3_mcore_te_tp2_pp2_mla"] = (
    "--num-layers 4 --hidden-size 512 --num-attention-heads 8 --multi-latent-attention --q-lora-rank 192 "
    "--kv-lora-rank 64 --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16 --micro-batch-size 4 "
    "--global-batch-size 32 --seq-length 1024 --max-position-embeddings 1024 --train-iters 50 --lr 0.00015 "
    "--lr-warmup-fraction 0.01 --transformer-impl transformer_engine --tensor-model-parallel-size 2 "
    "--pipeline-model-parallel-size 2 --sequence-parallel --untie-embeddings-and-output-weights --bf16").split()
CONFIGS["examples/gpt3/train_gpt3_175b_distributed.sh"] = (
    "--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048 "
    "--attention-backend auto --micro-batch-size 1 --global-batch-size 1536 --rampup-batch-size 16 16 5859375 "
    "--train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 "
    "--clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001 "
    "--lr-decay-iters 430000 --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 "
    "--data-path /data/x_text_document --vocab-file /data/vocab.json --merge-file /data/merges.txt --split 949,50,1 "
    "--log-interval 100 --save-interval 10000 --eval-interval 1000 --save /ck --load /ck --eval-iters 10 "
    "--tensorboard-dir /tb").split()
CONFIGS["examples/llama/train_llama3_8b_h100_fp8.sh"] = (
    "--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
    "--group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length 8192 --max-position-embeddings 8192 "
    "--position-embedding-type rope --rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0 "
    "--hidden-dropout 0.0 --swiglu --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p "
    "--untie-embeddings-and-output-weights --disable-bias-linear --micro-batch-size 1 --global-batch-size 128 "
    "--train-samples 1953125000 --lr-decay-samples 1949218748 --lr-warmup-samples 3906252 --lr 0.00015 "
    "--min-lr 0.00001 --decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine --clip-grad 1.0 "
    "--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16 "
    "--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1 "
    "--exit-duration-in-mins 235 --fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max "
    "--fp8-param-gather --tensor-model-parallel-size 1 --context-parallel-size 1 --use-distributed-optimizer "
    "--overlap-grad-reduce --overlap-param-gather --mock-data --vocab-size 128256 --tokenizer-type NullTokenizer "
    "--log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput "
    "--profile --profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60 "
    "--save /ck --load /ck --tensorboard-dir /tb").split()

# The feature each refused configuration must be refused by (as written in the message).
REFUSED_BY = {
    "gpt3_mcore_te_tp2_pp1_cp2_nondeterministic": "context parallelism",
    "gpt3_mcore_te_tp1_pp4_vp1_decoupled_lr": "virtual pipeline stages",
    "gpt3_mcore_tp1_pp1_fsdp2_resume_torch_dist_te": "FSDP",
    "gpt3_mcore_te_tp2_pp2_mla": "multi-latent attention",
    "examples/gpt3/train_gpt3_175b_distributed.sh": "batch-size ramp-up",
    "examples/llama/train_llama3_8b_h100_fp8.sh": "FP8 training",
}
# Flags that only select files, places or kernels absent here; dropped or replaced for the CPU run.
_DROP_WITH_VALUE = {"--data-path", "--vocab-file", "--merge-file", "--split", "--data-cache-path", "--save", "--load",
                    "--tensorboard-dir", "--tokenizer-type", "--vocab-size", "--save-interval"}
SCALE = {"--num-layers": "2", "--hidden-size": "64", "--num-attention-heads": "4", "--seq-length": "32",
         "--max-position-embeddings": "32", "--micro-batch-size": "2", "--global-batch-size": "2",
         "--train-iters": "2", "--eval-iters": "1", "--tensor-model-parallel-size": "1",
         "--pipeline-model-parallel-size": "1", "--transformer-impl": "local", "--ffn-hidden-size": "128",
         "--num-query-groups": "2", "--kv-channels": "16"}


def scaled_down(argv, tb):
    """The configuration for a 2-iteration, 1-rank CPU run: sizes scaled down, TP/PP 1, mock data,
    TensorBoard in a temporary folder, --transformer-impl local (Transformer Engine is refused)."""
    out, i = [], 0
    while i < len(argv):
        f = argv[i]
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if f in _DROP_WITH_VALUE:
            i += 2
            continue
        if f == "--sequence-parallel":
            i += 1
            continue
        out.append(f)
        if has_value:
            out.append(SCALE.get(f, argv[i + 1]))
            i += 2
        else:
            i += 1
    return out + ["--mock-data", "--vocab-size", "128", "--tensorboard-dir", str(tb), "--diloco-local-steps", "0"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_megatron_lm_config_parses_or_is_refused_by_feature(name):
    """Megatron-LM's flag list as written: it parses, or every offending flag is refused with the
    feature it needs; no flag is ever unrecognized."""
    try:
        _parse(CONFIGS[name])
    except ValueError as e:
        msg = str(e)
        assert "unrecognized" not in msg, msg
        if name in REFUSED_BY:
            assert REFUSED_BY[name] in msg, msg
        else:  # in scope: refused only for Transformer Engine layers (use --transformer-impl local)
            assert "refused rather than ignored" in msg, msg
            refused = {ln.split()[0] for ln in msg.splitlines() if ln.startswith("  --")}
            assert refused == {"--transformer-impl"}, msg


def _megatron_lm_configs(tag):
    import json
    import shlex

    from tests.harness import REPO

    d = json.loads((REPO / "tests" / "fixtures" / f"megatron_lm_gpt_configs_{tag}.json").read_text())
    assert d["tag"] == tag
    return {name: shlex.split(argv) for name, argv in d["configs"].items()}


@pytest.mark.timeout(600)
def test_every_megatron_lm_core_v0_19_0_gpt_config_parses_or_is_refused_by_feature():
    """All 205 GPT functional-test configurations of Megatron-LM core_v0.19.0 (MoE and inference
    ones included; the fixture is their MODEL_ARGS as argv, written from Megatron-LM's files by
    benchmarks/megatron_configs.py --dump-argv), parsed with the core_v0.19.0 flags: each parses,
    or every offending flag is refused with a reason that names a feature; none is unrecognized
    and none refused only as "not implemented"."""
    from megatron_ppu.training.arguments import build_parser, parse_args

    configs = _megatron_lm_configs("core_v0.19.0")
    assert len(configs) == 205
    parser = build_parser(megatron_lm_tag="core_v0.19.0")
    outcomes = {}
    for name, argv in sorted(configs.items()):
        try:
            parse_args(argv, parser=parser, world_size=None)
            outcomes[name] = "parsed"
        except ValueError as e:
            msg = str(e)
            assert "unrecognized" not in msg, (name, msg)
            assert msg.startswith("unsupported Megatron-LM feature(s), refused"), (name, msg)
            lines = [ln for ln in msg.splitlines() if ln.startswith("  --")]
            assert lines, (name, msg)
            for ln in lines:
                assert "not implemented by megatron_ppu (Megatron-LM's" not in ln, (name, ln)
            outcomes[name] = "refused"
    # the dense configurations with local layers train here (among them the local-layer tp1_pp2 ones)
    assert outcomes["gpt3_mcore_tp1_pp2"] == "parsed"
    assert sum(o == "parsed" for o in outcomes.values()) >= 13


def _compat_worker(rank, world_size, runs):
    from megatron_ppu.training.loop import run

    return [list(run(argv).losses) for argv in runs]


@pytest.mark.timeout(900)
def test_in_scope_megatron_lm_configs_train_two_iterations_on_cpu(tmp_path):
    names = [n for n in sorted(CONFIGS) if n not in REFUSED_BY]
    runs = [scaled_down(CONFIGS[n], tmp_path / f"tb{i}") for i, n in enumerate(names)]
    for r in runs:
        _parse(r)  # every flag of the scaled-down list is implemented or accepted
    res = run_ranks(1, "tests.test_megatron_flags:_compat_worker", {"runs": runs}, timeout=850)[0]
    for name, losses in zip(names, res):
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (name, losses)


# --------------------------------------------------------------------------- --calculate-per-token-loss
def _per_token_worker(rank, world_size, argv):
    """Gradients of one step on two micro-batches with different numbers of loss tokens, in
    default mode per micro-batch and in --calculate-per-token-loss mode for both together."""
    import torch

    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.loop import Trainer, init_distributed

    init_distributed()

    def grads(extra, batches):
        t = Trainer.from_args(parse_args(argv + extra))
        t.ddp.zero_grad_buffer()
        t._run_schedule([{k: v.clone() for k, v in b.items()} for b in batches], forward_only=False)
        return torch.cat([p.main_grad.flatten().clone() for p in t.model.parameters() if p.requires_grad])

    t = Trainer.from_args(parse_args(argv))
    batches = t.batches.next_step(2)
    batches[0]["loss_mask"][:, 8:] = 0.0  # micro-batch 0 keeps 2 x 8 loss tokens, micro-batch 1 all 2 x 32
    n = [float(b["loss_mask"].sum()) for b in batches]
    g0, g1 = grads([], batches[:1]), grads([], batches[1:])  # each micro-batch's per-token-mean gradient
    mean_of_means = grads([], batches)
    per_token = grads(["--calculate-per-token-loss"], batches)
    return {"n": n, "g0": g0.tolist(), "g1": g1.tolist(), "default": mean_of_means.tolist(),
            "per_token": per_token.tolist()}


@pytest.mark.timeout(900)
def test_calculate_per_token_loss_weights_micro_batches_by_their_tokens():
    import torch

    argv = TINY + ["--global-batch-size", "4", "--hidden-dropout", "0", "--attention-dropout", "0"]
    r = run_ranks(1, "tests.test_megatron_flags:_per_token_worker", {"argv": argv}, timeout=800)[0]
    g0, g1 = torch.tensor(r["g0"], dtype=torch.float64), torch.tensor(r["g1"], dtype=torch.float64)
    n0, n1 = r["n"]
    assert (n0, n1) == (16.0, 64.0)
    # By linearity of the gradient: the mean of the two micro-batch means (Megatron's default) ...
    assert torch.allclose(torch.tensor(r["default"], dtype=torch.float64), (g0 + g1) / 2, rtol=1e-4, atol=1e-7)
    # ... and the mean over all 80 tokens, where micro-batch 1 weighs 4x as much (per-token loss).
    want = (n0 * g0 + n1 * g1) / (n0 + n1)
    got = torch.tensor(r["per_token"], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, (g0 + g1) / 2, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------- scheduler resume flags, mmap
@pytest.mark.parametrize("flag,want", [("--use-checkpoint-opt_param-scheduler", 2e-3),
                                       ("--override-opt_param-scheduler", 1e-3), (None, AssertionError)])
def test_scheduler_resume_flags_have_megatron_lms_meaning(flag, want):
    """A schedule saved with --lr 2e-3, resumed with --lr 1e-3: the checkpoint's (use-checkpoint),
    the flags' (override), or megatron-core's refusal of the mismatch (Megatron-LM's default)."""
    import torch

    from megatron_ppu.optimizer import build_param_scheduler

    def sched(lr, **kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        return opt, build_param_scheduler(opt, lr=lr, warmup_steps=0, decay_steps=10, decay_style="constant", **kw)

    _, old = sched(2e-3)
    t = _parse(TINY + ([flag] if flag else [])).training
    opt, new = sched(1e-3, use_checkpoint=t.use_checkpoint_opt_param_scheduler,
                     override=t.override_opt_param_scheduler)
    if want is AssertionError:
        with pytest.raises(AssertionError, match="do not match"):
            new.load_state_dict(old.state_dict())
        return
    new.load_state_dict(old.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(want)


def _mmap_worker(rank, world_size, runs):
    from megatron_ppu.training.loop import Trainer, init_distributed
    from megatron_ppu.training.arguments import parse_args

    init_distributed()
    return [type(Trainer.from_args(parse_args(argv)).train_ds.dataset.bin_reader).__name__ for argv in runs]


@pytest.mark.timeout(900)
def test_no_mmap_bin_files_reads_the_bin_without_a_memory_map(tiny_data):
    from tests.conftest import data_flags

    argv = BASE[:-3] + ["--lr", "1e-3", "--train-iters", "1", "--eval-iters", "1"] + data_flags(tiny_data)
    got = run_ranks(1, "tests.test_megatron_flags:_mmap_worker", {"runs": [argv, argv + ["--no-mmap-bin-files"]]},
                    timeout=800)[0]
    assert got == ["_MMapBinReader", "_FileBinReader"]


@pytest.mark.timeout(900)
def test_exit_duration_in_mins_stops_after_the_iteration_that_exceeds_it():
    """Megatron-LM's rule: stop after the first iteration whose end is past the limit (0 minutes:
    after iteration 1 of 3); without the flag all 3 run."""
    res = run_ranks(1, "tests.test_megatron_flags:_compat_worker",
                    {"runs": [TINY + ["--exit-duration-in-mins", "0"], TINY]}, timeout=800)[0]
    assert [len(r) for r in res] == [1, 3]
