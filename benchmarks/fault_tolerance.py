"""Fault-tolerance benchmark (issue 24): replicas as independent jobs (torchft) vs today's restart.

Two paths train the same tiny GPT (``--mock-data``, Streaming DiLoCo, small H) with K replicas and
lose one replica at the same, seeded, random iteration:

* ``torchft``: a ``torchft_lighthouse`` on 127.0.0.1 (started and stopped here) and K single-rank
  torchrun jobs (``--fault-tolerance torchft --ft-replica-id k``). One job (a seeded random slot)
  is SIGKILLed, its whole process tree by PID, and restarted after ``--restart-delay`` seconds; it
  heals from a live peer. The survivors go on.
* ``restart``: one torchrun world of K ranks (``--fault-tolerance none``, K replicas of one rank),
  saving every ``--save-interval`` iterations; the whole world is SIGKILLed at the same iteration
  and restarted, after the same delay, from its last checkpoint (``--load``).

Every output line of every job is time-stamped as it arrives (the job's stdout is a pipe read by a
thread here). Measured, from those lines:

* time to detect (torchft): kill -> the survivors' first quorum line without the killed slot (none
  when the lighthouse's ``--min_replicas`` exceeds the survivors, as with K = 2: they wait);
* wall-clock the others lost, around the failure ("kill -> back"): the time from the kill to the
  moment the run is whole again (torchft: the restarted job's first commit with the survivors;
  restart: the restarted world back at the iteration it was killed in) minus the time the progress
  made meanwhile takes at the iteration rate before the kill (restart: no progress; the delay, the
  start-up and the iterations redone since the last save are all lost); and to the end ("kill ->
  end"): the time from the kill to the last iteration minus what those iterations take at that rate;
* restart -> first commit (torchft: the restarted job's first quorum line that counts its slot,
  after its heal; restart: the world's first iteration line after the restart) and restart -> heal;
* the total wall-clock of each run, and held-out (validation) loss of the global model against
  wall-clock (slot 0 of the survivors; the world's logger), drawn in a figure.

    python benchmarks/fault_tolerance.py                 # defaults: K = 3, ~ a few minutes
    python benchmarks/fault_tolerance.py --replicas 2 --paths torchft --iters 80 --kill-window 20 24
                                      # smallest (K = 2: the survivor waits for the restarted job)

Results: ``benchmarks/results/fault_tolerance.{json,md}`` and ``docs/figures/fault_tolerance.png``
(when matplotlib is installed). ``--out PREFIX`` / ``--figure PATH`` redirect them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
LIGHTHOUSE = os.path.join(BIN, "torchft_lighthouse")
TORCHRUN = os.path.join(BIN, "torchrun")

MODEL = ["--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2", "--lr", "1e-3",
         "--lr-warmup-iters", "5", "--eval-iters", "2", "--log-interval", "1", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--seed", "1234"]

QUORUM = re.compile(r"quorum at inner step (-?\d+): live slots \[([\d, ]*)\]( \(this replica healed\))?")
ITER = re.compile(r"iteration\s+(\d+)/")
VAL = re.compile(r"validation loss at iteration (\d+) \((?:\w+) model\) \| lm loss value: (\S+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """A process whose stdout+stderr lines are time-stamped here (``self.lines``: (unix time, line)) and
    copied to ``log``; started in a session of its own, killed by PID (the whole tree)."""

    def __init__(self, cmd: List[str], log: str, env: Optional[dict] = None):
        env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     start_new_session=True)
        self.lines: List[tuple] = []
        self._log = open(log, "w", encoding="utf-8")
        self._log.write(" ".join(cmd) + "\n")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            t = time.time()
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((t, line))
            self._log.write(f"{t:.3f} {line}\n")
        self._log.flush()

    def iterations(self) -> List[tuple]:
        return [(t, int(m.group(1))) for t, ln in list(self.lines) for m in [ITER.search(ln)] if m]

    def iteration(self) -> int:
        its = self.iterations()
        return its[-1][1] if its else 0

    def quorums(self) -> List[tuple]:
        """(time, inner step, live slots, healed) of every quorum line."""
        return [(t, int(m.group(1)), tuple(int(x) for x in m.group(2).split(",") if x.strip()), bool(m.group(3)))
                for t, ln in list(self.lines) for m in [QUORUM.search(ln)] if m]

    def validation(self) -> List[tuple]:
        return [(t, int(m.group(1)), float(m.group(2))) for t, ln in list(self.lines) for m in [VAL.search(ln)] if m]

    def kill_tree(self) -> None:
        """SIGKILL the job's every process (its tree and process group), each by PID."""
        from megatron_ppu.testing.processes import kill_process_tree

        kill_process_tree(self.proc.pid)

    def reap(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            rc = self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        self._log.close()
        return rc


def _wait(cond, timeout: float, what: str, jobs=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        for j in jobs:
            if j.proc.poll() not in (None, 0):
                raise RuntimeError(f"a job exited with {j.proc.returncode} while waiting for {what}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _train_args(a, k: int) -> List[str]:
    return MODEL + ["--global-batch-size", str(2 * k), "--train-iters", str(a.iters), "--diloco-replicas", str(k),
                    "--diloco-local-steps", str(a.h), "--diloco-streaming-fragments", str(a.fragments),
                    "--eval-interval", str(a.eval_interval)]


def torchft_argv(a, k: int, slot: int, addr: str) -> List[str]:
    """The trainer argv of replica job ``slot`` of the torchft path (``a``: the benchmark's arguments)."""
    return _train_args(a, k) + ["--fault-tolerance", "torchft", "--ft-lighthouse", addr, "--ft-replica-id", str(slot),
                                "--ft-timeout", "120", "--ft-quorum-timeout", "300", "--ft-heartbeat-interval", "0.2"]


def _rate(its: List[tuple], lo: int, hi: int) -> float:
    """Iterations per second between iterations ``lo`` and ``hi`` (their first time-stamps)."""
    first = {}
    for t, i in its:
        first.setdefault(i, t)
    los = [i for i in first if i >= lo]
    his = [i for i in first if i <= hi]
    if not los or not his:
        return float("nan")
    i0, i1 = min(los), max(his)
    return (i1 - i0) / (first[i1] - first[i0]) if i1 > i0 and first[i1] > first[i0] else float("nan")


def _lost(its: List[tuple], rate: float, t_kill: float, end_it: int, kill_it: int) -> float:
    """Wall-clock from the kill to the last iteration beyond what ``end_it - kill_it`` iterations take at ``rate``."""
    t_end = max(t for t, i in its if i == end_it)
    return (t_end - t_kill) - (end_it - kill_it) / rate


def _it_at(its: List[tuple], t: float) -> int:
    """The last iteration logged at or before ``t``."""
    return max([i for ti, i in its if ti <= t] or [0])


def _lost_window(its: List[tuple], rate: float, t_kill: float, t_back: float) -> float:
    """Wall-clock lost between the kill and ``t_back``: their distance minus what the progress made in
    it (iterations beyond the one running at the kill; negative after a restart from an older save)
    takes at ``rate``."""
    return (t_back - t_kill) - (_it_at(its, t_back) - _it_at(its, t_kill)) / rate


def run_torchft(a, k: int, victim: int, kill_it: int, tmp: str) -> dict:
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    # min_replicas: by default a majority (no replica ever trains apart from the run; with K = 2 the survivor
    # waits for the restarted job instead of going on alone)
    min_rep = a.min_replicas or k // 2 + 1
    lh = Job([LIGHTHOUSE, "--bind", addr, "--min_replicas", str(min_rep), "--join_timeout_ms",
              str(int(a.join_timeout * 1000)), "--heartbeat_timeout_ms", str(int(a.heartbeat_timeout * 1000)),
              "--quorum_tick_ms", "100"], os.path.join(tmp, "lighthouse.log"))
    jobs: Dict[str, Job] = {}

    def cmd(slot):
        return [TORCHRUN, "--standalone", "--nproc-per-node", "1", os.path.join(REPO, "pretrain_gpt_ppu.py"),
                *torchft_argv(a, k, slot, addr)]
    try:
        _wait(lambda: _port_open(port), 30, "the lighthouse", [lh])
        t0 = time.time()
        for s in range(k):
            jobs[f"slot{s}"] = Job(cmd(s), os.path.join(tmp, f"ft_slot{s}.log"))
            if s == 0 and min_rep == 1:
                # a lone quorum is allowed: slot 0 forms the first one before the others start, so that no two
                # replicas start training apart (the README's "start one site first"); the others heal from it
                _wait(lambda: jobs["slot0"].quorums(), a.timeout, "slot 0's first quorum", [jobs["slot0"]])
        v = jobs[f"slot{victim}"]
        _wait(lambda: v.iteration() >= kill_it, a.timeout, f"slot {victim} to reach iteration {kill_it}",
              list(jobs.values()))
        t_kill = time.time()
        v.kill_tree()
        rc_killed = v.reap(30)
        time.sleep(a.restart_delay)
        t_restart = time.time()
        jobs["restarted"] = r = Job(cmd(victim), os.path.join(tmp, f"ft_slot{victim}_restarted.log"))
        survivors = [jobs[f"slot{s}"] for s in range(k) if s != victim]
        rcs = {f"slot{s}": jobs[f"slot{s}"].reap(a.timeout) for s in range(k) if s != victim}
        rcs["restarted"] = r.reap(120)  # it ends with the survivors (it runs in their quorums)
        t_end = time.time()
    finally:
        for j in jobs.values():
            if j.proc.poll() is None:
                j.kill_tree()
                j.reap(30)
        if lh.proc.poll() is None:
            os.killpg(lh.proc.pid, signal.SIGTERM)
        lh.reap(10)
    assert rc_killed == -signal.SIGKILL, rc_killed
    bad = {n: c for n, c in rcs.items() if c != 0}
    if bad:
        raise RuntimeError(f"torchft path: jobs exited with {bad}; logs in {tmp}")
    s0 = survivors[0]
    others = tuple(s for s in range(k) if s != victim)
    # a survivors' quorum without the killed slot before the restarted job first asks for one (later ones are
    # its heal quorum, in which a healing replica does not contribute)
    r_ask = min([t for t, ln in r.lines if "Start quorum" in ln] + [t for t, *_ in r.quorums()] + [float("inf")])
    detect = [t for sv in survivors for t, step, live, _ in sv.quorums() if t_kill < t < r_ask and live == others]
    heal = [t for t, _, live, healed in r.quorums() if healed] or \
        [t for t, ln in r.lines if "healed from a live peer; continues at" in ln]
    commit = [t for t, step, live, healed in r.quorums() if victim in live and len(live) > 1 and not healed]
    if not heal or not commit:
        raise RuntimeError(f"the restarted slot {victim} never healed from / committed with the survivors (they "
                           f"finished before it joined?): raise --iters or --min-replicas; logs in {tmp}")
    finals = {name: (j.validation() or [(0, 0, None)])[-1][2] for name, j in jobs.items() if name != f"slot{victim}"}
    if len(set(finals.values())) != 1:
        raise RuntimeError(f"the replicas end with different global models (validation losses {finals}); logs in {tmp}")
    its = s0.iterations()
    first_it = min(i for _, i in its)
    rate = _rate(its, max(first_it, a.warmup_iters), kill_it)
    lost = [_lost(sv.iterations(), _rate(sv.iterations(), max(first_it, a.warmup_iters), kill_it), t_kill, a.iters,
                  kill_it) for sv in survivors]
    t_back = min(commit)
    lost_w = [_lost_window(sv.iterations(), _rate(sv.iterations(), max(first_it, a.warmup_iters), kill_it), t_kill,
                           t_back) for sv in survivors]
    its0 = s0.iterations()
    return {
        "rate_outage_it_per_s": (_it_at(its0, t_back) - _it_at(its0, t_kill)) / (t_back - t_kill),
        "survivors_lost_window_s": max(lost_w), "survivors_lost_window_each_s": lost_w,
        "path": "torchft", "k": k, "victim_slot": victim, "kill_iteration": kill_it, "killed_at_s": t_kill - t0,
        "detect_s": (min(detect) - t_kill) if detect else None,
        "survivors_lost_s": max(lost), "survivors_lost_each_s": lost, "rate_before_it_per_s": rate,
        "restart_to_heal_s": (min(heal) - t_restart) if heal else None,
        "restart_to_first_commit_s": (min(commit) - t_restart) if commit else None,
        "restarted_first_iteration": (r.iterations() or [(0, None)])[0][1],
        "total_s": t_end - t0, "min_replicas": min_rep,
        "validation": [(t - t0, i, loss) for t, i, loss in s0.validation()],
        "restarted_validation": [(t - t0, i, loss) for t, i, loss in r.validation()],
        "final_val_loss": finals,
    }


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def run_restart(a, k: int, kill_it: int, tmp: str) -> dict:
    ckpt = os.path.join(tmp, "ckpt")
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(k), os.path.join(REPO, "pretrain_gpt_ppu.py"),
           *_train_args(a, k), "--fault-tolerance", "none", "--save", ckpt, "--load", ckpt,
           "--save-interval", str(a.save_interval)]
    jobs: Dict[str, Job] = {}
    try:
        t0 = time.time()
        jobs["world"] = w = Job(cmd, os.path.join(tmp, "world.log"))
        _wait(lambda: w.iteration() >= kill_it, a.timeout, f"the world to reach iteration {kill_it}", [w])
        t_kill = time.time()
        w.kill_tree()
        rc_killed = w.reap(30)
        time.sleep(a.restart_delay)
        t_restart = time.time()
        jobs["restarted"] = r = Job(cmd, os.path.join(tmp, "world_restarted.log"))
        rc = r.reap(a.timeout)
        t_end = time.time()
    finally:
        for j in jobs.values():
            if j.proc.poll() is None:
                j.kill_tree()
                j.reap(30)
    assert rc_killed == -signal.SIGKILL, rc_killed
    if rc != 0:
        raise RuntimeError(f"restart path: the restarted world exited with {rc}; logs in {tmp}")
    its = w.iterations()
    first_it = min(i for _, i in its)
    rate = _rate(its, max(first_it, a.warmup_iters), kill_it)
    r_its = r.iterations()
    resumed_from = r_its[0][1] - 1 if r_its else None
    all_its = its + r_its
    it_kill = _it_at(its, t_kill)
    back = [t for t, i in r_its if i >= it_kill]
    return {
        "rate_outage_it_per_s": ((_it_at(all_its, min(back)) - it_kill) / (min(back) - t_kill)) if back else None,
        "survivors_lost_window_s": (_lost_window(all_its, rate, t_kill, min(back)) if back else None),
        "path": "restart", "k": k, "kill_iteration": kill_it, "killed_at_s": t_kill - t0,
        "detect_s": None, "survivors_lost_s": _lost(all_its, rate, t_kill, a.iters, kill_it),
        "rate_before_it_per_s": rate, "resumed_from_iteration": resumed_from,
        "iterations_redone": (w.iteration() - resumed_from) if resumed_from is not None else None,
        "restart_to_heal_s": None, "restart_to_first_commit_s": (r_its[0][0] - t_restart) if r_its else None,
        "total_s": t_end - t0,
        "validation": [(t - t0, i, loss) for j in (w, r) for t, i, loss in j.validation()],
        "final_val_loss": {"world": (r.validation() or [(0, 0, None)])[-1][2]},
    }


def _f(x, fmt="{:.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def table(res: dict) -> str:
    rows = ["| path | K | killed at it. | detect (s) | it/s before | it/s kill -> back | lost by the others: kill -> "
            "back (s) | restart -> heal (s) | restart -> first commit (s) | total (s) | final val. loss |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        final = sorted({round(v, 4) for v in r["final_val_loss"].values() if v is not None})
        name = r["path"] + (f" (slot {r['victim_slot']} killed)" if r["path"] == "torchft" else
                            f" (resumed from it. {r['resumed_from_iteration']})")
        rows.append(f"| {name} | {r['k']} | {r['kill_iteration']} | {_f(r['detect_s'])} "
                    f"| {_f(r['rate_before_it_per_s'], '{:.2f}')} "
                    f"| {_f(r['rate_outage_it_per_s'], '{:.2f}')} | {_f(r['survivors_lost_window_s'])} "
                    f"| {_f(r['restart_to_heal_s'])} | {_f(r['restart_to_first_commit_s'])} "
                    f"| {_f(r['total_s'])} "
                    f"| {', '.join(f'{x:.4f}' for x in final) or 'n/a'} |")
    return "\n".join(rows)


def figure(res: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in res["runs"]:
        pts = sorted(r["validation"])
        label = ("torchft: independent jobs (a survivor)" if r["path"] == "torchft"
                 else "today: one world, restart from checkpoint")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=label)
        ax.axvline(r["killed_at_s"], ls=":", color=ax.lines[-1].get_color(), lw=1)
    ax.set_xlabel("wall-clock since launch (s); dotted: the kill")
    ax.set_ylabel("validation loss (global model)")
    ax.set_title(f"K = {res['config']['replicas']}, one replica killed at it. {res['config']['kill_iteration']}, "
                 f"restarted after {res['config']['restart_delay']} s")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def parser() -> argparse.ArgumentParser:
    """The benchmark's command line (scripts/gpu_check.py builds its row's trainer argv from its defaults)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300, help="--train-iters of every run (default 300)")
    ap.add_argument("--h", type=int, default=4, help="--diloco-local-steps (default 4)")
    ap.add_argument("--fragments", type=int, default=2, help="--diloco-streaming-fragments (default 2)")
    ap.add_argument("--eval-interval", type=int, default=20)
    ap.add_argument("--save-interval", type=int, default=20, help="restart path: --save-interval (default 20)")
    ap.add_argument("--kill-window", type=int, nargs=2, default=(40, 80), metavar=("LO", "HI"),
                    help="the kill iteration is drawn uniformly from [LO, HI] (default 40 80)")
    ap.add_argument("--warmup-iters", type=int, default=5, help="iterations left out of the rate before the kill")
    ap.add_argument("--restart-delay", type=float, default=5.0, help="seconds between the kill and the restart")
    ap.add_argument("--heartbeat-timeout", type=float, default=5.0, help="the lighthouse's (s)")
    ap.add_argument("--join-timeout", type=float, default=60.0, help="the lighthouse's (s)")
    ap.add_argument("--min-replicas", type=int, default=0,
                    help="the lighthouse's --min_replicas (default 0: a majority of K, K // 2 + 1)")
    ap.add_argument("--seed", type=int, default=0, help="draws the kill iteration and the killed slot")
    ap.add_argument("--paths", default="torchft,restart", help="comma-separated: torchft, restart")
    ap.add_argument("--timeout", type=float, default=900.0, help="per phase (s)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "fault_tolerance"))
    ap.add_argument("--figure", default=os.path.join(REPO, "docs", "figures", "fault_tolerance.png"))
    ap.add_argument("--keep-logs", action="store_true")
    return ap


def main() -> int:
    a = parser().parse_args()
    k = a.replicas
    if k < 2:
        raise ValueError(f"--replicas {k}: the benchmark needs at least 2 replicas (one killed, one going on).")
    if not os.path.exists(LIGHTHOUSE):
        raise ValueError(f"{LIGHTHOUSE} is missing: install torchft (bash scripts/setup_env.sh).")
    rng = random.Random(a.seed)
    kill_it = rng.randint(*a.kill_window)
    victim = rng.randrange(k)
    if not (a.warmup_iters + 2 <= kill_it < a.iters):
        raise ValueError(f"the kill iteration {kill_it} must lie in [--warmup-iters + 2, --iters).")
    tmp = tempfile.mkdtemp(prefix="ppu-ft-bench-")
    res = {"config": {**{k_: v for k_, v in vars(a).items() if k_ not in ("out", "figure")},
                      "kill_iteration": kill_it, "victim_slot": victim, "model": MODEL}, "runs": []}
    try:
        for path in a.paths.split(","):
            t = time.time()
            if path == "torchft":
                res["runs"].append(run_torchft(a, k, victim, kill_it, tmp))
            elif path == "restart":
                res["runs"].append(run_restart(a, k, kill_it, tmp))
            else:
                raise ValueError(f"--paths: unknown path {path!r} (torchft, restart)")
            print(f"{path}: done in {time.time() - t:.0f} s", flush=True)
    except Exception:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    md = table(res)
    print(md)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    fig = figure(res, a.figure)
    with open(a.out + ".md", "w", encoding="utf-8") as f:
        f.write(f"Fault tolerance (benchmarks/fault_tolerance.py), K = {k}, kill at iteration {kill_it} "
                f"(slot {victim} for torchft), restart after {a.restart_delay} s\n\n{md}\n")
    print(f"results: {a.out}.json, {a.out}.md" + (f", {fig}" if fig else " (no figure: matplotlib missing)"))
    if a.keep_logs:
        print(f"logs: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
