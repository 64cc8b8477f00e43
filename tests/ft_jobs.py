"""Replica jobs over torchft for the tests (issue 24): torchft's own lighthouse on 127.0.0.1, torchrun
jobs of the trainer started in their own process groups and reaped by PID, the trainer's quorum log
lines, and the kill-and-restart scenario several test modules run with different flags."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List

import psutil

from megatron_ppu.testing.processes import kill_process_tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIGHTHOUSE = pathlib.Path(sys.executable).parent / "torchft_lighthouse"
HEARTBEAT_TIMEOUT_S = 5.0
JOIN_TIMEOUT_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: List[str], log: pathlib.Path, env=None) -> subprocess.Popen:
    env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")  # the test reads the logs live
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            start_new_session=True)


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the job ``p`` and all its processes, each by PID."""
    kill_process_tree(p.pid)


def each(procs, action: str) -> None:
    """``psutil.Process.<action>()`` on each of ``procs`` that still exists."""
    for c in procs:
        try:
            getattr(c, action)()
        except psutil.NoSuchProcess:
            pass


def reap(p: subprocess.Popen, timeout: float = 30.0) -> int:
    """Wait for ``p``; on timeout kill it and its descendants (by PID) and wait again."""
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p)
        return p.wait(timeout=30)


class Lighthouse:
    """``torchft_lighthouse`` on 127.0.0.1 with the given timeouts, stopped by :meth:`stop`."""

    def __init__(self, tmp: pathlib.Path, min_replicas: int = 2, join_timeout_s: float = JOIN_TIMEOUT_S,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = start([str(LIGHTHOUSE), "--bind", self.addr, "--min_replicas", str(min_replicas),
                            "--join_timeout_ms", str(int(join_timeout_s * 1000)),
                            "--heartbeat_timeout_ms", str(int(heartbeat_timeout_s * 1000)),
                            "--quorum_tick_ms", "100"], tmp / "lighthouse.log")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, (tmp / "lighthouse.log").read_text()
                time.sleep(0.1)
        raise AssertionError("the lighthouse did not open its port in 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        reap(self.proc, 10)


def records(path: pathlib.Path) -> List[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            pass
    return out


def wait_for(cond, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        for p in procs:
            assert p.poll() in (None, 0), f"a replica exited with {p.returncode} while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "2",
        "--eval-iters", "1", "--log-interval", "2", "--eval-interval", "1000",
        "--diloco-local-steps", "4", "--diloco-streaming-fragments", "2"]
TORCHRUN = pathlib.Path(sys.executable).parent / "torchrun"
#: what torchrun runs: the trainer (a test may run ``tests/ft_trace_worker.py --trace-dir DIR`` instead)
TRAINER = (str(ROOT / "pretrain_gpt_ppu.py"),)


def stop_all(procs: Dict[str, subprocess.Popen], lh: "Lighthouse") -> None:
    """A test's cleanup: SIGKILL every job of ``procs`` still running (each tree by PID), reap it, stop
    the lighthouse."""
    for p in procs.values():
        kill_tree(p)
        p.wait(timeout=30)
    lh.stop()


def trainer_cmd(slot: int, k: int, lh: Lighthouse, iters: int, nproc: int = 1, extra=(), script=TRAINER):
    """The torchrun command of replica job ``slot``; ``script``: the program and its leading arguments
    torchrun runs (default: ``pretrain_gpt_ppu.py``; a test's recording or fault-injecting wrapper of it)."""
    return [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), *script, *TINY,
            "--global-batch-size", str(2 * k * nproc), "--train-iters", str(iters), "--diloco-replicas", str(k),
            "--fault-tolerance", "torchft", "--ft-lighthouse", lh.addr, "--ft-replica-id", str(slot),
            "--ft-timeout", "120", "--ft-quorum-timeout", "300", "--ft-heartbeat-interval", "0.2", *extra]


def quorums(log: pathlib.Path) -> List[tuple]:
    """(inner step, live slots, θ(t) digest, healed) of every quorum line of a trainer log; in a job of
    several ranks each rank logs the digest of its own shard: the digest is then ``"<rank>:<digest>"``."""
    pat = re.compile(r"quorum at inner step (-?\d+): live slots \[([\d, ]*)\]( \(this replica healed\))? "
                     r"\(quorum [\d.]+ s\), θ\(t\) digest ([0-9a-f]+)(?: on rank (\d+))?")
    out = []
    for m in pat.finditer(log.read_text(errors="replace") if log.exists() else ""):
        live = tuple(int(x) for x in m.group(2).split(",") if x.strip())
        digest = m.group(4) if m.group(5) is None else f"{m.group(5)}:{m.group(4)}"
        out.append((int(m.group(1)), live, digest, bool(m.group(3))))
    return out


def iteration(log: pathlib.Path) -> int:
    its = re.findall(r"iteration\s+(\d+)/", log.read_text(errors="replace") if log.exists() else "")
    return int(its[-1]) if its else 0


def kill_and_restart_the_last_slot(tmp_path, k: int, iters: int, nproc: int = 1, extra=(), kill: str = "job",
                                   script=TRAINER, victim=None, env=None):
    """Lighthouse + k torchrun jobs of ``nproc`` ranks running ``script`` (default: ``pretrain_gpt_ppu.py``);
    the last slot's job is killed in the middle of a round and restarted: ``kill="job"`` SIGKILLs the
    whole torchrun job (agent and workers), ``"rank"`` only its last worker rank (torchrun then stops the
    job's other ranks and exits with an error). With ``victim`` (a script run by the last slot's first
    job in place of ``pretrain_gpt_ppu.py``, with ``env``) that job's rank kills itself (SIGKILL)
    instead, where the script says, and the job is waited for (it must fail); the rest is the same.
    Checked: the survivors are never restarted and
    finish with exit 0; the restarted job heals from a live peer (torchft's checkpoint transport, each
    rank its own coordinate) and takes part in later syncs; at every quorum the running replicas' θ(t)
    digests agree (the restarted one's too, after its heal); every replica prints the same final
    validation loss of the global model on the same validation batches. ``script``: the program and its
    leading arguments torchrun runs in every job (default: ``pretrain_gpt_ppu.py``)."""
    last = k - 1
    # stragglers (a slow replica on this loaded machine) are waited for; a dead one is dropped after the
    # heartbeat timeout (the lighthouse waits for heartbeating replicas only)
    # min_replicas 2 (a majority of K = 3, K - 1 of 4): no replica ever forms a quorum alone, so none
    # can train apart from the run (a lone starter or a restarted job while the survivors are paused)
    assert k >= 3
    lh = Lighthouse(tmp_path, min_replicas=max(2, k - 1), join_timeout_s=60)
    logs = {s: tmp_path / f"slot{s}.log" for s in range(k)}
    procs: Dict[str, subprocess.Popen] = {}
    try:
        for s in range(k):
            procs[f"slot{s}"] = start(trainer_cmd(s, k, lh, iters, nproc, extra,
                                                  script=(str(victim),) if victim and s == last else script),
                                      logs[s], env=dict(os.environ, **env) if env and s == last else None)
        if victim is not None:  # its rank kills itself; torchrun (no restarts) then fails the job
            wait_for(lambda: procs[f"slot{last}"].poll() is not None, 400, "the victim job to die",
                      [procs[f"slot{s}"] for s in range(last)])
            assert procs[f"slot{last}"].returncode != 0, logs[last].read_text(errors="replace")[-3000:]
        else:
            wait_for(lambda: iteration(logs[last]) >= 8, 400, "the last slot to reach iteration 8",
                      list(procs.values()))
        if victim is not None:
            pass  # dead already
        elif kill == "job":
            kill_tree(procs[f"slot{last}"])  # the whole torchrun job (agent and workers), mid-round
            assert procs[f"slot{last}"].wait(timeout=30) == -signal.SIGKILL
        else:
            assert kill == "rank" and nproc > 1, kill
            workers = psutil.Process(procs[f"slot{last}"].pid).children()  # torchrun's worker processes
            assert len(workers) == nproc, workers
            rank = max(workers, key=lambda w: int(w.environ().get("LOCAL_RANK", -1)))
            rank.send_signal(signal.SIGKILL)  # one rank, mid-round; torchrun stops the others
            rc = reap(procs[f"slot{last}"], 120)
            assert rc not in (0, None) and not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                                  for w in workers), (rc, workers)
        killed_log = logs[last].read_text(errors="replace")
        logs[last].rename(tmp_path / "killed.log")
        # the survivors go on without it: wait for two of their syncs without the killed slot, after the kill
        before = len(quorums(logs[0]))
        wait_for(lambda: sum(1 for _, live, _, _ in quorums(logs[0])[before:] if live == tuple(range(last))) >= 2,
                  300,
                  "two syncs of the survivors without the killed slot", [procs[f"slot{s}"] for s in range(last)])
        # Pause the survivors' workers while the restarted job starts (on a fast machine they would
        # finish the run before it is up); they resume once its torchft manager exists, before its
        # join quorum. Paused past the heartbeat timeout, they count as dead until they heartbeat again.
        paused = [c for s in range(last) for c in psutil.Process(procs[f"slot{s}"].pid).children(recursive=True)]
        each(paused, "suspend")
        try:
            procs["restarted"] = start(trainer_cmd(last, k, lh, iters, nproc, extra, script), logs[last])
            wait_for(lambda: "Started CheckpointServer" in (logs[last].read_text(errors="replace")
                                                            if logs[last].exists() else ""), 300,
                      "the restarted job's torchft manager", [procs["restarted"]])
        finally:
            each(paused, "resume")
        for s in range(last):
            assert reap(procs[f"slot{s}"], 600) == 0, logs[s].read_text(errors="replace")[-4000:]
        assert reap(procs["restarted"], 300) == 0, logs[last].read_text(errors="replace")[-4000:]
    finally:
        stop_all(procs, lh)
    assert "quorum at inner step" in killed_log and f"iteration {iters:>9}/" not in killed_log
    q = {s: quorums(logs[s]) for s in range(k)}
    # the restarted job healed from a live peer (at its join quorum, or, having started alone while the
    # survivors were paused, when it met them: "healed ...; continues at iteration") and took part in
    # later syncs
    restarted_log = logs[last].read_text(errors="replace")
    assert any(h for _, _, _, h in q[last]) or "healed from a live peer; continues at" in restarted_log, q[last][:3]
    assert any(last in live for step, live, _, h in q[last] if not h and step > 10), q[last]
    # survivors ran without the killed slot for a while, and with it again at the end
    assert any(live == tuple(range(last)) for _, live, _, _ in q[0]), q[0]
    assert q[0][-1][1] == tuple(range(k)), q[0][-1]
    assert_one_model(q, logs)


def assert_one_model(q: Dict[int, List[tuple]], logs: Dict[int, pathlib.Path]) -> None:
    """At every quorum, every replica that reports it holds the same θ(t) (digest of every fragment, per
    rank); every replica prints the same final validation loss of the global model. ``q``: slot ->
    :func:`quorums` of its log; ``logs``: slot -> its final log."""
    # (one quorum = rank, inner step, its n-th quorum at that step (the end of training syncs the
    # remaining fragment at the last step), live slots)
    by_step: Dict[tuple, set] = {}
    for s in q:
        seen: Dict[tuple, int] = {}
        for step, live, digest, _ in q[s]:
            if step >= 0:
                rank = digest.partition(":")[0] if ":" in digest else ""  # each rank its own shard's digest
                seen[rank, step] = seen.get((rank, step), 0) + 1
                by_step.setdefault((rank, step, seen[rank, step], live), set()).add(digest)
    assert by_step and all(len(d) == 1 for d in by_step.values()), {st: d for st, d in by_step.items() if len(d) > 1}
    # the same global model on every replica: the same validation loss on the same batches
    finals = {s: re.findall(r"validation loss at iteration \d+ \(global model\) \| lm loss value: (\S+)",
                            f.read_text(errors="replace"))[-1] for s, f in logs.items()}
    assert len(set(finals.values())) == 1, finals
