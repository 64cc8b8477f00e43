"""Batch, learning-rate schedule and replica layout arithmetic, with Megatron-LM's meanings.

:func:`validate_schedule` holds Megatron-LM's rules for iteration- vs sample-based schedules
(its ``validate_args``), :func:`batch_schedule` the global batch and micro-batches per step,
:func:`lr_schedule` the iterations and the learning-rate schedule in iterations. They read the
fields of :class:`megatron_ppu.training.arguments.TrainingArgs` (any object with its fields) and
import nothing of the trainer's. :func:`data_parallel_size`, :func:`replica_count` and
:func:`check_layout` derive the data-parallel size and the replica count K from the settings
(:class:`megatron_ppu.training.arguments.TrainArgs`) and check the rules that need them.
"""
from __future__ import annotations

from typing import Dict, Optional

from ..config import check_block_balance, check_replicas_divide_data_parallel, check_slices_divide_replicas


def validate_schedule(t) -> None:
    """Megatron-LM's rules for iteration- vs sample-based schedules (its validate_args)."""
    if t.train_iters is not None and t.train_samples is not None:
        raise ValueError("--train-iters and --train-samples are mutually exclusive: give one.")
    if t.train_iters is not None:
        wrong = [f for f, bad in (("--lr-decay-samples", t.lr_decay_samples is not None),
                                  ("--lr-warmup-samples", t.lr_warmup_samples != 0)) if bad]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} need sample-based training (--train-samples); with "
                             "--train-iters use --lr-decay-iters / --lr-warmup-iters.")
        if t.lr_warmup_fraction is not None and t.lr_warmup_iters != 0:
            raise ValueError("give one of --lr-warmup-fraction and --lr-warmup-iters.")
    if t.train_samples is not None:
        wrong = [f for f, bad in (("--lr-decay-iters", t.lr_decay_iters is not None),
                                  ("--lr-warmup-iters", t.lr_warmup_iters != 0)) if bad]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} need iteration-based training (--train-iters); with "
                             "--train-samples use --lr-decay-samples / --lr-warmup-samples.")
        if t.lr_warmup_fraction is not None and t.lr_warmup_samples != 0:
            raise ValueError("give one of --lr-warmup-fraction and --lr-warmup-samples.")
        if t.train_samples < 1:
            raise ValueError("--train-samples must be >= 1.")
    if t.lr_warmup_fraction is not None and not 0.0 <= t.lr_warmup_fraction < 1.0:
        raise ValueError(f"--lr-warmup-fraction {t.lr_warmup_fraction} must be in [0, 1).")
    if t.lr is not None and t.min_lr > t.lr:
        raise ValueError(f"--min-lr {t.min_lr} is above --lr {t.lr}.")
    if t.use_checkpoint_opt_param_scheduler and t.override_opt_param_scheduler:
        raise ValueError("--use-checkpoint-opt_param-scheduler and --override-opt_param-scheduler are mutually "
                         "exclusive (take the schedule from the checkpoint, or from the flags).")


def batch_schedule(t, data_parallel_size: int) -> tuple:
    """``(global batch, micro-batches per rank and step)`` on ``data_parallel_size`` DP ranks
    (Megatron-LM's: the global batch defaults to micro-batch x DP)."""
    dp = data_parallel_size
    gbs = t.global_batch_size or t.micro_batch_size * dp
    if gbs % (t.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                         f"{t.micro_batch_size} x data-parallel size {dp}.")
    return gbs, gbs // (t.micro_batch_size * dp)


def lr_schedule(t, global_batch_size: int) -> Dict[str, float]:
    """Iterations to train and the learning-rate schedule in iterations, with Megatron-LM's meanings.

    Megatron-LM counts the schedule in samples (``get_optimizer_param_scheduler``: warm-up
    ``lr_warmup_fraction x decay`` or ``lr_warmup_iters x global batch`` or ``lr_warmup_samples``;
    decay ``lr_decay_iters x global batch`` or ``lr_decay_samples``) and steps it by the global
    batch each iteration; dividing every count by the global batch gives the same learning
    rate at every iteration, possibly with fractional warm-up/decay lengths, which is what this
    returns: ``train_iters`` (``train_samples // global batch`` for sample-based runs),
    ``warmup_steps`` and ``decay_steps``.
    """
    if t.train_samples is not None:
        train_iters = t.train_samples // global_batch_size
        if train_iters < 1:
            raise ValueError(f"--train-samples {t.train_samples} is less than one global batch "
                             f"({global_batch_size}); raise it or lower --global-batch-size.")
        decay = (t.lr_decay_samples if t.lr_decay_samples is not None else t.train_samples) / global_batch_size
        warmup = t.lr_warmup_samples / global_batch_size
    else:
        train_iters = t.train_iters
        decay = t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters
        warmup = t.lr_warmup_iters
    if t.lr_warmup_fraction is not None:
        warmup = t.lr_warmup_fraction * decay
    return {"train_iters": train_iters, "warmup_steps": warmup, "decay_steps": decay}


def replica_count(a, data_parallel_size: Optional[int]) -> Optional[int]:
    """K: the replicas DP ranks form (``--diloco-replicas``, default every DP rank; 1 for plain
    DDP); None when it depends on a data-parallel size not known yet."""
    if not a.uses_replicas:
        return 1
    return a.diloco.num_replicas or data_parallel_size


def data_parallel_size(a, world_size: Optional[int]) -> Optional[int]:
    """World size / (TP x PP); None when the world size is unknown or not a multiple (the
    builder refuses the latter with the launch fix)."""
    mp = a.parallel.tensor_model_parallel_size * a.parallel.pipeline_model_parallel_size
    return world_size // mp if world_size is not None and world_size % mp == 0 else None


def check_layout(a, num_replicas: int, dp: int) -> None:
    """The rules that need the replica count K and the data-parallel size, at build time (the
    same functions ``arguments.validate_args`` calls when the world size is known at parse time)."""
    if a.uses_replicas and a.diloco.num_replicas is not None:
        check_replicas_divide_data_parallel(a.diloco.num_replicas, dp)
    check_slices_divide_replicas(a.ppu.num_slices, num_replicas)
    if a.subnet.plan == "blocks":
        check_block_balance(num_replicas, a.model.num_layers, a.subnet.coverage)
