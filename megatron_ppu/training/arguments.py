"""Command-line arguments with Megatron-LM's flag names, generated from dataclasses.

Each group of settings is one dataclass; a field's ``metadata`` holds its help text
(and optionally choices), and the flag is the field name with dashes. Booleans are
``store_true`` flags (``store_false`` for a field whose default is True, with Megatron-LM's
``--no-...`` spelling in the field's ``flag`` metadata), as in Megatron-LM. megatron_ppu's
own features are the dataclasses of :mod:`megatron_ppu.config` (``PPUConfig``,
``DiLoCoConfig``, ``SubnetConfig``), used as they are: their fields are the flags
``--ppu-*``, ``--diloco-*``, ``--subnet-*`` (:func:`megatron_ppu.config.cli_fields`) and their
defaults are the only ones. Every flag's ``--help`` shows its default.

Every other flag of Megatron-LM's parser is recognised too (:mod:`.megatron_compat`): accepted
when it cannot change what is trained (each logged once at start-up with the reason) or
refused with the feature it needs, all offending flags in one ``ValueError``. A flag that is
neither megatron_ppu's nor Megatron-LM's is "unrecognized". A Megatron-LM flag that
megatron_ppu does not implement is never silently ignored.

The defaults are Megatron-LM's. The values marked "(embedded default)" in the help texts
(:data:`EMBEDDED_DEFAULT`) apply only to the embedded default run: no data flag and no model
flag given (``python pretrain_gpt_ppu.py --ppu-slices 2`` trains a small GPT on the embedded
English corpus, a few minutes on 2 CPU cores); any run given data or model flags gets
Megatron-LM's defaults and must pass what Megatron-LM requires (:data:`REQUIRED`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, get_args, get_origin

from ..config import (
    FEATURES,
    DiLoCoConfig,
    FaultToleranceConfig,
    PPUConfig,
    SubnetConfig,
    check_block_balance,
    check_replicas_divide_data_parallel,
    check_slices_divide_replicas,
    cli_fields,
    field_flag,  # noqa: F401 (re-exported: the flag of a settings field)
    validate_diloco_config,
    validate_fault_tolerance_config,
    validate_ppu_config,
    validate_subnet_config,
)
from .megatron_compat import EXTRA_FLAGS, REFUSED, verdict
from .megatron_lm_flags import MEGATRON_LM_FLAGS, MEGATRON_LM_TAG


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
    attention_backend: str = _f("auto", "Attention implementation: auto, unfused and local all mean "
                                        "megatron-core's local DotProductAttention here; flash and fused need "
                                        "Transformer Engine and are refused.",
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
    finetune: bool = _f(False, "With --load: load only the model weights (any layout/plan), start at "
                               "iteration 0 with fresh optimizer, DiLoCo and data state.")
    no_load_optim: Optional[bool] = _f(None, "With --load: do not load the optimizer state and learning-rate schedule "
                                    "(the inner optimizer, DiLoCo snapshot and outer momentum start fresh from the "
                                    "loaded weights); weights, iteration and data position are resumed.")
    no_load_rng: Optional[bool] = _f(None, "With --load: do not restore the random-number generator states.")
    use_checkpoint_args: bool = _f(False, "Take the model architecture (and tokenizer) flags from the args stored "
                                          "in the --load checkpoint, as Megatron-LM's load_args_from_checkpoint "
                                          "does (model sizes where not given, the others always).")


#: Megatron-LM's flag groups (their fields are the flags, no prefix).
MEGATRON_GROUPS = [ModelArgs, TrainingArgs, PrecisionArgs, ParallelArgs, DataArgs, CheckpointArgs]
#: Every settings dataclass, in the order of ``--help``: Megatron-LM's groups, then megatron_ppu's features.
GROUPS = MEGATRON_GROUPS + FEATURES
#: The attribute of :class:`TrainArgs` holding each group.
GROUP_ATTR = dict(zip(GROUPS, ("model", "training", "precision", "parallel", "data", "checkpoint",
                               "ppu", "diloco", "subnet", "fault_tolerance")))


@dataclass
class TrainArgs:
    """All settings of one training run: Megatron-LM's groups and megatron_ppu's feature configs."""

    model: ModelArgs
    training: TrainingArgs
    precision: PrecisionArgs
    parallel: ParallelArgs
    data: DataArgs
    checkpoint: CheckpointArgs
    ppu: PPUConfig
    diloco: DiLoCoConfig
    subnet: SubnetConfig
    explicit_flags: frozenset = frozenset()
    #: Megatron-LM flags given that have no effect here: (flag, value, why), logged once at start-up.
    accepted: tuple = ()
    #: Whether the embedded default run's values (:data:`EMBEDDED_DEFAULT`) were applied.
    embedded_default: bool = False
    #: Values of options a caller's parser added (``build_parser(extra=...)``): dest -> value.
    extra: dict = field(default_factory=dict)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)

    @property
    def uses_replicas(self) -> bool:
        """Whether DP ranks form replicas (DiLoCo outer loop or per-step SDP) rather than plain DDP."""
        return self.diloco.local_steps > 0 or self.subnet.sync == "step"

    def flag_values(self, group) -> Dict[str, object]:
        """``dest -> value`` of the flags of ``group`` (a settings dataclass instance), as the
        command line gives them (``--ppu-detach-frozen-jacobian``: True/False): the names
        Megatron-LM-style checkpoint args store."""
        out = {}
        for f, _, dest in cli_fields(type(group)):
            v = getattr(group, f.name)
            out[dest] = (v == f.metadata["const"]) if "const" in f.metadata else v
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ffn_hidden_size(m: ModelArgs) -> int:
    """Megatron-LM's default MLP width (validate_args): 4h, with SwiGLU int(8h/3 / 64) x 64."""
    return m.ffn_hidden_size or (int((4 * m.hidden_size * 2 / 3) / 64) * 64 if m.swiglu else 4 * m.hidden_size)


