"""One fragment of the outer loop (all parameters when F = 1) and its parts: the fragment plan and
the schedule rule (:func:`syncs_after`), the outer optimizer over the host snapshot θ(t), and
:class:`Fragment` (Δ_k, the reduction over the replicas through a
:class:`~megatron_ppu.sync.replicas.ReplicaTransport`, division by the live counts m, the outer step,
the write-back). The orchestrator that decides when is :class:`megatron_ppu.sync.diloco.DiLoCoSync`;
the algorithm is described in :mod:`megatron_ppu.sync.diloco`'s docstring.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..config import DiLoCoConfig, fragment_offsets
from ..ownership import layer_index
from . import compress
from .counts import Divisor, OwnerCounts
from .handles import ParamHandle
from .replicas import ReplicaTransport


def syncs_after(step: int, offset: int, local_steps: int) -> bool:
    """The schedule rule, the one place it is written: a fragment with schedule offset ``offset``
    syncs after inner step ``step`` (1-based) when ``step mod H == offset``."""
    return step > 0 and step % local_steps == offset


@dataclass
class FragmentPlan:
    """Which parameter (full-layout name) belongs to which fragment, and when each syncs."""

    local_steps: int
    fragments: List[List[str]]

    @property
    def num_fragments(self) -> int:
        return len(self.fragments)

    def offset(self, f: int) -> int:
        """The inner step (mod H) after which fragment ``f`` syncs (:func:`megatron_ppu.config.fragment_offsets`)."""
        return fragment_offsets(self.num_fragments, self.local_steps)[f]

    def due(self, step: int) -> List[int]:
        """Fragments that sync after inner step ``step`` (1-based)."""
        return [f for f in range(self.num_fragments) if syncs_after(step, self.offset(f), self.local_steps)]


def build_fragment_plan(param_names: Sequence[str], num_fragments: int, local_steps: int) -> FragmentPlan:
    """Group parameters into ``num_fragments`` fragments (see :class:`DiLoCoConfig`).

    Transformer layers are recognised by ``decoder.layers.<i>.`` in the name (local
    layer index on this pipeline stage). Raises ``ValueError`` if the stage has too
    few layers for the requested number of fragments.
    """
    if num_fragments == 1:
        return FragmentPlan(local_steps, [list(param_names)])
    layer_of = {}
    others = []
    for n in param_names:
        i = layer_index(n)
        if i is not None:
            layer_of[n] = i
        else:
            others.append(n)
    layers = sorted(set(layer_of.values()))
    groups = num_fragments - (1 if others else 0)
    if groups < 1 or groups > len(layers):
        raise ValueError(
            f"--diloco-streaming-fragments {num_fragments} does not fit this pipeline stage: it "
            f"holds {len(layers)} transformer layers{' plus embeddings/output parameters' if others else ''}, "
            f"so at most {len(layers) + (1 if others else 0)} fragments are possible. Use fewer fragments."
        )
    # Consecutive layers, sizes as even as possible (earlier groups take the remainder).
    base, extra = divmod(len(layers), groups)
    group_of_layer, start = {}, 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        for layer in layers[start:start + size]:
            group_of_layer[layer] = g
        start += size
    fragments: List[List[str]] = ([others] if others else []) + [[] for _ in range(groups)]
    shift = 1 if others else 0
    for n in param_names:
        if n in layer_of:
            fragments[shift + group_of_layer[layer_of[n]]].append(n)
    return FragmentPlan(local_steps, fragments)


class OuterOptimizer:
    """Outer Nesterov SGD over a host copy θ(t) of one fragment (torch.optim.SGD semantics:
    the momentum buffer starts at the first pseudo-gradient)."""

    def __init__(self, snapshot: List[torch.Tensor], cfg: DiLoCoConfig):
        self.snapshot = [torch.nn.Parameter(t, requires_grad=False) for t in snapshot]
        self.sgd = torch.optim.SGD(self.snapshot, lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                                   nesterov=cfg.nesterov)

    def step(self, averaged_deltas: List[torch.Tensor], unowned: Optional[List[Optional[torch.Tensor]]] = None) -> None:
        """θ(t+1) = SGD step from θ(t) with pseudo-gradient g = −Δ. ``unowned`` (per parameter, a
        bool mask or None): elements no live replica owns; they keep θ(t) and their momentum
        buffer as they were (a buffer that did not exist yet is 0 there, which is what torch's
        first step, buffer = g, gives at their first owned sync all the same)."""
        for p, d in zip(self.snapshot, averaged_deltas):
            p.grad = -d.to(p.dtype)
        kept = []
        for p, u in zip(self.snapshot, unowned or []):
            if u is not None:
                buf = self.sgd.state.get(p, {}).get("momentum_buffer")
                kept.append((p, u, p.data[u].clone(), None if buf is None else buf[u].clone()))
        self.sgd.step()
        for p, u, value, buf in kept:
            p.data[u] = value
            now = self.sgd.state[p].get("momentum_buffer")
            if now is not None:
                now[u] = buf if buf is not None else 0.0
        for p in self.snapshot:
            p.grad = None

    def state_bytes(self) -> int:
        """Host bytes held by the snapshot and the momentum."""
        total = 0
        for p in self.snapshot:
            total += p.numel() * p.element_size()
            buf = self.sgd.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                total += buf.numel() * buf.element_size()
        return total


@dataclass
class Channels:
    """The collectives of a fragment's reduction, shared by every fragment of a rank: the
    ``transport`` across replicas (slow links), the replica's ``inner_group`` (fast links, None
    with one DP rank per replica), the payload (``kind``: fp32 / bf16 all-reduce, int8 / fp8
    quantized with ``block``) and whether Δ comes ``sharded`` (distributed optimizer). With τ > 0
    a second instance (:meth:`over`) holds the background thread's channels."""

    transport: ReplicaTransport
    inner_group: Any
    sharded: bool
    kind: str = "fp32"
    block: int = compress.DEFAULT_BLOCK

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.kind == "bf16" else torch.float32

    @property
    def quantized(self) -> bool:
        return self.kind in compress.QUANTIZED_KINDS

    def over(self, transport: ReplicaTransport, inner_group) -> "Channels":
        """The same settings over other channels (the background thread's)."""
        return dataclasses.replace(self, transport=transport, inner_group=inner_group)


