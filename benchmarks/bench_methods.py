#!/usr/bin/env python
"""DDP, DiLoCo, Streaming DiLoCo and PPU side by side: measured cost next to the cost model.

One invocation measures every method on the same model, data and K = ``--nproc`` CPU
ranks (gloo), each method in a fresh process group (so that peak memory is per method):

* per-rank bytes of weights, gradient buffers, inner-optimizer state (Megatron DDP's
  ``grad_data`` and the Adam moments, :func:`megatron_ppu.testing.accounting.measure_state_bytes`)
  and DiLoCo's host outer state (snapshot + Nesterov momentum,
  ``DiLoCo.outer_state_bytes``), all from the live tensors;
* peak process memory (``ru_maxrss``) per rank, and its growth over the process's
  footprint before the model was built;
* FLOPs of one training step, counted with ``torch.utils.flop_counter.FlopCounterMode``
  around one iteration of ``Trainer.train`` (forward, backward, optimizer step, any sync); every
  method is built by ``megatron_ppu.training.build`` and trains with ``Trainer.train`` (per-iteration
  callback);
* median step time over ``--steps`` steps (wall clock, slowest rank, after a barrier)
  and median CPU time per step (``time.process_time``, mean over ranks) and their
  ratio to DDP; the sync steps of the DiLoCo methods are included in the means and
  shown separately;
* bytes sent per rank per step, as the synchroniser's ``stats()`` counts them, divided by the
  steps run (a multiple of H): DiLoCo's outer all-reduce bytes (ring, 2(K-1)/K x payload);
  DDP's gradient all-reduce (``DDPSync.stats``: 2(K-1)/K x the gradient buffer bytes, every step).

Every measured figure is printed next to the cost model's prediction
(:mod:`megatron_ppu.estimate`, fp32 layout with the outer state on the host, see
``benchmarks/common.py``) with the ratio measured / predicted. Results go to
``benchmarks/results/methods.json`` and ``methods.md`` (``--out`` elsewhere).

The cost model does not know subnetwork data parallelism (the ``sdp_*`` methods), so
there (:func:`predict_sdp`) gradient and Adam bytes are compared with the trainer's
ownership plan (``predict_state_bytes(plan.owned_numel())``), FLOPs with DDP's measured
FLOPs (and, for forward masking, with App. C.2's GEMM terms of the dense model that is left
after skipping the non-held parts), and bytes sent (per-step sync: ``SubnetSync.stats``;
outer sync: ``DiLoCo.stats``) with DDP's 2(K-1)/K x gradient bytes; where nothing predicts
a figure the tables show "-".

Usage::

    python benchmarks/bench_methods.py                 # K=4 ranks, every method (~11 min on 2 cores)
    python benchmarks/bench_methods.py --nproc 4 --steps 20 --methods ddp ppu_mlp4
    python benchmarks/bench_methods.py --steps 2 --methods ddp sdp_step_blocks_fwd --timing-rounds 0 --out /tmp/m.json

On a machine with fewer cores than ranks the ranks share cores: the wall-clock
times then include waiting for a core; the CPU time per step does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

MODEL = ["--num-layers", "4", "--hidden-size", "512", "--ffn-hidden-size", "2048",
         "--num-attention-heads", "8", "--seq-length", "128", "--micro-batch-size", "4",
         "--lr", "1e-3", "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--adam-beta2", "0.99",
         "--attention-dropout", "0", "--hidden-dropout", "0", "--eval-iters", "1", "--log-interval", "1000000",
         "--eval-interval", "1000000", "--diloco-outer-lr", "0.7", "--diloco-outer-momentum", "0.9"]


def methods(local_steps: int, fragments: int):
    """name -> (label, extra trainer flags). PPU runs on top of Streaming DiLoCo, as in the paper.

    The SDP methods (subnetwork data parallelism, :mod:`megatron_ppu.subnet`) give every
    replica half the model: half the blocks (each held by 2 of the K = 4 replicas) or half
    the MLP hidden units. ``sdp_step_*`` synchronise every step among each parameter's holders
    (``--subnet-sync step``, no outer optimizer: compare with DDP); ``sdp_blocks_fwd`` runs on
    the Streaming DiLoCo outer loop of the streaming methods (compare with PPU 1/2 MLPs)."""
    h = ["--diloco-local-steps", str(local_steps)]
    s = h + ["--diloco-streaming-fragments", str(fragments)]
    step, blocks, fwd, neurons = C.SDP_STEP, C.SDP_BLOCKS_HALF, C.SDP_FORWARD, C.SDP_NEURONS_HALF
    return {
        "ddp": ("DDP", ["--diloco-local-steps", "0"]),
        "diloco": ("DiLoCo", h),
        "streaming_diloco": (f"Streaming DiLoCo (F={fragments})", s),
        "ppu_mlp2": ("PPU 1/2 MLPs", s + ["--ppu-slices", "2"]),
        "ppu_mlp4": ("PPU 1/4 MLPs", s + ["--ppu-slices", "4"]),
        "ppu_mlp4_heads4": ("PPU 1/4 MLPs + 1/4 heads", s + ["--ppu-slices", "4", "--ppu-slice-attention-heads"]),
        "sdp_step_blocks_bwd": ("SDP blocks 1/2 bwd, per-step", step + blocks),
        "sdp_step_blocks_fwd": ("SDP blocks 1/2 fwd, per-step", step + blocks + fwd),
        "sdp_step_neurons_fwd": ("SDP neurons 1/2 fwd, per-step", step + neurons),
        "sdp_blocks_fwd": (f"SDP blocks 1/2 fwd, Streaming (F={fragments})", s + blocks + fwd),
    }


# The SDP flags of a method (dropped to get its dense reference run).
SDP_FLAGS = ("--subnet-plan", "--subnet-coverage", "--subnet-masking", "--subnet-sync", "--ppu-slices")


def is_sdp(argv) -> bool:
    return "--subnet-plan" in argv or "--subnet-sync" in argv


def is_step_sync(argv) -> bool:
    return C.parsed_flags(argv).subnet_sync == "step"


def method_argv(model, train_iters: int, extra):
    """The trainer flags of one method; per-step SDP drops the outer-loop flags, which it refuses."""
    argv = model + ["--train-iters", str(train_iters)] + extra
    if is_step_sync(extra):
        argv = C.drop_flags(argv, C.OUTER_FLAGS)
    return argv


def dense_reference_argv(argv):
    """The dense method an SDP method stands next to, for the cost model: the same model and
    outer loop without the subnet flags; per-step SDP's reference is DDP."""
    ref = C.drop_flags(argv, SDP_FLAGS)
    if is_step_sync(argv):
        ref = C.drop_flags(ref, C.OUTER_FLAGS) + ["--diloco-local-steps", "0"]
    return ref


