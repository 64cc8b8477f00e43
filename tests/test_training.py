"""pretrain_gpt_ppu.py end to end on CPU: PPU and DDP runs, exact resume, TP/PP agreement, errors."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import MODEL, _logger, data_flags
from tests.harness import REPO, RankFailure, run_ranks

@pytest.mark.timeout(900)
def test_ppu_two_replicas_and_ddp_train_on_tool_made_data(tiny_data):
    common = MODEL + data_flags(tiny_data) + ["--train-iters", "8"]
    res = run_ranks(2, "tests.conftest:_train_worker", {"runs": [
        common + ["--ppu-slices", "2", "--diloco-local-steps", "4"],
        common + ["--diloco-local-steps", "0"],
    ]}, timeout=800)
    ppu, ddp = _logger(res)
    for r in (ppu, ddp):
        assert len(r["losses"]) == 8
        assert r["losses"][-1] < r["losses"][0]  # it learns
        assert 1.0 < r["eval"]["ppl"] < 600  # perplexity of a 500-token vocabulary, after training
    assert ppu["syncs"] == 2 and ddp["syncs"] == 0
    # DDP's bytes (DDPSync.stats), hand-derived: every iteration all-reduces one fp32 gradient per
    # trainable element over the K = 2 ranks; a ring all-reduce sends 2 (K-1)/K x those bytes per rank.
    k, iters, grad_bytes = 2, 8, 4 * ddp["trainable_numel"]
    s = ddp["sync_stats"]
    assert s["reductions"] == iters
    assert s["payload_bytes"] == s["bytes_handed"] == iters * grad_bytes
    assert s["grad_bytes_sent"] == 2 * (k - 1) / k * iters * grad_bytes
    assert "outer_bytes_sent" not in s  # not an outer sync (the log's "outer" column stays DiLoCo's)


@pytest.mark.timeout(900)
def test_tensorboard_scalars_written(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    run_ranks(1, "tests.conftest:_train_worker", {"runs": [
        MODEL + data_flags(tiny_data) + ["--train-iters", "4", "--diloco-local-steps", "0",
                                         "--tensorboard-dir", str(tb)]]})
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"lm loss", "learning-rate", "validation loss", "validation ppl"} <= set(tags)
    assert [e.step for e in acc.Scalars("lm loss")] == [4]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", [
    ["--ppu-slices", "2", "--diloco-local-steps", "3", "--diloco-streaming-fragments", "2"],
    # per-step SDP with forward masking: non-held blocks are refreshed lazily (at the save)
    ["--subnet-plan", "blocks", "--subnet-coverage", "0.5", "--subnet-masking", "forward", "--subnet-sync", "step"],
], ids=["ppu-streaming-diloco", "sdp-blocks-forward-step"])
def test_interrupted_run_resumes_to_identical_losses(tiny_data, tmp_path, method):
    ck = str(tmp_path / "ckpt")
    common = MODEL + data_flags(tiny_data) + ["--train-iters", "8"] + method
    res = run_ranks(2, "tests.conftest:_train_worker", {"runs": [
        common,  # uninterrupted
        common + ["--save", ck, "--save-interval", "5", "--exit-interval", "5"],  # "crashes" after 5
        common + ["--load", ck, "--save", ck],  # resumes
    ]}, timeout=800)
    full, first, resumed = _logger(res)
    assert first["losses"] == full["losses"][:5]
    assert resumed["losses"] == full["losses"][5:]  # bitwise: RNG, data, optimizer, DiLoCo all restored
    assert resumed["eval"] == full["eval"]
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "8"


def _first_losses(results):
    return _logger(results)[0]["losses"]


@pytest.mark.timeout(600)
def test_tp2_and_pp2_match_tp1_losses(tiny_data, tmp_path):
    ck = str(tmp_path / "init")
    base = MODEL + data_flags(tiny_data) + ["--hidden-dropout", "0", "--attention-dropout", "0",
                                            "--diloco-local-steps", "0", "--swiglu"]
    # Shared starting weights: a checkpoint from a TP=1 run, loaded with --finetune (Megatron full layout).
    run_ranks(1, "tests.conftest:_train_worker", {"runs": [base + ["--train-iters", "1", "--save", ck]]})
    start = base + ["--load", ck, "--finetune", "--train-iters", "2"]
    tp1_runs = _logger(run_ranks(1, "tests.conftest:_train_worker", {"runs": [
        start, start + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                        "--recompute-num-layers", "1"]]}))
    tp1 = tp1_runs[0]["losses"]
    assert tp1_runs[1]["losses"] == pytest.approx(tp1, rel=1e-6)  # activation recompute changes nothing
    res = _logger(run_ranks(2, "tests.conftest:_train_worker", {"runs": [
        start + ["--tensor-model-parallel-size", "2"],
        start + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        start + ["--pipeline-model-parallel-size", "2"]]}))
    for r in res:
        # iteration 1: same weights and batch; iteration 2: after one update (catches e.g. norm
        # gradients not all-reduced under sequence parallelism).
        assert r["losses"] == pytest.approx(tp1, rel=1e-5)



# --------------------------------------------------------------------------- errors
def _cli(args, tmp_path, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MASTER_PORT=str(29000 + os.getpid() % 1000))
    return subprocess.run([sys.executable, str(REPO / "pretrain_gpt_ppu.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_unsupported_megatron_flag_is_an_error_naming_it(tmp_path):
    r = _cli(["--mtp-num-layers", "1", "--num-layers", "2", "--save", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 2
    assert "--mtp-num-layers" in r.stderr and "unsupported" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(900)
def test_missing_data_path_is_a_clear_error(tmp_path):
    r = _cli(MODEL + ["--train-iters", "2", "--data-path", str(tmp_path / "nope_text_document"), "--tokenizer-type", "NullTokenizer",
                      "--vocab-size", "128", "--save", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "nope_text_document.bin does not exist" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(900)
def test_corrupt_idx_is_a_clear_error(tiny_data, tmp_path):
    bad = tmp_path / "bad_text_document"
    shutil.copy(tiny_data["prefix"] + ".bin", str(bad) + ".bin")
    idx = open(tiny_data["prefix"] + ".idx", "rb").read()
    open(str(bad) + ".idx", "wb").write(b"NOTMMIDX" + idx[8:40])  # wrong magic, truncated
    r = _cli(MODEL + ["--train-iters", "2", "--data-path", str(bad), "--tokenizer-type", "GPTSentencePieceTokenizer",
                      "--tokenizer-model", tiny_data["model"], "--data-cache-path", str(tmp_path / "c"),
                      "--save", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "bad_text_document.idx/.bin cannot be read" in r.stderr and "preprocess_data.py" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(900)
def test_mismatched_checkpoint_is_refused_and_nothing_written(tiny_data, tmp_path):
    ck = str(tmp_path / "ck")
    common = MODEL + data_flags(tiny_data) + ["--train-iters", "2", "--diloco-local-steps", "2"]
    run_ranks(2, "tests.conftest:_train_worker", {"runs": [common + ["--ppu-slices", "2", "--save", ck]]})
    before = sorted(os.listdir(ck))
    with pytest.raises(RankFailure) as e:
        run_ranks(2, "tests.conftest:_train_worker", {"runs": [common + ["--ppu-slices", "1", "--load", ck,
                                                                              "--save", ck]]})
    assert "CheckpointError" in str(e.value) and "num_slices" in str(e.value) and "--finetune" in str(e.value)
    assert sorted(os.listdir(ck)) == before  # nothing new, nothing half-written


@pytest.mark.timeout(60)
def test_load_ignores_partial_saves_and_uses_tracker(tmp_path):
    from megatron_ppu.training.checkpointing import CheckpointError, find_checkpoint

    (tmp_path / "iter_0000004" / "ppu").mkdir(parents=True)
    (tmp_path / "iter_0000004" / "ppu" / "run.json").write_text("{}")
    (tmp_path / ".iter_0000008.tmp-abcd" / "ppu").mkdir(parents=True)  # crashed mid-save
    (tmp_path / "iter_0000006").mkdir()  # no completion marker
    assert find_checkpoint(str(tmp_path)).endswith("iter_0000004")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6\n")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        find_checkpoint(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4\n")
    assert find_checkpoint(str(tmp_path)).endswith("iter_0000004")
