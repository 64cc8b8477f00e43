"""Replica process groups on top of ``megatron.core.parallel_state``.

Megatron's data-parallel (DP) ranks of one (TP, PP) position are split into K
*replicas* (DiLoCo's nodes) of ``inner_dp = DP / K`` consecutive DP ranks each.
Consecutive DP ranks sit on the same node under Megatron's default rank order,
so a replica maps to the fast links inside a node:

* ``inner_dp_group``: the DP ranks of this rank's replica (same TP/PP position).
  Megatron's DDP all-reduces gradients here every step.
* ``replica_group``: the ranks holding the same shard in every replica (same
  TP/PP position and same inner-DP rank). The DiLoCo outer all-reduce runs here,
  once per H steps; it is the only traffic over the slow links.

Example, 8 GPUs, TP=2, DP=4, K=2 replicas (inner_dp=2): DP group of TP rank 0
is global ranks [0, 2, 4, 6]; replica 0 = {0, 2}, replica 1 = {4, 6}; the
replica groups are {0, 4} and {2, 6}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch.distributed as dist
from megatron.core import parallel_state as ps


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
        inner_dp_group_gloo: gloo twin of ``inner_dp_group`` (Megatron's optimizer wants one).
    """

    num_replicas: int
    inner_dp: int
    replica_index: int
    inner_dp_rank: int
    replica_group: Any
    inner_dp_group: Any
    inner_dp_group_gloo: Any

    def slice_index(self, num_slices: int) -> int:
        """n = k mod N."""
        return self.replica_index % num_slices

    def process_group_collection(self):
        """Megatron ProcessGroupCollection whose data-parallel groups are the inner-DP group,
        for ``DistributedDataParallel(pg_collection=...)`` and ``get_megatron_optimizer``."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        pgc = ProcessGroupCollection.use_mpu_process_groups()
        for name in ("dp", "dp_cp", "intra_dp_cp", "expt_dp", "intra_expt_dp"):
            setattr(pgc, name, self.inner_dp_group)
        return pgc


def build_replica_layout(num_replicas: int, *, group_backend: Optional[str] = None) -> ReplicaLayout:
    """Split Megatron's DP groups into ``num_replicas`` replicas (collective: call on all ranks).

    ``megatron.core.parallel_state.initialize_model_parallel`` must have run.
    Raises ``ValueError`` if K does not divide the data-parallel size.
    """
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
    gathered: List[Optional[list]] = [None] * world
    dist.all_gather_object(gathered, my_dp_ranks)
    dp_groups = sorted({tuple(g) for g in gathered})
    me = dist.get_rank()
    replica_group = inner_group = inner_gloo = None
    # Every rank must create every group, in the same order.
    for ranks in dp_groups:
        for r in range(num_replicas):
            members = list(ranks[r * inner:(r + 1) * inner])
            g = dist.new_group(members, backend=group_backend)
            g_gloo = dist.new_group(members, backend="gloo")
            if me in members:
                inner_group, inner_gloo = g, g_gloo
        for i in range(inner):
            members = list(ranks[i::inner])
            g = dist.new_group(members, backend=group_backend)
            if me in members:
                replica_group = g
    dp_rank = ps.get_data_parallel_rank()
    return ReplicaLayout(
        num_replicas=num_replicas, inner_dp=inner, replica_index=dp_rank // inner,
        inner_dp_rank=dp_rank % inner, replica_group=replica_group,
        inner_dp_group=inner_group, inner_dp_group_gloo=inner_gloo,
    )
