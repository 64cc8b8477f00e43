"""The first-GPU check: run on a machine with one NVIDIA GPU (see scripts/gpu_check.sh).

Each check is a command the CPU suite also exercises (the same trainer flags, the same
tests), here on CUDA. Prints one table row per check and writes the rows as JSON
(``$OUT/gpu_check.json`` when ``OUT`` is set, else ``gpu_check.json`` in the working folder).

Checks:
  env            torch / CUDA / NCCL / megatron-core versions, the GPU
  nccl-bf16      1 rank, NCCL (default group "cpu:gloo,cuda:nccl"), --bf16, 20 iterations
  resume         the same run stopped at 10 (--exit-interval, --save) and resumed (--load):
                 losses 11..20 must match the uninterrupted run
  ppu2-2ranks    2 ranks sharing the GPU (--distributed-backend gloo, LOCAL_RANK % device_count),
                 --ppu-slices 2, DiLoCo H=5
  tp2-sp         2 ranks, TP=2, --sequence-parallel, --bf16
  pp2            2 ranks, PP=2, --bf16
  grads-cuda     tests/test_partial_layers.py's owned-gradient check with the models on CUDA
  attention-cuda tests/test_attention.py's SDPA-vs-DotProductAttention equality and dropout checks on CUDA
                 (bf16 with the flash and the fused kernels forced)
  attention-bench benchmarks/attention.py on CUDA in bf16: peak memory and step time of the core attention,
                 local vs flash (SDPA), sequence 1,024 / 2,048 / 4,096
  classes        which optimizer / norm / attention classes and fused paths Megatron picked
  memory-*       peak torch.cuda.max_memory_allocated per rank, 4 ranks sharing the GPU (K = 4):
                 DiLoCo vs PPU 1/4 MLPs vs PPU 1/4 MLPs + 1/4 heads on a 1.3B-parameter GPT
  ft-kill-heal   2 replica jobs through torchft (benchmarks/fault_tolerance.py --replicas 2 --paths torchft),
                 their ranks sharing the GPU: one job SIGKILLed and restarted; the survivor is not
                 restarted (min_replicas 2: it waits), the restarted job heals from it and commits
                 (the CPU suite runs the same: tests/test_fault_tolerance_benchmark.py)
  tests-*        selected multi-rank CPU-suite tests with their ranks sharing the GPU, as time allows
                 (tests-overlap: the delayed outer sync's CUDA stream, int8/fp8 quantization on the device)

``--print-commands`` prints the trainer argv of every run as JSON and exits (the CPU suite parses
them with the trainer's own parser, so a flag typo is caught without a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "scripts" / "gpu_check_worker.py")

TINY = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "256",
        "--max-position-embeddings", "256", "--micro-batch-size", "4", "--mock-data", "--vocab-size", "1024",
        "--lr", "1e-3", "--lr-warmup-iters", "2", "--eval-iters", "2", "--eval-interval", "1000",
        "--log-interval", "5", "--hidden-dropout", "0", "--attention-dropout", "0"]
# The paper's 1.3B model (24 layers, d = 2048, 16 heads, ffn 4d), sequence 1024.
MEM_MODEL = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "1024",
             "--max-position-embeddings", "1024", "--micro-batch-size", "1", "--mock-data", "--vocab-size", "32000",
             "--bf16", "--train-iters", "3", "--eval-iters", "1", "--eval-interval", "1000", "--log-interval", "1",
             "--lr", "1e-4", "--lr-warmup-iters", "0", "--diloco-local-steps", "100"]


# The smallest kill-and-heal setting of the fault-tolerance benchmark (issue 24): K = 2 single-rank jobs.
FT_BENCH = ["--replicas", "2", "--paths", "torchft", "--iters", "80", "--kill-window", "20", "24",
            "--restart-delay", "2"]


def _ft_bench():
    """benchmarks/fault_tolerance.py as a module (its trainer argv, for --print-commands)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ft_bench", REPO / "benchmarks" / "fault_tolerance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def runs(tmp: str) -> dict:
    """name -> (nproc, trainer argv). Paths live under ``tmp``."""
    shared = ["--distributed-backend", "gloo"]  # several ranks on one GPU: NCCL refuses duplicates
    ft = _ft_bench()
    return {
        "nccl-bf16": (1, TINY + ["--bf16", "--train-iters", "20", "--diloco-local-steps", "0"]),
        "resume-a": (1, TINY + ["--bf16", "--train-iters", "20", "--diloco-local-steps", "0",
                                "--save", f"{tmp}/ckpt-a", "--save-interval", "10"]),
        "resume-b": (1, TINY + ["--bf16", "--train-iters", "20", "--diloco-local-steps", "0",
                                "--save", f"{tmp}/ckpt-b", "--load", f"{tmp}/ckpt-b", "--exit-interval", "10"]),
        "resume-c": (1, TINY + ["--bf16", "--train-iters", "20", "--diloco-local-steps", "0",
                                "--save", f"{tmp}/ckpt-b", "--load", f"{tmp}/ckpt-b"]),
        "ppu2-2ranks": (2, TINY + shared + ["--bf16", "--train-iters", "10", "--ppu-slices", "2",
                                            "--diloco-local-steps", "5"]),
        "tp2-sp": (2, TINY + shared + ["--bf16", "--train-iters", "6", "--tensor-model-parallel-size", "2",
                                       "--sequence-parallel", "--diloco-local-steps", "0"]),
        "pp2": (2, TINY + shared + ["--bf16", "--train-iters", "6", "--pipeline-model-parallel-size", "2",
                                    "--diloco-local-steps", "0"]),
        # the ft-kill-heal row's replica jobs (run by benchmarks/fault_tolerance.py; listed for --print-commands)
        "ft-kill-heal": (1, ft.torchft_argv(ft.parser().parse_args(FT_BENCH), 2, 0, "127.0.0.1:29510")),
        "memory-diloco": (4, MEM_MODEL + shared + ["--ppu-slices", "1"]),
        "memory-ppu4": (4, MEM_MODEL + shared + ["--ppu-slices", "4"]),
        "memory-ppu4-heads": (4, MEM_MODEL + shared + ["--ppu-slices", "4", "--ppu-slice-attention-heads"]),
    }


