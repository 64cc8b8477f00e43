"""The delayed outer sync (``--diloco-sync-delay`` τ > 0, ``docs/overlap.md``): a fragment's
reduction runs on a background thread while the next τ inner steps train, over channels of its own
(the transport's :meth:`~megatron_ppu.sync.replicas.ReplicaTransport.for_background` instance and
a clone of the replica's inner-DP group), so that it never shares a process group with the
training thread's collectives. The sync's ``begin_sync`` (who takes part; under torchft the quorum
and a heal that writes θ(t) into the model) runs on the training thread at the launch, and its live
set is handed to the background thread, which runs only ``sum_`` and ``agree``. At most one sync is
in flight (:class:`InFlight`); the orchestrator (:class:`megatron_ppu.sync.diloco.DiLoCoSync`)
launches it, waits for it and applies it.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence

import torch

from .fragment import Channels, Fragment, Reduction
from .replicas import clone_on_every_rank
from .reports import DiLoCoStats


@dataclass
class InFlight:
    """The one delayed sync in flight (τ > 0): fragment, launch step, the step after which it is
    applied, and the background reduction (``future``) or, once waited for, its ``result``."""

    fragment: int
    launched: int
    due: int
    future: Optional[Future] = None
    result: Optional[Reduction] = None


class DelayedReduction:
    """The background thread of the delayed sync and the record of the sync in flight.

    The constructor is collective over the world: ``channels.transport.for_background()`` (static:
    clones of the replica and consensus groups), then a clone of ``channels.inner_group``, in that
    order on every rank. ``device``: the collectives' device; on CUDA the reduction gets its own
    stream, ordered after the training stream's work at the launch.
    """

    def __init__(self, channels: Channels, timeout: Optional[timedelta] = None):
        transport = channels.transport.for_background()
        self.channels = channels.over(transport, clone_on_every_rank(channels.inner_group, timeout))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-outer-sync")
        self.stream = None
        self.in_flight: Optional[InFlight] = None

    def use_device(self, device: torch.device) -> None:
        """The collectives' device (the model's): on CUDA the reduction's own stream."""
        if device.type == "cuda" and self.stream is None:
            self.stream = torch.cuda.Stream(device=device)

    def launch(self, frag: Fragment, deltas: List[torch.Tensor], live: Sequence[int], launched: int,
               due: int) -> None:
        """Start the reduction of ``deltas`` (``frag``'s Δ_k) over the ``live`` slots (the training
        thread's ``begin_sync`` for this sync) on the background thread; returns at once."""
        assert self.in_flight is None, (
            f"fragment {frag.index} launched at step {launched} while fragment {self.in_flight.fragment}'s sync is "
            "in flight; validate_diloco_config refuses --diloco-sync-delay >= the gap between two fragment syncs")
        main = torch.cuda.current_stream(self.stream.device) if self.stream is not None else None
        future = self.executor.submit(self._reduce, frag, deltas, tuple(live), main)
        self.in_flight = InFlight(fragment=frag.index, launched=launched, due=due, future=future)

    def _reduce(self, frag: Fragment, deltas: List[torch.Tensor], live: Sequence[int], main_stream) -> Reduction:
        """The worker thread's part (no state of the main thread is touched except
        ``frag.residual``, which only the reduction uses): the reduction and the finite agreement
        over the background channels. On CUDA: its own stream; the results are host tensors."""
        c, t0 = self.channels, time.perf_counter()
        if self.stream is None:
            red = frag.reduce(deltas, c, live)
            finite = c.transport.agree(red.finite_here())
        else:
            with torch.cuda.device(self.stream.device), torch.cuda.stream(self.stream):
                self.stream.wait_stream(main_stream)
                red = frag.reduce(deltas, c, live)
                finite = c.transport.agree(red.finite_here())
            self.stream.synchronize()
        if not finite:
            red.averaged = None
        red.duration_s = time.perf_counter() - t0
        return red

    def wait(self, totals: DiLoCoStats) -> Optional[InFlight]:
        """Block until the reduction in flight (if any) has its result; no collective on this thread.
        Adds the wait and the reduction's duration to ``totals``."""
        p = self.in_flight
        if p is not None and p.result is None:
            t0 = time.perf_counter()
            p.result = p.future.result()
            totals.comm_wait_s += time.perf_counter() - t0
            totals.comm_background_s += p.result.duration_s
            p.future = None
            if self.stream is not None:
                torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return p

    def take(self, totals: DiLoCoStats) -> InFlight:
        """The sync in flight, waited for (:meth:`wait`), and no longer in flight."""
        p = self.wait(totals)
        self.in_flight = None
        return p

    def restore(self, record: dict) -> None:
        """A sync in flight from a checkpoint (:meth:`record`), its result already reduced."""
        assert self.in_flight is None, "load_state_dict while an outer sync is in flight"
        self.in_flight = InFlight(
            fragment=int(record["fragment"]), launched=int(record["launched"]), due=int(record["due"]),
            result=Reduction(None if record["averaged"] is None else [a.clone() for a in record["averaged"]],
                             int(record["payload_bytes"]), int(record["bytes_handed"]),
                             live=tuple(record.get("live", ())),
                             unowned=record.get("unowned")))

    def record(self, totals: DiLoCoStats) -> Optional[dict]:
        """The sync in flight for a checkpoint (waited for here, not applied); None: none. The live
        slots and unowned masks only where some element had no live owner."""
        p = self.wait(totals)
        if p is None:
            return None
        r = p.result
        out = {"fragment": p.fragment, "launched": p.launched, "due": p.due,
               "averaged": None if r.averaged is None else [a.clone() for a in r.averaged],
               "payload_bytes": r.payload_bytes, "bytes_handed": r.bytes_handed}
        if r.unowned is not None:
            out.update(live=list(r.live), unowned=r.unowned)
        return out