def ddp_reference_argv(argv):
    """The dense DDP run on the same model (the reference of the bytes-sent and FLOP ratios)."""
    ref = C.drop_flags(argv, C.OUTER_FLAGS + SDP_FLAGS)
    return [x for x in ref if x != "--ppu-slice-attention-heads"] + ["--diloco-local-steps", "0"]


def predict_sdp(argv, world: int, vocab_size: int, ranks: list) -> dict:
    """What can be predicted for an SDP method, which the cost model does not know.

    * trainable elements, gradient and Adam bytes: the trainer's ownership plan,
      ``predict_state_bytes(plan.owned_numel(), bf16=False)`` (max over ranks, as measured);
    * weights: the cost model of the dense model (every replica stores every weight, held
      or not; sliced weights keep the other slices in a frozen tensor);
    * outer state: none with per-step sync; with the outer loop, the cost model of the dense
      Streaming DiLoCo run (DiLoCo snapshots every parameter some replica trains, and every
      block has holders);
    * FLOPs: for forward masking only, App. C.2's GEMM terms of ``common.predict`` for the
      dense model that is left once the non-held parts are skipped: ``coverage x L`` layers
      (blocks) or an FFN of ``ffn / N`` units (neurons); backward masking: none (``None``);
    * bytes sent: no prediction (``None``); DDP's ``2 (K-1)/K x`` dense gradient bytes is
      given as ``bytes_sent_ddp_per_step`` for comparison.
    """
    from megatron_ppu.testing.accounting import predict_state_bytes

    ref_argv = dense_reference_argv(argv)
    ref = C.predict(ref_argv, world, vocab_size)
    dense_ddp = ddp_reference_argv(argv)
    ddp = C.predict(dense_ddp, world, vocab_size)
    owned = max(r["owned_numel"] for r in ranks)
    sb = predict_state_bytes(owned, bf16=False)
    outer = 0.0 if is_step_sync(argv) else ref["outer_bytes"]
    flops_exp, src = None, None
    flags = C.parsed_flags(argv)
    if flags.subnet_masking == "forward":
        if flags.subnet_plan == "blocks":
            held = len(ranks[0]["held_blocks"])
            flops_exp = C.predict(C.drop_flags(dense_ddp, ("--num-layers",)) + ["--num-layers", str(held)],
                                  world, vocab_size)["flops_gemm"]
            src = f"App. C.2 GEMM terms (common.predict), dense model with the {held} held layers"
        elif flags.subnet_plan == "neurons":
            n, ffn = flags.ppu_slices, flags.ffn_hidden_size
            flops_exp = C.predict(C.drop_flags(dense_ddp, ("--ffn-hidden-size",)) + ["--ffn-hidden-size", str(ffn // n)],
                                  world, vocab_size)["flops_gemm"]
            src = f"App. C.2 GEMM terms (common.predict), dense model with FFN {ffn} / {n} = {ffn // n}"
    return {
        "source": "SDP: ownership plan + cost model of the dense reference",
        "dense_reference_argv": ref_argv,
        "params_total": ref["params_total"], "params_trainable": owned,
        "weights_bytes": ref["weights_bytes"], "grad_bytes": sb.grads, "optimizer_bytes": sb.optimizer,
        "outer_bytes": outer, "activation_bytes": None,
        "model_state_bytes": ref["weights_bytes"] + sb.grads + sb.optimizer + outer,
        "flops_model": None, "flops_gemm": None, "flops_dense_gemm": ref["flops_dense_gemm"],
        "flops_forward_gemm": None, "flops_ratio_vs_dense": None,
        "flops_expected_gemm": flops_exp, "flops_expected_source": src,
        "bytes_sent_per_step": None, "sync_payload_bytes": None,
        "bytes_sent_ddp_per_step": ddp["bytes_sent_per_step"],
    }


# ------------------------------------------------------------------ worker side
def run_worker(spec: dict) -> dict:
    """One rank of one method: build (``megatron_ppu.training.build``), then ``Trainer.train`` for
    ``warmup + 1 + steps + 1`` iterations: warm-up steps, one step under ``FlopCounterMode``, the
    timed steps (a barrier before each), and one last iteration, untimed, that holds the end of the
    run (DiLoCo's final sync, the evaluation). State and bytes are taken after the timed steps."""
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ppu.testing.accounting import measure_state_bytes, predict_state_bytes

    rss_start = C.max_rss_bytes()  # after importing torch and megatron-core: the baseline
    t_build = time.perf_counter()
    tr = C.build_trainer(spec["argv"])
    t_build = time.perf_counter() - t_build
    rank, world = dist.get_rank(), dist.get_world_size()
    warmup, steps = spec["warmup"], spec["steps"]
    flop_it, timed_end = warmup + 1, warmup + 1 + steps  # the FLOP-counted iteration, the last timed one
    assert tr.args.training.train_iters == timed_end + 1, (tr.args.training.train_iters, timed_end)
    out = {"rank": rank, "world": world, "build_s": t_build,
           "vocab_size": tr.run.tokenizer.vocab_size, "plan": tr.plan.summary(),
           "owned_numel": tr.plan.owned_numel(), "total_numel": tr.plan.total_numel(),
           "held_blocks": tr.run.held_blocks}
    out["rss_start"] = rss_start
    out["rss_after_build"] = C.current_rss_bytes()
    walls, cpus, syncs, loss = [], [], [], []
    clock = {}

    def start(it: int) -> None:
        """Before iteration it + 1 (at the end of iteration it, or before training for it = 0)."""
        if it == warmup:
            out["rss_after_warmup"] = C.max_rss_bytes()
        if it + 1 == flop_it:
            dist.barrier()
            clock["flops"] = FlopCounterMode(display=False)
            clock["flops"].__enter__()
        elif flop_it < it + 1 <= timed_end:
            dist.barrier()
            clock["w0"], clock["c0"] = time.perf_counter(), time.process_time()

    def on_iteration(trainer, st) -> None:
        it = trainer.iteration
        if it == flop_it:
            fc = clock.pop("flops")
            fc.__exit__(None, None, None)
            out["flops_step"] = int(fc.get_total_flops())
            out["flops_by_op"] = {str(op): int(n) for mod, ops in fc.get_flop_counts().items() if mod == "Global"
                                  for op, n in ops.items()}
        elif flop_it < it <= timed_end:
            walls.append(time.perf_counter() - clock["w0"])
            cpus.append(time.process_time() - clock["c0"])
            syncs.append(int(st["syncs"]))
            loss.append(st["loss"])
        if it == timed_end:  # the counters of the timed steps (not the final iteration's end-of-run sync)
            out["sync_stats"] = trainer.sync.stats()
            out["inner_steps"] = it
        start(it)

    start(0)
    tr.train(on_iteration=on_iteration)
    out.update(walls=walls, cpus=cpus, syncs=syncs, losses=loss)

    sb = measure_state_bytes([tr.ddp], tr.optimizer)
    out["grad_bytes"] = sb.grads
    out["optimizer_bytes"] = sb.optimizer
    out["trainable_elements"] = sb.trainable_elements
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in tr.model.parameters())
    plan_sb = predict_state_bytes(tr.plan.owned_numel(), bf16=False)  # what the ownership plan predicts
    out["plan_grad_bytes"], out["plan_optimizer_bytes"] = plan_sb.grads, plan_sb.optimizer
    out["outer_bytes"] = tr.sync.outer_state_bytes()  # DiLoCo's host snapshot + momentum; else 0
    # bytes on the wire per rank, by kind, as the synchroniser counts them: DDP, its gradient
    # all-reduce (2(K-1)/K x the gradient buffer, every step); DiLoCo, the outer syncs (ring,
    # 2(K-1)/K x payload); per-step SDP, sub-group gradient all-reduces + refreshes of non-holders
    s, n = out["sync_stats"], out["inner_steps"]
    out["syncs_total"] = s.get("syncs")
    out["bytes_sent_per_step"] = sum(v for k, v in s.items() if k.endswith("_bytes_sent")) / n
    out.update({f"{k}_per_step": v / n for k, v in s.items() if k.endswith("_bytes_sent")})
    out["rss_peak"] = C.max_rss_bytes()
    return out


# ------------------------------------------------------------------ interleaved compute timing
TIMING_VARIANTS = {  # name -> (label, N, heads sliced); DDP, DiLoCo and Streaming DiLoCo share "dense"
    "dense": ("dense (DDP / DiLoCo / Streaming DiLoCo)", 1, False),
    "mlp2": ("PPU 1/2 MLPs", 2, False),
    "mlp4": ("PPU 1/4 MLPs", 4, False),
    "mlp4_heads4": ("PPU 1/4 MLPs + 1/4 heads", 4, True),
}
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
COPY_OPS = ("aten::cat", "aten::copy_", "aten::clone", "aten::contiguous", "aten::narrow", "aten::slice",
            "aten::add_", "aten::add", "aten::zeros_like", "aten::new_zeros", "aten::zero_", "aten::fill_")


def run_timing_worker(spec: dict) -> dict:
    """One process, one thread: the per-rank compute of every variant, timed round-robin.

    Builds the dense model and the PPU models of slice ``spec['slice_index']`` from the same
    run (``megatron_ppu.training.build.build_variant``: the builder's model, DDP, optimizer and
    scheduler), then times forward, backward (incl. DDP's grad finish) and the optimizer step of
    ``Trainer.train_step`` (the trainer's forward step and loss) of each variant in
    turn for ``spec['rounds']`` rounds, so that a drift of the machine's background load hits
    every variant alike. One extra step per variant runs under ``torch.profiler`` to split
    the time into GEMMs, copies/elementwise bookkeeping and the rest.
    """
    import torch

    from megatron_ppu.config import PPUConfig
    from megatron_ppu.sync import DDPSync
    from megatron_ppu.training.build import build_variant
    from megatron_ppu.training.loop import Trainer
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    class PhaseClock(DDPSync):
        """The world-1 DDP synchroniser with the trainer's hook points timestamped: the end of
        backward (``after_backward``: after Megatron's gradient finish) and of the optimizer step."""

        def __init__(self, sync):
            super().__init__(sync.grad_sync, sync.grad_bytes, sync.group_size)
            self.marks = {}

        def after_backward(self):
            self.marks["bwd"] = (time.perf_counter(), time.process_time())

        def after_optimizer_step(self):
            self.marks["opt"] = (time.perf_counter(), time.process_time())

    base = C.build_trainer(spec["argv"])  # world 1, dense: the run every variant is built from
    torch.set_num_threads(1)
    variants = {}
    for name in spec["variants"]:
        label, n, heads = TIMING_VARIANTS[name]
        # the model, DDP, optimizer and scheduler of slice spec['slice_index'] of N (build.py's steps)
        run = build_variant(base.run, PPUConfig(n, heads), spec["slice_index"] % n)
        clock = PhaseClock(base.sync)
        tr = Trainer(dataclasses.replace(run, sync=clock))
        tr.model.register_forward_pre_hook(lambda *_, c=clock: c.marks.__setitem__(
            "start", (time.perf_counter(), time.process_time())))
        tr.model.register_forward_hook(lambda *_, c=clock: c.marks.__setitem__(
            "fwd", (time.perf_counter(), time.process_time())))
        variants[name] = {"label": label, "trainer": tr, "clock": clock, "times": []}

    def one_step(v):
        """(wall, CPU) seconds of forward, backward (loss, backward, gradient finish), optimizer step
        and the whole step of one ``Trainer.train_step`` (its forward step and loss)."""
        v["trainer"].train_step()
        mk = v["clock"].marks
        (w0, c0), (_, c1), (_, c2), (w3, c3) = mk["start"], mk["fwd"], mk["bwd"], mk["opt"]
        return {"fwd": c1 - c0, "bwd": c2 - c1, "fwd_bwd": c2 - c0, "opt": c3 - c2, "step": c3 - c0, "wall": w3 - w0}

    for v in variants.values():  # warm-up (Adam state, allocator)
        for _ in range(spec["warmup"]):
            one_step(v)
    for _ in range(spec["rounds"]):
        for v in variants.values():
            v["times"].append(one_step(v))

    out = {"rank": 0, "slice_index": spec["slice_index"], "rounds": spec["rounds"], "variants": {}}
    for name, v in variants.items():
        with FlopCounterMode(display=False) as fc:
            one_step(v)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(spec.get("profile_steps", 3)):
                one_step(v)
        cats = {"gemm": 0.0, "copy_elementwise": 0.0, "other": 0.0}
        top = []
        for e in prof.key_averages():
            us = e.self_cpu_time_total
            cat = "gemm" if e.key in GEMM_OPS else "copy_elementwise" if e.key in COPY_OPS else "other"
            n = spec.get("profile_steps", 3)
            cats[cat] += us / 1e6 / n
            top.append((e.key, us / 1e6 / n, e.count / n))
        top.sort(key=lambda x: -x[1])
        col = {k: [t[k] for t in v["times"]] for k in ("fwd", "bwd", "fwd_bwd", "opt", "step", "wall")}
        out["variants"][name] = {
            "label": v["label"], "flops": int(fc.get_total_flops()),
            **{f"{k}_median_s": statistics.median(x) for k, x in col.items()},
            **{f"{k}_min_s": min(x) for k, x in col.items()}, "times": v["times"],
            "profile_s": cats, "profile_top": top[:12],
            "trainable_elements": sum(p.numel() for p in v["trainer"].ddp.parameters() if p.requires_grad)}
    return out


def timing_summary(t: dict) -> dict:
    """Realised vs FLOP-predicted savings of each PPU variant relative to the dense model."""
    d = t["variants"]["dense"]
    for name, v in t["variants"].items():
        v["flop_saving"] = 1 - v["flops"] / d["flops"]
        v["step_saving"] = 1 - v["step_median_s"] / d["step_median_s"]
        v["step_saving_min"] = 1 - v["step_min_s"] / d["step_min_s"]
        v["wall_saving"] = 1 - v["wall_median_s"] / d["wall_median_s"]
        v["fwd_change"] = v["fwd_median_s"] / d["fwd_median_s"] - 1
        v["bwd_saving"] = 1 - v["bwd_median_s"] / d["bwd_median_s"]
        v["opt_saving"] = 1 - v["opt_median_s"] / d["opt_median_s"]
        v["trainable_saving"] = 1 - v["trainable_elements"] / d["trainable_elements"]
        v["fwd_bwd_saving"] = 1 - v["fwd_bwd_median_s"] / d["fwd_bwd_median_s"]
        v["fwd_bwd_realised_over_predicted"] = v["fwd_bwd_saving"] / v["flop_saving"] if v["flop_saving"] else None
        v["gemm_time_saving"] = 1 - v["profile_s"]["gemm"] / d["profile_s"]["gemm"]
        v["step_realised_over_predicted"] = v["step_saving"] / v["flop_saving"] if v["flop_saving"] else None
        v["step_min_realised_over_predicted"] = v["step_saving_min"] / v["flop_saving"] if v["flop_saving"] else None
        v["gemm_realised_over_predicted"] = v["gemm_time_saving"] / v["flop_saving"] if v["flop_saving"] else None
    return t


# ------------------------------------------------------------------ parent side
def _median(xs):
    return statistics.median(xs) if xs else None


def summarise(name: str, label: str, argv, ranks: list, world: int) -> dict:
    """Aggregate the ranks of one method and put the prediction next to each figure.

    The cost model predicts the DDP / DiLoCo / PPU methods; for the SDP methods, which it
    does not know, see :func:`predict_sdp` (fields it cannot predict are ``None``, their
    ratios too)."""
    r0 = ranks[0]
    sdp = is_sdp(argv)
    pred = predict_sdp(argv, world, r0["vocab_size"], ranks) if sdp else C.predict(argv, world, r0["vocab_size"])
    if not sdp:  # the DDP reference of the communication column
        pred["bytes_sent_ddp_per_step"] = C.predict(ddp_reference_argv(argv), world, r0["vocab_size"])["bytes_sent_per_step"]
    steps = len(r0["walls"])
    wall_step = [max(r["walls"][i] for r in ranks) for i in range(steps)]
    cpu_step = [sum(r["cpus"][i] for r in ranks) / len(ranks) for i in range(steps)]
    sync_mask = [any(r["syncs"][i] for r in ranks) for i in range(steps)]
    non_sync_wall = [w for w, s in zip(wall_step, sync_mask) if not s]
    non_sync_cpu = [c for c, s in zip(cpu_step, sync_mask) if not s]
    sync_wall = [w for w, s in zip(wall_step, sync_mask) if s]

    def across(key, fn=max):
        return fn(r[key] for r in ranks)

    flops = [r["flops_step"] for r in ranks]
    m = {
        "name": name, "label": label, "argv": argv, "plan_rank0": r0["plan"],
        "trainable_elements": across("trainable_elements"), "total_elements": r0["total_numel"],
        "weights_bytes": across("weights_bytes"), "grad_bytes": across("grad_bytes"),
        "optimizer_bytes": across("optimizer_bytes"), "outer_bytes": across("outer_bytes"),
        "rss_peak_bytes": across("rss_peak"), "rss_peak_bytes_per_rank": [r["rss_peak"] for r in ranks],
        "rss_after_build_bytes": across("rss_after_build"), "rss_start_bytes": across("rss_start"),
        "flops_step": max(flops), "flops_step_per_rank": flops, "flops_by_op_rank0": r0["flops_by_op"],
        "steps_timed": steps, "sync_steps_timed": sum(sync_mask),
        "wall_median_s": _median(wall_step), "wall_mean_s": sum(wall_step) / steps,
        "wall_median_nonsync_s": _median(non_sync_wall), "wall_mean_sync_step_s": (sum(sync_wall) / len(sync_wall)) if sync_wall else None,
        "cpu_median_s": _median(cpu_step), "cpu_mean_s": sum(cpu_step) / steps,
        "cpu_median_nonsync_s": _median(non_sync_cpu),
        "wall_steps_s": wall_step, "cpu_steps_s": cpu_step,
        "bytes_sent_per_step": across("bytes_sent_per_step"),
        "inner_steps_total": r0["inner_steps"], "syncs_total": r0.get("syncs_total"),
        "build_s": across("build_s"), "sdp": sdp, "sync": ("step" if is_step_sync(argv) else "outer") if sdp else None,
        "held_blocks_per_rank": [r["held_blocks"] for r in ranks],
        "owned_elements_per_rank": [r["owned_numel"] for r in ranks],
        "plan_grad_bytes": across("plan_grad_bytes"), "plan_optimizer_bytes": across("plan_optimizer_bytes"),
        # the plan's prediction of grads and Adam bytes, rank by rank
        "plan_state_exact_all_ranks": all(r["grad_bytes"] == r["plan_grad_bytes"]
                                          and r["optimizer_bytes"] == r["plan_optimizer_bytes"] for r in ranks),
    }
    m["sync_stats_per_rank"] = [r["sync_stats"] for r in ranks]
    if "refresh_bytes_sent_per_step" in r0:  # per-step SDP: gradients + refreshes, shown apart
        m["grad_bytes_sent_per_step"] = across("grad_bytes_sent_per_step")
        m["refresh_bytes_sent_per_step"] = across("refresh_bytes_sent_per_step")
    m["state_bytes"] = m["weights_bytes"] + m["grad_bytes"] + m["optimizer_bytes"] + m["outer_bytes"]
    m["rss_growth_bytes"] = max(r["rss_peak"] - r["rss_start"] for r in ranks)
    m["predicted"] = pred
    m["predicted"]["state_plus_activations_bytes"] = (None if pred["activation_bytes"] is None
                                                      else pred["model_state_bytes"] + pred["activation_bytes"])
    m["ratios"] = {
        "weights": C.ratio(m["weights_bytes"], pred["weights_bytes"]),
        "grads": C.ratio(m["grad_bytes"], pred["grad_bytes"]),
        "optimizer": C.ratio(m["optimizer_bytes"], pred["optimizer_bytes"]),
        "outer": C.ratio(m["outer_bytes"], pred["outer_bytes"]) if pred["outer_bytes"] else None,
        "grads_adam": C.ratio(m["grad_bytes"] + m["optimizer_bytes"], pred["grad_bytes"] + pred["optimizer_bytes"]),
        "grads_adam_plan": C.ratio(m["grad_bytes"] + m["optimizer_bytes"],
                                   m["plan_grad_bytes"] + m["plan_optimizer_bytes"]),
        "state": C.ratio(m["state_bytes"], pred["model_state_bytes"]),
        "trainable": C.ratio(m["trainable_elements"], pred["params_trainable"]),
        "flops_gemm": C.ratio(m["flops_step"], pred["flops_gemm"]),
        "flops_model": C.ratio(m["flops_step"], pred["flops_model"]),
        "flops_expected": C.ratio(m["flops_step"], pred.get("flops_expected_gemm")),
        "rss_growth_vs_state_plus_act": C.ratio(m["rss_growth_bytes"], m["predicted"]["state_plus_activations_bytes"]),
        "bytes_sent": C.ratio(m["bytes_sent_per_step"], pred["bytes_sent_per_step"]) if pred["bytes_sent_per_step"] else None,
        # vs DDP's 2(K-1)/K x the dense gradient bytes, every step (cost model of the dense DDP run)
        "bytes_sent_vs_ddp": C.ratio(m["bytes_sent_per_step"], pred["bytes_sent_ddp_per_step"]),
    }
    return m


def add_relative(results: dict) -> None:
    """Step-time and FLOP ratios to DDP (measured, same run) and PPU's realised vs predicted
    saving relative to Streaming DiLoCo."""
    ddp = results.get("ddp")
    base = results.get("streaming_diloco") or results.get("diloco")
    for m in results.values():
        if ddp:
            for k in ("wall_median_s", "cpu_median_s", "wall_mean_s", "cpu_mean_s", "flops_step"):
                m[f"{k}_vs_ddp"] = C.ratio(m[k], ddp[k])
        if base and m["name"].startswith("ppu"):
            pred_saving = 1 - m["flops_step"] / base["flops_step"]
            pred_saving_model = 1 - m["predicted"]["flops_model"] / base["predicted"]["flops_model"]
            s = {"baseline": base["name"], "predicted_flop_saving": pred_saving,
                 "predicted_flop_saving_model": pred_saving_model}
            for k in ("cpu_median_nonsync_s", "wall_median_nonsync_s", "cpu_mean_s", "wall_mean_s"):
                realised = 1 - m[k] / base[k]
                s[f"realised_saving_{k}"] = realised
                s[f"realised_over_predicted_{k}"] = realised / pred_saving if pred_saving else None
            m["saving_vs_baseline"] = s


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f} %"


