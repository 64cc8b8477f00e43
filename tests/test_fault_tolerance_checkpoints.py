"""Checkpoints of torchft replica jobs without a shared file system (issue 24, item 7).

K = 3 single-rank replica jobs (``--fault-tolerance torchft``, the tiny model of ``tests/ft_jobs.py``),
each with ITS OWN ``--save`` / ``--load`` folder. Every process is started by the test in its own
process group, reaped by its PID and its exit code checked; the lighthouse is stopped by the test.

* All three killed (SIGKILL) after a few saves and restarted from their own folders: they resume at
  their checkpoints' iteration without a heal, and the run after the resume is the uninterrupted run,
  bit for bit (the independent reference: the same three jobs run once without interruption; the
  membership is all three slots throughout, so both runs are deterministic): θ(t) digests at every
  sync, the training loss of every iteration (float32, read from TensorBoard), the final validation loss.
* One job killed in the middle of a checkpoint save (caught by watching its folder for the save's
  temporary folder, then suspended there before the kill, so the save is certainly interrupted): the
  survivors go on; restarted from its own folder (an older complete checkpoint and the debris of the
  interrupted save), it resumes from the older checkpoint, is behind, and heals to the current θ(t)
  from a live peer; the survivors' iterations never go back, every later quorum sees one θ(t) and
  every replica prints the same final validation loss.
* All three killed while one of them is in the middle of a save, and restarted together: that one
  resumes from its older checkpoint and heals at the start-up quorum; the others resume without one.

After a heal the replica's inner optimizer starts fresh (Adam's step count in its final checkpoint
= the inner steps since the heal); without a heal it keeps its checkpoint's.
"""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import time
from typing import Dict, List, Optional

import psutil

import pytest

from tests.ft_jobs import (LIGHTHOUSE, Lighthouse, each, iteration, kill_tree, quorums, reap, start, stop_all,
                           trainer_cmd, wait_for)

pytestmark = pytest.mark.skipif(not LIGHTHOUSE.exists(), reason="torchft is not installed (scripts/setup_env.sh)")

K = 3
TRACKER = "latest_checkpointed_iteration.txt"


def _tracker(folder: pathlib.Path) -> int:
    """The iteration the folder's tracker names (0: none yet)."""
    try:
        return int((folder / TRACKER).read_text().strip())
    except (OSError, ValueError):
        return 0


def _in_progress(folder: pathlib.Path) -> List[str]:
    """The temporary folders of saves in progress (or interrupted) in ``folder``."""
    try:
        return sorted(n for n in os.listdir(folder) if n.startswith(".iter_") and ".tmp-" in n)
    except OSError:
        return []


def _tree(p: subprocess.Popen) -> List[psutil.Process]:
    """The torchrun agent and its workers."""
    root = psutil.Process(p.pid)
    return [root] + root.children(recursive=True)


def _tb_scalars(tb: pathlib.Path, tag: str = "lm loss") -> Dict[int, float]:
    """Iteration -> the scalar ``tag`` written to TensorBoard (--log-interval 1: one per iteration)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def _final_state(path: pathlib.Path) -> dict:
    """From a single-rank replica's checkpoint: the data position, the membership history and the set
    of Adam step counts of the inner optimizer."""
    import torch

    from megatron_ppu.training.checkpointing.sharding import unshard_state

    st = torch.load(path / "ppu" / "rank_00000.pt", weights_only=False)
    opt = unshard_state(st["replica_shard"], None)["optimizer"]
    opt = opt.get("optimizer", opt)
    return {"consumed_samples": st["rank"]["consumed_samples"],
            "history": [(int(n), tuple(live)) for n, live in st["rank"]["fault_tolerance"]["history"]],
            "adam_steps": {int(v["step"]) for v in opt["state"].values()}}


def _final_validation(log: pathlib.Path) -> str:
    found = re.findall(r"validation loss at iteration \d+ \(global model\) \| lm loss value: (\S+)",
                       log.read_text(errors="replace"))
    assert found, log.read_text(errors="replace")[-3000:]
    return found[-1]


def _digests(log: pathlib.Path, after: int = -1) -> Dict[tuple, str]:
    """(inner step, n-th quorum at that step) -> θ(t) digest of the quorums at inner steps > ``after``
    (the end of training syncs the remaining fragment at the last step: two quorums there)."""
    out: Dict[tuple, str] = {}
    seen: Dict[int, int] = {}
    for step, _, digest, _ in quorums(log):
        if step > after:
            seen[step] = seen.get(step, 0) + 1
            out[(step, seen[step])] = digest
    return out


def _iterations(log: pathlib.Path) -> List[int]:
    return [int(x) for x in re.findall(r"iteration\s+(\d+)/", log.read_text(errors="replace"))]


def _resumed_at(log: pathlib.Path) -> Optional[tuple]:
    """(checkpoint folder name, iteration) of the log's 'resumed from' line."""
    m = re.search(r"resumed from (\S+) at iteration (\d+)", log.read_text(errors="replace"))
    return (os.path.basename(m.group(1)), int(m.group(2))) if m else None


