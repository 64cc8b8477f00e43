"""Shared helpers of the benchmark scripts (not part of the library).

* :func:`launch_ranks`: start ``world_size`` fresh CPU ranks of a benchmark script
  (``python SCRIPT --worker SPEC``, through :mod:`megatron_ppu.testing.local_ranks`), wait,
  and return every rank's JSON result. A fresh process group per method keeps peak
  memory (``ru_maxrss``) meaningful per method.
* :func:`build_trainer`: in a worker, parse Megatron flags, initialise gloo + the CPU
  patches and build a :class:`megatron_ppu.training.loop.Trainer` without training.
* :func:`parsed_flags`, :func:`drop_flags`: read / edit a method's flags with the trainer's own
  parser (its defaults, its flags: no second flag list here).
* :func:`estimate_config`: the cost model's configuration for a method, from the parsed
  settings (:func:`megatron_ppu.estimate.shape_from_args`), in the layout the trainer actually
  uses on CPU: fp32 weights, fp32 gradients, fp32 Adam m and v, and DiLoCo's outer state on
  the host for *every* parameter (the snapshot θ(t) and the Nesterov momentum; ``DiLoCo``
  snapshots each trained-by-someone parameter in full, frozen entries included).
* :func:`machine_info`: CPU, load, library versions (benchmarks are run on a shared
  2-core machine; the load average is recorded with every result).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_ppu import estimate as E  # noqa: E402 (after the path set-up)
from megatron_ppu.config import DiLoCoConfig, cli_fields  # noqa: E402
from megatron_ppu.training.arguments import TrainArgs, build_parser, parse_args  # noqa: E402

#: The trainer's parser (flags, defaults), built once.
_PARSER = build_parser()


# ------------------------------------------------------------------ launching
def launch_ranks(script: str, world_size: int, spec: dict, *, timeout: float = 1800.0,
                 log_dir: Optional[str] = None, threads_per_rank: int = 1) -> List[dict]:
    """Run ``python script --worker <spec.json> --out <dir>`` on ``world_size`` CPU ranks.

    Each rank writes ``rank<r>.json``; the list of those dicts is returned (rank order).
    On failure :class:`megatron_ppu.testing.local_ranks.RankFailure` carries the failing rank's log.
    """
    from megatron_ppu.testing.local_ranks import run_local_ranks

    with tempfile.TemporaryDirectory(prefix="ppu-bench-") as out:
        spec_path = os.path.join(out, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        name = spec.get("name", "run")
        logs = [os.path.join(log_dir or out, f"{name}.rank{r}.log") for r in range(world_size)]
        run_local_ranks([sys.executable, script, "--worker", spec_path, "--out", out], world_size, logs, cwd=REPO,
                        timeout=timeout, threads_per_rank=threads_per_rank, label=name,
                        env={"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
        results = []
        for r in range(world_size):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                results.append(json.load(f))
        return results


# ------------------------------------------------------------------ method flags
# SDP (subnetwork data parallelism) building blocks of the benchmarks' method tables: every
# replica holds half the model (half the blocks, or half the MLP hidden units).
SDP_STEP = ["--subnet-sync", "step"]
SDP_BLOCKS_HALF = ["--subnet-plan", "blocks", "--subnet-coverage", "0.5"]
SDP_FORWARD = ["--subnet-masking", "forward"]
SDP_NEURONS_HALF = ["--subnet-plan", "neurons", "--subnet-masking", "forward", "--ppu-slices", "2"]
# Flags of the DiLoCo outer loop (DiLoCoConfig's, but K): per-step SDP (--subnet-sync step) refuses them.
OUTER_FLAGS = tuple(flag for f, flag, _ in cli_fields(DiLoCoConfig) if f.name != "num_replicas")


def parsed_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The values of ``argv``'s flags by dest, with the trainer's defaults for the others (the
    trainer's parser, without its validation: for reading a method's settings)."""
    return _PARSER.parse_known_args(list(argv))[0]


