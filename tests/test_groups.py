"""Rank placement: a replica is TP x PP x inner-DP consecutive global ranks (a node or a block of
nodes); the arithmetic against hand-derived tables and Megatron's own rank generator, and the
groups Megatron + parallel.py really build on 4 CPU ranks."""
import logging

import pytest

from megatron_ppu.comm import group_timeout, process_group_backend, suggested_timeout_minutes
from megatron_ppu.parallel import RANK_ORDER, placement_report, rank_layout
from tests.harness import run_ranks

# (GPUs per node, TP, PP, inner-DP, K)
TABLE = [(8, 2, 2, 2, 4), (8, 1, 2, 4, 2), (8, 1, 1, 8, 4), (8, 2, 1, 1, 8), (8, 4, 4, 1, 2), (8, 8, 1, 1, 3),
         (4, 2, 2, 1, 4), (8, 1, 8, 1, 2)]


@pytest.mark.parametrize("gpn,tp,pp,idp,k", TABLE)
def test_replica_is_a_block_of_consecutive_ranks_on_its_own_nodes(gpn, tp, pp, idp, k):
    world, size = tp * pp * idp * k, tp * pp * idp
    lay = rank_layout(world, tp, pp, k)
    assert lay.inner_dp == idp
    assert lay.replicas == [list(range(r * size, (r + 1) * size)) for r in range(k)]

    def node(rank):
        return rank // gpn

    for r, ranks in enumerate(lay.replicas):
        nodes = sorted({node(x) for x in ranks})
        if size <= gpn:  # a replica fits on one node ...
            assert len(nodes) == 1
        else:  # ... or fills whole nodes of its own
            assert nodes == list(range(r * size // gpn, (r + 1) * size // gpn))
    replica = {x: r for r, ranks in enumerate(lay.replicas) for x in ranks}
    for groups in (lay.pp_groups, lay.tp_groups, lay.inner_dp_groups):  # never leave a replica
        assert sorted(x for g in groups for x in g) == list(range(world))  # a partition of the world
        for g in groups:
            assert len({replica[x] for x in g}) == 1, g
    for g in lay.replica_groups:  # one rank in every replica
        assert sorted(replica[x] for x in g) == list(range(k))
    assert sorted(x for g in lay.replica_groups for x in g) == list(range(world))
    assert all(len(g) == pp for g in lay.pp_groups) and all(len(g) == tp for g in lay.tp_groups)


def test_hand_derived_groups_of_16_gpus_tp2_pp2_idp2_k4():
    """8 GPUs per node, TP 2, PP 2, inner-DP 2, K 4: replica k on global ranks 8k ... 8k+7."""
    lay = rank_layout(32, 2, 2, 4)
    assert lay.replicas == [list(range(8 * r, 8 * r + 8)) for r in range(4)]
    # global = tp + 2 * (pp + 2 * dp)
    assert [0, 2] in lay.pp_groups and [1, 3] in lay.pp_groups and [4, 6] in lay.pp_groups
    assert [0, 1] in lay.tp_groups
    assert [0, 4] in lay.inner_dp_groups and [8, 12] in lay.inner_dp_groups
    assert [0, 8, 16, 24] in lay.replica_groups and [7, 15, 23, 31] in lay.replica_groups


@pytest.mark.parametrize("gpn,tp,pp,idp,k", TABLE)
def test_arithmetic_matches_megatrons_rank_generator(gpn, tp, pp, idp, k):
    from megatron.core.parallel_state import RankGenerator

    world = tp * pp * idp * k
    gen = RankGenerator(tp=tp, ep=1, dp=idp * k, pp=pp, cp=1, order=RANK_ORDER)
    lay = rank_layout(world, tp, pp, k)
    assert sorted(gen.get_ranks("pp")) == sorted(lay.pp_groups)
    assert sorted(gen.get_ranks("tp")) == sorted(lay.tp_groups)
    assert sorted(gen.get_ranks("dp")) == sorted(lay.dp_groups)


def test_megatrons_default_order_would_put_one_stage_of_every_replica_on_a_node():
    """Why the order is changed: 16 GPUs, PP 2, DP 8 (K 8) under tp-cp-ep-dp-pp."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=1, ep=1, dp=8, pp=2, cp=1, order="tp-cp-ep-dp-pp")
    assert [0, 8] in gen.get_ranks("pp")  # stage 0 on node 0, stage 1 on node 1 for every replica
    assert [0, 1] in rank_layout(16, 1, 2, 8).pp_groups  # ours: both stages of replica 0 on node 0


def test_layout_refuses_bad_sizes_with_the_fix():
    with pytest.raises(ValueError, match="valid values: \\[1, 2, 4\\]"):
        rank_layout(8, 2, 1, 3)
    with pytest.raises(ValueError, match="not divisible by TP 3"):
        rank_layout(8, 3, 1, 1)


def test_placement_report():
    two_nodes = ["a"] * 4 + ["b"] * 4
    assert placement_report({0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, two_nodes) == []
    lines = placement_report({0: [0, 1, 2, 3, 4, 5], 1: [6, 7]}, two_nodes)
    assert [lvl for lvl, _ in lines] == [logging.WARNING, logging.WARNING]
    assert "replica 0" in lines[0][1] and "spans hosts ['a', 'b']" in lines[0][1]
    assert "b: replicas [0, 1]" in lines[1][1]
    one = placement_report({0: [0], 1: [1]}, ["h", "h"])
    assert len(one) == 1 and one[0][0] == logging.INFO and "one host" in one[0][1]


def test_backend_rule_and_timeout_sizing():
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import BackendConfig

    # torch's own parsing: on CUDA every group serves host tensors over gloo, device tensors over NCCL
    assert BackendConfig(dist.Backend(process_group_backend("cuda"))).get_device_backend_map() == {
        "cpu": "gloo", "cuda": "nccl"}
    assert set(BackendConfig(dist.Backend(process_group_backend("cpu"))).get_device_backend_map()) >= {"cpu"}
    # 1.3B-ish fp32 shard (5.2 GB) over 100 Mbit/s (12.5 MB/s), K = 32: ring all-reduce 2(K-1)/K x M / B
    sync_s = 2 * 31 / 32 * 5.2e9 / 12.5e6  # 806 s, more than Megatron's default 10 minutes
    assert suggested_timeout_minutes(sync_s) == 41  # ceil(3 x 806 / 60)
    assert suggested_timeout_minutes(1.0) == 10
    with pytest.raises(ValueError, match="--distributed-timeout-minutes 0"):
        group_timeout(0)


def _groups_worker(rank, world_size, configs):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ppu.parallel import build_replica_layout, initialize_model_parallel

    out = []
    for tp, pp, k in configs:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        initialize_model_parallel(tp, pp)
        lay = build_replica_layout(k)
        lay.process_group_collection()  # asserts every group in it is the replica's own
        ranks = dist.get_process_group_ranks
        out.append({"tp": ranks(ps.get_tensor_model_parallel_group()), "pp": ranks(ps.get_pipeline_model_parallel_group()),
                    "dp": ranks(ps.get_data_parallel_group()), "inner": ranks(lay.inner_dp_group),
                    "replica": ranks(lay.replica_group), "replica_world": ranks(lay.replica_world_group),
                    "replica_index": lay.replica_index, "replica_ranks": lay.replica_ranks})
    return out


@pytest.mark.timeout(600)
def test_real_groups_match_the_arithmetic_on_4_ranks():
    configs = [(2, 1, 2), (1, 2, 2)]  # TP2 x 2 replicas, PP2 x 2 replicas
    res = run_ranks(4, "tests.test_groups:_groups_worker", {"configs": configs}, timeout=500)
    for i, (tp, pp, k) in enumerate(configs):
        lay = rank_layout(4, tp, pp, k)
        for rank, per_rank in enumerate(res):
            got = per_rank[i]

            def mine(groups):
                return next(g for g in groups if rank in g)

            assert got["tp"] == mine(lay.tp_groups) and got["pp"] == mine(lay.pp_groups)
            assert got["dp"] == mine(lay.dp_groups) and got["inner"] == mine(lay.inner_dp_groups)
            assert got["replica"] == mine(lay.replica_groups)
            assert got["replica_world"] == got["replica_ranks"] == mine(lay.replicas) == ([0, 1] if rank < 2 else [2, 3])
            assert got["replica_index"] == lay.replica_of(rank) == rank // 2
