"""Checkpoints on file systems that are not shared between nodes, and checkpoint volume.

Two ranks are given different views of one folder the way two nodes without a shared
file system see it: rank 1 runs inside a private mount namespace in which another
folder is bind-mounted over the shared path (``unshare --mount`` + ``mount --bind``,
needs root; the tests skip with the reason otherwise). Both ranks then use the same
``--save``/``--load`` path and see different contents there.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.harness import REPO, RankFailure, run_ranks
from tests.conftest import data_flags
from tests.conftest import MODEL, _logger
from megatron_ppu.testing.local_ranks import run_local_ranks

ITER = "latest_checkpointed_iteration.txt"


def _unshare_reason():
    """None if this process may give a child a private mount view; else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    d = tempfile.mkdtemp(prefix="ppu-unshare-")
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                            f"mount --bind {d} {d}"], capture_output=True, text=True, timeout=30)
        return None if r.returncode == 0 else f"unshare --mount / mount --bind not permitted: {r.stderr.strip()}"
    finally:
        shutil.rmtree(d, ignore_errors=True)


needs_unshare = pytest.mark.skipif(_unshare_reason() is not None, reason=str(_unshare_reason()))

WRAPPER = r"""#!/bin/bash
# Rank 1 sees $PPU_PRIVATE at $PPU_SAME (its own "node-local" disk); the other ranks see the real folder.
if [ "$RANK" = "1" ]; then
  exec unshare --mount --propagation private bash -c 'mount --bind "$PPU_PRIVATE" "$PPU_SAME" && exec "$@"' bash "$@"
fi
exec "$@"
"""


def _run_split_view(tmp_path, target, kwargs, same, private, world_size=2, timeout=600, extra_env=None):
    """Like ``run_ranks``, but rank 1 sees ``private`` at the path ``same``. Returns
    (per-rank results or None, per-rank log texts, wall seconds)."""
    wrapper = tmp_path / "split_view.sh"
    wrapper.write_text(WRAPPER)
    out = tmp_path / "ranks-out"
    out.mkdir(exist_ok=True)
    logs = [str(out / f"rank{r}.log") for r in range(world_size)]
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PPU_SAME": str(same), "PPU_PRIVATE": str(private), **(extra_env or {})}
    import json

    cmd = ["bash", str(wrapper), sys.executable, "-m", "tests.harness_worker", target, json.dumps(kwargs), str(out)]
    t0 = time.monotonic()
    failure = None
    try:
        run_local_ranks(cmd, world_size, logs, cwd=str(REPO), timeout=timeout, env=env, label=target)
    except RankFailure as e:
        failure = e
    wall = time.monotonic() - t0
    texts = [Path(p).read_text() for p in logs]
    if failure is not None:
        return None, texts, wall, failure
    return [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(world_size)], texts, wall, None


def _expect_error_worker(rank, world_size, argv):
    """Run ``argv``; return the CheckpointError it raised (message, seconds after start-up)."""
    from megatron_ppu.training.checkpointing import CheckpointError
    from megatron_ppu.training.loop import run

    t0 = time.monotonic()
    try:
        run(argv)
    except CheckpointError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def _files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


COMMON = ["--train-iters", "4", "--ppu-slices", "2", "--diloco-local-steps", "2"]


