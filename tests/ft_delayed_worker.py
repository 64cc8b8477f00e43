"""One single-process replica of ``tests/test_fault_tolerance_delayed.py``'s hand-computed case: the
real outer loop (:class:`megatron_ppu.sync.diloco.DiLoCoSync`, τ = 1, α = 0.5) over the real torchft
transport on a 2 x 2 weight, with scripted inner steps (slot k adds 0.05 (k + 1) to every element).

argv: slot K lighthouse out_path up_dir [die]
With ``die``: this replica SIGKILLs itself on the delayed sync's background thread, in the cross-replica
sum of the first sync launched after one committed sync with every slot live, 1 s after entering it
(the others are blocked in the same reduction by then). Writes one JSON object (per-step local value,
snapshot value, reports, the final value) to ``out_path``.
"""
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time

import torch

from megatron_ppu.config import DiLoCoConfig, FaultToleranceConfig
from megatron_ppu.ownership import build_ownership_plan
from megatron_ppu.sync.diloco import DiLoCoSync
from megatron_ppu.sync.torchft_replicas import TorchFTReplicas
from megatron_ppu.training import fault_tolerance


class DyingReplicas(TorchFTReplicas):
    """The transport of the replica that dies in the middle of a delayed reduction (see the module docstring)."""

    out_path = ""

    def sum_(self, buf, **kw):
        if (threading.current_thread().name.startswith("diloco-outer-sync") and self.syncs >= 1
                and tuple(self.live) == tuple(range(self.num_slots))):
            with open(self.out_path, "w") as f:
                json.dump({"event": "dying", "sync": self.syncs, "t": time.time()}, f)
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().sum_(buf, **kw)


def main():
    slot, k, lighthouse, out_path, up_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    die = len(sys.argv) > 6 and sys.argv[6] == "die"
    logging.basicConfig(level=logging.WARNING)
    cfg = FaultToleranceConfig(mode="torchft", lighthouse=lighthouse, replica_id=slot, bind_address="127.0.0.1",
                               timeout=60.0, quorum_timeout=120.0, connect_timeout=30.0, heartbeat_interval=0.2)
    if die:
        DyingReplicas.out_path = out_path
    transport = (DyingReplicas if die else TorchFTReplicas)(cfg, k, {"case": "hand-computed delayed sync"})
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    plan = build_ownership_plan(model, num_replicas=k, num_slices=1, replica_index=slot)
    loop = DiLoCoSync(model, plan, transport, DiLoCoConfig(local_steps=2, outer_lr=0.5, outer_momentum=0.9,
                                                           num_replicas=k, sync_delay=1, merge_alpha=0.5))
    fault_tolerance.attach(loop, transport)
    transport.mark_joined()  # every replica starts together (below): each contributes from the first sync
    up = pathlib.Path(up_dir)
    (up / str(slot)).write_text("up")  # the manager heartbeats from here on: the first quorum waits for all
    deadline = time.time() + 120
    while len(list(up.iterdir())) < k:
        assert time.time() < deadline, "the other replicas did not start"
        time.sleep(0.1)
    local, snap, reports, records = [], [], [], {}
    for s in range(1, 8):
        with torch.no_grad():
            model.weight.add_(0.05 * (slot + 1))
        reports.append([(r.step, r.applied_step, r.skipped, list(r.live)) for r in loop.after_inner_step()])
        local.append(float(model.weight[0, 0]))
        snap.append(float(loop.fragments[0].snapshot[0][0, 0]))
        if s in (2, 4):  # a checkpoint's record of the sync in flight (waited for, not applied)
            rec, ft = loop.state_dict()["in_flight"], transport.state_dict()
            records[s] = {"fragment": rec["fragment"], "launched": rec["launched"], "due": rec["due"],
                          "averaged": None if rec["averaged"] is None else float(rec["averaged"][0][0, 0]),
                          "syncs": ft["syncs"], "history": ft["history"]}
    final = [(r.step, r.applied_step, r.skipped, list(r.live)) for r in loop.finish()]
    with open(out_path, "w") as f:
        json.dump({"local": local, "snap": snap, "reports": reports, "final": final, "records": records,
                   "final_value": float(model.weight[0, 0]),
                   "uniform": bool((model.weight == model.weight[0, 0]).all())}, f)
    transport.close()


if __name__ == "__main__":
    main()
