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

    python benchmarks/slow_link.py                        # the default bandwidths and methods
    python benchmarks/slow_link.py --bandwidths 100mbit --methods ddp streaming_int8_tau2
    python benchmarks/slow_link.py --report-only          # table + figure from the results file

Results: ``benchmarks/results/slow_link.json`` (+ ``.md`` table and ``docs/figures/slow_link.png``).

Methods (``--methods``; names are generated from the grid): ``ddp``; ``diloco_<dtype>[_tau<τ>]``
(F = 1) and ``streaming_<dtype>[_tau<τ>][_ef]`` (F = 3) for every payload dtype fp32 / bf16 / int8 /
fp8, synchronous (τ = 0) or overlapped (τ = 2 inner steps, the most F = 3 at H = 10 allows), ``_ef``
with error feedback; ``ppu2_<streaming method>``: PPU 1/2 MLPs on top. The time blocked in
communication is what the synchroniser reports (``comm_wait_s`` of its stats: seconds the training
thread waited for cross-replica communication; DDP: Megatron's gradient all-reduce).
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
H, F, TAU = 10, 3, 2


def _methods() -> Dict[str, List[str]]:
    grid: Dict[str, List[str]] = {"ddp": ["--diloco-local-steps", "0"]}
    for kind, frags in (("diloco", 1), ("streaming", F)):
        for dtype in ("fp32", "bf16", "int8", "fp8"):
            for tau in (0, TAU):
                for ef in ((False, True) if dtype in ("int8", "fp8") else (False,)):
                    name = f"{kind}_{dtype}" + (f"_tau{tau}" if tau else "") + ("_ef" if ef else "")
                    argv = ["--diloco-local-steps", str(H), "--diloco-streaming-fragments", str(frags),
                            "--diloco-allreduce-dtype", dtype]
                    argv += ["--diloco-sync-delay", str(tau)] if tau else []
                    argv += ["--diloco-error-feedback"] if ef else []
                    grid[name] = argv
                    if kind == "streaming":
                        grid["ppu2_" + name] = argv + ["--ppu-slices", "2"]
    return grid


METHODS = _methods()
# What the committed results measure (about 25 minutes here): every payload synchronous and
# overlapped on Streaming DiLoCo, DiLoCo fp32, PPU 1/2 with the overlapped int8 payload.
DEFAULT_METHODS = ["ddp", "diloco_fp32", "streaming_fp32", "streaming_bf16", "streaming_int8", "streaming_fp32_tau2",
                   "streaming_int8_tau2", "streaming_fp8_tau2", "ppu2_streaming_int8_tau2"]
BANDWIDTHS = ["unthrottled", "1gbit", "300mbit", "100mbit"]
DEFAULT_BANDWIDTHS = ["unthrottled", "300mbit", "100mbit"]


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
    st = tr.sync.stats()
    return {"step_s": steps, "total_s": total, "blocked_s": st["comm_wait_s"],
            "background_s": st.get("comm_background_s", 0.0), "losses": losses, "eval_loss": ev["loss"],
            "bytes_handed": {k: v for k, v in st.items() if k.endswith("_bytes_sent")},
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
    from megatron_ppu.testing.local_ranks import run_local_ranks

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
                   # tau > 0: the longest any rank's background reductions took (older results: absent)
                   "background_s": max(r.get("background_s", 0.0) for r in rk),
                   "wire_bytes": m["lo_tx_bytes"],
                   "eval_loss": rk[-1]["eval_loss"], "iters": len(rk[0]["step_s"])}
            if bw == "unthrottled":
                compute[name] = (row["total_s"] - row["blocked_s"]) / row["iters"]
            rows.append(row)
    for row in rows:
        argv = MODEL + ["--train-iters", str(row["iters"])] + METHODS[row["method"]]
        pred = predict(argv, K, results["runs"][row["bandwidth"]][row["method"]]["ranks"][0]["vocab_size"])
        rate = _rate_bytes_per_s(row["bandwidth"])
        per_step_bytes = pred["bytes_sent_per_step"]  # per rank, ring all-reduce (quantized: all-to-all + all-gather)
        row["predicted_wire_bytes"] = per_step_bytes * K * row["iters"]
        if row["method"] not in compute:
            continue
        c = compute[row["method"]]
        if rate is None:
            row["predicted_step_s"] = c
            continue
        comm = per_step_bytes * K / rate  # per step, averaged over a round; the K ranks share the link
        if row["method"] == "ddp":
            row["predicted_step_s"] = max(c, comm)
        else:
            # a fragment's reduction overlaps tau inner steps: per round F syncs, each hiding tau * c
            tau = _flag(METHODS[row["method"]], "--diloco-sync-delay", 0)
            frags = _flag(METHODS[row["method"]], "--diloco-streaming-fragments", 1)
            row["predicted_step_s"] = c + max(0.0, comm - tau * c * frags / H)
    return rows


def _flag(argv: List[str], name: str, default: int) -> int:
    return int(argv[argv.index(name) + 1]) if name in argv else default


def report(results: dict) -> str:
    rows = summarise(results)
    base = {r["method"]: r for r in rows if r["bandwidth"] == "unthrottled"}
    lines = ["| bandwidth | method | step (mean) | vs unthrottled | predicted step | blocked in comm | "
             "in the background | wire bytes (measured / predicted) | held-out loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["method"])
        vs = f"{r['step_mean_s'] / b['step_mean_s']:.2f}x" if b else "-"
        pred = f"{r['predicted_step_s']:.3f} s" if r.get("predicted_step_s") else "-"
        lines.append(f"| {r['bandwidth']} | {r['method']} | {r['step_mean_s']:.3f} s | {vs} | {pred} | "
                     f"{r['blocked_s']:.1f} s of {r['total_s']:.1f} s | "
                     f"{format(r['background_s'], '.1f') + ' s' if r['background_s'] else '-'} | "
                     f"{fmt_bytes(r['wire_bytes'])} / "
                     f"{fmt_bytes(r['predicted_wire_bytes'])} | {r['eval_loss']:.4f} |")
    return "\n".join(lines + [""] + targets(rows))


def targets(rows: List[dict]) -> List[str]:
    """Issue 15's targets, as ratios measured in this run: which are met."""
    by = {(r["bandwidth"], r["method"]): r for r in rows}
    bws = [b for b in BANDWIDTHS if any(k[0] == b for k in by)]
    low = bws[-1]
    out = [f"Targets at the lowest bandwidth ({low}):"]

    def check(label, ok, detail):
        out.append(f"- {'met' if ok else 'NOT met'}: {label} ({detail})")

    def get(bw, m):
        return by.get((bw, m))

    best, ref = "streaming_int8_tau2", "streaming_fp32"
    if get(low, best) and get("unthrottled", best):
        r = get(low, best)["step_mean_s"] / get("unthrottled", best)["step_mean_s"]
        check(f"{best} within 10 % of its unthrottled step", r <= 1.10, f"{r:.2f}x")
    if get(low, "ddp") and get("unthrottled", "ddp"):
        r = get(low, "ddp")["step_mean_s"] / get("unthrottled", "ddp")["step_mean_s"]
        check("DDP at least 3x slower than unthrottled", r >= 3.0, f"{r:.2f}x")
    for sync, over in (("streaming_int8", "streaming_int8_tau2"), ("streaming_fp32", "streaming_fp32_tau2")):
        if get(low, sync) and get(low, over):
            a, b = get(low, sync)["blocked_s"], get(low, over)["blocked_s"]
            removed = 1 - b / a if a > 0 else float("nan")
            check(f"overlap (tau=2) removes >= 80 % of the time {sync} is blocked", removed >= 0.8,
                  f"{a:.1f} s -> {b:.1f} s, {100 * removed:.0f} % removed")
    # the payload against fp32 with the same schedule (same tau): what the compression costs
    for q, same in (("streaming_int8", "streaming_fp32"), ("streaming_int8_tau2", "streaming_fp32_tau2"),
                    ("streaming_fp8_tau2", "streaming_fp32_tau2")):
        if get(low, q) and get(low, same):
            r = get(low, q)["wire_bytes"] / get(low, same)["wire_bytes"]
            check(f"{q} sends <= 0.27x the wire bytes of {same}", r <= 0.27, f"{r:.3f}x")
            d = get(low, q)["eval_loss"] / get(low, same)["eval_loss"] - 1
            check(f"{q} held-out loss within 1 % of {same}", abs(d) <= 0.01, f"{100 * d:+.2f} %")
    if get(low, "streaming_fp32_tau2") and get(low, ref):  # what the delay itself costs (alpha = 0)
        d = get(low, "streaming_fp32_tau2")["eval_loss"] / get(low, ref)["eval_loss"] - 1
        out.append(f"- info: the delay tau=2 (alpha=0) changes the held-out loss by {100 * d:+.2f} % against "
                   f"tau=0 at equal tokens ({ref})")
    for bw in bws[1:]:
        meas = sorted((r["step_mean_s"], r["method"]) for r in rows if r["bandwidth"] == bw)
        pred = sorted((r.get("predicted_step_s", float("inf")), r["method"]) for r in rows if r["bandwidth"] == bw)
        ddp_m = [m for _, m in meas].index("ddp") if any(m == "ddp" for _, m in meas) else None
        ddp_p = [m for _, m in pred].index("ddp") if any(m == "ddp" for _, m in pred) else None
        if ddp_m is not None:
            check(f"{bw}: DDP's place among the methods by step time is the cost model's", ddp_m == ddp_p,
                  f"measured {ddp_m + 1}, predicted {ddp_p + 1} of {len(meas)}")
    return out


def figure(results: dict, path: str = FIGURE) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib not installed: no figure")
        return
    rows = summarise(results)
    bws = [b for b in BANDWIDTHS if b in results["runs"]]
    fig, axes = plt.subplots(1, len(bws), figsize=(4.5 * len(bws), 3.8), squeeze=False, sharey=True)
    for ax, bw in zip(axes[0], bws):
        for r in (r for r in rows if r["bandwidth"] == bw):
            m = results["runs"][bw][r["method"]]["ranks"][-1]
            t = [sum(m["step_s"][:i + 1]) for i in range(len(m["step_s"]))]
            line, = ax.plot(t, m["losses"], lw=0.6, alpha=0.35)  # training loss, for the shape
            c = line.get_color()
            ax.plot([r["total_s"]], [r["eval_loss"]], "o", color=c, label=r["method"])  # measured
            if r.get("predicted_step_s"):  # the cost model's wall-clock for the same run, same loss
                pred = r["predicted_step_s"] * r["iters"]
                ax.plot([pred], [r["eval_loss"]], "o", mfc="none", color=c)
                ax.plot([r["total_s"], pred], [r["eval_loss"]] * 2, ":", color=c, lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{bw} (one link shared by {K} ranks)")
        ax.set_xlabel("wall-clock (s, log); filled: measured, open: cost model")
    axes[0][0].set_ylabel("held-out loss (dots); training loss (lines)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    if "--worker" in sys.argv:
        worker_main(run_worker)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidths", nargs="+", default=DEFAULT_BANDWIDTHS,
                    help="tc rates, e.g. 1gbit 300mbit 100mbit (default: %(default)s)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS), metavar="METHOD",
                    help=f"methods, from: {' '.join(METHODS)} (default: %(default)s)")
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
    figure(results, FIGURE if os.path.abspath(a.out) == RESULTS else os.path.splitext(a.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