@needs_unshare
@pytest.mark.timeout(900)
def test_ranks_seeing_different_load_contents_fail_fast_with_one_clear_error(tiny_data, tmp_path):
    view, private = tmp_path / "view", tmp_path / "rank1-disk"
    view.mkdir()
    private.mkdir()
    ck = str(view / "ck")
    common = MODEL + data_flags(tiny_data) + COMMON
    # A complete 2-rank checkpoint on the shared folder ...
    run_ranks(2, "tests.conftest:_train_worker", {"runs": [common + ["--train-iters", "2", "--save", ck]]},
              timeout=600)
    assert open(os.path.join(ck, ITER)).read().strip() == "2"
    # ... that rank 1 (another "node") cannot see: its --load folder is empty.
    res, logs, wall, failure = _run_split_view(tmp_path, "tests.test_checkpoint_fs:_expect_error_worker",
                                               {"argv": common + ["--load", ck, "--save", ck]}, view, private,
                                               timeout=240)
    assert failure is None, f"ranks did not all end with a CheckpointError after {wall:.0f}s:\n{failure}"
    msgs = [r["error"] for r in res]
    assert msgs[0] is not None and msgs[0] == msgs[1], msgs  # one error, the same on every rank
    assert "rank 1" in msgs[0] and os.path.join(ck, "iter_0000002") in msgs[0], msgs[0]
    assert "shared" in msgs[0]  # says what to do
    secs = max(r["seconds"] for r in res)
    print(msgs[0])
    print(f"split-view --load: CheckpointError on both ranks {secs:.1f}s after start-up, launch wall {wall:.1f}s")
    assert secs < 60, secs
    assert wall < 120, wall  # process start + imports + data on a loaded 2-core machine, then the error


def _split_view_worker(rank, world_size, runs):
    """Run each ``{"argv", "expect_error", "truncate"}`` in turn: ``truncate`` (a path) is cut
    to 100 bytes by rank 1 first (in its view); a run that is expected to fail returns its
    CheckpointError message, the others their losses and final evaluation."""
    import torch.distributed as dist

    from megatron_ppu.training.checkpointing import CheckpointError
    from megatron_ppu.training.loop import run

    out = []
    for r in runs:
        if r.get("truncate") and rank == 1:
            with open(r["truncate"], "r+b") as f:
                f.truncate(100)
        dist.barrier()
        if r.get("expect_error"):
            try:
                run(r["argv"])
                out.append({"error": None})
            except CheckpointError as e:
                out.append({"error": str(e)})
            continue
        t = run(r["argv"])
        out.append({"losses": list(t.losses), "eval": t.final_eval, "logger": dist.get_rank() == world_size - 1})
    return out


@needs_unshare
@pytest.mark.timeout(1200)
def test_save_and_resume_on_node_local_folders(tiny_data, tmp_path):
    view, private = tmp_path / "view", tmp_path / "rank1-disk"
    view.mkdir()
    private.mkdir()
    ck = str(view / "ck")  # absent on both "nodes": --save D --load D is a first launch
    # The dataset index cache is node-local too: megatron-core builds it on rank 0 only.
    flags = data_flags(tiny_data)
    flags[flags.index("--data-cache-path") + 1] = str(view / "index-cache")
    common = MODEL + flags + COMMON
    res, logs, wall, failure = _run_split_view(tmp_path, "tests.test_checkpoint_fs:_split_view_worker", {"runs": [
        {"argv": common},  # uninterrupted
        {"argv": common + ["--save", ck, "--load", ck, "--save-interval", "2", "--exit-interval", "2"]},  # 1st launch
        {"argv": common + ["--load", ck, "--save", ck]},  # resumes from the per-node folders
        # --finetune reads the dist_checkpointing part, complete only where the views are gathered
        {"argv": common + ["--load", ck, "--finetune"], "expect_error": True},
        # a truncated file on one node: the same error on both ranks
        {"argv": common + ["--load", ck, "--save", ck, "--train-iters", "6"], "expect_error": True,
         "truncate": str(view / "ck" / "iter_0000004" / "ppu" / "rank_00001.pt")},
    ]}, view, private, timeout=1100)
    assert failure is None, str(failure)
    full, first, resumed = next(r for r in res if r[0]["logger"])[:3]
    assert first["losses"] == full["losses"][:2]
    assert resumed["losses"] == full["losses"][2:]  # bitwise
    assert resumed["eval"] == full["eval"]
    for log in logs:
        assert "Overwriting old incomplete" not in log, log[-3000:]
    finetune, corrupt = [r[3]["error"] for r in res], [r[4]["error"] for r in res]
    print(finetune[0], corrupt[0], sep="\n")
    assert finetune[0] is not None and finetune[0] == finetune[1], finetune
    assert "rank 1" in finetune[0] and "model part" in finetune[0] and "metadata.json" in finetune[0], finetune[0]
    assert corrupt[0] is not None and corrupt[0] == corrupt[1], corrupt
    assert "rank 1" in corrupt[0] and "rank_00001.pt is corrupt" in corrupt[0], corrupt[0]
    # Each "node" holds its own ranks' files and a complete set of markers; nothing is shared.
    node0, node1 = _files(ck), _files(private / "ck")
    for files, mine, other in ((node0, "rank_00000.pt", "rank_00001.pt"), (node1, "rank_00001.pt", "rank_00000.pt")):
        assert ITER in files
        for it in ("iter_0000002", "iter_0000004"):
            assert f"{it}/ppu/run.json" in files and f"{it}/ppu/{mine}" in files, files
            assert f"{it}/ppu/{other}" not in files
        assert not any(f.startswith(".iter_") or f.startswith(".ppu-view") for f in files), files  # no leftovers
    caches = [_files(view / "index-cache"), _files(private / "index-cache")]
    assert caches[0] == caches[1] and any(f.endswith("shuffle_index.npy") for f in caches[0]), caches
    for f in caches[0]:
        assert (view / "index-cache" / f).read_bytes() == (private / "index-cache" / f).read_bytes()


