"""The outer loop of Algorithm 1: DiLoCo / Streaming DiLoCo with count-normalised
partial synchronisation, as a :class:`~megatron_ppu.sync.base.Synchroniser`: the
orchestrator :class:`DiLoCoSync` decides when; each :class:`Fragment` owns its parameter
handles, snapshot θ(t), outer optimizer, schedule offset and state, and does its sync
(torchft's ``DiLoCo`` / ``_StreamingDiLoCoFragment`` shape).

Per fragment f (all parameters when F = 1), on every rank:

* ``prepare``: Δ_k = θ_k − θ(t) over the fragment, in Megatron's full layout, **on the
  owned set of replica k only** (its slice of every sliced weight, every unsliced
  parameter it trains; see :class:`megatron_ppu.ownership.OwnershipPlan`), read from
  the inner optimizer's fp32 values (its master weights under bf16/fp16); exactly 0
  everywhere else. One rule for every plan: the frozen part of a sliced weight and a
  block the replica does not hold (SDP blocks plan) contribute 0, not the rounding
  error of their bf16/fp16 storage (they have no fp32 master: the model stores θ(t)
  rounded to its dtype, while the snapshot keeps θ(t) in fp32).
  With Megatron's distributed optimizer each inner-DP rank holds the fp32 master of
  only its shard; it fills Δ_k on that shard, and the inner-DP ranks' contributions
  (disjoint) are summed inside the replica (fast links) before the outer all-reduce.
* ``perform``: one all-reduce (SUM) of the flattened Δ_k over the *replica group*
  only (ranks holding the same TP/PP shard in every replica; never across TP or
  PP), then elementwise division by the count vector m (K/N for a sliced
  parameter, K otherwise; see :mod:`megatron_ppu.ownership`).
* ``apply``: the pseudo-gradient g = θ(t) − (θ(t) + Δ) = −Δ feeds
  ``torch.optim.SGD(lr, momentum, nesterov)`` whose parameters *are* the host
  snapshot θ(t); after its step the snapshot holds θ(t+1), which is written back
  into the model (frozen slices included) and into the inner optimizer's fp32
  master weights (the distributed optimizer's shard masters: each rank writes its
  shard, so no master is ever rebuilt from the rounded model weights). Every replica
  then holds the same θ(t+1).

If the reduced Δ is not finite on any rank, every rank skips the outer step for
that fragment, restores θ(t), and logs it (the decision is all-reduced, so all
replicas and all TP/PP shards agree). The inner optimizer's moments on the replica
that produced the non-finite values are non-finite too (bf16 has no overflow check),
so restoring the parameters alone would make every later round non-finite again.
Therefore, at a skip, every rank also (1) returns every *other* fragment whose local
values are non-finite to its last synchronised θ (only on that rank: healthy ranks
keep their progress) and (2) resets every inner-optimizer state entry that holds a
non-finite value (Adam's moments and step count) to that of a fresh optimizer; state
entries that are finite are kept. Keeping a copy of the state at θ(t) to restore
instead would double the optimizer memory; a fresh Adam state costs nothing and only
the poisoned parameters restart their moments.

Payload (``--diloco-allreduce-dtype``): fp32 or bf16, a plain all-reduce in that dtype; int8 or
fp8, :func:`megatron_ppu.sync.compress.quantized_all_reduce_` (per-block scales) on the same
group and the same share, optionally with error feedback (one residual per fragment per rank, in
:meth:`DiLoCoSync.state_dict`). ``SyncReport.bytes_handed`` counts what this rank handed to the
cross-replica collectives. Delayed syncs (``--diloco-sync-delay`` τ > 0, ``--diloco-merge-alpha``
α): the reduction overlaps the next τ inner steps on a background thread over dedicated groups,
then the outer step is applied and merged into the local parameters; exact semantics in
``docs/overlap.md``. τ = 0 is the synchronous sync described here.

Schedule: fragment f syncs after inner step s (s = 1, 2, ...) when
``s mod H == offset_f`` with ``offset_f = ((f + 1) * H // F) mod H``; so with F = 1
everything syncs at s = H, 2H, ...; with F > 1 the F syncs of a round are spread
evenly over its H steps and each fragment's round is H steps long (its first
one may be shorter).

End of training (:meth:`DiLoCoSync.finish`): every fragment with inner steps since its
last sync (a partial round: ``--train-iters`` not a multiple of H, or with F > 1
the fragments that are mid-round) gets one final sync, a normal sync of a shorter
round: the same count-normalised Δ and the same Nesterov outer step with the same
momentum buffer. Afterwards every replica holds the one global model, which is what
the final evaluation scores and the final checkpoint stores (Megatron-format weights
that ``--finetune`` and Megatron-LM read). The trainer calls it after the last
iteration and before an ``--exit-interval`` exit without ``--save`` (nothing can
resume that run, so it ends there). An ``--exit-interval`` exit with ``--save``, and
every mid-run checkpoint, keep the replicas' local state (mid-round progress, inner
optimizer, snapshot and momentum) so that a resumed run reproduces the uninterrupted
one exactly; a run that is stopped for good at such a checkpoint is finished by
resuming it to its ``--train-iters``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..config import DiLoCoConfig, fragment_offsets
from ..ownership import OwnershipPlan, ParamTensors, layer_index
from . import compress
from .base import Synchroniser

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------- fragments
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
        if step <= 0:
            return []
        return [f for f in range(self.num_fragments) if step % self.local_steps == self.offset(f)]


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


# ----------------------------------------------------------- parameter access
class _ParamHandle:
    """Reads/writes one full-layout parameter, whether the model stores it whole or
    split into owned/frozen parts, and keeps the optimizer's fp32 master copy in step.

    ``trained`` (per part) says whether this replica trains the part (from the ownership
    plan): the owned part of a sliced weight, an unsliced parameter with a non-empty owned
    set. Only trained parts have fp32 values in the inner optimizer: ``masters`` (whole
    fp32 masters, Megatron's ``Float16OptimizerWithFloat16Params``) or ``shards``
    (``(fp32 tensor, start, end)`` of this rank's range of the flattened part, Megatron's
    ``DistributedOptimizer``; None where another inner-DP rank holds the part)."""

    def __init__(self, held: ParamTensors, ownership, masters: Dict[int, torch.Tensor], shards: Dict[int, tuple],
                 damping: float = 1.0):
        self.name = held.name
        self.owners = ownership.owners
        self.damping = damping  # (m / K)^γ of --diloco-owner-damping; 1.0: Algorithm 1
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


def _chained(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer]) if optimizer is not None else []


def _master_map(optimizer) -> Dict[int, torch.Tensor]:
    """id(model param) -> fp32 master param, for Megatron's Float16OptimizerWithFloat16Params."""
    out: Dict[int, torch.Tensor] = {}
    for opt in _chained(optimizer):
        if hasattr(opt, "float16_groups") and hasattr(opt, "fp32_from_float16_groups"):
            for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for p16, p32 in zip(g16, g32):
                    out[id(p16)] = p32
    return out


def _is_distributed(optimizer) -> bool:
    """Whether the inner optimizer is Megatron's DistributedOptimizer (fp32 state sharded over
    the inner-DP ranks)."""
    return any(hasattr(opt, "shard_fp32_from_float16_groups") for opt in _chained(optimizer))


def _shard_map(optimizer) -> Dict[int, tuple]:
    """id(model param) -> (fp32 shard, start, end) for Megatron's DistributedOptimizer: this
    rank's fp32 master of the range [start, end) of the flattened parameter (for an fp32
    model parameter the shard is a view of the parameter itself). Parameters of which this
    rank holds no range are absent."""
    out: Dict[int, tuple] = {}
    for opt in _chained(optimizer):
        if not hasattr(opt, "shard_fp32_from_float16_groups"):
            continue
        pairs = list(zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups)) + \
            list(zip(opt.model_fp32_groups, opt.shard_fp32_groups))
        for models, shards in pairs:
            for p, shard in zip(models, shards):
                r = opt._get_model_param_range_map(p)["param"]
                assert shard is not None and shard.numel() == r.end - r.start, p.shape
                out[id(p)] = (shard, r.start, r.end)
    return out


