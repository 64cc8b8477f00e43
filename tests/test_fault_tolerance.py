"""Replicas as independent jobs over torchft (issue 24): the transport, the bind patch, the flags.

Every process is started by the test, reaped by its PID (process groups), its exit code checked;
the lighthouse (torchft's own ``torchft_lighthouse``, on 127.0.0.1) is stopped by the test. The
references are hand-computed: the sums of the known contributions of the live slots
(``tests/ft_transport_worker.py``).
"""
from __future__ import annotations

import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import time
from typing import Dict, List

import psutil

import pytest

from tests.ft_jobs import (HEARTBEAT_TIMEOUT_S, JOIN_TIMEOUT_S, LIGHTHOUSE, ROOT, Lighthouse, assert_one_model, each,
                           iteration, kill_and_restart_the_last_slot, kill_tree, quorums, reap, records, start,
                           stop_all, trainer_cmd, wait_for)

WORKER = ROOT / "tests" / "ft_transport_worker.py"

pytestmark = pytest.mark.skipif(not LIGHTHOUSE.exists(), reason="torchft is not installed (scripts/setup_env.sh)")


def _x(slot: int, s: int, i: int) -> float:
    """The worker's contribution x_slot(s)[i] (tests/ft_transport_worker.py), recomputed here."""
    return 1000.0 * (slot + 1) + 7.0 * s + (i % 13)


def _worker_cmd(slot, k, lh, out, stop, kill_at=None):
    cmd = [sys.executable, str(WORKER), str(slot), str(k), lh.addr, str(out), str(stop)]
    return cmd + ([str(kill_at)] if kill_at is not None else [])


