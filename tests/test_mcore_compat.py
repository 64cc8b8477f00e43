"""megatron-core 0.16.1 to 0.19.x: one test (or more) per version gate (issue 25, item 1).

The gates are in ``megatron_ppu/patches/compat.py`` and ``megatron_ppu/patches/cpu.py``; each test
here fails on megatron-core 0.19 without the gate it names (and, for the checkpoint refusal, on
0.16.1 without it). The whole file carries the ``mcore_gate`` marker: it is the subset CI runs
on Python 3.12 (``PYTHON=python3.12 bash scripts/test.sh -m mcore_gate``), and it runs with the
rest of the suite on Python 3.11 / 0.16.1.
"""
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest
from packaging.version import Version

from tests.harness import REPO, run_ranks

pytestmark = pytest.mark.mcore_gate

MCORE = Version(version("megatron-core"))
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "128", "--eval-iters", "0", "--log-interval", "1",
        "--attention-dropout", "0", "--hidden-dropout", "0"]
FIXTURE = REPO / "tests" / "fixtures" / "megatron_core_0.19_checkpoint"
#: the model of FIXTURE (written by megatron-core 0.19.2 through pretrain_gpt_ppu.py, 1 iteration, ppu/ part removed)
FIXTURE_MODEL = ["--mock-data", "--vocab-size", "64", "--num-layers", "1", "--hidden-size", "16",
                 "--num-attention-heads", "2", "--seq-length", "8", "--micro-batch-size", "2", "--eval-iters", "0",
                 "--diloco-local-steps", "0"]


# -- NullTokenizer: library renamed null -> null-text (0.17), N ids with eod N-1 (0.18) ------------------
@pytest.mark.timeout(120)
def test_null_tokenizer_follows_the_installed_megatron_core():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    from megatron_ppu.data.tokenizers import build_tokenizer

    tok = build_tokenizer("NullTokenizer", vocab_size=10)
    ref = NullTokenizer(10)  # megatron-core's own class, the installed version's convention
    # hand-derived: 0.16.1 has N+1 ids and eod N; 0.18 and later N ids and eod N-1
    expected = (11, 10) if MCORE < Version("0.18") else (10, 9)
    assert (tok.vocab_size, tok.eod) == (ref.vocab_size, ref.eod) == expected
    assert tok.tokenize("3 4  5\n9") == [3, 4, 5, 9]
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize(str(expected[0]))  # one past the last id


# -- training end to end: spec builders (0.18), *_gtp_remat groups (0.19), CPU call sites (0.17, 0.19),
# -- GPTModel deprecation log (0.19) -------------------------------------------------------------------
def _train_worker(rank, world_size, argv):
    import logging

    import torch.distributed as dist

    from megatron_ppu.layers import (PPUAttentionOutputRowParallelLinear, PPUMLPColumnParallelLinear,
                                     PPUMLPRowParallelLinear, PPUQKVColumnParallelLinear)
    from megatron_ppu.training.loop import run

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("megatron.core.models.gpt.gpt_model").addHandler(Keep())
    t = run(argv)
    layer = t.model.module.decoder.layers[0] if hasattr(t.model, "module") else t.model.decoder.layers[0]
    pgc = t.layout.process_group_collection()
    groups = {f: sorted(dist.get_process_group_ranks(getattr(pgc, f)))
              for f in ("dp", "dp_cp", "dp_cp_gtp_remat", "expt_dp_gtp_remat") if getattr(pgc, f, None) is not None}
    return {
        "losses": list(t.losses),
        "types": [type(m).__name__ for m in (layer.mlp.linear_fc1, layer.mlp.linear_fc2,
                                             layer.self_attention.linear_qkv, layer.self_attention.linear_proj)],
        "expected": [c.__name__ for c in (PPUMLPColumnParallelLinear, PPUMLPRowParallelLinear,
                                          PPUQKVColumnParallelLinear, PPUAttentionOutputRowParallelLinear)],
        "groups": groups, "replica_ranks": sorted(t.layout.replica_ranks),
        "deprecation_logged": any("DEPRECATED" in m for m in records),
    }


@pytest.mark.timeout(600)
def test_ppu_training_on_two_replicas_uses_the_partial_linears_and_replica_groups():
    argv = TINY + ["--lr", "1e-2", "--train-iters", "4", "--ppu-slices", "2", "--diloco-local-steps", "2",
                   "--ppu-slice-attention-heads", "--ppu-slice-attention-output", "--use-distributed-optimizer",
                   "--swiglu"]
    res = run_ranks(2, "tests.test_mcore_compat:_train_worker", {"argv": argv}, timeout=550)
    for r in res:
        # the spec builders: megatron-core 0.18 calls linear_fc1/fc2/linear_proj directly
        assert r["types"] == r["expected"]
        # every data-parallel group of the collection is the replica's own (2 replicas x inner-DP 1), the
        # 0.19 groups that finalize_model_grads reduces over included
        assert r["replica_ranks"] == [res.index(r)]
        assert r["groups"] and all(ranks == r["replica_ranks"] for ranks in r["groups"].values()), r["groups"]
        if MCORE >= Version("0.19"):
            assert {"dp_cp_gtp_remat", "expt_dp_gtp_remat"} <= set(r["groups"])
        assert not r["deprecation_logged"]
    losses = next(r["losses"] for r in res if r["losses"])
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)


