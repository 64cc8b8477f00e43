"""Every collective the trainer issues is served by its group's backend ON A CUDA CLUSTER, and the
inner steps never talk across replicas.

A recorder, installed in each rank (test code only, in the child processes), wraps the
``torch.distributed`` collectives and ``new_group`` and records, for every call, the tensor's
device type, the group (with the backend it was requested with) and the training phase.
Each recorded collective is then judged against what its group would serve on CUDA:
the default group gets the backend string ``init_distributed`` passes there
(``process_group_backend("cuda")``), a group made with ``backend=None`` inherits it, an
explicit backend maps through torch's own ``Backend.backend_capability`` (or its
``"dev:backend,..."`` string). On CPU every tensor is a host tensor, so a group that would
serve CUDA only (NCCL) is caught at the first collective on it.
"""
from __future__ import annotations

import functools
import inspect
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_ranks
from tests.conftest import data_flags
from tests.conftest import MODEL

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
               "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
               "batch_isend_irecv", "all_reduce_coalesced", "all_gather_coalesced")
# Object collectives pick their tensors' device from the group's backend themselves.
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "barrier", "monitored_barrier")
WORLD = "WORLD"


class Recorder:
    """Wraps torch.distributed functions in this process; see the module docstring."""

    def __init__(self):
        self.groups = {}  # key -> {"ranks", "backend", "timeout_s"}
        self._key_of = {}  # id(group) -> key (groups are kept alive in _alive)
        self._alive = []
        self.calls = []
        self.phase = "setup"
        self._depth = 0

    def key(self, group):
        if group is None or group is dist.group.WORLD:
            return WORLD
        return self._key_of.get(id(group), f"unknown:{id(group)}")

    def _first_tensor(self, values):
        for v in values:
            if isinstance(v, torch.Tensor):
                return v
            if isinstance(v, (list, tuple)):
                t = self._first_tensor(v)
                if t is not None:
                    return t
        return None

    def _record(self, name, orig, args, kwargs):
        if name == "batch_isend_irecv":
            for op in args[0] if args else kwargs["p2p_op_list"]:
                self.calls.append({"name": "batch_isend_irecv", "device": op.tensor.device.type,
                                   "group": self.key(op.group), "phase": self.phase})
            return
        ba = inspect.signature(orig).bind(*args, **kwargs)
        t = self._first_tensor(list(ba.arguments.values()))
        self.calls.append({"name": name, "device": t.device.type if t is not None else None,
                           "group": self.key(ba.arguments.get("group")), "phase": self.phase})

    def _wrap(self, name, orig):
        rec = self

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if rec._depth == 0 and name not in OBJECT_COLLECTIVES:
                rec._record(name, orig, args, kwargs)
            rec._depth += 1  # calls made inside a recorded one (object collectives) are its business
            try:
                return orig(*args, **kwargs)
            finally:
                rec._depth -= 1

        return wrapper

    def _wrap_new_group(self, orig):
        rec = self

        @functools.wraps(orig)
        def new_group(*args, **kwargs):
            ba = inspect.signature(orig).bind(*args, **kwargs)
            g = orig(*args, **kwargs)
            if isinstance(g, dist.ProcessGroup):
                key = f"g{len(rec.groups)}"
                rec._key_of[id(g)] = key
                rec._alive.append(g)
                timeout = ba.arguments.get("timeout")
                rec.groups[key] = {"ranks": dist.get_process_group_ranks(g), "backend": ba.arguments.get("backend"),
                                   "timeout_s": timeout.total_seconds() if isinstance(timeout, timedelta) else None}
            return g

        return new_group

    def install(self):
        """Replace the functions in torch.distributed and in every module that imported them by name."""
        replaced = {}
        for name in COLLECTIVES + OBJECT_COLLECTIVES + ("new_group",):
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            replaced[id(orig)] = self._wrap_new_group(orig) if name == "new_group" else self._wrap(name, orig)
        for mod in list(sys.modules.values()):
            try:
                items = list(vars(mod).items())
            except TypeError:
                continue
            for attr, val in items:
                if callable(val) and id(val) in replaced:
                    setattr(mod, attr, replaced[id(val)])
        self.groups[WORLD] = {"ranks": list(range(dist.get_world_size())), "backend": "default", "timeout_s": None}

    def phased(self, phase, fn):
        rec = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            before, rec.phase = rec.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                rec.phase = before

        return wrapper


