"""Per-step subnetwork data parallelism (SDP, ``--subnet-sync step``) as a
:class:`~megatron_ppu.sync.base.Synchroniser`: after the backward pass every held gradient is
averaged over the parameter's holders (sub-group all-reduces); the optimizer clips by the norm
of the whole synchronised gradient (:class:`GlobalNormChainedOptimizer`); after the step the
holders' new values are copied to the non-holders (at once with backward masking; before
evaluation or a checkpoint with forward masking). The ownership plans themselves (blocks,
neurons) are in :mod:`megatron_ppu.subnet`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.transformer.module import param_is_not_shared

from ..optimizer import InnerOptimizerView
from .base import Synchroniser


class GlobalNormChainedOptimizer(ChainedOptimizer):
    """Megatron's ``ChainedOptimizer`` whose clipping norm is given: ``grad_norm()`` (SDP's norm
    of the whole synchronised gradient, :meth:`SDPSync.grad_norm`) instead of the norm of this
    replica's own trainable set, so that every holder of a parameter clips by the same factor and
    the holders stay identical. A subclass overriding ``get_grad_norm``, the method
    ``ChainedOptimizer.step`` calls for clipping (and returns for logging); the sub-optimizers,
    their state and param groups are the given optimizer's."""

    def __init__(self, optimizer: ChainedOptimizer, grad_norm: Callable[[], float]):
        assert isinstance(optimizer, ChainedOptimizer), type(optimizer)
        super().__init__(optimizer.chained_optimizers)
        self._grad_norm = grad_norm

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        return self._grad_norm()


@dataclass
class SyncStats:
    """Traffic of the per-step synchronisation (per rank, bytes).

    ``grad_bytes_sent``: ring all-reduce model, ``2 (h-1)/h x payload`` for each group of
    h holders. ``refresh_bytes_sent``: ``(K-h)/K x payload`` for each broadcast of h holders'
    values to the K-h non-holders (what has to cross the links, spread over the K ranks).
    """

    steps: int = 0
    refreshes: int = 0
    grad_bytes_sent: float = 0.0
    refresh_bytes_sent: float = 0.0
    comm_wait_s: float = 0.0  # seconds in the gradient all-reduces and refreshes

    @property
    def bytes_sent(self) -> float:
        return self.grad_bytes_sent + self.refresh_bytes_sent


def distributed_optimizer_shards(optimizer) -> Optional[Dict[int, tuple]]:
    """For a Megatron optimizer (or ``ChainedOptimizer``) with distributed-optimizer parts:
    ``id(param) -> (start, end)``, the range of the flattened model parameter in this rank's
    shard, for every parameter the shard touches. ``None`` when no part is distributed."""
    return InnerOptimizerView(optimizer).shard_ranges()


class _Piece:
    """A view of this rank's copy of one holder set's share of one parameter: either a
    whole tensor, or a range along ``dim`` of a tensor (one slice of a sliced weight)."""

    __slots__ = ("tensor", "dim", "start", "length")

    def __init__(self, tensor: torch.Tensor, dim: Optional[int] = None, start: int = 0, length: int = 0):
        self.tensor, self.dim, self.start, self.length = tensor, dim, start, length

    def view(self) -> torch.Tensor:
        t = self.tensor.data
        return t if self.dim is None else t.narrow(self.dim, self.start, self.length)


