"""Replicas as independent jobs over torchft with the delayed outer sync (issue 24): τ > 0, α > 0.

A replica's rank is SIGKILLed while a delayed reduction is in flight (``tests/ft_die_in_delayed_reduction.py``
injects it: on the background thread, once the others are blocked in the same reduction). Every
process is started by the test and reaped by its PID (process groups), exit codes checked
(``tests/ft_jobs.py``).
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from typing import Dict

import pytest

from tests.ft_jobs import (LIGHTHOUSE, ROOT, Lighthouse, kill_and_restart_the_last_slot, quorums, reap, start,
                           stop_all, wait_for)

pytestmark = pytest.mark.skipif(not LIGHTHOUSE.exists(), reason="torchft is not installed (scripts/setup_env.sh)")

H, F, TAU, ALPHA = 8, 2, 3, 0.5  # syncs every 4 steps, a reduction in flight 3 of every 4 steps
DIE_AT = 12


@pytest.mark.timeout(60)
def test_sync_delay_and_merge_alpha_are_accepted_with_torchft():
    """The refusal of ``--diloco-sync-delay > 0`` with ``--fault-tolerance torchft`` is lifted; the
    schedule rule (τ below the gap between two fragment syncs) still holds with torchft."""
    from megatron_ppu.training.arguments import parse_args

    base = ["--diloco-replicas", "3", "--fault-tolerance", "torchft", "--ft-lighthouse", "127.0.0.1:29510",
            "--ft-replica-id", "2", "--diloco-local-steps", str(H), "--diloco-streaming-fragments", str(F)]
    a = parse_args(base + ["--diloco-sync-delay", str(TAU), "--diloco-merge-alpha", str(ALPHA)], world_size=1)
    assert (a.diloco.sync_delay, a.diloco.merge_alpha, a.fault_tolerance.enabled) == (TAU, ALPHA, True)
    with pytest.raises(ValueError, match="--diloco-sync-delay 4 would keep two fragments' reductions in flight"):
        parse_args(base + ["--diloco-sync-delay", "4"], world_size=1)


@pytest.mark.timeout(900)
def test_three_replica_jobs_one_killed_during_a_delayed_reduction_discarded_everywhere_restarted_heals(tmp_path):
    """K = 3 single-rank jobs, Streaming DiLoCo H = 8, F = 2, τ = 3, α = 0.5. Slot 2's rank dies in the
    middle of the delayed reduction launched at inner step s >= 12 with every slot live. Checked from the
    logs: both survivors' background reductions failed, both discarded that sync when it was due (after
    inner step s + τ, never applied on one of them), and they went on with slots [0, 1]; the restarted
    slot 2 joined during a delayed sync (healed from a live peer, took part in the launched sync and
    later contributed); θ(t) digests equal on every replica at every quorum, and every replica prints
    the same final validation loss (the helper, ``tests/ft_jobs.py``)."""
    kill_and_restart_the_last_slot(
        tmp_path, k=3, iters=96,
        extra=["--diloco-local-steps", str(H), "--diloco-sync-delay", str(TAU), "--diloco-merge-alpha", str(ALPHA)],
        victim=ROOT / "tests" / "ft_die_in_delayed_reduction.py", env={"FT_TEST_DIE_AT_STEP": str(DIE_AT)})
    killed = (tmp_path / "killed.log").read_text(errors="replace")
    m = re.findall(r"fault injection: slot 2 SIGKILLs itself in the delayed reduction launched at inner step (\d+) "
                   r"\(live slots \[0, 1, 2\]\)", killed)
    assert len(m) == 1, killed[-3000:]
    s = int(m[0])
    assert s >= DIE_AT and s % (H // F) == 0, s
    frag = 0 if s % H == H // F else 1  # offsets: fragment 0 after steps 4 mod 8, fragment 1 after 0 mod 8
    for slot in (0, 1):
        log = (tmp_path / f"slot{slot}.log").read_text(errors="replace")
        # the failed collective: the sum over the live slots on the background thread, then the discard
        # of that sync (torchft's commit vote) and of its outer step when it was due, s + τ
        assert "cross-replica collective failed" in log, log[-3000:]
        assert log.count(f"slot {slot} discards the sync of live slots [0, 1, 2] (not committed: a member failed") == 1
        discards = re.findall(r"outer sync of fragment (\d+) launched after inner step (\d+) discarded after inner "
                              r"step (\d+)", log)
        # (later discards may follow: a sync voided when a replica behind the others heals in it)
        assert [d for d in discards if int(d[1]) <= s] == [(str(frag), str(s), str(s + TAU))], discards
        q = quorums(tmp_path / f"slot{slot}.log")
        # the sync launched at s had all three; the next one, at s + 4 (after the discard at s + 3), the two
        # survivors, with θ(t) unchanged since s: the outer step due at s + 3 was applied on neither
        at = {step: (live, digest) for step, live, digest, _ in q}
        assert at[s][0] == (0, 1, 2) and at[s + H // F][0] == (0, 1), (s, q)
        assert at[s + H // F][1] == at[s][1], (s, q)
        assert at[s + 2 * H // F][1] != at[s][1], (s, q)  # (a committed sync does change the digest)
    # the restarted slot 2 joined while the others were in a delayed sync: it healed at a quorum taken
    # at a launch (a step with a fragment due) and contributed to later syncs
    q2 = quorums(tmp_path / "slot2.log")
    healed = [step for step, _, _, h in q2 if h]
    assert healed and all(step % (H // F) == 0 for step in healed), q2
    assert any(2 in live for step, live, _, h in q2 if not h and step > healed[0]), q2
    restarted = (tmp_path / "slot2.log").read_text(errors="replace")
    assert re.search(r"fault tolerance: slot 2 joined at iteration \d+ \(healed from a live peer\)", restarted)
    # the quorum blocks the training thread at each launch (τ > 0): its median time, for docs/overlap.md
    times = [float(x) for slot in (0, 1) for x in re.findall(
        r"quorum at inner step \d+: .*?\(quorum ([\d.]+) s\)", (tmp_path / f"slot{slot}.log").read_text())]
    print(f"quorum time at a launch (survivors, {len(times)} quorums): median {statistics.median(times):.3f} s")


@pytest.mark.timeout(400)
def test_a_member_dying_during_a_delayed_reduction_is_discarded_by_every_survivor_by_hand(tmp_path):
    """Three single-process replicas, the real outer loop (H = 2, τ = 1, α = 0.5, outer lr 0.5, Nesterov
    momentum 0.9) over the real torchft transport on a 2 x 2 weight; slot k adds 0.05 (k + 1) per inner
    step. Slot 2 dies (SIGKILL) in the middle of the second sync's background reduction (launched after
    step 4). Both survivors discard that sync after step 5 (θ(t) and the momentum kept, the local values
    back to θ(t)), sync at step 6 over slots [0, 1] (m = 2) and end with the same global model; every
    value against the hand computation below."""
    k = 3
    lh = Lighthouse(tmp_path, join_timeout_s=30)  # the first quorum waits for all three, however loaded
    up = tmp_path / "up"
    up.mkdir()
    outs = {s: tmp_path / f"slot{s}.json" for s in range(k)}
    procs: Dict[int, subprocess.Popen] = {}
    try:
        for s in range(k):
            procs[s] = start([sys.executable, str(ROOT / "tests" / "ft_delayed_worker.py"), str(s), str(k), lh.addr,
                              str(outs[s]), str(up)] + (["die"] if s == 2 else []), tmp_path / f"slot{s}.log")
        wait_for(lambda: procs[2].poll() is not None, 240, "slot 2 to die", [procs[0], procs[1]])
        assert procs[2].returncode == -9, (tmp_path / "slot2.log").read_text()[-3000:]
        for s in (0, 1):
            assert reap(procs[s], 240) == 0, (tmp_path / f"slot{s}.log").read_text()[-3000:]
    finally:
        stop_all(procs, lh)
    assert json.loads(outs[2].read_text())["event"] == "dying"
    # By hand (torch SGD: buf_1 = g_1; Nesterov: θ -= lr (g + μ buf)); x_k local, θ the snapshot.
    # s=2: x = 1.10 / 1.20 / 1.30, launch A over [0, 1, 2]: mean Δ = 0.2.
    # s=3: x = 1.15 / 1.30; wait A: g = -0.2, buf = -0.2, θ = 1 + 0.5 (0.2 + 0.18) = 1.19;
    #      merge x = 1.19 + 0.5 (x - 1.19) = 1.17 / 1.245.
    # s=4: x = 1.22 / 1.345, launch B over [0, 1, 2]; slot 2 dies in its reduction.
    # s=5: x = 1.27 / 1.445; B discarded: θ = 1.19, buf = -0.2 kept, x = θ = 1.19 on both.
    # s=6: x = 1.24 / 1.29, launch C over [0, 1]: mean Δ = (0.05 + 0.10) / 2 = 0.075.
    # s=7: x = 1.29 / 1.39; wait C: g = -0.075, buf = 0.9 (-0.2) - 0.075 = -0.255,
    #      θ = 1.19 + 0.5 (0.075 + 0.2295) = 1.34225; merge x = 1.316125 / 1.366125.
    # finish (α > 0: a final synchronous sync over [0, 1]): mean Δ = (-0.026125 + 0.023875) / 2 = -0.001125,
    #      buf = 0.9 (-0.255) + 0.001125 = -0.228375, θ = 1.34225 + 0.5 (-0.001125 + 0.2055375) = 1.44445625.
    want_local = {0: [1.05, 1.10, 1.17, 1.22, 1.19, 1.24, 1.316125],
                  1: [1.10, 1.20, 1.245, 1.345, 1.19, 1.29, 1.366125]}
    want_snap = [1.0, 1.0, 1.19, 1.19, 1.19, 1.19, 1.34225]
    want_reports = [[], [], [[2, 3, False, [0, 1, 2]]], [], [[4, 5, True, [0, 1, 2]]], [], [[6, 7, False, [0, 1]]]]
    res = {s: json.loads(outs[s].read_text()) for s in (0, 1)}
    for s, r in res.items():
        assert r["local"] == pytest.approx(want_local[s], abs=1e-6), (s, r["local"])
        assert r["snap"] == pytest.approx(want_snap, abs=1e-6), (s, r["snap"])
        assert r["reports"] == want_reports, (s, r["reports"])
        assert r["final"] == [[7, 7, False, [0, 1]]], r["final"]
        # a checkpoint taken with the sync in flight records its result (A: Δ = 0.2, committed as torchft's
        # step 1 with its live slots) or its discard (B: None; torchft's step still 1)
        a, b = r["records"]["2"], r["records"]["4"]
        assert (a["fragment"], a["launched"], a["due"], a["syncs"]) == (0, 2, 3, 1), a
        assert a["averaged"] == pytest.approx(0.2, abs=1e-6) and a["history"] == [[1, [0, 1, 2]]], a
        assert (b["fragment"], b["launched"], b["due"], b["averaged"], b["syncs"]) == (0, 4, 5, None, 1), b
        assert b["history"] == [[1, [0, 1, 2]]], b
        assert r["uniform"] and r["final_value"] == pytest.approx(1.44445625, abs=1e-6), r
    assert res[0]["final_value"] == res[1]["final_value"]


@pytest.mark.timeout(900)
def test_three_replica_jobs_of_two_ranks_delayed_sync_one_killed_each_rank_heals(tmp_path):
    """K = 3 jobs of 2 ranks each (inner-DP 2: the background reduction's agreement inside the replica runs
    on a clone of the replica's group), τ = 1, α = 0.5: slot 2's job killed mid-round (whatever the
    moment) and restarted; each rank heals its own coordinate (see the helper, ``tests/ft_jobs.py``)."""
    kill_and_restart_the_last_slot(tmp_path, k=3, iters=96, nproc=2,
                                    extra=["--diloco-sync-delay", "1", "--diloco-merge-alpha", str(ALPHA)])
