"""The count vector m of Algorithm 1 from the live replicas (issue 24, item 5).

At a sync the transport names the live slots (:meth:`ReplicaTransport.begin_sync`). The count of
an element is the number of live slots that own it: a sliced weight's slice s is owned by the
slots k with ``k mod N == s`` (:meth:`OwnershipPlan.owned_ranges`), an unsliced parameter by every
slot, or with the SDP blocks plan by its block's holders (``holders_fn``, :mod:`megatron_ppu.subnet`). With every slot live this is the static K/N (or K, or the
holder count) of :class:`~megatron_ppu.ownership.ParamOwnership`, bit for bit.

An element no live slot owns has count 0: it gets no outer step and no momentum update
(:class:`Divisor.unowned`, honoured by :class:`~megatron_ppu.sync.fragment.OuterOptimizer`), not a
zero pseudo-gradient (torch's SGD would decay its momentum). Owner damping
(``--diloco-owner-damping`` γ) scales by (m / K_live)^γ where m < K_live, K_live the live slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple, Union

import torch

from ..ownership import OwnershipPlan

Number = Union[int, float, torch.Tensor]


@dataclass
class Divisor:
    """How one parameter's summed Δ becomes its averaged Δ: ``sum / count * damping`` where
    ``count`` > 0; ``unowned`` (bool, full layout; None: every element has a live owner) marks the
    elements with count 0. ``count`` / ``damping`` are Python numbers when they are the same for
    every element of the parameter (the static case), else full-layout fp32 tensors."""

    count: Number
    damping: Number = 1.0
    unowned: Optional[torch.Tensor] = None

    def apply(self, summed: torch.Tensor) -> torch.Tensor:
        """Σ_k Δ_k → the averaged Δ (0 where no live slot owns the element)."""
        avg = summed / self.count
        if isinstance(self.damping, torch.Tensor) or self.damping != 1.0:
            avg = avg * self.damping
        if self.unowned is not None:
            avg = torch.where(self.unowned, torch.zeros((), dtype=avg.dtype), avg)
        return avg


class OwnerCounts:
    """Per-parameter :class:`Divisor` for a live set (cached for the last live set).

    Args:
        plan: this rank's ownership plan.
        num_slots: K.
        gamma: ``--diloco-owner-damping`` γ (0: Algorithm 1).
        holders_fn: the SDP blocks plan's ``holders(name)`` (None: every slot holds every unsliced
            parameter; then an unsliced parameter with fewer than K owners in ``plan`` can only be
            counted while every slot is live).
    """

    def __init__(self, plan: OwnershipPlan, num_slots: int, gamma: float = 0.0,
                 holders_fn: Optional[Callable[[str], FrozenSet[int]]] = None):
        self.plan, self.num_slots, self.gamma, self.holders_fn = plan, num_slots, gamma, holders_fn
        self._cache: Tuple[Optional[tuple], Dict[str, Divisor]] = (None, {})

    def _damping(self, m: int, k_live: int) -> float:
        return (m / k_live) ** self.gamma if m < k_live else 1.0

    def divisors(self, live: Sequence[int], names: Sequence[str]) -> Dict[str, Divisor]:
        """``name -> Divisor`` of ``names`` for the live slots ``live``."""
        key = tuple(sorted(live))
        if self._cache[0] != key:
            self._cache = (key, {})
        cache = self._cache[1]
        for n in names:
            if n not in cache:
                cache[n] = self._divisor(n, key)
        return {n: cache[n] for n in names}

    def _owner_slots(self, name: str, live: FrozenSet[int]) -> FrozenSet[int]:
        if self.holders_fn is not None:
            return frozenset(self.holders_fn(name)) & live
        return live

    def _divisor(self, name: str, live: tuple) -> Divisor:
        own = self.plan.params[name]
        everyone = len(live) == self.num_slots
        live_set, k_live = frozenset(live), len(live)
        if not own.sliced:
            slots = self._owner_slots(name, live_set)
            if self.holders_fn is None and own.owners != self.num_slots:
                if not everyone:
                    raise ValueError(
                        f"{name} is held by {own.owners} of {self.num_slots} replicas but the outer loop was "
                        "given no holders_fn to tell which: pass the blocks plan's holders_fn to DiLoCoSync.")
                return self._uniform(own.owners, own.shape, k_live)
            return self._uniform(len(slots), own.shape, k_live)
        n = self.plan.num_slices
        per_slice = [sum(1 for k in live_set if k % n == s) for s in range(n)]
        if len(set(per_slice)) == 1:
            return self._uniform(per_slice[0], own.shape, k_live)
        along = torch.zeros(own.shape[own.dim], dtype=torch.float32)
        damp = torch.ones(own.shape[own.dim], dtype=torch.float32)
        for s, m in enumerate(per_slice):
            for a, b in self.plan.owned_ranges(name, s):
                along[a:b] = float(m)
                damp[a:b] = self._damping(m, k_live)
        view = [1] * len(own.shape)
        view[own.dim] = own.shape[own.dim]
        count = along.view(view).expand(own.shape)
        damping = damp.view(view).expand(own.shape) if self.gamma != 0.0 else 1.0
        unowned = (count == 0) if bool((along == 0).any()) else None
        return Divisor(count=torch.where(count == 0, torch.ones(()), count), damping=damping, unowned=unowned)

    def _uniform(self, m: int, shape, k_live: int) -> Divisor:
        if m == 0:
            return Divisor(count=1, damping=1.0, unowned=torch.ones(shape, dtype=torch.bool))
        return Divisor(count=m, damping=self._damping(m, k_live))