def _run_jobs(tmp: pathlib.Path, lh: Lighthouse, name: str, iters: int, extra_of) -> Dict[int, subprocess.Popen]:
    return {s: start(trainer_cmd(s, K, lh, iters, extra=extra_of(s)), tmp / f"{name}{s}.log") for s in range(K)}


# The run of both tests: Streaming DiLoCo F = 2, H = 4 (a fragment sync every 2 inner steps), a save every
# 4 iterations, the loss of every iteration logged.
COMMON = ["--log-interval", "1", "--save-interval", "4"]


@pytest.mark.timeout(900)
def test_all_replicas_killed_and_restarted_from_their_own_checkpoints_resume_bit_identical(tmp_path):
    """K = 3 jobs, each saving into its own folder; all three SIGKILLed after a few saves (suspended
    first, at a moment when their newest checkpoints are of the same iteration) and restarted with
    ``--load`` from their own folders. Checked: each resumes at the iteration of its checkpoint (the
    same on all three), none heals (torchft's step came back with the checkpoint), every later quorum
    sees one θ(t), every job exits 0; against the same three jobs run without interruption: the θ(t)
    digests at every sync after the resume, the float32 training loss of every iteration after it and
    the final validation loss are equal bit for bit."""
    iters = 24
    # min_replicas 3: a quorum only with all three slots (none starts ahead of a slow one), so the
    # membership is {0, 1, 2} at every sync of both runs
    lh = Lighthouse(tmp_path, min_replicas=K, join_timeout_s=60)
    saves = {s: tmp_path / f"save{s}" for s in range(K)}
    procs: Dict[str, subprocess.Popen] = {}

    def extra(run):
        def of(s):
            e = ["--log-interval", "1", "--tensorboard-dir", str(tmp_path / f"tb-{run}{s}")]
            return e + (COMMON + ["--save", str(saves[s]), "--load", str(saves[s])] if run != "ref" else [])
        return of

    try:
        # the reference: the same three jobs, uninterrupted
        for s, p in _run_jobs(tmp_path, lh, "ref", iters, extra("ref")).items():
            procs[f"ref{s}"] = p
        for s in range(K):
            assert reap(procs[f"ref{s}"], 400) == 0, (tmp_path / f"ref{s}.log").read_text(errors="replace")[-4000:]
        # the interrupted run: killed once all three newest checkpoints are of the same iteration >= 8
        for s, p in _run_jobs(tmp_path, lh, "first", iters, extra("first")).items():
            procs[f"first{s}"] = p
        first = [procs[f"first{s}"] for s in range(K)]
        killed_at = None
        for _ in range(20):
            wait_for(lambda: min(_tracker(saves[s]) for s in range(K)) >= 8, 400, "three saves of iteration >= 8",
                     first)
            tree = [c for p in first for c in _tree(p)]
            each(tree, "suspend")
            its = {_tracker(saves[s]) for s in range(K)}
            if len(its) == 1 and its.pop() < iters:
                killed_at = _tracker(saves[0])
                break
            each(tree, "resume")  # one of them was in the middle of its save: try at the next one
            time.sleep(0.5)
        assert killed_at is not None, "never caught the three jobs with checkpoints of the same iteration"
        for p in first:
            kill_tree(p)
            assert p.wait(timeout=30) == -signal.SIGKILL
        # restarted together, each from its own folder
        for s, p in _run_jobs(tmp_path, lh, "resumed", iters, extra("resumed")).items():
            procs[f"resumed{s}"] = p
        for s in range(K):
            assert reap(procs[f"resumed{s}"], 400) == 0, \
                (tmp_path / f"resumed{s}.log").read_text(errors="replace")[-4000:]
    finally:
        stop_all(procs, lh)

    logs = {run: {s: tmp_path / f"{run}{s}.log" for s in range(K)} for run in ("ref", "first", "resumed")}
    for s in range(K):
        first_log = logs["first"][s].read_text(errors="replace")
        assert f"iteration {iters:>9}/" not in first_log and f"iter_{killed_at:07d}" in first_log
        log = logs["resumed"][s]
        text = log.read_text(errors="replace")
        # resumed from its own checkpoint at that iteration, without a heal
        assert _resumed_at(log) == (f"iter_{killed_at:07d}", killed_at), text[-3000:]
        assert str(saves[s]) in re.search(r"resumed from (\S+)", text).group(1)
        assert f"slot {s} started with the live slots" in text and "healed" not in text, text[-3000:]
        assert _iterations(log)[0] == killed_at + 1, _iterations(log)[:3]
        assert not any(h for _, _, _, h in quorums(log))
        # every sync after the resume with all three slots
        assert {live for step, live, _, _ in quorums(log) if step >= 0} == {tuple(range(K))}
    # at every quorum after the resume, one θ(t) on all three, and the reference's
    ref = _digests(logs["ref"][0])
    assert all(_digests(logs["ref"][s]) == ref for s in range(K))
    resumed = {s: _digests(logs["resumed"][s]) for s in range(K)}
    assert min(step for step, _ in resumed[0]) == killed_at + 2  # the first sync after the resume
    for s in range(K):
        assert resumed[s] == {key: d for key, d in ref.items() if key[0] > killed_at}, (s, resumed[s])
    # the uninterrupted run's losses, bit for bit (float32 as TensorBoard stores them), before the kill too
    for s in range(K):
        want = _tb_scalars(tmp_path / f"tb-ref{s}")
        assert sorted(want) == list(range(1, iters + 1))
        got = _tb_scalars(tmp_path / f"tb-resumed{s}")
        assert sorted(got) == list(range(killed_at + 1, iters + 1))
        assert got == {it: v for it, v in want.items() if it > killed_at}, s
        assert {_final_validation(logs["resumed"][s]), _final_validation(logs["ref"][s])} == \
            {_final_validation(logs["ref"][0])}