@pytest.mark.timeout(600)
def test_three_replicas_one_killed_mid_sync_survivors_go_on_and_the_restarted_one_heals(tmp_path):
    """Lighthouse + 3 single-process replicas syncing known tensors; slot 2 SIGKILLs itself in the
    middle of a reduction once all three are in step. Checked: every committed sync's fp32 result is
    the hand-computed sum over its live slots; every replica that committed sync s has the same live
    set, result and state (no sync applied on some survivors only); the survivors commit again
    within the heartbeat + join timeouts; the restarted slot 2 heals (state = the survivors') and
    takes part again; the int8 path (ours, over the torchft group, on CPU) agrees on every replica
    and is within its quantization bound."""
    k = 3
    lh = Lighthouse(tmp_path)
    stop = tmp_path / "stop"
    outs = {s: tmp_path / f"slot{s}.jsonl" for s in range(k)}
    procs: Dict[str, subprocess.Popen] = {}
    try:
        for s in range(k):
            procs[f"slot{s}"] = start(_worker_cmd(s, k, lh, outs[s], stop, kill_at=3 if s == 2 else None),
                                       tmp_path / f"slot{s}.log")
        victim = procs["slot2"]
        wait_for(lambda: victim.poll() is not None, 300, "slot 2 to kill itself",
                  [procs["slot0"], procs["slot1"]])
        assert victim.returncode == -signal.SIGKILL, (tmp_path / "slot2.log").read_text()[-3000:]
        dying = [r for r in records(outs[2]) if r["event"] == "dying"]
        assert len(dying) == 1
        t_kill, s_kill = dying[0]["t"], dying[0]["sync"]

        def survivors_committed_after_kill():
            return all(any(r["event"] == "sync" and r["committed"] and r["t0"] > t_kill and r["live"] == [0, 1]
                           for r in records(outs[s])) for s in (0, 1))
        wait_for(survivors_committed_after_kill, 120, "the survivors to commit without slot 2",
                  [procs["slot0"], procs["slot1"]])
        procs["slot2-restarted"] = start(_worker_cmd(2, k, lh, outs[2], stop), tmp_path / "slot2-restarted.log")

        def rejoined():
            recs = [r for r in records(outs[2]) if r["event"] == "sync" and r["t0"] > t_kill]
            return sum(1 for r in recs if r["committed"] and 2 in r["live"]) >= 2
        wait_for(rejoined, 240, "the restarted slot 2 to heal and contribute twice",
                  [p for name, p in procs.items() if name != "slot2"])
        last = max(r["sync"] for s in range(k) for r in records(outs[s]) if r["event"] == "sync")
        stop.write_text(str(last + 3))
        for name, p in procs.items():
            if name != "slot2":
                assert reap(p, 120) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        lh.stop()

    # every server a replica opens for the others listens on --ft-bind-address (127.0.0.1), none on the
    # wildcard, except torch's TCPStore (no bind option; documented)
    socks = [r for s in range(k) for r in records(outs[s]) if r["event"] == "sockets"]
    assert len(socks) >= k
    for r in socks:
        others = [(ip, port) for ip, port in r["listen"] if port != r["store_port"]]
        assert len(others) >= 2, r  # the manager server and the heal checkpoint server at least
        assert all(ip == "127.0.0.1" for ip, _ in others), r
    recs = {s: [r for r in records(outs[s]) if r["event"] == "sync"] for s in range(k)}
    by_sync: Dict[int, List[dict]] = {}
    for s in range(k):
        for r in recs[s]:
            if r["committed"]:
                by_sync.setdefault(r["sync"], []).append(r)
                # the hand-computed sum over the live slots
                want = [sum(_x(m, r["sync"], i) for m in r["live"]) for i in range(26)]
                assert r["fp32"] == want, (s, r["sync"], r["live"])
                # int8: per block, each member's quantization error <= scale/2, the re-quantized sum's too
                bound = (sum(_x(m, r["sync"], 12) for m in r["live"]) / 127) * (len(r["live"]) + 1)
                assert r["int8_err"] <= bound, (r["int8_err"], bound)
    for s_num, rs in by_sync.items():
        assert len({json.dumps(r["live"]) for r in rs}) == 1, (s_num, rs)
        assert len({json.dumps(r["int8"]) for r in rs}) == 1, s_num  # bit-identical on every replica
        assert len({(r["acc_sum"], r["acc0"]) for r in rs}) == 1, (s_num, [(r["slot"], r["acc_sum"]) for r in rs])
    # before the kill all three took part; the sync in flight at the kill was committed by no survivor
    assert any(rs[0]["live"] == [0, 1, 2] for rs in by_sync.values())
    assert s_kill not in by_sync or all(2 not in r["live"] for r in by_sync[s_kill]), by_sync.get(s_kill)
    # the survivors went on within the heartbeat + join timeouts (+ slack for a loaded machine)
    first_after = min(r["t"] for s in (0, 1) for r in recs[s] if r["committed"] and r["t0"] > t_kill)
    assert first_after - t_kill < HEARTBEAT_TIMEOUT_S + JOIN_TIMEOUT_S + 20, first_after - t_kill
    # the restarted replica healed (its first sync) and its state then matched the survivors'
    after = [r for r in recs[2] if r["t0"] > t_kill]
    assert after and after[0]["healed"] and 2 not in after[0]["live"], after[:1]
    assert any(r["committed"] and r["live"] == [0, 1, 2] for r in after)
    # every replica stopped at the same sync with the same state
    final = {s: recs[s][-1] for s in range(k)}
    assert len({(f["sync"], f["acc_sum"]) for f in final.values()}) == 1, final


