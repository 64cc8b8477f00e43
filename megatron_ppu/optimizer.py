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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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


class InnerOptimizerView:
    """The one reader of Megatron's optimizer internals: what the outer loop (DiLoCo), SDP, the
    trainer and the accounting helpers need to know about the inner optimizer, asked here and
    nowhere else (``tests/test_optimizer_view.py`` scans the sources for it). The first place a new
    optimizer class or precision has to be taught.

    ``optimizer``: what :func:`build_inner_optimizer` returns (a ``ChainedOptimizer`` or one
    Megatron optimizer), or None (no inner optimizer: every query answers "nothing").

    * :meth:`masters`: fp32 master of every low-precision model parameter
      (``Float16OptimizerWithFloat16Params``);
    * :attr:`is_distributed`, :meth:`shards`, :meth:`shard_ranges`: this rank's fp32 shard of the
      ``DistributedOptimizer``, per model parameter;
    * :meth:`reset_nonfinite_state`: the recovery after a skipped outer step;
    * :meth:`untie_step_tensors`: the Adam "step" fix after megatron-core loaded a state;
    * :meth:`param_states`: every trained parameter with its state (memory accounting).
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def parts(self) -> list:
        """The Megatron optimizers (one per ``ChainedOptimizer`` part; [] without an optimizer)."""
        if self.optimizer is None:
            return []
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def masters(self) -> Dict[int, torch.Tensor]:
        """``id(model param) -> fp32 master param`` for Megatron's ``Float16OptimizerWithFloat16Params``
        (bf16 / fp16 training without the distributed optimizer); empty otherwise."""
        out: Dict[int, torch.Tensor] = {}
        for opt in self.parts:
            if hasattr(opt, "float16_groups") and hasattr(opt, "fp32_from_float16_groups"):
                for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                    for p16, p32 in zip(g16, g32):
                        out[id(p16)] = p32
        return out

    @property
    def is_distributed(self) -> bool:
        """Whether a part is Megatron's ``DistributedOptimizer`` (fp32 state sharded over the
        inner-DP ranks)."""
        return any(hasattr(opt, "shard_fp32_from_float16_groups") for opt in self.parts)

    def shards(self) -> Dict[int, Tuple[torch.Tensor, int, int]]:
        """``id(model param) -> (fp32 shard, start, end)`` for Megatron's ``DistributedOptimizer``:
        this rank's fp32 master of the range [start, end) of the flattened parameter (for an fp32
        model parameter the shard is a view of the parameter itself). Parameters of which this
        rank holds no range are absent."""
        out: Dict[int, Tuple[torch.Tensor, int, int]] = {}
        for opt in self.parts:
            if not hasattr(opt, "shard_fp32_from_float16_groups"):
                continue
            pairs = list(zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups)) + \
                list(zip(opt.model_fp32_groups, opt.shard_fp32_groups))
            for models, shards in pairs:
                for p, shard in zip(models, shards):
                    r = opt._get_model_param_range_map(p)["param"]
                    assert shard is not None and shard.numel() == r.end - r.start, p.shape
                    out[id(p)] = (shard, r.start, r.end)
        return out

    def shard_ranges(self) -> Optional[Dict[int, Tuple[int, int]]]:
        """``id(model param) -> (start, end)``: the range of the flattened parameter in this rank's
        distributed-optimizer shard, for every parameter the shard touches; None when no part is
        distributed."""
        if not self.is_distributed:
            return None
        return {i: (a, b) for i, (_, a, b) in self.shards().items()}

    def _states(self) -> List[dict]:
        return [st for opt in self.parts for st in getattr(opt, "optimizer", opt).state.values()]

    def reset_state(self) -> int:
        """Reset every per-parameter state entry to a fresh optimizer's (tensors zeroed, Adam's step
        count 0), as after weights its state does not belong to were written into the model (a
        replica healed from a peer); returns how many parameters' states were reset."""
        for st in self._states():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    v.zero_()
                elif k == "step":
                    st[k] = 0
        return len(self._states())

    def reset_nonfinite_state(self) -> int:
        """Reset every per-parameter state entry that holds a non-finite value to a fresh
        optimizer's (tensors zeroed, Adam's step count 0); returns how many parameters' states
        were reset. Finite state entries are kept."""
        reset = 0
        for st in self._states():
            tensors = [v for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
            if all(bool(torch.isfinite(v).all()) for v in tensors):
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    v.zero_()
                elif k == "step":
                    st[k] = 0
            reset += 1
        return reset

    def untie_step_tensors(self) -> None:
        """Give every parameter's torch-Adam state its own "step" tensor. megatron-core 0.16.1
        (``DistributedOptimizer.load_state_dict``, no apex/TE) gives every parameter one shared
        "step" tensor, which torch then increments once per parameter per step (wrong bias
        correction after a resume). Call after every load of an optimizer state."""
        for st in self._states():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()

    def param_states(self) -> Iterator[Tuple[torch.nn.Parameter, dict, bool]]:
        """Every parameter the optimizer steps, once: ``(param, its state, low_precision)``;
        ``param`` is the optimizer's own (the fp32 master of a bf16/fp16 model parameter, which
        ``low_precision`` flags)."""
        seen = set()
        for opt in self.parts:
            inner = opt.optimizer
            cfg = getattr(opt, "config", None)
            low = cfg is not None and bool(cfg.bf16 or cfg.fp16)
            for group in inner.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    yield p, inner.state.get(p, {}), low
