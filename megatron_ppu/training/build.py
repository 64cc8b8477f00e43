"""Build a run from parsed settings: :func:`build_run` returns the parts a
:class:`~megatron_ppu.training.loop.Trainer` trains (layout, data, model, plan, DDP,
optimizer, scheduler, synchroniser).

The steps run in this order, each a ``_build_*`` function returning one thing (the shape of
Megatron's ``DistributedOptimizer.__init__``); the order is part of the result (the seeds are
set after the data and before the model, the synchroniser's collectives come last)::

    _build_parallel_state   Megatron's TP/PP/DP groups            -> data-parallel size
    _build_layout           replicas x inner-DP groups              -> ReplicaLayout
    check_layout            the replica-count rules (arguments.py)  (raises ValueError)
    _build_batches          global batch, micro-batches, lr schedule -> BatchSchedule
    _build_data             tokenizer, datasets, this rank's shard  -> Data
    _build_transformer_config                                       -> TransformerConfig
    _set_seeds              Megatron-LM's per-stage seeds
    _build_model            the (PPU) GPT model                     -> GPTModel
    _build_block_plan       SDP blocks plan (frozen/skipped blocks) -> BlockPlan or None
    _build_ownership_plan   who owns which element                  -> OwnershipPlan
    _build_ddp              Float16Module + Megatron DDP over inner-DP -> DistributedDataParallel
    _build_optimizer        Megatron optimizer over the trainable set -> ChainedOptimizer
    _build_scheduler        Megatron's OptimizerParamScheduler      -> scheduler
    _build_synchroniser     DDP / DiLoCo / SDP                      -> Synchroniser
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, FrozenSet, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.activations import squared_relu
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import Float16Module

from ..comm import group_timeout
from ..config import DiLoCoConfig, PPUConfig
from ..optimizer import build_inner_optimizer, build_param_scheduler, finalize_grads_func, wrap_model_ddp
from ..ownership import OwnershipPlan, build_ownership_plan
from ..parallel import ReplicaLayout, build_ft_replica_layout, build_replica_layout, initialize_model_parallel
from ..patches import compat
from ..spec import get_gpt_decoder_ppu_spec
from ..subnet import SubnetConfig, apply_block_plan, block_assignment, block_holders_fn
from ..sync import DDPSync, DiLoCoSync, SDPSync, StaticReplicas, Synchroniser
from ..sync.base import TimedCall
from ..sync.ddp import grad_buffer_bytes
from . import data as D
from .arguments import TrainArgs, check_layout
from .schedule import batch_schedule, lr_schedule
from .arguments import ffn_hidden_size as _ffn_of_model
from .metrics import dense_gpt_flops


@dataclass
class BatchSchedule:
    """Batch arithmetic and Megatron-LM's learning-rate schedule in iterations."""

    global_batch_size: int
    num_microbatches: int  # per rank and step
    lr: dict  # lr_schedule(): train_iters, warmup_steps, decay_steps


@dataclass
class Data:
    """The resolved data settings (tokenizer, description), the padded vocabulary and the datasets."""

    resolved: dict
    vocab_size: int
    train_ds: object
    valid_ds: object
    batches: D.ShardedBatches  # this rank's shard of the training batches


@dataclass
class BlockPlan:
    """SDP blocks plan on this rank: the blocks its replica holds, and every parameter's holders."""

    held: List[int]
    holders_fn: Callable[[str], FrozenSet[int]]


@dataclass
class Run:
    """The built parts of a run (see the module docstring for how each is made)."""

    args: TrainArgs
    dp: int
    layout: ReplicaLayout
    ppu: PPUConfig
    subnet: SubnetConfig
    batches: BatchSchedule
    data: Data
    config: TransformerConfig
    model: GPTModel
    blocks: Optional[BlockPlan]
    plan: OwnershipPlan
    ddp: torch.nn.Module
    optimizer: object
    scheduler: object
    sync: Synchroniser
    flops_per_iteration: float

    @property
    def tokenizer(self):
        """The run's tokenizer (Megatron's tokenizer object)."""
        return self.data.resolved["tokenizer"]

    @property
    def data_description(self) -> str:
        """One line saying which data the run trains on."""
        return self.data.resolved["description"]

    @property
    def held_blocks(self) -> List[int]:
        """SDP blocks plan: the blocks (global layer indices) this rank's replica holds; [] without it."""
        return list(self.blocks.held) if self.blocks is not None else []


