#!/usr/bin/env python
"""``pretrain_gpt_ppu.py`` plus a recorder of every outer fragment sync (for
``tests/test_fault_tolerance_reference.py``).

    torchrun ... tests/ft_trace_worker.py --trace-dir DIR <the trainer's flags>

Runs exactly what ``pretrain_gpt_ppu.py`` runs (:func:`megatron_ppu.training.loop.main`, the same
exit code 2 on a user error) with an observer on the outer loop
(:meth:`megatron_ppu.sync.diloco.DiLoCoSync.add_sync_observer`): every fragment sync of every rank
is written to ``DIR/slot<K>-rank<r>-pid<P>-<n>.pt`` (``torch.save`` of a dict: the slot, the
process, the sync's inner step, fragment, parameter names, live slots, whether it was committed,
this replica's local values, θ(t) and the outer momentum before and after), each file written
to a temporary name and renamed, so a SIGKILL leaves no partial record.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_ppu.sync.reports import SyncObservation
from megatron_ppu.training.loop import main


class Recorder:
    """Writes one file per :class:`SyncObservation` of this rank into ``trace_dir``."""

    def __init__(self, trace_dir: str, slot: int):
        self.dir, self.slot, self.count = trace_dir, slot, 0
        self.prefix = f"slot{slot}-rank{dist.get_rank()}-pid{os.getpid()}"

    def __call__(self, seen: SyncObservation) -> None:
        r = seen.report
        record = {"slot": self.slot, "rank": dist.get_rank(), "pid": os.getpid(), "seq": self.count, "t": time.time(),
                  "step": r.step, "applied_step": r.applied_step, "fragment": r.fragment, "live": list(r.live),
                  "committed": seen.committed, "names": seen.names, "local": seen.local,
                  "theta_before": seen.theta_before, "theta_after": seen.theta_after,
                  "momentum_before": seen.momentum_before, "momentum_after": seen.momentum_after}
        path = os.path.join(self.dir, f"{self.prefix}-{self.count:05d}.pt")
        torch.save(record, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.count += 1


def attach(trace_dir: str):
    def before_train(trainer) -> None:
        sync = trainer.sync
        if not hasattr(sync, "add_sync_observer"):
            raise ValueError("tests/ft_trace_worker.py records the DiLoCo outer syncs: give --diloco-local-steps > 0")
        slot = trainer.args.fault_tolerance.replica_id if trainer.args.fault_tolerance.enabled else 0
        sync.add_sync_observer(Recorder(trace_dir, slot))
    return before_train


if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--trace-dir":
        print("usage: ft_trace_worker.py --trace-dir DIR <pretrain_gpt_ppu.py flags>", file=sys.stderr)
        sys.exit(2)
    trace_dir, argv = argv[1], argv[2:]
    os.makedirs(trace_dir, exist_ok=True)
    try:
        main(argv, attach(trace_dir))
    except ValueError as e:  # as pretrain_gpt_ppu.py
        print(f"pretrain_gpt_ppu.py: error: {e}", file=sys.stderr)
        sys.exit(2)
