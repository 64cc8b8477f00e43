"""The training loop behind ``pretrain_gpt_ppu.py``.

One :class:`Trainer` per rank: it initialises Megatron's parallel state, the
replica layout, the (PPU) GPT model, Megatron DDP and optimizer over the inner-DP
group, the DiLoCo outer loop, the data shards, and runs Megatron's
forward-backward schedule (pipelined for PP > 1) step by step.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import resource
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..comm import enable_lazy_gloo, group_timeout, process_group_backend
from .arguments import TrainArgs, parse_args

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
        from megatron_ppu.patches import apply_cpu_patches

        apply_cpu_patches()


class _Clock:
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


def megatron_transformer_fields(a: TrainArgs) -> dict:
    """The ``TransformerConfig`` fields Megatron-LM's flags set (``core_transformer_config_from_args``)
    beyond the basic architecture: activation, attention numerics, RoPE layout, QK norm."""
    import torch.nn.functional as F
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.enums import AttnBackend

    m = a.model
    out = {
        "attention_softmax_in_fp32": m.attention_softmax_in_fp32,
        "apply_query_key_layer_scaling": m.apply_query_key_layer_scaling,
        "qk_layernorm": m.qk_layernorm, "rotary_interleaved": m.rotary_interleaved,
        "deterministic_mode": m.deterministic_mode, "layernorm_epsilon": m.norm_epsilon,
        "calculate_per_token_loss": a.training.calculate_per_token_loss,
        # --attention-backend auto/unfused/local all mean megatron-core's local DotProductAttention, the
        # only one without Transformer Engine (flash/fused are refused at parsing); the config says so
        # (megatron-core then sets the NVTE_*_ATTN variables consistently for every run of a process).
        "attention_backend": AttnBackend.local,
    }
    out["activation_func"] = F.silu if m.swiglu else squared_relu if m.squared_relu else F.gelu
    return out


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
        from ..parallel import build_replica_layout, initialize_model_parallel
        from ..spec import get_gpt_decoder_ppu_spec
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
        initialize_model_parallel(tp, pp, timeout_minutes=par.distributed_timeout_minutes)
        self.dp = ps.get_data_parallel_world_size()
        self.diloco_on = a.uses_replicas
        replicas = (a.diloco_args.diloco_replicas or self.dp) if self.diloco_on else 1
        self.layout = build_replica_layout(replicas, timeout=group_timeout(par.distributed_timeout_minutes))
        self.ppu = a.ppu()
        self.subnet = a.subnet()
        from ..subnet import validate_subnet_config

        validate_subnet_config(self.subnet, num_slices=self.ppu.num_slices, num_replicas=replicas,
                               num_layers=m.num_layers)
        # Megatron-LM's default MLP width (validate_args): 4h, with SwiGLU int(8h/3 / 64) x 64
        ffn = m.ffn_hidden_size or (int((4 * m.hidden_size * 2 / 3) / 64) * 64 if m.swiglu else 4 * m.hidden_size)
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
        from .arguments import lr_schedule

        self.schedule = lr_schedule(t, gbs)  # Megatron-LM's schedule (samples) in iterations
        t.train_iters = self.schedule["train_iters"]  # --train-samples // global batch, as Megatron-LM does

        # -- data (needs the tokenizer for the vocabulary size) --------------------
        self.resolved = D.resolve_data(a)
        tok = self.resolved["tokenizer"]
        self.vocab_size = _pad_vocab(self.resolved["model_vocab_size"], m.make_vocab_size_divisible_by, tp)
        evals = t.train_iters // a.checkpoint.eval_interval + 2 if a.checkpoint.eval_interval else 2
        valid_samples = max(1, a.checkpoint.eval_iters) * gbs * evals
        self.train_ds, self.valid_ds = D.build_datasets(a, self.resolved, t.train_iters * gbs, valid_samples)
        self.batches = D.ShardedBatches(self.train_ds, t.micro_batch_size, ps.get_data_parallel_rank(), self.dp)

        # -- model -------------------------------------------------------------------
        dtype = torch.bfloat16 if a.precision.bf16 else torch.float16 if a.precision.fp16 else torch.float32
        self.config = TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=ffn,
            num_attention_heads=m.num_attention_heads, kv_channels=m.kv_channels,
            num_query_groups=m.num_query_groups if m.group_query_attention else None,
            gated_linear_unit=m.swiglu,
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
            **megatron_transformer_fields(a),
        )
        # Megatron-LM's seeding (training/initialize.py::_set_random_seed, core_v0.16.1): every
        # pipeline stage gets seed + 100 x its pipeline rank, for the default generators and for
        # the model-parallel RNG tracker (attention dropout, recompute), so stages do not draw the
        # same initial weights or dropout masks. Data-parallel ranks share it (replicas start equal).
        stage_seed = t.seed + 100 * ps.get_pipeline_model_parallel_rank()
        random.seed(stage_seed)
        np.random.seed(stage_seed)
        torch.manual_seed(stage_seed)
        model_parallel_cuda_manual_seed(stage_seed)
        # the decoder block spec, so that the final norm also takes --sequence-parallel
        spec = get_gpt_decoder_ppu_spec(self.config, self.ppu, self.layout.slice_index(self.ppu.num_slices),
                                        normalization=m.normalization, qk_layernorm=m.qk_layernorm)
        self.model = GPTModel(
            self.config, spec, vocab_size=self.vocab_size, max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            rotary_percent=m.rotary_percent, rotary_base=m.rotary_base,
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
            decoupled_lr=t.decoupled_lr, decoupled_min_lr=t.decoupled_min_lr,
            log_num_zeros_in_grad=a.checkpoint.log_num_zeros_in_grad,
        )
        self.optimizer = build_inner_optimizer([self.ddp], opt_cfg, self.layout)
        self.scheduler = build_param_scheduler(
            self.optimizer, lr=t.lr, min_lr=t.min_lr, warmup_steps=self.schedule["warmup_steps"],
            decay_steps=self.schedule["decay_steps"], decay_style=t.lr_decay_style, weight_decay=t.weight_decay,
            wsd_decay_steps=t.lr_wsd_decay_iters, wsd_decay_style=t.lr_wsd_decay_style,
            init_lr=t.lr_warmup_init, use_checkpoint=t.use_checkpoint_opt_param_scheduler,
            override=t.override_opt_param_scheduler)
        self.grad_sync = None
        self.diloco = None
        self.eval_global = a.diloco_args.diloco_eval_model == "global"
        if self.subnet.sync == "step":
            # SDP: every step, gradients averaged over each parameter's holders (sub-group
            # all-reduces), then the holders' new values copied to the non-holders (at once with
            # backward masking, before evaluation/saving with forward masking).
            from ..subnet import SubnetSync

            self.grad_sync = SubnetSync(self.model, self.plan, self.layout, holders_fn=holders_fn,
                                        lazy=self.subnet.masking == "forward", optimizer=self.optimizer)
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
        self.start_time = time.time()  # for --exit-duration-in-mins
        self.flops_per_iteration = dense_gpt_flops(
            batch_size=self.global_batch_size, seq_length=m.seq_length, num_layers=m.num_layers,
            hidden_size=m.hidden_size, ffn_hidden_size=ffn, num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups if m.group_query_attention else m.num_attention_heads,
            kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads, swiglu=m.swiglu,
            padded_vocab_size=self.vocab_size)
        self.storage_views = None
        if a.checkpoint.save or a.checkpoint.load:
            self._probe_storage()  # node-local --save/--load folders: found now, not at the first save

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
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dev = torch.cuda.current_device() if torch.cuda.is_available() else None
        if dev is not None:
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
        """Mean over data-parallel ranks of a last-stage value (all ranks call it).

        A host tensor over the world group: every group serves CPU tensors (gloo), also on
        CUDA (``megatron_ppu.comm``)."""
        from megatron.core import parallel_state as ps

        t = torch.tensor([value if value is not None else 0.0, 1.0 if value is not None else 0.0],
                         dtype=torch.float64)
        dist.all_reduce(t)  # world: only last-stage ranks contribute
        return float(t[0] / t[1])

    def train_step(self) -> Dict[str, float]:
        clock = _Clock()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_schedule(self.batches.next_step(self.num_microbatches), forward_only=False)
        clock.lap("forward-backward")
        grad_sync_bytes = 0.0
        if self.grad_sync is not None:
            grad_sync_bytes = self.grad_sync.sync_gradients()
        ok, grad_norm, num_zeros = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        clock.lap("optimizer")
        if self.grad_sync is not None and not self.grad_sync.lazy:
            grad_sync_bytes += self.grad_sync.refresh()
        reports = self.diloco.after_inner_step() if self.diloco is not None else []
        clock.lap("outer-sync")
        self.iteration += 1
        return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": not ok, "sync_bytes": int(grad_sync_bytes) + sum(r.ring_bytes_sent for r in reports),
                "syncs": len(reports), "num_zeros": num_zeros, "timers": clock.times}

    def evaluate(self) -> Dict[str, float]:
        """Held-out loss/perplexity: every replica evaluates the same validation batches
        (split over its inner-DP ranks); the result is the mean over replicas. Each rank runs
        Megatron-LM's ``--eval-iters`` iterations of forward passes, ``num_microbatches``
        micro-batches each (the same work per rank as Megatron-LM's evaluation)."""
        from . import data as D

        t, c = self.args.training, self.args.checkpoint
        if self.grad_sync is not None:
            self.grad_sync.refresh_if_stale()  # forward-masked SDP: bring non-held parts up to date
        per_rank = max(1, c.eval_iters * self.num_microbatches)
        offset = self.layout.inner_dp_rank * per_rank * t.micro_batch_size
        batches = list(D.fixed_batches(self.valid_ds, t.micro_batch_size, per_rank, offset))
        was_training = self.ddp.training
        self.ddp.eval()
        # DiLoCo: score the global model (each fragment's latest θ(t), identical on every replica),
        # not the local weights that are up to H steps past it mid-round (--diloco-eval-model).
        scored = self.diloco.global_weights() if self.diloco is not None and self.eval_global else \
            contextlib.nullcontext()
        with torch.no_grad(), scored:
            loss = self._run_schedule(batches, forward_only=True)
        if was_training:
            self.ddp.train()
        mean = self._dp_mean(loss)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0)),
                "model": "global" if self.diloco is not None and self.eval_global else "local"}

    # -- checkpoints -------------------------------------------------------------------
    def _rank_state(self) -> dict:
        """What a checkpoint holds for this rank: ``{"rank": own state, "replica": state
        identical on the inner-DP ranks of this replica}`` (the latter is written split over
        them, see :func:`checkpointing.shard_state`)."""
        from .checkpointing import rng_state

        replica = {"diloco": self.diloco.state_dict() if self.diloco is not None else None,
                   "local_model": {k: v for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)}}
        own = {"iteration": self.iteration, "consumed_samples": self.batches.consumed_samples,
               "scheduler": self.scheduler.state_dict(), "plan": self.plan.to_dict(), "rng": rng_state()}
        if self.args.parallel.use_distributed_optimizer:
            # Megatron's distributed optimizer: each inner-DP rank holds its own shard of the fp32
            # masters and moments ("dp_reshardable" form: this rank's bucket ranges, as they are).
            from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

            own["optimizer"] = self.optimizer.state_dict()
            own["optimizer_shards"] = [o.get_parameter_state_dp_reshardable() if isinstance(o, DistributedOptimizer)
                                       else None for o in getattr(self.optimizer, "chained_optimizers",
                                                                  [self.optimizer])]
        else:
            replica["optimizer"] = self.optimizer.state_dict()
        return {"rank": own, "replica": replica}

    def _load_optimizer(self, own: dict, replica: dict) -> None:
        if "optimizer_shards" not in own:
            self.optimizer.load_state_dict(replica["optimizer"])
            return
        self.optimizer.load_state_dict(own["optimizer"])  # allocates the shards' state (dummy values)
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for o, shard in zip(opts, own["optimizer_shards"]):
            if shard is None:
                continue
            # megatron-core 0.16.1 (DistributedOptimizer.load_state_dict, no apex/TE) gives every
            # parameter's torch-Adam state one shared "step" tensor, which torch then increments once
            # per parameter per step (wrong bias correction after a resume): give each its own.
            for st in o.optimizer.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()
            for gbuf_idx, by_dtype in shard.items():
                if isinstance(gbuf_idx, int):
                    for buckets in by_dtype.values():
                        for bucket in buckets:
                            for elem in bucket:
                                elem.setdefault("padding", False)  # the key megatron-core's loader filters on
            with torch.no_grad():  # megatron-core copies into its fp32 shard masters (views of leaves)
                o.load_parameter_state_from_dp_reshardable(shard)

    def _probe_storage(self) -> None:
        """Start-up (collective): which ranks see the same --save / --load folder
        (node-local disks); --save is created on every rank."""
        from . import checkpointing as C

        c = self.args.checkpoint
        self.storage_views = {}
        if c.save:
            v = C.probe_views(c.save, create=True)
            if v.unwritable:
                raise C.CheckpointError(f"--save {c.save}: " + "; ".join(
                    f"rank {r}: {e}" for r, e in sorted(v.unwritable.items())) + ". Give --save a folder every "
                    "rank can create and write (a shared file system, or a node-local path present on every node).")
            self.storage_views["--save"] = v
        if c.load and (not c.save or os.path.abspath(c.load) != os.path.abspath(c.save)):
            self.storage_views["--load"] = C.probe_views(c.load, create=False)
        elif c.load:
            self.storage_views["--load"] = self.storage_views["--save"]
        for flag, v in self.storage_views.items():
            self.log(v.describe(flag) + ("" if v.shared else " (each view keeps its own ranks' checkpoint files)"))

    def save(self) -> str:
        from .checkpointing import save_checkpoint

        if self.grad_sync is not None:
            self.grad_sync.refresh_if_stale()
        if "--save" not in (getattr(self, "storage_views", None) or {}):
            self._probe_storage()
        st = self._rank_state()
        self.last_save = save_checkpoint(
            self.args.checkpoint.save, self.iteration, self.model,
            dict(self.run_info(), consumed_samples=self.batches.consumed_samples), st["rank"],
            views=self.storage_views["--save"], replica_state=st["replica"], replica_group=self.layout.inner_dp_group)
        s = self.last_save
        self.log(f"saved checkpoint {s['path']} | bytes written: this rank {s['rank_bytes']}, all ranks "
                 f"{s['total_bytes']} (replica state split over {self.layout.inner_dp} inner-DP rank(s))")
        return s["path"]

    def load(self) -> None:
        from . import checkpointing as C

        c = self.args.checkpoint
        if getattr(self, "storage_views", None) is None:
            self._probe_storage()
        path = C.resolve_checkpoint(c.load, save_dir=c.save, finetune=c.finetune)
        if path is None:
            self.log(f"--save {c.save} --load {c.load}: no checkpoint there yet (first launch), starting from scratch")
            return
        if c.finetune:
            C.agreed(lambda: C.check_model_part(path), f"--finetune from {path}", C.SHARED_FS_FIX)
            C.load_model_weights(path, self.model)
            self._after_weights_changed()
            self.log(f"loaded model weights from {path} (--finetune: new run from them)")
            return

        def read():
            info = C.read_run_info(path)
            C.check_compatible(info, self.run_info())
            st = C.load_rank_state(path)
            if st.get("save_nonce") != info.get("save_nonce"):
                raise C.CheckpointError(f"{path}: this rank's file and ppu/run.json come from different saves.")
            if st["rank"]["plan"] != self.plan.to_dict():
                raise C.CheckpointError(f"{path}: this rank's ownership plan differs from the checkpoint's; resume "
                                        "with the same --ppu-slices/--diloco-replicas/layout or use --finetune.")
            return st

        st = C.agreed(read, f"resuming from {path}", C.SHARED_FS_FIX)
        C.same_everywhere(st["save_nonce"], f"{path}: the ranks' files come from different saves (node-local "
                                            f"folders of different runs?); {C.SHARED_FS_FIX}")
        own = st["rank"]
        replica = C.unshard_state(st["replica_shard"], self.layout.inner_dp_group)
        missing = self.model.load_state_dict(replica["local_model"], strict=False)
        assert not missing.unexpected_keys, missing
        # The optimizer's state dict carries each parameter group's schedule bounds (max_lr/min_lr),
        # which megatron-core's scheduler reads before its own; --override-opt_param-scheduler means
        # this run's schedule, so this run's bounds are put back after loading.
        bounds = [{k: g[k] for k in ("max_lr", "min_lr") if k in g} for g in self.optimizer.param_groups]
        self._load_optimizer(own, replica)
        if self.args.training.override_opt_param_scheduler:
            for g, b in zip(self.optimizer.param_groups, bounds):
                g.update(b)
        try:
            self.scheduler.load_state_dict(own["scheduler"])
        except AssertionError as e:  # megatron-core's "... do not match" check of a schedule value
            raise C.CheckpointError(
                f"{path}: the learning-rate schedule of this run differs from the checkpoint's ({e}); resume "
                "with the same --lr/--min-lr/--lr-warmup-*/--lr-decay-*/--weight-decay flags, or pass "
                "--override-opt_param-scheduler (this run's values) or --use-checkpoint-opt_param-scheduler "
                "(the checkpoint's values), as in Megatron-LM.") from e
        if self.diloco is not None:
            self.diloco.load_state_dict(replica["diloco"])
        self.iteration = own["iteration"]
        self.batches.consumed_samples = own["consumed_samples"]
        C.set_rng_state(own["rng"])
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

    def log_startup(self) -> None:
        """Once at start-up: the embedded default run's values, and every Megatron-LM flag given
        that has no effect here, with the reason."""
        from .arguments import EMBEDDED_DEFAULT

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

    def params_norm(self) -> float:
        """L2 norm of this replica's model parameters (Megatron-LM's ``--log-params-norm``): every
        parameter once (tensor-parallel duplicates and the tied output weight skipped), summed
        over the model-parallel group. Collective over that group: every rank calls it."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        sq = torch.zeros(1, dtype=torch.float64, device=next(self.model.parameters()).device)
        for p in self.model.parameters():
            if getattr(p, "shared", False):
                continue  # the last stage's copy of the tied embedding (Megatron's param_is_not_shared)
            if param_is_not_tensor_parallel_duplicate(p):
                sq += p.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
        return float(sq.sqrt())

    def _log_line(self, it: int, window: List[Dict[str, float]], elapsed: float) -> None:
        losses = [w["loss"] for w in window]
        local = sum(l for l in losses if l is not None) / len(losses) if losses and losses[0] is not None else None
        loss = self._dp_mean(local)
        c = self.args.checkpoint
        params_norm = self.params_norm() if c.log_params_norm else None  # collective: every rank
        if not self.is_logger:
            return
        a = self.args
        per_it = elapsed / len(window)
        tokens = self.global_batch_size * a.model.seq_length / per_it
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

        # the main learning rate (not --decoupled-lr's embedding/output groups), as Megatron-LM logs it
        lr = get_canonical_lr_for_logging(self.optimizer.param_groups)
        lr = self.optimizer.param_groups[0]["lr"] if lr is None else lr
        sync = sum(w["sync_bytes"] for w in window)
        throughput = self.flops_per_iteration / (per_it * 1e12 * dist.get_world_size())
        logger.info(
            f"iteration {it:8d}/{a.training.train_iters:8d} | consumed samples: {self.batches.consumed_samples:12d} | "
            f"elapsed time per iteration (ms): {1000 * per_it:.1f} | tokens/s: {tokens:.0f} | "
            f"learning rate: {lr:.3E} | lm loss: {loss:.6E} | grad norm: {window[-1]['grad_norm']:.3f} | "
            f"outer sync bytes sent: {sync} |"
            + (f" skipped iterations: {sum(w['skipped'] for w in window)} |" if any(w["skipped"] for w in window) else "")
            + (f" params norm: {params_norm:.3f} |" if params_norm is not None else "")
            + (f" num zeros: {window[-1]['num_zeros']:.1f} |" if c.log_num_zeros_in_grad else "")
            + (f" throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |" if c.log_throughput else ""))
        timers = {k: 1000 * sum(w["timers"].get(k, 0.0) for w in window) / len(window)
                  for k in ("forward-backward", "optimizer", "outer-sync")}
        logger.info("timers (ms per iteration, this rank): " + " | ".join(f"{k}: {v:.1f}" for k, v in timers.items()))
        if self.tb is not None:
            scalars = [("lm loss", loss), ("learning-rate", lr), ("grad-norm", window[-1]["grad_norm"]),
                       ("tokens-per-sec", tokens), ("outer-sync-bytes", sync)]
            if params_norm is not None:
                scalars.append(("params-norm", params_norm))
            if c.log_num_zeros_in_grad:
                scalars.append(("num-zeros", window[-1]["num_zeros"]))
            if c.log_throughput:
                scalars.append(("throughput", throughput))
            if c.log_timers_to_tensorboard:
                scalars += [(f"{k}-time", v) for k, v in timers.items()]
            if c.log_memory_to_tensorboard:
                scalars += list(memory_stats().items())
            for k, v in scalars:
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
        self.log_startup()
        self.log(self.describe())
        window: List[Dict[str, float]] = []
        start = time.perf_counter()
        result = {}
        while self.iteration < a.training.train_iters:
            stats = self.train_step()
            it = self.iteration
            last = it == a.training.train_iters
            exiting = (c.exit_interval is not None and it % c.exit_interval == 0) or self._out_of_time()
            if self.diloco is not None and (last or (exiting and not c.save)):
                # End of training (an exit without --save cannot be resumed): synchronise every
                # fragment's pending partial round, so the evaluated and saved model is the one
                # global model (see megatron_ppu.diloco). Exits with --save keep the local state.
                final = self.diloco.finish()
                stats["sync_bytes"] += sum(r.ring_bytes_sent for r in final)
                stats["syncs"] += len(final)
            window.append(stats)
            if stats["loss"] is not None:
                self.losses.append(stats["loss"])
            self._progress(it)
            if it % c.log_interval == 0 or it == a.training.train_iters:
                self._log_line(it, window, time.perf_counter() - start)
                window, start = [], time.perf_counter()
            if c.eval_iters > 0 and ((c.eval_interval and it % c.eval_interval == 0) or last):
                clock = _Clock()
                result = self.evaluate()
                clock.lap("evaluate")
                self.log(f"validation loss at iteration {it} ({result['model']} model) | lm loss value: "
                         f"{result['loss']:.6E} | lm loss PPL: {result['ppl']:.6E} |")
                if self.tb is not None:
                    self.tb.add_scalar("validation loss", result["loss"], it)
                    self.tb.add_scalar("validation ppl", result["ppl"], it)
                    self.tb.add_scalar("lm loss validation", result["loss"], it)  # Megatron-LM's tags
                    if c.log_validation_ppl_to_tensorboard:
                        self.tb.add_scalar("lm loss validation ppl", result["ppl"], it)
                    if c.log_timers_to_tensorboard and c.timing_log_level >= 1:
                        self.tb.add_scalar("evaluate-time", 1000 * clock.times["evaluate"], it)
            if c.save and ((c.save_interval and it % c.save_interval == 0) or last or exiting):
                clock = _Clock()
                self.save()
                clock.lap("save-checkpoint")
                if c.timing_log_level >= 1:
                    self.log(f"timers: save-checkpoint: {1000 * clock.times['save-checkpoint']:.1f} ms")
                if self.tb is not None and c.log_timers_to_tensorboard and c.timing_log_level >= 1:
                    self.tb.add_scalar("save-checkpoint-time", 1000 * clock.times["save-checkpoint"], it)
            if exiting and not last:
                self.log(f"exiting at iteration {it} (" + (f"--exit-interval {c.exit_interval}" if c.exit_interval
                         and it % c.exit_interval == 0 else f"--exit-duration-in-mins {c.exit_duration_in_mins}") + ")")
                break
        if self.tb is not None:
            self.tb.flush()
        return result


def run(argv: Optional[List[str]] = None) -> Trainer:
    """Parse flags, set up, (resume,) train and evaluate; return the trainer
    (``trainer.losses``, ``trainer.final_eval``)."""
    args = parse_args(argv)
    init_distributed(args.parallel.distributed_timeout_minutes, args.parallel.distributed_backend)
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
