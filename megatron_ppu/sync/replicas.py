"""The seam between the outer loop and the other replicas.

The outer loop (``sync/diloco.py`` and its fragments) talks to the other replicas only through a
:class:`ReplicaTransport`: who takes part in this sync, a sum over them, a verdict they all agree
on. Two implementations:

* the static one (every replica in one torchrun world; sub-groups built at start-up; the live set
  is always all K slots) — today's behaviour, bit for bit;
* a fault-tolerant one (each replica its own torchrun job; torchft forms a quorum per sync and
  the live set is whoever is in it) — ``--fault-tolerance torchft``.

Where a second transport plugs in: a new subclass of :class:`ReplicaTransport` (as
``sync/torchft_replicas.py``), constructed in ``training/build.py`` and handed to
:class:`~megatron_ppu.sync.diloco.DiLoCoSync`; the fragments, the delayed reduction, the
non-finite agreement and the merge diagnostic stay as they are. Counts of the outer step follow
the live set (:mod:`megatron_ppu.sync.counts`): an element no live replica owns gets no outer step.

Who is "the other replicas" for one rank: the ranks with the same TP / PP / inner-DP coordinate in
every live replica. Collectives *inside* a replica (the inner-DP share of the payload, the
distributed optimizer's shards) are not the transport's business: they stay on the replica's own
process groups.
"""
from __future__ import annotations

import abc
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import compress


