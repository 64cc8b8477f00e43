"""Megatron-LM interop: the entries Megatron-LM reads in our checkpoints, and Megatron-LM's checkpoints.

Both directions of compatibility with Megatron-LM's torch_dist checkpoints (core_v0.16.1) live
here, and nowhere else:

* Writing (:func:`megatron_lm_entries`): what a checkpoint of ours adds to its model part so that
  Megatron-LM's ``load_checkpoint`` resumes or fine-tunes from it: ``args`` (the form is
  :func:`.format.megatron_lm_args`), ``checkpoint_version``, the FLOPs so far, its ``rng_state``
  (where CUDA is present), and, for a plain synchronous run, Megatron's sharded optimizer state
  and the scheduler in Megatron-LM's units (samples, :func:`scheduler_to_samples`).
* Reading (:func:`load_megatron_lm_checkpoint`): a Megatron-LM checkpoint (no ``ppu/`` part)
  loaded into a :class:`~.state.TrainingState` with Megatron-LM's rules (``--finetune``,
  ``release``, ``--no-load-optim``, ``--no-load-rng``); it returns the position it read (a
  :class:`~.state.Restored`) and never sets the run's position itself.
* ``--use-checkpoint-args`` (:func:`apply_checkpoint_args`, called by
  ``training/arguments.py`` before anything is built): the model flags taken from a
  checkpoint's ``args`` as Megatron-LM's ``load_args_from_checkpoint`` takes them
  (:data:`CHECKPOINT_ARGS`).

Which checkpoint is loaded, and whether it is ours or Megatron-LM's, is :mod:`.checkpointer`'s.
"""
from __future__ import annotations

import os
import random
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from ...optimizer import InnerOptimizerView
from ...patches import compat
from .format import MEGATRON_CHECKPOINT_VERSION, RELEASE, check_model_part, megatron_lm_args, read_checkpoint_args
from .state import Restored, RunShape, TrainingState
from .verdicts import SHARED_FS_FIX, CheckpointError, agreed