def _catch_a_save(p: subprocess.Popen, folder: pathlib.Path, after: int, others, timeout: float = 400.0) -> tuple:
    """Suspend the job ``p`` in the middle of one of its checkpoint saves of an iteration > ``after``:
    its folder is polled for the temporary folder of a save in progress; on sight the job's processes
    are suspended, and if the save is still unfinished then (its temporary folder there, the tracker
    not moved on) the job is left suspended in it, else resumed for the next save. Returns (the
    tracker's iteration, the temporary folder's name)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert p.poll() is None and all(o.poll() is None for o in others), "a replica exited"
        tmp = [n for n in _in_progress(folder) if int(n[len(".iter_"):].split(".")[0]) > after]
        if not tmp:
            time.sleep(0.002)
            continue
        tree = _tree(p)
        each(tree, "suspend")
        older = _tracker(folder)
        if tmp[0] in _in_progress(folder) and older < int(tmp[0][len(".iter_"):].split(".")[0]):
            return older, tmp[0]
        each(tree, "resume")  # finished before it was suspended: the next one
        after = max(after, older)
    raise AssertionError(f"no save of {folder} caught in {timeout} s")


@pytest.mark.timeout(900)
def test_one_replica_killed_during_a_save_restarts_from_its_older_checkpoint_and_heals(tmp_path):
    """K = 3 jobs, each saving into its own folder every 4 iterations. Slot 2 is SIGKILLed in the
    middle of a save (see :func:`_catch_a_save`); the survivors go on without it. Restarted with
    ``--load`` from its own folder (the older complete checkpoint and the interrupted save's debris),
    it resumes from the older checkpoint, is behind the run and heals to the current θ(t) from a live
    peer. Checked: the survivors never heal, their iterations never go back (never restarted), they
    take part in syncs without slot 2 and again with it; the restarted job resumed from the tracker's
    checkpoint (not the debris), healed at a later iteration than its checkpoint's, and contributed to
    later syncs; at every quorum every replica that reports it holds the same θ(t); every job exits 0
    with the same final validation loss; every folder ends with the final checkpoint and no debris."""
    iters, victim = 80, K - 1
    lh = Lighthouse(tmp_path, min_replicas=2, join_timeout_s=60)  # no replica forms a quorum alone
    saves = {s: tmp_path / f"save{s}" for s in range(K)}
    logs = {s: tmp_path / f"slot{s}.log" for s in range(K)}

    def cmd(s, run=""):
        return trainer_cmd(s, K, lh, iters, extra=COMMON + ["--save", str(saves[s]), "--load", str(saves[s]),
                                                           "--tensorboard-dir", str(tmp_path / f"tb{run}{s}")])

    procs: Dict[str, subprocess.Popen] = {}
    try:
        for s in range(K):
            procs[f"slot{s}"] = start(cmd(s), logs[s])
        survivors = [procs[f"slot{s}"] for s in range(victim)]
        wait_for(lambda: _tracker(saves[victim]) >= 8, 400, "slot 2's save of iteration 8", list(procs.values()))
        older, debris = _catch_a_save(procs[f"slot{victim}"], saves[victim], _tracker(saves[victim]), survivors)
        kill_tree(procs[f"slot{victim}"])
        assert procs[f"slot{victim}"].wait(timeout=30) == -signal.SIGKILL
        at_kill = {s: len(logs[s].read_bytes()) for s in range(victim)}  # the survivors' logs so far
        assert debris in _in_progress(saves[victim]) and _tracker(saves[victim]) == older  # interrupted for good
        killed_log = logs[victim].read_text(errors="replace")
        logs[victim].rename(tmp_path / "killed.log")
        # the survivors go on without it: two syncs without slot 2
        before = len(quorums(logs[0]))
        wait_for(lambda: sum(1 for _, live, _, _ in quorums(logs[0])[before:] if live == (0, 1)) >= 2, 300,
                 "two syncs of the survivors without slot 2", survivors)
        # The survivors are paused until the restarted job has loaded its checkpoint (on this loaded
        # machine they would otherwise finish first); they resume before its join quorum.
        paused = [c for p in survivors for c in psutil.Process(p.pid).children(recursive=True)]
        each(paused, "suspend")
        try:
            procs["restarted"] = start(cmd(victim, "-restarted"), logs[victim])
            wait_for(lambda: _resumed_at(logs[victim]) is not None, 300, "the restarted job's resume",
                     [procs["restarted"]])
        finally:
            each(paused, "resume")
        for s in range(victim):
            assert reap(procs[f"slot{s}"], 600) == 0, logs[s].read_text(errors="replace")[-4000:]
        assert reap(procs["restarted"], 300) == 0, logs[victim].read_text(errors="replace")[-4000:]
    finally:
        stop_all(procs, lh)
    debris_it = int(debris[len(".iter_"):].split(".")[0])
    assert older >= 8 and debris_it > older
    # the killed job had finished its save of `older` and not that of `debris_it`
    assert f"saved checkpoint {saves[victim] / f'iter_{older:07d}'}" in killed_log
    assert f"saved checkpoint {saves[victim] / f'iter_{debris_it:07d}'}" not in killed_log
    text = logs[victim].read_text(errors="replace")
    # resumed from its own older complete checkpoint, never from the debris
    assert _resumed_at(logs[victim]) == (f"iter_{older:07d}", older), text[-3000:]
    # behind the run: it healed from a live peer to a later iteration, and took part in later syncs
    m = re.search(r"slot 2 (?:joined at iteration (\d+) \(healed from a live peer\)|healed from a live peer; "
                  r"continues at iteration (\d+))", text)
    assert m, text[-4000:]
    healed_at = int(m.group(1) or m.group(2))
    assert healed_at > debris_it, (healed_at, debris_it)
    its = _iterations(logs[victim])
    assert its[0] >= healed_at and its == sorted(its), its[:5]  # (realign: healing one logged as healed_at)
    q = {s: quorums(logs[s]) for s in range(K)}
    assert any(h for _, _, _, h in q[victim]) or "continues at iteration" in text
    assert any(victim in live for step, live, _, h in q[victim] if not h and step > healed_at), q[victim]
    # the survivors: never healed, never went back, ran without slot 2 and again with it
    # (a survivor may have healed once at the start, having come up after the other two formed the first
    # quorum: torchft's start-up; after the kill none heals)
    for s in range(victim):
        after_kill = logs[s].read_bytes()[at_kill[s]:].decode(errors="replace")
        assert "healed" not in after_kill and "resumed from" not in logs[s].read_text(errors="replace")
        its = _iterations(logs[s])
        later = [int(x) for x in re.findall(r"iteration\s+(\d+)/", after_kill)]
        assert its == sorted(set(its)) and its[-1] == iters and later == list(range(later[0], iters + 1)), its
        assert any(live == (0, 1) for _, live, _, _ in q[s]) and q[s][-1][1] == tuple(range(K)), q[s][-1]
    # one θ(t) at every quorum (inner step, n-th quorum at that step, live slots)
    by_step: Dict[tuple, set] = {}
    for s in range(K):
        seen: Dict[int, int] = {}
        for step, live, digest, _ in q[s]:
            if step >= 0:
                seen[step] = seen.get(step, 0) + 1
                by_step.setdefault((step, seen[step], live), set()).add(digest)
    assert all(len(d) == 1 for d in by_step.values()), {st: d for st, d in by_step.items() if len(d) > 1}
    assert len({_final_validation(logs[s]) for s in range(K)}) == 1
    for s in range(K):  # the final checkpoint everywhere; the interrupted save's debris cleared by the next save
        assert _tracker(saves[s]) == iters and not _in_progress(saves[s]), (s, os.listdir(saves[s]))
    # the learning-rate schedule after the heal: the survivors' at the same iteration (float32, TensorBoard)
    lr = {run: _tb_scalars(tmp_path / f"tb{run}", "learning-rate") for run in ("0", "-restarted2")}
    after_heal = {it: v for it, v in lr["-restarted2"].items() if it > healed_at}
    assert sorted(after_heal) == list(range(healed_at + 1, iters + 1))
    assert after_heal == {it: v for it, v in lr["0"].items() if it > healed_at}
    final = {s: _final_state(saves[s] / f"iter_{iters:07d}") for s in range(K)}
    # the data position: (slot, iteration) -> samples consumed, as on the survivors
    assert {f["consumed_samples"] for f in final.values()} == {iters * 2 * K}
    # the membership history (which slots contributed to each committed sync) is the run's on every
    # replica: the restarted one's holds the syncs the survivors made while it was away
    hist = {s: f["history"] for s, f in final.items()}
    assert hist[0] == hist[1] == hist[victim], hist
    assert (0, 1) in {live for _, live in hist[victim]} and hist[victim][-1][1] == tuple(range(K))
    assert [n for n, _ in hist[0]] == sorted({n for n, _ in hist[0]})
    # the inner optimizer: fresh at a heal (its old state belongs to another θ(t)), its own otherwise:
    # Adam's step count = the inner steps trained since the last heal (or since the start)
    for s in range(K):
        heals = re.findall(r"slot \d (?:joined at iteration (\d+) \(healed from a live peer\)|healed from a live "
                           r"peer; continues at iteration (\d+))", logs[s].read_text(errors="replace"))
        since = int(heals[-1][0] or heals[-1][1]) if heals else 0
        assert final[s]["adam_steps"] == {iters - since}, (s, final[s]["adam_steps"], since)


@pytest.mark.timeout(900)
def test_all_restarted_one_from_an_older_checkpoint_it_heals_at_the_start_up_quorum(tmp_path):
    """K = 3 jobs, each saving into its own folder; slot 2 is caught in the middle of its save of
    iteration X (suspended there, see :func:`_catch_a_save`), slots 0 and 1 finish their saves of X
    (then wait for slot 2 at the next sync); all three are SIGKILLed and restarted together from their
    own folders: slots 0 and 1 resume at X, slot 2 at its older X - 4. At the start-up quorum (all three:
    the lighthouse's min_replicas 3) slot 2 heals to the others' θ(t) and position instead of rolling
    them back. Checked: slots 0 and 1 resume at X without a heal and their iterations go on from X;
    slot 2 continues at iteration X with the run's learning rate (float32, TensorBoard: slot 0's at
    the same iteration) and a fresh inner optimizer (Adam's step = the inner steps since X); one θ(t)
    at every quorum, all three live at every sync, the same final validation loss, exit 0 everywhere."""
    iters, late = 24, K - 1
    lh = Lighthouse(tmp_path, min_replicas=K, join_timeout_s=60)
    saves = {s: tmp_path / f"save{s}" for s in range(K)}

    def cmd(s, run):
        return trainer_cmd(s, K, lh, iters, extra=COMMON + ["--save", str(saves[s]), "--load", str(saves[s]),
                                                           "--tensorboard-dir", str(tmp_path / f"tb-{run}{s}")])

    procs: Dict[str, subprocess.Popen] = {}
    try:
        for s in range(K):
            procs[f"first{s}"] = start(cmd(s, "first"), tmp_path / f"first{s}.log")
        first = [procs[f"first{s}"] for s in range(K)]
        wait_for(lambda: min(_tracker(saves[s]) for s in range(K)) >= 4, 400, "three saves", first)
        older, debris = _catch_a_save(first[late], saves[late], _tracker(saves[late]), first[:late])
        x = int(debris[len(".iter_"):].split(".")[0])
        wait_for(lambda: all(_tracker(saves[s]) == x for s in range(late)), 300, f"slots 0, 1 to save {x}",
                 first[:late])
        assert x < iters and older == x - 4
        for p in first:
            kill_tree(p)
            assert p.wait(timeout=30) == -signal.SIGKILL
        assert debris in _in_progress(saves[late]) and _tracker(saves[late]) == older
        for s in range(K):
            procs[f"resumed{s}"] = start(cmd(s, "resumed"), tmp_path / f"resumed{s}.log")
        for s in range(K):
            assert reap(procs[f"resumed{s}"], 400) == 0, \
                (tmp_path / f"resumed{s}.log").read_text(errors="replace")[-4000:]
    finally:
        stop_all(procs, lh)
    logs = {s: tmp_path / f"resumed{s}.log" for s in range(K)}
    for s in range(late):
        text = logs[s].read_text(errors="replace")
        assert _resumed_at(logs[s]) == (f"iter_{x:07d}", x) and "healed" not in text, text[-3000:]
        assert _iterations(logs[s]) == list(range(x + 1, iters + 1))
    text = logs[late].read_text(errors="replace")
    assert _resumed_at(logs[late]) == (f"iter_{older:07d}", older), text[-3000:]
    assert f"slot {late} healed from a live peer; continues at iteration {x}" in text, text[-4000:]
    assert _iterations(logs[late]) == list(range(x + 1, iters + 1))
    q = {s: quorums(logs[s]) for s in range(K)}
    assert all({live for step, live, _, _ in q[s] if step >= 0} == {tuple(range(K))} for s in range(K)), q
    digests = {s: _digests(logs[s]) for s in range(K)}
    assert digests[0] == digests[1] == digests[late] and min(step for step, _ in digests[0]) == x + 2, digests
    lr = {s: _tb_scalars(tmp_path / f"tb-resumed{s}", "learning-rate") for s in (0, late)}
    assert sorted(lr[late]) == list(range(x + 1, iters + 1)) and lr[late] == lr[0]
    assert len({_final_validation(logs[s]) for s in range(K)}) == 1
    final = {s: _final_state(saves[s] / f"iter_{iters:07d}") for s in range(K)}
    assert {f["consumed_samples"] for f in final.values()} == {iters * 2 * K}
    assert final[0]["history"] == final[1]["history"] == final[late]["history"]
    assert final[late]["adam_steps"] == {iters - x}, final[late]["adam_steps"]
    assert not _in_progress(saves[late])
