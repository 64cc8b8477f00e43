"""What megatron_ppu does with each of Megatron-LM's training flags: the one table of rules.

Every flag of Megatron-LM's ``pretrain_gpt.py`` parser (the table of the installed megatron-core's
tag in :mod:`megatron_ppu.training.megatron_lm_flags`, generated from Megatron-LM at
``core_v0.16.1`` and ``core_v0.19.0``) is exactly one of:

* **implemented**: a field of one of the dataclasses in :mod:`megatron_ppu.training.arguments`,
  with Megatron-LM's name, meaning and default; the values it cannot take are refused by a
  rule of :data:`VALUE_RULES` (e.g. ``--transformer-impl transformer_engine``);
* **accepted without effect** (:data:`NO_EFFECT`): flags that cannot change what is trained
  here (kernel fusions, checkpoint I/O strategies, profilers, loggers megatron_ppu has no
  backend for, ...). Each one given is logged once at start-up as ``accepted: --flag: <why>``;
* **refused** (:data:`REFUSED` and, for the rest of Megatron-LM's flags, :data:`GROUP_FEATURE`):
  an error that names the feature megatron_ppu does not support, because silently ignoring it
  could change what is trained. A refused flag given with Megatron-LM's own default value (the
  feature off, e.g. ``--context-parallel-size 1``) is accepted: it changes nothing.

Where a rule goes: a flag that depends on its value (or on another flag's) is a
:class:`ValueRule` in :data:`VALUE_RULES`; a flag that is accepted or refused whatever its value
is a row of :data:`NO_EFFECT` or :data:`REFUSED`; an implemented flag is a dataclass field in
``arguments.py`` (and leaves these tables). Rules that relate implemented flags to each other
(``--swiglu`` with ``--squared-relu``, ...) are ``arguments.validate_args``'s.
:func:`verdict` and :func:`field_verdicts` are the only readers; ``tools/flags_table.py docs``
prints the table of ``docs/flags.md`` from them.

A flag that is not Megatron-LM's either is argparse's "unrecognized argument".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .megatron_lm_flags import MEGATRON_LM_FLAGS, TAGS, table


def needs_te(feature: str, fix: Optional[str] = None) -> str:
    """The Transformer Engine refusal, written once: ``feature`` needs Transformer Engine, for
    which megatron_ppu has no partial layers; then the ``fix``."""
    return (f"{feature} needs Transformer Engine, and megatron_ppu's partial (PPU) layers exist only for "
            "megatron-core's local layers" + (f"; {fix}" if fix else ""))


_TE = needs_te("this option")
_FP8 = needs_te("FP8 training", "train in --bf16")
_CP = "context parallelism (--context-parallel-size > 1) is not supported"
_VPP = "virtual pipeline stages (the interleaved 1F1B schedule) are not supported; use plain pipeline parallelism"
_FSDP = ("FSDP / ZeRO-3 sharding is not supported (too chatty for the slow links megatron_ppu targets); use "
         "--use-distributed-optimizer inside a replica")
_MOE = "mixture of experts (MoE) is not supported: megatron_ppu trains dense GPT models"
_MLA = "multi-latent attention (MLA) is not supported"
_FUSION = "a fused kernel (apex/Transformer Engine) choice; megatron_ppu's local layers compute the same thing unfused"
_CKPT_IO = ("a checkpoint I/O strategy of Megatron-LM's own savers; megatron_ppu's checkpoints are written and read "
            "by megatron_ppu.training.checkpointing, and this choice cannot change the weights")
_OFFLOAD = "activation/weight CPU offloading is not supported"
_DSA = "DeepSeek sparse attention (DSA, an experimental attention variant) is not supported"
_MTP = "multi-token prediction (MTP) is not supported"
_MUP = "the maximal update parametrisation (muP) is not supported"
_INFERENCE = "inference and text generation are not part of megatron_ppu's trainer"
_CUDA_GRAPHS = "CUDA graphs are not supported"
_HYBRID = "hybrid (Mamba) models are not supported: megatron_ppu trains GPT models"
_FLIGHT = "the NCCL flight recorder (debugging of hung collectives) is not configured here"
_PROFILE = "the profiler hooks are not implemented (profiling only)"
_NO_RERUN = ("Megatron-LM's rerun state machine (re-running iterations to tell transient from persistent faults) "
             "is not implemented; training proceeds as without it")

#: flag -> why it cannot change what is trained here (accepted, logged once at start-up).
NO_EFFECT: Dict[str, str] = {
    # model construction / kernels
    "--use-mcore-models": "megatron_ppu always builds megatron-core models",
    "--accumulate-allreduce-grads-in-fp32": "gradients are always accumulated and reduced in fp32 here",
    "--use-legacy-models": "megatron_ppu always builds megatron-core models",
    "--use-flash-attn": "as in Megatron-LM (core_v0.16.1), which reads it only for its legacy models: megatron-core "
                        "models take their attention from --attention-backend, whose default auto runs the fused SDPA "
                        "attention (megatron_ppu.attention); refused with --deterministic-mode, as in Megatron-LM",
    "--no-gradient-accumulation-fusion": "gradient-accumulation fusion (apex/TE) is never used here; main_grad "
                                         "accumulation is unfused",
    "--no-masked-softmax-fusion": _FUSION, "--no-bias-gelu-fusion": _FUSION, "--no-bias-swiglu-fusion": _FUSION,
    "--no-bias-dropout-fusion": _FUSION, "--no-rope-fusion": _FUSION, "--no-persist-layer-norm": _FUSION,
    "--cross-entropy-loss-fusion": _FUSION, "--cross-entropy-fusion-impl": _FUSION,
    "--no-async-tensor-model-parallel-allreduce": "deprecated in Megatron-LM; a communication-overlap choice",
    "--defer-embedding-wgrad-compute": "a scheduling optimisation of the embedding weight-gradient GEMM",
    "--wgrad-deferral-limit": "a scheduling optimisation of the embedding weight-gradient GEMM",
    "--test-mode": "Megatron-LM's functional-test hook; no effect on the model",
    # data-parallel communication (same result)
    "--overlap-grad-reduce": "overlapping the inner-DP gradient all-reduce with the backward pass is a performance "
                             "option; the gradients are the same",
    "--overlap-param-gather": "overlapping the distributed optimizer's parameter all-gather is a performance option",
    "--overlap-param-gather-with-optimizer-step": "a performance option of the distributed optimizer",
    "--align-param-gather": "a performance option of the distributed optimizer",
    "--ddp-average-in-collective": "where the inner-DP gradient average is taken (before or in the all-reduce) "
                                   "is a numerical detail of the same mean",
    "--ddp-bucket-size": "gradient bucket sizes change the communication pattern, not the gradients",
    "--ddp-pad-buckets-for-high-nccl-busbw": "gradient bucket padding is a performance option",
    "--disable-gloo-process-groups": "megatron_ppu creates its own process groups",
    "--use-tp-pp-dp-mapping": "megatron_ppu always uses this rank order (tp-cp-ep-pp-dp), so that each replica is "
                              "consecutive ranks (a node)",
    "--expert-model-parallel-size": "no effect without experts (MoE is not supported)",
    "--expert-tensor-parallel-size": "no effect without experts (MoE is not supported)",
    # checkpoint I/O
    "--ckpt-fully-parallel-save": _CKPT_IO, "--no-ckpt-fully-parallel-save": _CKPT_IO,
    "--ckpt-fully-parallel-load": _CKPT_IO, "--ckpt-assume-constant-structure": _CKPT_IO,
    "--use-persistent-ckpt-worker": _CKPT_IO, "--async-save": "checkpoints are written synchronously here",
    "--dist-ckpt-strictness": "megatron_ppu checks a checkpoint against the run itself and refuses a mismatch "
                              "(stricter than any of Megatron-LM's modes)",
    "--dist-ckpt-optim-fully-reshardable": "megatron_ppu saves the inner optimizer state per rank, not in "
                                          "Megatron-LM's sharded optimizer formats",
    "--auto-detect-ckpt-format": "megatron_ppu reads the torch_dist checkpoints it writes",
    "--save-retain-interval": "every checkpoint megatron_ppu saves is kept",
    "--non-persistent-ckpt-type": "non-persistent (local/in-memory) checkpoints are not written here",
    # logging / timing / profiling / monitoring
    "--tensorboard-log-interval": "TensorBoard scalars are written every --log-interval iterations here",
    "--tensorboard-queue-size": "a TensorBoard writer buffer size",
    "--log-straggler": "straggler detection is not implemented (monitoring only)",
    "--profile": "the Nsight/PyTorch profiler hooks are not implemented (profiling only)",
    "--use-pytorch-profiler": "the PyTorch profiler hook is not implemented (profiling only)",
    "--profile-step-start": "the profiler hooks are not implemented (profiling only)",
    "--profile-step-end": "the profiler hooks are not implemented (profiling only)",
    "--profile-ranks": "the profiler hooks are not implemented (profiling only)",
    "--record-memory-history": "CUDA memory-history recording is not implemented (profiling only)",
    "--log-progress": "progress.txt is not written (monitoring only)",
    "--log-energy": "energy monitoring is not implemented",
    "--log-world-size-to-tensorboard": "the world size is in the start-up log line",
    "--log-loss-scale-to-tensorboard": "the loss scale is not logged separately (skipped iterations are)",
    "--no-log-loss-scale-to-tensorboard": "the loss scale is not written to TensorBoard",
    "--no-log-learning-rate-to-tensorboard": "a logging choice (the learning rate is written to TensorBoard)",
    "--barrier-with-L1-time": "a timing choice (timers measure each rank's own time here)",
    "--enable-one-logger": "NVIDIA one-logger telemetry is not implemented", "--no-one-logger": "one-logger is off here",
    "--one-logger-project": "NVIDIA one-logger telemetry is not implemented",
    "--one-logger-run-name": "NVIDIA one-logger telemetry is not implemented",
    "--one-logger-async": "NVIDIA one-logger telemetry is not implemented",
    # process hygiene
    "--manual-gc": "Python's garbage collector stays automatic (memory housekeeping only)",
    "--manual-gc-interval": "Python's garbage collector stays automatic (memory housekeeping only)",
    "--no-manual-gc-eval": "Python's garbage collector stays automatic (memory housekeeping only)",
    "--empty-unused-memory-level": "the CUDA caching allocator is not emptied between phases (memory housekeeping)",
    "--num-workers": "batches are read in the training process (no DataLoader worker processes); the batches "
                     "are the same",
    "--no-create-attention-mask-in-dataloader": "the attention mask is never built in the data loader here "
                                                "(attention applies its causal mask itself)",
    "--rerun-mode": _NO_RERUN, "--error-injection-rate": _NO_RERUN, "--error-injection-type": _NO_RERUN,
    "--check-weight-hash-across-dp-replicas-interval": "a consistency check only (not implemented; DiLoCo replicas "
                                                       "differ between outer syncs by design)",
    "--result-rejected-tracker-filename": _NO_RERUN,
    "--exit-on-missing-checkpoint": "--load that finds no checkpoint follows megatron_ppu's own rules",
    # new at core_v0.19.0
    "--fused-residual-rmsnorm": _FUSION,
    **dict.fromkeys(["--async-ckpt-cpu-priority", "--async-ckpt-io-priority", "--async-ckpt-use-cpu-shm",
                     "--async-strategy", "--ckpt-fully-parallel-load-exchange-algo",
                     "--ckpt-fully-parallel-load-process-group", "--ckpt-fully-parallel-save-process-group",
                     "--dist-ckpt-workers", "--disable-stream-ckpt-dequant", "--no-stream-ckpt-dequant"], _CKPT_IO),
    **dict.fromkeys(["--disable-ckpt-load-validate-sharding-integrity", "--no-ckpt-load-validate-sharding-integrity",
                     "--verify-integrity"],
                    "checkpoint files are not hashed or sharding-validated by Megatron-LM's loader here; megatron_ppu "
                    "checks a checkpoint's completeness and its match with the run itself (the weights are the same)"),
    **dict.fromkeys(["--save-activations-interval", "--save-params-interval", "--save-tokens-per-expert-interval"],
                    "diagnostic dumps (activations, parameters, tokens per expert) are not written here"),
    "--ddp-param-name-patterns-for-fp32-local-accumulation": "gradients are always accumulated and reduced in fp32 "
                                                             "here",
    "--disable-align-grad-reduce": "a performance option of the gradient reduction (the gradients are the same)",
    "--no-use-layer-wise-param-layout": "a memory layout choice of Megatron-LM's parameter buffers (the values are "
                                        "the same)",
    **dict.fromkeys(["--disable-flight-recorder-dump-on-timeout", "--disable-flight-recorder-extra-dump-on-exec",
                     "--disable-flight-recorder-include-only-active", "--flight-recorder-dump-path",
                     "--flight-recorder-include-stack-trace", "--flight-recorder-trace-buffer-size",
                     "--no-flight-recorder-dump-on-timeout", "--no-flight-recorder-extra-dump-on-exec",
                     "--no-flight-recorder-include-only-active"], _FLIGHT),
    "--gpu-sniff-test-interval": "GPU health sniff tests are not run (monitoring only)",
    "--straggler-minmax-count": "straggler detection is not implemented (monitoring only)",
    **dict.fromkeys(["--nvtx-ranges", "--pytorch-profiler-collect-callstack", "--pytorch-profiler-collect-chakra",
                     "--pytorch-profiler-collect-shapes", "--record-shapes"], _PROFILE),
}

#: flag -> the unsupported feature (refused with this reason unless given Megatron-LM's default value).
REFUSED: Dict[str, str] = {
    "--rampup-batch-size": "batch-size ramp-up is not supported: use a constant --global-batch-size",
    "--grad-reduce-in-bf16": "bf16 gradient accumulation/reduction is not implemented: gradients are accumulated "
                             "and reduced in fp32 here",
    "--apply-layernorm-1p": "zero-centred LayerNorm gamma needs Transformer Engine or apex norms; megatron_ppu's "
                            "local layers use torch norms, which megatron-core refuses to zero-centre",
    "--context-parallel-size": _CP, "--cp-comm-type": _CP, "--hierarchical-context-parallel-sizes": _CP,
    "--num-layers-per-virtual-pipeline-stage": _VPP, "--num-virtual-stages-per-pipeline-rank": _VPP,
    "--microbatch-group-size-per-virtual-pipeline-stage": _VPP, "--overlap-p2p-communication-warmup-flush": _VPP,
    "--overlap-p2p-communication": _VPP,
    "--decoder-first-pipeline-num-layers": "uneven pipeline stages are not supported: --num-layers must divide "
                                           "evenly over --pipeline-model-parallel-size",
    "--decoder-last-pipeline-num-layers": "uneven pipeline stages are not supported: --num-layers must divide "
                                          "evenly over --pipeline-model-parallel-size",
    "--account-for-embedding-in-pipeline-split": "uneven pipeline stages are not supported",
    "--account-for-loss-in-pipeline-split": "uneven pipeline stages are not supported",
    "--pipeline-model-parallel-layout": "custom pipeline layouts are not supported",
    "--use-megatron-fsdp": _FSDP, "--use-torch-fsdp2": _FSDP, "--data-parallel-sharding-strategy": _FSDP,
    "--use-custom-fsdp": _FSDP,
    "--num-distributed-optimizer-instances": "several distributed-optimizer instances are not supported "
                                             "(megatron_ppu's replicas are the units between nodes)",
    "--tp-comm-overlap": needs_te("tensor-parallel communication overlap"),
    "--tp-comm-overlap-cfg": needs_te("tensor-parallel communication overlap"),
    "--fp8-format": _FP8, "--fp8-recipe": _FP8, "--fp8-param-gather": _FP8, "--fp8-amax-history-len": _FP8,
    "--fp8-amax-compute-algo": _FP8, "--fp8-margin": _FP8, "--fp8-interval": _FP8, "--fp8-wgrad": _FP8,
    "--no-fp8-wgrad": _FP8, "--fp8-dot-product-attention": _FP8, "--fp8-multi-head-attention": _FP8,
    "--first-last-layers-bf16": _FP8, "--num-layers-at-start-in-bf16": _FP8, "--num-layers-at-end-in-bf16": _FP8,
    "--fp4-format": needs_te("FP4 training", "train in --bf16"), "--fp4-recipe": needs_te("FP4 training", "train in --bf16"),
    "--multi-latent-attention": _MLA, "--q-lora-rank": _MLA, "--kv-lora-rank": _MLA, "--qk-head-dim": _MLA,
    "--qk-pos-emb-head-dim": _MLA, "--v-head-dim": _MLA,
    "--num-experts": _MOE,
    "--fim-data": "fill-in-the-middle (FIM) datasets are not supported",
    "--fim-rate": "fill-in-the-middle (FIM) datasets are not supported",
    "--fim-spm-rate": "fill-in-the-middle (FIM) datasets are not supported",
    "--export-te-mcore-model": "ModelOpt distillation/export (a ModelOpt entry point's flag) is not supported",
    "--export-kd-teacher-load": "ModelOpt knowledge distillation is not supported",
    "--export-kd-cfg": "ModelOpt knowledge distillation is not supported",
    "--ckpt-convert-format": "checkpoint conversion is not supported",
    "--exit-signal-handler": "not implemented yet: use --exit-interval",
    "--train-data-path": "separate train/valid/test data paths are not supported: use --data-path with --split",
    "--valid-data-path": "separate train/valid/test data paths are not supported: use --data-path with --split",
    "--test-data-path": "separate train/valid/test data paths are not supported: use --data-path with --split",
    "--data-args-path": "data paths from a file are not supported: use --data-path",
    "--per-split-data-args-path": "data paths from a file are not supported: use --data-path",
    "--full-validation": "full-validation mode is not supported (use --eval-iters)",
    "--skip-train": "evaluation-only runs are not supported",
    "--heterogeneous-layers-config-path": "heterogeneous architectures are not supported",
    "--yaml-cfg": "YAML configuration files are not supported: pass flags",
    "--init-method-xavier-uniform": "Xavier initialisation is not implemented (the init is normal, --init-method-std)",
    "--quick-geglu": "the quick-GeGLU activation is not implemented (use --swiglu or the default GeLU)",
    "--fp16-lm-cross-entropy": "the fp16 LM cross-entropy is not implemented",
    "--sequence-parallel-cross-entropy": "not implemented",
    "--mtp-num-layers": "multi-token prediction (MTP) is not supported",
    "--cuda-graph-impl": "CUDA graphs are not supported", "--enable-cuda-graph": "CUDA graphs are not supported",
    "--external-cuda-graph": "CUDA graphs are not supported",
    "--cpu-offloading": "activation/weight CPU offloading is not supported",
    "--recompute-activations": "use --recompute-granularity selective (megatron_ppu implements the explicit form)",
    "--use-rotary-position-embeddings": "deprecated in Megatron-LM: use --position-embedding-type rope (megatron_ppu "
                                        "implements the explicit form)",
    # new at core_v0.19.0 (and flags that moved out of a refused group)
    **dict.fromkeys(["--activation-offload-fraction", "--cpu-offloading-retain-pinned-cpu-buffers",
                     "--delay-offload-until-cuda-graph", "--delta-offload-bytes-across-pp-ranks",
                     "--fine-grained-offloading-max-inflight-offloads"], _OFFLOAD),
    **dict.fromkeys(["--disable-dsa-indexer-rotate-activation", "--disable-dsa-indexer-scoring-relu",
                     "--dsa-indexer-k-norm-epsilon", "--dsa-indexer-k-norm-fp32", "--dsa-indexer-rope-interleaved",
                     "--dsa-indexer-skip-topk-offset", "--dsa-indexer-topk-freq", "--dsa-kernel-backend",
                     "--no-dsa-indexer-rotate-activation", "--no-dsa-indexer-scoring-relu", "--dsa-indexer-head-dim",
                     "--dsa-indexer-loss-coeff", "--dsa-indexer-n-heads", "--dsa-indexer-topk",
                     "--experimental-attention-variant"], _DSA),
    **dict.fromkeys(["--expert-tensor-parallel-num-weight-shards", "--high-priority-a2a-comm-stream",
                     "--overlap-dispatch-backward-with-experts-wgrad", "--use-grouped-gemm-for-shared-expert",
                     "--moe-expert-rank-capacity-factor", "--moe-flex-dispatcher-num-sms",
                     "--moe-hybridep-num-blocks-permute", "--moe-hybridep-num-blocks-unpermute",
                     "--moe-hybridep-num-sms-preprocessing", "--moe-hybridep-pad-uneven-dispatch-inputs",
                     "--moe-mlp-glu-interleave-size", "--moe-ncclep-static-shape", "--moe-ncclep-zero-copy",
                     "--moe-paged-stash", "--moe-paged-stash-buffer-size-factor-cpu",
                     "--moe-paged-stash-buffer-size-factor-cuda", "--moe-paged-stash-page-size",
                     "--moe-permute-fusion-into-hybridep", "--moe-router-force-biased",
                     "--moe-router-quantile-balancing-ema", "--moe-shared-expert-glu-interleave-size",
                     "--moe-single-grouped-bias", "--moe-single-grouped-weight",
                     "--moe-routing-trace-capture-hidden-states", "--moe-routing-trace-capture-logits",
                     "--moe-routing-trace-dump-weights", "--moe-routing-trace-max-training-iters",
                     "--moe-routing-trace-path"], _MOE),
    **dict.fromkeys(["--mtp-detach-heads", "--mtp-hybrid-override-pattern", "--mtp-use-repeated-layer"], _MTP),
    **dict.fromkeys(["--use-mup", "--mup-attn-scale-power", "--mup-base-head-dim", "--mup-base-hidden-size",
                     "--mup-embedding-mult", "--mup-output-mult", "--mup-width-mult"], _MUP),
    **dict.fromkeys(["--inference-cuda-graph-scope", "--inference-disable-triton-nvls-kernels",
                     "--inference-grouped-gemm-backend", "--inference-moe-disable-fused-quant-kernels",
                     "--inference-moe-token-dispatcher-type"], _INFERENCE),
    **dict.fromkeys(["--fsdp-db-use-persist-buf-on-alloc-fail", "--megatron-fsdp-enable-fine-grained-param-gather",
                     "--megatron-fsdp-grad-comm-dtype", "--megatron-fsdp-main-grads-dtype",
                     "--megatron-fsdp-main-params-dtype", "--megatron-fsdp-max-pool-double-buffer"], _FSDP),
    **dict.fromkeys(["--hybrid-layer-pattern", "--mamba-training-ssm-states-dtype"], _HYBRID),
    "--fp8-output-proj": _FP8,
    "--use-transformer-engine-op-fuser": needs_te("the Transformer Engine op fuser"),
    "--te-rng-tracker": needs_te("Transformer Engine's RNG tracker"),
    **dict.fromkeys(["--flash-decode", "--inference-fuse-tp-communication", "--inference-rng-tracker"], _INFERENCE),
    "--flash-attention-version": needs_te("a flash-attention version choice"),
    "--use-grouped-gemm-for-dense-mlp": "grouped-GEMM dense MLPs are not implemented (megatron_ppu's partial layers "
                                        "are megatron-core's local linears)",
    "--mlp-chunks-for-training": "MLP chunking along the sequence is not implemented for megatron_ppu's partial layers",
    "--tensor-parallel-num-weight-shards": "sharding tensor-parallel weights further is not supported",
    "--chat-template": "chat templates (supervised fine-tuning data) are not supported",
    **dict.fromkeys(["--disable-pad-vocab-size", "--no-pad-vocab-size"],
                    "an unpadded vocabulary is not implemented: the vocabulary is padded to a multiple of "
                    "--make-vocab-size-divisible-by x TP"),
    **dict.fromkeys(["--disable-tokenizer-sentencepiece-ignore-extra-whitespaces",
                     "--no-tokenizer-sentencepiece-ignore-extra-whitespaces"],
                    "keeping extra whitespace in SentencePiece tokenization is not implemented"),
    **dict.fromkeys(["--null-tokenizer-eod-id", "--null-tokenizer-pad-id"],
                    "NullTokenizer with chosen eod/pad ids is not implemented (the installed megatron-core's "
                    "NullTokenizer ids are used)"),
    "--tokenizer-hf-no-use-fast": "the slow (Python) HuggingFace tokenizer is not implemented",
    "--tokenizer-hf-no-include-special-tokens": "HuggingFace encoding without the tokenizer's special tokens is not "
                                                "implemented",
    "--dataloader-inter-document-masking": "inter-document attention masking is not supported (attention is causal "
                                           "over the whole sequence, as Megatron-LM's default)",
    **dict.fromkeys(["--eval-global-batch-size", "--eval-micro-batch-size"],
                    "a separate evaluation batch size is not implemented: evaluation uses --micro-batch-size and the "
                    "global batch"),
    "--start-eval-at-iter": "delaying evaluation is not implemented: evaluation runs every --eval-interval iterations",
    "--validation-set-names": "named validation sets are not supported: use --data-path with --split",
    "--exit-signal-handler-for-training": "not implemented yet: use --exit-interval or --exit-duration-in-mins",
    "--optimizer-cuda-graph": _CUDA_GRAPHS,
    "--step-batch-size-schedule": "batch-size schedules are not supported: use a constant --global-batch-size",
    "--freeze-all-layers": "freezing layers by flag is not supported (the --ppu-* flags choose what each replica "
                           "trains)",
    **dict.fromkeys(["--lion-beta1", "--lion-beta2"], "the Lion optimizer is not implemented (Adam only)"),
    **dict.fromkeys(["--muon-coefficient-type", "--muon-nesterov", "--muon-scalar-optimizer"],
                    "the Muon optimizer is not implemented (Adam only)"),
    **dict.fromkeys(["--yarn-beta-fast", "--yarn-beta-slow", "--yarn-correction-range-round-to-int",
                     "--no-yarn-correction-range-round-to-int", "--yarn-original-max-position-embeddings"],
                    "YaRN rotary-embedding scaling is not supported"),
    "--override-ckpt-iteration": "overriding the checkpoint's iteration is not supported",
    "--no-use-tokenizer-model-from-checkpoint-args": "not implemented: --use-checkpoint-args takes the tokenizer "
                                                     "model from the checkpoint as Megatron-LM's default does",
}

_GDN = "linear attention (gated delta net) layers are not supported"
REFUSED.update({
    "--apply-wd-to-qk-layernorm": "weight decay on the q/k LayerNorm parameters is not implemented (norms get none, "
                                  "Megatron-LM's default)",
    "--attention-output-gate": "gated attention output is not supported",
    **dict.fromkeys(["--linear-conv-kernel-dim", "--linear-key-head-dim", "--linear-num-key-heads",
                     "--linear-num-value-heads", "--linear-value-head-dim"], _GDN),
    **dict.fromkeys(["--is-hybrid-model", "--hybrid-override-pattern", "--hybrid-attention-ratio", "--hybrid-mlp-ratio",
                     "--mamba-head-dim", "--mamba-num-groups", "--mamba-num-heads", "--mamba-state-dim",
                     "--disable-mamba-mem-eff-path"], _HYBRID),
    **dict.fromkeys(["--mtp-loss-scaling-factor", "--mtp-standalone"], _MTP),
})
#: Every Megatron-LM flag named --moe-* / --muon-* (any tag) not listed above: its feature.
REFUSED.update({f: why for tag in TAGS for f in table(tag) for prefix, why in (
    ("--moe-", _MOE), ("--muon-", "the Muon optimizer is not implemented (Adam only)"))
    if f.startswith(prefix) and f not in NO_EFFECT and f not in REFUSED})

#: Flags of Megatron-LM entry points other than pretrain_gpt.py that its GPT test configurations use
#: (ModelOpt's), with their number of values; refused through :data:`REFUSED`.
EXTRA_FLAGS: Dict[str, object] = {"--export-te-mcore-model": 0, "--export-kd-teacher-load": 1, "--export-kd-cfg": 1}
#: Flags of Megatron-LM's inference entry points (core_v0.19.0: ``megatron/inference/utils.py``
#: ``add_inference_args``, ``examples/inference/offline_inference.py``) that its GPT inference test
#: configurations use, with their number of values; refused (:data:`REFUSED`): not a training run.
INFERENCE_FLAGS: Dict[str, object] = {
    "--async-mode": 0, "--batch-boundaries": 1, "--coordinator-host": 1, "--coordinator-port": 1,
    "--coordinator-schedule-output-path": 1, "--drain-between-batches": 0, "--incoming-requests-duration": 1,
    "--incoming-requests-per-sec": 1, "--incoming-requests-per-step": 1, "--inference-ckpt-non-strict": 0,
    "--inference-repeat-n": 1, "--model-provider": 1, "--moe-routing-trace-max-inference-steps": 1,
    "--no-record-throughput": 0, "--num-tokens-from-file": 0, "--num-tokens-to-generate": 1,
    "--num-tokens-to-prompt": "+", "--output-every-n-results": 1, "--output-path": 1, "--output-request-events": 0,
    "--prompt-file": 1, "--prompt-file-num-truncate": 1, "--prompts": "+", "--return-log-probs": 0,
    "--skip-prompt-log-probs": 0, "--stop-words": "+", "--suspend-resume-interval": 1, "--suspend-timeout": 1,
    "--temperature": 1, "--termination-id": 1, "--throughput-check-only": 0, "--top-n-logprobs": 1, "--top_k": 1,
    "--top_p": 1, "--use-coordinator": 0, "--use-flashinfer-fused-rope": 0,
}
EXTRA_FLAGS.update(INFERENCE_FLAGS)
REFUSED.update({f: _INFERENCE + " (a flag of Megatron-LM's inference entry points)" for f in INFERENCE_FLAGS})

#: Megatron-LM argument group -> the unsupported feature, for Megatron-LM flags not listed above.
GROUP_FEATURE: Dict[str, str] = {
    "moe": _MOE, "mla": _MLA, "vision": "vision models are not supported", "biencoder": "biencoder / retrieval "
    "models are not supported", "rl": "reinforcement learning (Megatron-RL) is not supported", "inference":
    "inference and text generation are not part of megatron_ppu's trainer", "sft": "supervised fine-tuning datasets "
    "are not supported", "Transformer-Engine": _TE, "heterogeneous architecture": "heterogeneous architectures are "
    "not supported", "experimental_attention_variant": "experimental attention variants are not supported",
    "kitchen": "Kitchen quantization is not supported", "msc": "the multi-storage client is not supported",
    "fault injector": "fault injection (testing Megatron-LM's fault tolerance) is not supported",
    "Logits Distillation": "knowledge distillation from saved logits is not supported",
    "In-process restart": "in-process restart (nvidia-resiliency-ext) is not supported", "ft_package":
    "fault-tolerance packages (nvidia-resiliency-ext) are not supported",
}


_KEEP = object()


@dataclass(frozen=True)
class ValueRule:
    """A verdict on one flag's value: when ``applies(value, values)`` is true, the flag is
    ``verdict`` ("accepted" or "refused") with the reason ``why`` (the feature, and the fix).

    ``value`` is the parsed value for an implemented flag (a field), the argv string (or list of
    strings, or True for a value-less flag) otherwise; ``values`` are all parsed fields by dest.
    An accepted rule may change the field to ``set_to`` (a flag that has no effect in this
    combination, dropped as Megatron-LM drops it). The first rule of a flag that applies decides."""

    flag: str
    applies: Callable[[object, dict], bool]
    verdict: str
    why: str
    set_to: object = _KEEP


#: The value rules, one entry per (flag, condition). A new value-dependent verdict goes here.
VALUE_RULES: List[ValueRule] = [
    ValueRule("--transformer-impl", lambda v, _: v != "local", "refused",
              needs_te("Transformer Engine's layers (--transformer-impl transformer_engine)",
                       "use --transformer-impl local (the same model, unfused kernels)")),
    ValueRule("--fp8-format", lambda v, _: v is not None, "refused", _FP8),
    ValueRule("--sequence-parallel", lambda v, vals: bool(v) and vals["tensor_model_parallel_size"] == 1, "accepted",
              "no effect with --tensor-model-parallel-size 1 (Megatron-LM disables it too)", set_to=False),
    ValueRule("--ckpt-format", lambda v, _: v == "torch_dist", "accepted",
              "megatron_ppu writes torch_dist checkpoints (dist_checkpointing) + its own ppu/ part"),
    ValueRule("--ckpt-format", lambda v, _: True, "refused",
              "checkpoint format {value!r} is not supported: megatron_ppu writes torch_dist checkpoints (use "
              "--ckpt-format torch_dist)"),
]


def value_verdict(flag: str, value, values: Optional[dict] = None) -> Optional[Tuple[str, str, object]]:
    """``(verdict, why, set_to)`` of the first rule of :data:`VALUE_RULES` for ``flag`` that
    applies to ``value``, or None."""
    for r in VALUE_RULES:
        if r.flag == flag and r.applies(value, values or {}):
            return r.verdict, r.why.format(value=value), r.set_to
    return None


def field_verdicts(values: dict, dest_of: Dict[str, str]) -> Tuple[List[tuple], List[tuple]]:
    """The value rules on implemented flags: ``(accepted, refused)`` lists of (flag, value, why).
    ``values`` are the parsed fields by dest (changed in place where an accepted rule says so),
    ``dest_of`` maps a flag to its dest."""
    accepted, refused = [], []
    for flag in dict.fromkeys(r.flag for r in VALUE_RULES):
        dest = dest_of.get(flag)
        if dest is None or dest not in values:
            continue  # not an implemented flag: verdict() decides when it is given
        got = value_verdict(flag, values[dest], values)
        if got is None:
            continue
        kind, why, set_to = got
        (accepted if kind == "accepted" else refused).append((flag, values[dest], why))
        if set_to is not _KEEP:
            values[dest] = set_to
    return accepted, refused


def _same_as_default(flag: str, value, table: Dict[str, tuple]) -> bool:
    """Whether ``value`` (strings from argv) is Megatron-LM's default for ``flag`` (a value flag)."""
    default = table[flag][3]
    if default is None or isinstance(value, bool):
        return False
    vals = value if isinstance(value, list) else [value]
    defs = default if isinstance(default, list) else [default]
    if len(vals) != len(defs):
        return False
    for v, d in zip(vals, defs):
        if isinstance(d, bool):
            return False
        if isinstance(d, (int, float)):
            try:
                if float(v) != float(d):
                    return False
            except ValueError:
                return False
        elif str(v) != str(d):
            return False
    return True


def verdict(flag: str, value, table: Optional[Dict[str, tuple]] = None) -> Tuple[str, str]:
    """``("accepted" | "refused", reason)`` for a Megatron-LM flag that is not an implemented field.

    ``value`` is what argparse stored: True for a value-less flag, else the string (or list of
    strings) given. ``table``: the Megatron-LM flag table (default: the installed version's).
    """
    table = MEGATRON_LM_FLAGS if table is None else table
    rule = value_verdict(flag, value)
    if rule is not None:
        return rule[0], rule[1]
    nargs = table.get(flag, (None, None, 0, None))[2]
    if nargs != 0 and flag in table and _same_as_default(flag, value, table):
        return "accepted", f"{value} is Megatron-LM's default (the feature is off)"
    if flag in NO_EFFECT:
        return "accepted", NO_EFFECT[flag]
    if flag in REFUSED:
        return "refused", REFUSED[flag]
    group = table[flag][1] if flag in table else None
    if group in GROUP_FEATURE:
        return "refused", GROUP_FEATURE[group]
    return "refused", (f"not implemented by megatron_ppu (Megatron-LM's {group!r} options); refused rather than "
                       "ignored because it could change what is trained")
