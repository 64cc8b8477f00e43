"""Weights & Biases logging (``--wandb-project``, issue 25): a real 2-rank training run in W&B's
offline mode, whose ``.wandb`` file is read back and checked against the log lines the trainer
printed and the TensorBoard file it wrote beside it; the flag checks; and the clear error when
the optional ``wandb`` package is missing.

The ``.wandb`` file is W&B's transaction log: LevelDB's log framing (32 KiB blocks, each record
a 7-byte header: CRC-32 over type and data, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte
file header ``:W&B``, magic 0xBEE1, version 0; every record a ``wandb_internal_pb2.Record``.
wandb 0.31 ships the protobuf definitions but no Python reader (its ``DataStore`` was removed),
so :func:`read_wandb_records` below reads the framing, checking every CRC.
"""
import glob
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
import uuid
import zlib

import pytest

from tests.harness import REPO
from megatron_ppu.testing.local_ranks import run_local_ranks

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path):
    """Every ``Record`` of a ``.wandb`` file, in order (CRC-checked)."""
    from wandb.proto import wandb_internal_pb2 as pb

    b = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", b[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending, out = HEADER, None, []
    while pos + HEADER <= len(b):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        crc, n, typ = struct.unpack("<IHB", b[pos:pos + HEADER])
        if (crc, n, typ) == (0, 0, 0):  # zero padding to the end of the block
            pos += left
            continue
        data = b[pos + HEADER:pos + HEADER + n]
        assert len(data) == n, f"truncated record at byte {pos}"
        assert zlib.crc32(data, zlib.crc32(bytes([typ]))) & 0xFFFFFFFF == crc, f"bad CRC at byte {pos}"
        pos += HEADER + n
        if typ in (FULL, FIRST):
            assert pending is None
            pending = data
        else:
            assert typ in (MIDDLE, LAST) and pending is not None, typ
            pending += data
        if typ in (FULL, LAST):
            r = pb.Record()
            r.ParseFromString(pending)
            out.append(r)
            pending = None
    assert pending is None, "the file ends inside a record"
    return out


def history_and_config(records):
    """({step: {key: value}}, config dict, run record) of a run's records."""
    history, config, run = {}, {}, None
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            step = row.pop("_step")
            assert step == r.history.step.num
            history.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "run":
            run = r.run
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    return history, config, run


