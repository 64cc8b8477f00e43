"""Plain synchronous data parallelism: nothing beyond Megatron's DDP, which all-reduces the
gradients over every data-parallel rank (one replica) inside the forward-backward pass."""
from __future__ import annotations

from typing import Dict, Optional

from .base import Synchroniser, TimedCall


class DDPSync(Synchroniser):
    """The synchroniser of ``--diloco-local-steps 0``: every hook is the base class's no-op.

    Args:
        grad_sync: the model config's ``finalize_model_grads_func`` as a :class:`TimedCall` (the
            builder makes it one), whose seconds are this method's ``comm_wait_s``.
    """

    def __init__(self, grad_sync: Optional[TimedCall] = None):
        self.grad_sync = grad_sync

    def stats(self) -> Dict[str, float]:
        return {"comm_wait_s": self.grad_sync.seconds if self.grad_sync is not None else 0.0}

    def describe(self) -> str:
        return "synchronous DDP (no outer loop)"
