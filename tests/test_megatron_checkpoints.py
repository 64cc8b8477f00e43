"""Checkpoints both ways between megatron_ppu and Megatron-LM (issue 14, item 3), with Megatron's own code.

* ours -> Megatron: ``common.pt`` (megatron-core 0.19: the shared state in the ``.distcp`` files) carries Megatron-LM's ``args`` (a Namespace), ``checkpoint_version``,
  ``iteration``, consumed samples and FLOPs; a plain megatron-core ``GPTModel`` (Megatron's local spec)
  built from those ``args`` alone loads the weights through ``dist_checkpointing``.
* Megatron -> ours: a checkpoint written the way Megatron-LM writes it (``dist_checkpointing.save`` of a
  plain GPTModel's ``sharded_state_dict`` under ``model`` + Megatron-LM's common keys + its tracker, or a
  ``release`` tracker, or no tracker) is found and loaded: ``--finetune``, a resume of weights/iteration/
  data position, and the optimizer where its sharded state is Megatron's (a plain run's own checkpoint
  with its ``ppu/`` part removed resumes to the uninterrupted run's losses).
* ``--no-load-optim``, ``--no-load-rng``, ``--use-checkpoint-args`` with Megatron-LM's meanings.

All on one CPU rank (gloo), a 2-layer toy GPT on megatron-core's mock data.
"""
import argparse
import os
import shutil

import pytest
import torch

from tests.harness import run_ranks

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "128", "--eval-iters", "0", "--log-interval", "1",
        "--diloco-local-steps", "0", "--attention-dropout", "0", "--hidden-dropout", "0", "--lr-decay-iters", "10"]
TRACKER = "latest_checkpointed_iteration.txt"


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _megatron_gpt(args):
    """A plain megatron-core GPTModel with Megatron's local layer spec, built from a Megatron-LM
    ``args`` Namespace only (the fields Megatron-LM's ``core_transformer_config_from_args`` and
    ``pretrain_gpt.model_provider`` read for a dense GPT)."""
    # This process builds our trainer's models too (attention backend "local", for which megatron-core
    # sets NVTE_FLASH_ATTN=0 etc. in the environment and checks them at every later model); a Megatron-LM
    # process starts without them, and the stored args carry the run's "auto". So the plain model is built
    # with the variables unset, and they are put back afterwards for the trainer's next model.
    saved = {v: os.environ.pop(v) for v in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
             if v in os.environ}
    try:
        return _plain_gpt(args)
    finally:
        for v in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
            os.environ.pop(v, None)
        os.environ.update(saved)


def _plain_gpt(args):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        gated_linear_unit=args.swiglu, add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        normalization=args.normalization, layernorm_epsilon=args.layernorm_epsilon,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        attention_backend=args.attention_backend, qk_layernorm=args.qk_layernorm,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, params_dtype=args.params_dtype,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)
    spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    return GPTModel(cfg, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                    pre_process=True, post_process=True,
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base)


def _megatron_lm_save(model, folder, *, iteration, release=False, tracker=True, consumed=0, markers=True):
    """Write ``model`` as Megatron-LM's save_checkpoint writes a torch_dist checkpoint of a run with
    --no-save-optim --no-save-rng (``markers``): ``dist_checkpointing.save`` of {model, args,
    checkpoint_version, iteration, num_floating_point_operations_so_far} into iter_NNNNNNN (or release),
    then the tracker."""
    from megatron.core import dist_checkpointing

    name = "release" if release else f"iter_{iteration:07d}"
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, world_size=1,
                              data_parallel_size=1, global_batch_size=2, consumed_train_samples=consumed,
                              consumed_valid_samples=0, no_save_optim=True if markers else None,
                              no_save_rng=True if markers else None, ckpt_format="torch_dist")
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0,
                             "iteration": iteration, "num_floating_point_operations_so_far": 0},
                            os.path.join(folder, name))
    if tracker:
        with open(os.path.join(folder, TRACKER), "w") as f:
            f.write("release" if release else str(iteration))


