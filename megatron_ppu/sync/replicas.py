"""The seam between the outer loop and the other replicas.

The outer loop (``sync/diloco.py`` and its fragments) talks to the other replicas only through a
:class:`ReplicaTransport`: who takes part in this sync, a sum over them, a verdict they all agree
on. Two implementations:

* the static one (every replica in one torchrun world; sub-groups built at start-up; the live set
  is always all K slots) — today's behaviour, bit for bit;
* a fault-tolerant one (each replica its own torchrun job; torchft forms a quorum per sync and
  the live set is whoever is in it) — ``--fault-tolerance torchft``.

Who is "the other replicas" for one rank: the ranks with the same TP / PP / inner-DP coordinate in
every live replica. Collectives *inside* a replica (the inner-DP share of the payload, the
distributed optimizer's shards) are not the transport's business: they stay on the replica's own
process groups.
"""
from __future__ import annotations

import abc
from typing import Optional, Sequence

import torch


class ReplicaTransport(abc.ABC):
    """Cross-replica communication of one rank (see the module docstring).

    A sync is ``live = begin_sync()`` → one or more ``sum_`` → ``agree(ok)``. ``agree`` returns
    True only if every rank of every live replica passed True; a fault-tolerant transport also
    returns False when a member failed during the sync, so that every survivor discards it (never
    applied on some replicas only). Every call is collective over the live replicas.
    """

    #: number of replica slots of the run (``--diloco-replicas`` K)
    num_slots: int
    #: this replica's slot, 0 <= slot < num_slots (decides its PPU slice ``slot mod N``)
    slot: int

    @abc.abstractmethod
    def begin_sync(self) -> Sequence[int]:
        """Start one cross-replica exchange; returns the sorted slots of the replicas taking part
        (static: ``range(num_slots)``). The per-element counts of the outer step are derived from
        this set and the ownership plan."""

    @abc.abstractmethod
    def sum_(self, buf: torch.Tensor, *, kind: str = "fp32", block: int = 256,
             residual: Optional[torch.Tensor] = None) -> int:
        """Sum ``buf`` in place over the live replicas: an fp32 / bf16 all-reduce, or for
        ``kind`` int8 / fp8 the quantized all-to-all + all-gather of ``sync/compress.py`` (with the
        error-feedback ``residual`` row of this rank, updated in place). Returns the bytes this rank
        handed to the collectives."""

    @abc.abstractmethod
    def agree(self, ok: bool) -> bool:
        """True iff ``ok`` on every rank of every live replica (and, fault-tolerant, no member
        failed during this sync): the non-finite verdict and the commit, in one."""

    @abc.abstractmethod
    def mean(self, value: float) -> float:
        """The mean of a scalar over the live replicas (the merge diagnostic's probe losses)."""

    @abc.abstractmethod
    def for_background(self) -> "ReplicaTransport":
        """An instance over dedicated channels for the delayed sync's background thread (τ > 0),
        so that it never shares a process group with the training thread's collectives. Static:
        collective over the world at the call (clones every group in the same order everywhere)."""
