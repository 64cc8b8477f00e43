"""Megatron-LM's flag groups as settings dataclasses: ``ModelArgs``, ``TrainingArgs``,
``PrecisionArgs``, ``ParallelArgs``, ``DataArgs``, ``CheckpointArgs``.

Each field is one flag of Megatron-LM's parser (the field name with dashes), with Megatron-LM's
default and meaning; its ``metadata`` holds the help text (and optionally ``choices`` or the
``--no-...`` spelling in ``flag``). :mod:`megatron_ppu.training.arguments` builds the parser from
these groups and megatron_ppu's feature configs, parses and validates; it re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


def _f(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelArgs:
    """GPT architecture (Megatron-LM names and meanings)."""

    num_layers: Optional[int] = _f(None, "Number of transformer layers (required; embedded default: 4).")
    hidden_size: Optional[int] = _f(None, "Transformer hidden size (required; embedded default: 128).")
    ffn_hidden_size: Optional[int] = _f(None, "MLP hidden size; default 4 x hidden size, with --swiglu "
                                              "int(8 x hidden / 3 / 64) x 64 (as Megatron-LM).")
    num_attention_heads: Optional[int] = _f(None, "Number of attention heads (required; embedded default: 4).")
    group_query_attention: bool = _f(False, "Use grouped-query attention.")
    num_query_groups: Optional[int] = _f(None, "Number of query groups for GQA.")
    kv_channels: Optional[int] = _f(None, "Projection size per head; default hidden / heads.")
    seq_length: Optional[int] = _f(None, "Sequence length (required; embedded default: 128).")
    max_position_embeddings: Optional[int] = _f(None, "Maximum positions; default --seq-length.")
    position_embedding_type: str = _f("learned_absolute", "Position embedding type.",
                                      choices=["learned_absolute", "rope", "none"])
    rotary_percent: float = _f(1.0, "With --position-embedding-type rope: fraction of each head's channels "
                                    "that are rotated.")
    rotary_base: int = _f(10000, "With rope: base of the rotary frequencies.")
    rotary_interleaved: bool = _f(False, "With rope: rotate interleaved channel pairs instead of halves.")
    swiglu: bool = _f(False, "Use SwiGLU (gated SiLU) MLPs.")
    squared_relu: bool = _f(False, "Use the squared-ReLU activation in the MLPs (not with --swiglu).")
    qk_layernorm: bool = _f(False, "Normalise queries and keys (per head) before the attention scores.")
    apply_query_key_layer_scaling: bool = _f(False, "Scale Q.K^T by 1 / layer number (with the softmax in "
                                                    "fp32); has an effect in fp16 only, as in Megatron-LM.")
    attention_softmax_in_fp32: bool = _f(False, "Compute the attention softmax in fp32 (bf16/fp16 runs).")
    attention_backend: str = _f("auto", "Core attention: auto (Megatron-LM's default), flash and fused run "
                                        "torch's scaled_dot_product_attention (megatron_ppu.attention; on CUDA "
                                        "auto lets torch pick a kernel, flash allows only its flash kernel, fused "
                                        "only its cuDNN / memory-efficient ones); unfused and local run "
                                        "megatron-core's DotProductAttention (S x S scores).",
                                choices=["auto", "unfused", "local", "flash", "fused"])
    transformer_impl: str = _f("local", "Layer implementation: local (megatron-core's own layers; the only one "
                                        "megatron_ppu's partial layers exist for). Megatron-LM's default "
                                        "transformer_engine is refused until the TE partial layers exist.",
                               choices=["local", "transformer_engine", "inference_optimized"])
    deterministic_mode: bool = _f(False, "megatron-core's deterministic mode (TransformerConfig.deterministic_mode).")
    normalization: str = _f("LayerNorm", "Normalization layer.", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _f(1e-5, "Epsilon of the LayerNorm/RMSNorm layers.")
    untie_embeddings_and_output_weights: bool = _f(False, "Untie input embedding and output layer weights.")
    disable_bias_linear: bool = _f(False, "Disable biases in the linear layers.")
    init_method_std: float = _f(0.02, "Standard deviation of the weight initialisation.")
    attention_dropout: float = _f(0.1, "Dropout on attention probabilities.")
    hidden_dropout: float = _f(0.1, "Dropout on the residual stream.")
    make_vocab_size_divisible_by: int = _f(128, "Pad the vocabulary to a multiple of this (x TP).")
    recompute_granularity: Optional[str] = _f(None, "Activation recompute: full layers or the "
                                                    "attention core only.", choices=["full", "selective"])
    recompute_method: Optional[str] = _f(None, "With full recompute: uniform or block.",
                                         choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = _f(None, "With full recompute: layers per recompute unit (uniform) "
                                                   "or recomputed layers per stage (block).")


@dataclass
class TrainingArgs:
    """Optimisation schedule (Megatron-LM names and meanings)."""

    micro_batch_size: Optional[int] = _f(None, "Sequences per micro-batch per rank (required; embedded default: 8).")
    global_batch_size: Optional[int] = _f(None, "Sequences per step over all data-parallel ranks; "
                                                "default micro-batch x DP.")
    train_iters: Optional[int] = _f(None, "Training iterations (this or --train-samples is required; "
                                          "embedded default: 300).")
    train_samples: Optional[int] = _f(None, "Training samples instead of --train-iters: train_samples // "
                                            "global batch iterations, the schedule counted in samples.")
    lr: Optional[float] = _f(None, "Peak learning rate (required; embedded default: 3e-3).")
    min_lr: float = _f(0.0, "Minimum learning rate of the decay.")
    decoupled_lr: Optional[float] = _f(None, "Separate peak learning rate of the input embedding and output "
                                             "layer parameters.")
    decoupled_min_lr: Optional[float] = _f(None, "Separate minimum learning rate of the input embedding and "
                                                 "output layer parameters.")
    lr_decay_style: str = _f("linear", "Learning-rate decay after warm-up (embedded default: cosine).",
                             choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_decay_iters: Optional[int] = _f(None, "Iterations of decay; default --train-iters.")
    lr_decay_samples: Optional[int] = _f(None, "With --train-samples: samples of decay; default --train-samples.")
    lr_wsd_decay_style: str = _f("exponential", "Decay style of the annealing phase of --lr-decay-style WSD.",
                                 choices=["exponential", "linear", "cosine", "minus_sqrt"])
    lr_wsd_decay_iters: Optional[int] = _f(None, "Iterations of the annealing phase of --lr-decay-style WSD "
                                                 "(the last ones of --lr-decay-iters).")
    lr_warmup_iters: int = _f(0, "Linear warm-up iterations (embedded default: 30).")
    lr_warmup_fraction: Optional[float] = _f(None, "Warm-up as a fraction of the decay (--lr-decay-iters or "
                                                   "--lr-decay-samples); instead of --lr-warmup-iters/-samples.")
    lr_warmup_samples: int = _f(0, "With --train-samples: linear warm-up samples.")
    lr_warmup_init: float = _f(0.0, "Learning rate at the start of the warm-up.")
    calculate_per_token_loss: bool = _f(False, "Normalise the loss by the number of loss tokens of the whole step "
                                               "(all micro-batches and inner-DP ranks of a replica) instead of "
                                               "averaging the micro-batches' per-token means.")
    use_checkpoint_opt_param_scheduler: bool = _f(False, "On resume, take the learning-rate schedule from the "
                                                         "checkpoint instead of these flags.",
                                                  flag="--use-checkpoint-opt_param-scheduler")
    override_opt_param_scheduler: bool = _f(False, "On resume, take the learning-rate schedule from these flags "
                                                   "instead of checking them against the checkpoint's.",
                                            flag="--override-opt_param-scheduler")
    weight_decay: float = _f(0.01, "AdamW weight decay (embedded default: 0.1).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2 (embedded default: 0.99, as in the paper).")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    clip_grad: float = _f(1.0, "Gradient clipping by global norm over the trainable set (0 = off).")
    seed: int = _f(1234, "Random seed (> 0); pipeline stage p uses seed + 100 p, as in Megatron-LM.")


@dataclass
class PrecisionArgs:
    """Numeric precision."""

    bf16: bool = _f(False, "Train in bfloat16 with fp32 master weights.")
    fp16: bool = _f(False, "Train in float16 with fp32 master weights and loss scaling.")
    fp8_format: Optional[str] = _f(None, "FP8 format (needs Transformer Engine partial layers).",
                                   choices=["e4m3", "hybrid"])


@dataclass
class ParallelArgs:
    """Model parallelism inside a replica."""

    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size.")
    sequence_parallel: bool = _f(False, "Sequence parallelism (with TP 1 it has no effect and is dropped with a "
                                        "log line, as in Megatron-LM).")
    use_distributed_optimizer: bool = _f(False, "Shard the inner optimizer state over the inner-DP ranks.")
    distributed_backend: str = _f(
        "nccl", "Megatron-LM's flag: nccl (default) = CUDA tensors over NCCL, host tensors over gloo in every "
                "group (backend 'cpu:gloo,cuda:nccl'); gloo = everything over gloo (CUDA tensors staged through the "
                "host), which lets several ranks share one GPU (rank r uses GPU LOCAL_RANK % device count; "
                "scripts/gpu_check.sh). Without CUDA every run uses gloo.", choices=["nccl", "gloo"])
    distributed_timeout_minutes: int = _f(
        10, "Timeout of every process group (Megatron-LM's flag and default). Must exceed the slowest "
            "collective with margin: one outer all-reduce sends 2(K-1)/K x payload bytes per rank, so at "
            "link bandwidth B it takes that / B (tools/estimate.py prints the suggested minimum; README: "
            "'Slow links: timeouts').")


@dataclass
class DataArgs:
    """Data and tokenizer. Without --data-path and --mock-data, the embedded corpus is used."""

    data_path: Optional[List[str]] = _f(None, "Megatron data prefixes, optionally weighted: "
                                              "'w1 prefix1 w2 prefix2 ...' or 'prefix'.", nargs="+")
    split: str = _f("969,30,1", "Train/valid/test split of --data-path.")
    # Tokenizer flags: Megatron-LM's names and defaults (megatron_ppu.data.tokenizers builds them).
    tokenizer_type: Optional[str] = _f(None, "Tokenizer (GPT2BPETokenizer, HuggingFaceTokenizer, "
                                       "TikTokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer, "
                                       "NullTokenizer; Megatron-LM's others are refused by name).",
                                       choices=["BertWordPieceLowerCase", "BertWordPieceCase",
                                                "GPT2BPETokenizer", "SentencePieceTokenizer",
                                                "GPTSentencePieceTokenizer", "HuggingFaceTokenizer",
                                                "Llama2Tokenizer", "TikTokenizer", "MultimodalTokenizer",
                                                "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer"])
    tokenizer_model: Optional[str] = _f(None, "SentencePiece .model, tiktoken JSON vocabulary, or a local "
                                              "HuggingFace tokenizer folder / tokenizer.json.")
    vocab_size: Optional[int] = _f(None, "Vocabulary size (NullTokenizer; TikTokenizer).")
    vocab_file: Optional[str] = _f(None, "GPT2BPETokenizer: vocab.json.")
    merge_file: Optional[str] = _f(None, "GPT2BPETokenizer: merges.txt.")
    legacy_tokenizer: bool = _f(False, "Megatron-LM's legacy tokenizer ids instead of megatron-core's.")
    vocab_extra_ids: int = _f(0, "--legacy-tokenizer SentencePieceTokenizer: append <extra_id_0..N-1>.")
    tokenizer_special_tokens: Optional[List[str]] = _f(None, "Special tokens (TikTokenizer; HuggingFace; "
                                                             "SentencePiece with --tokenizer-sentencepiece-legacy).")
    tiktoken_pattern: Optional[str] = _f(None, "TikTokenizer pattern v1 or v2 (default v2).", choices=["v1", "v2"])
    tiktoken_num_special_tokens: int = _f(1000, "TikTokenizer: ids reserved for special tokens.")
    tokenizer_sentencepiece_legacy: bool = _f(False, "megatron-core SentencePiece wrapper's legacy mode.")
    tokenizer_hf_use_fast: bool = _f(False, "HuggingFace: use the fast tokenizer.")
    tokenizer_hf_include_special_tokens: bool = _f(False, "HuggingFace: encode with BOS/EOS as the tokenizer adds them.")
    trust_remote_code: bool = _f(False, "HuggingFace: allow code shipped in the local tokenizer folder.")
    tokenizer_metadata: Optional[str] = _f(None, "Refused with a reason (the tokenizer is chosen by --tokenizer-type).")
    tiktoken_special_tokens: Optional[List[str]] = _f(None, "Refused with a reason (Megatron-LM never reads it).")
    mock_data: bool = _f(False, "Use Megatron's mock GPT dataset (random tokens).")
    data_cache_path: Optional[str] = _f(None, "Where dataset index caches (and the embedded corpus) are built.")
    mmap_bin_files: bool = _f(True, "Read the .bin files through a memory map; --no-mmap-bin-files reads them "
                                    "with file reads instead.", flag="--no-mmap-bin-files")


@dataclass
class CheckpointArgs:
    """Checkpointing, evaluation and logging."""

    save: Optional[str] = _f(None, "Directory to save checkpoints to.")
    load: Optional[str] = _f(None, "Directory to load the latest checkpoint from.")
    save_interval: Optional[int] = _f(None, "Save every N iterations (and at the end).")
    eval_interval: Optional[int] = _f(None, "Evaluate on the validation split every N iterations; always at the "
                                            "end (embedded default: 100).")
    eval_iters: int = _f(100, "Validation iterations per evaluation, each of num_microbatches micro-batches per "
                              "rank as in Megatron-LM (every replica evaluates the same samples); 0 = no "
                              "evaluation (embedded default: 10).")
    log_interval: int = _f(100, "Log every N iterations (embedded default: 10).")
    log_params_norm: bool = _f(False, "Log the L2 norm of the parameters (this replica's model) each log line.")
    log_num_zeros_in_grad: bool = _f(False, "Log the number of zero entries in the gradients of the trainable set.")
    log_throughput: bool = _f(False, "Log model TFLOP/s per rank (Megatron-LM's FLOPs formula for dense GPT).")
    log_timers_to_tensorboard: bool = _f(False, "Write the per-phase timers (--timing-log-level) to TensorBoard.")
    log_memory_to_tensorboard: bool = _f(False, "Write memory use to TensorBoard (CUDA allocator; on CPU the "
                                                "process's peak resident set).")
    log_validation_ppl_to_tensorboard: bool = _f(False, "Write the validation perplexity to TensorBoard as "
                                                        "'lm loss validation ppl'.")
    timing_log_level: int = _f(0, "Timers: 0 = forward-backward, optimizer and outer sync of each iteration; "
                                  "1 and 2 add evaluation and checkpoint saving.", choices=[0, 1, 2])
    exit_interval: Optional[int] = _f(None, "Exit after the iteration that is a multiple of N.")
    exit_duration_in_mins: Optional[float] = _f(None, "Exit (saving first with --save) after the first iteration "
                                                     "that ends more than this many minutes after start-up.")
    tensorboard_dir: Optional[str] = _f(None, "Write TensorBoard scalars here.")
    wandb_project: Optional[str] = _f(None, "Log to Weights & Biases in this project (the last rank; the same "
                                            "scalars as TensorBoard; needs pip install -e .[wandb]; "
                                            "WANDB_MODE=offline for no network).")
    wandb_exp_name: Optional[str] = _f(None, "The W&B run's name (default: one W&B chooses).")
    wandb_save_dir: Optional[str] = _f(None, "Where the W&B run's files go (default: <--save>/wandb).")
    wandb_entity: Optional[str] = _f(None, "The W&B entity (team or user) of --wandb-project.")
    finetune: bool = _f(False, "With --load: load only the model weights (any layout/plan), start at "
                               "iteration 0 with fresh optimizer, DiLoCo and data state.")
    no_load_optim: Optional[bool] = _f(None, "With --load: do not load the optimizer state and learning-rate schedule "
                                    "(the inner optimizer, DiLoCo snapshot and outer momentum start fresh from the "
                                    "loaded weights); weights, iteration and data position are resumed.")
    no_load_rng: Optional[bool] = _f(None, "With --load: do not restore the random-number generator states.")
    use_checkpoint_args: bool = _f(False, "Take the model architecture (and tokenizer) flags from the args stored "
                                          "in the --load checkpoint, as Megatron-LM's load_args_from_checkpoint "
                                          "does (model sizes where not given, the others always).")