class ReplicaTransport(abc.ABC):
    """Cross-replica communication of one rank (see the module docstring).

    A sync is ``live = begin_sync()`` → one or more ``sum_`` → ``agree(ok)``. ``agree`` returns
    True only if every rank of every live replica passed True; a fault-tolerant transport also
    returns False when a member failed during the sync, so that every survivor discards it (never
    applied on some replicas only). Every call is collective over the live replicas, and every
    rank of a replica makes the same calls in the same order (the fragments' syncs, in schedule
    order).

    How the outer loop calls it (``sync/diloco.py``, ``sync/fragment.py``), one rule for every
    transport and every τ: per fragment sync ``begin_sync()`` once, **on the training thread**
    (the thread that owns the model: a fault-tolerant transport forms its quorum there and may heal,
    writing θ(t) into the model), before Δ_k is taken; then ``sum_`` once per rank (on its
    inner-DP share of the payload; not called when ``num_slots == 1``) over the live set
    ``begin_sync`` returned, then ``agree``. With τ = 0 all three run on the training thread; with
    τ > 0 (``sync/delayed.py``) ``sum_`` and ``agree`` run on the background thread on the
    :meth:`for_background` instance, after ``begin_sync`` returned and before the next one (at most
    one sync in flight). With the merge diagnostic, ``mean`` three times around the outer step,
    on the training thread after ``agree`` and before the next ``begin_sync`` (over the same live
    replicas). A sync that ``agree`` rejects is applied nowhere (θ(t) restored).
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
    def sum_(self, buf: torch.Tensor, *, kind: str = "fp32", block: int = compress.DEFAULT_BLOCK,
             residual: Optional[torch.Tensor] = None) -> int:
        """Sum ``buf`` in place over the live replicas: an all-reduce in ``buf``'s dtype (the caller
        has cast it to the fp32 / bf16 payload), or for
        ``kind`` int8 / fp8 the quantized all-to-all + all-gather of ``sync/compress.py`` (with the
        error-feedback ``residual`` row of this rank, updated in place). Returns the bytes this rank
        handed to the collectives."""

    @abc.abstractmethod
    def agree(self, ok: bool) -> bool:
        """True iff ``ok`` on every rank of every live replica (and, fault-tolerant, no member
        failed during this sync): the non-finite verdict and the commit, in one."""

    @abc.abstractmethod
    def mean(self, value: float) -> float:
        """The mean over the live replicas of ``value`` (this replica's, the same on each of its
        ranks: the merge diagnostic's probe losses)."""

    @abc.abstractmethod
    def for_background(self) -> "ReplicaTransport":
        """An instance over dedicated channels for the delayed sync's background thread (τ > 0),
        so that it never shares a process group with the training thread's collectives; it serves
        ``sum_`` and ``agree`` of the sync whose ``begin_sync`` this instance's parent ran. Static:
        collective over the world at the call (clones every group in the same order everywhere)."""

    def state_dict(self) -> dict:
        """What a replica's own checkpoint keeps of the transport (a fault-tolerant one: which
        slots contributed to each committed sync); empty for the static world."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` from the replica's own checkpoint."""

    def close(self) -> None:
        """After training: release what the transport opened itself (static: nothing; the world's
        groups are destroyed with the default group)."""


def clone_on_every_rank(group, timeout: Optional[timedelta] = None):
    """A dedicated clone (same ranks, ``backend=None``) of this rank's ``group`` (None stays None),
    for a thread of its own. Collective over the world: see :func:`clone_groups_on_every_rank`."""
    return clone_groups_on_every_rank([group], timeout)[0]


def clone_groups_on_every_rank(groups: Sequence, timeout: Optional[timedelta] = None) -> List:
    """Dedicated clones (same ranks, ``backend=None``, ``timeout``) of this rank's ``groups`` (a None
    entry stays None). Collective over the world: every rank learns every rank's groups (one
    ``all_gather_object``) and creates every distinct group of each kind, kind by kind and in
    sorted order within a kind, so ``dist.new_group`` is called identically everywhere. Returns
    Nones without an initialised process group."""
    if not dist.is_initialized():
        return [None] * len(groups)
    mine: Tuple = tuple(tuple(dist.get_process_group_ranks(g)) if g is not None else None for g in groups)
    everyone: List[Optional[tuple]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    kw = {"timeout": timeout} if timeout is not None else {}
    clones: List = [None] * len(groups)
    for kind in range(len(groups)):
        for ranks in sorted({e[kind] for e in everyone if e[kind] is not None}):
            g = dist.new_group(list(ranks), **kw)
            if ranks == mine[kind]:
                clones[kind] = g
    return clones


class StaticReplicas(ReplicaTransport):
    """Every replica in one torchrun world, every sync over all K slots (today's behaviour).

    Args:
        replica_group: the ranks with this rank's TP / PP / inner-DP coordinate in every replica
            (``ReplicaLayout.replica_group``), ordered by replica; None: one replica.
        consensus_group: the group :meth:`agree` reduces over (None: the world, so that TP / PP
            shards and inner-DP ranks agree too).
        timeout: timeout of the groups :meth:`for_background` creates (None: torch's default);
            give the run's group timeout.

    ``slot`` is this rank's index in ``replica_group`` (its replica k); ``num_slots`` its size.
    :meth:`sum_` is ``dist.all_reduce`` (fp32 / bf16) or
    :func:`megatron_ppu.sync.compress.quantized_all_reduce_` (int8 / fp8) over ``replica_group``.
    """

    def __init__(self, replica_group, consensus_group=None, *, timeout: Optional[timedelta] = None):
        self.replica_group, self.consensus_group, self.timeout = replica_group, consensus_group, timeout
        grouped = replica_group is not None and dist.is_initialized()
        self.num_slots = dist.get_world_size(replica_group) if grouped else 1
        self.slot = dist.get_rank(replica_group) if grouped else 0

    def begin_sync(self) -> Sequence[int]:
        return tuple(range(self.num_slots))

    def sum_(self, buf: torch.Tensor, *, kind: str = "fp32", block: int = compress.DEFAULT_BLOCK,
             residual: Optional[torch.Tensor] = None) -> int:
        if kind in compress.QUANTIZED_KINDS:
            return compress.quantized_all_reduce_(buf, self.replica_group, kind, block, residual)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.replica_group)
        return buf.numel() * buf.element_size()

    def agree(self, ok: bool) -> bool:
        bad = torch.tensor([0.0 if ok else 1.0])
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.consensus_group)
        return bad.item() == 0.0

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        if self.num_slots > 1:
            dist.all_reduce(t, group=self.replica_group)
        return float(t[0] / self.num_slots)

    def for_background(self) -> "StaticReplicas":
        replica, consensus = clone_groups_on_every_rank(
            [self.replica_group, self.consensus_group if self.consensus_group is not None else
             (dist.group.WORLD if dist.is_initialized() else None)], self.timeout)
        clone = StaticReplicas.__new__(StaticReplicas)
        clone.replica_group, clone.consensus_group, clone.timeout = replica, consensus, self.timeout
        clone.num_slots, clone.slot = self.num_slots, self.slot
        return clone
