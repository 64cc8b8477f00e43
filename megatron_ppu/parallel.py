"""Replica process groups on top of ``megatron.core.parallel_state``, and rank placement.

A *replica* (DiLoCo's node) is ``TP x PP x inner_dp`` ranks that train one copy of the
model and talk to each other every step; the K replicas talk only at the outer sync.
Megatron's data-parallel (DP) ranks of one (TP, PP) position are split into K replicas of
``inner_dp = DP / K`` consecutive DP ranks each.

Rank order: the trainer initialises Megatron with ``order="tp-cp-ep-pp-dp"``
(:data:`RANK_ORDER`, Megatron-LM's ``--use-tp-pp-dp-mapping``), i.e.
``global = tp_rank + TP * (pp_rank + PP * dp_rank)``. Replica k is then the block of
consecutive global ranks ``[k * R, (k + 1) * R)`` with ``R = TP * PP * inner_dp``: with 8
GPUs per node and R = 8 it is exactly node k, so the pipeline's activations, the tensor
parallel all-reduces and the per-step gradient all-reduce stay on the node, and only the
replica groups (the outer sync) cross nodes. (Megatron's default ``tp-cp-ep-dp-pp`` puts
one pipeline stage of every replica on a node instead.) :func:`rank_layout` is that
arithmetic as a pure function.

Groups (all created with ``backend=None`` and the run's timeout; see :mod:`megatron_ppu.comm`):

* ``inner_dp_group``: the DP ranks of this rank's replica (same TP/PP position).
  Megatron's DDP all-reduces gradients here every step.
* ``replica_group``: the ranks holding the same shard in every replica (same TP/PP
  position and same inner-DP rank). The DiLoCo outer all-reduce runs here, once per H
  steps; it is the only traffic over the slow links.
* ``replica_world_group``: every rank of this replica (TP x PP x inner-DP). Megatron's
  distributed optimizer reduces gradient statistics (norm for clipping, zero count,
  overflow flag) over it (``intra_dist_opt``).

Example, 8 ranks, TP=2, PP=1, K=2 replicas of inner_dp=2: replica 0 = ranks 0-3, replica 1
= ranks 4-7; inner-DP groups {0, 2}, {1, 3}, {4, 6}, {5, 7}; replica groups {0, 4},
{1, 5}, {2, 6}, {3, 7}.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch.distributed as dist
from megatron.core import parallel_state as ps

from .comm import DEFAULT_TIMEOUT_MINUTES, group_timeout
from .patches import compat

logger = logging.getLogger(__name__)

#: Megatron rank order: TP fastest, then PP, then DP (a replica = consecutive ranks).
RANK_ORDER = "tp-cp-ep-pp-dp"


@dataclass(frozen=True)
class RankLayout:
    """Global ranks of every group for ``world = TP x PP x DP`` under :data:`RANK_ORDER`,
    DP split into ``num_replicas`` replicas of ``inner_dp`` consecutive DP ranks.

    Attributes:
        replicas: replica k -> its global ranks (consecutive, ``TP * PP * inner_dp`` of them).
        inner_dp_groups: every inner-DP group (same TP/PP position, one replica).
        replica_groups: every replica group (same TP/PP position and inner-DP rank, all replicas).
        pp_groups: every pipeline group (same TP position and DP rank).
        tp_groups: every tensor-parallel group (same PP position and DP rank).
        dp_groups: every Megatron data-parallel group (same TP/PP position).
    """

    world_size: int
    tp: int
    pp: int
    num_replicas: int
    inner_dp: int
    replicas: List[List[int]] = field(default_factory=list)
    inner_dp_groups: List[List[int]] = field(default_factory=list)
    replica_groups: List[List[int]] = field(default_factory=list)
    pp_groups: List[List[int]] = field(default_factory=list)
    tp_groups: List[List[int]] = field(default_factory=list)
    dp_groups: List[List[int]] = field(default_factory=list)

    def replica_of(self, rank: int) -> int:
        """The replica a global rank belongs to."""
        return rank // (self.tp * self.pp * self.inner_dp)


def rank_layout(world_size: int, tp: int, pp: int, num_replicas: int) -> RankLayout:
    """The layout arithmetic (pure; no process groups): see :class:`RankLayout`.

    Raises ``ValueError`` when TP x PP does not divide the world or K the DP size.
    """
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by TP {tp} x PP {pp}; launch a "
                         f"multiple of {tp * pp} processes.")
    dp = world_size // (tp * pp)
    if num_replicas < 1 or dp % num_replicas:
        raise ValueError(f"--diloco-replicas {num_replicas} must divide the data-parallel size {dp} "
                         f"(world size / (TP x PP)); valid values: {[d for d in range(1, dp + 1) if dp % d == 0]}.")
    inner = dp // num_replicas

    def g(t: int, p: int, d: int) -> int:
        return t + tp * (p + pp * d)

    block = tp * pp * inner
    return RankLayout(
        world_size=world_size, tp=tp, pp=pp, num_replicas=num_replicas, inner_dp=inner,
        replicas=[list(range(k * block, (k + 1) * block)) for k in range(num_replicas)],
        inner_dp_groups=[[g(t, p, k * inner + i) for i in range(inner)]
                         for k in range(num_replicas) for p in range(pp) for t in range(tp)],
        replica_groups=[[g(t, p, k * inner + i) for k in range(num_replicas)]
                        for i in range(inner) for p in range(pp) for t in range(tp)],
        pp_groups=[[g(t, p, d) for p in range(pp)] for d in range(dp) for t in range(tp)],
        tp_groups=[[g(t, p, d) for t in range(tp)] for d in range(dp) for p in range(pp)],
        dp_groups=[[g(t, p, d) for d in range(dp)] for p in range(pp) for t in range(tp)],
    )


def initialize_model_parallel(tensor_model_parallel_size: int, pipeline_model_parallel_size: int, *,
                              timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Megatron's ``initialize_model_parallel`` with the project's rules: replica-major rank
    order (:data:`RANK_ORDER`), no gloo twins of its groups (every group inherits the
    default group's backends, see :mod:`megatron_ppu.comm`) and the run's timeout."""
    group_timeout(timeout_minutes)  # validates
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        order=RANK_ORDER, create_gloo_process_groups=False,
        distributed_timeout_minutes=timeout_minutes)


