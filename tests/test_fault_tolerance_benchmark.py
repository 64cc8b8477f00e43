"""benchmarks/fault_tolerance.py, its smallest setting (the CPU side of scripts/gpu_check.py's ft-kill-heal row).

Two single-rank replica jobs through torchft and a lighthouse on 127.0.0.1 with --min_replicas 2 (all
started, killed by PID and reaped by the benchmark); a seeded slot is SIGKILLed at a seeded iteration
and restarted 2 s later. Checked against what those settings imply: the survivor forms no quorum
without the dead replica (min_replicas 2), so it loses at least the restart delay, and it is never
restarted (exit 0); the restarted job heals from it and continues past the kill iteration (not from
iteration 1); both end with the same validation loss (the same global model), below the loss of
uniform guessing over the 256-token vocabulary (ln 256 = 5.55).
"""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIGHTHOUSE = pathlib.Path(sys.executable).parent / "torchft_lighthouse"


@pytest.mark.timeout(400)
@pytest.mark.skipif(not LIGHTHOUSE.exists(), reason="torchft is not installed (scripts/setup_env.sh)")
def test_fault_tolerance_benchmark_smallest_setting(tmp_path):
    out = tmp_path / "ft"
    p = subprocess.run([sys.executable, "benchmarks/fault_tolerance.py", "--replicas", "2", "--paths", "torchft",
                        "--iters", "80", "--kill-window", "20", "24", "--restart-delay", "2", "--timeout", "300",
                        "--out", str(out), "--figure", str(tmp_path / "ft.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    res = json.loads(out.with_suffix(".json").read_text())
    (r,) = res["runs"]
    assert r["path"] == "torchft" and r["k"] == 2 and r["min_replicas"] == 2 and 20 <= r["kill_iteration"] <= 24
    assert r["detect_s"] is None  # no quorum of the survivor alone
    assert r["survivors_lost_window_s"] >= 2.0, r  # it waited at least the restart delay
    assert 0 < r["restart_to_heal_s"] <= r["restart_to_first_commit_s"] < 300, r
    # healed from the live survivor: the restarted job's first iteration lies beyond the kill
    assert r["restarted_first_iteration"] > r["kill_iteration"], r["restarted_first_iteration"]
    finals = list(r["final_val_loss"].values())
    assert len(finals) == 2 and finals[0] == finals[1] and finals[0] < math.log(256), finals
    assert "| torchft (slot" in out.with_suffix(".md").read_text()
