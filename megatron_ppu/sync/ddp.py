"""Plain synchronous data parallelism: nothing beyond Megatron's DDP, which all-reduces the
gradients over every data-parallel rank (one replica) inside the forward-backward pass."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .base import Synchroniser, TimedCall


def grad_buffer_bytes(ddp: torch.nn.Module) -> int:
    """Bytes of the gradient buffers of a Megatron ``DistributedDataParallel`` (its ``grad_data``,
    dense and expert-parallel): what its gradient reduction hands to the collective every step."""
    bufs = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))
    return sum(b.grad_data.numel() * b.grad_data.element_size() for b in bufs)


class DDPSync(Synchroniser):
    """The synchroniser of ``--diloco-local-steps 0``: every hook is the base class's no-op.

    Args:
        grad_sync: the model config's ``finalize_model_grads_func`` as a :class:`TimedCall` (the
            builder makes it one), whose seconds are this method's ``comm_wait_s`` and whose calls
            are its gradient reductions (one per iteration).
        grad_bytes: bytes of the gradient buffers reduced per call (:func:`grad_buffer_bytes`).
        group_size: ranks of the data-parallel group the gradients are reduced over (K).
    """

    def __init__(self, grad_sync: Optional[TimedCall] = None, grad_bytes: int = 0, group_size: int = 1):
        self.grad_sync, self.grad_bytes, self.group_size = grad_sync, grad_bytes, group_size

    def stats(self) -> Dict[str, float]:
        """Counters since the start of the run, with :class:`DiLoCoSync.stats`'s key names for the bytes:
        ``payload_bytes`` = ``bytes_handed`` (gradient bytes handed to the all-reduce, every iteration)
        and ``grad_bytes_sent`` (bytes on the wire per rank in the ring model, 2 (K-1)/K x those; with
        ``--use-distributed-optimizer`` the reduce-scatter of the gradients and the all-gather of the
        parameters, (K-1)/K each, which is the same for fp32 parameters); ``reductions``: gradient
        reductions so far; ``comm_wait_s``: their seconds. The small tensor- and pipeline-parallel
        reductions of ``finalize_model_grads`` (layer-norm, tied embeddings) are not counted."""
        calls = self.grad_sync.calls if self.grad_sync is not None else 0
        k = self.group_size
        handed = calls * self.grad_bytes
        return {"reductions": calls, "payload_bytes": handed, "bytes_handed": handed,
                "grad_bytes_sent": 2 * (k - 1) / k * handed if k > 1 else 0.0,
                "comm_wait_s": self.grad_sync.seconds if self.grad_sync is not None else 0.0}

    def describe(self) -> str:
        return "synchronous DDP (no outer loop)"