@dataclass
class ReplicaLayout:
    """This rank's place among the K replicas.

    Attributes:
        num_replicas: K.
        inner_dp: data-parallel ranks per replica (1 in the paper's setting).
        replica_index: k, the replica this rank belongs to.
        inner_dp_rank: this rank's index inside its replica's DP group.
        replica_group: process group across replicas (outer sync).
        inner_dp_group: process group inside the replica (per-step gradient all-reduce).
        replica_world_group: every rank of this replica (Megatron's ``intra_dist_opt``).
        replica_ranks: global ranks of this replica.
        timeout: the timeout every group of the run is created with.
    """

    num_replicas: int
    inner_dp: int
    replica_index: int
    inner_dp_rank: int
    replica_group: Any
    inner_dp_group: Any
    replica_world_group: Any = None
    replica_ranks: List[int] = field(default_factory=list)
    timeout: timedelta = field(default_factory=lambda: group_timeout(DEFAULT_TIMEOUT_MINUTES))

    def slice_index(self, num_slices: int) -> int:
        """n = k mod N."""
        return self.replica_index % num_slices

    def process_group_collection(self):
        """Megatron ProcessGroupCollection in which every group is this replica's own, for
        ``DistributedDataParallel(pg_collection=...)``, ``finalize_model_grads`` and
        ``get_megatron_optimizer``.

        Megatron's data-parallel groups become the inner-DP group and ``intra_dist_opt``
        (the distributed optimizer's gradient-norm / zero-count / overflow group) the
        replica's ranks; groups that would span replicas and that nothing of the
        project's reads (``tp_dp_cp``: MoE routing; ``inter_dist_opt``: several optimizer
        instances) are set to None, Megatron's convention for "not needed". Asserts that
        no group left in the collection contains a rank of another replica.
        """
        from megatron.core.process_groups_config import ProcessGroupCollection

        pgc = ProcessGroupCollection.use_mpu_process_groups()
        for name in compat.replica_data_parallel_fields():  # + the *_gtp_remat groups of megatron-core 0.19
            setattr(pgc, name, self.inner_dp_group)
        pgc.intra_dist_opt = self.replica_world_group
        pgc.tp_dp_cp = None
        pgc.inter_dist_opt = None
        mine = set(self.replica_ranks)
        for f in fields(pgc):
            value = getattr(pgc, f.name, None)
            for g in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(g, dist.ProcessGroup):
                    ranks = set(dist.get_process_group_ranks(g))
                    assert ranks <= mine, (f.name, sorted(ranks), sorted(mine))
        return pgc


