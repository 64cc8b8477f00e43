"""What the outer loop reports: one fragment sync (:class:`SyncReport`), its merge diagnostic
(:class:`MergeDiagnostic`) and the counters since the start of the run (:class:`DiLoCoStats`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class SyncReport:
    """What one fragment sync did (for logs and benchmarks). With a delayed sync (τ > 0) the report
    is made when the outer step is applied (``applied_step``); ``step`` is the inner step of Δ."""

    step: int  # inner step after which Δ was computed (the launch, with τ > 0)
    fragment: int
    payload_bytes: int  # bytes this rank contributed to the cross-replica reduction (its buffer / share)
    ring_bytes_sent: int  # bytes on the wire per rank: 2 (K-1)/K x bytes_handed (ring / all-to-all + gather)
    skipped: bool = False
    restored_fragments: List[int] = field(default_factory=list)  # at a skip: other fragments restored here
    reset_states: int = 0  # at a skip: inner optimizer states reset on this rank
    bytes_handed: int = 0  # bytes this rank handed to the cross-replica collectives (payload + scales); 0 if K = 1
    applied_step: int = 0  # inner step after which the outer step was applied (= step when τ = 0)
    merge: Optional["MergeDiagnostic"] = None  # --diloco-merge-diagnostic: the probe losses of this sync
    live: List[int] = field(default_factory=list)  # the slots that took part (transport's begin_sync)


@dataclass
class SyncObservation:
    """One fragment sync as seen by an observer of the outer loop
    (:meth:`megatron_ppu.sync.diloco.DiLoCoSync.add_sync_observer`): host copies (fp32, Megatron's
    full layout, one tensor per parameter of ``names``, in the fragment's order) of this rank's values.

    ``local``: the replica's local values Δ_k was computed from (Δ_k = local − ``theta_before`` on
    its owned set; None for a delayed sync, τ > 0, whose launch values are not kept); ``theta_before``
    / ``theta_after``: the snapshot θ(t) before and after the sync (equal when it was skipped or not
    committed, unless this replica healed from a live peer in it); ``momentum_before`` / ``momentum_after``: the outer optimizer's momentum buffers (None
    per parameter before its first outer step). ``report.live``: the slots that took part;
    ``report.skipped``: the outer step was not applied (non-finite Δ, or not committed by torchft)."""

    report: SyncReport
    names: List[str]
    local: Optional[List[torch.Tensor]]
    theta_before: List[torch.Tensor]
    theta_after: List[torch.Tensor]
    momentum_before: List[Optional[torch.Tensor]]
    momentum_after: List[Optional[torch.Tensor]]

    @property
    def committed(self) -> bool:
        """Whether the outer step was applied (on this rank; the same on every rank of every live replica)."""
        return not self.report.skipped


@dataclass
class MergeDiagnostic:
    """The merge diagnostic of one fragment sync (``--diloco-merge-diagnostic``): the probe batch's
    loss on the replicas' local models (mean over replicas), on the plain merge θ(t) + Δ̄ (this
    fragment; the others keep their local values) and after the outer step θ(t+1) (with τ > 0:
    after the merge into the local parameters). ``gain`` = local − outer step: positive when
    the synchronised model is better than the average replica."""

    local: float
    plain_merge: float
    outer_step: float

    @property
    def gain(self) -> float:
        return self.local - self.outer_step


@dataclass
class DiLoCoStats:
    """The outer loop's counters since the start of the run (this rank's; see ``DiLoCoSync.stats``)."""

    syncs: int = 0
    skipped: int = 0
    payload_bytes: int = 0
    ring_bytes_sent: int = 0
    bytes_handed: int = 0
    comm_wait_s: float = 0.0  # seconds the training thread waited for the cross-replica reductions
    # τ > 0: seconds the background reductions took, launch to result (what the τ steps must cover)
    comm_background_s: float = 0.0
    last: Optional[SyncReport] = None

    def count(self, report: "SyncReport") -> None:
        """Add one sync's report to the counters."""
        self.syncs += 1
        self.payload_bytes += report.payload_bytes
        self.bytes_handed += report.bytes_handed
        self.ring_bytes_sent += report.ring_bytes_sent
        self.last = report
