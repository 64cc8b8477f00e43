"""Regression trace: short 2-rank CPU runs of every synchronisation method give bit-identical
results to the code they were recorded from.

This is the one kind of test in the suite whose reference is a recorded number, on purpose:
the reference here *is* the old code. The trace was recorded from the code before the
refactoring of issue 12 (the synchroniser interface in ``megatron_ppu/sync/`` and the build
steps in ``megatron_ppu/training/build.py``), which must not change what is trained. It pins
every iteration's loss, the final evaluation loss and a checksum of the parameters at the
end (the sum of squares of every parameter of each rank's model chunk, in float64), as
``float.hex`` strings, for DDP, Streaming DiLoCo (with a final partial-round sync), PPU 1/2,
per-step SDP (blocks plan, backward masking) and bf16 DiLoCo with the distributed optimizer.
torchft's ``torchft/diloco_regression_test.py`` golden fixtures are the model.

Every other test asserts against an independent reference (plain PyTorch, a hand-derived
number); this one only says "nothing moved". When a change is *meant* to alter training
(a new default, a fix of the numerics), re-record on purpose::

    PPU_RECORD_TRACE=1 .venv/bin/python -m pytest tests/test_regression_trace.py -q -p no:cacheprovider

and say in the commit why the trace moved.

Bit-identity holds on the machine the trace was recorded on: the float results of the same code
differ in the last bits between CPUs (the math library picks other kernels for another
instruction set). The fixture therefore names its machine (CPU model, torch's CPU capability,
torch version); on that machine the comparison is exact; elsewhere (CI) it allows a relative
difference of 1e-4 (two CPUs differed by 1.4e-5 after 7 steps), which still catches any change of what is trained (a changed default or
formula moves the losses by far more), and says so.

The runs share one process group (one launch, about a minute of CPU in all); the traced
values depend on the run order only through the seeds each run sets, which are the same.
"""
import json
import os
import platform
import warnings
from pathlib import Path

import pytest

from tests.harness import run_ranks

FIXTURE = Path(__file__).parent / "fixtures" / "regression_trace.json"

TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3",
        "--lr-warmup-iters", "2", "--eval-iters", "1", "--log-interval", "100", "--eval-interval", "100",
        "--train-iters", "7",
        # megatron-core's DotProductAttention, as when the trace was recorded; the default (auto) now runs the
        # SDPA attention (megatron_ppu.attention), which moves the last bits (tests/test_attention.py compares them)
        "--attention-backend", "local"]

RUNS = {
    "ddp": ["--diloco-local-steps", "0"],
    "streaming_diloco": ["--diloco-local-steps", "4", "--diloco-streaming-fragments", "2"],
    "ppu_half_mlps": ["--ppu-slices", "2", "--diloco-local-steps", "3"],
    "sdp_blocks_step": ["--subnet-plan", "blocks", "--subnet-coverage", "0.5", "--subnet-masking", "backward",
                        "--subnet-sync", "step"],
    "diloco_bf16_distopt": ["--diloco-local-steps", "3", "--bf16", "--use-distributed-optimizer"],
}


def _trace_worker(rank, world_size, runs):
    """Each run in turn: the logger rank's losses and final evaluation, every rank's checksum."""
    import torch
    import torch.distributed as dist

    from megatron_ppu.training.loop import run

    out = {}
    for name, argv in runs.items():
        t = run(argv)
        sq = torch.zeros((), dtype=torch.float64)
        for p in t.model.parameters():
            sq += p.detach().double().pow(2).sum()
        out[name] = {"logger": dist.get_rank() == world_size - 1,
                     "losses": [float(x).hex() for x in t.losses],
                     "eval_loss": float(t.final_eval["loss"]).hex(),
                     "param_sq_sum": float(sq).hex()}
    return out


def _trace():
    res = run_ranks(2, "tests.test_regression_trace:_trace_worker", {"runs": {k: TINY + v for k, v in RUNS.items()}},
                    timeout=500)
    logger = next(r for r in res if next(iter(r.values()))["logger"])
    return {name: {"argv": TINY + RUNS[name], "losses": logger[name]["losses"],
                   "eval_loss": logger[name]["eval_loss"],
                   "param_sq_sum_per_rank": [r[name]["param_sq_sum"] for r in res]} for name in RUNS}


def _machine() -> dict:
    """What decides the last bits of the same computation: the CPU and torch's kernels for it."""
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


@pytest.mark.timeout(600)
def test_runs_are_bit_identical_to_the_recorded_trace():
    got = _trace()
    if os.environ.get("PPU_RECORD_TRACE") == "1":
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps({"_machine": _machine(), **got}, indent=1) + "\n")
        pytest.skip(f"recorded {FIXTURE}")
    want = json.loads(FIXTURE.read_text())
    recorded_on = want.pop("_machine", None)
    exact = recorded_on == _machine()
    if not exact:
        warnings.warn(f"regression trace recorded on {recorded_on}, this is {_machine()}: comparing to a relative "
                      "1e-4 instead of bit for bit")
    assert set(got) == set(want)
    for name in want:
        assert got[name]["argv"] == want[name]["argv"], f"{name}: the test's argv changed; re-record on purpose"
        assert len(want[name]["losses"]) == 7, name
        for key in ("losses", "eval_loss", "param_sq_sum_per_rank"):
            a, b = _floats(got[name][key]), _floats(want[name][key])
            same = got[name][key] == want[name][key] if exact else all(
                abs(x - y) <= 1e-4 * abs(y) for x, y in zip(a if isinstance(a, list) else [a],
                                                             b if isinstance(b, list) else [b]))
            assert same, f"{name}: {key} moved: {got[name][key]} != recorded {want[name][key]} (as floats: {a} vs {b})"


def _floats(v):
    return [float.fromhex(x) for x in v] if isinstance(v, list) else float.fromhex(v)
