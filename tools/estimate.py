#!/usr/bin/env python
"""Cost model CLI: memory / FLOPs / communication of a PPU, DiLoCo or DDP config.

    python tools/estimate.py --paper-table            # the paper's 1.3B table, predicted vs published
    python tools/estimate.py --num-layers 24 --hidden-size 2048 --num-attention-heads 16 \\
        --seq-length 1024 --micro-batch-size 16 --vocab-size 32000 --bf16 --recompute-granularity full --recompute-method uniform \\
        --recompute-num-layers 1 --ppu-slices 4 --diloco-replicas 32 --diloco-local-steps 100 \\
        --diloco-streaming-fragments 9 --world-size 32 --bandwidth-gbps 23

The flags are the trainer's own (``pretrain_gpt_ppu.py``'s parser, with its defaults and its
validation): a launch script's flags can be pasted as they are, and what the trainer refuses
(an unknown flag, an inconsistent value) is refused here with the trainer's message. The
estimate needs the model, parallelism and method flags only: the flags only training needs
(``--lr``, ``--train-iters``, ``arguments.TRAINING_ONLY``) are optional here. This
tool adds only its own options (output, world size, bandwidth, time, memory accounting).
The translation from the parsed settings to the cost model is
:func:`megatron_ppu.estimate.shape_from_args`; the arithmetic and its assumptions are in
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
from megatron_ppu.training.arguments import TrainArgs, build_parser as build_trainer_parser, check_layout, \
    data_parallel_size, parse_args, replica_count


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser (every flag of ``pretrain_gpt_ppu.py``, same defaults) plus this tool's options."""
    p = build_trainer_parser(prog="estimate.py", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("estimate.py", "this tool's own options (the rest are the trainer's flags)")
    g.add_argument("--paper-table", action="store_true",
                   help="print the paper's 1.3B / 32-node table next to the predictions")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.add_argument("--world-size", type=int, default=None,
                   help="ranks of the run (torchrun's nproc x nodes); default: --diloco-replicas (or 1) x TP x PP")
    g.add_argument("--memory-model", choices=["megatron", "paper"], default="megatron",
                   help="megatron: bf16 weights + fp32 master/grads/Adam (with --bf16); "
                        "paper: fp32 weights, bf16 grads, fp32 Adam (reproduces Table 1)")
    g.add_argument("--grad-dtype", choices=sorted(E.DTYPE_BYTES), default=None, help="override the gradient dtype")
    g.add_argument("--fused-attention", action="store_true",
                   help="count fused/flash attention: no s^2 activations stored")
    g.add_argument("--outer-state-placement", choices=["device", "stream", "host"], default=None,
                   help="where the outer momentum and snapshot live; default: stream when F > 1, else device")
    g.add_argument("--snapshot-scope", choices=["trainable", "all"], default="trainable",
                   help="snapshot theta(t) of the trainable entries only, or of all")
    g.add_argument("--bandwidth-gbps", type=float, default=None,
                   help="peak per-link bandwidth in gigaBITS per second (23 = the paper's 2.875 GB/s)")
    g.add_argument("--bandwidth-gbytes", type=float, default=None,
                   help="peak per-link bandwidth in gigaBYTES per second (alternative)")
    g.add_argument("--step-compute-seconds", type=float, default=None,
                   help="measured compute time of one step on one GPU (paper: 0.44 s)")
    g.add_argument("--peak-tflops", type=float, default=None, help="with --mfu: derive the compute time from FLOPs")
    g.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for --peak-tflops")
    g.add_argument("--train-tokens", type=float, default=None, help="tokens to train for (time-to-tokens)")
    return p


def world_size_of(a: TrainArgs) -> int:
    """``--world-size``, or the smallest world the settings describe: K (or 1) x TP x PP."""
    if a.extra["world_size"] is not None:
        return a.extra["world_size"]
    par = a.parallel
    return (a.diloco.num_replicas or 1) * par.tensor_model_parallel_size * par.pipeline_model_parallel_size


def config_from_args(a: TrainArgs) -> E.EstimateConfig:
    """The cost model's input for parsed settings (the trainer's rules for K and the layout first)."""
    x = a.extra
    world = world_size_of(a)
    dp = data_parallel_size(a, world)
    if dp is not None:
        check_layout(a, replica_count(a, dp), dp)  # what the builder would refuse
    if x["memory_model"] == "paper":
        prec = E.Precision.paper()
        if "diloco_allreduce_dtype" in a.explicit_flags:
            prec = E.Precision(**{**prec.__dict__, "outer_comm_dtype": a.diloco.allreduce_dtype})
    else:
        prec = E.Precision.megatron(bf16=a.precision.bf16 or a.precision.fp16)
        prec = E.Precision(**{**prec.__dict__, "outer_comm_dtype": a.diloco.allreduce_dtype})
    if x["grad_dtype"]:
        prec = E.Precision(**{**prec.__dict__, "grad_dtype": x["grad_dtype"], "grad_comm_dtype": x["grad_dtype"]})
    return E.shape_from_args(a, world, precision=prec, outer_state_placement=x["outer_state_placement"],
                             snapshot_scope=x["snapshot_scope"], fused_attention=x["fused_attention"])


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
    try:
        a = parse_args(argv, parser=parser, world_size=None, for_training=False)  # the trainer's parsing and validation
        x = a.extra
        if x["paper_table"]:
            rows, comps, comm = E.paper_table(), E.paper_flops_comparisons(), E.paper_comm_check()
            if x["json"]:
                print(json.dumps({"rows": [dict(r.__dict__, memory_ratio=r.memory_ratio,
                                                 trainable_ratio=r.trainable_ratio) for r in rows],
                                  "flops_comparisons": [dict(c.__dict__, fewer_percent=c.fewer_percent)
                                                        for c in comps],
                                  "comm": dict(comm.__dict__, speedup=comm.speedup)}, indent=2))
            else:
                print(format_paper_table(rows, comps, comm))
            return 0
        cfg = config_from_args(a)
        bw = None
        if x["bandwidth_gbps"] is not None and x["bandwidth_gbytes"] is not None:
            raise ValueError("give either --bandwidth-gbps (Gbit/s) or --bandwidth-gbytes (GB/s), not both")
        if x["bandwidth_gbps"] is not None:
            bw = x["bandwidth_gbps"] * 1e9 / 8
        elif x["bandwidth_gbytes"] is not None:
            bw = x["bandwidth_gbytes"] * 1e9
        compute = x["step_compute_seconds"]
        if compute is None and x["peak_tflops"] is not None:
            compute = E.compute_time_from_flops(cfg, x["peak_tflops"] * 1e12, x["mfu"])
        est = E.estimate(cfg, bandwidth_bytes_per_s=bw, compute_s_per_step=compute, tokens=x["train_tokens"])
    except ValueError as e:
        parser.error(str(e))
    if x["json"]:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        print(format_estimate(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
