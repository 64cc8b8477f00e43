#!/usr/bin/env python
"""Convergence study at equal tokens on the embedded corpus: DDP, DiLoCo, Streaming DiLoCo,
PPU (1/2, 1/4 MLPs; 1/4 MLPs + 1/4 heads) and the paper's two negative controls.

Every method trains the same GPT on the embedded State of the Union corpus with K = 4
replicas (4 CPU ranks, gloo), the same global batch, the same number of iterations and
the same optimiser settings (AdamW beta2 0.99, weight decay 0.1, linear warm-up then
cosine; outer Nesterov SGD lr 0.7, momentum 0.9, H local steps), so every method sees
the same tokens. Each run is built by ``megatron_ppu.training.build`` and trains with
``Trainer.train`` (its callbacks record the losses and evaluations), so the last evaluation
follows the end-of-training sync of pending partial rounds, as in ``pretrain_gpt_ppu.py``.
For each method it records the training loss of every iteration (mean
over ranks), the held-out loss/perplexity every ``--eval-interval`` iterations (the
library's ``Trainer.evaluate``: the same validation batches, mean over replicas), the
final held-out perplexity, per-rank state bytes measured from the live tensors (weights,
gradient buffers, Adam moments, DiLoCo host outer state) next to the cost model, peak
RSS per rank and the run's wall time.

Negative controls (paper App. C and D):

* ``control_wo``: 1/4 MLPs + 1/4 heads with the attention output projection W_O sliced
  too (``--ppu-slice-attention-output``), to compare with ``ppu_mlp4_heads4``;
* ``control_detach``: 1/4 MLPs with the frozen slices' input-Jacobian term dropped
  (``--ppu-detach-frozen-jacobian``), to compare with ``ppu_mlp4``.

Subnetwork data parallelism (seed paper 003, :mod:`megatron_ppu.subnet`), every replica
holding half the model: ``sdp_blocks_{bwd,fwd}`` (2 of the 4 blocks, backward or forward
masking) and ``sdp_neurons_fwd`` (half the MLP units, forward masking) on the same Streaming
DiLoCo outer loop, and ``sdp_step_*`` the same plans with SDP's per-step synchronisation
(``--subnet-sync step``, no outer optimizer: compare with DDP). The report puts them in their
own table and figures (``convergence_sdp_*.png``) next to DDP, Streaming DiLoCo and PPU 1/2.

The outer-sync variants of issue 15 (``docs/overlap.md``, ``docs/compression.md``) on Streaming
DiLoCo and PPU 1/2 MLPs: ``streaming_<v>`` and ``ppu_mlp2_<v>`` with ``<v>`` one of ``tau1``,
``tau5`` (``--diloco-sync-delay``), ``int8``, ``int8_ef``, ``fp8``, ``fp8_ef``
(``--diloco-allreduce-dtype``, ``_ef``: ``--diloco-error-feedback``), to compare at equal tokens
with ``streaming_diloco`` and ``ppu_mlp2`` (fp32, τ = 0).

Each method's result is written to ``benchmarks/results/convergence/<method>.json`` as
soon as it finishes (progress in ``<method>.partial.json`` at every evaluation), and a
rerun skips finished methods (``--force`` redoes them), so a crash loses at most the
method in flight. At the end: ``benchmarks/results/convergence.json``,
``convergence.md`` and ``docs/figures/convergence_*.png``.

Usage (about an hour on 2 shared CPU cores with the defaults)::

    nice -n 10 python benchmarks/convergence.py
    python benchmarks/convergence.py --report-only        # tables and figures from finished methods
    python benchmarks/convergence.py --iters 200 --methods ddp ppu_mlp4 --tag smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FIGURES = os.path.join(C.REPO, "docs", "figures")

METHOD_ORDER = ["ddp", "diloco", "streaming_diloco", "ppu_mlp2", "ppu_mlp2_damped", "ppu_mlp4", "ppu_mlp4_damped",
                "ppu_mlp4_lrmult",
                "ppu_mlp4_heads4",
                "control_wo", "control_detach",
                "sdp_blocks_bwd", "sdp_blocks_fwd", "sdp_neurons_fwd",
                "sdp_step_blocks_bwd", "sdp_step_blocks_fwd", "sdp_step_neurons_fwd"]  # order of the tables
# Order of the runs: the paper's comparison (Streaming DiLoCo vs PPU) and the controls first, so that
# a study cut short by the machine's time limit misses the least important method (plain DiLoCo).
RUN_ORDER = ["ddp", "streaming_diloco", "ppu_mlp4", "ppu_mlp2", "ppu_mlp4_heads4", "control_detach",
             "control_wo", "diloco", "ppu_mlp4_damped", "ppu_mlp2_damped", "ppu_mlp4_lrmult", "sdp_blocks_bwd", "sdp_blocks_fwd", "sdp_neurons_fwd",
             "sdp_step_blocks_bwd", "sdp_step_blocks_fwd", "sdp_step_neurons_fwd"]
PAPER_METHODS = METHOD_ORDER[:METHOD_ORDER.index("sdp_blocks_bwd")]
SDP_METHODS = METHOD_ORDER[METHOD_ORDER.index("sdp_blocks_bwd"):]
SDP_TABLE = ["ddp", "streaming_diloco", "ppu_mlp2"] + SDP_METHODS  # SDP next to its references


# (suffix, label, flags) of the outer-sync variants measured on Streaming DiLoCo and PPU 1/2 MLPs
SYNC_VARIANTS = [
    ("tau1", "tau 1", ["--diloco-sync-delay", "1"]),
    ("tau5", "tau 5", ["--diloco-sync-delay", "5"]),
    ("int8", "int8", ["--diloco-allreduce-dtype", "int8"]),
    ("int8_ef", "int8 + error feedback", ["--diloco-allreduce-dtype", "int8", "--diloco-error-feedback"]),
    ("fp8", "fp8", ["--diloco-allreduce-dtype", "fp8"]),
    ("fp8_ef", "fp8 + error feedback", ["--diloco-allreduce-dtype", "fp8", "--diloco-error-feedback"]),
]
SYNC_METHODS = [f"{b}_{v}" for b in ("streaming", "ppu_mlp2") for v, _, _ in SYNC_VARIANTS]
DIAG_METHODS = ["streaming_diag", "ppu_mlp2_diag", "ppu_mlp4_diag"]
METHOD_ORDER += SYNC_METHODS + DIAG_METHODS
RUN_ORDER += SYNC_METHODS + DIAG_METHODS
PAPER_METHODS += SYNC_METHODS + DIAG_METHODS


def model_flags(a) -> list:
    return ["--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--ffn-hidden-size", str(a.ffn),
            "--num-attention-heads", str(a.heads), "--seq-length", str(a.seq),
            "--micro-batch-size", str(a.micro_batch), "--global-batch-size", str(a.micro_batch * a.nproc),
            "--train-iters", str(a.iters), "--lr", str(a.lr), "--min-lr", str(a.lr / 10),
            "--lr-decay-style", "cosine", "--lr-warmup-iters", str(a.warmup), "--weight-decay", "0.1",
            "--adam-beta1", "0.9", "--adam-beta2", "0.99", "--clip-grad", "1.0",
            "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", str(a.seed),
            "--eval-iters", str(a.eval_iters), "--eval-interval", str(a.eval_interval),
            "--log-interval", "1000000000",
            "--diloco-outer-lr", str(a.outer_lr), "--diloco-outer-momentum", "0.9"]


def methods(a) -> dict:
    """name -> (label, extra flags). PPU and the controls run on Streaming DiLoCo, as in the paper."""
    h = ["--diloco-local-steps", str(a.local_steps)]
    s = h + ["--diloco-streaming-fragments", str(a.fragments)]
    step, blocks, fwd, neurons = C.SDP_STEP, C.SDP_BLOCKS_HALF, C.SDP_FORWARD, C.SDP_NEURONS_HALF
    # the runs that the outer-sync variants and the merge diagnostic are applied to: prefix -> (label, flags)
    bases = {"streaming": ("Streaming DiLoCo", s), "ppu_mlp2": ("PPU 1/2 MLPs", s + ["--ppu-slices", "2"]),
             "ppu_mlp4": ("PPU 1/4 MLPs", s + ["--ppu-slices", "4"])}
    return {
        "ddp": ("DDP", ["--diloco-local-steps", "0"]),
        "diloco": ("DiLoCo", h),
        "streaming_diloco": ("Streaming DiLoCo", s),
        "ppu_mlp2": ("PPU 1/2 MLPs", s + ["--ppu-slices", "2"]),
        "ppu_mlp4": ("PPU 1/4 MLPs", s + ["--ppu-slices", "4"]),
        # the single-owner remedies of docs/single_owner.md (issue 16)
        "ppu_mlp4_damped": ("PPU 1/4 MLPs, owner damping 1", s + ["--ppu-slices", "4", "--diloco-owner-damping", "1"]),
        "ppu_mlp2_damped": ("PPU 1/2 MLPs, owner damping 1", s + ["--ppu-slices", "2", "--diloco-owner-damping", "1"]),
        "ppu_mlp4_lrmult": ("PPU 1/4 MLPs, sliced lr x 0.5", s + ["--ppu-slices", "4", "--ppu-sliced-lr-mult", "0.5"]),
        # the overlapped / compressed outer sync of docs/overlap.md and docs/compression.md (issue 15):
        # its convergence cost at equal tokens, against the fp32 tau = 0 runs above
        **{f"{base}_{v}": (f"{lab}, {vl}", flags + vf) for base, (lab, flags) in bases.items()
           if base != "ppu_mlp4" for v, vl, vf in SYNC_VARIANTS},
        # the same runs with the merge diagnostic (docs/single_owner.md): the probe loss of the local
        # models, the plain merge and the outer step at every sync (forward passes only: same training)
        **{f"{base}_diag": (f"{lab}, merge diagnostic", flags + ["--diloco-merge-diagnostic"])
           for base, (lab, flags) in bases.items()},
        "ppu_mlp4_heads4": ("PPU 1/4 MLPs + 1/4 heads", s + ["--ppu-slices", "4", "--ppu-slice-attention-heads"]),
        "control_wo": ("control: 1/4 MLPs + 1/4 heads + W_O sliced",
                       s + ["--ppu-slices", "4", "--ppu-slice-attention-heads", "--ppu-slice-attention-output"]),
        "control_detach": ("control: 1/4 MLPs, frozen Jacobian detached",
                           s + ["--ppu-slices", "4", "--ppu-detach-frozen-jacobian"]),
        # Subnetwork data parallelism (seed paper 003), every replica holding half the model so
        # that they compare with PPU 1/2 MLPs: half the blocks (2 holders each), or half the MLP
        # hidden units dropped from the forward pass too. First on the same Streaming DiLoCo outer
        # loop as PPU, then with SDP's own per-step synchronisation (compare with DDP).
        "sdp_blocks_bwd": ("SDP blocks 1/2, backward masking, outer sync", s + blocks),
        "sdp_blocks_fwd": ("SDP blocks 1/2, forward masking, outer sync", s + blocks + fwd),
        "sdp_neurons_fwd": ("SDP neurons 1/2, forward masking, outer sync", s + neurons),
        "sdp_step_blocks_bwd": ("SDP blocks 1/2, backward masking, per-step sync", step + blocks),
        "sdp_step_blocks_fwd": ("SDP blocks 1/2, forward masking, per-step sync", step + blocks + fwd),
        "sdp_step_neurons_fwd": ("SDP neurons 1/2, forward masking, per-step sync", step + neurons),
    }


# ------------------------------------------------------------------ worker side
def run_worker(spec: dict) -> dict:
    """One rank of one method: train with ``Trainer.train`` (evaluating every ``--eval-interval``
    iterations and after the last one, after the final sync of the pending partial rounds),
    measure state, report."""
    import torch.distributed as dist

    from megatron_ppu.testing.accounting import measure_state_bytes, predict_state_bytes

    rss_start = C.max_rss_bytes()
    t0 = time.perf_counter()
    tr = C.build_trainer(spec["argv"])
    rank, world = dist.get_rank(), dist.get_world_size()
    iters = spec["iters"]
    assert tr.args.training.train_iters == iters and tr.args.checkpoint.eval_interval == spec["eval_interval"]
    losses, evals = [], []
    progress = spec.get("progress") if rank == world - 1 else None
    t_train = time.perf_counter()

    def on_evaluation(trainer, ev):
        evals.append({"iteration": trainer.iteration, "loss": ev["loss"], "ppl": ev["ppl"],
                      "wall_s": time.perf_counter() - t_train})
        if progress:
            with open(progress + ".tmp", "w") as f:
                json.dump({"iteration": trainer.iteration, "of": iters, "evals": evals,
                           "wall_s": time.perf_counter() - t_train}, f)
            os.replace(progress + ".tmp", progress)

    on_evaluation(tr, tr.evaluate())  # at initialisation (every method starts from the same weights)
    t_train = time.perf_counter()
    evals[0]["wall_s"] = 0.0
    tr.train(on_iteration=lambda trainer, st: losses.append(st["loss"]), on_evaluation=on_evaluation)
    train_s = time.perf_counter() - t_train
    sb = measure_state_bytes([tr.ddp], tr.optimizer)
    stats = tr.sync.stats()
    out = {"rank": rank, "losses": losses, "evals": evals, "final_eval": evals[-1], "train_s": train_s,
           "total_s": time.perf_counter() - t0, "grad_bytes": sb.grads, "optimizer_bytes": sb.optimizer,
           "trainable_elements": sb.trainable_elements,
           "weights_bytes": sum(p.numel() * p.element_size() for p in tr.model.parameters()),
           "outer_bytes": tr.sync.outer_state_bytes(),
           "syncs": stats.get("syncs", 0),
           # bytes on the wire by kind, as the synchroniser counts them (DDP: gradient all-reduces;
           # DiLoCo: outer syncs, the final one included; SDP: gradients + refreshes)
           "bytes_sent": sum(v for k, v in stats.items() if k.endswith("_bytes_sent")),
           "sync_stats": stats,
           # grads + Adam state predicted from the ownership plan's trainable count (fp32)
           "plan_state_bytes": (lambda b: b.grads + b.optimizer)(predict_state_bytes(tr.plan.owned_numel(), bf16=False)),
           "skipped_outer": stats.get("skipped", 0),
           "vocab_size": tr.run.tokenizer.vocab_size, "plan": tr.plan.summary(),
           "total_numel": tr.plan.total_numel(), "global_batch_size": tr.global_batch_size,
           "data": tr.run.data_description, "rss_start": rss_start, "rss_peak": C.max_rss_bytes(),
           "merge_trace": tr.merge_trace}
    return out


# ------------------------------------------------------------------ parent side
def summarise(name, label, argv, ranks, a) -> dict:
    r0 = ranks[-1]
    n = len(r0["losses"])
    losses = [sum(r["losses"][i] for r in ranks) / len(ranks) for i in range(n)]
    pred = C.predict(argv, a.nproc, r0["vocab_size"])
    m = {
        "name": name, "label": label, "argv": argv, "plan_last_rank": r0["plan"],
        "iterations": n, "global_batch_size": r0["global_batch_size"],
        "tokens": n * r0["global_batch_size"] * a.seq, "train_loss": losses,
        "evals": r0["evals"], "final_loss": r0["final_eval"]["loss"], "final_ppl": r0["final_eval"]["ppl"],
        "train_s": max(r["train_s"] for r in ranks), "total_s": max(r["total_s"] for r in ranks),
        "trainable_elements": max(r["trainable_elements"] for r in ranks), "total_elements": r0["total_numel"],
        "weights_bytes": max(r["weights_bytes"] for r in ranks), "grad_bytes": max(r["grad_bytes"] for r in ranks),
        "optimizer_bytes": max(r["optimizer_bytes"] for r in ranks), "outer_bytes": max(r["outer_bytes"] for r in ranks),
        "rss_peak_bytes": max(r["rss_peak"] for r in ranks), "syncs": r0["syncs"], "skipped_outer": r0["skipped_outer"],
        "bytes_sent_per_rank": max(r["bytes_sent"] for r in ranks), "data": r0["data"], "predicted": pred,
    }
    m["plan_state_bytes"] = max(r.get("plan_state_bytes", 0) for r in ranks)
    m["sync_stats"] = r0.get("sync_stats")
    m["merge_trace"] = r0.get("merge_trace") or None  # --diloco-merge-diagnostic: one entry per sync
    m["state_bytes"] = m["weights_bytes"] + m["grad_bytes"] + m["optimizer_bytes"] + m["outer_bytes"]
    m["device_state_bytes"] = m["weights_bytes"] + m["grad_bytes"] + m["optimizer_bytes"]
    m["state_ratio_vs_predicted"] = C.ratio(m["state_bytes"], pred["model_state_bytes"])
    tail = losses[-max(1, n // 20):]
    m["train_loss_last5pct"] = sum(tail) / len(tail)
    return m


def _smooth(xs, w):
    out, acc = [], 0.0
    q = []
    for x in xs:
        q.append(x)
        acc += x
        if len(q) > w:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def figures(results: dict, meta: dict, prefix: str, fig_dir: str) -> list:
    """Loss curves, validation curves and memory vs perplexity (PNG) into ``fig_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    paths = []
    styles = {"ddp": ("black", "-"), "diloco": ("tab:orange", "--"), "streaming_diloco": ("tab:orange", "-"),
              "ppu_mlp2": ("tab:blue", "-"), "ppu_mlp4": ("tab:green", "-"),
              "ppu_mlp4_damped": ("tab:green", "--"), "ppu_mlp4_lrmult": ("tab:green", ":"),
              "ppu_mlp4_heads4": ("tab:purple", "-"), "control_wo": ("tab:red", ":"),
              "control_detach": ("tab:brown", ":"),
              "sdp_blocks_bwd": ("tab:cyan", "-."), "sdp_blocks_fwd": ("tab:olive", "-."),
              "sdp_neurons_fwd": ("tab:pink", "-."), "sdp_step_blocks_bwd": ("tab:cyan", (0, (5, 1))),
              "sdp_step_blocks_fwd": ("tab:olive", (0, (5, 1))), "sdp_step_neurons_fwd": ("tab:pink", (0, (5, 1)))}
    tok_per_it = meta["global_batch_size"] * meta["seq_length"]

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for name, m in results.items():
        c, ls = styles.get(name, (None, "-"))
        y = _smooth(m["train_loss"], 50)
        x = [(i + 1) * tok_per_it / 1e6 for i in range(len(y))]
        axes[0].plot(x, y, color=c, ls=ls, lw=1.2, label=m["label"])
        ex = [e["iteration"] * tok_per_it / 1e6 for e in m["evals"] if e["iteration"] > 0]
        ey = [e["loss"] for e in m["evals"] if e["iteration"] > 0]
        axes[1].plot(ex, ey, color=c, ls=ls, marker="o", ms=3, lw=1.2, label=f"{m['label']} ({m['final_ppl']:.1f})")
    axes[0].set_title("training loss (mean over ranks, moving average of 50 iterations)")
    axes[1].set_title("held-out loss (final perplexity in brackets)")
    for ax in axes:
        ax.set_xlabel("tokens seen (millions, all replicas)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    lo = min(min(e["loss"] for e in m["evals"]) for m in results.values())
    hi = max(m["evals"][min(2, len(m["evals"]) - 1)]["loss"] for m in results.values())
    axes[1].set_ylim(lo - 0.05, hi + 0.05)
    lo0 = min(min(_smooth(m["train_loss"], 50)) for m in results.values())
    axes[0].set_ylim(lo0 - 0.1, lo0 + 2.0)
    fig.legend(*axes[1].get_legend_handles_labels(), fontsize=7.5, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(f"{meta['model_desc']}; {meta['nproc']} replicas, global batch {meta['global_batch_size']} x "
                 f"{meta['seq_length']} tokens, {meta['iters']} iterations, H={meta['local_steps']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    p = os.path.join(fig_dir, f"{prefix}_loss.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(8, 5.2))
    placed = []
    for name, m in results.items():
        c, _ = styles.get(name, (None, "-"))
        dev, tot = m["device_state_bytes"] / 2 ** 20, m["state_bytes"] / 2 ** 20
        ppl = m["final_ppl"]
        ctrl = name.startswith("control")
        ax.scatter([dev], [ppl], color=c, s=45, marker="x" if ctrl else "o", zorder=3)
        if tot > dev:
            ax.scatter([tot], [ppl], facecolors="none", edgecolors=c, s=45, marker="o", zorder=3)
            ax.plot([dev, tot], [ppl, ppl], color=c, lw=0.8, alpha=0.5)
        dy = 3
        for x, y in placed:  # methods with the same memory and perplexity: label below
            if abs(x - dev) < 0.3 and abs(y - ppl) < 15:
                dy -= 11
        placed.append((dev, ppl))
        ax.annotate(m["label"], (dev, ppl), fontsize=7, xytext=(-4, dy), textcoords="offset points", ha="right")
    ax.set_xlabel("per-rank training state, MiB, measured from the live tensors\n"
                  "filled: weights + gradients + Adam m, v; hollow: + DiLoCo outer state (snapshot + momentum, host)",
                  fontsize=8)
    ax.set_ylabel("held-out perplexity at equal tokens")
    ax.set_title(f"memory vs perplexity ({meta['model_desc']}, {meta['tokens']:,} tokens)", fontsize=9)
    ax.grid(alpha=0.3)
    lo_x = min(m["device_state_bytes"] for m in results.values()) / 2 ** 20
    ax.set_xlim(lo_x - 0.45 * (max(m["state_bytes"] for m in results.values()) / 2 ** 20 - lo_x), None)
    fig.tight_layout()
    p = os.path.join(fig_dir, f"{prefix}_memory_vs_ppl.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def markdown(results: dict, meta: dict, figs: list, md_dir: str = RESULTS) -> str:
    L = ["# Convergence at equal tokens (embedded corpus)\n",
         f"Produced by `{meta['command']}`; {meta['model_desc']}; {meta['nproc']} replicas; global batch "
         f"{meta['global_batch_size']} sequences x {meta['seq_length']} tokens; {meta['iters']} iterations "
         f"({meta['tokens']:,} tokens) for every method; H = {meta['local_steps']}, F = {meta['fragments']} for the "
         f"streaming methods; data: {meta.get('data', '')}.\n",
         f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} CPU cores shared with other jobs, "
         f"no GPU; torch {meta['machine']['versions']['torch']}, megatron-core "
         f"{meta['machine']['versions']['megatron-core']}.\n"]
    base, ddp = results.get("streaming_diloco"), results.get("ddp")
    head = ("| method | held-out loss | perplexity | vs Streaming DiLoCo | vs DDP | final train loss (last 5 %) "
            "| tokens | trainable / rank | weights+grads+Adam / rank | + outer state (host) | peak RSS / rank "
            "| bytes sent / rank | wall time |")

    def row(m):
        rel = f"{100 * (m['final_ppl'] / base['final_ppl'] - 1):+.1f} %" if base else "-"
        rel_ddp = f"{100 * (m['final_ppl'] / ddp['final_ppl'] - 1):+.1f} %" if ddp else "-"
        return (f"| {m['label']} | {m['final_loss']:.4f} | {m['final_ppl']:.2f} | {rel} | {rel_ddp} "
                f"| {m['train_loss_last5pct']:.4f} | {m['tokens']:,} "
                f"| {m['trainable_elements']:,} ({100 * m['trainable_elements'] / m['total_elements']:.0f} %) "
                f"| {C.fmt_bytes(m['device_state_bytes'])} | {C.fmt_bytes(m['state_bytes'])} "
                f"| {C.fmt_bytes(m['rss_peak_bytes'])} | {C.fmt_bytes(m['bytes_sent_per_rank'])} "
                f"| {m['train_s'] / 60:.1f} min |")

    for title, names in (("DiLoCo, Streaming DiLoCo, PPU and the paper's controls", PAPER_METHODS),
                         ("Subnetwork data parallelism (SDP), next to its references", SDP_TABLE)):
        rows = [results[n] for n in names if n in results]
        if not rows:
            continue
        L += [f"### {title}\n", head, "|---" * 13 + "|"] + [row(m) for m in rows] + [""]
    L.append("Held-out loss is the mean over replicas of each replica's loss on the same validation batches "
             "(the library's `Trainer.evaluate`) after the last iteration. Bytes sent: ring all-reduce "
             "bytes per rank over the whole run (DDP: 2(K-1)/K x gradient bytes per iteration; per-step SDP: "
             "2(h-1)/h x the gradient payload of each group of h holders plus (K-h)/K x the values broadcast "
             "to non-holders, see `megatron_ppu.subnet.SyncStats`).\n")
    for p in figs:
        L.append(f"![{os.path.basename(p)}]({os.path.relpath(p, md_dir)})")  # relative to the .md
    return "\n".join(L) + "\n"


def report(a, names, allm, meta_extra=None) -> dict:
    """Collect finished methods, write the combined JSON, Markdown and figures."""
    out_dir = os.path.join(RESULTS, a.tag)
    results = {}
    for name in names:
        p = os.path.join(out_dir, f"{name}.json")
        if os.path.isfile(p):
            with open(p) as f:
                results[name] = json.load(f)
    if not results:
        print("no finished methods to report")
        return {}
    any_m = next(iter(results.values()))
    meta = {"command": a.command, "machine": C.machine_info(), "nproc": a.nproc, "iters": any_m["iterations"],
            "global_batch_size": any_m["global_batch_size"], "seq_length": a.seq, "tokens": any_m["tokens"],
            "local_steps": a.local_steps, "fragments": a.fragments, "data": any_m.get("data"),
            "model_desc": f"GPT {a.layers} layers, hidden {a.hidden}, {a.heads} heads, FFN {a.ffn}, "
                          f"{any_m['total_elements']:,} parameters",
            "flags_common": model_flags(a)}
    meta.update(meta_extra or {})
    prefix = "convergence" if a.tag == "convergence" else a.tag
    # The study's figures go to docs/figures/; other tags (smoke runs) keep theirs in results/<tag>/.
    fig_dir = FIGURES if a.tag == "convergence" else out_dir
    figs = []
    for suffix, group in (("", PAPER_METHODS), ("_sdp", SDP_TABLE)):
        sub = {n: results[n] for n in group if n in results}
        if suffix and not any(n in results for n in SDP_METHODS):
            continue
        if sub:
            # a nested tag (study_k4/s1234) names its figures by its last part, inside results/<tag>/
            figs += figures(sub, meta, os.path.basename(prefix) + suffix, fig_dir)
    with open(os.path.join(RESULTS, f"{prefix}.json"), "w") as f:
        json.dump({"meta": meta, "methods": results}, f, indent=1)
    md_path = os.path.join(RESULTS, f"{prefix}.md")
    with open(md_path, "w") as f:
        f.write(markdown(results, meta, figs, os.path.dirname(md_path)))
    print(f"\n{'method':48s} {'loss':>7s} {'ppl':>8s} {'state/rank':>11s} {'+outer':>11s} {'wall':>8s}")
    for m in results.values():
        print(f"{m['label']:48s} {m['final_loss']:7.4f} {m['final_ppl']:8.2f} {C.fmt_bytes(m['device_state_bytes']):>11s} "
              f"{C.fmt_bytes(m['state_bytes']):>11s} {m['train_s'] / 60:6.1f} min")
    print(f"wrote {os.path.join(RESULTS, prefix + '.json')}, {prefix}.md and {', '.join(figs)}")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, help="K replicas = ranks")
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per replica per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=75)
    ap.add_argument("--local-steps", type=int, default=50, help="H")
    ap.add_argument("--fragments", type=int, default=3, help="F of the streaming methods")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--eval-iters", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--methods", nargs="+", default=None, choices=METHOD_ORDER)
    ap.add_argument("--tag", default="convergence", help="results/<tag>/ and <tag>.json/.md/figures")
    ap.add_argument("--force", action="store_true", help="redo methods that already have a result")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=5400.0, help="seconds per method")
    ap.add_argument("--log-dir", default=None, help="keep each rank's log here (default: discarded)")
    a = ap.parse_args(argv)
    a.command = "python benchmarks/convergence.py" + ("".join(" " + x for x in (argv if argv is not None else sys.argv[1:])))

    allm = methods(a)
    names = a.methods or METHOD_ORDER
    out_dir = os.path.join(RESULTS, a.tag)
    os.makedirs(out_dir, exist_ok=True)
    if not a.report_only:
        common = model_flags(a)
        t0 = time.time()
        for name in sorted(names, key=RUN_ORDER.index):
            path = os.path.join(out_dir, f"{name}.json")
            if os.path.isfile(path) and not a.force:
                print(f"{name}: already done ({path}); --force to redo", flush=True)
                continue
            label, extra = allm[name]
            argv_m = common + extra
            if "--subnet-sync" in extra:  # per-step SDP has no outer optimizer: drop its flags
                argv_m = C.drop_flags(argv_m, C.OUTER_FLAGS)
            spec = {"name": name, "argv": argv_m, "iters": a.iters, "eval_interval": a.eval_interval,
                    "progress": os.path.join(out_dir, f"{name}.partial.json")}
            ts = time.time()
            load0 = os.getloadavg()
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(extra)}", flush=True)
            if a.log_dir:
                os.makedirs(a.log_dir, exist_ok=True)
            ranks = C.launch_ranks(os.path.abspath(__file__), a.nproc, spec, timeout=a.timeout,
                                   log_dir=a.log_dir)
            m = summarise(name, label, argv_m, ranks, a)
            m["job_wall_s"] = time.time() - ts
            m["load_average_start"] = list(load0)
            m["load_average_end"] = list(os.getloadavg())
            with open(path + ".tmp", "w") as f:
                json.dump(m, f)
            os.replace(path + ".tmp", path)
            try:
                os.remove(spec["progress"])
            except OSError:
                pass
            print(f"[{time.strftime('%H:%M:%S')}] {name}: held-out loss {m['final_loss']:.4f}, ppl "
                  f"{m['final_ppl']:.2f}, state/rank {C.fmt_bytes(m['state_bytes'])}, {m['train_s']:.0f} s "
                  f"(job {m['job_wall_s']:.0f} s, {time.time() - t0:.0f} s so far)", flush=True)
    report(a, names, allm)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        C.worker_main(run_worker)
    else:
        main()