def megatron_rng_state(tp_group, pp_group, dp_group):
    """Megatron-LM's ``rng_state`` entry of a torch_dist checkpoint (its ``get_rng_state``,
    without ``--data-parallel-random-init``): a ``ShardedObject`` over (PP, TP) written by
    data-parallel rank 0, holding ``[{random, np, torch, cuda, tracker states}]``. None
    without CUDA: Megatron-LM restores ``cuda_rng_state`` with ``torch.cuda.set_rng_state``,
    so a CPU run cannot produce an entry it reads (the checkpoint's args then carry
    ``no_save_rng``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    if not torch.cuda.is_available():
        return None
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
             "rng_tracker_states": get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", [state], (dist.get_world_size(pp_group), dist.get_world_size(tp_group)),
                         (dist.get_rank(pp_group), dist.get_rank(tp_group)), replica_id=dist.get_rank(dp_group))


def _optimizer_metadata(use_distributed_optimizer: bool, dp_group) -> dict:
    """Megatron-LM's ``_build_sharded_state_dict_metadata`` (``--dist-ckpt-optim-fully-reshardable``:
    the one distributed-optimizer sharding that works without TE/apex)."""
    md = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True, "dp_cp_group": dp_group}
    if use_distributed_optimizer:
        md.update(distrib_optim_sharding_type="fully_reshardable", distrib_optim_fully_reshardable_mem_efficient=False)
    return md


def _serialisable(md: Optional[dict]) -> Optional[dict]:
    return None if md is None else {k: v for k, v in md.items() if k != "dp_cp_group"}


def megatron_lm_entries(state: TrainingState, run: RunShape) -> dict:
    """What a checkpoint of ``state`` (of the run ``run``) adds for Megatron-LM:
    ``{"state": top-level entries for dist_checkpointing.save, "content_metadata": ...}``.

    * ``args`` (:func:`.format.megatron_lm_args`), ``checkpoint_version``, ``iteration`` (already
      there), ``num_floating_point_operations_so_far`` (Megatron-LM's dense-GPT formula x iterations);
    * a plain synchronous run (no replicas: its inner optimizer *is* Megatron's optimizer over every
      parameter): ``optimizer`` (Megatron's sharded optimizer state) and ``opt_param_scheduler``,
      so Megatron-LM resumes it exactly as its own;
    * runs with replicas (DiLoCo/PPU/SDP): their optimizer state (per-replica inner Adam over the
      owned slices, outer momentum) has no Megatron-LM equivalent: ``args.no_save_optim`` marks the
      checkpoint weights-only for the optimizer;
    * ``rng_state`` where Megatron-LM can restore it (CUDA), else ``args.no_save_rng``.
    """
    from megatron.core import parallel_state as ps

    a = run.args
    # (--use-distributed-optimizer: Megatron's sharded form of its state fails in save on CPU without
    # TE/apex, seen in tests/test_checkpoint_fs.py; marked weights-only until that path is fixed)
    with_optim = not a.uses_replicas and not a.parallel.use_distributed_optimizer
    dp_group = ps.get_data_parallel_group()
    rng = megatron_rng_state(ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(), dp_group)
    ns = megatron_lm_args(
        a, world_size=dist.get_world_size(), data_parallel_size=run.data_parallel_size,
        padded_vocab_size=run.padded_vocab_size, ffn_hidden_size=run.ffn_hidden_size, iteration=state.iteration,
        consumed_train_samples=state.consumed_samples, global_batch_size=run.global_batch_size,
        train_iters=a.training.train_iters, saves_optimizer=with_optim, saves_rng=rng is not None)
    entries = {"args": ns, "checkpoint_version": MEGATRON_CHECKPOINT_VERSION,
               "num_floating_point_operations_so_far": run.flops_per_iteration * state.iteration}
    md = _optimizer_metadata(a.parallel.use_distributed_optimizer, dp_group)
    if rng is not None:
        entries["rng_state"] = rng
    if with_optim:
        entries["opt_param_scheduler"] = scheduler_to_samples(state.scheduler.state_dict(), run.global_batch_size)
    return {"state": entries, "content_metadata": _serialisable(md), "optimizer_metadata": md,
            "optimizer": state.optimizer if with_optim else None}


# -- Megatron-LM checkpoints (no ppu/ part) ------------------------------------------------------------
_SCHEDULER_STEPS = ("lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps")


def scheduler_to_samples(state: dict, global_batch_size: int) -> dict:
    """Our scheduler state (counted in iterations) in Megatron-LM's units: samples (Megatron-LM
    steps its scheduler by the global batch size each iteration)."""
    return {k: v * global_batch_size if k in _SCHEDULER_STEPS and v is not None else v for k, v in state.items()}


def ignore_constant_wd_length(state: dict, scheduler) -> dict:
    """``state`` (a scheduler state dict) with ``wd_incr_steps`` set to ``scheduler``'s when both keep the
    weight decay constant: the length of a constant schedule changes nothing, and it is the run's length
    (Megatron-LM's ``train_iters``), so without this a resume that extends ``--train-iters`` would be
    refused by megatron-core's "total number of weight decay iterations do not match" check."""
    constant = (state.get("start_wd") == state.get("end_wd") and state.get("wd_incr_style") == "constant"
                and scheduler.start_wd == scheduler.end_wd and scheduler.wd_incr_style == "constant")
    return {**state, "wd_incr_steps": scheduler.wd_incr_steps} if constant and "wd_incr_steps" in state else state


def scheduler_to_iterations(state: dict, global_batch_size: int, path: str) -> dict:
    """Megatron-LM's scheduler state (samples) in our units (iterations of ``global_batch_size``)."""
    out = {}
    for k, v in state.items():
        if k in _SCHEDULER_STEPS and v is not None:
            if v % global_batch_size:
                raise CheckpointError(
                    f"{path}: the learning-rate schedule's {k} = {v} samples is not a whole number of iterations "
                    f"of the checkpoint's global batch {global_batch_size} (a batch-size ramp-up?); pass "
                    f"--no-load-optim to resume with this run's schedule and a fresh optimizer, or --finetune.")
            v //= global_batch_size
        out[k] = v
    return out

def _sharded_keys(path: str) -> set:
    return set(FileSystemReader(path).read_metadata().state_dict_metadata)


def load_megatron_lm_checkpoint(state: TrainingState, run: RunShape, path: str, *, finetune: bool,
                                no_load_optim: bool, no_load_rng: bool) -> Restored:
    """Collective: load a Megatron-LM torch_dist checkpoint (no ``ppu/`` part) into ``state``'s model,
    optimizer and scheduler with Megatron-LM's rules (its ``load_checkpoint`` at core_v0.16.1);
    returns the iteration and data position to continue from and what was loaded (``state``'s own
    ``iteration`` / ``consumed_samples`` are left to the caller).

    * always the model weights (Megatron's full layout: any TP/PP, any PPU/DiLoCo plan);
    * ``--finetune`` or a ``release`` checkpoint: weights only, iteration 0;
    * else iteration and data position (``args.consumed_train_samples``); the optimizer and
      learning-rate schedule unless ``--no-load-optim`` or the checkpoint's ``args.no_save_optim``
      (only into a run without replicas, whose optimizer is Megatron's over every parameter; a
      checkpoint without optimizer state, or a run with replicas, is a ``CheckpointError`` naming
      ``--no-load-optim``/``--finetune``, as Megatron-LM stops there too); the RNG states unless
      ``--no-load-rng``, ``args.no_save_rng`` or another TP/PP layout (the CUDA states only where
      CUDA is present).
    Without the optimizer state, the inner optimizer, the DiLoCo snapshot and the outer momentum
    start fresh from the loaded weights.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    a = run.args
    agreed(lambda: check_model_part(path), f"loading the Megatron-LM checkpoint {path}", SHARED_FS_FIX)
    common = agreed(lambda: dist_checkpointing.load_common_state_dict(path), f"reading {path}/common.pt")
    keys = agreed(lambda: _sharded_keys(path), f"reading {path}/.metadata")
    ckpt_args = common.get("args")
    release = os.path.basename(os.path.normpath(path)) == RELEASE
    weights_only = finetune or release
    tp, pp = a.parallel.tensor_model_parallel_size, a.parallel.pipeline_model_parallel_size
    ckpt_tp_pp = (getattr(ckpt_args, "tensor_model_parallel_size", 1), getattr(ckpt_args, "pipeline_model_parallel_size", 1))
    load_optim = not (weights_only or no_load_optim or getattr(ckpt_args, "no_save_optim", False))
    load_rng = not (weights_only or no_load_rng or getattr(ckpt_args, "no_save_rng", False)) and ckpt_tp_pp == (tp, pp)
    if load_optim and not any(k.startswith("optimizer.") for k in keys):
        raise CheckpointError(f"{path} holds no optimizer state (a weights-only Megatron-LM checkpoint); pass "
                              f"--no-load-optim to resume its weights, iteration and data position with a fresh "
                              f"optimizer, or --finetune to start a new run from its weights (Megatron-LM needs "
                              f"the same flags).")
    if load_optim and a.uses_replicas:
        raise CheckpointError(f"{path} is a Megatron-LM checkpoint: its optimizer state is Megatron's Adam over "
                              f"every parameter, while this run's replicas (DiLoCo/PPU/SDP) keep an inner optimizer "
                              f"per replica (over the owned slices only) and an outer optimizer. Pass "
                              f"--no-load-optim to resume its weights, iteration and data position with fresh "
                              f"optimizer state, or --finetune to start a new run from its weights.")
    if load_rng and not any(k.startswith("rng_state") for k in keys):
        raise CheckpointError(f"{path} holds no RNG state; pass --no-load-rng (as Megatron-LM asks too), or "
                              f"--finetune.")
    sd = {"model": state.model.sharded_state_dict()}
    if load_optim:
        md = dict(dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {},
                  dp_cp_group=ps.get_data_parallel_group())
        sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=True, metadata=md)
    if load_rng:
        sd["rng_state"] = ShardedObject("rng_state", [None], (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                        ps.get_tensor_model_parallel_rank()), replica_id=ps.get_data_parallel_rank())
    try:
        loaded = dist_checkpointing.load(sd, path)
    except Exception as e:
        raise CheckpointError(f"could not load the Megatron-LM checkpoint {path}: {type(e).__name__}: {e}. Is it a "
                              f"checkpoint of the same model architecture (--use-checkpoint-args takes it from "
                              f"the checkpoint)?") from e
    state.model.load_state_dict(loaded["model"])
    what = ["weights"]
    if load_optim:
        compat.load_optimizer_state_dict(state.optimizer, loaded["optimizer"])
        InnerOptimizerView(state.optimizer).untie_step_tensors()  # one Adam "step" tensor per parameter
        sched = common.get("opt_param_scheduler", common.get("lr_scheduler"))
        if sched is not None:
            gbs = getattr(ckpt_args, "global_batch_size", None) or run.global_batch_size
            try:
                state.scheduler.load_state_dict(
                    ignore_constant_wd_length(scheduler_to_iterations(sched, gbs, path), state.scheduler))
            except AssertionError as e:
                raise CheckpointError(
                    f"{path}: the learning-rate schedule of this run differs from the checkpoint's ({e}); resume "
                    "with the same --lr/--min-lr/--lr-warmup-*/--lr-decay-*/--weight-decay flags, or pass "
                    "--override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler, as in Megatron-LM.") from e
        what.append("optimizer and learning-rate schedule")
    else:
        state.weights_replaced()
    if weights_only:
        iteration = 0
    else:
        iteration = int(common["iteration"])
        what.append(f"iteration {iteration}")
    consumed = None
    if not finetune and ckpt_args is not None:
        consumed = int(getattr(ckpt_args, "consumed_train_samples", 0) or 0)
        what.append(f"data position {consumed} samples")
    if load_rng:
        st = loaded["rng_state"][0]
        random.setstate(st["random_rng_state"])
        np.random.set_state(st["np_rng_state"])
        torch.set_rng_state(st["torch_rng_state"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(st["cuda_rng_state"])
            get_cuda_rng_tracker().set_states(st["rng_tracker_states"])
            what.append("RNG states")
        else:
            what.append("RNG states (CPU generators; the checkpoint's CUDA states need CUDA)")
    return Restored(iteration, consumed,
                    ", ".join(what) + (" (release checkpoint: weights only)" if release and not finetune else ""))


# -- --use-checkpoint-args ---------------------------------------------------------------------------
#: Megatron-LM's ``load_args_from_checkpoint`` (core_v0.16.1) for the settings megatron_ppu has:
#: our field -> (the checkpoint's attribute, force). ``force`` False: only where this run left it unset.
CHECKPOINT_ARGS = {
    "num_layers": ("num_layers", False), "hidden_size": ("hidden_size", False),
    "ffn_hidden_size": ("ffn_hidden_size", False), "seq_length": ("seq_length", False),
    "num_attention_heads": ("num_attention_heads", False), "num_query_groups": ("num_query_groups", True),
    "group_query_attention": ("group_query_attention", True), "kv_channels": ("kv_channels", False),
    "max_position_embeddings": ("max_position_embeddings", False),
    "position_embedding_type": ("position_embedding_type", True), "rotary_base": ("rotary_base", True),
    "rotary_percent": ("rotary_percent", True), "rotary_interleaved": ("rotary_interleaved", True),
    "disable_bias_linear": ("add_bias_linear", True), "squared_relu": ("squared_relu", True),
    "swiglu": ("swiglu", True), "untie_embeddings_and_output_weights": ("untie_embeddings_and_output_weights", True),
    "normalization": ("normalization", True), "apply_query_key_layer_scaling": ("apply_query_key_layer_scaling", True),
    "attention_dropout": ("attention_dropout", True), "hidden_dropout": ("hidden_dropout", True),
    "tokenizer_type": ("tokenizer_type", True), "tokenizer_model": ("tokenizer_model", True),
    "tiktoken_pattern": ("tiktoken_pattern", True),
}


def apply_checkpoint_args(values: dict, load_dir: str) -> Tuple[List[str], str]:
    """``--use-checkpoint-args``: set the model (and tokenizer) settings in ``values`` (parsed
    flags, our field names) from the checkpoint's ``args`` as Megatron-LM does (:data:`CHECKPOINT_ARGS`:
    forced ones always, the others where unset). Refuses a checkpoint of a model megatron_ppu
    cannot build (MoE). Returns (the fields set, a description for the start-up log)."""
    path, ns = read_checkpoint_args(load_dir)
    if getattr(ns, "num_experts", None):
        raise CheckpointError(f"--use-checkpoint-args: {path} is a mixture-of-experts model (num_experts "
                              f"{ns.num_experts}); megatron_ppu trains dense GPT models.")
    set_ = []
    for ours, (theirs, force) in CHECKPOINT_ARGS.items():
        if not hasattr(ns, theirs) or (not force and values.get(ours) is not None):
            continue
        v = getattr(ns, theirs)
        if ours == "disable_bias_linear":
            v = not v
        if v is None and ours in ("tokenizer_type", "tokenizer_model", "tiktoken_pattern"):
            continue  # Megatron-LM's _set_arg keeps the run's value when the checkpoint has none
        if ours == "num_query_groups" and not getattr(ns, "group_query_attention", False):
            v = None  # Megatron-LM's validate_args fills it with the head count; our flag means GQA
        values[ours] = v
        set_.append(ours)
    desc = f"from {path}: " + (", ".join(f"--{k.replace('_', '-')} {values[k]}" for k in set_) or "nothing to change")
    return set_, desc