def _recorded_worker(rank, world_size, runs):
    """Install the recorder, then run each argv through the trainer; return the records per run."""
    rec = Recorder()
    rec.install()
    from megatron_ppu.sync import diloco
    from megatron_ppu.training import loop

    loop.Trainer.train_step = rec.phased("inner", loop.Trainer.train_step)
    diloco.DiLoCoSync.after_inner_step = rec.phased("outer", diloco.DiLoCoSync.after_inner_step)
    out = []
    for argv in runs:
        rec.calls, rec.phase = [], "run"
        loop.run(argv)
        out.append({"calls": rec.calls, "groups": dict(rec.groups)})
    return out


def _cuda_default_backend() -> str:
    try:
        from megatron_ppu.comm import process_group_backend
    except ImportError:  # before megatron_ppu.comm existed, init_distributed passed "nccl" on CUDA
        return "nccl"
    return process_group_backend("cuda")


def _served(backend: str) -> set:
    """Device types a backend string serves, by torch's own table (``Backend.backend_capability``
    for a plain name, the ``"dev:backend,..."`` parsing for a string)."""
    from torch.distributed.distributed_c10d import BackendConfig

    return set(BackendConfig(dist.Backend(backend)).get_device_backend_map())


def _unserved(record):
    default = _cuda_default_backend()
    bad = []
    for c in record["calls"]:
        g = record["groups"].get(c["group"])
        assert g is not None, f"collective {c} on a group created before the recorder"
        backend = default if g["backend"] in (None, "default") else str(g["backend"])
        if c["device"] is not None and c["device"] not in _served(backend):
            bad.append((c["name"], c["device"], backend, g["ranks"], c["phase"]))
    return bad


@pytest.mark.timeout(900)
def test_every_collective_is_served_on_cuda_and_every_group_inherits_and_times_out(tiny_data, tmp_path):
    common = MODEL + data_flags(tiny_data) + ["--distributed-timeout-minutes", "7"]
    res = run_ranks(2, "tests.test_collective_devices:_recorded_worker", {"runs": [
        # DiLoCo (PPU), 2 replicas: inner steps, outer syncs, an evaluation, a save
        common + ["--train-iters", "4", "--ppu-slices", "2", "--diloco-local-steps", "2", "--eval-interval", "2",
                  "--save", str(tmp_path / "a")],
        # per-step SDP (sub-group all-reduces), forward masking: refresh at the save
        common + ["--train-iters", "2", "--subnet-plan", "blocks", "--subnet-coverage", "0.5",
                  "--subnet-masking", "forward", "--subnet-sync", "step", "--save", str(tmp_path / "b")],
    ]}, timeout=850)
    for rank_records in res:
        assert any(c["phase"] == "outer" for c in rank_records[0]["calls"])  # DiLoCo syncs were recorded
        assert any(c["group"] == WORLD and c["device"] == "cpu" for c in rank_records[0]["calls"])  # loss means
        for record in rank_records:
            assert {c["phase"] for c in record["calls"]} >= {"inner", "run"}
            bad = _unserved(record)
            assert not bad, f"{len(bad)} collectives whose device the group does not serve on CUDA, e.g. {bad[:5]}"
            created = [g for k, g in record["groups"].items() if k != "WORLD"]
            explicit = [g for g in created if g["backend"] is not None]
            assert not explicit, f"groups created with an explicit backend (must inherit): {explicit[:5]}"
            untimed = [g for g in created if g["timeout_s"] != 7 * 60]
            assert not untimed, f"groups without --distributed-timeout-minutes 7: {untimed[:5]}"


def _cross_replica_inner_calls(record, world, replicas):
    per = world // replicas  # TP = PP = 1: replica k = global ranks [k*per, (k+1)*per) (DP rank = global rank)
    bad = []
    for c in record["calls"]:
        if c["phase"] != "inner":
            continue
        ranks = record["groups"][c["group"]]["ranks"]
        if len({r // per for r in ranks}) > 1:
            bad.append((c["name"], ranks))
    return bad


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world,replicas", [(2, 2), (4, 2)], ids=["2-replicas", "2-replicas-x-inner-dp-2"])
def test_distributed_optimizer_inner_steps_stay_in_the_replica(tiny_data, world, replicas):
    argv = MODEL + data_flags(tiny_data) + [
        "--train-iters", "2", "--diloco-local-steps", "100", "--diloco-replicas", str(replicas),
        "--use-distributed-optimizer", "--clip-grad", "1.0", "--eval-interval", "100"]
    res = run_ranks(world, "tests.test_collective_devices:_recorded_worker", {"runs": [argv]}, timeout=850)
    for rank_records in res:
        record = rank_records[0]
        assert any(c["phase"] == "inner" for c in record["calls"])
        bad = _cross_replica_inner_calls(record, world, replicas)
        assert not bad, f"inner-step collectives over ranks of several replicas: {bad[:5]}"
