"""Inner optimizer over the trainable set only, built with Megatron's own machinery.

The model is wrapped in Megatron's :class:`DistributedDataParallel` over the
*inner* data-parallel group of the replica (see :mod:`megatron_ppu.parallel`),
and the optimizer comes from ``megatron.core.optimizer.get_megatron_optimizer``
with the same groups. Both only see parameters with ``requires_grad=True``, so
for a PPU model the frozen remainder of every sliced weight gets no
``main_grad`` buffer and no Adam moments (and, with bf16, no fp32 master copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .parallel import ReplicaLayout


def wrap_model_ddp(model: torch.nn.Module, layout: ReplicaLayout, *,
                   grad_reduce_in_fp32: bool = True, overlap_grad_reduce: bool = False,
                   use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Megatron DDP over this replica's inner-DP group (gradients all-reduced every step there).

    Also installs Megatron's ``finalize_model_grads`` (with the same process groups)
    as ``config.finalize_model_grads_func``, which Megatron's forward-backward
    schedules call at the end of each step: it finishes the DDP gradient all-reduce
    inside the replica, all-reduces sequence-parallel norm gradients across TP and
    tied embedding gradients across PP. Without it inner-DP ranks silently diverge.
    """
    import functools

    from megatron.core.distributed import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    pgc = layout.process_group_collection()
    model.config.finalize_model_grads_func = functools.partial(finalize_model_grads, pg_collection=pgc)
    return DistributedDataParallel(model.config, ddp_config, model, pg_collection=pgc)


def build_inner_optimizer(model_chunks: List[DistributedDataParallel], config: OptimizerConfig,
                          layout: ReplicaLayout):
    """Megatron optimizer (Adam/AdamW as in ``config``) over the chunks' trainable parameters.

    Every group it uses is the replica's own (``ReplicaLayout.process_group_collection``):
    the distributed optimizer shards over the inner-DP group and reduces gradient norm,
    zero count and overflow flag over the replica's ranks (``intra_dist_opt``), so one
    replica's step never waits for, or depends on, another's. No gloo twin is needed:
    every group serves host tensors too (:mod:`megatron_ppu.comm`).
    """
    return get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=False,
                                  pg_collection=layout.process_group_collection())


@dataclass
class StateBytes:
    """Bytes this rank holds for training state, measured from the live tensors."""

    grads: int
    optimizer: int  # Adam moments + fp32 master copies of low-precision params
    trainable_elements: int

    def as_dict(self) -> Dict[str, int]:
        return {"grads": self.grads, "optimizer": self.optimizer, "trainable_elements": self.trainable_elements}


def measure_state_bytes(model_chunks: List[DistributedDataParallel], optimizer) -> StateBytes:
    """Count gradient-buffer and optimizer-state bytes held by this rank."""
    grads = 0
    for chunk in model_chunks:
        for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            grads += buf.grad_data.numel() * buf.grad_data.element_size()
    seen = set()
    opt_bytes = 0
    trainable = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                trainable += p.numel()
                for v in inner.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        opt_bytes += v.numel() * v.element_size()
                # fp32 master copy of a bf16/fp16 model param is the optimizer's own param
                if getattr(opt, "config", None) is not None and (opt.config.bf16 or opt.config.fp16):
                    opt_bytes += p.numel() * p.element_size()
    return StateBytes(grads=grads, optimizer=opt_bytes, trainable_elements=trainable)


def predict_state_bytes(owned_elements: int, *, bf16: bool, grad_reduce_in_fp32: bool = True) -> StateBytes:
    """What the plan predicts: fp32 (or param-dtype) grads and Adam's two fp32 moments for every
    owned element, plus an fp32 master copy when the model is bf16."""
    grad_bytes = 4 if (grad_reduce_in_fp32 or not bf16) else 2
    opt = owned_elements * (8 + (4 if bf16 else 0))
    return StateBytes(grads=owned_elements * grad_bytes, optimizer=opt, trainable_elements=owned_elements)


def build_param_scheduler(optimizer, *, lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
                          decay_steps: int = 1, decay_style: str = "constant", weight_decay: float = 0.0,
                          wsd_decay_steps: Optional[int] = None, wsd_decay_style: str = "exponential",
                          init_lr: Optional[float] = None, use_checkpoint: bool = False, override: bool = False):
    """Megatron's ``OptimizerParamScheduler`` for the inner optimizer.

    Megatron applies per-group weight-decay multipliers (no decay on biases and
    1-D parameters) and the learning-rate schedule through this scheduler; an
    optimizer used without it decays every parameter. Its constructor already sets
    the groups' lr and weight decay for step 0; call ``.step(1)`` after each
    optimizer step. Steps are iterations (Megatron-LM counts samples, which gives the
    same schedule).

    ``decay_style="WSD"`` (warm-up, stable, decay) needs ``wsd_decay_steps``: the last
    ``wsd_decay_steps`` of the ``decay_steps`` anneal from ``lr`` to ``min_lr`` in
    ``wsd_decay_style`` ("exponential", "linear", "cosine" or "minus_sqrt"), Megatron-LM's
    ``--lr-wsd-decay-iters`` and ``--lr-wsd-decay-style``. ``init_lr`` is the learning rate at
    the start of the warm-up (``--lr-warmup-init``); ``use_checkpoint`` / ``override`` are
    Megatron-LM's ``--use-checkpoint-opt_param-scheduler`` / ``--override-opt_param-scheduler``
    (what ``load_state_dict`` does when the checkpoint's schedule differs from this one).

    Raises:
        ValueError: WSD without ``wsd_decay_steps`` (Megatron's scheduler would assert).
    """
    if decay_style == "WSD" and (wsd_decay_steps is None or wsd_decay_steps < 1):
        raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters N >= 1 (the annealing iterations).")
    if wsd_decay_style not in ("exponential", "linear", "cosine", "minus_sqrt"):
        raise ValueError(f"--lr-wsd-decay-style {wsd_decay_style!r}: use exponential, linear, cosine or minus_sqrt.")
    return OptimizerParamScheduler(
        optimizer, init_lr=init_lr if init_lr is not None else (0.0 if warmup_steps else lr), max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=max(decay_steps, warmup_steps + 1),
        lr_decay_style=decay_style, start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=max(decay_steps, 1), wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_steps if decay_style == "WSD" else None, lr_wsd_decay_style=wsd_decay_style,
        use_checkpoint_opt_param_scheduler=use_checkpoint, override_opt_param_scheduler=override,
    )
