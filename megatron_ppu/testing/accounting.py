"""Per-rank bytes of training state, measured from live tensors and predicted from the plan.

Used by the memory tests and the benchmarks to check that a PPU / subnetwork model holds
gradient buffers and optimizer state for its trainable set only (training never reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from megatron.core.distributed import DistributedDataParallel

from ..optimizer import InnerOptimizerView


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
    opt_bytes = 0
    trainable = 0
    for p, state, low_precision in InnerOptimizerView(optimizer).param_states():
        trainable += p.numel()
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                opt_bytes += v.numel() * v.element_size()
        # fp32 master copy of a bf16/fp16 model param is the optimizer's own param
        if low_precision:
            opt_bytes += p.numel() * p.element_size()
    return StateBytes(grads=grads, optimizer=opt_bytes, trainable_elements=trainable)


def predict_state_bytes(owned_elements: int, *, bf16: bool, grad_reduce_in_fp32: bool = True) -> StateBytes:
    """What the plan predicts: fp32 (or param-dtype) grads and Adam's two fp32 moments for every
    owned element, plus an fp32 master copy when the model is bf16."""
    grad_bytes = 4 if (grad_reduce_in_fp32 or not bf16) else 2
    opt = owned_elements * (8 + (4 if bf16 else 0))
    return StateBytes(grads=owned_elements * grad_bytes, optimizer=opt, trainable_elements=owned_elements)