def _base_type(tp):
    if get_origin(tp) is not None:
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (list, List):
            return list
        return _base_type(args[0])
    return tp


#: The embedded default run, a named configuration in the style of torchtitan's: a small GPT on
#: the embedded English corpus (a few minutes on 2 CPU cores). It applies only when no data flag
#: (:data:`DATA_FLAGS`) and no model flag (an architecture field of :class:`ModelArgs`, i.e. not one
#: of :data:`IMPLEMENTATION_FLAGS`) is given, and then only
#: to the flags not given; any run given data or model flags gets Megatron-LM's defaults (and
#: must give the flags Megatron-LM requires, :data:`REQUIRED`).
EMBEDDED_DEFAULT = {
    "num_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 128, "micro_batch_size": 8,
    "train_iters": 300, "lr": 3e-3, "lr_decay_style": "cosine", "lr_warmup_iters": 30, "weight_decay": 0.1,
    "adam_beta2": 0.99, "eval_iters": 10, "eval_interval": 100, "log_interval": 10,
}
#: Flags that choose the training data (their presence ends the embedded default run).
DATA_FLAGS = ("data_path", "mock_data")
#: Fields of :class:`ModelArgs` that choose an implementation, not the architecture: they do not end
#: the embedded default run.
IMPLEMENTATION_FLAGS = ("transformer_impl", "attention_backend", "deterministic_mode", "recompute_granularity",
                        "recompute_method", "recompute_num_layers")
#: Flags Megatron-LM has no default for (outside the embedded default run).
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "lr")

_UNSET = object()
_MEGATRON_DEST = "megatron_lm_flag:"