def build_replica_layout(num_replicas: int, *, timeout: Optional[timedelta] = None) -> ReplicaLayout:
    """Split Megatron's DP groups into ``num_replicas`` replicas (collective: call on all ranks).

    ``megatron.core.parallel_state.initialize_model_parallel`` must have run (with any rank
    order; the trainer uses :func:`initialize_model_parallel`). Every group is created with
    ``backend=None`` (inherits the default group's backends) and ``timeout``. Also gathers
    every rank's host name and logs (rank 0) when a replica spans several hosts or several
    replicas share one. Raises ``ValueError`` if K does not divide the data-parallel size.
    """
    timeout = timeout if timeout is not None else group_timeout(DEFAULT_TIMEOUT_MINUTES)
    dp = ps.get_data_parallel_world_size()
    if num_replicas < 1 or dp % num_replicas != 0:
        raise ValueError(
            f"--diloco-replicas {num_replicas} must divide the data-parallel size {dp} "
            f"(world size / (TP x PP)); valid values: "
            f"{[d for d in range(1, dp + 1) if dp % d == 0]}."
        )
    inner = dp // num_replicas
    my_dp_ranks = dist.get_process_group_ranks(ps.get_data_parallel_group())
    world = dist.get_world_size()
    gathered: List[Optional[tuple]] = [None] * world
    dist.all_gather_object(gathered, (my_dp_ranks, socket.gethostname()))
    dp_groups = sorted({tuple(g[0]) for g in gathered})
    hosts = [g[1] for g in gathered]
    me = dist.get_rank()
    replica_group = inner_group = None
    members_of: Dict[int, List[int]] = {k: [] for k in range(num_replicas)}
    # Every rank must create every group, in the same order.
    for ranks in dp_groups:
        for r in range(num_replicas):
            members = list(ranks[r * inner:(r + 1) * inner])
            members_of[r] += members
            g = dist.new_group(members, timeout=timeout)
            if me in members:
                inner_group = g
        for i in range(inner):
            members = list(ranks[i::inner])
            g = dist.new_group(members, timeout=timeout)
            if me in members:
                replica_group = g
    dp_rank = ps.get_data_parallel_rank()
    k = dp_rank // inner
    if num_replicas == 1:
        replica_world = dist.group.WORLD
    else:
        replica_world = None
        for r in range(num_replicas):
            g = dist.new_group(sorted(members_of[r]), timeout=timeout)
            if r == k:
                replica_world = g
    if me == 0:
        _log_placement({r: sorted(m) for r, m in members_of.items()}, hosts)
    return ReplicaLayout(
        num_replicas=num_replicas, inner_dp=inner, replica_index=k,
        inner_dp_rank=dp_rank % inner, replica_group=replica_group,
        inner_dp_group=inner_group, replica_world_group=replica_world,
        replica_ranks=sorted(members_of[k]), timeout=timeout,
    )


def build_ft_replica_layout(num_slots: int, slot: int, *, timeout: Optional[timedelta] = None) -> ReplicaLayout:
    """``--fault-tolerance torchft``: this torchrun world is one replica, in slot ``slot`` of
    ``num_slots`` (collective over the world). Its groups are the replica's own (every DP rank is
    inner-DP); ``num_replicas`` / ``replica_index`` are the run's K and this job's slot (the PPU slice
    ``slot mod N``, SDP holdings); there is no static cross-replica group (``replica_group`` None:
    :class:`~megatron_ppu.sync.torchft_replicas.TorchFTReplicas` forms it per quorum)."""
    assert 0 <= slot < num_slots, (slot, num_slots)
    local = build_replica_layout(1, timeout=timeout)
    return dataclasses.replace(local, num_replicas=num_slots, replica_index=slot, replica_group=None)


def placement_report(replicas: Dict[int, List[int]], hosts: List[str]) -> List[tuple]:
    """``(level, message)`` lines about how replicas sit on hosts (pure).

    ``replicas``: replica -> global ranks; ``hosts[r]``: host name of rank r. A replica that
    spans several hosts is a warning (its per-step traffic crosses the inter-node links);
    several replicas on one host is a warning on a multi-host run, and one informative line
    when every rank is on a single host (a test machine).
    """
    out = []
    by_replica = {k: sorted({hosts[r] for r in ranks}) for k, ranks in replicas.items()}
    for k, hs in by_replica.items():
        if len(hs) > 1:
            out.append((logging.WARNING,
                        f"replica {k} (ranks {replicas[k][0]}-{replicas[k][-1]}) spans hosts {hs}: its "
                        "per-step gradient, tensor- and pipeline-parallel traffic crosses the links "
                        "between them; launch TP x PP x inner-DP ranks per node (or a multiple)."))
    shared: Dict[str, List[int]] = {}
    for k, hs in by_replica.items():
        for h in hs:
            shared.setdefault(h, []).append(k)
    crowded = {h: ks for h, ks in shared.items() if len(ks) > 1}
    if crowded:
        if len(set(hosts)) == 1:
            out.append((logging.INFO, f"all {len(replicas)} replicas run on one host ({hosts[0]}): fine for a "
                                      "test; on a cluster each replica gets its own node(s)."))
        else:
            out.append((logging.WARNING,
                        "several replicas share a host: " + "; ".join(f"{h}: replicas {ks}" for h, ks in crowded.items())
                        + " — the outer sync between them does not test the slow link, and the host's "
                        "memory and links are shared."))
    return out


def _log_placement(replicas: Dict[int, List[int]], hosts: List[str]) -> None:
    for level, msg in placement_report(replicas, hosts):
        logger.log(level, msg)
