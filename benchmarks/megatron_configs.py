#!/usr/bin/env python
"""How many of Megatron-LM's GPT functional-test configurations ``pretrain_gpt_ppu.py`` parses.

Reads ``tests/functional_tests/test_cases/gpt/*/model_config.yaml`` at a tag of a
Megatron-LM git checkout (``git show``; no work tree needed), turns each ``MODEL_ARGS`` into
argv the way Megatron-LM's ``tests/functional_tests/shell_test_utils/_run_training.sh`` does
(``true`` -> the bare flag, ``[a, b]`` -> separate values, other values -> one argument; the
``${VAR}`` paths replaced by placeholders), and runs each argv through
:func:`megatron_ppu.training.arguments.parse_args` with the parser of that tag's Megatron-LM flags
(``--flags-tag``, default the configurations' tag; parsing and validation only; no data is
read). Configurations with ``--num-experts`` (MoE) are counted separately; the rest are the
dense ones.

Each configuration ends in one of: ``parsed``; ``refused`` (every offending flag refused with a
reason that names the unsupported feature); ``refused-unnamed`` (some flag refused only with the
generic reason "not implemented by megatron_ppu", no feature named); ``unknown`` (at least one flag argparse does not
know: the message says "unrecognized"); or ``invalid`` (another ValueError, e.g. a missing
value). Prints the totals, the most frequent refusal reasons and the flags still unknown, and
writes the per-configuration outcomes as JSON with ``--json``.

Usage::

    python benchmarks/megatron_configs.py /work/.mirror/NVIDIA+Megatron-LM/repo [--tag core_v0.16.1]
    python benchmarks/megatron_configs.py REPO --tag core_v0.19.0 --dump-argv tests/fixtures/megatron_lm_gpt_configs_core_v0.19.0.json
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = "tests/functional_tests/test_cases/gpt"
PLACEHOLDERS = {"DATA_PATH": "/data", "TENSORBOARD_PATH": "/out/tensorboard", "CHECKPOINT_SAVE_PATH": "/out/ckpt",
                "CHECKPOINT_LOAD_PATH": "/out/ckpt", "DATA_CACHE_PATH": "/out/cache", "OUTPUT_PATH": "/out", "REPEAT": "1",
                "WANDB_EXPERIMENT": "exp", "WANDB_SAVE_PATH": "/out/wandb"}


def _git(repo, *args) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], check=True, capture_output=True, text=True).stdout


def _yaml_load(text: str):
    try:
        import yaml
    except ImportError:  # the project's venv has no PyYAML; the system python usually has
        raise SystemExit("needs PyYAML (pip install pyyaml, or run with a python that has it)")
    return yaml.safe_load(text)


def config_argv(model_args: dict):
    """``MODEL_ARGS`` -> argv as ``_run_training.sh`` builds it."""
    argv = []
    for key, value in model_args.items():
        if value is True:
            argv.append(key)
            continue
        if value is None or value == "":
            continue  # yq's select(.value != "") drops the pair
        if isinstance(value, list):
            argv.append(key)
            argv.extend(str(v) for v in value)
            continue
        if value is False:
            value = "false"
        s = str(value).strip()
        if re.fullmatch(r"\[[^\]]+\]", s):  # "[a b c]": brackets stripped, unquoted -> split on spaces
            argv.append(key)
            argv.extend(s[1:-1].split())
            continue
        s = re.sub(r"\$\{(\w+)\}", lambda m: PLACEHOLDERS.get(m.group(1), "/" + m.group(1).lower()), s)
        argv.extend([key, s])
    return argv


def load_configs(repo: str, tag: str):
    """[(name, argv)] for every ``gpt/*/model_config.yaml`` at ``tag``."""
    names = [p for p in _git(repo, "ls-tree", "-r", "--name-only", tag, CASES + "/").split()
             if re.match(re.escape(CASES) + r"/[^/]+/model_config\.yaml$", p)]
    out = []
    for path in sorted(names):
        cfg = _yaml_load(_git(repo, "show", f"{tag}:{path}"))
        out.append((path.split("/")[-2], config_argv(cfg.get("MODEL_ARGS") or {})))
    return out


GENERIC = "not implemented by megatron_ppu (Megatron-LM's"


def classify(argv, tag=None):
    """(outcome, message) of parsing ``argv`` with megatron_ppu's parser for Megatron-LM ``tag``'s
    flags (default: the installed megatron-core's)."""
    from megatron_ppu.training.arguments import build_parser, parse_args

    try:
        parse_args(argv, parser=build_parser(megatron_lm_tag=tag))
    except ValueError as e:
        msg = str(e)
        if "unrecognized" in msg or "unknown" in msg or "unsupported argument" in msg:
            return "unknown", msg
        if "refused" in msg:
            return ("refused-unnamed" if GENERIC in msg else "refused"), msg
        return "invalid", msg
    except SystemExit as e:  # argparse's own errors (bad value types, missing values)
        return "invalid", f"argparse exit {e.code}"
    return "parsed", ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", help="a Megatron-LM git directory (e.g. from `fetch github:NVIDIA/Megatron-LM`)")
    ap.add_argument("--tag", default="core_v0.16.1")
    ap.add_argument("--flags-tag", help="the Megatron-LM flag table to parse with (default: --tag)")
    ap.add_argument("--json", help="write per-configuration outcomes here")
    ap.add_argument("--dump-argv", help="write {name: argv} of every configuration (dense and MoE) here and exit")
    ap.add_argument("--te-as-local", action="store_true",
                    help="replace --transformer-impl transformer_engine by local first (what else blocks a config)")
    a = ap.parse_args(argv)
    import logging

    logging.disable(logging.CRITICAL)
    configs = load_configs(a.repo, a.tag)
    if a.dump_argv:
        import shlex

        with open(a.dump_argv, "w") as f:  # one configuration a line, its argv shell-quoted (shlex.split reads it)
            json.dump({"tag": a.tag, "source": f"Megatron-LM {a.tag}: {CASES}/*/model_config.yaml, MODEL_ARGS as "
                                              "argv (benchmarks/megatron_configs.py --dump-argv)",
                       "configs": {n: shlex.join(v) for n, v in configs}}, f, indent=0)
            f.write("\n")
        return None
    dense = [(n, v) for n, v in configs if "--num-experts" not in v]
    results, reasons, unknown_flags = {}, collections.Counter(), collections.Counter()
    for name, args in dense:
        if a.te_as_local:
            args = ["local" if (x == "transformer_engine" and args[i - 1] == "--transformer-impl") else x
                    for i, x in enumerate(args)]
        outcome, msg = classify(args, a.flags_tag or a.tag)
        results[name] = {"outcome": outcome, "message": msg}
        for line in msg.splitlines():
            m = re.match(r"\s*(--[\w-]+)(?: [^:]*)?: (.*)", line)
            if m and outcome.startswith("refused"):
                reasons[m.group(1)] += 1
        if outcome == "unknown":
            line = next((ln for ln in msg.splitlines() if "unrecognized" in ln or "unsupported argument" in ln), msg)
            for f in re.findall(r"--[\w-]+", line.split(":")[0]):
                unknown_flags[f] += 1
    counts = collections.Counter(r["outcome"] for r in results.values())
    uses = collections.Counter(f for _, v in dense for f in set(x for x in v if x.startswith("--")))
    print(f"{len(configs)} gpt configurations at {a.tag}; {len(dense)} dense (without --num-experts); "
          f"parsed with the {a.flags_tag or a.tag} flags")
    print(f"{len(uses)} distinct flags in the dense ones")
    for k in ("parsed", "refused", "refused-unnamed", "unknown", "invalid"):
        print(f"  {k:8s} {counts.get(k, 0):4d}")
    if reasons:
        print("flags refused (number of configurations):")
        for f, n in reasons.most_common():
            print(f"  {n:4d} {f}")
    if unknown_flags:
        print("flags still unknown:", ", ".join(f"{f} ({n})" for f, n in unknown_flags.most_common()))
    inval = [(n, r["message"]) for n, r in results.items() if r["outcome"] == "invalid"]
    for n, m in inval:
        print(f"  invalid: {n}: {m.splitlines()[0][:300]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tag": a.tag, "counts": counts, "results": results}, f, indent=1)
    return counts


if __name__ == "__main__":
    main()
