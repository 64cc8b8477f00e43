"""benchmarks/fault_tolerance.py, its smallest setting (the CPU side of scripts/gpu_check.py's ft-kill-heal row).

Two single-rank replica jobs through torchft and a lighthouse on 127.0.0.1 (all started, killed by
PID and reaped by the benchmark); slot 1 or 0 is SIGKILLed at a seeded iteration and restarted.
Checked against what the lighthouse's settings imply: the survivor cannot form a quorum without the
dead replica before its heartbeat times out (5 s), and does within that plus a loaded machine's
slack; the restarted job continues past the kill iteration (healed from the survivor, not from
iteration 1); both end with the same validation loss (the same global model).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIGHTHOUSE = pathlib.Path(sys.executable).parent / "torchft_lighthouse"
HEARTBEAT_TIMEOUT_S = 5.0  # the benchmark's default --heartbeat-timeout


@pytest.mark.timeout(400)
@pytest.mark.skipif(not LIGHTHOUSE.exists(), reason="torchft is not installed (scripts/setup_env.sh)")
def test_fault_tolerance_benchmark_smallest_setting(tmp_path):
    out = tmp_path / "ft"
    p = subprocess.run([sys.executable, "benchmarks/fault_tolerance.py", "--replicas", "2", "--paths", "torchft",
                        "--iters", "200", "--kill-window", "20", "24", "--restart-delay", "2", "--timeout", "300",
                        "--out", str(out), "--figure", str(tmp_path / "ft.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res = json.loads(out.with_suffix(".json").read_text())
    (r,) = res["runs"]
    assert r["path"] == "torchft" and r["k"] == 2 and 20 <= r["kill_iteration"] <= 24
    # the lighthouse drops the dead replica only after its heartbeat timeout (its last heartbeat is at most
    # one --ft-heartbeat-interval, 0.2 s, before the kill)
    assert HEARTBEAT_TIMEOUT_S - 0.5 <= r["detect_s"] <= HEARTBEAT_TIMEOUT_S + 30, r["detect_s"]
    assert 0 < r["restart_to_heal_s"] <= r["restart_to_first_commit_s"] < 300, r
    # healed from the live survivor: the restarted job's first iteration lies beyond the kill
    assert r["restarted_first_iteration"] > r["kill_iteration"], r["restarted_first_iteration"]
    finals = list(r["final_val_loss"].values())
    assert len(finals) == 2 and finals[0] == finals[1] and finals[0] < 6.0, finals  # ln(256) = 5.55 at the start
    assert "| torchft (slot" in out.with_suffix(".md").read_text()
