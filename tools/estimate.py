#!/usr/bin/env python
"""Cost model CLI: memory / FLOPs / communication of a PPU, DiLoCo or DDP config.

    python tools/estimate.py --paper-table            # the paper's 1.3B table, predicted vs published
    python tools/estimate.py --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \\
        --seq-length 1024 --micro-batch-size 16 --vocab-size 32000 --bf16 \\
        --recompute-granularity full --ppu-slices 4 --diloco-replicas 32 \\
        --diloco-local-steps 100 --diloco-streaming-fragments 9 --bandwidth-gbps 23

Model and parallel flags have Megatron's names and defaults; flags this tool does
not know are listed on stderr and ignored, so a launch script's flags can be
pasted as they are. The arithmetic and its assumptions are in
``megatron_ppu/estimate.py``; see also docs/cost_model.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

try:
    from megatron_ppu import estimate as E
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_ppu import estimate as E
from megatron_ppu.comm import suggested_timeout_minutes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper-table", action="store_true",
                   help="print the paper's 1.3B / 32-node table next to the predictions")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    g = p.add_argument_group("model (Megatron flags)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--seq-length", type=int, default=1024)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, default=32000)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--use-flash-attn", action="store_true",
                   help="fused/flash attention: no s^2 activations stored")

    g = p.add_argument_group("batch, parallelism, precision (Megatron flags)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int,
                   help="default: micro-batch x replicas (no gradient accumulation)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron's shorthand for --recompute-granularity selective")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="counted like --bf16 (2-byte weights)")
    g.add_argument("--memory-model", choices=["megatron", "paper"], default="megatron",
                   help="megatron: bf16 weights + fp32 master/grads/Adam (with --bf16); "
                        "paper: fp32 weights, bf16 grads, fp32 Adam (reproduces Table 1)")
    g.add_argument("--grad-dtype", choices=sorted(E.DTYPE_BYTES), help="override the gradient dtype")
    g.add_argument("--outer-comm-dtype", choices=sorted(E.DTYPE_BYTES),
                   help="dtype of the outer deltas on the wire")

    g = p.add_argument_group("PPU / DiLoCo")
    g.add_argument("--ppu-slices", type=int, default=1, help="N (1 = plain DiLoCo)")
    g.add_argument("--ppu-slice-attention-heads", action="store_true")
    g.add_argument("--diloco-replicas", type=int, default=1, help="K nodes")
    g.add_argument("--diloco-local-steps", type=int, default=100, help="H")
    g.add_argument("--diloco-streaming-fragments", type=int, default=1,
                   help="F fragments as in pretrain_gpt_ppu.py: with F > 1, one fragment for "
                        "embeddings/output plus F-1 groups of layers (paper: 9 = 8 groups + 1)")
    g.add_argument("--ddp", action="store_true",
                   help="plain DDP: per-step gradient all-reduce, no outer optimizer")
    g.add_argument("--outer-state-placement", choices=["device", "stream", "host"],
                   help="default: stream when F > 1, else device")
    g.add_argument("--snapshot-scope", choices=["trainable", "all"], default="trainable")

    g = p.add_argument_group("time (paper §3.2 / App. B)")
    g.add_argument("--bandwidth-gbps", type=float,
                   help="peak per-link bandwidth in gigaBITS per second (23 = the paper's 2.875 GB/s)")
    g.add_argument("--bandwidth-gbytes", type=float,
                   help="peak per-link bandwidth in gigaBYTES per second (alternative)")
    g.add_argument("--step-compute-seconds", type=float,
                   help="measured compute time of one step on one GPU (paper: 0.44 s)")
    g.add_argument("--peak-tflops", type=float, help="with --mfu: derive the compute time from FLOPs")
    g.add_argument("--mfu", type=float, default=0.4)
    g.add_argument("--train-tokens", type=float, help="tokens to train for (time-to-tokens)")
    return p


def config_from_args(a) -> E.EstimateConfig:
    missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads") if getattr(a, f) is None]
    if missing:
        raise ValueError("missing " + ", ".join("--" + m.replace("_", "-") for m in missing)
                         + " (or use --paper-table)")
    model = E.ModelShape(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        ffn_hidden_size=a.ffn_hidden_size, num_query_groups=a.num_query_groups,
        kv_channels=a.kv_channels, vocab_size=a.vocab_size,
        make_vocab_size_divisible_by=a.make_vocab_size_divisible_by, seq_length=a.seq_length,
        max_position_embeddings=a.max_position_embeddings,
        tie_embeddings=not a.untie_embeddings_and_output_weights, swiglu=a.swiglu,
        add_bias_linear=not a.disable_bias_linear, normalization=a.normalization,
        position_embedding_type=a.position_embedding_type,
        dropout=(a.attention_dropout > 0 or a.hidden_dropout > 0), fused_attention=a.use_flash_attn)
    k = a.diloco_replicas
    if a.global_batch_size is None:
        nmb = 1
    else:
        per = a.micro_batch_size * k
        if a.global_batch_size % per:
            raise ValueError(f"--global-batch-size {a.global_batch_size} is not a multiple of "
                             f"micro-batch x replicas = {per}")
        nmb = a.global_batch_size // per
    recompute = a.recompute_granularity or ("selective" if a.recompute_activations else "none")
    train = E.TrainShape(micro_batch_size=a.micro_batch_size, num_microbatches=nmb,
                         tensor_model_parallel_size=a.tensor_model_parallel_size,
                         pipeline_model_parallel_size=a.pipeline_model_parallel_size,
                         sequence_parallel=a.sequence_parallel, recompute_granularity=recompute)
    if a.diloco_streaming_fragments < 1:
        raise SystemExit("--diloco-streaming-fragments must be >= 1")
    # The trainer's F counts the embeddings/output fragment; the model's counts layer groups.
    f = a.diloco_streaming_fragments - 1 if a.diloco_streaming_fragments > 1 else 1
    ppu = E.PPUShape(slices=a.ppu_slices, slice_attention_heads=a.ppu_slice_attention_heads,
                     replicas=k, local_steps=a.diloco_local_steps, streaming_fragments=f,
                     outer_optimizer=not a.ddp,
                     outer_state_placement=a.outer_state_placement or ("stream" if f > 1 else "device"),
                     snapshot_scope=a.snapshot_scope)
    if a.memory_model == "paper":
        prec = E.Precision.paper()
    else:
        prec = E.Precision.megatron(bf16=a.bf16 or a.fp16)
    overrides = {}
    if a.grad_dtype:
        overrides.update(grad_dtype=a.grad_dtype, grad_comm_dtype=a.grad_dtype)
    if a.outer_comm_dtype:
        overrides["outer_comm_dtype"] = a.outer_comm_dtype
    if overrides:
        prec = E.Precision(**{**prec.__dict__, **overrides})
    return E.EstimateConfig(model=model, train=train, ppu=ppu, precision=prec)


def _gb(x):
    return f"{x / E.GB:8.3f}"


def format_estimate(est: E.Estimate) -> str:
    c, p, m, f, k = est.config, est.params, est.memory, est.flops, est.comm
    method = ("DDP" if not c.ppu.outer_optimizer else
              f"{'Streaming ' if c.ppu.streaming_fragments > 1 else ''}DiLoCo"
              + (f" + PPU 1/{c.ppu.slices} mlps" if c.ppu.slices > 1 else "")
              + (f" + 1/{c.ppu.slices} heads" if c.ppu.slices > 1 and c.ppu.slice_attention_heads else ""))
    lines = [f"method: {method}   K={c.ppu.replicas} H={c.ppu.local_steps} "
             f"F={c.ppu.streaming_fragments} TP={c.train.tensor_model_parallel_size} "
             f"PP={c.train.pipeline_model_parallel_size} recompute={c.train.recompute_granularity}",
             "",
             "parameters (per replica)",
             f"  total      {p.total / 1e9:10.4f} B",
             f"  trainable  {p.trainable / 1e9:10.4f} B   ({100 * p.trainable_fraction:.1f} %)",
             f"  per GPU (peak stage {m.stage}): {p.per_stage_total_rank[m.stage] / 1e9:.4f} B, "
             f"trainable {p.per_stage_trainable_rank[m.stage] / 1e9:.4f} B",
             "",
             "device memory per GPU (GB = 1e9 bytes)",
             f"  weights             {_gb(m.weights)}",
             f"  fp32 master copy    {_gb(m.master_weights)}",
             f"  gradients           {_gb(m.gradients)}",
             f"  Adam m, v           {_gb(m.optimizer_state)}",
             f"  outer momentum      {_gb(m.outer_momentum)}",
             f"  theta(t) snapshot   {_gb(m.snapshot)}",
             f"  = model state       {_gb(m.model_state)}",
             f"  activations         {_gb(m.activations)}",
             f"  = total             {_gb(m.total)}",
             f"  host (outer state)  {_gb(m.host_total)}",
             "",
             f"FLOPs per step and replica ({f.tokens_per_step} tokens)",
             f"  forward             {f.forward:.4e}",
             f"  backward            {f.backward:.4e}   (dense backward {f.backward_dense:.4e})",
             f"  recompute           {f.recompute:.4e}",
             f"  model FLOPs         {f.model_flops:.4e}   = {f.ratio_vs_dense:.4f} x dense",
             f"  hardware FLOPs/GPU  {f.per_gpu_hardware_flops:.4e}",
             "",
             "communication per GPU",
             f"  DDP gradient all-reduce / step  {_gb(k.ddp_grad_bytes)} GB message, "
             f"{_gb(k.ddp_bytes_sent_per_step)} GB sent",
             f"  outer sync / {c.ppu.local_steps} steps         {_gb(k.sync_bytes)} GB message, "
             f"{_gb(k.sync_bytes_sent)} GB sent (largest fragment {_gb(k.largest_fragment_bytes)} GB)"]
    if k.bandwidth_bytes_per_s:
        bw = k.bandwidth_bytes_per_s
        lines += [f"  at {bw / 1e9:.4g} GB/s ({8 * bw / 1e9:.4g} Gbit/s): DDP {k.ddp_step_comm_s:.4f} s/step; "
                  f"sync {k.sync_s:.4f} s/round = {k.amortized_sync_s:.5f} s/step",
                  f"  suggested --distributed-timeout-minutes >= {suggested_timeout_minutes(k.sync_s)} "
                  f"(3 x the outer sync at peak bandwidth, at least Megatron's 10)"]
    if est.time:
        t = est.time
        lines += ["", "simulated time (DDP: max(comp, comm); low-comm: comp + sync/H)",
                  f"  compute {t.compute_s_per_step:.4f} s + comm {t.comm_s_per_step:.4f} s "
                  f"-> step {t.step_s:.4f} s, {t.global_tokens_per_step} tokens/step"]
        if t.time_to_tokens_s is not None:
            lines.append(f"  {t.tokens:.4g} tokens: {t.steps} steps, {t.time_to_tokens_s / 3600:.2f} h")
    return "\n".join(lines)


def format_paper_table(rows, comparisons, comm) -> str:
    hdr = (f"{'method':22s} {'trainable B':>20s} {'weights':>7s} {'grads':>6s} {'Adam':>6s} "
           f"{'outer':>6s} {'memory GB':>21s} {'act*':>5s} {'FLOPs':>6s} {'total FLOPs':>13s}")
    sub = (f"{'':22s} {'pred  paper  ratio':>20s} {'':>7s} {'':>6s} {'':>6s} {'':>6s} "
           f"{'pred  paper  ratio':>21s} {'':>5s} {'/SD':>6s} {'@ tokens':>13s}")
    out = ["Paper Table 1 (1.3B, 32 nodes): predicted vs published; GB = 1e9 bytes", hdr, sub,
           "-" * len(hdr)]
    for r in rows:
        out.append(f"{r.name:22s} {r.trainable_b:5.3f} {r.paper_trainable_b:5.2f} {r.trainable_ratio:6.3f}  "
                   f"{r.weights_gb:6.2f} {r.gradients_gb:6.2f} {r.optimizer_gb:6.2f} {r.outer_gb:6.2f} "
                   f"{r.memory_gb:6.2f} {r.paper_memory_gb:6.2f} {r.memory_ratio:6.3f}  "
                   f"{r.activations_gb:5.2f} {r.flops_ratio:6.3f} {r.total_flops:.3e} @{r.tokens_b:g}B")
    out += ["* activations (full recompute, micro-batch 16) are shown but, like the paper, not counted "
            "in 'memory'.",
            "  'outer' = Nesterov momentum (all params) + theta(t) snapshot (trainable params) of the "
            "largest fragment (3 layers), staged from the host.",
            "",
            "Total training FLOPs, performance-matched (paper §3.2: 'consistently 15% fewer')"]
    for c in comparisons:
        out.append(f"  {c.ours:22s} @ {c.ours_tokens_b:g}B tokens vs Streaming DiLoCo @ "
                   f"{c.baseline_tokens_b:g}B: ratio {c.total_flops_ratio:.3f} = "
                   f"{c.fewer_percent:.1f} % fewer")
    sd, q = rows[0], rows[-1]
    out += ["",
            "Other published numbers",
            f"  DDP memory (§2.1 'roughly 18 GB')          predicted {comm.ddp_memory_gb:6.2f} GB",
            f"  DDP comm per step at 2.875 GB/s (App. B 1.75 s): {comm.ddp_comm_s_nominal:.3f} s with "
            f"the paper's M = 2.6 GB; {comm.ddp_comm_s_model:.3f} s with this model's "
            f"{rows[0].trainable_b:.3f}B params",
            f"  low-comm amortised sync (App. B 0.0175 s)  predicted {comm.amortized_sync_s:.4f} s",
            f"  1/4 mlps + 1/4 heads vs Streaming DiLoCo memory (§3.2 '47% less'; Table 1 gives "
            f"{100 * (1 - q.paper_memory_gb / sd.paper_memory_gb):.1f} %): predicted "
            f"{100 * (1 - q.memory_gb / sd.memory_gb):.1f} % less",
            f"  time to loss 2.41 at 2.875 GB/s, 0.44 s compute/step (App. B 'roughly 2x'): DDP 26B "
            f"tokens {comm.ddp_time_to_26b_s / 3600:.1f} h, low-comm 44B tokens "
            f"{comm.lowcomm_time_to_44b_s / 3600:.1f} h -> {comm.speedup:.2f}x"]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print("estimate.py: ignoring flags it does not model: " + " ".join(unknown), file=sys.stderr)
    try:
        if args.paper_table:
            rows, comps, comm = E.paper_table(), E.paper_flops_comparisons(), E.paper_comm_check()
            if args.json:
                print(json.dumps({"rows": [dict(r.__dict__, memory_ratio=r.memory_ratio,
                                                 trainable_ratio=r.trainable_ratio) for r in rows],
                                  "flops_comparisons": [dict(c.__dict__, fewer_percent=c.fewer_percent)
                                                        for c in comps],
                                  "comm": dict(comm.__dict__, speedup=comm.speedup)}, indent=2))
            else:
                print(format_paper_table(rows, comps, comm))
            return 0
        cfg = config_from_args(args)
        bw = None
        if args.bandwidth_gbps is not None and args.bandwidth_gbytes is not None:
            raise ValueError("give either --bandwidth-gbps (Gbit/s) or --bandwidth-gbytes (GB/s), not both")
        if args.bandwidth_gbps is not None:
            bw = args.bandwidth_gbps * 1e9 / 8
        elif args.bandwidth_gbytes is not None:
            bw = args.bandwidth_gbytes * 1e9
        compute = args.step_compute_seconds
        if compute is None and args.peak_tflops is not None:
            compute = E.compute_time_from_flops(cfg, args.peak_tflops * 1e12, args.mfu)
        est = E.estimate(cfg, bandwidth_bytes_per_s=bw, compute_s_per_step=compute,
                         tokens=args.train_tokens)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        print(format_estimate(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