def _marked_processes(marker):
    """PIDs of live processes whose environment holds ``marker`` (the run's ranks and what they started)."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            if marker.encode() in open(f"{d}/environ", "rb").read():
                pids.append(int(d[6:]))
        except OSError:  # gone, or not ours
            pass
    return pids


def _wandb_env(tmp_path, marker):
    cache = tmp_path / "wandb-home"
    return {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(cache / "config"), "WANDB_CACHE_DIR": str(cache / "cache"),
            "WANDB_DATA_DIR": str(cache / "data"), "WANDB_ARTIFACT_DIR": str(cache / "artifacts"),
            "PPU_TEST_MARKER": marker, "PYTHONPATH": str(REPO)}


ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: (\S+) \|")
VALID = re.compile(r"validation loss at iteration (\d+) \(.*?\) \| lm loss value: (\S+) \|")


@pytest.mark.timeout(600)
def test_offline_run_logs_the_log_lines_losses_and_the_args(tmp_path):
    """2 ranks (PPU 1/2, DiLoCo H=2): the last rank logs; every W&B loss equals the log line's,
    at the same iteration; every TensorBoard scalar is in W&B at the same step with the same
    value; the run's config holds every flag given; no process outlives the run."""
    pytest.importorskip("wandb", reason="the test extra installs wandb (pip install -e .[test])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wb, tb = tmp_path / "wb", tmp_path / "tb"
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--lr", "0.001", "--lr-warmup-iters", "2", "--train-iters", "8",
            "--log-interval", "2", "--eval-interval", "4", "--eval-iters", "1", "--mock-data", "--vocab-size", "128",
            "--ppu-slices", "2", "--diloco-local-steps", "2", "--log-params-norm", "--diloco-merge-diagnostic",
            "--tensorboard-dir", str(tb),
            "--wandb-project", "ppu-test", "--wandb-exp-name", "offline-check", "--wandb-entity", "ppu-team",
            "--wandb-save-dir", str(wb)]
    marker = uuid.uuid4().hex
    try:
        logs = run_local_ranks([sys.executable, str(REPO / "pretrain_gpt_ppu.py"), *argv], 2,
                               [str(tmp_path / f"rank{r}.log") for r in range(2)], cwd=str(tmp_path), timeout=500,
                               env=_wandb_env(tmp_path, marker), label="W&B offline run")
    finally:
        deadline = time.monotonic() + 30  # wandb-core exits after its parent; give it a moment
        while _marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _marked_processes(marker)
        for pid in left:
            os.kill(pid, 9)
    assert not left, f"processes outlived the run: {left}"

    # the last rank logs (Megatron-LM's _set_wandb_writer); rank 0 opens no W&B run
    assert "wandb:" not in logs[0] and ITER.search(logs[0]) is None
    runs = glob.glob(str(wb / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    files = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert len(files) == 1, files
    history, config, run = history_and_config(read_wandb_records(files[0]))
    assert (run.project, run.display_name, run.entity) == ("ppu-test", "offline-check", "ppu-team")

    # every logged loss equals the log line's, at the same iteration (the line prints %.6E)
    printed = {int(i): s for i, s in ITER.findall(logs[1])}
    assert sorted(printed) == [2, 4, 6, 8], logs[1][-3000:]
    logged = {step: row["lm loss"] for step, row in history.items() if "lm loss" in row}
    assert sorted(logged) == sorted(printed)
    for it, s in printed.items():
        assert f"{logged[it]:.6E}" == s, (it, logged[it], s)
    valid = {int(i): s for i, s in VALID.findall(logs[1])}
    assert sorted(valid) == [4, 8]
    for it, s in valid.items():
        assert f"{history[it]['lm loss validation']:.6E}" == s, (it, history[it], s)

    # TensorBoard got the same scalars at the same steps (TensorBoard stores float32)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"lm loss", "learning-rate", "grad-norm", "params-norm", "validation loss", "merge/gain"} <= set(tags)
    wandb_keys = {k for row in history.values() for k in row}
    assert set(tags) <= wandb_keys, set(tags) - wandb_keys
    for tag in tags:
        for e in acc.Scalars(tag):
            assert math.isclose(e.value, history[e.step][tag], rel_tol=1e-6, abs_tol=1e-30), (tag, e.step)
        assert len(acc.Scalars(tag)) == sum(tag in row for row in history.values()), tag

    # the run's config: every flag given, with its value (Megatron-LM logs vars(args))
    i = 0
    while i < len(argv):
        key = argv[i][2:].replace("-", "_")
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = config[key]
            assert value == type(value)(argv[i + 1]), (key, value, argv[i + 1])
            i += 2
        else:
            assert config[key] is True, key
            i += 1
    assert config["world_size"] == 2 and config["seq_length"] == 32 and config["lr"] == 0.001


def _cli(args, cwd, env=None, preamble="", timeout=240):
    code = (f"import runpy, sys; {preamble}; sys.argv = ['pretrain_gpt_ppu.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(REPO / 'pretrain_gpt_ppu.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
                                                    PYTHONPATH=str(REPO), **(env or {})))


TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--lr", "0.001", "--train-iters", "2", "--mock-data", "--vocab-size", "128"]


@pytest.mark.timeout(300)
def test_missing_wandb_package_is_a_clear_error_on_every_rank(tmp_path):
    """``wandb`` not importable (a ``None`` entry in ``sys.modules``): each rank of a 2-rank
    launch stops at start-up with the error naming the extra, before anything is written."""
    for rank in (0, 1):
        r = _cli(TINY + ["--wandb-project", "p", "--save", str(tmp_path / "ck")], tmp_path,
                 env={"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
                 preamble="sys.modules['wandb'] = None")
        assert r.returncode == 2, (rank, r.stdout[-2000:], r.stderr[-3000:])
        assert "Weights & Biases logging (--wandb-project) needs the wandb package" in r.stderr
        assert "pip install -e .[wandb]" in r.stderr and "pip install wandb" in r.stderr
    assert not (tmp_path / "ck").exists()


@pytest.mark.timeout(300)
def test_wandb_is_imported_only_with_a_wandb_flag(tmp_path):
    """Parsing the flags imports wandb only with a W&B flag (megatron-core itself imports it
    later, where installed, from ``megatron.core.inference``, guarded against ImportError)."""
    code = ("import sys; from megatron_ppu.training.arguments import parse_args; "
            f"parse_args({TINY!r}); assert 'wandb' not in sys.modules, 'imported without a W&B flag'; "
            f"parse_args({TINY + ['--wandb-project', 'p', '--wandb-save-dir', str(tmp_path)]!r}); "
            "assert 'wandb' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, message", [
    (["--wandb-exp-name", "x", "--wandb-save-dir", "/tmp/x"], "--wandb-exp-name, --wandb-save-dir given without "
                                                               "--wandb-project"),
    (["--wandb-project", "", "--wandb-entity", "e"], "--wandb-project, --wandb-entity given without --wandb-project"),
    (["--wandb-project", "p"], "--wandb-project needs --wandb-save-dir DIR or --save DIR"),
    (["--wandb-project", "p", "--save", "/tmp/x", "--wandb-exp-name", ""], "--wandb-exp-name is empty"),
])
def test_wandb_flag_errors(extra, message):
    pytest.importorskip("wandb", reason="the test extra installs wandb (pip install -e .[test])")
    from megatron_ppu.training.arguments import parse_args

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(TINY + extra)


@pytest.mark.timeout(300)
def test_wandb_save_dir_defaults_to_save_wandb(tmp_path):
    """Megatron-LM: without --wandb-save-dir the files go to <--save>/wandb; only the logger
    rank opens a run. (The trainer's sink opener and W&B's own ``wandb.init``, offline, in a
    child process, whose W&B service must be gone when it is.)"""
    pytest.importorskip("wandb", reason="the test extra installs wandb (pip install -e .[test])")
    ck = tmp_path / "ck"
    code = ("from megatron_ppu.training.arguments import parse_args; "
            "from megatron_ppu.training.metrics import open_sinks; "
            f"a = parse_args({TINY + ['--wandb-project', 'p', '--save', str(ck)]!r}); "
            "assert open_sinks(a, False, 2) is None; "  # not the logger rank: nothing opened
            f"import os; assert not os.path.exists({str(ck)!r}); "
            "s = open_sinks(a, True, 2); assert s.tensorboard is None; "
            "s.write(1, [('lm loss', 1.5)]); s.write(3, [('lm loss', 0.25), ('grad-norm', 2.0)]); s.close()")
    marker = uuid.uuid4().hex
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                           env=dict(os.environ, PYTHONWARNINGS="ignore", **_wandb_env(tmp_path, marker)))
    finally:
        deadline = time.monotonic() + 30
        while _marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _marked_processes(marker)
        for pid in left:
            os.kill(pid, 9)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not left, f"processes outlived the run: {left}"
    files = glob.glob(str(ck / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))  # wandb.init(dir=D): D/wandb/
    assert len(files) == 1, files
    history, config, run = history_and_config(read_wandb_records(files[0]))
    assert history == {1: {"lm loss": 1.5}, 3: {"lm loss": 0.25, "grad-norm": 2.0}}
    assert config["save"] == str(ck) and config["wandb_save_dir"] is None and run.project == "p"