def _volume_worker(rank, world_size, runs):
    """Like ``_train_worker``, plus the bytes reported by the last save of each run."""
    import torch.distributed as dist

    from megatron_ppu.training.loop import run

    out = []
    for argv in runs:
        t = run(argv)
        out.append({"losses": list(t.losses), "eval": t.final_eval, "logger": dist.get_rank() == world_size - 1,
                    "saved": t.checkpointer.last_save})
    return out


def _param_count(vocab, hidden, ffn, layers, seq):
    """GPT parameters by hand: tied embeddings, learned positions, LayerNorm, biases."""
    per_layer = (2 * hidden                       # input LayerNorm
                 + hidden * 3 * hidden + 3 * hidden  # QKV
                 + hidden * hidden + hidden        # attention output projection
                 + 2 * hidden                      # pre-MLP LayerNorm
                 + hidden * ffn + ffn              # fc1
                 + ffn * hidden + hidden)          # fc2
    return vocab * hidden + seq * hidden + layers * per_layer + 2 * hidden


@pytest.mark.timeout(1500)
def test_replica_state_written_once_per_replica_and_resumed_exactly(tiny_data, tmp_path):
    """4 ranks = 2 replicas x inner-DP 2: each inner-DP rank writes half of its replica's state."""
    ck = str(tmp_path / "ck")
    common = MODEL + data_flags(tiny_data) + ["--train-iters", "6", "--diloco-replicas", "2",
                                              "--diloco-local-steps", "2"]
    res = run_ranks(4, "tests.test_checkpoint_fs:_volume_worker", {"runs": [
        common,
        common + ["--save", ck, "--save-interval", "4", "--exit-interval", "4"],
        common + ["--load", ck, "--save", ck],
    ]}, timeout=1400)
    full, first, resumed = _logger(res)
    assert first["losses"] == full["losses"][:4]
    assert resumed["losses"] == full["losses"][4:]  # bitwise
    assert resumed["eval"] == full["eval"]
    # Replica-shared state per rank, fp32: local weights + DiLoCo snapshot + outer momentum
    # + Adam's two moments = 5 x 4 bytes per parameter (no PPU slicing: every parameter trained).
    vocab = 512  # 500 padded to a multiple of 128
    p = _param_count(vocab, 64, 256, 2, 32)
    replica_bytes = 5 * 4 * p
    it4 = os.path.join(ck, "iter_0000004", "ppu")
    sizes = [os.path.getsize(os.path.join(it4, f"rank_{r:05d}.pt")) for r in range(4)]
    print(f"parameters {p}: replica-shared state {replica_bytes} B; rank files {sizes} B; "
          f"save log: {first['saved']}")
    for s in sizes:  # 1/inner_dp of it, plus small per-rank state (RNG, scheduler, plan, pickle headers)
        assert replica_bytes / 2 <= s <= replica_bytes / 2 + 256 * 1024, (s, replica_bytes / 2)
    mine, total = first["saved"]["rank_bytes"], first["saved"]["total_bytes"]
    everything = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(ck, "iter_0000004"))
                     for f in fs)
    assert total == everything, (total, everything)
    assert 0 < mine < total


