"""The training loop behind ``pretrain_gpt_ppu.py``.

One :class:`Trainer` per rank receives a run's built parts (:func:`megatron_ppu.training.build.build_run`:
layout, model, ownership plan, DDP, optimizer, scheduler, synchroniser, data) and only trains,
evaluates, logs and checkpoints. An iteration is Megatron's forward-backward schedule
(pipelined for PP > 1) and the inner optimizer step, with the synchroniser's hooks around the
step (:mod:`megatron_ppu.sync`): the loop never asks which method (DDP, DiLoCo, SDP) runs.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..comm import enable_lazy_gloo, group_timeout, process_group_backend, shutdown_process_groups
from ..optimizer import InnerOptimizerView
from ..patches import apply_cpu_patches
from . import data as D
from . import metrics
from .arguments import EMBEDDED_DEFAULT, TrainArgs, parse_args
from .build import Run, build_run
from .checkpointing import Checkpointer, Restored, RunShape, TrainingState

logger = logging.getLogger("megatron_ppu.train")


def init_distributed(timeout_minutes: float = 10, backend: str = "nccl") -> None:
    """Initialise torch.distributed from torchrun's environment (a single process works
    without torchrun) and, on a machine without CUDA, Megatron's CPU/gloo patches.

    The default group gets ``process_group_backend(device)``: ``"cpu:gloo,cuda:nccl"`` on
    CUDA, so every group (all inherit it) serves host and device tensors; ``"gloo"`` on
    CPU. Gloo connections open lazily (see :mod:`megatron_ppu.comm`). ``timeout_minutes``
    is ``--distributed-timeout-minutes``; ``backend`` is ``--distributed-backend`` (``gloo``: every
    tensor over gloo, and rank r on GPU ``LOCAL_RANK % device_count``, so that several ranks can
    share one GPU, which NCCL refuses).
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    enable_lazy_gloo()
    if not dist.is_initialized():
        timeout = group_timeout(timeout_minutes)
        if torch.cuda.is_available():
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local % torch.cuda.device_count() if backend == "gloo" else local)
            dist.init_process_group(process_group_backend("cuda", backend), timeout=timeout)
        else:
            dist.init_process_group(process_group_backend("cpu"), timeout=timeout)
    if not torch.cuda.is_available():
        apply_cpu_patches()


