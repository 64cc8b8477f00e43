"""The multi-seed table of the convergence study (issue 16, item 5), from the per-run results.

``benchmarks/convergence.py`` writes one JSON per method and tag; the study runs one tag per seed
(``<study>/s<seed>``, the remedies in ``<study>/rem_s<seed>``, the outer-sync variants in
``<study>/sync_s<seed>``). This script reads every ``<study>/*s<seed>/<method>.json`` and writes,
for each method, the held-out perplexity per seed, mean ± half-range over seeds, and the ratio to
Streaming DiLoCo *of the same seed* (the seed fixes initial weights and data order, so the ratio
is the paired comparison), plus the held-out loss at each evaluation point.

    python benchmarks/study_table.py benchmarks/results/study_k4 benchmarks/results/study_k8

writes ``<study>/table.md`` and ``<study>/table.json``.
"""
import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convergence import METHOD_ORDER  # noqa: E402  (the order of the study's tables)

REFERENCE = "streaming_diloco"


def load_runs(study: str) -> Dict[str, Dict[int, dict]]:
    """method -> seed -> the run's result JSON, from every ``<study>/*s<seed>/<method>.json``."""
    runs: Dict[str, Dict[int, dict]] = {}
    for path in sorted(glob.glob(os.path.join(study, "*", "*.json"))):
        m = re.fullmatch(r"(?:.*_)?s(\d+)", os.path.basename(os.path.dirname(path)))
        name = os.path.basename(path)[:-len(".json")]
        if m is None or name.endswith(".partial"):
            continue
        seed = int(m.group(1))
        with open(path) as f:
            r = json.load(f)
        if seed in runs.get(name, {}):
            raise ValueError(f"{name} seed {seed} is in two result folders of {study} "
                             f"(second: {path}); remove one.")
        runs.setdefault(name, {})[seed] = r
    return runs


def _replicas(argv: List[str]) -> int:
    """K = global batch / micro-batch (every replica one data-parallel rank in the study)."""
    flag = {k: v for k, v in zip(argv, argv[1:])}
    return int(flag["--global-batch-size"]) // int(flag["--micro-batch-size"])


def summarise(runs: Dict[str, Dict[int, dict]]) -> List[dict]:
    """One row per method: per-seed perplexity, mean and half-range, paired ratio to the reference."""
    ref = runs.get(REFERENCE, {})
    rows = []
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        ppl = [by_seed[s]["final_ppl"] for s in seeds]
        ratios = [by_seed[s]["final_ppl"] / ref[s]["final_ppl"] if s in ref else None for s in seeds]
        paired = [x for x in ratios if x is not None]
        rows.append({
            "method": name, "label": by_seed[seeds[0]]["label"], "seeds": seeds, "ppl": ppl,
            "ppl_mean": sum(ppl) / len(ppl), "ppl_half_range": (max(ppl) - min(ppl)) / 2,
            "ratio": ratios, "ratio_mean": sum(paired) / len(paired) if paired else None,
            "replicas": sorted({_replicas(by_seed[s]["argv"]) for s in seeds}),
            "evals": {s: [(e["iteration"], e["loss"]) for e in by_seed[s]["evals"]] for s in seeds},
        })
    order = METHOD_ORDER + sorted(n for n in runs if n not in METHOD_ORDER)
    return sorted(rows, key=lambda r: order.index(r["method"]))


