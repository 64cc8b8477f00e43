"""Slow-link benchmark: K = 4 replicas as real processes whose traffic crosses a throttled network.

Each bandwidth gets a private network namespace (``unshare --net``, needs root) whose loopback is
brought up with MTU 1500 and shaped by a token bucket (``tc qdisc add dev lo root tbf rate R burst
256kb latency 200ms``); the 4 ranks of every method run inside it and talk over that loopback
(gloo, ``GLOO_SOCKET_IFNAME=lo``). Shaping ``lo`` models ONE link shared by all replicas (a switch
uplink, a site-to-site line): the aggregate traffic of all ranks is limited to R. Bytes on the wire
are the namespace's own ``lo`` transmit counter (``/proc/net/dev``, read inside the namespace before
and after each method), so they include every protocol byte (gloo, TCP/IP headers, the store).

Per method, at equal tokens (same iterations, same global batch): wall-clock per step (median and
mean), total wall-clock, the time ranks spent blocked in communication (DDP: Megatron's
``finalize_model_grads``, where the per-step gradient all-reduce completes; DiLoCo: the outer
syncs), bytes on the wire, final held-out loss; beside them the cost model's prediction
(``megatron_ppu.estimate``: compute time measured unthrottled + the ring all-reduce bytes of each
rank over R / K, since the K ranks share the link).

    python benchmarks/slow_link.py                        # all bandwidths and methods
    python benchmarks/slow_link.py --bandwidths 100mbit --methods ddp diloco
    python benchmarks/slow_link.py --report-only          # table + figure from the results file

Results: ``benchmarks/results/slow_link.json`` (+ ``.md`` table and ``docs/figures/slow_link.png``).
Overlapped (τ > 0) and quantized (int8 / fp8) outer syncs are not implemented yet (issue 15); the
methods here are what the library has: DDP, DiLoCo, Streaming DiLoCo, with fp32 / bf16 payloads,
and PPU 1/2 MLPs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, fmt_bytes, machine_info, predict, worker_main  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "slow_link.json")
FIGURE = os.path.join(REPO, "docs", "figures", "slow_link.png")
K = 4
# 4.2M parameters (fp32: 16.9 MB of gradients per step, per rank), sized so that unthrottled a DDP
# step is mostly compute while at 100 Mbit/s shared by 4 ranks DDP is communication-bound.
MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
         "--micro-batch-size", "8", "--lr", "1e-3", "--lr-warmup-iters", "10", "--lr-decay-style", "cosine",
         "--weight-decay", "0.1", "--adam-beta2", "0.99", "--eval-iters", "8", "--eval-interval", "100000",
         "--log-interval", "100000", "--hidden-dropout", "0", "--attention-dropout", "0"]
ITERS = 40
METHODS: Dict[str, List[str]] = {
    "ddp": ["--diloco-local-steps", "0"],
    "diloco_fp32": ["--diloco-local-steps", "10"],
    "diloco_bf16": ["--diloco-local-steps", "10", "--diloco-allreduce-dtype", "bf16"],
    "streaming_fp32": ["--diloco-local-steps", "10", "--diloco-streaming-fragments", "3"],
    "streaming_bf16": ["--diloco-local-steps", "10", "--diloco-streaming-fragments", "3",
                       "--diloco-allreduce-dtype", "bf16"],
    "ppu2_streaming_bf16": ["--diloco-local-steps", "10", "--diloco-streaming-fragments", "3",
                            "--diloco-allreduce-dtype", "bf16", "--ppu-slices", "2"],
}
BANDWIDTHS = ["unthrottled", "1gbit", "300mbit", "100mbit"]


def _rate_bytes_per_s(bw: str) -> Optional[float]:
    if bw == "unthrottled":
        return None
    num, unit = bw.rstrip("bit")[:-1], bw.rstrip("bit")[-1]
    return float(num) * {"k": 1e3, "m": 1e6, "g": 1e9}[unit.lower()] / 8


# ------------------------------------------------------------------ rank side
def run_worker(spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    from common import build_trainer

    tr = build_trainer(spec["argv"])
    blocked = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                blocked[0] += time.perf_counter() - t0
        return wrapper

    # Benchmark instrumentation of objects this run created (the model config, the DiLoCo orchestrator).
    if getattr(tr, "diloco", None) is not None:
        tr.diloco.sync = timed(tr.diloco.sync)
    else:
        cfg = tr.model.config
        cfg.finalize_model_grads_func = timed(cfg.finalize_model_grads_func)
    dist.barrier()
    steps, losses = [], []
    t_start = time.perf_counter()
    for _ in range(spec["iters"]):
        t0 = time.perf_counter()
        stats = tr.train_step()
        steps.append(time.perf_counter() - t0)
        if stats["loss"] is not None:
            losses.append(stats["loss"])
    dist.barrier()
    total = time.perf_counter() - t_start
    ev = tr.evaluate()
    return {"step_s": steps, "total_s": total, "blocked_s": blocked[0], "losses": losses, "eval_loss": ev["loss"],
            "vocab_size": tr.vocab_size, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------ namespace side
def _lo_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    raise RuntimeError("no lo line in /proc/net/dev")


def run_namespace(spec: dict) -> dict:
    """Inside ``unshare --net``: shape lo, run every method on K ranks, return the measurements."""
    from megatron_ppu.local_ranks import run_local_ranks

    subprocess.run(["ip", "link", "set", "lo", "mtu", "1500"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if spec["bandwidth"] != "unthrottled":
        subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", spec["bandwidth"], "burst", "256kb",
                        "latency", "200ms"], check=True)
    out = {}
    for name in spec["methods"]:
        argv = MODEL + ["--train-iters", str(spec["iters"])] + METHODS[name] + spec.get("data_flags", [])
        wspec = {"name": name, "argv": argv, "iters": spec["iters"]}
        d = os.path.join(spec["tmp"], f"{spec['bandwidth']}-{name}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "spec.json"), "w") as f:
            json.dump(wspec, f)
        tx0 = _lo_tx_bytes()
        t0 = time.perf_counter()
        run_local_ranks([sys.executable, os.path.abspath(__file__), "--worker", os.path.join(d, "spec.json"), "--out", d],
                        K, [os.path.join(d, f"rank{r}.log") for r in range(K)], cwd=REPO, timeout=spec["timeout"],
                        env={"PYTHONPATH": REPO, "GLOO_SOCKET_IFNAME": "lo"}, label=f"{spec['bandwidth']}/{name}")
        wall = time.perf_counter() - t0
        tx = _lo_tx_bytes() - tx0
        ranks = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(K)]
        out[name] = {"ranks": ranks, "lo_tx_bytes": tx, "job_wall_s": wall}
        print(f"[{spec['bandwidth']}] {name}: {wall:.0f} s, {fmt_bytes(tx)} on the wire", flush=True)
    return out


# ------------------------------------------------------------------ report
def summarise(results: dict) -> List[dict]:
    rows = []
    runs = results["runs"]
    compute = {}  # per method: median unthrottled step time minus its blocked time per step
    for bw, methods in runs.items():
        for name, m in methods.items():
            rk = m["ranks"]
            steps = [statistics.median(r["step_s"]) for r in rk]
            row = {"bandwidth": bw, "method": name,
                   "step_median_s": max(steps),
                   "step_mean_s": max(r["total_s"] for r in rk) / len(rk[0]["step_s"]),
                   "total_s": max(r["total_s"] for r in rk),
                   "blocked_s": max(r["blocked_s"] for r in rk),
                   "wire_bytes": m["lo_tx_bytes"],
                   "eval_loss": rk[-1]["eval_loss"], "iters": len(rk[0]["step_s"])}
            if bw == "unthrottled":
                compute[name] = (row["total_s"] - row["blocked_s"]) / row["iters"]
            rows.append(row)
    for row in rows:
        argv = MODEL + METHODS[row["method"]]
        pred = predict(argv, K, results["runs"][row["bandwidth"]][row["method"]]["ranks"][0]["vocab_size"])
        rate = _rate_bytes_per_s(row["bandwidth"])
        per_step_bytes = pred["bytes_sent_per_step"]  # per rank, ring all-reduce
        row["predicted_wire_bytes"] = per_step_bytes * K * row["iters"]
        if rate is not None and row["method"] in compute:
            comm = per_step_bytes * K / rate  # the K ranks share the link
            c = compute[row["method"]]
            row["predicted_step_s"] = max(c, comm) if row["method"] == "ddp" else c + comm
        elif row["method"] in compute:
            row["predicted_step_s"] = compute[row["method"]]
    return rows


def report(results: dict) -> str:
    rows = summarise(results)
    base = {r["method"]: r for r in rows if r["bandwidth"] == "unthrottled"}
    lines = ["| bandwidth | method | step (mean) | vs unthrottled | predicted step | blocked in comm | "
             "wire bytes (measured / predicted) | held-out loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["method"])
        vs = f"{r['step_mean_s'] / b['step_mean_s']:.2f}x" if b else "-"
        pred = f"{r['predicted_step_s']:.3f} s" if r.get("predicted_step_s") else "-"
        lines.append(f"| {r['bandwidth']} | {r['method']} | {r['step_mean_s']:.3f} s | {vs} | {pred} | "
                     f"{r['blocked_s']:.1f} s of {r['total_s']:.1f} s | {fmt_bytes(r['wire_bytes'])} / "
                     f"{fmt_bytes(r['predicted_wire_bytes'])} | {r['eval_loss']:.4f} |")
    return "\n".join(lines)


def figure(results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure")
        return
    rows = summarise(results)
    bws = [b for b in BANDWIDTHS if b in results["runs"]]
    fig, axes = plt.subplots(1, len(bws), figsize=(4 * len(bws), 3.5), squeeze=False)
    for ax, bw in zip(axes[0], bws):
        for r in (r for r in rows if r["bandwidth"] == bw):
            m = results["runs"][bw][r["method"]]["ranks"][-1]
            t = [sum(m["step_s"][:i + 1]) for i in range(len(m["step_s"]))]
            ax.plot(t, m["losses"], label=r["method"])
            ax.plot([r["total_s"]], [r["eval_loss"]], "k.")
            if r.get("predicted_step_s"):
                ax.axvline(r["predicted_step_s"] * r["iters"], ls=":", lw=0.7, color=ax.lines[-2].get_color())
        ax.set_title(f"{bw} (shared by {K} ranks)")
        ax.set_xlabel("wall-clock (s); dotted: cost model")
        ax.set_ylabel("training loss (dot: held-out)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(FIGURE), exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def main() -> int:
    if "--worker" in sys.argv:
        worker_main(run_worker)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidths", nargs="+", default=BANDWIDTHS, help="tc rates (default: %(default)s)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods (default: all)")
    ap.add_argument("--iters", type=int, default=ITERS, help="iterations per method (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per-method timeout in s (default: %(default)s)")
    ap.add_argument("--out", default=RESULTS, help="results JSON (default: %(default)s)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table and figure")
    ap.add_argument("--namespace-runner", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.namespace_runner:
        spec = json.load(open(a.namespace_runner))
        json.dump(run_namespace(spec), open(spec["result"], "w"))
        return 0
    if a.report_only:
        results = json.load(open(a.out))
    else:
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("tc"):
            print("slow_link: needs root with unshare and tc (iproute2) to shape a private loopback; skipped.")
            return 0
        import tempfile

        results = json.load(open(a.out)) if os.path.isfile(a.out) else {"runs": {}}
        results["machine"] = machine_info()
        results["model_argv"] = MODEL
        results["link"] = f"loopback shaped with tbf (burst 256kb, latency 200ms), shared by all {K} ranks"
        with tempfile.TemporaryDirectory(prefix="ppu-slowlink-") as tmp:
            for bw in a.bandwidths:
                spec = {"bandwidth": bw, "methods": a.methods, "iters": a.iters, "tmp": tmp, "timeout": a.timeout,
                        "result": os.path.join(tmp, f"{bw}.json")}
                with open(os.path.join(tmp, f"{bw}.spec.json"), "w") as f:
                    json.dump(spec, f)
                p = subprocess.run(["unshare", "--net", sys.executable, os.path.abspath(__file__),
                                    "--namespace-runner", os.path.join(tmp, f"{bw}.spec.json")], cwd=REPO)
                if p.returncode != 0:
                    print(f"slow_link: the {bw} namespace run failed (exit {p.returncode})")
                    return p.returncode
                results["runs"].setdefault(bw, {}).update(json.load(open(spec["result"])))
                os.makedirs(os.path.dirname(a.out), exist_ok=True)
                json.dump(results, open(a.out, "w"), indent=1)  # after every bandwidth: resumable in parts
    table = report(results)
    print(table)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(f"Command: python benchmarks/slow_link.py; {results.get('link', '')}\n\n{table}\n")
    figure(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
