"""The state a checkpoint saves and restores, and the facts of the run it is recorded with.

Saving and loading never see the trainer. They work on a :class:`TrainingState`: the objects
whose contents a checkpoint holds (the model, the inner optimizer, the learning-rate scheduler,
the synchroniser with its DiLoCo / SDP state, the ownership plan) and the run's position
(iteration, consumed samples). The RNG states are the process's own (Python, NumPy, torch,
CUDA, Megatron's tracker): :func:`rng_state` reads them when a checkpoint is written and
:func:`set_rng_state` puts them back.

A load fills the model, optimizer, scheduler and synchroniser of the state it is given in place
(they are the run's objects), but never the position: it returns a :class:`Restored` that says
where the run continues (iteration, data position) and what was loaded, and the owner of the
position (the :class:`~megatron_ppu.training.loop.Trainer`) applies it. Where a load replaces
the weights without the optimizer state that belongs to them, :meth:`TrainingState.weights_replaced`
refreshes what is derived from the weights (the optimizer's fp32 masters, the synchroniser's
snapshot).

:class:`RunShape` is what a checkpoint records beside the state and what a resume must match:
the parsed flags, the sizes the build derived (data-parallel size, padded vocabulary, FFN width,
global batch, FLOPs per iteration) and the run description (:attr:`RunShape.run_info`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from ...ownership import OwnershipPlan
    from ...sync.base import Synchroniser
    from ..arguments import TrainArgs


@dataclass
class TrainingState:
    """What a checkpoint of one rank holds, besides the RNG states.

    Attributes:
        model: the rank's model (Megatron's GPT model, this rank's TP/PP part).
        optimizer: the inner optimizer (Megatron's, over the trainable parameters).
        scheduler: Megatron's learning-rate / weight-decay scheduler.
        sync: the synchroniser (:mod:`megatron_ppu.sync`); its ``state_dict`` is the DiLoCo / SDP state.
        plan: the ownership plan; a resume requires the same plan on every rank.
        iteration: iterations trained so far.
        consumed_samples: training samples consumed so far (the data position).
        transport: the outer loop's replica transport (:class:`~megatron_ppu.sync.replicas.ReplicaTransport`)
            or None; its ``state_dict`` (a fault-tolerant run's membership history) is saved when not empty.
    """

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    sync: "Synchroniser"
    plan: "OwnershipPlan"
    iteration: int = 0
    consumed_samples: int = 0
    transport: Any = None

    def weights_replaced(self) -> None:
        """The model's weights were loaded without the optimizer state that belongs to them:
        refresh the optimizer's fp32 masters and the synchroniser's snapshot from the weights."""
        self.optimizer.reload_model_params()
        self.sync.weights_changed()


@dataclass(frozen=True)
class Restored:
    """What a load restored; the owner of the run's position applies it.

    Attributes:
        iteration: the iteration the run continues from (None: unchanged).
        consumed_samples: the data position in samples (None: unchanged).
        description: what was loaded, for the log.
    """

    iteration: Optional[int]
    consumed_samples: Optional[int]
    description: str


@dataclass(frozen=True)
class RunShape:
    """The fixed facts of a built run that a checkpoint records beside its state.

    Attributes:
        args: the parsed flags (:class:`~megatron_ppu.training.arguments.TrainArgs`).
        data_parallel_size: Megatron's data-parallel size (all replicas' inner-DP ranks).
        padded_vocab_size: the vocabulary size after Megatron's padding.
        ffn_hidden_size: the MLP width the model was built with.
        global_batch_size: samples per iteration.
        flops_per_iteration: the model's FLOPs per iteration (Megatron-LM's dense-GPT formula).
        run_info: what a checkpoint must match to be resumed (layout, plan, model, DiLoCo fragments).
    """

    args: "TrainArgs"
    data_parallel_size: int
    padded_vocab_size: int
    ffn_hidden_size: int
    global_batch_size: int
    flops_per_iteration: float
    run_info: dict


def rng_state() -> dict:
    """Every RNG state of this rank (Python, NumPy, torch, CUDA, Megatron's tracker)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
