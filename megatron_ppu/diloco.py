"""The outer loop of Algorithm 1: DiLoCo / Streaming DiLoCo with count-normalised
partial synchronisation.

Per fragment f (all parameters when F = 1), on every rank:

* ``prepare``: Δ_k = θ_k − θ(t) over the fragment, in Megatron's full layout.
  The frozen part of a sliced weight never changes between syncs, so Δ_k is
  exactly 0 there; the owned part carries this replica's progress.
* ``perform``: one all-reduce (SUM) of the flattened Δ_k over the *replica group*
  only (ranks holding the same TP/PP shard in every replica; never across TP or
  PP), then elementwise division by the count vector m (K/N for a sliced
  parameter, K otherwise; see :mod:`megatron_ppu.ownership`).
* ``apply``: the pseudo-gradient g = θ(t) − (θ(t) + Δ) = −Δ feeds
  ``torch.optim.SGD(lr, momentum, nesterov)`` whose parameters *are* the host
  snapshot θ(t); after its step the snapshot holds θ(t+1), which is written back
  into the model (frozen slices included) and into the inner optimizer's fp32
  master weights. Every replica then holds the same θ(t+1).

If the reduced Δ is not finite on any rank, every rank skips the outer step for
that fragment, restores θ(t), and logs it (the decision is all-reduced, so all
replicas and all TP/PP shards agree).

Schedule: fragment f syncs after inner step s (s = 1, 2, ...) when
``s mod H == offset_f`` with ``offset_f = ((f + 1) * H // F) mod H``; so with F = 1
everything syncs at s = H, 2H, ...; with F > 1 the F syncs of a round are spread
evenly over its H steps and each fragment's round is H steps long (its first
one may be shorter).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

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
    split into owned/frozen parts, and keeps the optimizer's fp32 master copy in step."""

    def __init__(self, name: str, module: torch.nn.Module, attr: str, owners: int, masters: Dict[int, torch.Tensor]):
        self.name = name
        self.owners = owners
        splits = getattr(module, "ppu_splits", {})
        self.split = splits.get(attr)
        if self.split is not None:
            self.parts = [self.split.owned_param(module), self.split.frozen_param(module)]
        else:
            self.parts = [getattr(module, attr)]
        self.masters = [masters.get(id(p)) for p in self.parts]

    def _value_parts(self):
        return [m if m is not None else p for p, m in zip(self.parts, self.masters)]

    def read(self) -> torch.Tensor:
        """Current value (fp32, host) in full layout; from fp32 masters where they exist."""
        vals = [v.detach().float() for v in self._value_parts()]
        full = self.split.layout.assemble(vals[0], vals[1], self.split.dim) if self.split else vals[0]
        return full.to("cpu", copy=True)

    def write(self, full: torch.Tensor) -> None:
        if self.split is not None:
            values = self.split.layout.split(full, self.split.dim)
        else:
            values = (full,)
        with torch.no_grad():
            for p, m, v in zip(self.parts, self.masters, values):
                p.copy_(v.to(p.device, p.dtype))
                if m is not None:
                    m.copy_(v.to(m.device, m.dtype))

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parts)


def _master_map(optimizer) -> Dict[int, torch.Tensor]:
    """id(model param) -> fp32 master param, for Megatron's Float16OptimizerWithFloat16Params."""
    out: Dict[int, torch.Tensor] = {}
    if optimizer is None:
        return out
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "float16_groups") and hasattr(opt, "fp32_from_float16_groups"):
            for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for p16, p32 in zip(g16, g32):
                    out[id(p16)] = p32
    return out


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
        modules = dict(model.named_modules())
        self.handles: Dict[str, _ParamHandle] = {}
        for name, own in plan.params.items():
            if own.owners == 0:
                continue  # not trained by anyone: never changes
            mod_name, _, attr = name.rpartition(".")
            self.handles[name] = _ParamHandle(name, modules[mod_name], attr, own.owners, masters)
        self.fragments = build_fragment_plan(list(self.handles), config.streaming_fragments, config.local_steps)
        self.step = 0
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

    # -- one fragment -------------------------------------------------------------
    def prepare(self, f: int) -> List[torch.Tensor]:
        """Δ_k = θ_k − θ(t) for fragment ``f`` (fp32, host, full layout)."""
        names = self.fragments.fragments[f]
        return [self.handles[n].read() - snap.data for n, snap in zip(names, self.outer[f].snapshot)]

    def perform(self, f: int, deltas: List[torch.Tensor]) -> List[torch.Tensor]:
        """All-reduce Σ_k Δ_k over the replica group, then divide elementwise by m."""
        names = self.fragments.fragments[f]
        flat = torch.cat([d.reshape(-1) for d in deltas]).to(self._comm_dtype)
        self._last_payload = flat.numel() * flat.element_size()
        if self.num_replicas > 1:
            dev = self.handles[names[0]].parts[0].device if names else torch.device("cpu")
            buf = flat.to(dev)
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
        else:
            flat = flat.float()
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
        if self._all_finite(averaged):
            self.outer[f].step(averaged)
        else:
            report.skipped = True
            self.stats.skipped += 1
            logger.warning("DiLoCo: non-finite outer delta in fragment %d at step %d; outer step skipped on "
                           "all replicas, parameters restored to the last synchronised values", f, self.step)
        for n, snap in zip(names, self.outer[f].snapshot):
            self.handles[n].write(snap.data)
        if self.inner_optimizer is not None and not _master_map(self.inner_optimizer):
            # e.g. Megatron's distributed optimizer: refresh its main params from the model.
            reload = getattr(self.inner_optimizer, "reload_model_params", None)
            if reload is not None:
                reload()
        self.stats.syncs += 1
        self.stats.payload_bytes += report.payload_bytes
        self.stats.ring_bytes_sent += report.ring_bytes_sent
        self.stats.last = report
        return report

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Snapshot θ(t), outer momentum, step counter and fragment schedule (host tensors)."""
        return {
            "step": self.step,
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