def implemented_flags() -> dict:
    """flag -> help text for every flag that is a field of the settings dataclasses."""
    return {flag: f.metadata["help"] for cls in GROUPS for f, flag, _ in cli_fields(cls)}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every flag's default (argparse's ``(default: ...)``) and the description as written."""


#: The trainer's parser's settings (``build_parser``'s defaults).
TRAINER_PROG = "pretrain_gpt_ppu.py"
TRAINER_DESCRIPTION = "Megatron-Core GPT pre-training with DiLoCo and Partial Parameter Updates."


def build_parser(prog: str = TRAINER_PROG, description: str = TRAINER_DESCRIPTION) -> argparse.ArgumentParser:
    """argparse parser with one flag per settings field, plus every other Megatron-LM flag
    (hidden, collected so that each is accepted or refused by name, never "unrecognized").

    Another CLI (``tools/estimate.py``) takes this parser and adds its own options to it; their
    values come back in :attr:`TrainArgs.extra` from :func:`parse_args`."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter,
        epilog=f"Every other Megatron-LM ({MEGATRON_LM_TAG}) flag is recognised: accepted when it cannot change "
               "what is trained (logged at start-up) or refused with the feature it needs; see docs/flags.md.",
        allow_abbrev=False,
    )
    for cls in GROUPS:
        g = p.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        hints = typing.get_type_hints(cls)
        for f, flag, dest in cli_fields(cls):
            tp = _base_type(hints[f.name])
            kw = {"dest": dest, "help": f.metadata["help"].replace("%", "%%"), "default": f.default}
            if "const" in f.metadata:
                g.add_argument(flag, action="store_const", const=f.metadata["const"], **kw)
                continue
            if tp is bool:
                g.add_argument(flag, action="store_false" if f.default else "store_true", **kw)
                continue
            if tp is list:
                kw["nargs"] = f.metadata.get("nargs", "+")
                kw["type"] = str
            else:
                kw["type"] = tp
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            g.add_argument(flag, **kw)
    known = set(p._option_string_actions)
    arity = dict({f: v[2] for f, v in MEGATRON_LM_FLAGS.items()}, **EXTRA_FLAGS)
    for flag, nargs in arity.items():
        if flag in known:
            continue
        kw = {"dest": _MEGATRON_DEST + flag, "default": _UNSET, "help": argparse.SUPPRESS}
        if nargs == 0:
            p.add_argument(flag, action="store_const", const=True, **kw)
        else:
            p.add_argument(flag, nargs=None if nargs == 1 else nargs, type=str, **kw)
    return p


def _field_value_refusals(values: dict) -> List[tuple]:
    """(flag, value, why) for implemented flags given a value megatron_ppu cannot honour."""
    out = []
    if values["transformer_impl"] != "local":
        out.append(("--transformer-impl", values["transformer_impl"],
                    "Transformer Engine layers: megatron_ppu's partial (PPU) layers exist only for megatron-core's "
                    "local layers (--transformer-impl local: the same model, unfused kernels)"))
    if values.get("fp8_format") is not None:
        out.append(("--fp8-format", values["fp8_format"], REFUSED["--fp8-format"]))
    if values["attention_backend"] in ("flash", "fused"):
        out.append(("--attention-backend", values["attention_backend"],
                    "flash/fused attention needs Transformer Engine; use --attention-backend unfused (or auto), "
                    "megatron-core's local DotProductAttention"))
    return out


def _world_size_from_env() -> Optional[int]:
    """``WORLD_SIZE`` of a torchrun / local-ranks launch (Megatron-LM's validate_args reads it
    too); None when not launched as ranks."""
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w else None


