"""The estimator CLI parses with the trainer's parser (issue 12, item 3).

``python pretrain_gpt_ppu.py --help`` and ``python tools/estimate.py --help`` show the same
flags with the same defaults, help and choices for everything they share (checked on the two
parsers' actions, and on the two commands' real ``--help`` output); every flag's help shows
its default; ``tools/estimate.py`` refuses what the trainer refuses, with the trainer's message.

The reference for the estimator is the trainer's own parser (``build_parser``), built
independently of ``tools/estimate.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from megatron_ppu.training.arguments import build_parser, parse_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
ESTIMATE = ROOT / "tools" / "estimate.py"
TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3",
        "--train-iters", "7"]


def _estimate_cli():
    spec = importlib.util.spec_from_file_location("estimate_cli", ESTIMATE)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _visible(parser: argparse.ArgumentParser) -> dict:
    """option string -> action, for the actions ``--help`` shows (not -h)."""
    return {o: a for a in parser._actions if a.help is not argparse.SUPPRESS and a.option_strings
            and not isinstance(a, argparse._HelpAction) for o in a.option_strings}


def _all(parser: argparse.ArgumentParser) -> dict:
    return {o: a for a in parser._actions for o in a.option_strings}


def _help_entry(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text ``--help`` prints for ``action`` (with its ``(default: ...)``)."""
    fmt = parser._get_formatter()
    return " ".join(fmt._expand_help(action).split())


@pytest.mark.timeout(120)
def test_estimator_shares_every_trainer_flag_with_the_same_default():
    trainer, est = build_parser(), _estimate_cli().build_parser()
    t_all, e_all = _all(trainer), _all(est)
    # every trainer flag (visible or Megatron-LM's hidden ones) is the estimator's, the same action
    assert set(t_all) <= set(e_all), sorted(set(t_all) - set(e_all))
    shared = 0
    for flag, ta in t_all.items():
        ea = e_all[flag]
        for attr in ("dest", "default", "const", "nargs", "choices", "type", "help"):
            assert getattr(ea, attr) == getattr(ta, attr), (flag, attr, getattr(ea, attr), getattr(ta, attr))
        assert type(ea) is type(ta), flag
        shared += 1
    assert shared > 150  # ~90 visible flags and every other Megatron-LM flag
    # the estimator's own options are few and none is a trainer flag
    own = set(_visible(est)) - set(t_all)
    assert {"--paper-table", "--json", "--world-size", "--bandwidth-gbps"} <= own and len(own) < 20


@pytest.mark.timeout(120)
def test_every_flag_help_shows_its_default():
    for parser in (build_parser(), _estimate_cli().build_parser()):
        for flag, action in _visible(parser).items():
            assert "(default: " in _help_entry(parser, action), flag
    # spot checks against the settings' documented defaults (Megatron-LM's and megatron_ppu's)
    t = build_parser()
    a = _visible(t)
    assert "(default: 50)" in _help_entry(t, a["--diloco-local-steps"])
    assert "(default: 0.4)" in _help_entry(t, a["--diloco-outer-lr"])
    assert "(default: fp32)" in _help_entry(t, a["--diloco-allreduce-dtype"])
    assert "(default: 1)" in _help_entry(t, a["--ppu-slices"])
    assert "(default: full)" in _help_entry(t, a["--ppu-detach-frozen-jacobian"])
    assert "(default: 0.01)" in _help_entry(t, a["--weight-decay"])


@pytest.mark.timeout(300)
def test_both_commands_help_show_the_shared_flags_identically():
    outs = {}
    for script in ("pretrain_gpt_ppu.py", "tools/estimate.py"):
        r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[script] = "".join(r.stdout.split())  # argparse wraps lines (also at hyphens)
    t = build_parser()
    for flag, action in _visible(t).items():
        entry = "".join(_help_entry(t, action).split())
        for script, out in outs.items():
            assert entry in out, (script, flag, entry)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [["--no-such-flag"], ["--ppu-slices", "2", "--diloco-local-steps", "0"],
                                   ["--fp8-format", "e4m3"]])
def test_estimator_refuses_what_the_trainer_refuses_with_its_message(extra, capsys):
    with pytest.raises(ValueError) as trainer_error:
        parse_args(TINY + extra, world_size=2)
    with pytest.raises(SystemExit) as exit_info:
        _estimate_cli().main(TINY + extra + ["--world-size", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert " ".join(str(trainer_error.value).split()) in " ".join(err.split())
