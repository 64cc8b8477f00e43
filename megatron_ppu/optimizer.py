"""Inner optimizer over the trainable set only, built with Megatron's own machinery.

The model is wrapped in Megatron's :class:`DistributedDataParallel` over the
*inner* data-parallel group of the replica (see :mod:`megatron_ppu.parallel`),
and the optimizer comes from ``megatron.core.optimizer.get_megatron_optimizer``
with the same groups. Both only see parameters with ``requires_grad=True``, so
for a PPU model the frozen remainder of every sliced weight gets no
``main_grad`` buffer and no Adam moments (and, with bf16, no fp32 master copy).
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from .parallel import ReplicaLayout


def finalize_grads_func(layout: ReplicaLayout) -> Callable:
    """Megatron's ``finalize_model_grads`` bound to this replica's process groups: the
    ``finalize_model_grads_func`` to give the ``TransformerConfig`` at construction
    (:mod:`megatron_ppu.training.build` does). Megatron's forward-backward schedules call it at
    the end of each step: it finishes the DDP gradient all-reduce inside the replica,
    all-reduces sequence-parallel norm gradients across TP and tied embedding gradients across
    PP. Without it inner-DP ranks silently diverge."""
    return functools.partial(finalize_model_grads, pg_collection=layout.process_group_collection())


def wrap_model_ddp(model: torch.nn.Module, layout: ReplicaLayout, *,
                   grad_reduce_in_fp32: bool = True, overlap_grad_reduce: bool = False,
                   use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Megatron DDP over this replica's inner-DP group (gradients all-reduced every step there).

    The model's ``TransformerConfig`` should carry :func:`finalize_grads_func` from its
    construction (the builder's does). A config built elsewhere without one (the tests'
    ``make_config``) gets it here: the one place outside the builder that sets it, listed in
    ``tests/test_no_monkeypatch.py``'s allow-list; it is Megatron-LM's own pattern
    (``training.py`` sets ``config.finalize_model_grads_func`` on the model config).
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    pgc = layout.process_group_collection()
    if model.config.finalize_model_grads_func is None:
        model.config.finalize_model_grads_func = finalize_grads_func(layout)
    return DistributedDataParallel(model.config, ddp_config, model, pg_collection=pgc)


def build_inner_optimizer(model_chunks: List[DistributedDataParallel], config: OptimizerConfig,
                          layout: ReplicaLayout, *, lr_mult_params: Sequence[torch.nn.Parameter] = (),
                          lr_mult: float = 1.0):
    """Megatron optimizer (Adam/AdamW as in ``config``) over the chunks' trainable parameters.

    Every group it uses is the replica's own (``ReplicaLayout.process_group_collection``):
    the distributed optimizer shards over the inner-DP group and reduces gradient norm,
    zero count and overflow flag over the replica's ranks (``intra_dist_opt``), so one
    replica's step never waits for, or depends on, another's. No gloo twin is needed:
    every group serves host tensors too (:mod:`megatron_ppu.comm`).

    ``lr_mult_params`` (``--ppu-sliced-lr-mult``): these parameters get their own groups whose
    ``max_lr`` / ``min_lr`` are ``config.lr`` / ``config.min_lr`` x ``lr_mult`` (Megatron's
    per-group overrides, on top of its standard ones: no weight decay on biases and norms,
    ``--decoupled-lr``), so the scheduler scales their whole schedule.
    """
    overrides = None
    if lr_mult_params and lr_mult != 1.0:
        ids = {id(p) for p in lr_mult_params}
        overrides = dict(get_standard_config_overrides(config=config))
        key = ParamKey(predicate=ParamPredicate(name="ppu_sliced_lr_mult", fn=lambda p: id(p) in ids))
        overrides[key] = ParamGroupOverride(max_lr=config.lr * lr_mult, min_lr=config.min_lr * lr_mult)
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides, use_gloo_process_groups=False,
                                  pg_collection=layout.process_group_collection())


def build_param_scheduler(optimizer, *, lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
                          decay_steps: int = 1, decay_style: str = "constant", weight_decay: float = 0.0,
                          wsd_decay_steps: Optional[int] = None, wsd_decay_style: str = "exponential",
                          init_lr: Optional[float] = None, use_checkpoint: bool = False, override: bool = False,
                          train_steps: Optional[int] = None):
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
    ``train_steps`` (the run's iterations) sets the weight-decay schedule's length as Megatron-LM
    does (constant here; its scheduler checks the length on resume).

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
        # Megatron-LM's wd_incr_steps is the whole run (train_iters), which its scheduler checks on resume
        wd_incr_steps=max(train_steps if train_steps is not None else decay_steps, 1), wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_steps if decay_style == "WSD" else None, lr_wsd_decay_style=wsd_decay_style,
        use_checkpoint_opt_param_scheduler=use_checkpoint, override_opt_param_scheduler=override,
    )