def parse_args(argv: Optional[Sequence[str]] = None, *, parser: Optional[argparse.ArgumentParser] = None,
               world_size: Optional[int] = None) -> TrainArgs:
    """Parse ``argv`` with the trainer's parser (or ``parser``, one made by :func:`build_parser`
    with a caller's options added); raise ``ValueError`` for unknown flags and inconsistent values.

    ``world_size``: the number of ranks the run will have (default: ``WORLD_SIZE`` when set);
    with it every setting is validated here, including the rules that need the replica count;
    without it those wait for :func:`check_layout` at build time."""
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, unknown = parser.parse_known_args(argv)
    values = vars(ns)
    accepted, refused = [], []
    for dest in [k for k in values if k.startswith(_MEGATRON_DEST)]:
        v = values.pop(dest)
        if v is _UNSET:
            continue
        flag = dest[len(_MEGATRON_DEST):]
        kind, why = verdict(flag, v)
        (accepted if kind == "accepted" else refused).append((flag, v, why))
    refused += _field_value_refusals(values)
    problems = []
    if refused:
        problems.append("unsupported Megatron-LM feature(s), refused rather than ignored (ignoring them could "
                        "change what is trained):\n" + "\n".join(
                            f"  {f}{'' if v is True else ' ' + (' '.join(v) if isinstance(v, list) else str(v))}: {w}"
                            for f, v, w in sorted(refused)))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        problems.append(f"unrecognized argument(s) {' '.join(flags)}: neither a megatron_ppu flag nor one of "
                        f"Megatron-LM's ({MEGATRON_LM_TAG}) (see `python pretrain_gpt_ppu.py --help`).")
    if problems:
        raise ValueError("\n".join(problems) + "\nSee docs/flags.md for what megatron_ppu does with every "
                                                "Megatron-LM flag.")
    dest_of = {o: a.dest for o, a in parser._option_string_actions.items()}
    explicit = frozenset(dest_of.get(a.split("=")[0], a.split("=")[0][2:].replace("-", "_"))
                         for a in argv if a.startswith("--"))
    if values["use_checkpoint_args"]:
        if not values["load"]:
            raise ValueError("--use-checkpoint-args needs --load DIR (the checkpoint to take the model flags from).")
        from .checkpointing import apply_checkpoint_args

        from_ckpt, desc = apply_checkpoint_args(values, values["load"])
        explicit = explicit | frozenset(from_ckpt)  # the checkpoint's model: not the embedded default run
        accepted.append(("--use-checkpoint-args", True, desc))
    model_fields = {f.name for f in dataclasses.fields(ModelArgs)} - set(IMPLEMENTATION_FLAGS)
    embedded = not (explicit & (set(DATA_FLAGS) | model_fields))
    if embedded:
        for k, v in EMBEDDED_DEFAULT.items():
            if k not in explicit:
                values[k] = v
    if values.get("tokenizer_type") is None and (values.get("vocab_file") or values.get("merge_file")):
        # Megatron-LM's pretrain_gpt.py: args_defaults={'tokenizer_type': 'GPT2BPETokenizer'}
        values["tokenizer_type"] = "GPT2BPETokenizer"
    if values["sequence_parallel"] and values["tensor_model_parallel_size"] == 1:
        # Megatron-LM's validate_args disables it too (with TP = 1 it is the same computation)
        values["sequence_parallel"] = False
        accepted.append(("--sequence-parallel", True, "no effect with --tensor-model-parallel-size 1 "
                                                      "(Megatron-LM disables it too)"))
    groups = {cls: {f.name: values.pop(dest) for f, _, dest in cli_fields(cls)} for cls in GROUPS}
    training = TrainingArgs(**groups[TrainingArgs])
    subnet = SubnetConfig(**groups[SubnetConfig], seed=training.seed)  # the block assignment's seed is --seed
    ppu = PPUConfig(**groups[PPUConfig], mlp_forward_masking=subnet.plan == "neurons")
    args = TrainArgs(model=ModelArgs(**groups[ModelArgs]), training=training,
                     precision=PrecisionArgs(**groups[PrecisionArgs]), parallel=ParallelArgs(**groups[ParallelArgs]),
                     data=DataArgs(**groups[DataArgs]), checkpoint=CheckpointArgs(**groups[CheckpointArgs]),
                     ppu=ppu, diloco=DiLoCoConfig(**groups[DiLoCoConfig]), subnet=subnet,
                     explicit_flags=explicit, accepted=tuple(accepted), embedded_default=embedded,
                     fault_tolerance=FaultToleranceConfig(**groups[FaultToleranceConfig]),
                     extra=values)  # what is left: the options a caller's parser added
    validate_args(args, world_size=world_size if world_size is not None else _world_size_from_env())
    return args


_GROUP_OF = {f.name: GROUP_ATTR[cls] for cls in MEGATRON_GROUPS for f in dataclasses.fields(cls)}


