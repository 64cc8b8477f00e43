"""Core attention, forward + backward: megatron-core's DotProductAttention (``--attention-backend
local``) vs megatron_ppu's SDPA attention (``--attention-backend flash``), peak memory and step time
at sequence 1,024 / 2,048 / 4,096 (issue 25, item 2).

One step = the core attention's forward on ``[s, b, heads, head_dim]`` query/key/value (causal, no
dropout: torch's CPU flash kernel has none, with dropout torch runs its math kernel) and the backward
of a random output gradient. The modules are the real ones (a 1-rank gloo group, megatron's parallel
state), built from the same ``TransformerConfig``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step, minus what was allocated
before it (inputs, module). On CPU torch keeps no allocator statistics: each (sequence, backend)
runs in a fresh process and the peak is the growth of the process's peak RSS (``ru_maxrss``) over
the first step (inputs already allocated); DotProductAttention's score buffer (megatron's global
memory buffer, kept between steps) counts in it. Step time: the median of ``--repeats`` timed
steps after that first one.

    nice -n 10 .venv/bin/python benchmarks/attention.py                          # CPU, fp32
    .venv/bin/python benchmarks/attention.py --device cuda --dtype bf16 --batch 4 --heads 16 --head-dim 128

Prints a Markdown table and writes ``benchmarks/results/attention_<device>_<dtype>.{json,md}``
(``--out PREFIX`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BACKENDS = {"local": "DotProductAttention", "flash": "SDPAttention"}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(spec: dict) -> dict:
    """One (sequence, backend) measurement in this process (a 1-rank gloo group)."""
    import torch
    import torch.distributed as dist

    dev = torch.device(spec["device"])
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=0, world_size=1)
    if dev.type == "cpu":
        from megatron_ppu.patches import apply_cpu_patches

        apply_cpu_patches()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ppu.attention import core_attention_for

    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    s, b, h, d, g = spec["seq"], spec["batch"], spec["heads"], spec["head_dim"], spec["groups"] or spec["heads"]
    cfg = TransformerConfig(num_layers=1, hidden_size=h * d, num_attention_heads=h, num_query_groups=g,
                            ffn_hidden_size=4 * h * d, attention_dropout=0.0, hidden_dropout=0.0,
                            bf16=dtype == torch.bfloat16, params_dtype=dtype, use_cpu_initialization=dev.type == "cpu",
                            masked_softmax_fusion=False, attention_softmax_in_fp32=False)
    module = core_attention_for(spec["backend"])(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                                 attention_type="self")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, h, d, generator=gen).to(dev, dtype).requires_grad_(True)
    k = torch.randn(s, b, g, d, generator=gen).to(dev, dtype).requires_grad_(True)
    v = torch.randn(s, b, g, d, generator=gen).to(dev, dtype).requires_grad_(True)
    dout = torch.randn(s, b, h * d, generator=gen).to(dev, dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        for t in (q, k, v):
            t.grad = None
        module(q, k, v, None).backward(dout)
        sync()

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _maxrss_bytes()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _maxrss_bytes()) - before
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return {**spec, "module": type(module).__name__, "peak_bytes": peak, "first_step_s": first,
            "step_s": statistics.median(times), "step_times_s": times,
            "score_matrix_bytes": b * h * s * s * torch.tensor([], dtype=dtype).element_size()}


def _run_one(spec: dict, timeout: float) -> dict:
    import subprocess

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if "MASTER_PORT" not in env:
        from megatron_ppu.testing.local_ranks import free_port

        env["MASTER_PORT"] = str(free_port())
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{spec}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows) -> str:
    """The Markdown table: one line per sequence length, both backends side by side."""
    from benchmarks.common import fmt_bytes

    by = {(r["seq"], r["backend"]): r for r in rows}
    out = ["| sequence | local peak | flash (SDPA) peak | memory local / flash | local step | flash step | "
           "time local / flash | one s x s score matrix |", "|---|---|---|---|---|---|---|---|"]
    for s in sorted({r["seq"] for r in rows}):
        lo, fl = by.get((s, "local")), by.get((s, "flash"))
        if lo is None or fl is None:
            continue
        out.append(f"| {s:,} | {fmt_bytes(lo['peak_bytes'])} | {fmt_bytes(fl['peak_bytes'])} | "
                   f"{lo['peak_bytes'] / max(fl['peak_bytes'], 1):.1f}x | {lo['step_s'] * 1e3:.0f} ms | "
                   f"{fl['step_s'] * 1e3:.0f} ms | {lo['step_s'] / fl['step_s']:.2f}x | "
                   f"{fmt_bytes(lo['score_matrix_bytes'])} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--groups", type=int, default=None, help="query groups (GQA); default: heads (MHA)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="per measurement (seconds)")
    ap.add_argument("--out", default=None, help="results prefix (default benchmarks/results/attention_<device>_<dtype>)")
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    from benchmarks.common import machine_info

    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    rows = []
    for s in a.seq:
        for backend in BACKENDS:
            spec = {"device": a.device, "dtype": dtype, "seq": s, "batch": a.batch, "heads": a.heads,
                    "groups": a.groups, "head_dim": a.head_dim, "repeats": a.repeats, "backend": backend}
            r = _run_one(spec, a.timeout)
            assert r["module"] == BACKENDS[backend], r
            rows.append(r)
            print(f"seq {s} {backend:<5} ({r['module']}): peak {r['peak_bytes'] / 2**20:.1f} MiB, "
                  f"step {r['step_s'] * 1e3:.0f} ms", flush=True)
    md = table(rows)
    print(md)
    prefix = a.out or os.path.join(REPO, "benchmarks", "results", f"attention_{a.device}_{dtype}")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    cmd = "python benchmarks/attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(prefix + ".json", "w") as f:
        json.dump({"command": cmd, "machine": machine_info(), "rows": rows}, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(f"`{cmd}` (batch {a.batch}, {a.heads} heads, {a.groups or a.heads} query groups, head dim "
                f"{a.head_dim}, {dtype}, {a.device}, causal, no dropout)\n\n" + md)
    print(f"results: {prefix}.json, {prefix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