class Check:
    def __init__(self, out_dir: str, budget_s: float):
        self.rows = []
        self.out_dir = out_dir
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, name: str, ok, detail: str, **extra) -> None:
        status = "PASS" if ok is True else "FAIL" if ok is False else str(ok)
        self.rows.append({"check": name, "status": status, "detail": detail, **extra})
        print(f"| {name:<18} | {status:<7} | {detail}", flush=True)

    def train(self, name: str, nproc: int, argv: list, timeout: float):
        """Run the trainer on ``nproc`` ranks; return (last rank's result dict or None, seconds, log tail)."""
        if self.left() < 20:
            return None, 0.0, "skipped: the 8-minute budget is spent"
        timeout = min(timeout, self.left() - 10)
        out = os.path.join(self.out_dir, f"{name}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               WORKER, out, "--"] + argv
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
            log = p.stdout + p.stderr
            rc = p.returncode
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            log += f"\n[timed out after {timeout:.0f} s]"
            rc = 124
        secs = time.monotonic() - t0
        with open(os.path.join(self.out_dir, f"{name}.log"), "w", encoding="utf-8") as f:
            f.write(" ".join(cmd) + "\n" + log)
        if rc != 0:
            return None, secs, log[-1500:]
        results = {}
        for r in range(nproc):
            path = f"{out}.rank{r}"
            if os.path.isfile(path):
                results[r] = json.load(open(path, encoding="utf-8"))
        last = results.get(nproc - 1)
        if last is not None:
            last["per_rank_max_memory"] = {r: v.get("max_memory_allocated") for r, v in results.items()}
        return last, secs, log[-600:]


def _finite(xs) -> bool:
    return bool(xs) and all(x == x and abs(x) < 1e4 for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print-commands", action="store_true", help="print every run's trainer argv as JSON and exit")
    ap.add_argument("--budget-s", type=float, default=470.0, help="whole-check time budget (default: 470)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the 1.3B memory comparison")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ppu-gpu-check-")
    plan = runs(tmp)
    if a.print_commands:
        print(json.dumps({k: {"nproc": n, "argv": v} for k, (n, v) in plan.items()}))
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; this check needs an NVIDIA GPU. Nothing was run.",
              file=sys.stderr)
        return 3
    out_dir = os.environ.get("OUT") or str(REPO)
    logs = os.path.join(tmp, "logs")
    os.makedirs(logs)
    c = Check(logs, a.budget_s)
    print("| check              | status  | detail")
    print("|--------------------|---------|-------")
    import megatron.core

    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    c.row("env", True, f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {nccl}, megatron-core "
                       f"{megatron.core.__version__}, {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")

    res, secs, log = c.train("nccl-bf16", *plan["nccl-bf16"], timeout=90)
    if res is None:
        c.row("nccl-bf16", False, f"run failed ({secs:.0f} s): ...{log}")
    else:
        ok = _finite(res["losses"]) and res["losses"][-1] < res["losses"][0] and res["param_devices"] == ["cuda"]
        c.row("nccl-bf16", ok, f"loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}, eval "
                               f"{res['final_eval'].get('loss', float('nan')):.4f}, params on {res['param_devices']} "
                               f"{res['param_dtypes']} ({secs:.0f} s)")
        c.row("classes", "INFO", f"optimizer {res['optimizer']} {res['chained']} inner {res['inner']}; norms "
                                 f"{res['norms']}; attention {res['core_attention']}; fused {res['fused']}")

    ra, _, la = c.train("resume-a", *plan["resume-a"], timeout=90)
    rb, _, lb = c.train("resume-b", *plan["resume-b"], timeout=90)
    rc_, secs, lc = c.train("resume-c", *plan["resume-c"], timeout=90)
    if ra is None or rb is None or rc_ is None:
        c.row("resume", False, f"a run failed: ...{(la if ra is None else lb if rb is None else lc)}")
    else:
        full, resumed = ra["losses"][10:20], rc_["losses"]
        diff = max(abs(x - y) for x, y in zip(full, resumed)) if len(resumed) == len(full) else float("inf")
        c.row("resume", diff <= 1e-6 * max(1.0, abs(full[0])),
              f"{len(rb['losses'])} + {len(resumed)} iterations; max |loss diff| vs uninterrupted {diff:.3g} "
              f"(bit-exact: {diff == 0.0})", max_loss_diff=diff)

    for name in ("ppu2-2ranks", "tp2-sp", "pp2"):
        res, secs, log = c.train(name, *plan[name], timeout=120)
        if res is None:
            c.row(name, False, f"run failed ({secs:.0f} s): ...{log}")
        else:
            c.row(name, _finite(res["losses"]), f"loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}; norms "
                                               f"{res['norms']} ({secs:.0f} s)")

    if c.left() > 60:
        env = dict(os.environ, PPU_TEST_DEVICE="cuda", PYTHONWARNINGS="ignore")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                            "tests/test_partial_layers.py", "-k", "owned_grads and (tp1-dp2 or tp2-sp)"],
                           cwd=str(REPO), env=env, capture_output=True, text=True, timeout=min(150, c.left() - 10))
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        c.row("grads-cuda", p.returncode == 0, f"{tail[0]} ({time.monotonic() - t0:.0f} s)")
    else:
        c.row("grads-cuda", "SKIP", "the 8-minute budget is spent")

    # issue 25: the SDPA attention equal to megatron-core's DotProductAttention on CUDA (bf16 with the flash and
    # the fused kernels forced, fp32 with torch's choice; TP 1 and 2), its dropout; then benchmarks/attention.py
    # in bf16 (peak memory and step time, sequence 1,024 / 2,048 / 4,096, both backends)
    if c.left() > 60:
        env = dict(os.environ, PPU_TEST_DEVICE="cuda", PYTHONWARNINGS="ignore")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                            "tests/test_attention.py", "-k", "equals or dropout"],
                           cwd=str(REPO), env=env, capture_output=True, text=True, timeout=min(150, c.left() - 10))
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        c.row("attention-cuda", p.returncode == 0, f"{tail[0]} ({time.monotonic() - t0:.0f} s)")
    else:
        c.row("attention-cuda", "SKIP", "the 8-minute budget is spent")
    if c.left() > 90:
        t0 = time.monotonic()
        prefix = os.path.join(logs, "attention_cuda_bf16")
        try:
            p = subprocess.run([sys.executable, "benchmarks/attention.py", "--device", "cuda", "--dtype", "bf16",
                                "--batch", "4", "--heads", "16", "--head-dim", "128", "--timeout", "60",
                                "--out", prefix], cwd=str(REPO), env=dict(os.environ, PYTHONWARNINGS="ignore"),
                               capture_output=True, text=True, timeout=min(150, c.left() - 10))
            if p.returncode == 0:
                rows = json.load(open(prefix + ".json", encoding="utf-8"))["rows"]
                by = {(r["seq"], r["backend"]): r for r in rows}
                detail = "; ".join(f"s={s}: peak {by[s, 'local']['peak_bytes'] / 2**20:.0f} vs "
                                   f"{by[s, 'flash']['peak_bytes'] / 2**20:.0f} MiB, step "
                                   f"{by[s, 'local']['step_s'] * 1e3:.1f} vs {by[s, 'flash']['step_s'] * 1e3:.1f} ms"
                                   for s in sorted({r["seq"] for r in rows}))
                c.row("attention-bench", "INFO", f"local vs flash (SDPA), bf16, b=4, 16 heads x 128: {detail} "
                                                 f"({time.monotonic() - t0:.0f} s)", rows=rows)
            else:
                c.row("attention-bench", False, f"benchmark failed: ...{(p.stdout + p.stderr)[-600:]}")
        except subprocess.TimeoutExpired:
            c.row("attention-bench", "SKIP", f"stopped at the budget ({time.monotonic() - t0:.0f} s)")
    else:
        c.row("attention-bench", "SKIP", "the 8-minute budget is spent")

    # issue 24: 2 replica jobs through torchft sharing the GPU, one SIGKILLed (whole tree) and restarted
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")):
        c.row("ft-kill-heal", "SKIP", f"torchft is not installed for {sys.executable} (scripts/setup_env.sh)")
    elif c.left() > 100:
        t0 = time.monotonic()
        prefix = os.path.join(logs, "ft_kill_heal")
        try:
            p = subprocess.run([sys.executable, "benchmarks/fault_tolerance.py", *FT_BENCH, "--out", prefix,
                                "--figure", prefix + ".png", "--timeout", "120"], cwd=str(REPO),
                               env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2"),
                               capture_output=True, text=True, timeout=min(200, c.left() - 10))
            if p.returncode == 0:
                r = json.load(open(prefix + ".json", encoding="utf-8"))["runs"][0]
                ok = r["restart_to_heal_s"] is not None and r["restart_to_first_commit_s"] is not None
                c.row("ft-kill-heal", ok, f"survivor lost {r['survivors_lost_window_s']:.1f} s, "
                                          f"restart -> heal {r['restart_to_heal_s']}, -> first commit "
                                          f"{r['restart_to_first_commit_s']} s ({time.monotonic() - t0:.0f} s)", run=r)
            else:
                c.row("ft-kill-heal", False, f"benchmark failed: ...{(p.stdout + p.stderr)[-600:]}")
        except subprocess.TimeoutExpired:
            c.row("ft-kill-heal", False, f"timed out ({time.monotonic() - t0:.0f} s)")
    else:
        c.row("ft-kill-heal", "SKIP", "the 8-minute budget is spent")

    if not a.skip_memory:
        base = None
        for name in ("memory-diloco", "memory-ppu4", "memory-ppu4-heads"):
            res, secs, log = c.train(name, *plan[name], timeout=150)
            if res is None:
                c.row(name, False if "skipped" not in log else "SKIP", f"({secs:.0f} s) ...{log[-400:]}")
                continue
            mem = max(v for v in res["per_rank_max_memory"].values() if v)
            base = base or (mem if name == "memory-diloco" else None)
            ratio = f", {mem / base:.3f} x DiLoCo" if base else ""
            c.row(name, "INFO", f"peak {mem / 2**30:.2f} GiB per rank{ratio} ({secs:.0f} s)", peak_bytes=mem)

    # CPU-suite tests whose ranks share the GPU over gloo (models and collectives on CUDA), as the
    # remaining budget allows: SP norms and SDP clipping, bf16 outer deltas and distributed-optimizer
    # masters, the implemented Megatron flags (CUDA memory scalars, timers, per-token loss counts).
    for name, target, sel in (
            ("tests-review", "tests/test_megatron_parity.py tests/test_sdp_distributed_optimizer.py", "sequence_parallel or sdp"),
            ("tests-outer", "tests/test_outer_correctness.py", "distributed_optimizer or nonowners"),
            ("tests-flags", "tests/test_megatron_flags.py", "implemented_flags_set or per_token or two_iterations"),
            # the delayed outer sync's CUDA stream (worker stream, main stream waits) and int8/fp8 on the device
            ("tests-overlap", "tests/test_sync_overlap.py tests/test_compress.py",
             "overlaps or distributed_optimizer or cuda")):
        if c.left() < 90:
            c.row(name, "SKIP", "the 8-minute budget is spent")
            continue
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *target.split(), "-k", sel],
                               cwd=str(REPO), env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True,
                               text=True, timeout=c.left() - 15)
            tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
            c.row(name, p.returncode == 0, f"{tail[0]} ({time.monotonic() - t0:.0f} s)")
        except subprocess.TimeoutExpired:
            c.row(name, "SKIP", f"stopped at the budget ({time.monotonic() - t0:.0f} s)")

    path = os.path.join(out_dir, "gpu_check.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(c.rows, f, indent=1)
    failed_logs = [n for n in sorted(os.listdir(logs)) if n.endswith(".log") and any(
        r["status"] == "FAIL" and n.startswith(r["check"].split("-")[0]) for r in c.rows)]
    for name in failed_logs[:6]:  # logs of failed runs come back with the results ($OUT takes 8 files)
        shutil.copy(os.path.join(logs, name), out_dir)
    print(f"results: {path}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r["status"] != "FAIL" for r in c.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
