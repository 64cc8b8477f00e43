"""The training loop behind ``pretrain_gpt_ppu.py``.

One :class:`Trainer` per rank: it initialises Megatron's parallel state, the
replica layout, the (PPU) GPT model, Megatron DDP and optimizer over the inner-DP
group, the DiLoCo outer loop, the data shards, and runs Megatron's
forward-backward schedule (pipelined for PP > 1) step by step.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from datetime import timedelta
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .arguments import TrainArgs, parse_args

logger = logging.getLogger("megatron_ppu.train")


def init_distributed() -> None:
    """Initialise torch.distributed from torchrun's environment (a single process works
    without torchrun) and, on a machine without CUDA, Megatron's CPU/gloo patches."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl", timeout=timedelta(minutes=30))
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    if not torch.cuda.is_available():
        from megatron_ppu.patches import apply_cpu_patches

        apply_cpu_patches()


def _pad_vocab(size: int, multiple: int, tp: int) -> int:
    m = multiple * tp
    return ((size + m - 1) // m) * m


class Trainer:
    """Everything one rank needs to train; see :func:`main`."""

    def __init__(self, args: TrainArgs):
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.module import Float16Module

        from ..config import validate_ppu_config
        from ..diloco import DiLoCo
        from ..optimizer import build_inner_optimizer, build_param_scheduler, wrap_model_ddp
        from ..ownership import build_ownership_plan
        from ..parallel import build_replica_layout
        from ..spec import get_gpt_layer_ppu_spec
        from . import data as D

        self.args = a = args
        m, t, par = a.model, a.training, a.parallel
        world = dist.get_world_size()
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by TP {tp} x PP {pp}; launch "
                             f"a multiple of {tp * pp} processes (torchrun --nproc_per_node).")
        if m.num_layers % pp:
            raise ValueError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}.")
        if ps.model_parallel_is_initialized():  # a second run in the same process
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        self.dp = ps.get_data_parallel_world_size()
        self.diloco_on = a.uses_replicas
        replicas = (a.diloco_args.diloco_replicas or self.dp) if self.diloco_on else 1
        self.layout = build_replica_layout(replicas)
        self.ppu = a.ppu()
        self.subnet = a.subnet()
        from ..subnet import validate_subnet_config

        validate_subnet_config(self.subnet, num_slices=self.ppu.num_slices, num_replicas=replicas,
                               num_layers=m.num_layers)
        ffn = m.ffn_hidden_size or 4 * m.hidden_size
        validate_ppu_config(self.ppu, num_replicas=replicas, ffn_hidden_size=ffn,
                            num_attention_heads=m.num_attention_heads,
                            num_query_groups=m.num_query_groups if m.group_query_attention else None,
                            tensor_model_parallel_size=tp)
        gbs = t.global_batch_size or t.micro_batch_size * self.dp
        if gbs % (t.micro_batch_size * self.dp):
            raise ValueError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                             f"{t.micro_batch_size} x data-parallel size {self.dp}.")
        self.global_batch_size = gbs
        self.num_microbatches = gbs // (t.micro_batch_size * self.dp)

        # -- data (needs the tokenizer for the vocabulary size) --------------------
        self.resolved = D.resolve_data(a)
        tok = self.resolved["tokenizer"]
        self.vocab_size = _pad_vocab(tok.vocab_size, m.make_vocab_size_divisible_by, tp)
        valid_samples = a.checkpoint.eval_iters * t.micro_batch_size * (t.train_iters // a.checkpoint.eval_interval + 2)
        self.train_ds, self.valid_ds = D.build_datasets(a, self.resolved, t.train_iters * gbs, valid_samples)
        self.batches = D.ShardedBatches(self.train_ds, t.micro_batch_size, ps.get_data_parallel_rank(), self.dp)

        # -- model -------------------------------------------------------------------
        import torch.nn.functional as F

        dtype = torch.bfloat16 if a.precision.bf16 else torch.float16 if a.precision.fp16 else torch.float32
        self.config = TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=ffn,
            num_attention_heads=m.num_attention_heads, kv_channels=m.kv_channels,
            num_query_groups=m.num_query_groups if m.group_query_attention else None,
            gated_linear_unit=m.swiglu, activation_func=F.silu if m.swiglu else F.gelu,
            normalization=m.normalization, add_bias_linear=not m.disable_bias_linear,
            init_method_std=m.init_method_std, attention_dropout=m.attention_dropout,
            hidden_dropout=m.hidden_dropout, tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp, sequence_parallel=par.sequence_parallel,
            params_dtype=dtype, pipeline_dtype=dtype, bf16=a.precision.bf16, fp16=a.precision.fp16,
            use_cpu_initialization=not torch.cuda.is_available(),
            bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
            persist_layer_norm=False, gradient_accumulation_fusion=False,
            recompute_granularity=m.recompute_granularity, recompute_method=m.recompute_method,
            recompute_num_layers=m.recompute_num_layers,
        )
        torch.manual_seed(t.seed)
        model_parallel_cuda_manual_seed(t.seed)
        spec = get_gpt_layer_ppu_spec(self.ppu, self.layout.slice_index(self.ppu.num_slices),
                                      normalization=m.normalization)
        self.model = GPTModel(
            self.config, spec, vocab_size=self.vocab_size, max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
        )
        if torch.cuda.is_available():
            self.model.cuda()
        holders_fn = None  # parameter name -> the replicas holding it (blocks plan)
        if self.subnet.plan == "blocks":
            from ..subnet import apply_block_plan, block_assignment, block_holders_fn

            assignment = block_assignment(replicas, m.num_layers, self.subnet.coverage, self.subnet.seed)
            self.held_blocks = assignment[self.layout.replica_index]
            apply_block_plan(self.model, self.held_blocks, self.subnet.masking)
            offset = ps.get_pipeline_model_parallel_rank() * (m.num_layers // pp)
            holders_fn = block_holders_fn(assignment, m.num_layers, replicas, offset)
        self.plan = build_ownership_plan(self.model, replicas, self.ppu.num_slices, self.layout.replica_index,
                                         (lambda name: len(holders_fn(name))) if holders_fn else None)
        wrapped = Float16Module(self.config, self.model) if dtype != torch.float32 else self.model
        self.ddp = wrap_model_ddp(wrapped, self.layout, use_distributed_optimizer=par.use_distributed_optimizer)
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=a.precision.bf16,
            fp16=a.precision.fp16, params_dtype=dtype, use_distributed_optimizer=par.use_distributed_optimizer,
        )
        self.optimizer = build_inner_optimizer([self.ddp], opt_cfg, self.layout)
        self.scheduler = build_param_scheduler(
            self.optimizer, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.lr_warmup_iters,
            decay_steps=t.lr_decay_iters or t.train_iters, decay_style=t.lr_decay_style, weight_decay=t.weight_decay)
        self.grad_sync = None
        self.diloco = None
        if self.subnet.sync == "step":
            # SDP: every step, gradients averaged over each parameter's holders (sub-group
            # all-reduces), then the holders' new values copied to the non-holders (at once with
            # backward masking, before evaluation/saving with forward masking).
            from ..subnet import SubnetSync

            self.grad_sync = SubnetSync(self.model, self.plan, self.layout, holders_fn=holders_fn,
                                        lazy=self.subnet.masking == "forward")
            # Holders must apply identical updates: clip by the norm of the whole synchronised
            # gradient, not by each replica's own subnetwork's norm.
            from megatron.core.optimizer import ChainedOptimizer

            assert isinstance(self.optimizer, ChainedOptimizer), type(self.optimizer)
            self.optimizer.get_grad_norm = self.grad_sync.grad_norm
        elif self.diloco_on:
            self.diloco = DiLoCo(self.model, self.plan, self.layout.replica_group, a.diloco(replicas), self.optimizer,
                                 inner_group=self.layout.inner_dp_group)
        self.iteration = 0
        self.is_logger = dist.get_rank() == dist.get_world_size() - 1  # last stage holds the loss
        self.tb = None
        if a.checkpoint.tensorboard_dir and self.is_logger:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("--tensorboard-dir needs the tensorboard package (pip install tensorboard).") from e
            self.tb = SummaryWriter(a.checkpoint.tensorboard_dir)
        self.losses: List[float] = []  # per-iteration mean loss over DP ranks (logger rank)

    # -- run description -----------------------------------------------------------
    def run_info(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        a = self.args
        return {
            "world_size": dist.get_world_size(),
            "layout": {"tp": a.parallel.tensor_model_parallel_size, "pp": a.parallel.pipeline_model_parallel_size,
                       "dp": self.dp, "replicas": self.layout.num_replicas},
            "plan": {"num_slices": self.ppu.num_slices, "slice_attention_heads": self.ppu.slice_attention_heads,
                     "slice_attention_output": self.ppu.slice_attention_output,
                     "frozen_input_jacobian": self.ppu.frozen_input_jacobian,
                     "subnet": vars(a.subnet_args)},
            "model": {k: v for k, v in vars(a.model).items()},
            "diloco_fragments": a.diloco_args.diloco_streaming_fragments if self.diloco_on else 0,
        }

    def describe(self) -> str:
        a = self.args
        return (f"world {dist.get_world_size()} = TP {a.parallel.tensor_model_parallel_size} x PP "
                f"{a.parallel.pipeline_model_parallel_size} x DP {self.dp}; "
                + (f"{self.layout.num_replicas} replicas x inner-DP {self.layout.inner_dp}, "
                   + (f"SDP per-step sync; " if self.subnet.sync == "step" else
                      f"DiLoCo H={a.diloco_args.diloco_local_steps}, F={a.diloco_args.diloco_streaming_fragments}; ")
                   if self.diloco_on else "synchronous DDP (no outer loop); ")
                + (f"subnet plan {self.subnet.plan} ({self.subnet.masking} masking"
                   + (f", blocks {self.held_blocks}" if self.subnet.plan == "blocks" else "") + "); "
                   if self.subnet.plan != "ppu" else "")
                + self.plan.summary() + f"; data: {self.resolved['description']}; "
                f"global batch {self.global_batch_size} x {a.model.seq_length} tokens, "
                f"{self.num_microbatches} micro-batches of {a.training.micro_batch_size} per rank")

    # -- one step -------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        mask = b["loss_mask"].float()

        def loss_func(output_tensor):
            loss = (output_tensor.float() * mask).sum() / mask.sum().clamp(min=1)
            # clone: megatron divides the returned loss in place by the number of micro-batches
            return loss, {"lm loss": loss.detach().clone()}

        return out, loss_func

    def _run_schedule(self, batches, forward_only: bool) -> Optional[float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dev = torch.cuda.current_device() if torch.cuda.is_available() else None
        if dev is not None:
            batches = [{k: v.cuda(non_blocking=True) for k, v in b.items()} for b in batches]
        out = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.ddp],
            num_microbatches=len(batches), seq_length=self.args.model.seq_length,
            micro_batch_size=self.args.training.micro_batch_size, forward_only=forward_only)
        if out:
            return float(torch.stack([o["lm loss"] for o in out]).mean())
        return None

    def _dp_mean(self, value: Optional[float]) -> float:
        """Mean over data-parallel ranks of a last-stage value (all ranks call it)."""
        from megatron.core import parallel_state as ps

        t = torch.tensor([value if value is not None else 0.0, 1.0 if value is not None else 0.0],
                         dtype=torch.float64)
        dist.all_reduce(t)  # world: only last-stage ranks contribute
        return float(t[0] / t[1])

    def train_step(self) -> Dict[str, float]:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_schedule(self.batches.next_step(self.num_microbatches), forward_only=False)
        grad_sync_bytes = 0.0
        if self.grad_sync is not None:
            grad_sync_bytes = self.grad_sync.sync_gradients()
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        if self.grad_sync is not None and not self.grad_sync.lazy:
            grad_sync_bytes += self.grad_sync.refresh()
        reports = self.diloco.after_inner_step() if self.diloco is not None else []
        self.iteration += 1
        return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": not ok, "sync_bytes": int(grad_sync_bytes) + sum(r.ring_bytes_sent for r in reports),
                "syncs": len(reports)}

    def evaluate(self) -> Dict[str, float]:
        """Held-out loss/perplexity: every replica evaluates the same validation batches
        (split over its inner-DP ranks); the result is the mean over replicas."""
        from . import data as D

        t, c = self.args.training, self.args.checkpoint
        if self.grad_sync is not None:
            self.grad_sync.refresh_if_stale()  # forward-masked SDP: bring non-held parts up to date
        per_rank = max(1, c.eval_iters // self.layout.inner_dp)
        offset = self.layout.inner_dp_rank * per_rank * t.micro_batch_size
        batches = list(D.fixed_batches(self.valid_ds, t.micro_batch_size, per_rank, offset))
        was_training = self.ddp.training
        self.ddp.eval()
        with torch.no_grad():
            loss = self._run_schedule(batches, forward_only=True)
        if was_training:
            self.ddp.train()
        mean = self._dp_mean(loss)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}

    # -- checkpoints -------------------------------------------------------------------
    def _rank_state(self) -> dict:
        from .checkpointing import rng_state

        return {"iteration": self.iteration, "consumed_samples": self.batches.consumed_samples,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "diloco": self.diloco.state_dict() if self.diloco is not None else None,
                "local_model": {k: v for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)},
                "plan": self.plan.to_dict(), "rng": rng_state()}

    def save(self) -> str:
        from .checkpointing import save_checkpoint

        if self.grad_sync is not None:
            self.grad_sync.refresh_if_stale()
        path = save_checkpoint(self.args.checkpoint.save, self.iteration, self.model,
                               dict(self.run_info(), consumed_samples=self.batches.consumed_samples),
                               self._rank_state())
        self.log(f"saved checkpoint {path}")
        return path

    def load(self) -> None:
        from . import checkpointing as C

        path = C.find_checkpoint(self.args.checkpoint.load)
        if path is None:
            self.log(f"--load {self.args.checkpoint.load}: no checkpoint yet, starting from scratch")
            return
        info = C.read_run_info(path)
        if self.args.checkpoint.finetune:
            C.load_model_weights(path, self.model)
            self._after_weights_changed()
            self.log(f"loaded model weights from {path} (--finetune: new run from them)")
            return
        C.check_compatible(info, self.run_info())
        C.load_model_weights(path, self.model)
        st = C.load_rank_state(path)
        if st["plan"] != self.plan.to_dict():
            raise C.CheckpointError(f"{path}: this rank's ownership plan differs from the checkpoint's; "
                                    "resume with the same --ppu-slices/--diloco-replicas/layout or use --finetune.")
        missing = self.model.load_state_dict(st["local_model"], strict=False)
        assert not missing.unexpected_keys, missing
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.diloco is not None:
            self.diloco.load_state_dict(st["diloco"])
        self.iteration = st["iteration"]
        self.batches.consumed_samples = st["consumed_samples"]
        C.set_rng_state(st["rng"])
        self.log(f"resumed from {path} at iteration {self.iteration}")

    def _after_weights_changed(self) -> None:
        """Weights were replaced from outside: refresh fp32 masters and the DiLoCo snapshot."""
        self.optimizer.reload_model_params()
        if self.diloco is not None:
            from ..diloco import DiLoCo

            self.diloco = DiLoCo(self.model, self.plan, self.layout.replica_group, self.diloco.config, self.optimizer,
                                 inner_group=self.layout.inner_dp_group)

    # -- logging -------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_logger:
            logger.info(msg)

    def _log_line(self, it: int, window: List[Dict[str, float]], elapsed: float) -> None:
        losses = [w["loss"] for w in window]
        local = sum(l for l in losses if l is not None) / len(losses) if losses and losses[0] is not None else None
        loss = self._dp_mean(local)
        if not self.is_logger:
            return
        a = self.args
        per_it = elapsed / len(window)
        tokens = self.global_batch_size * a.model.seq_length / per_it
        lr = self.optimizer.param_groups[0]["lr"]
        sync = sum(w["sync_bytes"] for w in window)
        logger.info(
            f"iteration {it:8d}/{a.training.train_iters:8d} | consumed samples: {self.batches.consumed_samples:12d} | "
            f"elapsed time per iteration (ms): {1000 * per_it:.1f} | tokens/s: {tokens:.0f} | "
            f"learning rate: {lr:.3E} | lm loss: {loss:.6E} | grad norm: {window[-1]['grad_norm']:.3f} | "
            f"outer sync bytes sent: {sync} |"
            + (f" skipped iterations: {sum(w['skipped'] for w in window)} |" if any(w["skipped"] for w in window) else ""))
        if self.tb is not None:
            for k, v in (("lm loss", loss), ("learning-rate", lr), ("grad-norm", window[-1]["grad_norm"]),
                         ("tokens-per-sec", tokens), ("outer-sync-bytes", sync)):
                self.tb.add_scalar(k, v, it)

    def _progress(self, it: int) -> None:
        if self.is_logger and sys.stderr.isatty():
            total = self.args.training.train_iters
            done = int(30 * it / total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {it}/{total}")
            sys.stderr.flush()
            if it == total:
                sys.stderr.write("\n")

    # -- main loop -------------------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        a, c = self.args, self.args.checkpoint
        self.log(self.describe())
        window: List[Dict[str, float]] = []
        start = time.perf_counter()
        result = {}
        while self.iteration < a.training.train_iters:
            stats = self.train_step()
            it = self.iteration
            window.append(stats)
            if stats["loss"] is not None:
                self.losses.append(stats["loss"])
            self._progress(it)
            if it % c.log_interval == 0 or it == a.training.train_iters:
                self._log_line(it, window, time.perf_counter() - start)
                window, start = [], time.perf_counter()
            last = it == a.training.train_iters
            exiting = c.exit_interval is not None and it % c.exit_interval == 0
            if it % c.eval_interval == 0 or last:
                result = self.evaluate()
                self.log(f"validation loss at iteration {it} | lm loss value: {result['loss']:.6E} | "
                         f"lm loss PPL: {result['ppl']:.6E} |")
                if self.tb is not None:
                    self.tb.add_scalar("validation loss", result["loss"], it)
                    self.tb.add_scalar("validation ppl", result["ppl"], it)
            if c.save and ((c.save_interval and it % c.save_interval == 0) or last or exiting):
                self.save()
            if exiting and not last:
                self.log(f"exiting at iteration {it} (--exit-interval {c.exit_interval})")
                break
        if self.tb is not None:
            self.tb.flush()
        return result


def run(argv: Optional[List[str]] = None) -> Trainer:
    """Parse flags, set up, (resume,) train and evaluate; return the trainer
    (``trainer.losses``, ``trainer.final_eval``)."""
    args = parse_args(argv)
    init_distributed()
    trainer = Trainer(args)
    if args.checkpoint.load:
        trainer.load()
    trainer.final_eval = trainer.train()
    return trainer


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """Entry point of ``pretrain_gpt_ppu.py``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run(argv).final_eval