def build_run(args: TrainArgs) -> Run:
    """Every part of a run, from parsed settings (collective: every rank calls it)."""
    a = args
    dp = _build_parallel_state(a)
    layout = _build_layout(a, dp)
    ppu, subnet = a.ppu, a.subnet
    ffn = ffn_hidden_size(a)
    # --fault-tolerance torchft: this job is one replica (slot K); the run's data parallelism spans all K slots
    run_dp = dp * layout.num_replicas if a.fault_tolerance.enabled else dp
    check_layout(a, layout.num_replicas, run_dp)  # the rest was validated at parse time
    sched = _build_batches(a, run_dp)
    data = _build_data(a, sched, layout)
    dtype = torch.bfloat16 if a.precision.bf16 else torch.float16 if a.precision.fp16 else torch.float32
    config = _build_transformer_config(a, ffn, dtype, layout)
    _set_seeds(a.training.seed)
    model = _build_model(a, config, ppu, layout, data.vocab_size)
    blocks = _build_block_plan(a, subnet, model, layout)
    plan = _build_ownership_plan(model, layout, ppu, blocks)
    ddp = _build_ddp(a, config, model, layout, dtype)
    optimizer = _build_optimizer(a, ddp, layout, dtype, plan)
    scheduler = _build_scheduler(a, optimizer, sched)
    sync = _build_synchroniser(a, subnet, model, plan, layout, optimizer, blocks, config, ddp)
    optimizer = sync.wrap_optimizer(optimizer)
    m = a.model
    flops = dense_gpt_flops(
        batch_size=sched.global_batch_size, seq_length=m.seq_length, num_layers=m.num_layers,
        hidden_size=m.hidden_size, ffn_hidden_size=ffn, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups if m.group_query_attention else m.num_attention_heads,
        kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads, swiglu=m.swiglu,
        padded_vocab_size=data.vocab_size)
    return Run(args=a, dp=dp, layout=layout, ppu=ppu, subnet=subnet, batches=sched, data=data, config=config,
               model=model, blocks=blocks, plan=plan, ddp=ddp, optimizer=optimizer, scheduler=scheduler, sync=sync,
               flops_per_iteration=flops)


def build_variant(run: Run, ppu: PPUConfig, slice_index: int) -> Run:
    """``run`` with another PPU plan: the model, ownership plan, DDP, optimizer and scheduler that the
    replica training slice ``slice_index`` of N = ``ppu.num_slices`` would build (same settings,
    config, layout, data and seed; the synchroniser is ``run``'s). For single-process comparisons of
    the per-rank compute of PPU plans (``benchmarks/bench_methods.py``); a multi-rank run builds
    each slice on its own replica with :func:`build_run`."""
    a = dataclasses.replace(run.args, ppu=ppu)
    dtype = torch.bfloat16 if a.precision.bf16 else torch.float16 if a.precision.fp16 else torch.float32
    _set_seeds(a.training.seed)
    model = _build_model(a, run.config, ppu, run.layout, run.data.vocab_size, slice_index=slice_index)
    plan = build_ownership_plan(model, ppu.num_slices, ppu.num_slices, slice_index)  # as in N replicas
    ddp = _build_ddp(a, run.config, model, run.layout, dtype)
    optimizer = _build_optimizer(a, ddp, run.layout, dtype, plan)
    scheduler = _build_scheduler(a, optimizer, run.batches)
    return dataclasses.replace(run, args=a, ppu=ppu, model=model, plan=plan, ddp=ddp, optimizer=optimizer,
                               scheduler=scheduler)


def ffn_hidden_size(a: TrainArgs) -> int:
    """Megatron-LM's default MLP width (validate_args): 4h, with SwiGLU int(8h/3 / 64) x 64."""
    return _ffn_of_model(a.model)


def _build_parallel_state(a: TrainArgs) -> int:
    m, par = a.model, a.parallel
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
    return ps.get_data_parallel_world_size()


def _build_layout(a: TrainArgs, dp: int) -> ReplicaLayout:
    # DP ranks form replicas for the DiLoCo outer loop and for per-step SDP; plain DDP is one replica
    replicas = (a.diloco.num_replicas or dp) if a.uses_replicas else 1
    if a.fault_tolerance.enabled:  # this torchrun world is replica slot --ft-replica-id of K
        return build_ft_replica_layout(replicas, a.fault_tolerance.replica_id,
                                       timeout=group_timeout(a.parallel.distributed_timeout_minutes))
    return build_replica_layout(replicas, timeout=group_timeout(a.parallel.distributed_timeout_minutes))


def _build_batches(a: TrainArgs, dp: int) -> BatchSchedule:
    t = a.training
    gbs, num_microbatches = batch_schedule(t, dp)
    schedule = lr_schedule(t, gbs)  # Megatron-LM's schedule (samples) in iterations
    t.train_iters = schedule["train_iters"]  # --train-samples // global batch, as Megatron-LM does
    return BatchSchedule(gbs, num_microbatches, schedule)


