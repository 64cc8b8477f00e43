"""The outer loop of Algorithm 1: DiLoCo / Streaming DiLoCo with count-normalised
partial synchronisation.

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

Schedule: fragment f syncs after inner step s (s = 1, 2, ...) when
``s mod H == offset_f`` with ``offset_f = ((f + 1) * H // F) mod H``; so with F = 1
everything syncs at s = H, 2H, ...; with F > 1 the F syncs of a round are spread
evenly over its H steps and each fragment's round is H steps long (its first
one may be shorter).

End of training (:meth:`DiLoCo.finish`): every fragment with inner steps since its
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
import math
import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .config import DiLoCoConfig, validate_diloco_config
from .ownership import OwnershipPlan

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.")


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
        return ((f + 1) * self.local_steps // self.num_fragments) % self.local_steps

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
        m = _LAYER_RE.search(n)
        if m:
            layer_of[n] = int(m.group(1))
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

    def __init__(self, name: str, module: torch.nn.Module, attr: str, ownership, masters: Dict[int, torch.Tensor],
                 shards: Dict[int, tuple]):
        self.name = name
        self.owners = ownership.owners
        splits = getattr(module, "ppu_splits", {})
        self.split = splits.get(attr)
        if self.split is not None:
            assert tuple(ownership.owned) == tuple(self.split.layout.owned), (name, ownership.owned)
            self.parts = [self.split.owned_param(module), self.split.frozen_param(module)]
            self.trained = [True, False]
        else:
            self.parts = [getattr(module, attr)]
            self.trained = [bool(ownership.owned)]
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

    def write(self, full: torch.Tensor) -> None:
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
    """What one fragment sync did (for logs and benchmarks)."""

    step: int
    fragment: int
    payload_bytes: int  # bytes this rank contributed to the all-reduce
    ring_bytes_sent: int  # bytes a ring all-reduce sends per rank: 2 (K-1)/K x payload
    skipped: bool = False
    restored_fragments: List[int] = field(default_factory=list)  # at a skip: other fragments restored here
    reset_states: int = 0  # at a skip: inner optimizer states reset on this rank


@dataclass
class DiLoCoStats:
    syncs: int = 0
    skipped: int = 0
    payload_bytes: int = 0
    ring_bytes_sent: int = 0
    last: Optional[SyncReport] = None


class DiLoCo:
    """Outer loop of Algorithm 1 for one rank.

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

    Call :meth:`after_inner_step` once after every inner optimizer step.
    """

    def __init__(self, model: torch.nn.Module, plan: OwnershipPlan, replica_group, config: DiLoCoConfig,
                 inner_optimizer=None, consensus_group=None, inner_group=None):
        validate_diloco_config(config)
        if not config.enabled:
            raise ValueError("DiLoCo needs --diloco-local-steps > 0; with 0 train plain DDP instead.")
        self.config = config
        self.plan = plan
        self.replica_group = replica_group
        self.consensus_group = consensus_group
        self.inner_group = inner_group if inner_group is not None and dist.get_world_size(inner_group) > 1 else None
        self.inner_optimizer = inner_optimizer
        self.num_replicas = dist.get_world_size(replica_group) if replica_group is not None else 1
        if self.num_replicas != plan.num_replicas:
            raise ValueError(f"replica group has {self.num_replicas} ranks but the plan says K={plan.num_replicas}.")
        masters = _master_map(inner_optimizer)
        self.sharded = _is_distributed(inner_optimizer)
        shards = _shard_map(inner_optimizer) if self.sharded else {}
        modules = dict(model.named_modules())
        self.handles: Dict[str, _ParamHandle] = {}
        for name, own in plan.params.items():
            if own.owners == 0:
                continue  # not trained by anyone: never changes
            mod_name, _, attr = name.rpartition(".")
            h = _ParamHandle(name, modules[mod_name], attr, own, masters, shards)
            for p, m, trained in zip(h.parts, h.masters, h.trained):
                if trained and not self.sharded and m is None and p.dtype != torch.float32:
                    raise ValueError(
                        f"DiLoCo: {name} is trained in {p.dtype} but the inner optimizer holds no fp32 master "
                        f"for it, so the outer step would round every sync; pass Megatron's optimizer "
                        f"(built with bf16/fp16=True) as inner_optimizer.")
            self.handles[name] = h
        self.fragments = build_fragment_plan(list(self.handles), config.streaming_fragments, config.local_steps)
        self.step = 0
        self.last_sync = [0] * self.fragments.num_fragments  # inner step of each fragment's last sync
        self.outer: List[OuterOptimizer] = []
        pin = torch.cuda.is_available()
        for names in self.fragments.fragments:
            snaps = []
            for n in names:
                t = self.handles[n].read()
                snaps.append(t.pin_memory() if pin else t)
            self.outer.append(OuterOptimizer(snaps, config))
        self.stats = DiLoCoStats()
        self._comm_dtype = torch.bfloat16 if config.allreduce_dtype == "bf16" else torch.float32

    # -- schedule ---------------------------------------------------------------
    def after_inner_step(self) -> List[SyncReport]:
        """Advance the inner-step counter and sync the fragments that are due."""
        self.step += 1
        return [self.sync(f) for f in self.fragments.due(self.step)]

    def finish(self) -> List[SyncReport]:
        """Final synchronisation at the end of training: one sync (a normal outer step of a
        shorter round) of every fragment with inner steps since its last sync, so that every
        replica holds the one global model. Collective over all ranks; returns the reports."""
        return [self.sync(f) for f in range(self.fragments.num_fragments) if self.last_sync[f] < self.step]

    # -- one fragment -------------------------------------------------------------
    def prepare(self, f: int) -> List[torch.Tensor]:
        """This rank's Δ_k = θ_k − θ(t) for fragment ``f`` (fp32, host, full layout) on its
        replica's owned set, exactly 0 elsewhere (with the distributed optimizer: on this
        rank's shard of it; see the module docstring)."""
        names = self.fragments.fragments[f]
        return [self.handles[n].delta(snap.data, self.sharded) for n, snap in zip(names, self.outer[f].snapshot)]

    def perform(self, f: int, deltas: List[torch.Tensor]) -> List[torch.Tensor]:
        """All-reduce Σ_k Δ_k over the replica group, then divide elementwise by m."""
        names = self.fragments.fragments[f]
        flat = torch.cat([d.reshape(-1) for d in deltas]).to(self._comm_dtype)
        self._last_payload = flat.numel() * flat.element_size()
        dev = self.handles[names[0]].parts[0].device if names else torch.device("cpu")
        buf = flat.to(dev)
        if self.sharded and self.inner_group is not None:
            # Distributed optimizer: each inner-DP rank filled only its shard (disjoint ranges);
            # their sum inside the replica (fast links) is the replica's Δ_k, exactly (x + 0 = x).
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.inner_group)
        if self.num_replicas > 1:
            if self.inner_group is None:
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.replica_group)
            else:
                n, parts = buf.numel(), dist.get_world_size(self.inner_group)
                padded = torch.nn.functional.pad(buf, (0, (-n) % parts)).view(parts, -1)
                mine = padded[dist.get_rank(self.inner_group)].clone()
                dist.all_reduce(mine, op=dist.ReduceOp.SUM, group=self.replica_group)
                self._last_payload = mine.numel() * mine.element_size()
                gathered = [torch.empty_like(mine) for _ in range(parts)]
                dist.all_gather(gathered, mine, group=self.inner_group)
                buf = torch.cat(gathered)[:n]
        flat = buf.to("cpu", torch.float32)
        out, off = [], 0
        for n, d in zip(names, deltas):
            k = d.numel()
            out.append(flat[off:off + k].view_as(d) / self.handles[n].owners)
            off += k
        return out

    def _all_finite(self, tensors: List[torch.Tensor]) -> bool:
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(t).all()) for t in tensors) else 1.0])
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.consensus_group)
        return bad.item() == 0.0

    def sync(self, f: int) -> SyncReport:
        """Synchronise fragment ``f`` now (prepare, perform, apply)."""
        names = self.fragments.fragments[f]
        deltas = self.prepare(f)
        averaged = self.perform(f, deltas)
        payload = self._last_payload  # what this rank sent into the cross-replica all-reduce
        k = self.num_replicas
        report = SyncReport(step=self.step, fragment=f, payload_bytes=payload,
                            ring_bytes_sent=int(2 * (k - 1) / k * payload) if k > 1 else 0)
        finite = self._all_finite(averaged)
        if finite:
            self.outer[f].step(averaged)
        else:
            report.skipped = True
            self.stats.skipped += 1
        for n, snap in zip(names, self.outer[f].snapshot):
            self.handles[n].write(snap.data)
        if not finite:
            report.restored_fragments, report.reset_states = self._recover(f)
            logger.warning("DiLoCo: non-finite outer delta in fragment %d at step %d; outer step skipped on all "
                           "replicas, parameters restored to the last synchronised values; on this rank %d other "
                           "non-finite fragment(s) restored and %d non-finite inner optimizer state(s) reset",
                           f, self.step, len(report.restored_fragments), report.reset_states)
        self.last_sync[f] = self.step
        self.stats.syncs += 1
        self.stats.payload_bytes += report.payload_bytes
        self.stats.ring_bytes_sent += report.ring_bytes_sent
        self.stats.last = report
        return report

    def _recover(self, skipped: int):
        """After a skipped sync (this rank only, no collective): return every other fragment whose
        local values are non-finite to its snapshot, and reset the non-finite inner optimizer state
        (see the module docstring). Returns (restored fragments, number of states reset)."""
        restored = []
        for g, names in enumerate(self.fragments.fragments):
            if g == skipped:
                continue
            if not all(bool(torch.isfinite(self.handles[n].read()).all()) for n in names):
                for n, snap in zip(names, self.outer[g].snapshot):
                    self.handles[n].write(snap.data)
                restored.append(g)
        reset = reset_nonfinite_optimizer_state(self.inner_optimizer) if self.inner_optimizer is not None else 0
        return restored, reset

    # -- evaluation -----------------------------------------------------------------
    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """Within the block the model holds the global model: every fragment's latest
        synchronised parameters θ(t) (its snapshot), the same on every replica, instead of
        this replica's local weights (which are up to H steps past θ(t) mid-round). Only the
        model's tensors are swapped (not the inner optimizer's fp32 masters), and the local
        values are put back on exit, bit for bit. For evaluation (no gradients)."""
        saved = []
        with torch.no_grad():
            for names, outer in zip(self.fragments.fragments, self.outer):
                for n, snap in zip(names, outer.snapshot):
                    h = self.handles[n]
                    saved.append((h, [p.detach().clone() for p in h.parts]))
                    values = h.split.layout.split(snap.data, h.split.dim) if h.split is not None else (snap.data,)
                    for p, v in zip(h.parts, values):
                        p.copy_(v.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for h, parts in saved:
                    for p, v in zip(h.parts, parts):
                        p.copy_(v)

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Snapshot θ(t), outer momentum, step counter and fragment schedule (host tensors)."""
        return {
            "step": self.step,
            "last_sync": list(self.last_sync),
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "fragments": [list(names) for names in self.fragments.fragments],
            "snapshots": [[p.data.clone() for p in o.snapshot] for o in self.outer],
            "outer_optimizers": [o.sgd.state_dict() for o in self.outer],
            "stats": {"syncs": self.stats.syncs, "skipped": self.stats.skipped,
                      "payload_bytes": self.stats.payload_bytes, "ring_bytes_sent": self.stats.ring_bytes_sent},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` if the fragment layout differs."""
        if state["fragments"] != [list(n) for n in self.fragments.fragments]:
            raise ValueError(
                "the checkpoint's DiLoCo fragments do not match this run's parameters/"
                "--diloco-streaming-fragments; resume with the same model and fragment count."
            )
        self.step = int(state["step"])
        if "last_sync" in state:
            self.last_sync = [int(x) for x in state["last_sync"]]
        else:  # older checkpoints: every sync happened on the schedule
            H, plan = self.config.local_steps, self.fragments
            last = [self.step - (self.step - plan.offset(f)) % H for f in range(plan.num_fragments)]
            self.last_sync = [s if s >= 1 else 0 for s in last]
        for o, snaps, sgd_state in zip(self.outer, state["snapshots"], state["outer_optimizers"]):
            for p, s in zip(o.snapshot, snaps):
                p.data.copy_(s)
            o.sgd.load_state_dict(sgd_state)
        st = state.get("stats", {})
        self.stats = DiLoCoStats(syncs=st.get("syncs", 0), skipped=st.get("skipped", 0),
                                 payload_bytes=st.get("payload_bytes", 0),
                                 ring_bytes_sent=st.get("ring_bytes_sent", 0))

    def outer_state_bytes(self) -> int:
        """Host bytes held by the snapshot and the outer momentum."""
        total = 0
        for o in self.outer:
            for p in o.snapshot:
                total += p.numel() * p.element_size()
                buf = o.sgd.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    total += buf.numel() * buf.element_size()
        return total