class SDPSync(Synchroniser):
    """Per-step SDP synchronisation among each parameter's holders, with sub-group collectives
    (the synchroniser of ``--subnet-sync step``).

    Ownership, per parameter of this rank (its TP shard, its pipeline stage):

    * a parameter outside the transformer blocks (embeddings, final norm, output layer) is
      held by all K replicas;
    * a parameter of a block is held by ``holders_fn(name)`` (the ``blocks`` plan, see
      :func:`block_holders_fn`), or by all K (the ``ppu``/``neurons`` plans);
    * a sliced weight (``ppu``/``neurons``): slice n is held by the K/N replicas
      ``{k : k mod N = n}``. Replica k stores its slice in the trainable tensor and the other
      N-1 slices in the frozen tensor (:class:`megatron_ppu.ownership.SliceLayout`).

    Each distinct holder set S gets its own process group over the ranks at this rank's
    TP/PP/inner-DP position (one per replica), created collectively in ``__init__``.

    :meth:`sync_gradients` (after the backward pass and Megatron's ``finalize_model_grads``,
    before ``optimizer.step()``): for every S this rank belongs to with ``|S| > 1``, one
    all-reduce over S of the concatenated gradients of S's share, divided by ``|S|``; the
    result is the mean over the holders of their local gradients. A parameter held by a
    single replica needs no traffic.

    :meth:`grad_norm` replaces the optimizer's clipping norm by the norm of the whole
    synchronised gradient, so that every replica clips by the same factor.

    With Megatron's distributed optimizer (pass it as ``optimizer``) and inner-DP > 1, DDP only
    reduce-scatters the gradient buffer over the replica's inner-DP ranks: each rank holds the
    inner-DP mean of its own shard only (the rest of its buffer is its local, unreduced
    gradient), and its optimizer reads only that shard. Then :meth:`sync_gradients` all-reduces
    only the shard (1/inner-DP of the traffic over the slow links) and :meth:`grad_norm` sums
    each rank's shard and all-reduces over the inner-DP group as well. This needs every holder of
    a parameter to shard it the same way (true when the replicas' gradient buffers have the same
    layout, as under the ``ppu``/``neurons`` plans and the ``blocks`` plan's equal-sized blocks);
    the construction checks it and raises ``ValueError`` on every rank otherwise.

    :meth:`refresh` (after ``optimizer.step()``): the holders of S have identical values after
    identical updates (same synchronised gradient, same clipping factor, same Adam state);
    for every S that is not everybody, one broadcast over the replica group
    from S's first holder writes them into the non-holders' frozen copies. With backward
    masking the forward pass reads every weight, so the refresh runs after every step. With
    forward masking a replica never reads what it does not hold while training, so
    ``lazy=True`` defers the refresh to :meth:`refresh_if_stale`, which the trainer calls
    before evaluating or saving: per-step traffic is then the gradient all-reduces only.

    The masked alternative (an all-reduce of the full-layout gradients over all K replicas,
    zeros where a replica holds nothing, then a parameter refresh of the same size) sends
    ``2 x 2 (K-1)/K`` times the model per step, more than plain data parallelism; the
    sub-groups send less than plain data parallelism whenever holders are fewer than K.
    """

    def __init__(self, model: torch.nn.Module, plan, layout, *,
                 holders_fn: Optional[Callable[[str], FrozenSet[int]]] = None,
                 lazy: bool = False, group_backend: Optional[str] = None, optimizer=None):
        K = layout.num_replicas
        me = layout.replica_index
        everyone = frozenset(range(K))
        N = plan.num_slices
        self.layout, self.lazy, self.num_replicas = layout, lazy, K
        self.traffic = SyncStats()
        self._stale = False
        # holder set -> this rank's pieces, in the same canonical order on every replica
        self._grad: Dict[FrozenSet[int], List[torch.nn.Parameter]] = {}
        self._refresh: Dict[FrozenSet[int], List[_Piece]] = {}
        for name, own in plan.params.items():
            held = plan.tensors(name)  # the ownership plan says where the full-layout tensor lives
            if held.split is not None:
                self._add_sliced(plan, name, held, N, K)
                continue
            p = held.whole
            holders = holders_fn(name) if holders_fn is not None else everyone
            assert (me in holders) == p.requires_grad, f"{name}: holder set {set(holders)} vs requires_grad"
            assert len(holders) == own.owners, (name, holders, own.owners)
            if me in holders:
                self._grad.setdefault(holders, []).append(p)
            self._refresh.setdefault(holders, []).append(_Piece(p))
        self._sets = sorted(set(self._grad) | set(self._refresh), key=lambda s: (len(s), sorted(s)))
        # Global rank of replica k at this rank's TP/PP/inner-DP position.
        pairs: List[Optional[tuple]] = [None] * dist.get_world_size(layout.replica_group)
        dist.all_gather_object(pairs, (me, dist.get_rank()), group=layout.replica_group)
        self._members = [r for _, r in sorted(pairs)]
        assert [k for k, _ in sorted(pairs)] == list(range(K)), pairs
        self._groups = self._build_groups(group_backend)
        # id(param) -> (start, end) of the flattened param in this rank's distributed-optimizer
        # shard (a param absent from it is not in the shard); None: no distributed optimizer.
        self._shards = distributed_optimizer_shards(optimizer)
        if self._shards is not None:
            self._check_shards_aligned()

    def _add_sliced(self, plan, name: str, held, N: int, K: int) -> None:
        owned_p, frozen_p = held.parts
        lay, dim = held.split.layout, held.split.dim
        mine = plan.slice_index
        for n in range(N):
            holders = frozenset(k for k in range(K) if k % N == n)
            if n == mine:
                self._grad.setdefault(holders, []).append(owned_p)
                off = 0
                for s, e in lay.owned:
                    self._refresh.setdefault(holders, []).append(_Piece(owned_p, dim, off, e - s))
                    off += e - s
                continue
            # Slice n's ranges (replica n trains slice n), as offsets into our frozen part.
            for a, b in plan.owned_ranges(name, n):
                owned_before = sum(min(e2, a) - s2 for s2, e2 in lay.owned if s2 < a)
                self._refresh.setdefault(holders, []).append(_Piece(frozen_p, dim, a - owned_before, b - a))

    def _build_groups(self, backend: Optional[str]) -> Dict[FrozenSet[int], object]:
        # dist.new_group is collective over the whole world: every rank creates every group of
        # every TP/PP/inner-DP position (pipeline stages hold different blocks, hence the union).
        mine = tuple(self._members)
        world = dist.get_world_size()
        gathered: List[Optional[tuple]] = [None] * world
        proper = [tuple(sorted(s)) for s in self._grad if 1 < len(s) < self.num_replicas]
        dist.all_gather_object(gathered, (mine, proper))
        positions = sorted({g[0] for g in gathered})
        all_sets = sorted({s for g in gathered for s in g[1]}, key=lambda s: (len(s), s))
        out = {}
        for members in positions:
            for s in all_sets:
                g = dist.new_group([members[k] for k in s], backend=backend, timeout=self.layout.timeout)
                if members == mine:
                    out[frozenset(s)] = g
        for s in self._grad:
            if len(s) == self.num_replicas:
                out[s] = self.layout.replica_group
        return out

    @staticmethod
    def _grad_of(p: torch.nn.Parameter) -> torch.Tensor:
        g = getattr(p, "main_grad", None)
        return g if g is not None else p.grad

    def _reduced_grad(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """The part of ``p``'s gradient that DDP reduced over the inner-DP group and this rank's
        optimizer reads: all of it, or (distributed optimizer) a flat view of this rank's shard,
        None when the shard holds none of ``p``."""
        g = self._grad_of(p)
        if self._shards is None:
            return g
        r = self._shards.get(id(p))
        return None if r is None else g.view(-1)[r[0]:r[1]]

    def _check_shards_aligned(self) -> None:
        # The holders of a parameter all-reduce their shards of it elementwise: the shard must be
        # the same range on every holder. Gathered over the world, so every rank reaches the
        # same verdict (no rank waits in a collective that another rank has left).
        mine = {tuple(sorted(s)): [(tuple(p.shape), self._shards.get(id(p))) for p in params]
                for s, params in self._grad.items() if len(s) > 1}
        gathered: List[Optional[tuple]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (tuple(self._members), mine))
        for members, sets in gathered:
            for s, sig in sets.items():
                others = [g for m, g in gathered if m == members]
                if any(g.get(s, sig) != sig for g in others):
                    raise ValueError(
                        "--use-distributed-optimizer with --subnet-sync step: the replicas holding a "
                        "parameter shard their gradient buffers differently (their trainable sets are laid "
                        "out differently), so their per-step all-reduce would mix reduced and "
                        "unreduced gradients. Drop --use-distributed-optimizer, or use one data-parallel "
                        "rank per replica (--diloco-replicas = data-parallel size).")

    def sync_gradients(self) -> float:
        """Replace every held gradient by the mean over its holders; returns bytes sent."""
        sent = 0.0
        for s in self._sets:
            params = self._grad.get(s)
            h = len(s)
            if not params or h == 1:
                continue
            grads = [g for g in (self._reduced_grad(p) for p in params) if g is not None and g.numel()]
            if not grads:  # the same on every holder (aligned shards): nobody calls the collective
                continue
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat, group=self._groups[s])
            flat.div_(h)
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
            sent += 2 * (h - 1) / h * flat.numel() * flat.element_size()
        self.traffic.steps += 1
        self.traffic.grad_bytes_sent += sent
        self._stale = True  # the optimizer step that follows moves the held values
        return sent

    @torch.no_grad()
    def grad_norm(self) -> float:
        """L2 norm of the synchronised gradient of the whole model, every parameter counted once
        (weights 1/|S| summed over the replicas, then over TP/PP as Megatron does), so every
        replica clips by the same factor and the holders of a parameter stay identical. With the
        distributed optimizer each rank counts its own shard and the sum runs over the inner-DP
        group too. Call after :meth:`sync_gradients`; :meth:`wrap_optimizer` makes it the
        optimizer's clipping norm (:class:`GlobalNormChainedOptimizer`)."""
        sq, device = 0.0, None
        for s, params in self._grad.items():
            part = 0.0
            for p in params:
                g = self._reduced_grad(p)
                device = self._grad_of(p).device
                if g is None or not (param_is_not_shared(p)
                                     and tensor_parallel.param_is_not_tensor_parallel_duplicate(p)):
                    continue
                part = part + g.double().pow(2).sum()
            sq = sq + part / len(s)
        total = torch.as_tensor(sq, dtype=torch.float64, device=device).reshape(1).clone()
        if self._shards is not None and self.layout.inner_dp > 1:
            dist.all_reduce(total, group=self.layout.inner_dp_group)
        dist.all_reduce(total, group=self.layout.replica_group)
        mp = ps.get_model_parallel_group()
        if dist.get_world_size(mp) > 1:
            dist.all_reduce(total, group=mp)
        return float(total.sqrt())

    def refresh(self) -> float:
        """Copy every holder set's values to its non-holders (collective over the replica
        group); returns bytes sent (see :class:`SyncStats`)."""
        K, me = self.num_replicas, self.layout.replica_index
        sent = 0.0
        for s in self._sets:
            pieces = self._refresh.get(s)
            if not pieces or len(s) == K:
                continue
            views = [pc.view() for pc in pieces]
            flat = torch.cat([v.reshape(-1) for v in views])
            dist.broadcast(flat, src=self._members[min(s)], group=self.layout.replica_group)
            if me not in s:
                off = 0
                for v in views:
                    v.copy_(flat[off:off + v.numel()].view_as(v))
                    off += v.numel()
            sent += (K - len(s)) / K * flat.numel() * flat.element_size()
        self.traffic.refreshes += 1
        self.traffic.refresh_bytes_sent += sent
        self._stale = False
        return sent

    def refresh_if_stale(self) -> float:
        """:meth:`refresh` if parameters moved since the last one (lazy mode)."""
        return self.refresh() if self._stale else 0.0

    # -- the synchroniser's hooks ---------------------------------------------------
    def wrap_optimizer(self, optimizer):
        """Holders must apply identical updates: clip by the norm of the whole synchronised
        gradient, not by each replica's own subnetwork's norm."""
        return GlobalNormChainedOptimizer(optimizer, self.grad_norm)

    def after_backward(self) -> None:
        t0 = time.perf_counter()
        self.sync_gradients()
        self.traffic.comm_wait_s += time.perf_counter() - t0

    def after_optimizer_step(self) -> None:
        if not self.lazy:
            t0 = time.perf_counter()
            self.refresh()
            self.traffic.comm_wait_s += time.perf_counter() - t0

    def evaluation_weights(self):
        self.refresh_if_stale()  # forward-masked SDP: bring non-held parts up to date
        return contextlib.nullcontext()

    def before_save(self) -> None:
        self.refresh_if_stale()

    def stats(self) -> Dict[str, float]:
        return dict(vars(self.traffic))

    def describe(self) -> str:
        return "SDP per-step sync"