def _validate_schedule(t: TrainingArgs) -> None:
    """Megatron-LM's rules for iteration- vs sample-based schedules (its validate_args)."""
    if t.train_iters is not None and t.train_samples is not None:
        raise ValueError("--train-iters and --train-samples are mutually exclusive: give one.")
    if t.train_iters is not None:
        wrong = [f for f, bad in (("--lr-decay-samples", t.lr_decay_samples is not None),
                                  ("--lr-warmup-samples", t.lr_warmup_samples != 0)) if bad]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} need sample-based training (--train-samples); with "
                             "--train-iters use --lr-decay-iters / --lr-warmup-iters.")
        if t.lr_warmup_fraction is not None and t.lr_warmup_iters != 0:
            raise ValueError("give one of --lr-warmup-fraction and --lr-warmup-iters.")
    if t.train_samples is not None:
        wrong = [f for f, bad in (("--lr-decay-iters", t.lr_decay_iters is not None),
                                  ("--lr-warmup-iters", t.lr_warmup_iters != 0)) if bad]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} need iteration-based training (--train-iters); with "
                             "--train-samples use --lr-decay-samples / --lr-warmup-samples.")
        if t.lr_warmup_fraction is not None and t.lr_warmup_samples != 0:
            raise ValueError("give one of --lr-warmup-fraction and --lr-warmup-samples.")
        if t.train_samples < 1:
            raise ValueError("--train-samples must be >= 1.")
    if t.lr_warmup_fraction is not None and not 0.0 <= t.lr_warmup_fraction < 1.0:
        raise ValueError(f"--lr-warmup-fraction {t.lr_warmup_fraction} must be in [0, 1).")
    if t.lr is not None and t.min_lr > t.lr:
        raise ValueError(f"--min-lr {t.min_lr} is above --lr {t.lr}.")
    if t.use_checkpoint_opt_param_scheduler and t.override_opt_param_scheduler:
        raise ValueError("--use-checkpoint-opt_param-scheduler and --override-opt_param-scheduler are mutually "
                         "exclusive (take the schedule from the checkpoint, or from the flags).")


def batch_schedule(t: TrainingArgs, data_parallel_size: int) -> tuple:
    """``(global batch, micro-batches per rank and step)`` on ``data_parallel_size`` DP ranks
    (Megatron-LM's: the global batch defaults to micro-batch x DP)."""
    dp = data_parallel_size
    gbs = t.global_batch_size or t.micro_batch_size * dp
    if gbs % (t.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                         f"{t.micro_batch_size} x data-parallel size {dp}.")
    return gbs, gbs // (t.micro_batch_size * dp)


def lr_schedule(t: TrainingArgs, global_batch_size: int) -> Dict[str, float]:
    """Iterations to train and the learning-rate schedule in iterations, with Megatron-LM's meanings.

    Megatron-LM counts the schedule in samples (``get_optimizer_param_scheduler``: warm-up
    ``lr_warmup_fraction x decay`` or ``lr_warmup_iters x global batch`` or ``lr_warmup_samples``;
    decay ``lr_decay_iters x global batch`` or ``lr_decay_samples``) and steps it by the global
    batch each iteration; dividing every count by the global batch gives the same learning
    rate at every iteration, possibly with fractional warm-up/decay lengths, which is what this
    returns: ``train_iters`` (``train_samples // global batch`` for sample-based runs),
    ``warmup_steps`` and ``decay_steps``.
    """
    if t.train_samples is not None:
        train_iters = t.train_samples // global_batch_size
        if train_iters < 1:
            raise ValueError(f"--train-samples {t.train_samples} is less than one global batch "
                             f"({global_batch_size}); raise it or lower --global-batch-size.")
        decay = (t.lr_decay_samples if t.lr_decay_samples is not None else t.train_samples) / global_batch_size
        warmup = t.lr_warmup_samples / global_batch_size
    else:
        train_iters = t.train_iters
        decay = t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters
        warmup = t.lr_warmup_iters
    if t.lr_warmup_fraction is not None:
        warmup = t.lr_warmup_fraction * decay
    return {"train_iters": train_iters, "warmup_steps": warmup, "decay_steps": decay}


def replica_count(a: TrainArgs, data_parallel_size: Optional[int]) -> Optional[int]:
    """K: the replicas DP ranks form (``--diloco-replicas``, default every DP rank; 1 for plain
    DDP); None when it depends on a data-parallel size not known yet."""
    if not a.uses_replicas:
        return 1
    return a.diloco.num_replicas or data_parallel_size


