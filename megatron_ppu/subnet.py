"""Subnetwork data parallelism (SDP): block- and neuron-level ownership plans.

Generalises PPU's ownership machinery (seed paper "Model Parallelism With Subnetwork
Data Parallelism"): each replica trains a structured subnetwork, every parameter is
held by the same number of replicas, and parameters are synchronised among their
holders only, either every step (SDP) or every H steps through the DiLoCo outer loop
(the count vector m of Algorithm 1 is "number of holders").

Plans (``--subnet-plan``):

* ``ppu``: PPU, the neuron-level plan with backward masking (:mod:`megatron_ppu.layers`).
* ``neurons``: the same MLP hidden-unit slices, with ``--subnet-masking forward``:
  in training the hidden units a replica does not own are dropped from its forward
  pass too, and the MLP output is multiplied by N (inverted-dropout scaling, so its
  expected magnitude matches the full MLP's); evaluation uses the full MLP unscaled.
* ``blocks``: each replica holds ``b = coverage x L`` of the L transformer blocks;
  every block is held by ``c = K b / L`` replicas. The assignment is a seeded random
  permutation of the blocks cut into K cyclic windows of b, which makes both counts
  exact. With ``backward`` masking a block the replica does not hold runs in the
  forward pass (its input Jacobian stays in the backward pass) but its weights get no
  gradient; with ``forward`` masking it is skipped entirely in training (the residual
  stream passes through), costing no FLOPs at all, and evaluation runs the full model
  (as LayerDrop does, without rescaling). Either way it holds no gradient buffer and no
  optimizer state there. The weights are still stored on every replica, so that
  every replica can evaluate (and checkpoint) the full model.

The assignment is fixed for the whole run. Re-drawing it per step or per round is not
implemented: it would require every replica to keep optimizer state for every block
(giving up the memory saving) or to move optimizer state between replicas at each
re-draw.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.module import param_is_not_shared

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubnetConfig:
    """Attributes:
        plan: "ppu", "neurons" or "blocks".
        masking: "backward" (full forward, sparse backward) or "forward" (non-held part
            skipped in the forward pass too).
        coverage: blocks plan: fraction of the transformer blocks each replica holds.
        sync: "outer" (every H steps through DiLoCo) or "step" (SDP: every step).
        seed: seed of the block assignment.
    """

    plan: str = "ppu"
    masking: str = "backward"
    coverage: float = 1.0
    sync: str = "outer"
    seed: int = 0


def validate_subnet_config(cfg: SubnetConfig, *, num_slices: int, num_replicas: int, num_layers: int) -> None:
    """Raise ``ValueError`` naming the fix for an unusable plan."""
    if cfg.plan not in ("ppu", "neurons", "blocks"):
        raise ValueError(f"--subnet-plan must be ppu, neurons or blocks, got {cfg.plan!r}.")
    if cfg.masking not in ("backward", "forward"):
        raise ValueError(f"--subnet-masking must be backward or forward, got {cfg.masking!r}.")
    if cfg.sync not in ("outer", "step"):
        raise ValueError(f"--subnet-sync must be outer or step, got {cfg.sync!r}.")
    if cfg.plan == "ppu" and cfg.masking != "backward":
        raise ValueError("--subnet-plan ppu is backward masking by definition; use --subnet-plan neurons "
                         "for forward-masked MLP slices.")
    if cfg.plan == "neurons":
        if cfg.masking != "forward":
            raise ValueError("--subnet-plan neurons with backward masking is PPU: use --subnet-plan ppu.")
        if num_slices < 2:
            raise ValueError("--subnet-plan neurons needs --ppu-slices N > 1 (each replica keeps 1/N of the units).")
    if cfg.plan == "blocks":
        if num_slices != 1:
            raise ValueError("--subnet-plan blocks does not combine with --ppu-slices > 1; use one plan.")
        block_assignment(num_replicas, num_layers, cfg.coverage, cfg.seed)  # raises if unbalanced
    elif cfg.coverage != 1.0:
        raise ValueError("--subnet-coverage applies to --subnet-plan blocks only (neurons/ppu: 1/--ppu-slices).")


def block_assignment(num_replicas: int, num_layers: int, coverage: float, seed: int) -> List[List[int]]:
    """Blocks (0-based global layer indices) held by each replica; balanced and reproducible.

    Raises ``ValueError`` unless every replica holds the same number b >= 1 of blocks
    and every block the same number c >= 1 of holders (K b = L c).
    """
    K, L = num_replicas, num_layers
    b_exact = coverage * L
    b = int(round(b_exact))
    if not 0 < coverage <= 1 or abs(b_exact - b) > 1e-9 or b < 1:
        raise ValueError(
            f"--subnet-coverage {coverage} x {L} layers must be a whole number >= 1 of blocks per "
            f"replica; use a multiple of 1/{L} (e.g. {', '.join(f'{i}/{L}' for i in range(1, L + 1))})."
        )
    if (K * b) % L:
        raise ValueError(
            f"{K} replicas holding {b} of {L} blocks each cannot hold every block the same number of "
            f"times (K*b = {K * b} is not a multiple of L = {L}); change --subnet-coverage or the "
            f"number of replicas."
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(L, generator=g).tolist()
    return [sorted(perm[(k * b + j) % L] for j in range(b)) for k in range(K)]


def block_holder_sets(assignment: Sequence[Sequence[int]], num_layers: int) -> List[FrozenSet[int]]:
    """For every block (global layer index), the set of replicas that hold it."""
    sets: List[set] = [set() for _ in range(num_layers)]
    for k, blocks in enumerate(assignment):
        for i in blocks:
            sets[i].add(k)
    return [frozenset(x) for x in sets]


def holders_per_block(assignment: Sequence[Sequence[int]], num_layers: int) -> List[int]:
    """For every block, the number of replicas that hold it."""
    return [len(s) for s in block_holder_sets(assignment, num_layers)]


def _install_skip(layer: torch.nn.Module) -> None:
    """Forward masking of a block: in training the residual stream passes through unchanged
    (no FLOPs, no activations); in evaluation the block runs, so every replica evaluates
    the full model (LayerDrop-style: no rescaling of the kept blocks)."""
    full_forward = layer.forward

    def forward(hidden_states, *args, **kwargs):
        if layer.training:
            return hidden_states, kwargs.get("context")
        return full_forward(hidden_states, *args, **kwargs)

    layer.forward = forward


def apply_block_plan(model: torch.nn.Module, held: Sequence[int], masking: str) -> int:
    """Freeze (backward masking) or skip in training (forward masking) the transformer
    layers of ``model`` whose global index is not in ``held``. Returns the number of
    layers masked on this pipeline stage."""
    held = set(held)
    masked = 0
    for layer in model.decoder.layers:
        idx = layer.layer_number - 1  # megatron numbers layers globally from 1
        if idx in held:
            continue
        for p in layer.parameters():
            p.requires_grad_(False)
        if masking == "forward":
            _install_skip(layer)
        masked += 1
    return masked


def block_holders_fn(assignment: Sequence[Sequence[int]], num_layers: int, num_replicas: int,
                     layer_offset: int = 0) -> Callable[[str], FrozenSet[int]]:
    """``holders(name)``: the replicas holding a parameter of this pipeline stage (named as in
    its ``state_dict``): its block's holders, or all K outside the blocks. ``layer_offset`` is
    the global index of the stage's first layer. ``len(holders(name))`` is the ``owners_fn`` of
    :func:`megatron_ppu.ownership.build_ownership_plan`."""
    sets = block_holder_sets(assignment, num_layers)
    everyone = frozenset(range(num_replicas))

    def holders(name: str) -> FrozenSet[int]:
        if "decoder.layers." in name:
            local = int(name.split("decoder.layers.")[1].split(".")[0])
            return sets[layer_offset + local]
        return everyone

    return holders


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

    @property
    def bytes_sent(self) -> float:
        return self.grad_bytes_sent + self.refresh_bytes_sent


def distributed_optimizer_shards(optimizer) -> Optional[Dict[int, tuple]]:
    """For a Megatron optimizer (or ``ChainedOptimizer``) with distributed-optimizer parts:
    ``id(param) -> (start, end)``, the range of the flattened model parameter in this rank's
    shard, for every parameter the shard touches. ``None`` when no part is distributed."""
    if optimizer is None:
        return None
    parts = [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]
    if not parts:
        return None
    shards = {}
    for o in parts:
        for p in o.model_param_gbuf_map:
            r = o._get_model_param_range_map(p)["param"]
            shards[id(p)] = (r.start, r.end)
    return shards


class _Piece:
    """A view of this rank's copy of one holder set's share of one parameter: either a
    whole tensor, or a range along ``dim`` of a tensor (one slice of a sliced weight)."""

    __slots__ = ("tensor", "dim", "start", "length")

    def __init__(self, tensor: torch.Tensor, dim: Optional[int] = None, start: int = 0, length: int = 0):
        self.tensor, self.dim, self.start, self.length = tensor, dim, start, length

    def view(self) -> torch.Tensor:
        t = self.tensor.data
        return t if self.dim is None else t.narrow(self.dim, self.start, self.length)


class SubnetSync:
    """Per-step SDP synchronisation among each parameter's holders, with sub-group collectives.

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
        self.stats = SyncStats()
        self._stale = False
        # holder set -> this rank's pieces, in the same canonical order on every replica
        self._grad: Dict[FrozenSet[int], List[torch.nn.Parameter]] = {}
        self._refresh: Dict[FrozenSet[int], List[_Piece]] = {}
        modules = dict(model.named_modules())
        for name, own in plan.params.items():
            mod_name, _, attr = name.rpartition(".")
            module = modules[mod_name]
            split = getattr(module, "ppu_splits", {}).get(attr)
            if split is not None:
                self._add_sliced(module, split, N, me, K)
                continue
            p = getattr(module, attr)
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

    def _add_sliced(self, module, split, N: int, me: int, K: int) -> None:
        owned_p, frozen_p = split.owned_param(module), split.frozen_param(module)
        lay, dim = split.layout, split.dim
        mine = me % N
        for n in range(N):
            holders = frozenset(k for k in range(K) if k % N == n)
            if n == mine:
                self._grad.setdefault(holders, []).append(owned_p)
                off = 0
                for s, e in lay.owned:
                    self._refresh.setdefault(holders, []).append(_Piece(owned_p, dim, off, e - s))
                    off += e - s
                continue
            # Slice n's ranges: slices are equal and evenly spaced, so shift ours by (n - mine) widths.
            for s, e in lay.owned:
                a, b = s + (n - mine) * (e - s), e + (n - mine) * (e - s)
                assert 0 <= a < b <= lay.size, (lay, n)
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
        self.stats.steps += 1
        self.stats.grad_bytes_sent += sent
        self._stale = True  # the optimizer step that follows moves the held values
        return sent

    @torch.no_grad()
    def grad_norm(self) -> float:
        """L2 norm of the synchronised gradient of the whole model, every parameter counted once
        (weights 1/|S| summed over the replicas, then over TP/PP as Megatron does), so every
        replica clips by the same factor and the holders of a parameter stay identical. With the
        distributed optimizer each rank counts its own shard and the sum runs over the inner-DP
        group too. Call after :meth:`sync_gradients`; the trainer installs it as the optimizer's
        ``get_grad_norm``."""
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
        self.stats.refreshes += 1
        self.stats.refresh_bytes_sent += sent
        self._stale = False
        return sent

    def refresh_if_stale(self) -> float:
        """:meth:`refresh` if parameters moved since the last one (lazy mode)."""
        return self.refresh() if self._stale else 0.0