def reset_nonfinite_optimizer_state(optimizer) -> int:
    """Reset every per-parameter state entry of the inner optimizer that holds a non-finite
    value to a fresh optimizer's (tensors zeroed, Adam's step count 0); returns how many
    parameters' states were reset. Finite state entries are kept."""
    reset = 0
    for opt in _chained(optimizer):
        inner = getattr(opt, "optimizer", opt)
        for st in inner.state.values():
            tensors = [v for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
            if all(bool(torch.isfinite(v).all()) for v in tensors):
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    v.zero_()
                elif k == "step":
                    st[k] = 0
            reset += 1
    return reset


# -------------------------------------------------------------- outer optimizer
class OuterOptimizer:
    """Outer Nesterov SGD over a host copy θ(t) of one fragment (torch.optim.SGD semantics:
    the momentum buffer starts at the first pseudo-gradient)."""

    def __init__(self, snapshot: List[torch.Tensor], cfg: DiLoCoConfig):
        self.snapshot = [torch.nn.Parameter(t, requires_grad=False) for t in snapshot]
        self.sgd = torch.optim.SGD(self.snapshot, lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                                   nesterov=cfg.nesterov)

    def step(self, averaged_deltas: List[torch.Tensor]) -> None:
        """θ(t+1) = SGD step from θ(t) with pseudo-gradient g = −Δ."""
        for p, d in zip(self.snapshot, averaged_deltas):
            p.grad = -d.to(p.dtype)
        self.sgd.step()
        for p in self.snapshot:
            p.grad = None


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
    syncs: int = 0
    skipped: int = 0
    payload_bytes: int = 0
    ring_bytes_sent: int = 0
    bytes_handed: int = 0
    comm_wait_s: float = 0.0  # seconds the training thread waited for the cross-replica reductions
    # τ > 0: seconds the background reductions took, launch to result (what the τ steps must cover)
    comm_background_s: float = 0.0
    last: Optional[SyncReport] = None


class _OuterComm:
    """The collectives of the outer sync, shared by every fragment of a rank: the replica group
    (slow links), the replica's inner-DP group (fast links, None with one DP rank per replica),
    the group the non-finite decision is agreed over (None: the world), the payload (``kind``:
    fp32 / bf16 all-reduce, int8 / fp8 :func:`compress.quantized_all_reduce_` with ``block``) and
    whether Δ comes sharded (distributed optimizer). With τ > 0 a second instance holds the
    dedicated clones of these groups that the background reduction uses."""

    def __init__(self, replica_group, inner_group, num_replicas: int, sharded: bool, kind: str = "fp32",
                 block: int = compress.DEFAULT_BLOCK, consensus_group=None):
        self.replica_group, self.inner_group = replica_group, inner_group
        self.num_replicas, self.sharded = num_replicas, sharded
        self.kind, self.block, self.consensus_group = kind, block, consensus_group
        self.dtype = torch.bfloat16 if kind == "bf16" else torch.float32

    @property
    def quantized(self) -> bool:
        return self.kind in compress.QUANTIZED_KINDS

    def with_groups(self, replica_group, inner_group, consensus_group) -> "_OuterComm":
        """The same settings over other (cloned) groups."""
        return _OuterComm(replica_group, inner_group, self.num_replicas, self.sharded, self.kind, self.block,
                          consensus_group)


def _agree_finite(tensors: Optional[List[torch.Tensor]], group) -> bool:
    """Whether ``tensors`` are finite on every rank of ``group`` (None: the world); all-reduced, so
    every rank gets the same answer."""
    bad = torch.tensor([0.0 if all(bool(torch.isfinite(t).all()) for t in tensors) else 1.0])
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bad.item() == 0.0


@dataclass
class _Reduced:
    """A finished reduction: Σ_k Δ_k / m (None: non-finite on some rank, the outer step is skipped)
    and what this rank sent for it."""

    averaged: Optional[List[torch.Tensor]]
    payload_bytes: int
    bytes_handed: int
    duration_s: float = 0.0  # on the background thread, from its start to the result


@dataclass
class _InFlight:
    """The one delayed sync in flight (τ > 0): fragment, launch step, the step after which it is
    applied, and the background reduction (``future``) or, once waited for, its ``result``."""

    fragment: int
    launched: int
    due: int
    future: Optional[Future] = None
    result: Optional[_Reduced] = None


class Fragment:
    """One fragment of the model (all parameters when F = 1), the unit of an outer sync: it
    owns its parameter handles, its snapshot θ(t) and outer optimizer (:class:`OuterOptimizer`),
    its schedule offset, its state (the inner step of its last sync) and, with error feedback,
    this rank's quantization residual. A sync is :meth:`prepare` (Δ_k), :meth:`perform` (the
    reduction, divided by m), then :meth:`apply` (or, delayed, the outer step and :meth:`merge`)."""

    def __init__(self, index: int, names: List[str], handles: Dict[str, "_ParamHandle"], offset: int,
                 local_steps: int, config: DiLoCoConfig, comm: _OuterComm):
        self.index, self.names, self.offset, self.local_steps = index, list(names), offset, local_steps
        self.handles = [handles[n] for n in self.names]
        self.comm = comm
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
        if config.error_feedback and comm.num_replicas > 1 and comm.quantized:
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
        return step > 0 and step % self.local_steps == self.offset

    def prepare(self) -> List[torch.Tensor]:
        """This rank's Δ_k = θ_k − θ(t) (fp32, host, full layout) on its replica's owned set,
        exactly 0 elsewhere (with the distributed optimizer: on this rank's shard of it; see the
        module docstring). New tensors: later inner steps do not change them."""
        return [h.delta(snap.data, self.comm.sharded) for h, snap in zip(self.handles, self.snapshot)]

    def perform(self, deltas: List[torch.Tensor]) -> List[torch.Tensor]:
        """Reduce Σ_k Δ_k over the replica group (fp32 / bf16 all-reduce, or int8 / fp8 quantized),
        then divide elementwise by m; records ``last_payload`` / ``last_handed``."""
        out, self.last_payload, self.last_handed = self.reduce(deltas, self.comm)
        return out

    def _cross_replica(self, buf: torch.Tensor, c: _OuterComm, residual: Optional[torch.Tensor]) -> int:
        """Sum ``buf`` in place over ``c.replica_group``; returns the bytes handed to the collectives."""
        if c.quantized:
            return compress.quantized_all_reduce_(buf, c.replica_group, c.kind, c.block, residual)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=c.replica_group)
        return buf.numel() * buf.element_size()

    def reduce(self, deltas: List[torch.Tensor], c: _OuterComm):
        """:meth:`perform` over the groups of ``c`` without touching this object's counters (the
        background thread calls it with the dedicated groups): ``(averaged, payload, handed)``."""
        flat = torch.cat([d.reshape(-1) for d in deltas]).to(c.dtype)
        payload, handed = flat.numel() * flat.element_size(), 0
        buf = flat.to(self.device)
        if c.sharded and c.inner_group is not None:
            # Distributed optimizer: each inner-DP rank filled only its shard (disjoint ranges);
            # their sum inside the replica (fast links) is the replica's Δ_k, exactly (x + 0 = x).
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=c.inner_group)
        if c.num_replicas > 1:
            if c.inner_group is None:
                handed = self._cross_replica(buf, c, self.residual[0] if self.residual is not None else None)
                payload = handed if c.quantized else payload
            else:
                n, parts = buf.numel(), dist.get_world_size(c.inner_group)
                me = dist.get_rank(c.inner_group)
                padded = torch.nn.functional.pad(buf, (0, (-n) % parts)).view(parts, -1)
                mine = padded[me].clone()
                handed = self._cross_replica(mine, c, self.residual[me] if self.residual is not None else None)
                payload = handed if c.quantized else mine.numel() * mine.element_size()
                gathered = [torch.empty_like(mine) for _ in range(parts)]
                dist.all_gather(gathered, mine, group=c.inner_group)
                buf = torch.cat(gathered)[:n]
                if self.residual is not None:  # keep every inner-DP rank's copy of all rows the same
                    rows = [torch.empty_like(self.residual[me]) for _ in range(parts)]
                    dist.all_gather(rows, self.residual[me].clone(), group=c.inner_group)
                    self.residual.copy_(torch.stack(rows))
        flat = buf.to("cpu", torch.float32)
        out, off = [], 0
        for h, d in zip(self.handles, deltas):
            k = d.numel()
            avg = flat[off:off + k].view_as(d) / h.owners
            out.append(avg * h.damping if h.damping != 1.0 else avg)
            off += k
        return out, payload, handed

    def apply(self, averaged: Optional[List[torch.Tensor]]) -> None:
        """The outer step from θ(t) with the averaged Δ (None: skipped, θ(t) kept), then θ into
        the model and the inner optimizer's fp32 masters."""
        if averaged is not None:
            self.outer.step(averaged)
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
        model's tensors (not the masters); returns what :func:`_put_back` restores."""
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
        total = 0
        for p in self.snapshot:
            total += p.numel() * p.element_size()
            buf = self.outer.sgd.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                total += buf.numel() * buf.element_size()
        return total


