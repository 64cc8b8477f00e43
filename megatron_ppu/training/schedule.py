"""Batch and learning-rate schedule arithmetic, with Megatron-LM's meanings.

:func:`validate_schedule` holds Megatron-LM's rules for iteration- vs sample-based schedules
(its ``validate_args``), :func:`batch_schedule` the global batch and micro-batches per step,
:func:`lr_schedule` the iterations and the learning-rate schedule in iterations. They read the
fields of :class:`megatron_ppu.training.arguments.TrainingArgs` (any object with its fields) and
import nothing of the trainer's.
"""
from __future__ import annotations

from typing import Dict


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