@dataclass
class Reduction:
    """A finished reduction of one fragment: Σ_k Δ_k / m per parameter (``averaged``; None: not
    finite on some rank, the outer step is skipped), the elements no live slot owns
    (``unowned``, None: none), the live slots, and what this rank sent for it."""

    averaged: Optional[List[torch.Tensor]]
    payload_bytes: int
    bytes_handed: int
    live: Sequence[int] = ()
    unowned: Optional[List[Optional[torch.Tensor]]] = None
    duration_s: float = 0.0  # on the background thread, from its start to the result

    def finite_here(self) -> bool:
        """Whether the averaged Δ is finite on this rank (no collective)."""
        return all(bool(torch.isfinite(t).all()) for t in self.averaged)


class Fragment:
    """One fragment of the model (all parameters when F = 1), the unit of an outer sync: it
    owns its parameter handles, its snapshot θ(t) and outer optimizer (:class:`OuterOptimizer`),
    its schedule offset, its state (the inner step of its last sync) and, with error feedback,
    this rank's quantization residual. A sync is :meth:`prepare` (Δ_k), :meth:`reduce` (over the
    replicas, divided by the live counts m), then :meth:`apply` (or, delayed, the outer step and
    :meth:`merge`)."""

    def __init__(self, index: int, names: List[str], handles: Dict[str, ParamHandle], offset: int,
                 local_steps: int, config: DiLoCoConfig, comm: Channels, counts: OwnerCounts):
        self.index, self.names, self.offset, self.local_steps = index, list(names), offset, local_steps
        self.handles = [handles[n] for n in self.names]
        self.comm, self.counts = comm, counts
        self.last_sync = 0  # inner step of this fragment's last sync
        self.last_payload = 0  # bytes this rank sent into the last cross-replica all-reduce
        self.last_handed = 0  # bytes this rank handed to the cross-replica collectives at the last sync
        pin = torch.cuda.is_available()
        snaps = []
        for h in self.handles:
            t = h.read()
            snaps.append(t.pin_memory() if pin else t)
        self.outer = OuterOptimizer(snaps, config)
        # Error feedback: what this rank's quantized sends have not delivered yet, one row per share of
        # the payload (row i: inner-DP rank i's share; one row without a shared payload). Kept on the
        # collective's device (host under gloo on CPU, the GPU under NCCL) and identical on a replica's
        # inner-DP ranks (the rows are all-gathered after every sync), so it is replica state.
        self.residual: Optional[torch.Tensor] = None
        if config.error_feedback and comm.transport.num_slots > 1 and comm.quantized:
            n = sum(s.numel() for s in snaps)
            parts = dist.get_world_size(comm.inner_group) if comm.inner_group is not None else 1
            self.residual = torch.zeros((parts, -(-n // parts)), dtype=torch.float32, device=self.device)

    @property
    def device(self) -> torch.device:
        """The device of the collectives' buffers (the model's)."""
        return self.handles[0].parts[0].device if self.handles else torch.device("cpu")

    @property
    def snapshot(self) -> List[torch.nn.Parameter]:
        return self.outer.snapshot

    def due(self, step: int) -> bool:
        """Whether this fragment syncs after inner step ``step`` (1-based)."""
        return syncs_after(step, self.offset, self.local_steps)

    def prepare(self) -> List[torch.Tensor]:
        """This rank's Δ_k = θ_k − θ(t) (fp32, host, full layout) on its replica's owned set,
        exactly 0 elsewhere (with the distributed optimizer: on this rank's shard of it; see the
        module docstring). New tensors: later inner steps do not change them."""
        return [h.delta(snap.data, self.comm.sharded) for h, snap in zip(self.handles, self.snapshot)]

    def reduce(self, deltas: List[torch.Tensor], c: Channels, live: Sequence[int]) -> Reduction:
        """Σ_k Δ_k over the live replicas ``live`` (what the caller's ``begin_sync`` returned on the
        training thread; here one ``sum_`` over ``c.transport``), then divided elementwise by the live
        counts m (:mod:`megatron_ppu.sync.counts`). No agreement here (the caller asks
        ``c.transport.agree``), no counters touched (the background thread calls it with its own
        channels). With several inner-DP ranks each reduces its 1/inner_dp share across replicas
        and the shares are all-gathered over ``c.inner_group``."""
        live = tuple(live)
        flat = torch.cat([d.reshape(-1) for d in deltas]).to(c.dtype)
        payload, handed = flat.numel() * flat.element_size(), 0
        buf = flat.to(self.device)
        if c.sharded and c.inner_group is not None:
            # Distributed optimizer: each inner-DP rank filled only its shard (disjoint ranges);
            # their sum inside the replica (fast links) is the replica's Δ_k, exactly (x + 0 = x).
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=c.inner_group)
        if c.transport.num_slots > 1:
            if c.inner_group is None:
                handed = c.transport.sum_(buf, kind=c.kind, block=c.block,
                                          residual=self.residual[0] if self.residual is not None else None)
                payload = handed if c.quantized else payload
            else:
                n, parts = buf.numel(), dist.get_world_size(c.inner_group)
                me = dist.get_rank(c.inner_group)
                padded = torch.nn.functional.pad(buf, (0, (-n) % parts)).view(parts, -1)
                mine = padded[me].clone()
                handed = c.transport.sum_(mine, kind=c.kind, block=c.block,
                                          residual=self.residual[me] if self.residual is not None else None)
                payload = handed if c.quantized else mine.numel() * mine.element_size()
                gathered = [torch.empty_like(mine) for _ in range(parts)]
                dist.all_gather(gathered, mine, group=c.inner_group)
                buf = torch.cat(gathered)[:n]
                if self.residual is not None:  # keep every inner-DP rank's copy of all rows the same
                    rows = [torch.empty_like(self.residual[me]) for _ in range(parts)]
                    dist.all_gather(rows, self.residual[me].clone(), group=c.inner_group)
                    self.residual.copy_(torch.stack(rows))
        flat = buf.to("cpu", torch.float32)
        divisors = self.counts.divisors(live, self.names)
        out, unowned, off = [], [], 0
        for name, d in zip(self.names, deltas):
            k = d.numel()
            div: Divisor = divisors[name]
            out.append(div.apply(flat[off:off + k].view_as(d)))
            unowned.append(div.unowned)
            off += k
        return Reduction(out, payload, handed, live, unowned if any(u is not None for u in unowned) else None)

    def apply(self, averaged: Optional[List[torch.Tensor]], unowned=None) -> None:
        """The outer step from θ(t) with the averaged Δ (None: skipped, θ(t) kept; ``unowned``: see
        :meth:`OuterOptimizer.step`), then θ into the model and the inner optimizer's fp32 masters."""
        if averaged is not None:
            self.outer.step(averaged, unowned)
        self.restore()

    def restore(self) -> None:
        """Write the snapshot θ into the model (and the fp32 masters)."""
        for h, snap in zip(self.handles, self.snapshot):
            h.write(snap.data)

    def merge(self, alpha: float, inner_group=None) -> None:
        """After a delayed outer step (the snapshot holds θ(t+1)): on the elements this replica
        trains, θ_local ← lerp(θ(t+1), θ_local, α) = (1 − α)·θ(t+1) + α·θ_local (``torch.lerp``,
        torchft's ``fragment_update_alpha``), computed in fp32 from the inner optimizer's fp32
        values and written into the fp32 masters (the model gets it rounded to its dtype);
        everything else (frozen slices, parameters this replica does not train) had no local
        progress and takes θ(t+1) exactly. α = 0 is :meth:`restore`. With the distributed
        optimizer each inner-DP rank holds the fp32 values of its shard only: the ranks' merged
        shards (disjoint, 0 elsewhere) are summed over ``inner_group`` (fast links) so that every
        rank writes the same full values. Collective over ``inner_group`` in that case only."""
        if alpha == 0.0:
            self.restore()
            return
        merged, trained = [], []
        for h, snap in zip(self.handles, self.snapshot):
            vals, mask = h.exact_local(self.comm.sharded)
            merged.append(torch.where(mask, torch.lerp(snap.data, vals, alpha), torch.zeros((), dtype=vals.dtype)))
            trained.append(h.trained_mask())
        if self.comm.sharded and inner_group is not None and self.handles:
            buf = torch.cat([m.reshape(-1) for m in merged]).to(self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=inner_group)
            flat, off = buf.to("cpu"), 0
            for i, m in enumerate(merged):
                merged[i] = flat[off:off + m.numel()].view_as(m)
                off += m.numel()
        for h, snap, m, t in zip(self.handles, self.snapshot, merged, trained):
            h.write(torch.where(t, m, snap.data))

    def locally_finite(self) -> bool:
        """Whether this rank's current values of the fragment are finite (no collective)."""
        return all(bool(torch.isfinite(h.read()).all()) for h in self.handles)

    def swap_in(self, full: Optional[List[torch.Tensor]] = None) -> List[tuple]:
        """Copy ``full`` (full-layout values, one per handle; default: the snapshot θ(t)) into the
        model's tensors (not the masters); returns what :func:`put_back` restores."""
        saved = []
        for i, h in enumerate(self.handles):
            value = self.snapshot[i].data if full is None else full[i]
            saved.append((h, [p.detach().clone() for p in h.parts]))
            values = h.split.layout.split(value, h.split.dim) if h.split is not None else (value,)
            for p, v in zip(h.parts, values):
                p.copy_(v.to(p.device, p.dtype))
        return saved

    def state_bytes(self) -> int:
        """Host bytes held by the snapshot and the outer momentum."""
        return self.outer.state_bytes()


def put_back(saved: List[tuple]) -> None:
    """Undo :meth:`Fragment.swap_in`, bit for bit."""
    for h, parts in saved:
        for p, v in zip(h.parts, parts):
            p.copy_(v)

