"""Which backend serves which collective: the one rule of the project.

**Every process group serves both CPU and CUDA tensors.**

* On a CUDA machine :func:`megatron_ppu.training.loop.init_distributed` initialises the
  default group with the backend string ``"cpu:gloo,cuda:nccl"`` (see
  :func:`process_group_backend`); on a machine without CUDA with ``"gloo"``.
* Every group the project creates, and every group Megatron creates for it, is made with
  ``backend=None`` and so inherits both backends of the default group. No group is
  created with an explicit ``"nccl"`` (it would serve CUDA tensors only, and a collective
  on a CPU tensor would raise ``No backend type associated with device type cpu``) and no
  extra ``"gloo"`` twin is created (Megatron's gloo groups are switched off with
  ``create_gloo_process_groups=False``).
* The gloo half of each group opens its connections only when a CPU collective is first
  issued on it (``TORCH_GLOO_LAZY_INIT=1``, set by :func:`enable_lazy_gloo` unless the
  user set the variable), and NCCL creates a communicator only at a group's first CUDA
  collective. So a group costs no connection until it is used: only what is used is
  created.

Consequently a small collective on a host tensor (a loss to average, a verdict to agree
on, a finite-check flag) is correct on every group, on every device, with no per-call-site
device placement. Large tensors (gradients, parameter deltas) stay on the GPU and go
through NCCL.

Timeouts: every group gets ``--distributed-timeout-minutes`` (:func:`group_timeout`);
see the README section "Slow links: timeouts" for how to size it.
"""
from __future__ import annotations

import logging
import math
import os
from datetime import timedelta

import torch.distributed as dist

logger = logging.getLogger(__name__)

#: The backend string of the default group on a CUDA machine.
CUDA_BACKEND = "cpu:gloo,cuda:nccl"
#: Megatron-LM's default of ``--distributed-timeout-minutes``.
DEFAULT_TIMEOUT_MINUTES = 10


def process_group_backend(device_type: str, distributed_backend: str = "nccl") -> str:
    """Backend string for ``init_process_group`` on a machine whose accelerator is ``device_type``.

    ``"cuda"`` gives ``"cpu:gloo,cuda:nccl"`` (CUDA tensors over NCCL, host tensors over
    gloo, in every group that inherits it); ``"cpu"`` gives ``"gloo"`` (which serves both).
    ``distributed_backend`` is Megatron-LM's ``--distributed-backend``: ``"gloo"`` gives
    ``"gloo"`` on CUDA too (CUDA tensors staged through the host; several ranks may share a GPU).
    """
    if distributed_backend not in ("nccl", "gloo"):
        raise ValueError(f"--distributed-backend {distributed_backend!r}: use nccl or gloo.")
    if device_type == "cuda":
        return CUDA_BACKEND if distributed_backend == "nccl" else "gloo"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"no process-group backend for device type {device_type!r}; "
                     "megatron_ppu runs on 'cuda' (NCCL + gloo) or 'cpu' (gloo).")


def enable_lazy_gloo() -> None:
    """Let gloo open a group's connections only at its first CPU collective
    (``TORCH_GLOO_LAZY_INIT=1``), unless the user has set the variable. Call before
    creating process groups."""
    os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")


def shutdown_process_groups() -> None:
    """Destroy the default process group and every group made from it, if initialized. Call at
    the end of a process that used them: a gloo group still alive at interpreter teardown can
    abort the exiting process ("terminate called without an active exception", exit -6) after
    the work has succeeded, which torchrun reports as a failed rank."""
    if dist.is_initialized():
        dist.destroy_process_group()


def group_timeout(minutes: float) -> timedelta:
    """The timeout of every process group, from ``--distributed-timeout-minutes``."""
    if not minutes > 0:
        raise ValueError(f"--distributed-timeout-minutes {minutes} must be positive; size it from the "
                         "slowest collective (README: 'Slow links: timeouts').")
    return timedelta(minutes=minutes)


def suggested_timeout_minutes(slowest_collective_s: float, margin: float = 3.0) -> int:
    """A ``--distributed-timeout-minutes`` for a run whose slowest collective takes
    ``slowest_collective_s`` seconds at peak link bandwidth (e.g. one outer all-reduce:
    2(K-1)/K x payload bytes / B, ``estimate.estimate_communication(...).sync_s``):
    ``margin`` times that (links rarely reach their peak, and ranks arrive at a collective
    at different times), rounded up to whole minutes, and never below Megatron-LM's default
    of 10 minutes."""
    if slowest_collective_s < 0 or margin < 1:
        raise ValueError(f"slowest collective {slowest_collective_s} s must be >= 0 and margin {margin} >= 1")
    return max(DEFAULT_TIMEOUT_MINUTES, math.ceil(margin * slowest_collective_s / 60.0))