def drop_flags(argv: List[str], names) -> List[str]:
    """``argv`` without the flags ``names`` and their values (as many as the trainer's parser
    takes for each: none for a switch)."""
    out, skip = [], 0
    for x in argv:
        if skip:
            skip -= 1
        elif x in names:
            nargs = _PARSER._option_string_actions[x].nargs
            skip = 0 if nargs == 0 else 1
        else:
            out.append(x)
    return out


def worker_main(run_fn) -> None:
    """Child side: ``SCRIPT --worker SPEC --out DIR``; calls ``run_fn(spec)`` and writes its JSON."""
    spec_path = sys.argv[sys.argv.index("--worker") + 1]
    out = sys.argv[sys.argv.index("--out") + 1]
    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ["RANK"])
    try:
        result = run_fn(spec)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        import multiprocessing

        for child in multiprocessing.active_children():  # os._exit skips multiprocessing's exit handlers
            child.kill()
        os._exit(1)  # peers may be blocked in a collective


def build_trainer(argv: List[str]):
    """Parse trainer flags, init torch.distributed (gloo) + CPU patches, build the Trainer."""
    from megatron_ppu.training.loop import Trainer, init_distributed  # in the worker only (starts megatron)

    args = parse_args(argv)
    init_distributed()
    return Trainer.from_args(args)


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ cost model
def estimate_config(run: Union[Sequence[str], TrainArgs], world_size: int, vocab_size: int) -> E.EstimateConfig:
    """The cost model's :class:`EstimateConfig` for a trainer command line or parsed settings
    (CPU, fp32; the outer state on the host, every parameter snapshotted)."""
    args = run if isinstance(run, TrainArgs) else parse_args(list(run), world_size=world_size)
    d = args.diloco
    prec = E.Precision(**{**E.Precision.megatron(bf16=False).__dict__, "outer_comm_dtype": d.allreduce_dtype})
    return E.shape_from_args(args, world_size, vocab_size=vocab_size, precision=prec,
                             outer_state_placement="host", snapshot_scope="all")


def predict(run: Union[Sequence[str], TrainArgs], world_size: int, vocab_size: int) -> Dict[str, float]:
    """Per-rank predictions of the cost model for one method (see :func:`estimate_config`)."""
    cfg = estimate_config(run, world_size, vocab_size)
    pc, mem, fl, comm = E.count_parameters(cfg), E.estimate_memory(cfg), E.estimate_flops(cfg), \
        E.estimate_communication(cfg)
    tokens = fl.tokens_per_step
    v = E.padded_vocab_size(cfg)
    # FlopCounterMode counts GEMMs only: drop App. C.2's embedding-lookup (B S H, x2 backward)
    # and softmax (3 B S V, x2 backward) terms, which are not matrix products.
    non_gemm = 3 * tokens * cfg.model.hidden_size + 3 * 3 * tokens * v
    ddp = not cfg.ppu.outer_optimizer
    return {
        "params_total": pc.total, "params_trainable": pc.trainable,
        "weights_bytes": mem.weights, "grad_bytes": mem.gradients, "optimizer_bytes": mem.optimizer_state,
        "outer_bytes": mem.host_outer_momentum + mem.host_snapshot, "activation_bytes": mem.activations,
        "model_state_bytes": mem.model_state + mem.host_total,
        "flops_model": fl.model_flops, "flops_gemm": fl.model_flops - non_gemm,
        "flops_dense_gemm": fl.model_flops_dense - non_gemm,
        "flops_forward_gemm": fl.forward - tokens * cfg.model.hidden_size - 3 * tokens * v,
        "flops_ratio_vs_dense": fl.ratio_vs_dense,
        "bytes_sent_per_step": comm.ddp_bytes_sent_per_step if ddp else comm.sync_bytes_sent / cfg.ppu.local_steps,
        "sync_payload_bytes": 0.0 if ddp else comm.sync_bytes,
    }


# ------------------------------------------------------------------ machine
def machine_info() -> dict:
    import importlib.metadata as md

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "megatron-core", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "memory_bytes": mem, "gpu": None, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "load_average": list(os.getloadavg())}


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b
