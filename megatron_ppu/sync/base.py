"""The synchroniser interface: what the training loop asks of a synchronisation method.

A :class:`Synchroniser` is built once per run (``megatron_ppu.training.build``) and the
:class:`~megatron_ppu.training.loop.Trainer` calls its hooks at fixed points of every
iteration; the loop never asks which method runs. One iteration::

    forward-backward (Megatron's schedule; DDP reduces gradients inside the replica)
    sync.after_backward()          # SDP: average gradients over each parameter's holders
    optimizer.step()               # (clips by sync.wrap_optimizer's norm, see SDP)
    sync.after_optimizer_step()    # SDP: refresh non-holders; DiLoCo: the fragments that are due

and around it: ``sync.finish()`` at the end of training (DiLoCo: final sync of partial rounds),
``with sync.evaluation_weights():`` around evaluation (DiLoCo: the global model),
``sync.before_save()`` before a checkpoint, ``state_dict()`` / ``load_state_dict()`` for the
checkpoint's replica state, ``stats()`` for the log (bytes sent, by kind), ``describe()`` for
the start-up line and ``run_info()`` for what a checkpoint must match.

Implementations: :class:`megatron_ppu.sync.ddp.DDPSync` (plain data parallel, nothing beyond
Megatron's DDP), :class:`megatron_ppu.sync.diloco.DiLoCoSync` (DiLoCo / Streaming DiLoCo, PPU)
and :class:`megatron_ppu.sync.sdp.SDPSync` (per-step subnetwork data parallelism).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Dict, Optional

import torch


class Synchroniser:
    """Base class with the hooks' defaults (every hook a no-op): a subclass overrides the
    hooks its method needs. Hooks that communicate are collective over every rank: the
    trainer calls each on every rank at the same point."""

    #: what evaluation scores, for the log: "local" (this replica's weights) or "global"
    evaluated_model: str = "local"

    def wrap_optimizer(self, optimizer):
        """The inner optimizer the trainer steps (called once at build time): the given one,
        or one that measures the gradient norm for clipping differently (SDP)."""
        return optimizer

    def after_backward(self) -> None:
        """After the forward-backward pass and Megatron's gradient reduction, before the
        optimizer step."""

    def after_optimizer_step(self) -> None:
        """After the inner optimizer step (and the learning-rate scheduler's)."""

    def finish(self) -> None:
        """At the end of training, before the final evaluation and checkpoint."""

    def close(self) -> None:
        """After training (the last checkpoint written): release threads and connections of its own
        (a process group alive at interpreter teardown can abort the exiting process)."""

    def evaluation_weights(self) -> ContextManager[None]:
        """Context in which the model holds the weights evaluation scores."""
        return contextlib.nullcontext()

    def attach_merge_probe(self, probe: Callable[[], float], on_report: Callable) -> None:
        """``--diloco-merge-diagnostic`` (validated at parse time: only with the DiLoCo outer loop,
        :meth:`megatron_ppu.sync.diloco.DiLoCoSync.attach_merge_probe`)."""
        raise AssertionError(f"{type(self).__name__} has no outer merge to diagnose")

    def before_save(self) -> None:
        """Before a checkpoint is written (bring every stored weight up to date)."""

    def weights_changed(self) -> None:
        """The model's weights were replaced from outside (``--finetune``)."""

    def state_dict(self) -> Optional[dict]:
        """State a checkpoint keeps (identical on a replica's inner-DP ranks); None: none."""
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore :meth:`state_dict`."""

    def stats(self) -> Dict[str, float]:
        """Counters since the start of the run (per rank): syncs, bytes sent by kind, every
        key of a byte count ending in ``_bytes_sent`` (``outer_bytes_sent``: outer syncs only), and
        ``comm_wait_s``: seconds the training thread waited for this method's communication across
        replicas (DDP: Megatron's gradient all-reduce; DiLoCo: the outer reductions)."""
        return {}

    def outer_state_bytes(self) -> int:
        """Bytes of the state this method keeps beyond the inner training state (DiLoCo: the host
        snapshot and outer momentum); 0 for methods without an outer loop."""
        return 0

    def describe(self) -> str:
        """One phrase for the start-up log line."""
        raise NotImplementedError

    def run_info(self) -> dict:
        """What a checkpoint written under this synchroniser must match to be resumed."""
        return {"diloco_fragments": 0}


class TimedCall:
    """``fn`` with the wall-clock seconds of its calls added up in ``seconds`` (CUDA-synchronised
    on a GPU, so that asynchronous kernels are counted): the gradient all-reduce that Megatron's
    schedule calls at the end of every backward (``finalize_model_grads``), timed for
    ``comm_wait_s``; ``calls`` counts the calls (DDP's gradient reductions, for its bytes sent)."""

    def __init__(self, fn: Callable):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