def _build_data(a: TrainArgs, sched: BatchSchedule, layout: ReplicaLayout) -> Data:
    t, c, m = a.training, a.checkpoint, a.model
    resolved = D.resolve_data(a)  # the tokenizer gives the vocabulary size
    mult = m.make_vocab_size_divisible_by * a.parallel.tensor_model_parallel_size
    vocab = ((resolved["model_vocab_size"] + mult - 1) // mult) * mult
    gbs = sched.global_batch_size
    evals = t.train_iters // c.eval_interval + 2 if c.eval_interval else 2
    valid_samples = max(1, c.eval_iters) * gbs * evals
    train_ds, valid_ds = D.build_datasets(a, resolved, t.train_iters * gbs, valid_samples)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if a.fault_tolerance.enabled:  # the shard of DP rank K x DP + d of the single world's K x DP ranks
        dp_rank, dp_size = layout.replica_index * dp_size + dp_rank, layout.num_replicas * dp_size
    batches = D.ShardedBatches(train_ds, t.micro_batch_size, dp_rank, dp_size)
    return Data(resolved, vocab, train_ds, valid_ds, batches)


def megatron_transformer_fields(a: TrainArgs) -> dict:
    """The ``TransformerConfig`` fields Megatron-LM's flags set (``core_transformer_config_from_args``)
    beyond the basic architecture: activation, attention numerics, RoPE layout, QK norm."""
    m = a.model
    out = {
        "attention_softmax_in_fp32": m.attention_softmax_in_fp32,
        "apply_query_key_layer_scaling": m.apply_query_key_layer_scaling,
        "qk_layernorm": m.qk_layernorm, "rotary_interleaved": m.rotary_interleaved,
        "deterministic_mode": m.deterministic_mode, "layernorm_epsilon": m.norm_epsilon,
        "calculate_per_token_loss": a.training.calculate_per_token_loss,
        # No Transformer Engine here: --attention-backend picks the layer spec's core_attention instead
        # (megatron_ppu.attention: SDPA for auto/flash/fused, DotProductAttention for unfused/local, see
        # _build_model). The config says local, megatron-core's name for "no TE attention" (it then sets
        # the NVTE_*_ATTN variables the same way for every run of a process).
        "attention_backend": AttnBackend.local,
    }
    out["activation_func"] = F.silu if m.swiglu else squared_relu if m.squared_relu else F.gelu
    return out


def _build_transformer_config(a: TrainArgs, ffn: int, dtype: torch.dtype, layout: ReplicaLayout) -> TransformerConfig:
    m, par = a.model, a.parallel
    return TransformerConfig(
        # Megatron's, over this replica's groups; timed: DDP's comm_wait_s (megatron_ppu.sync.ddp)
        finalize_model_grads_func=TimedCall(finalize_grads_func(layout)),
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=ffn,
        num_attention_heads=m.num_attention_heads, kv_channels=m.kv_channels,
        num_query_groups=m.num_query_groups if m.group_query_attention else None,
        gated_linear_unit=m.swiglu,
        normalization=m.normalization, add_bias_linear=not m.disable_bias_linear,
        init_method_std=m.init_method_std, attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout, tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size, sequence_parallel=par.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=a.precision.bf16, fp16=a.precision.fp16,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
        recompute_granularity=m.recompute_granularity, recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        **megatron_transformer_fields(a),
    )


def _set_seeds(seed: int) -> None:
    # Megatron-LM's seeding (training/initialize.py::_set_random_seed, core_v0.16.1): every
    # pipeline stage gets seed + 100 x its pipeline rank, for the default generators and for
    # the model-parallel RNG tracker (attention dropout, recompute), so stages do not draw the
    # same initial weights or dropout masks. Data-parallel ranks share it (replicas start equal).
    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def _build_model(a: TrainArgs, config: TransformerConfig, ppu: PPUConfig, layout: ReplicaLayout,
                 vocab_size: int, slice_index: Optional[int] = None) -> GPTModel:
    m = a.model
    # the decoder block spec, so that the final norm also takes --sequence-parallel
    spec = get_gpt_decoder_ppu_spec(config, ppu, layout.slice_index(ppu.num_slices) if slice_index is None
                                    else slice_index,
                                    normalization=m.normalization, qk_layernorm=m.qk_layernorm,
                                    attention_backend=m.attention_backend)
    compat.quiet_gpt_model_deprecation()  # megatron-core 0.19's "GPTModel IS DEPRECATED" (see there)
    model = GPTModel(
        config, spec, vocab_size=vocab_size, max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent, rotary_base=m.rotary_base,
    )
    if torch.cuda.is_available():
        model.cuda()
    return model


def _build_block_plan(a: TrainArgs, subnet: SubnetConfig, model: GPTModel,
                      layout: ReplicaLayout) -> Optional[BlockPlan]:
    if subnet.plan != "blocks":
        return None
    L, K = a.model.num_layers, layout.num_replicas
    assignment = block_assignment(K, L, subnet.coverage, subnet.seed)
    held = assignment[layout.replica_index]
    apply_block_plan(model, held, subnet.masking)
    offset = ps.get_pipeline_model_parallel_rank() * (L // a.parallel.pipeline_model_parallel_size)
    return BlockPlan(held, block_holders_fn(assignment, L, K, offset))


def _build_ownership_plan(model: GPTModel, layout: ReplicaLayout, ppu: PPUConfig,
                          blocks: Optional[BlockPlan]) -> OwnershipPlan:
    owners = (lambda name: len(blocks.holders_fn(name))) if blocks is not None else None
    return build_ownership_plan(model, layout.num_replicas, ppu.num_slices, layout.replica_index, owners)


def _build_ddp(a: TrainArgs, config: TransformerConfig, model: GPTModel, layout: ReplicaLayout,
               dtype: torch.dtype) -> torch.nn.Module:
    wrapped = Float16Module(config, model) if dtype != torch.float32 else model
    return wrap_model_ddp(wrapped, layout, use_distributed_optimizer=a.parallel.use_distributed_optimizer)


def _build_optimizer(a: TrainArgs, ddp: torch.nn.Module, layout: ReplicaLayout, dtype: torch.dtype,
                     plan: OwnershipPlan):
    t = a.training
    cfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=a.precision.bf16,
        fp16=a.precision.fp16, params_dtype=dtype, use_distributed_optimizer=a.parallel.use_distributed_optimizer,
        decoupled_lr=t.decoupled_lr, decoupled_min_lr=t.decoupled_min_lr,
        log_num_zeros_in_grad=a.checkpoint.log_num_zeros_in_grad,
    )
    sliced = [plan.tensors(n).parts[0] for n, own in plan.params.items() if own.sliced] \
        if a.ppu.sliced_lr_mult != 1.0 else []
    return build_inner_optimizer([ddp], cfg, layout, lr_mult_params=sliced, lr_mult=a.ppu.sliced_lr_mult)


def _build_scheduler(a: TrainArgs, optimizer, sched: BatchSchedule):
    t, s = a.training, sched.lr
    return build_param_scheduler(
        optimizer, lr=t.lr, min_lr=t.min_lr, warmup_steps=s["warmup_steps"],
        decay_steps=s["decay_steps"], decay_style=t.lr_decay_style, weight_decay=t.weight_decay,
        wsd_decay_steps=t.lr_wsd_decay_iters, wsd_decay_style=t.lr_wsd_decay_style,
        init_lr=t.lr_warmup_init, use_checkpoint=t.use_checkpoint_opt_param_scheduler,
        override=t.override_opt_param_scheduler, train_steps=s["train_iters"])


def _build_synchroniser(a: TrainArgs, subnet: SubnetConfig, model: GPTModel, plan: OwnershipPlan,
                        layout: ReplicaLayout, optimizer, blocks: Optional[BlockPlan],
                        config: TransformerConfig, ddp: torch.nn.Module) -> Synchroniser:
    if subnet.sync == "step":
        # SDP: every step, gradients averaged over each parameter's holders (sub-group
        # all-reduces), then the holders' new values copied to the non-holders (at once with
        # backward masking, before evaluation/saving with forward masking).
        return SDPSync(model, plan, layout, holders_fn=blocks.holders_fn if blocks is not None else None,
                       lazy=subnet.masking == "forward", optimizer=optimizer)
    if a.diloco.enabled:
        outer: DiLoCoConfig = dataclasses.replace(a.diloco, num_replicas=layout.num_replicas)  # K resolved
        # the other replicas: today's static sub-groups, or torchft's quorum per sync (the one place that chooses)
        if a.fault_tolerance.enabled:
            from . import fault_tolerance

            transport = fault_tolerance.build_transport(a, layout.num_replicas)
        else:
            transport = StaticReplicas(layout.replica_group, timeout=layout.timeout)
        sync = DiLoCoSync(model, plan, transport, outer, optimizer, inner_group=layout.inner_dp_group,
                          timeout=layout.timeout, holders_fn=blocks.holders_fn if blocks is not None else None)
        if a.fault_tolerance.enabled:
            fault_tolerance.attach(sync, transport)
        return sync
    # the gradient all-reduce over inner-DP (= every DP rank: one replica), counted for stats()
    return DDPSync(grad_sync=config.finalize_model_grads_func, grad_bytes=grad_buffer_bytes(ddp),
                   group_size=layout.inner_dp)