def merge_summary(runs: Dict[str, Dict[int, dict]], parts: int = 3) -> List[dict]:
    """For runs with a merge trace (``--diloco-merge-diagnostic``): per fragment and per
    ``parts``-th of the run, the mean of local − plain merge ("merge") and of local − outer step
    ("gain") over its syncs, and how many syncs had a positive gain."""
    rows = []
    for name, by_seed in runs.items():
        for seed, r in sorted(by_seed.items()):
            trace = r.get("merge_trace") or []
            if not trace:
                continue
            iters = r["iterations"]
            for f in sorted({e["fragment"] for e in trace}):
                for p in range(parts):
                    lo, hi = p * iters // parts, (p + 1) * iters // parts
                    sel = [e for e in trace if e["fragment"] == f and lo < e["iteration"] <= hi]
                    if sel:
                        rows.append({"method": name, "label": r["label"], "seed": seed, "fragment": f,
                                     "iterations": (lo + 1, hi), "syncs": len(sel),
                                     "local": sum(e["local"] for e in sel) / len(sel),
                                     "merge": sum(e["local"] - e["plain_merge"] for e in sel) / len(sel),
                                     "gain": sum(e["gain"] for e in sel) / len(sel),
                                     "positive": sum(e["gain"] > 0 for e in sel)})
    return rows


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def to_markdown(rows: List[dict], study: str) -> str:
    L = [f"Held-out perplexity of the global model after the last iteration, per seed; ratio to "
         f"Streaming DiLoCo of the same seed. Produced by `python benchmarks/study_table.py {study}` "
         f"from `{study}/*s<seed>/<method>.json`.", "",
         f"Replicas K: {', '.join(sorted({str(k) for r in rows for k in r['replicas']}))}.", "",
         "| method | seeds | held-out perplexity per seed | mean ± half-range | vs Streaming DiLoCo, per seed | mean ratio |",
         "|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {r['ppl_half_range']:.1f}" if len(r["seeds"]) > 1 else " (one seed)"
        L.append(f"| {r['label']} | {', '.join(map(str, r['seeds']))} | {', '.join(f'{p:.1f}' for p in r['ppl'])} "
                 f"| {r['ppl_mean']:.1f}{spread} | "
                 f"{', '.join(_f(x, '.3f') for x in r['ratio'])} | {_f(r['ratio_mean'], '.3f')} |")
    L += ["", "Held-out loss at each evaluation point (iteration: loss), per seed:", "",
          "| method | seed | loss |", "|---|---|---|"]
    for r in rows:
        for s in r["seeds"]:
            L.append(f"| {r['label']} | {s} | " + ", ".join(f"{it}: {lo:.3f}" for it, lo in r["evals"][s]) + " |")
    return "\n".join(L) + "\n"


def merge_markdown(rows: List[dict]) -> str:
    """The merge-diagnostic summary as a markdown table (empty without traced runs)."""
    if not rows:
        return ""
    L = ["Merge diagnostic (probe loss; mean over the fragment's syncs in each part of the run; merge = local "
         "− plain merge, gain = local − outer step, positive: better than the mean replica):", "",
         "| method | seed | fragment | iterations | syncs | local models | merge | gain | gain > 0 |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['label']} | {r['seed']} | {r['fragment']} | {r['iterations'][0]}-{r['iterations'][1]} | "
                 f"{r['syncs']} | {r['local']:.3f} | {r['merge']:+.3f} | {r['gain']:+.3f} | "
                 f"{r['positive']}/{r['syncs']} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("studies", nargs="+", help="study folders, e.g. benchmarks/results/study_k4")
    a = ap.parse_args(argv)
    for study in a.studies:
        runs = load_runs(study)
        if not runs:
            raise SystemExit(f"no results under {study}/*s<seed>/*.json: run benchmarks/convergence.py "
                             f"with --tag {os.path.basename(study)}/s<seed> first.")
        rows, merges = summarise(runs), merge_summary(runs)
        md = to_markdown(rows, study) + ("\n" + merge_markdown(merges) if merges else "")
        for ext, text in (("md", md), ("json", json.dumps({"methods": rows, "merge": merges}, indent=1))):
            with open(os.path.join(study, f"table.{ext}.tmp"), "w") as f:
                f.write(text)
            os.replace(os.path.join(study, f"table.{ext}.tmp"), os.path.join(study, f"table.{ext}"))
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