def _both_ways_worker(rank, world_size, tmp):
    from megatron.core import dist_checkpointing

    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.checkpointing import CheckpointError
    from megatron_ppu.training.loop import run

    out = {}
    d1 = os.path.join(tmp, "ours")
    t = run(BASE + ["--lr", "1e-2", "--train-iters", "2", "--save", d1])
    ours = _weights(t.model)
    out["gbs"], out["padded_vocab"] = t.global_batch_size, t.vocab_size
    first = os.path.join(d1, "iter_0000002")
    # megatron-core before 0.19 writes the shared state to common.pt; 0.19 into the .distcp files,
    # read back by its own load_common_state_dict
    common = (torch.load(os.path.join(first, "common.pt"), map_location="cpu", weights_only=False)
              if os.path.isfile(os.path.join(first, "common.pt")) else dist_checkpointing.load_common_state_dict(first))
    a = common["args"]
    out["common"] = {"keys": sorted(common), "args_type": type(a).__name__, "iteration": common["iteration"],
                     "checkpoint_version": common["checkpoint_version"],
                     "flops": common["num_floating_point_operations_so_far"],
                     "consumed": a.consumed_train_samples, "tp": a.tensor_model_parallel_size,
                     "pp": a.pipeline_model_parallel_size, "num_layers": a.num_layers, "hidden": a.hidden_size,
                     "padded_vocab": a.padded_vocab_size, "no_save_optim": a.no_save_optim,
                     "no_save_rng": a.no_save_rng, "adam_beta2": a.adam_beta2,
                     # a Megatron-LM default of a flag megatron_ppu does not have
                     "exit_on_missing_checkpoint": a.exit_on_missing_checkpoint}
    out["sched"] = common.get("opt_param_scheduler")

    # (1) ours -> a plain Megatron GPTModel built from the stored args alone
    plain = _megatron_gpt(a)
    loaded = dist_checkpointing.load({"model": plain.sharded_state_dict()}, os.path.join(d1, "iter_0000002"))
    plain.load_state_dict(loaded["model"])
    pw = _weights(plain)
    out["plain_keys_equal"] = sorted(pw) == sorted(ours)
    out["plain_equal"] = all(torch.equal(pw[k], ours[k]) for k in ours if k in pw)
    fresh = _weights(_megatron_gpt(a))
    out["trained_differs_from_init"] = any(not torch.equal(fresh[k], ours[k]) for k in ours)

    # (2)+(3) Megatron-LM layout -> ours, exactly
    d2 = os.path.join(tmp, "mlm")
    _megatron_lm_save(plain, d2, iteration=7, consumed=14)
    t = run(BASE + ["--lr", "0", "--train-iters", "1", "--load", d2, "--finetune"])
    w = _weights(t.model)
    out["finetune_equal"] = sorted(w) == sorted(ours) and all(torch.equal(w[k], ours[k]) for k in ours)
    t = run(BASE + ["--lr", "1e-2", "--train-iters", "7", "--load", d2])  # nothing left to train
    w = _weights(t.model)
    out["resume"] = {"iteration": t.iteration, "consumed": t.batches.consumed_samples,
                     "equal": all(torch.equal(w[k], ours[k]) for k in ours)}
    os.remove(os.path.join(d2, TRACKER))  # no tracker: the newest complete iter_* (was: silently ignored)
    t = run(BASE + ["--lr", "0", "--train-iters", "1", "--load", d2, "--finetune"])
    w = _weights(t.model)
    out["no_tracker_finetune_equal"] = all(torch.equal(w[k], ours[k]) for k in ours)
    d3 = os.path.join(tmp, "release")
    _megatron_lm_save(plain, d3, iteration=5, release=True)
    t = run(BASE + ["--lr", "0", "--train-iters", "1", "--load", d3])
    w = _weights(t.model)
    out["release"] = {"iteration": t.iteration, "equal": all(torch.equal(w[k], ours[k]) for k in ours)}
    d5 = os.path.join(tmp, "mlm-full")  # a Megatron-LM checkpoint without the weights-only markers, no optimizer
    _megatron_lm_save(plain, d5, iteration=3, markers=False)
    try:
        run(BASE + ["--lr", "1e-2", "--train-iters", "4", "--load", d5])
        out["no_optim_error"] = None
    except CheckpointError as e:
        out["no_optim_error"] = str(e)
    t = run(BASE + ["--lr", "1e-2", "--train-iters", "3", "--load", d5, "--no-load-optim", "--no-load-rng"])
    out["no_load_optim_mlm_iteration"] = t.iteration

    # the optimizer in Megatron's sharded layout: our plain-run checkpoint without its ppu/ part
    d4 = os.path.join(tmp, "ours-as-mlm")
    shutil.copytree(d1, d4)
    shutil.rmtree(os.path.join(d4, "iter_0000002", "ppu"))
    out["uninterrupted"] = run(BASE + ["--lr", "1e-2", "--train-iters", "4"]).losses
    t = run(BASE + ["--lr", "1e-2", "--train-iters", "4", "--load", d4])
    out["resumed_mlm_layout"] = t.losses

    # --no-load-optim / --no-load-rng on our own checkpoint
    t = run(BASE + ["--lr", "1e-2", "--train-iters", "2", "--load", d1, "--no-load-optim", "--no-load-rng"])
    out["no_load_optim_ours"] = {"iteration": t.iteration, "consumed": t.batches.consumed_samples,
                                 "adam_state_empty": all(not o.optimizer.state
                                                         for o in t.optimizer.chained_optimizers)}

    # --use-checkpoint-args: the architecture from the checkpoint's args
    pa = parse_args(["--load", d1, "--use-checkpoint-args", "--mock-data", "--vocab-size", "128",
                     "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "1"])
    out["ckpt_args"] = {"num_layers": pa.model.num_layers, "hidden_size": pa.model.hidden_size,
                        "num_attention_heads": pa.model.num_attention_heads, "seq_length": pa.model.seq_length,
                        "embedded": pa.embedded_default}
    return out


@pytest.mark.timeout(900)
@pytest.mark.mcore_gate  # Megatron-LM interop: the shared state without common.pt on megatron-core 0.19
def test_checkpoints_both_ways_with_megatron_code(tmp_path):
    (r,) = run_ranks(1, "tests.test_megatron_checkpoints:_both_ways_worker", {"tmp": str(tmp_path)}, timeout=850)
    c, gbs = r["common"], r["gbs"]
    # Megatron-LM's common.pt keys (its generate_state_dict + save_checkpoint)
    assert {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "model"} - set(
        c["keys"]) <= {"model"}, c["keys"]
    assert c["args_type"] == "Namespace" and c["iteration"] == 2 and c["checkpoint_version"] == 3.0
    assert c["consumed"] == 2 * gbs and c["tp"] == 1 and c["pp"] == 1
    assert c["num_layers"] == 2 and c["hidden"] == 64 and c["padded_vocab"] == r["padded_vocab"]
    assert c["adam_beta2"] == 0.999 and c["exit_on_missing_checkpoint"] is False  # Megatron-LM's defaults
    assert c["flops"] > 0
    # a plain run: Megatron's optimizer and scheduler (samples) are in it; no CUDA here: RNG marked absent
    assert c["no_save_optim"] is None and "opt_param_scheduler" in c["keys"]
    assert r["sched"]["num_steps"] == 2 * gbs and r["sched"]["lr_decay_steps"] == 10 * gbs
    assert c["no_save_rng"] is (None if torch.cuda.is_available() else True)
    # (1)
    assert r["trained_differs_from_init"]
    assert r["plain_keys_equal"] and r["plain_equal"]
    # (2) and (3)
    assert r["finetune_equal"]
    assert r["resume"] == {"iteration": 7, "consumed": 14, "equal": True}
    assert r["no_tracker_finetune_equal"]
    assert r["release"]["equal"] and r["release"]["iteration"] == 1  # weights only, from iteration 0
    assert r["no_optim_error"] is not None and "--no-load-optim" in r["no_optim_error"]
    assert r["no_load_optim_mlm_iteration"] == 3
    # Megatron's sharded optimizer state resumes exactly
    assert len(r["uninterrupted"]) == 4 and len(r["resumed_mlm_layout"]) == 2
    assert r["resumed_mlm_layout"] == r["uninterrupted"][2:]
    assert r["no_load_optim_ours"] == {"iteration": 2, "consumed": 2 * gbs, "adam_state_empty": True}
    assert r["ckpt_args"] == {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                              "embedded": False}