def _r(x, d=4):
    return "-" if x is None else f"{x:.{d}f}"


def _e(x):
    """FLOPs, or "-" where there is no prediction."""
    return "-" if x is None else f"{x:.4e}"


def _n(x):
    """An element / byte count with thousands separators, or "-"."""
    return "-" if x is None else f"{x:,.0f}"


def markdown(results: dict, meta: dict) -> str:
    L = []
    L.append("# Methods benchmark: measured vs cost model\n")
    L.append(f"Produced by `{meta['command']}` on {meta['date']} in {meta['wall_s']:.0f} s.\n")
    mi = meta["machine"]
    L.append(f"Machine: {mi['cpu']}, {mi['cpu_count']} CPU cores, no GPU; torch {mi['versions']['torch']}, "
             f"megatron-core {mi['versions']['megatron-core']}, Python {mi['python']}. Load average at start "
             f"{meta['load_start']}, at end {meta['load_end']} (the machine is shared).\n")
    L.append(f"Model: `{' '.join(meta['model_flags'])}`; K = {meta['nproc']} ranks = replicas, one thread per "
             f"rank; H = {meta['local_steps']}; {meta['warmup']} warm-up steps, 1 FLOP-counted step, "
             f"{meta['steps']} timed steps per method.\n")
    L.append("## Per-rank state bytes (max over ranks), measured / predicted\n")
    L.append("| method | trainable params | weights | gradients | Adam m+v | outer (host) | total state | ratio total |")
    L.append("|---|---|---|---|---|---|---|---|")
    for m in results.values():
        p, q = m["predicted"], m["ratios"]
        L.append(f"| {m['label']}{' (*)' if m.get('sdp') else ''} | {m['trainable_elements']:,} / {_n(p['params_trainable'])} "
                 f"| {m['weights_bytes']:,} / {_n(p['weights_bytes'])} "
                 f"| {m['grad_bytes']:,} / {_n(p['grad_bytes'])} ({_r(q['grads'])}) "
                 f"| {m['optimizer_bytes']:,} / {_n(p['optimizer_bytes'])} ({_r(q['optimizer'])}) "
                 f"| {m['outer_bytes']:,} / {_n(p['outer_bytes'])} ({_r(q['outer'])}) "
                 f"| {C.fmt_bytes(m['state_bytes'])} / {C.fmt_bytes(p['model_state_bytes'])} | {_r(q['state'])} |")
    if any(m.get("sdp") for m in results.values()):
        L.append("\n(*) SDP methods: the cost model does not know SDP plans. Their trainable elements, "
                 "gradient and Adam bytes are predicted by the trainer's ownership plan "
                 "(`predict_state_bytes(plan.owned_numel(), bf16=False)`), their weights and (outer sync) "
                 "outer state by the cost model of the dense reference run (every replica stores every "
                 "weight; DiLoCo snapshots every parameter, and every block has holders).\n")
    L.append("\n## Peak process memory per rank\n")
    L.append("| method | peak RSS (max rank) | growth over start-up | predicted state + activations | ratio |")
    L.append("|---|---|---|---|---|")
    for m in results.values():
        p = m["predicted"]
        L.append(f"| {m['label']} | {C.fmt_bytes(m['rss_peak_bytes'])} | {C.fmt_bytes(m['rss_growth_bytes'])} "
                 f"| {C.fmt_bytes(p['state_plus_activations_bytes'])} "
                 f"(activations {C.fmt_bytes(p['activation_bytes'])}) | {_r(m['ratios']['rss_growth_vs_state_plus_act'], 3)} |")
    L.append("\n## FLOPs per training step per rank (FlopCounterMode) and communication\n")
    L.append("FLOPs / DDP: measured over DDP's measured FLOPs in this run. Bytes sent / DDP: over DDP's "
             "2(K-1)/K x the dense gradient bytes per step. \"-\": no cost-model prediction (SDP, see below).\n")
    L.append("| method | measured FLOPs | predicted GEMM FLOPs (App. C.2) | ratio | App. C.2 incl. non-GEMM terms "
             "| FLOPs / DDP | bytes sent / rank / step | predicted | ratio | / DDP |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for m in results.values():
        p, q = m["predicted"], m["ratios"]
        L.append(f"| {m['label']} | {m['flops_step']:.4e} | {_e(p['flops_gemm'])} | {_r(q['flops_gemm'], 5)} "
                 f"| {_e(p['flops_model'])} ({_r(q['flops_model'])}) | {_r(m.get('flops_step_vs_ddp'))} "
                 f"| {C.fmt_bytes(m['bytes_sent_per_step'])} "
                 f"| {C.fmt_bytes(p['bytes_sent_per_step'])} | {_r(q['bytes_sent'])} | {_r(q['bytes_sent_vs_ddp'])} |")
    sdp = [m for m in results.values() if m.get("sdp")]
    if sdp:
        L.append("\n## Subnetwork data parallelism (SDP): measured vs ownership plan, FLOPs and bytes vs DDP\n")
        L.append("No cost-model prediction exists for SDP (\"-\" above). Gradients + Adam: measured "
                 "(max over ranks) / the plan's `predict_state_bytes(owned_numel, bf16=False)`, and whether "
                 "they are equal on every rank. FLOPs / DDP: measured / DDP's measured FLOPs in this run. "
                 "Expected FLOPs (forward masking only): App. C.2's GEMM terms (`common.predict`) of the dense "
                 "model that is left once the non-held parts are skipped (the held layers, or FFN / N units); "
                 "backward masking has no expected value. Bytes sent: per-step sync, `SubnetSync.stats` "
                 "(sub-group ring all-reduces of the gradients, 2(h-1)/h x payload per holder set of size h, "
                 "plus refresh broadcasts to the non-holders, (K-h)/K x payload, every step with backward "
                 "masking and only before evaluation with forward masking); outer sync, `DiLoCo.stats` as "
                 "for the other DiLoCo methods; / DDP: over DDP's 2(K-1)/K x the dense gradient bytes per "
                 "step.\n")
        L.append("| method | sync | held blocks (rank 0) | owned elements | grads + Adam measured / plan | ratio "
                 "| exact, all ranks | FLOPs | / DDP | expected FLOPs | ratio | bytes sent / step (grad + refresh) "
                 "| / DDP |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m in sdp:
            p, q = m["predicted"], m["ratios"]
            split = (f" ({C.fmt_bytes(m['grad_bytes_sent_per_step'])} + {C.fmt_bytes(m['refresh_bytes_sent_per_step'])})"
                     if "grad_bytes_sent_per_step" in m else " (outer)")
            L.append(f"| {m['label']} | {m['sync']} | {m['held_blocks_per_rank'][0] or 'all'} "
                     f"| {m['owned_elements_per_rank'][0]:,} of {m['total_elements']:,} "
                     f"| {m['grad_bytes'] + m['optimizer_bytes']:,} / {m['plan_grad_bytes'] + m['plan_optimizer_bytes']:,} "
                     f"| {_r(q['grads_adam_plan'])} | {'yes' if m['plan_state_exact_all_ranks'] else 'NO'} "
                     f"| {m['flops_step']:.4e} | {_r(m.get('flops_step_vs_ddp'))} | {_e(p.get('flops_expected_gemm'))} "
                     f"| {_r(q['flops_expected'], 5)} | {C.fmt_bytes(m['bytes_sent_per_step'])}{split} "
                     f"| {_r(q['bytes_sent_vs_ddp'])} |")
        srcs = sorted({m["predicted"]["flops_expected_source"] for m in sdp if m["predicted"].get("flops_expected_source")})
        if srcs:
            L.append("\nExpected FLOPs from: " + "; ".join(srcs) + ".\n")
    L.append("\n## Step time\n")
    L.append("Wall: slowest rank per step (barrier before each step), median over the timed steps. CPU: "
             "process CPU time per step, mean over ranks, median over steps. Means include the outer-sync "
             "steps.\n")
    L.append("| method | wall median | wall / DDP | wall mean | CPU median | CPU / DDP | CPU mean | sync steps (wall mean) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for m in results.values():
        L.append(f"| {m['label']} | {m['wall_median_s']:.3f} s | {_r(m.get('wall_median_s_vs_ddp'), 3)} "
                 f"| {m['wall_mean_s']:.3f} s | {m['cpu_median_s']:.3f} s | {_r(m.get('cpu_median_s_vs_ddp'), 3)} "
                 f"| {m['cpu_mean_s']:.3f} s | {m['sync_steps_timed']} "
                 f"({_r(m['wall_mean_sync_step_s'], 3) if m['wall_mean_sync_step_s'] else '-'} s) |")
    base = next((m for m in results.values() if "saving_vs_baseline" in m), None)
    if base:
        L.append(f"\n## PPU saving vs {base['saving_vs_baseline']['baseline']}: realised / predicted by FLOPs\n")
        L.append("| method | predicted FLOP saving (measured FLOPs) | realised CPU-time saving (median, non-sync) "
                 "| realised / predicted | realised wall saving (median, non-sync) | realised / predicted |")
        L.append("|---|---|---|---|---|---|")
        for m in results.values():
            s = m.get("saving_vs_baseline")
            if not s:
                continue
            L.append(f"| {m['label']} | {_pct(s['predicted_flop_saving'])} "
                     f"| {_pct(s['realised_saving_cpu_median_nonsync_s'])} | {_r(s['realised_over_predicted_cpu_median_nonsync_s'], 2)} "
                     f"| {_pct(s['realised_saving_wall_median_nonsync_s'])} | {_r(s['realised_over_predicted_wall_median_nonsync_s'], 2)} |")
    return "\n".join(L) + "\n"


def print_summary(results: dict) -> None:
    print()
    print(f"{'method':34s} {'state bytes meas/pred':>30s} {'ratio':>7s} {'FLOPs meas':>11s} {'pred GEMM':>11s} "
          f"{'ratio':>8s} {'/DDP':>6s} {'B sent/step':>12s} {'ratio':>6s} {'/DDP':>6s} {'wall med':>9s} {'/DDP':>6s} "
          f"{'cpu med':>8s} {'/DDP':>6s} {'peakRSS':>10s}")
    for m in results.values():
        p, q = m["predicted"], m["ratios"]
        print(f"{m['label']:34s} {m['state_bytes']:>14,d}/{p['model_state_bytes']:<15,.0f} {_r(q['state']):>7s} "
              f"{m['flops_step']:11.4e} {_e(p['flops_gemm']):>11s} {_r(q['flops_gemm'], 5):>8s} "
              f"{_r(m.get('flops_step_vs_ddp'), 3):>6s} "
              f"{m['bytes_sent_per_step']:12,.0f} {_r(q['bytes_sent'], 3):>6s} {_r(q['bytes_sent_vs_ddp'], 3):>6s} "
              f"{m['wall_median_s']:9.3f} "
              f"{_r(m.get('wall_median_s_vs_ddp'), 3):>6s} {m['cpu_median_s']:8.3f} {_r(m.get('cpu_median_s_vs_ddp'), 3):>6s} "
              f"{C.fmt_bytes(m['rss_peak_bytes']):>10s}")
    for m in results.values():
        if m.get("sdp"):
            p, q = m["predicted"], m["ratios"]
            print(f"{m['label']:34s} SDP ({m['sync']} sync, held blocks rank 0 {m['held_blocks_per_rank'][0] or 'all'}): "
                  f"grads+Adam {m['grad_bytes'] + m['optimizer_bytes']:,} / plan "
                  f"{m['plan_grad_bytes'] + m['plan_optimizer_bytes']:,} = {_r(q['grads_adam_plan'])} "
                  f"(exact on all ranks: {m['plan_state_exact_all_ranks']}); FLOPs / DDP {_r(m.get('flops_step_vs_ddp'))}, "
                  f"/ expected {_e(p.get('flops_expected_gemm'))} = {_r(q['flops_expected'], 5)}; bytes/step "
                  f"{m['bytes_sent_per_step']:,.0f}"
                  + (f" (grad {m['grad_bytes_sent_per_step']:,.0f} + refresh {m['refresh_bytes_sent_per_step']:,.0f})"
                     if "grad_bytes_sent_per_step" in m else "")
                  + f" = {_r(q['bytes_sent_vs_ddp'])} x DDP's {p['bytes_sent_ddp_per_step']:,.0f}")
    for m in results.values():
        s = m.get("saving_vs_baseline")
        if s:
            print(f"{m['label']:34s} vs {s['baseline']}: predicted FLOP saving {_pct(s['predicted_flop_saving'])}, "
                  f"realised CPU {_pct(s['realised_saving_cpu_median_nonsync_s'])} "
                  f"(x{_r(s['realised_over_predicted_cpu_median_nonsync_s'], 2)}), wall "
                  f"{_pct(s['realised_saving_wall_median_nonsync_s'])} "
                  f"(x{_r(s['realised_over_predicted_wall_median_nonsync_s'], 2)})")


def _ms(x):
    return f"{1000 * x:.0f} ms"


def print_timing(t: dict) -> None:
    print(f"\nsingle-process compute, one thread, {t['rounds']} interleaved rounds, CPU time (medians), PPU slice "
          f"{t['slice_index']}")
    print(f"{'variant':42s} {'fwd':>7s} {'bwd':>7s} {'opt':>7s} {'step':>7s} {'min':>7s} {'FLOP sav':>9s} {'f+b sav':>8s} {'r/p':>5s} {'step sav':>9s} "
          f"{'r/p':>5s} {'min sav':>8s} {'r/p':>5s} {'GEMM sav':>9s} {'r/p':>5s} {'GEMM s':>7s} {'copy s':>7s} {'other s':>7s}")
    for v in t["variants"].values():
        p = v["profile_s"]
        print(f"{v['label']:42s} {_ms(v['fwd_median_s']):>7s} {_ms(v['bwd_median_s']):>7s} {_ms(v['opt_median_s']):>7s} "
              f"{_ms(v['step_median_s']):>7s} {_ms(v['step_min_s']):>7s} {_pct(v['flop_saving']):>9s} "
              f"{_pct(v['fwd_bwd_saving']):>8s} {_r(v['fwd_bwd_realised_over_predicted'], 2):>5s} "
              f"{_pct(v['step_saving']):>9s} {_r(v['step_realised_over_predicted'], 2):>5s} {_pct(v['step_saving_min']):>8s} "
              f"{_r(v['step_min_realised_over_predicted'], 2):>5s} {_pct(v['gemm_time_saving']):>9s} "
              f"{_r(v['gemm_realised_over_predicted'], 2):>5s} {p['gemm']:7.3f} {p['copy_elementwise']:7.3f} {p['other']:7.3f}")


def timing_markdown(t: dict) -> str:
    L = [f"\n## Compute per rank, single process, interleaved ({t['rounds']} rounds; PPU slice {t['slice_index']})\n",
         "Each variant's forward, backward (with Megatron DDP's gradient finish) and Adam step in one process "
         "with one thread, variants timed in turn so that background load hits all alike. Times are CPU "
         "time (`time.process_time`), medians (and the minimum) over the rounds. Profile: self CPU time of "
         "one step under `torch.profiler`: GEMMs (mm/addmm/bmm/baddbmm), copies and elementwise "
         "bookkeeping (cat/copy_/clone/add/zero...), other. \"realised / predicted\" = measured time "
         "saving / FLOP saving.\n",
         "| variant | forward | backward | Adam (trainable-param saving) | step (median) | step (min) | FLOP saving "
         "| fwd+bwd saving | realised / predicted | step saving (median) | realised / predicted | step saving (min) "
         "| realised / predicted | GEMM-time saving | realised / predicted | profile GEMM / copies / other per step |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in t["variants"].values():
        p = v["profile_s"]
        L.append(f"| {v['label']} | {_ms(v['fwd_median_s'])} | {_ms(v['bwd_median_s'])} | {_ms(v['opt_median_s'])} "
                 f"({_pct(v['trainable_saving'])}) | {_ms(v['step_median_s'])} | {_ms(v['step_min_s'])} | {_pct(v['flop_saving'])} "
                 f"| {_pct(v['fwd_bwd_saving'])} | {_r(v['fwd_bwd_realised_over_predicted'], 2)} "
                 f"| {_pct(v['step_saving'])} | {_r(v['step_realised_over_predicted'], 2)} "
                 f"| {_pct(v['step_saving_min'])} | {_r(v['step_min_realised_over_predicted'], 2)} "
                 f"| {_pct(v['gemm_time_saving'])} | {_r(v['gemm_realised_over_predicted'], 2)} "
                 f"| {p['gemm']:.3f} / {p['copy_elementwise']:.3f} / {p['other']:.3f} s |")
    return "\n".join(L) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, help="K ranks = replicas (K %% 4 == 0 for the 1/4 variants)")
    ap.add_argument("--steps", type=int, default=17, help="timed steps per method (rounded so that the "
                    "total number of steps is a multiple of H)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=10, help="H of the DiLoCo methods")
    ap.add_argument("--fragments", type=int, default=3, help="F of the streaming methods (embeddings + F-1 layer groups)")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--model-flags", default=None, help="replace the model/training flags (one string)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "methods.json"))
    ap.add_argument("--log-dir", default=None, help="keep each rank's log here")
    ap.add_argument("--timing-rounds", type=int, default=20,
                    help="rounds of the single-process interleaved compute timing (0: skip it)")
    ap.add_argument("--timing-slice", type=int, default=1, help="slice index of the PPU models timed there")
    a = ap.parse_args(argv)

    model = a.model_flags.split() if a.model_flags else MODEL
    total = a.warmup + 1 + a.steps
    total = int(math.ceil(total / a.local_steps) * a.local_steps)
    steps = total - a.warmup - 1
    all_methods = methods(a.local_steps, a.fragments)
    names = a.methods or list(all_methods)
    unknown = [n for n in names if n not in all_methods]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(all_methods)}")
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)

    t0 = time.time()
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = {}
    for name in names:
        label, extra = all_methods[name]
        argv_m = method_argv(model, total + 1, extra)  # + 1: the untimed last iteration (see run_worker)
        spec = {"name": name, "argv": argv_m, "warmup": a.warmup, "steps": steps}
        ts = time.time()
        ranks = C.launch_ranks(os.path.abspath(__file__), a.nproc, spec, log_dir=a.log_dir)
        results[name] = summarise(name, label, argv_m, ranks, a.nproc)
        results[name]["job_wall_s"] = time.time() - ts
        m = results[name]
        print(f"[{time.time() - t0:6.0f} s] {label}: state {m['state_bytes']:,} B (pred "
              f"{m['predicted']['model_state_bytes']:,.0f}), FLOPs {m['flops_step']:.4e} (pred GEMM "
              f"{_e(m['predicted']['flops_gemm'])}), wall median {m['wall_median_s']:.3f} s, CPU median "
              f"{m['cpu_median_s']:.3f} s, peak RSS {C.fmt_bytes(m['rss_peak_bytes'])}", flush=True)
    add_relative(results)
    timing = None
    if a.timing_rounds > 0:
        ts = time.time()
        spec = {"name": "timing", "mode": "timing", "argv": model + ["--train-iters", "1000", "--diloco-local-steps", "0"],
                "variants": list(TIMING_VARIANTS), "rounds": a.timing_rounds, "warmup": 2,
                "slice_index": a.timing_slice}
        timing = timing_summary(C.launch_ranks(os.path.abspath(__file__), 1, spec, log_dir=a.log_dir)[0])
        timing["job_wall_s"] = time.time() - ts
        print(f"[{time.time() - t0:6.0f} s] interleaved single-process compute timing done", flush=True)
    meta = {"command": "python benchmarks/bench_methods.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                                " " + " ".join(sys.argv[1:] if argv is None else argv)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_s": time.time() - t0,
            "machine": C.machine_info(), "load_start": load_start,
            "load_end": [round(x, 2) for x in os.getloadavg()], "nproc": a.nproc, "local_steps": a.local_steps,
            "fragments": a.fragments, "warmup": a.warmup, "steps": steps, "model_flags": model}
    print_summary(results)
    if timing:
        print_timing(timing)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "methods": results, "compute_timing": timing}, f, indent=1)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(results, meta) + (timing_markdown(timing) if timing else ""))
    print(f"\nwrote {a.out} and {md} ({meta['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    if "--worker" in sys.argv:
        C.worker_main(lambda spec: run_timing_worker(spec) if spec.get("mode") == "timing" else run_worker(spec))
    else:
        main()