def data_parallel_size(a: TrainArgs, world_size: Optional[int]) -> Optional[int]:
    """World size / (TP x PP); None when the world size is unknown or not a multiple (the
    builder refuses the latter with the launch fix)."""
    mp = a.parallel.tensor_model_parallel_size * a.parallel.pipeline_model_parallel_size
    return world_size // mp if world_size is not None and world_size % mp == 0 else None


def check_layout(a: TrainArgs, num_replicas: int, dp: int) -> None:
    """The rules that need the replica count K and the data-parallel size, at build time (the
    same functions :func:`validate_args` calls when the world size is known at parse time)."""
    if a.uses_replicas and a.diloco.num_replicas is not None:
        check_replicas_divide_data_parallel(a.diloco.num_replicas, dp)
    check_slices_divide_replicas(a.ppu.num_slices, num_replicas)
    if a.subnet.plan == "blocks":
        check_block_balance(num_replicas, a.model.num_layers, a.subnet.coverage)


def validate_args(a: TrainArgs, world_size: Optional[int] = None) -> None:
    """Every check that needs no process groups, once, at parse time: Megatron-LM's cross-field
    rules, then one ``validate_*`` function per feature (:mod:`megatron_ppu.config`). With
    ``world_size`` the replica-count rules run too; without it :func:`check_layout` runs them
    at build time."""
    m, t, pr, par, d = a.model, a.training, a.precision, a.parallel, a.data
    missing = [n for n in REQUIRED if getattr(getattr(a, _GROUP_OF[n]), n) is None]
    if t.train_iters is None and t.train_samples is None:
        missing.append("train_iters")
    if missing:
        raise ValueError(
            f"{', '.join('--' + n.replace('_', '-') for n in missing)} required: Megatron-LM has no default for "
            f"{'it' if len(missing) == 1 else 'them'}, and a run given data or model flags uses Megatron-LM's "
            f"defaults (only a run without data and model flags is the embedded default run"
            + (f", --train-samples may replace --train-iters" if "train_iters" in missing else "") + ").")
    _validate_schedule(t)
    if m.swiglu and m.squared_relu:
        raise ValueError("--swiglu and --squared-relu are mutually exclusive (both choose the MLP activation).")
    if pr.bf16 and pr.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive.")
    if pr.fp8_format is not None:
        try:
            import transformer_engine  # noqa: F401
            have_te = True
        except Exception:
            have_te = False
        if not have_te:
            raise ValueError(f"--fp8-format {pr.fp8_format} needs Transformer Engine, which is not "
                             "installed (pip install megatron_ppu[te] on a CUDA machine).")
        raise ValueError("--fp8-format: Transformer Engine is installed, but megatron_ppu's partial "
                         "layers for it are not implemented yet; train in --bf16.")
    if m.group_query_attention and not m.num_query_groups:
        raise ValueError("--group-query-attention needs --num-query-groups.")
    if m.num_query_groups and not m.group_query_attention:
        raise ValueError("--num-query-groups needs --group-query-attention.")
    if m.hidden_size % m.num_attention_heads and m.kv_channels is None:
        raise ValueError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                         f"{m.num_attention_heads}; pass --kv-channels or change one of them.")
    if m.recompute_granularity == "full" and (m.recompute_method is None or m.recompute_num_layers is None):
        raise ValueError("--recompute-granularity full needs --recompute-method and --recompute-num-layers.")
    if m.recompute_granularity != "full" and (m.recompute_method or m.recompute_num_layers):
        raise ValueError("--recompute-method/--recompute-num-layers need --recompute-granularity full.")
    if t.seed <= 0:
        raise ValueError(f"--seed {t.seed}: the seed must be a positive integer (as in Megatron-LM).")
    if t.lr_decay_style == "WSD":
        if t.train_samples is not None:  # Megatron-LM then reads --lr-wsd-decay-samples instead
            raise ValueError("--lr-decay-style WSD with --train-samples needs Megatron-LM's "
                             "--lr-wsd-decay-samples, which megatron_ppu does not implement; use --train-iters "
                             "with --lr-wsd-decay-iters.")
        if t.lr_wsd_decay_iters is None or t.lr_wsd_decay_iters < 1:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters N >= 1: the number of final "
                             "iterations (of --lr-decay-iters) over which the learning rate anneals to --min-lr.")
    else:
        given = [f for f in ("lr_wsd_decay_iters", "lr_wsd_decay_style")
                 if f in a.explicit_flags or (f == "lr_wsd_decay_iters" and t.lr_wsd_decay_iters is not None)]
        if given:
            raise ValueError(f"{', '.join('--' + f.replace('_', '-') for f in given)} only apply to "
                             f"--lr-decay-style WSD (got --lr-decay-style {t.lr_decay_style}); drop them or "
                             "use --lr-decay-style WSD.")
    if t.train_iters is not None and t.train_iters < 1:
        raise ValueError("--train-iters must be >= 1.")
    if d.data_path and d.mock_data:
        raise ValueError("--data-path and --mock-data are mutually exclusive.")
    if d.data_path and d.tokenizer_type is None:
        raise ValueError("--data-path needs --tokenizer-type (and --tokenizer-model for SentencePiece).")
    if d.tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer") and not d.tokenizer_model:
        raise ValueError(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model PATH.")
    if d.tokenizer_type == "NullTokenizer" and not d.vocab_size:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size.")
    if d.mock_data and not (d.vocab_size or d.tokenizer_type):
        raise ValueError("--mock-data needs --vocab-size (or a tokenizer).")
    c = a.checkpoint
    if c.finetune and not c.load:
        raise ValueError("--finetune needs --load DIR.")
    if c.save_interval is not None and not c.save:
        raise ValueError("--save-interval needs --save DIR.")
    if c.save_interval is not None and c.save_interval < 1:
        raise ValueError("--save-interval must be >= 1.")
    if c.eval_iters < 0:
        raise ValueError("--eval-iters must be >= 0 (0 = no evaluation).")
    for name in ("eval_interval", "log_interval"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    ppu, dl, sn = a.ppu, a.diloco, a.subnet
    if sn.sync == "step" and a.precision.fp16:
        raise ValueError("--subnet-sync step does not support --fp16 (its loss scaling is per replica); "
                         "use --bf16.")
    if sn.sync == "step":
        outer = [dest for f, _, dest in cli_fields(DiLoCoConfig) if f.name != "num_replicas"]
        unused = sorted(f for f in outer if f in a.explicit_flags)
        if unused:
            raise ValueError(f"--subnet-sync step synchronises every step without the outer optimizer, so "
                             f"{', '.join('--' + u.replace('_', '-') for u in unused)} would be ignored; "
                             f"drop them or use --subnet-sync outer.")
    elif ppu.enabled and dl.local_steps == 0:
        raise ValueError("--ppu-slices > 1 needs the DiLoCo outer loop (--diloco-local-steps > 0): with "
                         "per-step gradient all-reduce the frozen slices would never be updated.")
    if sn.plan != "ppu" and not a.uses_replicas:
        raise ValueError(f"--subnet-plan {sn.plan} needs replicas: --diloco-local-steps > 0 or "
                         "--subnet-sync step.")
    if not a.uses_replicas and dl.num_replicas not in (None, 1):
        raise ValueError("--diloco-replicas needs --diloco-local-steps > 0 (synchronous DDP has one replica).")
    dp = data_parallel_size(a, world_size)
    ft = a.fault_tolerance
    validate_fault_tolerance_config(ft, num_replicas=dl.num_replicas, uses_outer_loop=a.uses_replicas and
                                    sn.sync == "outer", explicit=a.explicit_flags, sync_delay=dl.sync_delay)
    if ft.enabled and dp is not None:
        dp *= dl.num_replicas  # each torchrun job is one replica: the run's data parallelism is K x the job's
    k = replica_count(a, dp)
    validate_diloco_config(dl, data_parallel_size=dp if a.uses_replicas else None)
    validate_subnet_config(sn, num_slices=ppu.num_slices, num_replicas=k, num_layers=m.num_layers)
    validate_ppu_config(ppu, num_replicas=k, ffn_hidden_size=ffn_hidden_size(m),
                        num_attention_heads=m.num_attention_heads,
                        num_query_groups=m.num_query_groups if m.group_query_attention else None,
                        tensor_model_parallel_size=par.tensor_model_parallel_size)