class Trainer:
    """Everything one rank needs to train, from the built parts of a run; see :func:`main`.
    ``Trainer.from_args(args)`` builds the parts first."""

    def __init__(self, run: Run):
        self.run = run
        self.args = a = run.args
        self.dp, self.layout, self.plan, self.config = run.dp, run.layout, run.plan, run.config
        self.model, self.ddp, self.optimizer, self.scheduler = run.model, run.ddp, run.optimizer, run.scheduler
        self.sync = run.sync  # DDP, DiLoCo or SDP: the loop calls its hooks only (megatron_ppu.sync)
        self.batches, self.train_ds, self.valid_ds = run.data.batches, run.data.train_ds, run.data.valid_ds
        self.vocab_size, self.flops_per_iteration = run.data.vocab_size, run.flops_per_iteration
        self.global_batch_size, self.num_microbatches = run.batches.global_batch_size, run.batches.num_microbatches
        self.iteration = 0
        self.losses: List[float] = []  # per-iteration mean loss over DP ranks (logger rank)
        self.final_eval: Dict[str, float] = {}  # the last evaluation of train()
        self.is_logger = dist.get_rank() == dist.get_world_size() - 1  # last stage holds the loss
        # TensorBoard and W&B (logger rank): the same scalars at the same steps
        self.sinks = metrics.open_sinks(a, self.is_logger, dist.get_world_size())
        self.start_time = time.time()  # for --exit-duration-in-mins
        # --diloco-merge-diagnostic: one entry per outer sync, in order (every rank; the same numbers)
        self.merge_trace: List[Dict[str, float]] = []
        if a.diloco.merge_diagnostic:  # validated: only with the DiLoCo outer loop
            # the probe batch: the first validation batches (one iteration's micro-batches), the same everywhere
            self.probe_batches = list(D.fixed_batches(self.valid_ds, a.training.micro_batch_size,
                                                      self.num_microbatches, 0))
            self.sync.attach_merge_probe(self._probe_loss, self._on_merge_report)
        # --save / --load and the resume policy (probes the folders now when either is given: collective)
        self.checkpointer = Checkpointer(
            RunShape(a, self.dp, self.vocab_size, self.config.ffn_hidden_size, self.global_batch_size,
                     self.flops_per_iteration, self.run_info()), self.layout, self.log)

    @classmethod
    def from_args(cls, args: TrainArgs) -> "Trainer":
        """Build the run's parts from parsed settings, then the trainer (collective)."""
        return cls(build_run(args))

    # -- run description -----------------------------------------------------------
    def run_info(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        a, ppu = self.args, self.run.ppu
        return {
            "world_size": dist.get_world_size(),
            "layout": {"tp": a.parallel.tensor_model_parallel_size, "pp": a.parallel.pipeline_model_parallel_size,
                       "dp": self.dp, "replicas": self.layout.num_replicas},
            "plan": {"num_slices": ppu.num_slices, "slice_attention_heads": ppu.slice_attention_heads,
                     "slice_attention_output": ppu.slice_attention_output,
                     "frozen_input_jacobian": ppu.frozen_input_jacobian,
                     "subnet": a.flag_values(a.subnet)},
            "model": {k: v for k, v in vars(a.model).items()},
            **self.sync.run_info(),  # diloco_fragments: F under DiLoCo, else 0
        }

    # -- checkpoints (megatron_ppu.training.checkpointing) -----------------------------------
    def checkpoint_state(self) -> TrainingState:
        """What a checkpoint saves and restores: the run's objects and its position."""
        return TrainingState(self.model, self.optimizer, self.scheduler, self.sync, self.plan,
                             iteration=self.iteration, consumed_samples=self.batches.consumed_samples,
                             transport=getattr(self.sync, "transport", None))

    def save(self) -> str:
        """Collective: a checkpoint of this iteration into ``--save``; returns its path."""
        return self.checkpointer.save(self.checkpoint_state())

    def load(self) -> None:
        """Collective: resume (or ``--finetune``, or a Megatron-LM checkpoint) from ``--load``;
        the weights, optimizer and synchroniser are loaded in place, the position is applied here."""
        restored = self.checkpointer.load(self.checkpoint_state())
        if restored is not None:
            self.apply_restored(restored)

    def apply_restored(self, restored: Restored) -> None:
        """Continue from the position a checkpoint load returned (its None fields: unchanged)."""
        if restored.iteration is not None:
            self.iteration = restored.iteration
        if restored.consumed_samples is not None:
            self.batches.consumed_samples = restored.consumed_samples

    def describe(self) -> str:
        a, subnet, lay = self.args, self.run.subnet, self.layout
        replicas = f"{lay.num_replicas} replicas x inner-DP {lay.inner_dp}, " if a.uses_replicas else ""
        blocks = f", blocks {self.run.blocks.held}" if self.run.blocks is not None else ""
        return (f"world {dist.get_world_size()} = TP {a.parallel.tensor_model_parallel_size} x PP "
                f"{a.parallel.pipeline_model_parallel_size} x DP {self.dp}; {replicas}{self.sync.describe()}; "
                + (f"subnet plan {subnet.plan} ({subnet.masking} masking{blocks}); " if subnet.plan != "ppu" else "")
                + self.plan.summary() + f"; data: {self.run.data.resolved['description']}; "
                f"global batch {self.global_batch_size} x {a.model.seq_length} tokens, "
                f"{self.num_microbatches} micro-batches of {a.training.micro_batch_size} per rank")

    # -- one step -------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        mask = b["loss_mask"].float()

        def loss_func(output_tensor):
            if self.config.calculate_per_token_loss:
                # --calculate-per-token-loss (Megatron-LM's pretrain_gpt loss_func): the summed token
                # losses and the token count; megatron-core divides the gradients by the tokens of the
                # whole step (every micro-batch, every inner-DP rank) in finalize_model_grads.
                total, n = (output_tensor.float() * mask).sum(), mask.sum()
                return total, n.to(torch.int), {"lm loss": torch.stack([total.detach(), n.detach()])}
            loss = (output_tensor.float() * mask).sum() / mask.sum().clamp(min=1)
            # clone: megatron divides the returned loss in place by the number of micro-batches
            return loss, {"lm loss": loss.detach().clone()}

        return out, loss_func

    def _run_schedule(self, batches, forward_only: bool) -> Optional[float]:
        if torch.cuda.is_available():
            batches = [{k: v.cuda(non_blocking=True) for k, v in b.items()} for b in batches]
        out = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp],
            num_microbatches=len(batches), seq_length=self.args.model.seq_length,
            micro_batch_size=self.args.training.micro_batch_size, forward_only=forward_only)
        if out:
            losses = torch.stack([o["lm loss"] for o in out])
            if self.config.calculate_per_token_loss:  # (sum, tokens) pairs: this rank's per-token mean
                return float(losses[:, 0].sum() / losses[:, 1].sum().clamp(min=1))
            return float(losses.mean())
        return None

    def _dp_mean(self, value: Optional[float]) -> float:
        """Mean over data-parallel ranks of a last-stage value (all ranks call it): a host tensor
        over the world group (every group serves CPU tensors, also on CUDA: ``megatron_ppu.comm``)."""
        t = torch.tensor([value if value is not None else 0.0, 1.0 if value is not None else 0.0],
                         dtype=torch.float64)
        dist.all_reduce(t)  # world: only last-stage ranks contribute
        return float(t[0] / t[1])

    def _bytes_sent(self) -> Dict[str, float]:
        return {k: v for k, v in self.sync.stats().items() if k.endswith("_bytes_sent")}

    def train_step(self) -> Dict[str, float]:
        """One iteration: forward-backward, the synchroniser's hooks around the optimizer step."""
        clock, before = metrics.Clock(), self._bytes_sent()
        syncs = self.sync.stats().get("syncs", 0)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_schedule(self.batches.next_step(self.num_microbatches), forward_only=False)
        clock.lap("forward-backward")
        self.sync.after_backward()  # SDP: gradients averaged over each parameter's holders
        ok, grad_norm, num_zeros = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        clock.lap("optimizer")
        self.sync.after_optimizer_step()  # DiLoCo: the fragments that are due; SDP: refresh non-holders
        clock.lap("outer-sync")
        self.iteration += 1
        sent = {k: v - before.get(k, 0) for k, v in self._bytes_sent().items()}
        return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": not ok, "sync_bytes": int(sent.get("outer_bytes_sent", 0)), "bytes_sent": sent,
                "syncs": self.sync.stats().get("syncs", 0) - syncs, "num_zeros": num_zeros, "timers": clock.times}

    def evaluate(self) -> Dict[str, float]:
        """Held-out loss/perplexity: every replica evaluates the same validation batches
        (split over its inner-DP ranks) on the synchroniser's evaluation weights (DiLoCo: the
        global model); the result is the mean over replicas. Each rank runs Megatron-LM's
        ``--eval-iters`` iterations of forward passes, ``num_microbatches`` micro-batches each."""
        t, c = self.args.training, self.args.checkpoint
        per_rank = max(1, c.eval_iters * self.num_microbatches)
        offset = self.layout.inner_dp_rank * per_rank * t.micro_batch_size
        batches = list(D.fixed_batches(self.valid_ds, t.micro_batch_size, per_rank, offset))
        was_training = self.ddp.training
        self.ddp.eval()
        with torch.no_grad(), self.sync.evaluation_weights():
            loss = self._run_schedule(batches, forward_only=True)
        if was_training:
            self.ddp.train()
        mean = self._dp_mean(loss)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "model": self.sync.evaluated_model}

    def _on_merge_report(self, report) -> None:
        """A sync's merge diagnostic: into :attr:`merge_trace`, the log and the scalar sinks."""
        m = report.merge
        self.merge_trace.append({"iteration": report.applied_step, "fragment": report.fragment, "local": m.local,
                                 "plain_merge": m.plain_merge, "outer_step": m.outer_step, "gain": m.gain})
        metrics.log_merge(self, report)

    def _probe_loss(self) -> float:
        """The merge diagnostic's probe: the loss of the model's current weights on the probe
        batches, this replica's (mean over its last-stage ranks, on every rank of the replica;
        collective inside the replica). The mean over replicas is the transport's."""
        was_training = self.ddp.training
        self.ddp.eval()
        with torch.no_grad():
            loss = self._run_schedule(self.probe_batches, forward_only=True)
        if was_training:
            self.ddp.train()
        t = torch.tensor([loss if loss is not None else 0.0, 1.0 if loss is not None else 0.0], dtype=torch.float64)
        dist.all_reduce(t, group=self.layout.replica_world_group)
        return float(t[0] / t[1])

    # -- logging -------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_logger:
            logger.info(msg)

    def log_startup(self) -> None:
        """Once at start-up: the embedded default run's values, and every Megatron-LM flag given
        that has no effect here, with the reason."""
        a = self.args
        if a.embedded_default:
            used = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in EMBEDDED_DEFAULT.items()
                            if k not in a.explicit_flags)
            self.log(f"embedded default run (no data or model flags): {used}; any data or model flag gives "
                     "Megatron-LM's defaults instead")
        for flag, value, why in a.accepted:
            self.log(f"accepted: {flag}{'' if value is True else ' ' + str(value)}: {why}")

    def _out_of_time(self) -> bool:
        """``--exit-duration-in-mins``: whether any rank has run longer than that since the trainer
        was built (Megatron-LM's all-reduce MAX of the check, so that every rank stops at the
        same iteration). Collective over the world when the flag is given."""
        limit = self.args.checkpoint.exit_duration_in_mins
        if limit is None:
            return False
        over = torch.tensor([1 if (time.time() - self.start_time) / 60.0 > limit else 0], dtype=torch.int64,
                            device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(over, op=dist.ReduceOp.MAX)
        return bool(over.item())

    # -- main loop -------------------------------------------------------------------------
    def train(self, on_iteration: Optional[Callable[["Trainer", Dict[str, object]], None]] = None,
              on_evaluation: Optional[Callable[["Trainer", Dict[str, float]], None]] = None) -> Dict[str, float]:
        """Train to ``--train-iters`` (or an exit), evaluating, logging and saving on the way;
        returns the last evaluation (also ``self.final_eval``).

        Callbacks (for the benchmarks; every rank calls them, the loop ignores what they return):
        ``on_iteration(trainer, stats)`` after every iteration, with :meth:`train_step`'s stats (after
        the last iteration they include the final sync of :meth:`Synchroniser.finish`), before that
        iteration's log line, evaluation and checkpoint; ``on_evaluation(trainer, result)`` after every
        evaluation with :meth:`evaluate`'s result (``trainer.iteration``: the iteration it follows).
        Without them the loop is unchanged."""
        a, c = self.args, self.args.checkpoint
        self.log_startup()
        self.log(self.describe())
        window: List[Dict[str, float]] = []
        start, self.final_eval = time.perf_counter(), {}
        if a.fault_tolerance.enabled:  # join the run (heal from a live peer when it is under way)
            from . import fault_tolerance

            fault_tolerance.join(self)
        while self.iteration < a.training.train_iters:
            stats = self.train_step()
            if a.fault_tolerance.enabled:  # healed after falling behind: continue from the peers' iteration
                fault_tolerance.realign(self)
            it = self.iteration
            last = it == a.training.train_iters
            exiting = (c.exit_interval is not None and it % c.exit_interval == 0) or self._out_of_time()
            if last or (exiting and not c.save):
                # End of training (an exit without --save cannot be resumed): DiLoCo synchronises every
                # fragment's pending partial round, so the evaluated and saved model is the one global
                # model (see megatron_ppu.sync.diloco). Exits with --save keep the local state.
                before, syncs = self._bytes_sent(), self.sync.stats().get("syncs", 0)
                self.sync.finish()
                for k, v in self._bytes_sent().items():
                    stats["bytes_sent"][k] = stats["bytes_sent"].get(k, 0) + v - before.get(k, 0)
                stats["sync_bytes"] = int(stats["bytes_sent"].get("outer_bytes_sent", 0))
                stats["syncs"] += self.sync.stats().get("syncs", 0) - syncs
            window.append(stats)
            if stats["loss"] is not None:
                self.losses.append(stats["loss"])
            if on_iteration is not None:
                on_iteration(self, stats)
            metrics.progress(self, it)
            if it % c.log_interval == 0 or last:
                losses = [w["loss"] for w in window]
                local = sum(x for x in losses if x is not None) / len(losses) if losses[0] is not None else None
                metrics.log_iterations(self, it, window, time.perf_counter() - start, self._dp_mean(local))
                window, start = [], time.perf_counter()
            if c.eval_iters > 0 and ((c.eval_interval and it % c.eval_interval == 0) or last):
                clock = metrics.Clock()
                self.final_eval = self.evaluate()
                clock.lap("evaluate")
                metrics.log_evaluation(self, it, self.final_eval, clock.times["evaluate"])
                if on_evaluation is not None:
                    on_evaluation(self, self.final_eval)
            if c.save and ((c.save_interval and it % c.save_interval == 0) or last or exiting):
                clock = metrics.Clock()
                self.save()
                clock.lap("save-checkpoint")
                metrics.log_save(self, it, clock.times["save-checkpoint"])
            if exiting and not last:
                self.log(f"exiting at iteration {it} (" + (f"--exit-interval {c.exit_interval}" if c.exit_interval
                         and it % c.exit_interval == 0 else f"--exit-duration-in-mins {c.exit_duration_in_mins}") + ")")
                break
        if self.sinks is not None:
            self.sinks.flush()
        return self.final_eval

    def close(self) -> None:
        """After training: close the scalar sinks (TensorBoard file, W&B run: ``wandb.finish``) and the
        synchroniser's own threads and connections (``--fault-tolerance torchft``: the replica's torchft
        manager and group; alive at interpreter teardown, a gloo group could abort the finished process)."""
        if self.sinks is not None:
            self.sinks.close()
        self.sync.close()


def run(argv: Optional[List[str]] = None, before_train: Optional[Callable[[Trainer], None]] = None) -> Trainer:
    """Parse flags, build the run, (resume,) train and evaluate; return the trainer
    (``trainer.losses``, ``trainer.final_eval``). ``before_train(trainer)``: called once on every rank
    after the build (and the resume), before training (e.g. to attach an observer of the outer syncs:
    ``tests/ft_trace_worker.py``)."""
    args = parse_args(argv)
    init_distributed(args.parallel.distributed_timeout_minutes, args.parallel.distributed_backend)
    trainer = Trainer.from_args(args)
    if args.checkpoint.load:
        trainer.load()
    if before_train is not None:
        before_train(trainer)
    trainer.train()
    trainer.close()
    return trainer


def main(argv: Optional[List[str]] = None,
         before_train: Optional[Callable[[Trainer], None]] = None) -> Dict[str, float]:
    """Entry point of ``pretrain_gpt_ppu.py`` (``before_train``: see :func:`run`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    final = run(argv, before_train).final_eval
    shutdown_process_groups()  # before interpreter teardown (see there); after an error the exit stops them
    return final
