"""What the training log reports, with Megatron-LM's names: the iteration line (loss, learning
rate, grad norm, throughput, bytes sent), its timers, the scalars of TensorBoard and Weights &
Biases (:class:`ScalarSinks`: one list of scalars per step, written to both), the params norm
and memory; and the model FLOPs of an iteration."""
from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

logger = logging.getLogger("megatron_ppu.train")


class Clock:
    """Wall-clock laps of one iteration's phases (CUDA-synchronised when on a GPU)."""

    def __init__(self):
        self.times: Dict[str, float] = {}
        self._t = self._now()

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        t = self._now()
        self.times[name] = self.times.get(name, 0.0) + t - self._t
        self._t = t


def memory_stats() -> Dict[str, float]:
    """Megatron-LM's memory scalars (``--log-memory-to-tensorboard``): the CUDA caching
    allocator's reserved / allocated / peak allocated bytes; on CPU the process's peak RSS."""
    if torch.cuda.is_available():
        return {"mem-reserved-bytes": float(torch.cuda.memory_reserved()),
                "mem-allocated-bytes": float(torch.cuda.memory_allocated()),
                "mem-max-allocated-bytes": float(torch.cuda.max_memory_allocated())}
    return {"mem-max-rss-bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}


def dense_gpt_flops(*, batch_size: int, seq_length: int, num_layers: int, hidden_size: int, ffn_hidden_size: int,
                    num_attention_heads: int, num_query_groups: int, kv_channels: int, swiglu: bool,
                    padded_vocab_size: int) -> float:
    """Model FLOPs of one training iteration (forward + backward) of a dense GPT, Megatron-LM's
    ``num_floating_point_operations`` (training/training.py, core_v0.16.1) without MoE/MTP/MLA:
    3 (fwd + 2 bwd) x 2 (FMA) x [MLP h.ffn.(3 if SwiGLU else 2) + QKV/out projections + causal
    attention (half of the s x s scores) per layer, plus the logits]."""
    q = kv_channels * num_attention_heads
    kv = kv_channels * num_query_groups
    attn = 3 * 2 * (hidden_size * (q + 2 * kv) + q * seq_length / 2 * 2 + q * hidden_size)
    mlp = 3 * 2 * hidden_size * ffn_hidden_size * (3 if swiglu else 2)
    logits = 3 * 2 * hidden_size * padded_vocab_size
    return float(batch_size * seq_length * (num_layers * (mlp + attn) + logits))


def params_norm(model: torch.nn.Module) -> float:
    """L2 norm of this replica's model parameters (Megatron-LM's ``--log-params-norm``): every
    parameter once (tensor-parallel duplicates and the tied output weight skipped), summed
    over the model-parallel group. Collective over that group: every rank calls it."""
    sq = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        if getattr(p, "shared", False):
            continue  # the last stage's copy of the tied embedding (Megatron's param_is_not_shared)
        if param_is_not_tensor_parallel_duplicate(p):
            sq += p.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return float(sq.sqrt())


def log_iterations(t, it: int, window: List[Dict[str, float]], elapsed: float, loss: float) -> None:
    """The log line, timers and TensorBoard scalars of the iterations in ``window`` (the
    trainer ``t``'s last ``--log-interval`` steps); ``loss`` is their mean over DP ranks.
    Collective over the model-parallel group with ``--log-params-norm``: every rank calls it."""
    a = t.args
    c = a.checkpoint
    norm = params_norm(t.model) if c.log_params_norm else None  # collective: every rank
    if not t.is_logger:
        return
    per_it = elapsed / len(window)
    tokens = t.global_batch_size * a.model.seq_length / per_it
    # the main learning rate (not --decoupled-lr's embedding/output groups), as Megatron-LM logs it
    lr = get_canonical_lr_for_logging(t.optimizer.param_groups)
    lr = t.optimizer.param_groups[0]["lr"] if lr is None else lr
    sent = {k: sum(w["bytes_sent"].get(k, 0) for w in window) for k in window[-1]["bytes_sent"]}
    outer = int(sent.pop("outer_bytes_sent", 0))
    throughput = t.flops_per_iteration / (per_it * 1e12 * dist.get_world_size())
    logger.info(
        f"iteration {it:8d}/{a.training.train_iters:8d} | consumed samples: {t.batches.consumed_samples:12d} | "
        f"elapsed time per iteration (ms): {1000 * per_it:.1f} | tokens/s: {tokens:.0f} | "
        f"learning rate: {lr:.3E} | lm loss: {loss:.6E} | grad norm: {window[-1]['grad_norm']:.3f} | "
        f"outer sync bytes sent: {outer} |"
        + "".join(f" {k[:-len('_bytes_sent')].replace('_', ' ')} sync bytes sent: {int(v)} |" for k, v in sent.items())
        + (f" skipped iterations: {sum(w['skipped'] for w in window)} |" if any(w["skipped"] for w in window) else "")
        + (f" params norm: {norm:.3f} |" if norm is not None else "")
        + (f" num zeros: {window[-1]['num_zeros']:.1f} |" if c.log_num_zeros_in_grad else "")
        + (f" throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |" if c.log_throughput else ""))
    timers = {k: 1000 * sum(w["timers"].get(k, 0.0) for w in window) / len(window)
              for k in ("forward-backward", "optimizer", "outer-sync")}
    logger.info("timers (ms per iteration, this rank): " + " | ".join(f"{k}: {v:.1f}" for k, v in timers.items()))
    if t.sinks is None:
        return
    scalars = [("lm loss", loss), ("learning-rate", lr), ("grad-norm", window[-1]["grad_norm"]),
               ("tokens-per-sec", tokens), ("outer-sync-bytes", outer)]
    if norm is not None:
        scalars.append(("params-norm", norm))
    if c.log_num_zeros_in_grad:
        scalars.append(("num-zeros", window[-1]["num_zeros"]))
    if c.log_throughput:
        scalars.append(("throughput", throughput))
    if c.log_timers_to_tensorboard:
        scalars += [(f"{k}-time", v) for k, v in timers.items()]
    if c.log_memory_to_tensorboard:
        scalars += list(memory_stats().items())
    if t.args.fault_tolerance.enabled:  # --fault-tolerance torchft: membership at the last quorum
        ft = t.sync.transport
        scalars += [("ft/live-replicas", len(ft.live)), ("ft/heals", ft.heals), ("ft/quorum-time", ft.last_quorum_s)]
    t.sinks.write(it, scalars)


def log_evaluation(t, it: int, result: Dict[str, float], seconds: float) -> None:
    """The validation line and its scalars (logger rank)."""
    c = t.args.checkpoint
    t.log(f"validation loss at iteration {it} ({result['model']} model) | lm loss value: "
          f"{result['loss']:.6E} | lm loss PPL: {result['ppl']:.6E} |")
    if t.sinks is not None:
        scalars = [("validation loss", result["loss"]), ("validation ppl", result["ppl"]),
                   ("lm loss validation", result["loss"])]  # the last: Megatron-LM's tag
        if c.log_validation_ppl_to_tensorboard:
            scalars.append(("lm loss validation ppl", result["ppl"]))
        if c.log_timers_to_tensorboard and c.timing_log_level >= 1:
            scalars.append(("evaluate-time", 1000 * seconds))
        t.sinks.write(it, scalars)


def log_merge(t, report) -> None:
    """The merge diagnostic of one outer sync (``--diloco-merge-diagnostic``; logger rank): the
    probe batch's loss on the replicas' local models (mean), on the plain merge θ(t) + Δ̄ and after
    the outer step, and the merge gain (local − outer step; negative: the synchronised model is
    worse than the average replica, e.g. slices with a single owner)."""
    m = report.merge
    t.log(f"merge diagnostic at iteration {report.applied_step} (fragment {report.fragment}) | local models: "
          f"{m.local:.6E} | plain merge: {m.plain_merge:.6E} | outer step: {m.outer_step:.6E} | "
          f"merge gain: {m.gain:+.6E} |")
    if t.sinks is not None:
        t.sinks.write(report.applied_step, [
            (f"merge/{tag}" + (f"-fragment{report.fragment}" if report.fragment else ""), v)
            for tag, v in (("local-loss", m.local), ("plain-merge-loss", m.plain_merge),
                           ("outer-step-loss", m.outer_step), ("gain", m.gain))])


def log_save(t, it: int, seconds: float) -> None:
    """The save timer line and scalar."""
    c = t.args.checkpoint
    if c.timing_log_level >= 1:
        t.log(f"timers: save-checkpoint: {1000 * seconds:.1f} ms")
    if t.sinks is not None and c.log_timers_to_tensorboard and c.timing_log_level >= 1:
        t.sinks.write(it, [("save-checkpoint-time", 1000 * seconds)])


def progress(t, it: int) -> None:
    """A progress bar on a terminal (logger rank)."""
    if t.is_logger and sys.stderr.isatty():
        total = t.args.training.train_iters
        done = int(30 * it / total)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {it}/{total}")
        sys.stderr.flush()
        if it == total:
            sys.stderr.write("\n")


class ScalarSinks:
    """Where the logger rank's scalars go: TensorBoard (``--tensorboard-dir``, a
    ``SummaryWriter``) and Weights & Biases (``--wandb-project``, a ``wandb`` run), each given
    the same (tag, value) pairs at the same step by :meth:`write`."""

    def __init__(self, tensorboard=None, wandb_run=None):
        assert tensorboard is not None or wandb_run is not None
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def write(self, step: int, scalars: Sequence[Tuple[str, float]]) -> None:
        """The scalars of one step, to every sink (W&B: one ``log`` call, ``step`` = iteration)."""
        if self.tensorboard is not None:
            for k, v in scalars:
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in scalars}, step=step)

    def flush(self) -> None:
        """Make what was written so far visible (TensorBoard's event file)."""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        """At the end of the run: close the event file, finish the W&B run (its files
        complete, offline or synced, as Megatron-LM's ``wandb_writer.finish()``)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def open_sinks(a, is_logger: bool, world_size: int) -> Optional[ScalarSinks]:
    """The logger rank's :class:`ScalarSinks` (``a``: the run's ``TrainArgs``; the last rank
    logs, as in Megatron-LM), None on the other ranks and without ``--tensorboard-dir`` and
    ``--wandb-project``."""
    c = a.checkpoint
    if not is_logger or not (c.tensorboard_dir or c.wandb_project):
        return None
    return ScalarSinks(open_tensorboard(c.tensorboard_dir) if c.tensorboard_dir else None,
                       open_wandb(c, run_config(a, world_size)) if c.wandb_project else None)


def open_tensorboard(directory: str):
    """A SummaryWriter writing to ``directory`` (``--tensorboard-dir``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency (tensorboard)
    except ImportError as e:
        raise ValueError("--tensorboard-dir needs the tensorboard package (pip install tensorboard).") from e
    return SummaryWriter(directory)


#: Megatron-LM's W&B flags (logging group): all but --wandb-project only mean something with it.
WANDB_FLAGS = ("wandb_project", "wandb_exp_name", "wandb_save_dir", "wandb_entity")


def check_wandb_flags(c) -> None:
    """Parse-time (every rank) checks of the ``--wandb-*`` flags (``c``: ``CheckpointArgs``):
    ``--wandb-project`` needs the ``wandb`` package (imported here, only when a W&B flag is
    given) and a place for its files (``--wandb-save-dir``, or ``--save`` as in Megatron-LM:
    ``<save>/wandb``); the other W&B flags need ``--wandb-project``."""
    given = [f for f in WANDB_FLAGS if getattr(c, f) is not None]
    flags = ", ".join("--" + f.replace("_", "-") for f in given)
    if not c.wandb_project:  # absent or empty (Megatron-LM's "off")
        if given[1:] or (given and given[0] != "wandb_project"):
            raise ValueError(f"{flags} given without --wandb-project NAME: Weights & Biases logging is on only "
                             "with a project (Megatron-LM ignores the other --wandb-* flags without one); give "
                             "--wandb-project or drop them.")
        return
    try:
        import wandb  # noqa: F401  (the optional extra: pip install -e .[wandb])
    except ImportError as e:
        raise ValueError(f"Weights & Biases logging ({flags}) needs the wandb package, which is not installed: "
                         f"pip install -e .[wandb] (megatron_ppu's optional extra) or pip install wandb; or drop "
                         f"the --wandb-* flags ({type(e).__name__}: {e}).") from e
    if c.wandb_exp_name == "":
        raise ValueError("--wandb-exp-name is empty: give the experiment name (Megatron-LM: 'Please specify the "
                         "wandb experiment name!'), or leave the flag out for a name W&B chooses.")
    if not c.wandb_save_dir and not c.save:
        raise ValueError("--wandb-project needs --wandb-save-dir DIR or --save DIR: the W&B run's files go to "
                         "--wandb-save-dir, by default <--save>/wandb as in Megatron-LM.")


def run_config(a, world_size: int) -> dict:
    """The W&B run's config: every flag's value under its Megatron-LM dest name (``lr``,
    ``hidden_size``, ``ppu_slices``, ...; Megatron-LM logs ``vars(args)``), the world size, and
    ``slurm_job_name`` (as Megatron-LM adds it)."""
    out = {}
    for k, v in a.all_flag_values().items():
        ok = v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v))
        out[k] = list(v) if isinstance(v, tuple) else v if ok else str(v)
    out["world_size"] = world_size
    out["slurm_job_name"] = os.getenv("SLURM_JOB_NAME", "N/A")
    return out


def open_wandb(c, config: dict):
    """``wandb.init`` as Megatron-LM's ``_set_wandb_writer`` (core_v0.16.1) calls it: project
    ``--wandb-project``, name ``--wandb-exp-name`` (None: W&B's own), entity ``--wandb-entity``
    if given, files in ``--wandb-save-dir`` (default ``<--save>/wandb``, created), ``config``
    the run's settings. ``WANDB_MODE=offline`` (W&B's own variable) writes the run without a
    network; ``wandb sync`` uploads it later. Returns the run."""
    import wandb  # checked at parse time (check_wandb_flags)

    save_dir = c.wandb_save_dir or os.path.join(c.save, "wandb")
    os.makedirs(save_dir, exist_ok=True)
    kwargs = {"dir": save_dir, "name": c.wandb_exp_name, "project": c.wandb_project, "config": config}
    if c.wandb_entity:
        kwargs["entity"] = c.wandb_entity
    run = wandb.init(**kwargs)
    logger.info(f"Weights & Biases run {run.name} (project {run.project}) in {os.path.dirname(run.dir)}")
    return run