def _put_back(saved: List[tuple]) -> None:
    """Undo :meth:`Fragment.swap_in`, bit for bit."""
    for h, parts in saved:
        for p, v in zip(h.parts, parts):
            p.copy_(v)


class DiLoCoSync(Synchroniser):
    """Outer loop of Algorithm 1 for one rank: the orchestrator over the :class:`Fragment` objects;
    it decides when each fragment syncs (``after_inner_step``, :meth:`finish`), agrees on a skip
    for non-finite deltas, runs the delayed syncs (τ > 0, ``docs/overlap.md``) and keeps the counters.

    Args:
        model: the (unwrapped) model chunk this rank holds; parameters are named as
            in its ``state_dict`` (Megatron's full layout).
        plan: this rank's :class:`OwnershipPlan` (gives m per parameter).
        replica_group: process group across replicas (same TP/PP shard).
        config: outer-loop settings.
        inner_optimizer: Megatron optimizer of the inner loop, to keep its fp32 master
            weights in step with θ(t+1) (optional).
        consensus_group: group over which the skip decision for non-finite deltas is
            agreed (default: the whole world, so TP/PP shards agree too).
        inner_group: the replica's inner data-parallel group, when a replica has
            several DP ranks. Their Δ are identical (they all-reduce gradients every
            step), so each reduces only its 1/inner_dp share of the payload across
            replicas (slow links) and the shares are all-gathered inside the replica
            (fast links): slow-link traffic per rank falls by the inner-DP size.
        timeout: timeout of the dedicated process groups created when ``config.sync_delay``
            > 0 (None: torch's default); give the run's group timeout.

    With ``config.sync_delay`` τ > 0 the constructor is collective over the world: every rank
    creates, in the same order, a clone of every replica group, every inner-DP group and the
    consensus group (same ranks, ``backend=None``); the background reduction runs on those
    clones only, so it never shares a group with the main thread's collectives. With τ = 0 no
    group is created.

    The settings are validated at parse time; the one schedule error that depends on the model
    (more fragments than the stage has layers) raises ``ValueError`` here.
    Call :meth:`after_inner_step` (the loop: :meth:`after_optimizer_step`) once after every
    inner optimizer step.
    """

    def __init__(self, model: torch.nn.Module, plan: OwnershipPlan, replica_group, config: DiLoCoConfig,
                 inner_optimizer=None, consensus_group=None, inner_group=None, timeout: Optional[timedelta] = None):
        # The settings were validated once, at parse time (megatron_ppu.config.validate_diloco_config).
        assert config.enabled and config.eval_model in ("global", "local"), config
        self.config = config
        self.plan = plan
        self.model = model
        self.replica_group = replica_group
        self.consensus_group = consensus_group
        self.inner_group = inner_group if inner_group is not None and dist.get_world_size(inner_group) > 1 else None
        self.inner_optimizer = inner_optimizer
        self.evaluated_model = config.eval_model  # what evaluation scores: "global" (every θ(t)) or "local"
        self.num_replicas = dist.get_world_size(replica_group) if replica_group is not None else 1
        assert self.num_replicas == plan.num_replicas, (self.num_replicas, plan.num_replicas)
        self._in_flight: Optional[_InFlight] = None
        self._probe: Optional[Callable[[], float]] = None
        self._on_merge: Optional[Callable[[SyncReport], None]] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._stream = None
        self._async_groups = (None, None, None)
        if config.sync_delay > 0:
            self._async_groups = self._clone_groups(timeout)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-outer-sync")
        self._build_fragments()
        if config.sync_delay > 0:
            dev = self.fragments[0].device if self.fragments else torch.device("cpu")
            if dev.type == "cuda":  # the background reduction's own stream (NCCL / gloo on CUDA tensors)
                self._stream = torch.cuda.Stream(device=dev)

    def _clone_groups(self, timeout: Optional[timedelta]):
        """Dedicated clones (same ranks) of this rank's replica, inner-DP and consensus groups
        for the background reduction. Collective over the world: every rank learns every rank's
        groups (``all_gather_object``) and creates every distinct group of each kind, in sorted
        order, so ``dist.new_group`` is called identically everywhere."""
        if not dist.is_initialized():
            return (None, None, None)
        mine = (tuple(dist.get_process_group_ranks(self.replica_group)) if self.replica_group is not None else None,
                tuple(dist.get_process_group_ranks(self.inner_group)) if self.inner_group is not None else None,
                tuple(dist.get_process_group_ranks(self.consensus_group if self.consensus_group is not None
                                                   else dist.group.WORLD)))
        everyone: List[Optional[tuple]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        kw = {"timeout": timeout} if timeout is not None else {}
        clones: List = [None, None, None]
        for kind in range(3):
            for ranks in sorted({e[kind] for e in everyone if e[kind] is not None}):
                g = dist.new_group(list(ranks), **kw)
                if ranks == mine[kind]:
                    clones[kind] = g
        return tuple(clones)

    def _build_fragments(self) -> None:
        """Handles, fragments (snapshots from the current weights, fresh outer optimizers) and
        counters; at construction and after the weights were replaced from outside."""
        assert self._in_flight is None, "the weights were replaced while an outer sync was in flight"
        masters = _master_map(self.inner_optimizer)
        self.sharded = _is_distributed(self.inner_optimizer)
        shards = _shard_map(self.inner_optimizer) if self.sharded else {}
        self.handles: Dict[str, _ParamHandle] = {}
        for name, own in self.plan.params.items():
            if own.owners == 0:
                continue  # not trained by anyone: never changes
            damping = (own.owners / self.num_replicas) ** self.config.owner_damping if own.owners < self.num_replicas \
                else 1.0
            h = _ParamHandle(self.plan.tensors(name), own, masters, shards, damping)
            for p, m, trained in zip(h.parts, h.masters, h.trained):
                if trained and not self.sharded and m is None and p.dtype != torch.float32:
                    raise ValueError(
                        f"DiLoCo: {name} is trained in {p.dtype} but the inner optimizer holds no fp32 master "
                        f"for it, so the outer step would round every sync; pass Megatron's optimizer "
                        f"(built with bf16/fp16=True) as inner_optimizer.")
            self.handles[name] = h
        cfg = self.config
        self.fragment_plan = build_fragment_plan(list(self.handles), cfg.streaming_fragments, cfg.local_steps)
        comm = _OuterComm(self.replica_group, self.inner_group, self.num_replicas, self.sharded,
                          cfg.allreduce_dtype, cfg.quantization_block, self.consensus_group)
        self._async_comm = comm.with_groups(*self._async_groups) if cfg.sync_delay > 0 else None
        self.fragments = [Fragment(f, names, self.handles, self.fragment_plan.offset(f), cfg.local_steps, cfg, comm)
                          for f, names in enumerate(self.fragment_plan.fragments)]
        self.step = 0
        self.totals = DiLoCoStats()

    # -- the synchroniser's hooks ---------------------------------------------------
    def after_optimizer_step(self) -> None:
        self.after_inner_step()

    def attach_merge_probe(self, probe: Callable[[], float], on_report: Callable[[SyncReport], None]) -> None:
        """The merge diagnostic: at every sync, ``probe()`` (collective, no gradients) scores the
        model's current weights on a fixed probe batch, as the mean over replicas, three times
        (local models, plain merge, after the outer step; :class:`MergeDiagnostic`), and
        ``on_report(report)`` receives the sync's report with them (``report.merge``)."""
        self._probe, self._on_merge = probe, on_report

    def evaluation_weights(self):
        return self.global_weights() if self.evaluated_model == "global" else contextlib.nullcontext()

    def weights_changed(self) -> None:
        """New weights (``--finetune``): θ(0) is read from them; the outer state starts afresh."""
        self._build_fragments()

    def before_save(self) -> None:
        """A checkpoint is next: wait for the reduction in flight (its result is kept, not applied:
        :meth:`state_dict` stores it and the outer step happens at its due step, as without the save)."""
        self._wait_in_flight()

    def stats(self) -> Dict[str, float]:
        """Counters since the start of the run: ``outer_bytes_sent`` (bytes on the wire per rank,
        2 (K-1)/K x the bytes handed to the cross-replica collectives: the ring all-reduce of an
        fp32 / bf16 payload, or compress's all-to-all + all-gather of an int8 / fp8 one, counted
        from what :func:`compress.quantized_all_reduce_` returns), ``bytes_handed`` (what was handed
        to them: payload + scales) and ``payload_bytes``; ``comm_wait_s``: seconds the training
        thread waited for cross-replica reductions; ``comm_background_s`` (τ > 0): seconds the
        background reductions took on their thread (a wait remains where this exceeds τ steps)."""
        t = self.totals
        return {"syncs": t.syncs, "skipped": t.skipped, "payload_bytes": t.payload_bytes,
                "bytes_handed": t.bytes_handed, "outer_bytes_sent": t.ring_bytes_sent,
                "comm_wait_s": t.comm_wait_s, "comm_background_s": t.comm_background_s}

    def describe(self) -> str:
        c = self.config
        extra = (f", sync delay {c.sync_delay} (merge alpha {c.merge_alpha})" if c.sync_delay else "") + \
            (f", {c.allreduce_dtype} payload" if c.allreduce_dtype != "fp32" else "") + \
            (" with error feedback" if c.error_feedback else "")
        return f"DiLoCo H={c.local_steps}, F={c.streaming_fragments}" + extra

    def run_info(self) -> dict:
        return {"diloco_fragments": self.config.streaming_fragments}

    # -- schedule ---------------------------------------------------------------
    def after_inner_step(self) -> List[SyncReport]:
        """Advance the inner-step counter; apply the delayed sync in flight if it is due after this
        step; then sync (τ = 0) or launch (τ > 0) the fragments that are due. Returns the reports
        of the outer steps applied now."""
        self.step += 1
        reports = []
        if self._in_flight is not None:
            assert self._in_flight.due >= self.step, (self._in_flight.due, self.step)
            if self._in_flight.due == self.step:
                reports.append(self._complete())
        for f in self.fragments:
            if f.due(self.step):
                if self.config.sync_delay > 0:
                    self._launch(f.index)
                else:
                    reports.append(self.sync(f.index))
        return reports

    def finish(self) -> List[SyncReport]:
        """Final synchronisation at the end of training: first the delayed sync in flight, if any,
        is waited for and applied now; then one sync (a normal, synchronous outer step of a
        shorter round) of every fragment with inner steps since its last sync, so that every
        replica holds the one global model. A fragment whose in-flight sync was just applied with
        α > 0 always gets that final sync (its merged local values differ between replicas, even
        when it was launched at this very step). Collective over all ranks; returns the reports."""
        reports, merged = [], None
        if self._in_flight is not None:
            reports.append(self._complete())
            if not reports[0].skipped and self.config.merge_alpha > 0:
                merged = reports[0].fragment
        return reports + [self.sync(f.index) for f in self.fragments if f.last_sync < self.step or f.index == merged]

    # -- one fragment -------------------------------------------------------------
    def _all_finite(self, tensors: List[torch.Tensor]) -> bool:
        return _agree_finite(tensors, self.consensus_group)

    def _report(self, frag: Fragment, step: int, payload: int, handed: int) -> SyncReport:
        k = self.num_replicas
        return SyncReport(step=step, fragment=frag.index, payload_bytes=payload, bytes_handed=handed,
                          ring_bytes_sent=int(2 * (k - 1) / k * handed) if k > 1 else 0, applied_step=self.step)

    def _account(self, frag: Fragment, report: SyncReport, finite: bool) -> SyncReport:
        """Skip bookkeeping (the recovery of the module docstring) and the counters, after the outer
        step (or its skip) was applied."""
        if not finite:
            report.skipped = True
            self.totals.skipped += 1
            report.restored_fragments, report.reset_states = self._recover(frag.index)
            logger.warning("DiLoCo: non-finite outer delta in fragment %d at step %d; outer step skipped on all "
                           "replicas, parameters restored to the last synchronised values; on this rank %d other "
                           "non-finite fragment(s) restored and %d non-finite inner optimizer state(s) reset",
                           frag.index, report.step, len(report.restored_fragments), report.reset_states)
        self.totals.syncs += 1
        self.totals.payload_bytes += report.payload_bytes
        self.totals.bytes_handed += report.bytes_handed
        self.totals.ring_bytes_sent += report.ring_bytes_sent
        self.totals.last = report
        return report

    def sync(self, f: int) -> SyncReport:
        """Synchronise fragment ``f`` now (prepare, perform, apply): Algorithm 1's synchronous sync."""
        assert self._in_flight is None, "a synchronous sync while a delayed one is in flight"
        frag = self.fragments[f]
        deltas = frag.prepare()
        t0 = time.perf_counter()
        averaged = frag.perform(deltas)
        # what this rank sent into the cross-replica reduction
        report = self._report(frag, self.step, frag.last_payload, frag.last_handed)
        finite = self._all_finite(averaged)
        self.totals.comm_wait_s += time.perf_counter() - t0
        local, plain = self._probe_before(frag, averaged if finite else None)
        frag.apply(averaged if finite else None)
        frag.last_sync = self.step
        self._probe_after(report, local, plain)
        return self._account(frag, report, finite)

    def _probe_before(self, frag: Fragment, averaged: Optional[List[torch.Tensor]]):
        """Merge diagnostic, before the outer step: the probe loss of the local models, then of the
        plain merge θ(t) + Δ̄ of ``frag`` (None: no diagnostic, or a skipped sync)."""
        if self._probe is None or averaged is None:
            return None, None
        local = self._probe()
        with torch.no_grad():
            saved = frag.swap_in([s.data + a for s, a in zip(frag.snapshot, averaged)])
        try:
            plain = self._probe()
        finally:
            with torch.no_grad():
                _put_back(saved)
        return local, plain

    def _probe_after(self, report: SyncReport, local: Optional[float], plain: Optional[float]) -> None:
        """Merge diagnostic, after the outer step: the probe loss of the synchronised weights."""
        if local is None:
            return
        report.merge = MergeDiagnostic(local=local, plain_merge=plain, outer_step=self._probe())
        self._on_merge(report)

    # -- delayed syncs (τ > 0) ------------------------------------------------------
    def _launch(self, f: int) -> None:
        """Δ_k now, on this thread; the reduction (inner-DP sum / share / all-gather, the
        cross-replica reduction, division by m, the finite decision) on the background thread over
        the dedicated groups; returns at once. Applied after inner step ``step + τ``."""
        assert self._in_flight is None, (
            f"fragment {f} launched at step {self.step} while fragment {self._in_flight.fragment}'s sync is in "
            "flight; validate_diloco_config refuses --diloco-sync-delay >= the gap between two fragment syncs")
        frag = self.fragments[f]
        deltas = frag.prepare()
        main = torch.cuda.current_stream(self._stream.device) if self._stream is not None else None
        future = self._executor.submit(self._reduce_in_background, frag, deltas, main)
        self._in_flight = _InFlight(fragment=f, launched=self.step, due=self.step + self.config.sync_delay,
                                    future=future)

    def _reduce_in_background(self, frag: Fragment, deltas: List[torch.Tensor], main_stream) -> _Reduced:
        """The worker thread's part of a delayed sync (no state of the main thread is touched except
        ``frag.residual``, which only the reduction uses). On CUDA: its own stream, after the main
        stream's work so far; its results are host tensors."""
        c, t0 = self._async_comm, time.perf_counter()
        if self._stream is None:
            averaged, payload, handed = frag.reduce(deltas, c)
            finite = _agree_finite(averaged, c.consensus_group)
        else:
            with torch.cuda.device(self._stream.device), torch.cuda.stream(self._stream):
                self._stream.wait_stream(main_stream)
                averaged, payload, handed = frag.reduce(deltas, c)
                finite = _agree_finite(averaged, c.consensus_group)
            self._stream.synchronize()
        return _Reduced(averaged if finite else None, payload, handed, time.perf_counter() - t0)

    def _wait_in_flight(self) -> Optional[_InFlight]:
        """Block until the reduction in flight (if any) has its result; no collective on this thread."""
        p = self._in_flight
        if p is not None and p.result is None:
            t0 = time.perf_counter()
            p.result = p.future.result()
            self.totals.comm_wait_s += time.perf_counter() - t0
            self.totals.comm_background_s += p.result.duration_s
            p.future = None
            if self._stream is not None:
                torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        return p

    def _complete(self) -> SyncReport:
        """Wait for the sync in flight and apply it now: the outer step from θ(t) (the snapshot)
        gives θ(t+1), the new snapshot; the local parameters, τ steps further, are merged
        (:meth:`Fragment.merge`). A non-finite result: θ(t) is restored on every replica (the
        fragment's last τ steps are dropped) and the skip recovery runs."""
        p = self._wait_in_flight()
        res = p.result
        self._in_flight = None
        frag = self.fragments[p.fragment]
        report = self._report(frag, p.launched, res.payload_bytes, res.bytes_handed)
        local, plain = self._probe_before(frag, res.averaged)
        if res.averaged is not None:
            frag.outer.step(res.averaged)
            frag.merge(self.config.merge_alpha, self.inner_group)
        else:
            frag.restore()
        self._probe_after(report, local, plain)
        # Inner steps since the last sync: with α > 0 the local values keep (a share of) the progress
        # since the launch, so the fragment counts as synchronised at the launch; otherwise at the merge.
        frag.last_sync = p.launched if res.averaged is not None and self.config.merge_alpha > 0 else self.step
        return self._account(frag, report, res.averaged is not None)

    def _recover(self, skipped: int):
        """After a skipped sync (this rank only, no collective): return every other fragment whose
        local values are non-finite to its snapshot, and reset the non-finite inner optimizer state
        (see the module docstring). Returns (restored fragments, number of states reset)."""
        restored = []
        for g in self.fragments:
            if g.index != skipped and not g.locally_finite():
                g.restore()
                restored.append(g.index)
        reset = reset_nonfinite_optimizer_state(self.inner_optimizer) if self.inner_optimizer is not None else 0
        return restored, reset

    # -- evaluation -----------------------------------------------------------------
    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """Within the block the model holds the global model: every fragment's latest
        synchronised parameters θ(t) (its snapshot), the same on every replica, instead of
        this replica's local weights (which are up to H steps past θ(t) mid-round). A delayed
        sync in flight (τ > 0) is not applied yet: its fragment shows the θ(t) it was launched
        from. Only the model's tensors are swapped (not the inner optimizer's fp32 masters), and
        the local values are put back on exit, bit for bit. For evaluation (no gradients)."""
        saved = []
        with torch.no_grad():
            for frag in self.fragments:
                saved += frag.swap_in()
        try:
            yield
        finally:
            with torch.no_grad():
                _put_back(saved)

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Snapshot θ(t), outer momentum, step counter and fragment schedule (host tensors); with
        error feedback each fragment's residual; with a delayed sync in flight, its reduced result
        (waited for here, not applied) and its due step. Identical on a replica's inner-DP ranks."""
        t = self.totals
        p = self._wait_in_flight()
        return {
            "step": self.step,
            "last_sync": [f.last_sync for f in self.fragments],
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "fragments": [list(f.names) for f in self.fragments],
            "snapshots": [[p.data.clone() for p in f.snapshot] for f in self.fragments],
            "outer_optimizers": [f.outer.sgd.state_dict() for f in self.fragments],
            "stats": {"syncs": t.syncs, "skipped": t.skipped, "payload_bytes": t.payload_bytes,
                      "ring_bytes_sent": t.ring_bytes_sent, "bytes_handed": t.bytes_handed},
            "residuals": [f.residual.to("cpu", copy=True) if f.residual is not None else None
                          for f in self.fragments],
            "in_flight": None if p is None else {
                "fragment": p.fragment, "launched": p.launched, "due": p.due,
                "averaged": None if p.result.averaged is None else [a.clone() for a in p.result.averaged],
                "payload_bytes": p.result.payload_bytes, "bytes_handed": p.result.bytes_handed},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if the fragment layout differs."""
        if state["fragments"] != [list(f.names) for f in self.fragments]:
            raise ValueError(
                "the checkpoint's DiLoCo fragments do not match this run's parameters/"
                "--diloco-streaming-fragments; resume with the same model and fragment count."
            )
        assert self._in_flight is None, "load_state_dict while an outer sync is in flight"
        self.step = int(state["step"])
        if "last_sync" in state:
            last = [int(x) for x in state["last_sync"]]
        else:  # older checkpoints: every sync happened on the schedule
            H = self.config.local_steps
            last = [s if s >= 1 else 0 for s in (self.step - (self.step - f.offset) % H for f in self.fragments)]
        for frag, s, snaps, sgd_state in zip(self.fragments, last, state["snapshots"], state["outer_optimizers"]):
            frag.last_sync = s
            for p, v in zip(frag.snapshot, snaps):
                p.data.copy_(v)
            frag.outer.sgd.load_state_dict(sgd_state)
        residuals = state.get("residuals") or [None] * len(self.fragments)
        for frag, r in zip(self.fragments, residuals):
            if frag.residual is None:
                continue  # this run keeps no residual (e.g. --diloco-error-feedback dropped)
            if r is None:
                frag.residual.zero_()  # the checkpoint kept none: start error feedback afresh
            elif tuple(r.shape) != tuple(frag.residual.shape):
                raise ValueError(
                    f"the checkpoint's error-feedback residual of DiLoCo fragment {frag.index} has shape "
                    f"{tuple(r.shape)}, this run needs {tuple(frag.residual.shape)} (another inner-DP size or "
                    "model); resume with the checkpoint's layout or drop --diloco-error-feedback.")
            else:
                frag.residual.copy_(r)
        fl = state.get("in_flight")
        if fl is not None:
            self._in_flight = _InFlight(
                fragment=int(fl["fragment"]), launched=int(fl["launched"]), due=int(fl["due"]),
                result=_Reduced(None if fl["averaged"] is None else [a.clone() for a in fl["averaged"]],
                                int(fl["payload_bytes"]), int(fl["bytes_handed"])))
        st = state.get("stats", {})
        self.totals = DiLoCoStats(syncs=st.get("syncs", 0), skipped=st.get("skipped", 0),
                                  payload_bytes=st.get("payload_bytes", 0),
                                  ring_bytes_sent=st.get("ring_bytes_sent", 0),
                                  bytes_handed=st.get("bytes_handed", 0))

    def outer_state_bytes(self) -> int:
        """Host bytes held by the snapshots and the outer momentum."""
        return sum(f.state_bytes() for f in self.fragments)
