"""One single-process replica of tests/test_fault_tolerance.py: a scripted series of syncs of known
tensors through :class:`megatron_ppu.sync.torchft_replicas.TorchFTReplicas`.

At sync number s (the count of syncs committed before it, the same on every replica that is in
step), slot k contributes x_k(s)[i] = 1000 (k + 1) + 7 s + (i mod 13) (integers: fp32 sums are
exact) when it is live, else zeros. Its state ``acc`` is the running sum of the committed fp32
results (what a heal hands over). One JSON line per sync: the live slots, whether it committed,
the fp32 and int8 results, ``acc``.

argv: slot K lighthouse out_path stop_path [kill_at_sync]
With ``kill_at_sync``: at the first sync numbered >= it whose quorum holds every slot, the replica
SIGKILLs itself in the middle of the sync (after the fp32 reduction, before the int8 one).
"""
import json
import logging
import os
import signal
import sys
import time

import psutil
import torch

from megatron_ppu.config import FaultToleranceConfig
from megatron_ppu.sync.torchft_replicas import TorchFTReplicas, state_checksum

N = 20000  # values per contribution


def contribution(slot: int, s: int, n: int = N) -> torch.Tensor:
    return (1000.0 * (slot + 1) + 7.0 * s + (torch.arange(n) % 13)).to(torch.float32)


def main():
    slot, num_slots, lighthouse, out_path, stop_path = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                                        sys.argv[4], sys.argv[5])
    kill_at = int(sys.argv[6]) if len(sys.argv) > 6 else None
    logging.basicConfig(level=logging.WARNING)
    cfg = FaultToleranceConfig(mode="torchft", lighthouse=lighthouse, replica_id=slot, bind_address="127.0.0.1",
                               timeout=20.0, quorum_timeout=120.0, connect_timeout=30.0, heartbeat_interval=0.2)
    settings = {"hidden_size": 64, "slices": 2, "version": "test"}
    if os.environ.get("FT_TEST_HIDDEN"):
        settings["hidden_size"] = int(os.environ["FT_TEST_HIDDEN"])
    t = TorchFTReplicas(cfg, num_slots, settings)
    acc = {"acc": torch.zeros(N)}
    # the schedule position: the sync count, and a digest of the state every running replica must share
    t.register_state(lambda: {"acc": acc["acc"].clone()}, lambda sd: acc.update(acc=sd["acc"].clone()),
                     lambda: (t.syncs, int(state_checksum(acc["acc"])[:15], 16)))
    t.mark_joined()  # no join protocol here: a replica contributes from its first sync unless it heals
    with open(out_path, "a") as out:
        out.write(json.dumps({"event": "up", "slot": slot, "pid": os.getpid(), "t": time.time()}) + "\n")
        out.flush()
        dumped = False
        while True:
            target = None
            if os.path.exists(stop_path):
                target = int(open(stop_path).read().strip() or 10 ** 9)
            if target is not None and t.syncs >= target:
                break
            t0 = time.time()
            heals = t.heals
            live = t.begin_sync()
            s = t.syncs
            x = contribution(slot, s) if slot in live else torch.zeros(N)
            q = x.clone()
            t.sum_(x)
            if kill_at is not None and s >= kill_at and tuple(live) == tuple(range(num_slots)):
                # die between the two reductions of the sync: the others hold a complete fp32 sum and
                # are in the int8 all-to-all with this replica when it disappears
                out.write(json.dumps({"event": "dying", "slot": slot, "sync": s, "t": time.time()}) + "\n")
                out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            t.sum_(q, kind="int8", block=256)
            ok = t.agree(True)
            if ok:
                acc["acc"] += x
            out.write(json.dumps({"event": "sync", "slot": slot, "sync": s, "live": list(live), "committed": ok,
                                  "healed": t.heals > heals, "fp32": x[:26].tolist() if ok else None,
                                  "fp32_sum": float(x.double().sum()) if ok else None,
                                  "int8": q[:26].tolist() if ok else None,
                                  "int8_err": float((q - x).abs().max()) if ok else None,
                                  "acc_sum": float(acc["acc"].double().sum()), "acc0": float(acc["acc"][0]),
                                  "t0": t0, "t": time.time()}) + "\n")
            if ok and not dumped:  # every server is up once a sync has committed
                dumped = True
                listen = [[c.laddr.ip, c.laddr.port] for c in psutil.Process().net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
                out.write(json.dumps({"event": "sockets", "slot": slot, "listen": listen,
                                      "store_port": t.store_port}) + "\n")
            out.flush()
            time.sleep(0.2)  # the inner steps
        out.write(json.dumps({"event": "done", "slot": slot, "syncs": t.syncs, "t": time.time()}) + "\n")
    t.close()


if __name__ == "__main__":
    main()
