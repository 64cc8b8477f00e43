"""Reading and writing one parameter of the outer loop in Megatron's full layout
(:class:`ParamHandle`), whatever the model's storage (whole, or split into owned / frozen parts)
and wherever the inner optimizer keeps its fp32 values (master copies, distributed-optimizer
shards: :class:`megatron_ppu.optimizer.InnerOptimizerView` finds them)."""
from __future__ import annotations

from typing import Dict

import torch

from ..ownership import ParamTensors


class ParamHandle:
    """Reads/writes one full-layout parameter, whether the model stores it whole or
    split into owned/frozen parts, and keeps the optimizer's fp32 master copy in step.

    ``trained`` (per part) says whether this replica trains the part (from the ownership
    plan): the owned part of a sliced weight, an unsliced parameter with a non-empty owned
    set. Only trained parts have fp32 values in the inner optimizer: ``masters`` (whole
    fp32 masters, Megatron's ``Float16OptimizerWithFloat16Params``) or ``shards``
    (``(fp32 tensor, start, end)`` of this rank's range of the flattened part, Megatron's
    ``DistributedOptimizer``; None where another inner-DP rank holds the part)."""

    def __init__(self, held: ParamTensors, ownership, masters: Dict[int, torch.Tensor], shards: Dict[int, tuple]):
        self.name = held.name
        self.split = held.split
        self.parts = held.parts  # [owned, frozen] of a split tensor, else [the parameter]
        if self.split is not None:
            assert tuple(ownership.owned) == tuple(self.split.layout.owned), (held.name, ownership.owned)
            self.trained = [True, False]
        else:
            self.trained = [bool(ownership.owned)]
        name = held.name
        for p, t in zip(self.parts, self.trained):
            assert t == p.requires_grad, f"{name}: the ownership plan and requires_grad disagree"
        self.masters = [masters.get(id(p)) for p in self.parts]
        self.shards = [shards.get(id(p)) for p in self.parts]

    def _value_parts(self):
        return [m if m is not None else p for p, m in zip(self.parts, self.masters)]

    def _assemble(self, parts):
        return self.split.layout.assemble(parts[0], parts[1], self.split.dim) if self.split else parts[0]

    def read(self) -> torch.Tensor:
        """Current value (fp32, host) in full layout; from fp32 masters (and this rank's
        distributed-optimizer shards) where they exist, else from the model."""
        vals = []
        for v, sh in zip(self._value_parts(), self.shards):
            v = v.detach().float().to("cpu", copy=True)
            if sh is not None:
                t, a, b = sh
                v.view(-1)[a:b] = t.detach().float().cpu()
            vals.append(v)
        return self._assemble(vals)

    def delta(self, snapshot: torch.Tensor, sharded: bool) -> torch.Tensor:
        """This rank's contribution to Σ_k Δ_k (fp32, host, full layout): θ_k − θ(t) on the
        parts this replica trains, from the inner optimizer's fp32 values; exactly 0 on the
        parts it does not train. ``sharded`` (distributed optimizer): only this rank's shard
        range is filled, 0 elsewhere; the inner-DP ranks' contributions sum to Δ_k."""
        snaps = self.split.layout.split(snapshot, self.split.dim) if self.split else (snapshot,)
        out = []
        for p, m, sh, trained, s in zip(self.parts, self.masters, self.shards, self.trained, snaps):
            d = torch.zeros_like(s)
            if trained and sharded:
                if sh is not None:
                    t, a, b = sh
                    d.view(-1)[a:b] = t.detach().float().cpu() - s.reshape(-1)[a:b]
            elif trained:
                v = m if m is not None else p
                d = v.detach().float().cpu() - s
            out.append(d)
        return self._assemble(out)

    def trained_mask(self) -> torch.Tensor:
        """Full-layout bool mask of the elements this replica trains (its owned set here)."""
        return self._assemble([torch.full(p.shape, t, dtype=torch.bool) for p, t in zip(self.parts, self.trained)])

    def exact_local(self, sharded: bool):
        """``(values, mask)`` in full layout (fp32, host): this rank's exact fp32 local values
        where ``mask`` is True, i.e. on the parts this replica trains (from the fp32 masters), and
        with ``sharded`` (distributed optimizer) only on this rank's shard range of them."""
        vals, masks = [], []
        for p, m, sh, trained in zip(self.parts, self.masters, self.shards, self.trained):
            v = (m if m is not None else p).detach().float().to("cpu", copy=True)
            mk = torch.zeros(p.shape, dtype=torch.bool)
            if trained and sharded:
                if sh is not None:
                    t, a, b = sh
                    v.view(-1)[a:b] = t.detach().float().cpu()
                    mk.view(-1)[a:b] = True
            elif trained:
                mk.fill_(True)
            vals.append(v)
            masks.append(mk)
        return self._assemble(vals), self._assemble(masks)

    def write(self, full: torch.Tensor) -> None:
        """Write ``full`` (fp32, full layout) into the model (rounded to its dtype), the fp32
        masters and this rank's distributed-optimizer shards."""
        if self.split is not None:
            values = self.split.layout.split(full, self.split.dim)
        else:
            values = (full,)
        with torch.no_grad():
            for p, m, sh, v in zip(self.parts, self.masters, self.shards, values):
                p.copy_(v.to(p.device, p.dtype))
                if m is not None:
                    m.copy_(v.to(m.device, m.dtype))
                if sh is not None:
                    t, a, b = sh
                    t.copy_(v.reshape(-1)[a:b].to(t.device, t.dtype))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parts)