# -- optimizer param groups matched on max_lr/min_lr/... too (0.19) -------------------------------------
def _resume_other_lr_worker(rank, world_size, tmp, extra):
    from megatron_ppu.training.checkpointing import CheckpointError
    from megatron_ppu.training.loop import run

    ck = os.path.join(tmp, "ck")
    base = TINY + ["--diloco-local-steps", "0", "--lr-decay-style", "constant", "--lr-warmup-iters", "0"] + extra
    run(base + ["--lr", "1e-3", "--train-iters", "2", "--save", ck])
    refused = None
    try:
        run(base + ["--lr", "2e-3", "--train-iters", "4", "--load", ck])
    except CheckpointError as e:
        refused = str(e)
    t = run(base + ["--lr", "2e-3", "--train-iters", "4", "--load", ck, "--override-opt_param-scheduler"])
    return {"refused": refused, "iteration": t.iteration, "lrs": sorted({g["lr"] for g in t.optimizer.param_groups}),
            "max_lrs": sorted({g["max_lr"] for g in t.optimizer.param_groups}), "losses": len(t.losses)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer"]], ids=["fp32-optimizer", "distributed"])
def test_resume_with_another_lr(tmp_path, extra):
    (r,) = run_ranks(1, "tests.test_mcore_compat:_resume_other_lr_worker", {"tmp": str(tmp_path), "extra": extra},
                     timeout=550)
    # without --override-opt_param-scheduler: refused, naming the flags (as on 0.16.1 and in Megatron-LM)
    assert r["refused"] is not None and "--override-opt_param-scheduler" in r["refused"]
    # with it: resumed at iteration 2 and trained to 4 at this run's constant learning rate
    assert r["iteration"] == 4 and r["losses"] == 2
    assert r["lrs"] == [2e-3] and r["max_lrs"] == [2e-3]


# -- checkpoints without common.pt (0.19) ---------------------------------------------------------------
def _checkpoint_worker(rank, world_size, tmp):
    import torch

    from megatron_ppu.training.checkpointing import find_checkpoint, read_checkpoint_args
    from megatron_ppu.training.loop import run

    ck = os.path.join(tmp, "ck")
    t = run(TINY + ["--lr", "1e-2", "--train-iters", "2", "--diloco-local-steps", "0", "--save", ck])
    saved = {k: v.detach().clone() for k, v in t.model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    path = find_checkpoint(ck)
    _, ns = read_checkpoint_args(ck)  # --use-checkpoint-args
    f = run(TINY + ["--lr", "0", "--train-iters", "1", "--diloco-local-steps", "0", "--load", ck,
                    "--finetune"])  # one iteration at lr 0: the loaded weights, unchanged
    shutil.rmtree(os.path.join(path, "ppu"))  # now Megatron-LM's layout only: load_megatron_lm_checkpoint
    m = run(TINY + ["--lr", "0", "--train-iters", "1", "--diloco-local-steps", "0", "--load", ck, "--finetune"])
    same = lambda model: all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k in saved)  # noqa: E731
    return {"files": sorted(os.listdir(path)), "path": os.path.basename(path), "num_layers": ns.num_layers,
            "hidden_size": ns.hidden_size, "finetune_same": same(f.model), "megatron_lm_same": same(m.model),
            "found_after": os.path.basename(find_checkpoint(ck))}


@pytest.mark.timeout(600)
def test_checkpoint_shared_state_where_the_installed_version_keeps_it(tmp_path):
    (r,) = run_ranks(1, "tests.test_mcore_compat:_checkpoint_worker", {"tmp": str(tmp_path)}, timeout=550)
    assert r["path"] == "iter_0000002" and r["found_after"] == "iter_0000002"
    # megatron-core 0.19 writes no common.pt
    assert ("common.pt" in r["files"]) == (MCORE < Version("0.19"))
    assert (r["num_layers"], r["hidden_size"]) == (2, 64)  # the flags the run was given
    assert r["finetune_same"] and r["megatron_lm_same"]


def _cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MASTER_PORT=str(29000 + os.getpid() % 1000))
    return subprocess.run([sys.executable, str(REPO / "pretrain_gpt_ppu.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(400)
def test_a_megatron_core_019_checkpoint_loads_on_019_and_is_refused_with_the_reason_before(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE, ck)
    p = _cli(FIXTURE_MODEL + ["--lr", "1e-3", "--train-iters", "1", "--load", str(ck), "--finetune"], tmp_path)
    if MCORE >= Version("0.19"):
        assert p.returncode == 0, p.stderr[-3000:]
        assert "loaded the Megatron-LM checkpoint" in p.stdout + p.stderr
    else:
        assert p.returncode != 0
        err = p.stderr[-3000:]
        assert "written by megatron-core 0.19" in err and "common.pt" in err, err
        assert "nodes" not in err, err  # the old, wrong reason: files split across nodes