def _shard_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_ppu.training.checkpointing import shard_state, unshard_state

    g = torch.Generator().manual_seed(0)  # the same state on both ranks
    state = {"a": torch.randn(7, 3, generator=g), "b": [torch.arange(5), (torch.randn(2, generator=g).bfloat16(), 3)],
             "c": {"flag": torch.tensor([True, False, True]), "none": None, "s": "x"}, "d": torch.randn(1, generator=g)}
    shard = shard_state(state, dist.group.WORLD)
    back = unshard_state(torch.load(_roundtrip(shard), weights_only=False), dist.group.WORLD)
    return {"state": state, "back": back, "piece_numel": {k: v.numel() for k, v in shard["pieces"].items()}}


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.timeout(300)
def test_shard_state_splits_evenly_and_gathers_back_exactly():
    res = run_ranks(2, "tests.test_checkpoint_fs:_shard_worker", timeout=240)
    for r in res:
        s, b = r["state"], r["back"]
        assert torch.equal(b["a"], s["a"]) and torch.equal(b["b"][0], s["b"][0])
        assert b["b"][1][0].dtype == torch.bfloat16 and torch.equal(b["b"][1][0], s["b"][1][0]) and b["b"][1][1] == 3
        assert torch.equal(b["c"]["flag"], s["c"]["flag"]) and b["c"]["none"] is None and b["c"]["s"] == "x"
        assert torch.equal(b["d"], s["d"])
    # float32: 21 + 1 = 22 elements -> 11 per rank; int64: 5 -> 3 + 2; bool 3 -> 2 + 1; bf16 2 -> 1 + 1
    assert [r["piece_numel"] for r in res] == [{"bfloat16": 1, "bool": 2, "float32": 11, "int64": 3},
                                               {"bfloat16": 1, "bool": 1, "float32": 11, "int64": 2}]


def _errors_worker(rank, world_size, runs):
    """Run each argv; collect the CheckpointError message of each (None if it trained)."""
    return [_expect_error_worker(rank, world_size, argv)["error"] for argv in runs]


@pytest.mark.timeout(600)
def test_load_or_finetune_that_finds_nothing_is_an_error_not_a_fresh_start(tiny_data, tmp_path):
    empty, partial, other = tmp_path / "empty", tmp_path / "partial", tmp_path / "other-save"
    empty.mkdir()
    (partial / "iter_0000003").mkdir(parents=True)  # e.g. a copy that lost its ppu/run.json
    common = MODEL + data_flags(tiny_data) + ["--train-iters", "1", "--diloco-local-steps", "0"]
    errs = run_ranks(1, "tests.test_checkpoint_fs:_errors_worker", {"runs": [
        common + ["--load", str(empty), "--finetune"],
        common + ["--load", str(tmp_path / "absent"), "--finetune"],
        common + ["--load", str(empty), "--save", str(other)],
        common + ["--load", str(partial), "--save", str(partial)],
    ]}, timeout=500)[0]
    assert errs[0] is not None and "--finetune" in errs[0] and "holds no checkpoint" in errs[0], errs[0]
    assert errs[1] is not None and "does not exist" in errs[1], errs[1]
    assert errs[2] is not None and "drop --load" in errs[2] and f"--save {empty} --load {empty}" in errs[2], errs[2]
    assert errs[3] is not None and "none is a complete" in errs[3], errs[3]
    assert not os.listdir(empty) and not (other / "iter_0000001").exists()  # nothing trained or written


@pytest.mark.timeout(900)
@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])  # bf16: fp32 shard masters != params
def test_distributed_optimizer_run_killed_and_resumed_reproduces_the_losses(tiny_data, tmp_path, precision):
    """--save with --use-distributed-optimizer: each inner-DP rank's optimizer shard is saved and restored."""
    ck = str(tmp_path / "ck")
    common = MODEL + data_flags(tiny_data) + ["--train-iters", "4", "--diloco-local-steps", "0",
                                              "--use-distributed-optimizer"] + precision
    res = run_ranks(2, "tests.conftest:_train_worker", {"runs": [
        common,
        common + ["--save", ck, "--load", ck, "--save-interval", "2", "--exit-interval", "2"],
        common + ["--load", ck, "--save", ck],
    ]}, timeout=800)
    full, first, resumed = _logger(res)
    assert first["losses"] == full["losses"][:2]
    assert resumed["losses"] == full["losses"][2:]  # bitwise: the moments and fp32 masters of every shard
    assert resumed["eval"] == full["eval"]


