"""The merge diagnostic (``--diloco-merge-diagnostic``): at every fragment sync the probe batch's
loss of the replicas' local models, of the plain merge θ(t) + Δ̄ and after the outer step
(:class:`~megatron_ppu.sync.reports.MergeDiagnostic`), each the mean over the live replicas, taken
through the transport (:meth:`~megatron_ppu.sync.replicas.ReplicaTransport.mean`)."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from .fragment import Fragment, put_back
from .replicas import ReplicaTransport
from .reports import MergeDiagnostic, SyncReport


class MergeProbe:
    """``probe()`` scores the model's current weights on a fixed probe batch: this replica's loss,
    the same on every rank of the replica (collective inside the replica, no gradients);
    ``on_report(report)`` receives each sync's report with ``report.merge`` filled in."""

    def __init__(self, probe: Callable[[], float], on_report: Callable[[SyncReport], None],
                 transport: ReplicaTransport):
        self.probe, self.on_report, self.transport = probe, on_report, transport

    def score(self) -> float:
        """The probe loss of the current weights, mean over the live replicas."""
        return self.transport.mean(self.probe())

    def before(self, frag: Fragment, averaged: Optional[List[torch.Tensor]]) -> Tuple[Optional[float], Optional[float]]:
        """Before the outer step: the score of the local models, then of the plain merge
        θ(t) + Δ̄ of ``frag`` (the others keep their local values); (None, None) at a skip."""
        if averaged is None:
            return None, None
        local = self.score()
        with torch.no_grad():
            saved = frag.swap_in([s.data + a for s, a in zip(frag.snapshot, averaged)])
        try:
            plain = self.score()
        finally:
            with torch.no_grad():
                put_back(saved)
        return local, plain

    def after(self, report: SyncReport, local: Optional[float], plain: Optional[float]) -> None:
        """After the outer step: the score of the synchronised weights, into ``report.merge``."""
        if local is None:
            return
        report.merge = MergeDiagnostic(local=local, plain_merge=plain, outer_step=self.score())
        self.on_report(report)