_LISTEN = """
import json, sys, datetime, psutil
from torchft.checkpointing import HTTPTransport
if sys.argv[1] == "patched":
    from megatron_ppu.patches.torchft import apply_torchft_patches
    apply_torchft_patches("127.0.0.1")
t = HTTPTransport(timeout=datetime.timedelta(seconds=5), num_chunks=0)
print(json.dumps({"address": t.address(), "listen": [[c.laddr.ip, c.laddr.port] for c in
                  psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]}))
t.shutdown()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["unpatched", "patched"])
def test_heal_checkpoint_server_binds_the_bind_address_only_when_patched(mode):
    """torchft 0.2.0's HTTP checkpoint server listens on the IPv6 wildcard and advertises the host
    name (the negative control, which fails once torchft changes and the patch must be revisited);
    patched, it listens on and advertises the bind address."""
    p = subprocess.run([sys.executable, "-c", _LISTEN, mode], capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    ips = {ip for ip, _ in got["listen"]}
    if mode == "unpatched":
        assert ips == {"::"}, got
    else:
        assert ips == {"127.0.0.1"}, got
        assert got["address"].startswith("http://127.0.0.1:"), got


@pytest.mark.timeout(60)
def test_torchft_patch_refuses_other_versions_and_a_second_address():
    from megatron_ppu.patches import torchft as patch

    assert patch.SUPPORTED_TORCHFT == "0.2.0"
    from importlib.metadata import version

    assert version("torchft") == patch.SUPPORTED_TORCHFT  # the pin of setup.py is what is installed
    code = ("from megatron_ppu.patches.torchft import apply_torchft_patches as a\n"
            "a('127.0.0.1'); a('127.0.0.1')\n"
            "try:\n    a('127.0.0.2')\nexcept RuntimeError as e:\n    print('refused', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert p.returncode == 0 and "refused" in p.stdout, p.stderr[-2000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra,expect", [
    (["--ft-lighthouse", "127.0.0.1:29510"], "--ft-lighthouse configures --fault-tolerance torchft"),
    (["--fault-tolerance", "torchft"], "needs --ft-lighthouse, --ft-replica-id"),
    (["--fault-tolerance", "torchft", "--ft-lighthouse", "127.0.0.1:29510", "--ft-replica-id", "4"],
     "--ft-replica-id 4 is not a slot of --diloco-replicas 4"),
    (["--fault-tolerance", "torchft", "--ft-lighthouse", "127.0.0.1:29510", "--ft-replica-id", "1",
      "--ft-bind-address", "0.0.0.0"], "the wildcard would expose"),
    (["--fault-tolerance", "torchft", "--ft-lighthouse", "127.0.0.1:29510", "--ft-replica-id", "1",
      "--ft-bind-address", "site-a"], "is not an IP address"),
    (["--fault-tolerance", "torchft", "--ft-lighthouse", "lighthouse", "--ft-replica-id", "1"], "is not HOST:PORT"),
    (["--fault-tolerance", "torchft", "--ft-lighthouse", "127.0.0.1:29510", "--ft-replica-id", "1",
      "--ft-quorum-timeout", "10"], "--ft-quorum-timeout 10.0 is below --ft-timeout 60.0"),
])
def test_fault_tolerance_flags_are_validated_with_the_fix(extra, expect):
    from megatron_ppu.training.arguments import parse_args

    base = "--diloco-local-steps 4 --diloco-replicas 4 --ppu-slices 2".split()
    with pytest.raises(ValueError, match=expect.replace("(", r"\(")):
        parse_args(base + extra, world_size=4 if "torchft" not in extra else 1)


@pytest.mark.timeout(60)
def test_fault_tolerance_defaults_leave_the_single_world_unchanged():
    """Default ``none``: no torchft setting applies, and the run's layout rules are today's (K must
    divide the world's DP); with torchft each job is one replica (world 1 per slot is valid)."""
    from megatron_ppu.training.arguments import parse_args

    base = "--diloco-local-steps 4 --diloco-replicas 4 --ppu-slices 2".split()
    a = parse_args(base, world_size=4)
    assert a.fault_tolerance.mode == "none" and not a.fault_tolerance.enabled
    with pytest.raises(ValueError, match="must divide the data-parallel size 1"):
        parse_args(base, world_size=1)
    ft = parse_args(base + ["--fault-tolerance", "torchft", "--ft-lighthouse", "127.0.0.1:29510",
                            "--ft-replica-id", "3"], world_size=1).fault_tolerance
    assert (ft.enabled, ft.replica_id, ft.bind_address, ft.lighthouse) == (True, 3, "127.0.0.1", "127.0.0.1:29510")


@pytest.mark.timeout(400)
def test_a_joiner_with_other_settings_is_refused_with_their_names_and_the_running_replicas_go_on(tmp_path):
    """Two replicas running; a third job with another hidden size joins: it exits with a ValueError
    naming ``hidden_size``; the running replicas are not disturbed: the quorum that held it is asked
    again, so every one of their syncs commits, with the sums of the two of them (none voided, none
    applied with the refused member)."""
    k = 3
    lh = Lighthouse(tmp_path)
    stop = tmp_path / "stop"
    outs = {s: tmp_path / f"slot{s}.jsonl" for s in range(k)}
    procs: Dict[str, subprocess.Popen] = {}
    try:
        for s in (0, 1):
            procs[f"slot{s}"] = start(_worker_cmd(s, k, lh, outs[s], stop), tmp_path / f"slot{s}.log")
        running = list(procs.values())
        wait_for(lambda: all(any(r["event"] == "sync" and r["committed"] for r in records(outs[s])) for s in (0, 1)),
                  240, "two replicas to commit", running)
        env = dict(os.environ, FT_TEST_HIDDEN="128")
        bad = start(_worker_cmd(2, k, lh, outs[2], stop), tmp_path / "slot2.log", env=env)
        procs["slot2"] = bad
        assert reap(bad, 240) == 1
        log = (tmp_path / "slot2.log").read_text()
        assert "ValueError" in log and "hidden_size" in log and "slices" not in log.split("ValueError")[-1], log[-2000:]
        t_refused = time.time()
        wait_for(lambda: all(any(r["event"] == "sync" and r["committed"] and r["t0"] > t_refused
                                  for r in records(outs[s])) for s in (0, 1)), 120,
                  "the running replicas to commit after the refusal", running)
        last = max(r["sync"] for s in (0, 1) for r in records(outs[s]) if r["event"] == "sync")
        stop.write_text(str(last + 2))
        for s in (0, 1):
            assert reap(procs[f"slot{s}"], 120) == 0, (tmp_path / f"slot{s}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        lh.stop()
    for s in (0, 1):
        syncs = [r for r in records(outs[s]) if r["event"] == "sync"]
        # not disturbed: the quorum that held the refused member was asked again, no sync was voided
        # (every sync committed, numbered 0, 1, 2, ... with both running replicas live)
        assert [(r["sync"], r["committed"], r["live"]) for r in syncs] == [(i, True, [0, 1]) for i in range(len(syncs))]
        for r in syncs:
            assert r["fp32"] == [sum(_x(m, r["sync"], i) for m in r["live"]) for i in range(26)]


# ------------------------------------------------------------------------------------------ trainer
# K = 4 single-rank jobs, PPU 1/2 (and 1/4), one killed mid-round and restarted, checked against the
# plain-PyTorch reference of its membership schedule: tests/test_fault_tolerance_reference.py


@pytest.mark.timeout(900)
def test_three_replica_jobs_of_two_ranks_one_killed_each_rank_heals_its_coordinate(tmp_path):
    """K = 3 jobs of 2 ranks each (inner-DP 2, one torchft Manager per rank, local rank 0 hosting the
    replica's manager server), no PPU (3 slots): ONE RANK of slot 2's job SIGKILLed (torchrun stops the
    job), the job restarted (see the helper)."""
    kill_and_restart_the_last_slot(tmp_path, k=3, iters=120, nproc=2, kill="rank")


@pytest.mark.timeout(900)
def test_three_replica_jobs_tp2_int8_error_feedback_one_killed_restarted_each_rank_heals(tmp_path):
    """K = 3 jobs of 2 ranks each with tensor parallelism 2 (each rank holds half of every layer: its
    own cross-replica group, Manager and heal), int8 payload with error feedback (our quantized path
    over the torchft group, on CPU): slot 2's job killed mid-round and restarted; each rank heals its
    own TP shard, with a fresh residual (see the helper)."""
    kill_and_restart_the_last_slot(tmp_path, k=3, iters=120, nproc=2, extra=[
        "--tensor-model-parallel-size", "2", "--global-batch-size", "6",
        "--diloco-allreduce-dtype", "int8", "--diloco-error-feedback"])


@pytest.mark.timeout(600)
def test_trainer_joiner_with_other_hidden_size_and_slices_is_refused_naming_both(tmp_path):
    """A replica job runs (K = 2, PPU 1/2); a second job with another --hidden-size and --ppu-slices
    joins: it exits with an error naming hidden_size and ppu_slices; the running job finishes (exit 0)
    with the losses of the same job run alone (not disturbed: the quorum is asked again, no sync voided)."""
    # The running job is suspended while the joiner starts (so that it cannot finish first): a heartbeat
    # timeout longer than that pause keeps it a member, so the joiner's first quorum waits for it (at
    # 5 s, a pause longer than the joiner's start-up under load made the lighthouse drop it, and the
    # joiner then trained alone: torchft's fast quorum never brought the two together).
    lh = Lighthouse(tmp_path, min_replicas=1, join_timeout_s=20, heartbeat_timeout_s=60)
    logs = {s: tmp_path / f"slot{s}.log" for s in range(2)}
    procs: Dict[str, subprocess.Popen] = {}
    try:
        procs["slot0"] = start(trainer_cmd(0, 2, lh, 120, extra=["--ppu-slices", "2"]), logs[0])
        wait_for(lambda: iteration(logs[0]) >= 4, 300, "the running job to train", [procs["slot0"]])
        paused = psutil.Process(procs["slot0"].pid).children(recursive=True)  # until the joiner is up
        each(paused, "suspend")
        try:
            procs["slot1"] = start(trainer_cmd(1, 2, lh, 120, extra=["--ppu-slices", "1", "--hidden-size", "64"]),
                                    logs[1])
            wait_for(lambda: "Started CheckpointServer" in (logs[1].read_text(errors="replace")
                                                            if logs[1].exists() else ""), 300,
                      "the joiner's torchft manager", [procs["slot1"]])
        finally:
            each(paused, "resume")
        assert reap(procs["slot1"], 300) != 0
        err = logs[1].read_text(errors="replace")
        refusal = [line for line in err.splitlines() if "settings differ" in line]
        assert refusal and "hidden_size" in refusal[0] and "ppu_slices" in refusal[0], err[-3000:]
        assert reap(procs["slot0"], 600) == 0, logs[0].read_text(errors="replace")[-4000:]
    finally:
        stop_all(procs, lh)
    assert "validation loss at iteration 120" in logs[0].read_text(errors="replace")
    # the running job was not disturbed: its losses are those of the same job run alone (reference run,
    # same flags, no joiner: with the live set [0] throughout, the run is deterministic)
    lh = Lighthouse(tmp_path, min_replicas=1, join_timeout_s=20, heartbeat_timeout_s=60)
    ref_log = tmp_path / "alone.log"
    try:
        alone = start(trainer_cmd(0, 2, lh, 120, extra=["--ppu-slices", "2"]), ref_log)
        assert reap(alone, 600) == 0, ref_log.read_text(errors="replace")[-4000:]
    finally:
        kill_tree(alone)
        alone.wait(timeout=30)
        lh.stop()
    losses = {name: re.findall(r"(?:lm loss: |lm loss value: )(\S+)", f.read_text(errors="replace"))
              for name, f in (("with the refused joiner", logs[0]), ("alone", ref_log))}
    assert len(losses["alone"]) >= 60 and losses["with the refused joiner"] == losses["alone"], losses


@pytest.mark.timeout(600)
def test_a_replica_left_behind_heals_and_joins_the_others_sync_which_they_keep(tmp_path):
    """K = 3 single-rank jobs; slot 2's job is suspended past the lighthouse's heartbeat timeout (the
    others go on without it), then resumed: it arrives at an older sync of its own, heals from a live
    peer there (that sync is void on it), continues at the others' iteration and joins their sync
    contributing nothing; they ask for another quorum for it and keep their sync (none voided: before,
    every member voided it). θ(t) digests agree at every quorum, same final validation loss."""
    k = 3
    lh = Lighthouse(tmp_path, min_replicas=2, join_timeout_s=5)
    logs = {s: tmp_path / f"slot{s}.log" for s in range(k)}
    procs: Dict[str, subprocess.Popen] = {}
    try:
        for s in range(k):  # --ft-timeout 20: a collective it was suspended in fails on the others in 20 s
            procs[f"slot{s}"] = start(trainer_cmd(s, k, lh, 120, extra=["--ft-timeout", "20"]), logs[s])
        wait_for(lambda: iteration(logs[2]) >= 10, 400, "slot 2 to reach iteration 10", list(procs.values()))
        workers = psutil.Process(procs["slot2"].pid).children(recursive=True)
        each(workers, "suspend")
        try:
            before = len(quorums(logs[0]))
            wait_for(lambda: sum(1 for _, live, _, _ in quorums(logs[0])[before:] if live == (0, 1)) >= 3, 300,
                     "three syncs of slots 0 and 1 without slot 2", [procs["slot0"], procs["slot1"]])
        finally:
            each(workers, "resume")
        for s in range(k):
            assert reap(procs[f"slot{s}"], 600) == 0, logs[s].read_text(errors="replace")[-4000:]
    finally:
        stop_all(procs, lh)
    text = {s: logs[s].read_text(errors="replace") for s in range(k)}
    assert "healed in the middle of its own older sync" in text[2] and "healed from a live peer; continues at" in \
        text[2], text[2][-4000:]
    for s in (0, 1):
        assert "sync voided" not in text[s], [ln for ln in text[s].splitlines() if "voided" in ln]
        assert "quorum asked again, they join it" in text[s], text[s][-4000:]
    q = {s: quorums(logs[s]) for s in range(k)}
    assert q[0][-1][1] == (0, 1, 2), q[0][-1]  # slot 2 contributes again at the end
    assert_one_model(q, logs)