FIRST_LAUNCH_STUB = r'''
import os, sys
import torch.distributed as dist
from megatron_ppu.comm import shutdown_process_groups
from megatron_ppu.testing.local_ranks import free_port
from megatron_ppu.training.arguments import parse_args
from megatron_ppu.training.checkpointing import probe_views, resolve_checkpoint
argv = sys.argv[1:]
a = parse_args(argv[argv.index("pretrain_gpt_ppu.py") + 1:])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
probe_views(a.checkpoint.save, create=True)
found = resolve_checkpoint(a.checkpoint.load, save_dir=a.checkpoint.save, finetune=a.checkpoint.finetune)
print("first launch" if found is None else found)
shutdown_process_groups()  # as pretrain_gpt_ppu.py does; left alive, gloo can abort the exit (-6)
'''


@pytest.mark.timeout(300)
def test_1p3b_example_first_launch_gets_past_checkpoint_discovery(tmp_path):
    """examples/pretrain_gpt_1.3b_32nodes_ppu.sh passes --save CKPT --load CKPT; CKPT is not there yet."""
    (tmp_path / "stub.py").write_text(FIRST_LAUNCH_STUB)
    stub = tmp_path / "torchrun_stub.sh"
    stub.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} {tmp_path / 'stub.py'} \"$@\"\n")
    stub.chmod(0o755)
    ck = tmp_path / "ckpt"
    env = dict(os.environ, TORCHRUN=str(stub), NODE_RANK="0", MASTER_ADDR="node0", DATA_PATH="corpus_text_document",
               TOKENIZER_MODEL="tok.model", CKPT=str(ck), PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    r = subprocess.run(["bash", str(REPO / "examples" / "pretrain_gpt_1.3b_32nodes_ppu.sh")], env=env,
                       capture_output=True, text=True, timeout=250)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "first launch", r.stdout
    assert ck.is_dir() and os.listdir(ck) == []  # created for the saves to come; the probe cleaned up


@needs_unshare
@pytest.mark.timeout(1200)
def test_embedded_corpus_with_a_cache_folder_other_nodes_cannot_see(tmp_path):
    """The default cache (a per-user home folder) on rank 0's node only: rank 1 builds its own copy
    of the embedded corpus (checked to be identical) and receives rank 0's index caches."""
    home = Path(os.path.expanduser("~")) / ".cache" / "megatron_ppu"
    view, private = tmp_path / "view", tmp_path / "rank1-disk"
    private.mkdir()
    if home.is_dir():  # rank 0's node has built it before (saves a build); rank 1's has nothing
        shutil.copytree(home, view, ignore=shutil.ignore_patterns("index-cache", ".*"))
    else:
        view.mkdir()
    argv = ["--train-iters", "1", "--eval-iters", "1", "--diloco-local-steps", "0", "--micro-batch-size", "2"]
    res, logs, wall, failure = _run_split_view(tmp_path, "tests.conftest:_train_worker", {"runs": [argv]},
                                               view, private, timeout=1100,
                                               extra_env={"MEGATRON_PPU_CACHE": str(view)})
    assert failure is None, str(failure)
    entries = [sorted(n for n in os.listdir(d) if n.startswith("sotu-")) for d in (view, private)]
    assert entries[0] == entries[1] and entries[0], entries
    for name in os.listdir(view / entries[0][0]):
        if name.endswith(".bin") or name.endswith(".idx"):  # the same token stream (.model records its build dir)
            assert (view / entries[0][0] / name).read_bytes() == (private / entries[0][0] / name).read_bytes(), name
    assert _files(view / "index-cache") == _files(private / "index-cache") != []
