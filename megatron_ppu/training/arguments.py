"""Command-line arguments with Megatron-LM's flag names, generated from dataclasses.

Each group of settings is one dataclass; a field's ``metadata`` holds its help text
(and optionally choices), and the flag is the field name with dashes. Booleans are
``store_true`` flags, as in Megatron-LM. Every flag that argparse does not know is
an error naming it: a Megatron-LM flag that megatron_ppu does not implement must
never be silently ignored, because it could change what is trained.

The defaults are Megatron-LM's, except where marked "(embedded default)": those
size the run that ``python pretrain_gpt_ppu.py`` performs with no flags at all (a
small GPT on the embedded English corpus, a few minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, get_args, get_origin

from ..config import DiLoCoConfig, PPUConfig, validate_diloco_config, validate_ppu_config


def _f(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelArgs:
    """GPT architecture (Megatron-LM names and meanings)."""

    num_layers: int = _f(4, "Number of transformer layers (embedded default: 4).")
    hidden_size: int = _f(128, "Transformer hidden size (embedded default: 128).")
    ffn_hidden_size: Optional[int] = _f(None, "MLP hidden size; default 4 x hidden size.")
    num_attention_heads: int = _f(4, "Number of attention heads (embedded default: 4).")
    group_query_attention: bool = _f(False, "Use grouped-query attention.")
    num_query_groups: Optional[int] = _f(None, "Number of query groups for GQA.")
    kv_channels: Optional[int] = _f(None, "Projection size per head; default hidden / heads.")
    seq_length: int = _f(128, "Sequence length (embedded default: 128).")
    max_position_embeddings: Optional[int] = _f(None, "Maximum positions; default --seq-length.")
    position_embedding_type: str = _f("learned_absolute", "Position embedding type.",
                                      choices=["learned_absolute", "rope", "none"])
    swiglu: bool = _f(False, "Use SwiGLU (gated SiLU) MLPs.")
    normalization: str = _f("LayerNorm", "Normalization layer.", choices=["LayerNorm", "RMSNorm"])
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

    micro_batch_size: int = _f(8, "Sequences per micro-batch per rank (embedded default: 8).")
    global_batch_size: Optional[int] = _f(None, "Sequences per step over all data-parallel ranks; "
                                                "default micro-batch x DP.")
    train_iters: int = _f(300, "Training iterations (embedded default: 300).")
    lr: float = _f(3e-3, "Peak learning rate (embedded default: 3e-3).")
    min_lr: float = _f(0.0, "Minimum learning rate of the decay.")
    lr_decay_style: str = _f("cosine", "Learning-rate decay after warm-up (embedded default: cosine).",
                             choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_decay_iters: Optional[int] = _f(None, "Iterations of decay; default --train-iters.")
    lr_warmup_iters: int = _f(30, "Linear warm-up iterations (embedded default: 30).")
    weight_decay: float = _f(0.1, "AdamW weight decay (embedded default: 0.1).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.99, "Adam beta2 (embedded default: 0.99, as in the paper).")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    clip_grad: float = _f(1.0, "Gradient clipping by global norm over the trainable set (0 = off).")
    seed: int = _f(1234, "Random seed.")


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
    sequence_parallel: bool = _f(False, "Sequence parallelism (needs TP > 1).")
    use_distributed_optimizer: bool = _f(False, "Shard the inner optimizer state over the inner-DP ranks.")


@dataclass
class DataArgs:
    """Data and tokenizer. Without --data-path and --mock-data, the embedded corpus is used."""

    data_path: Optional[List[str]] = _f(None, "Megatron data prefixes, optionally weighted: "
                                              "'w1 prefix1 w2 prefix2 ...' or 'prefix'.", nargs="+")
    split: str = _f("969,30,1", "Train/valid/test split of --data-path.")
    tokenizer_type: Optional[str] = _f(None, "Tokenizer.", choices=["SentencePieceTokenizer",
                                       "GPTSentencePieceTokenizer", "NullTokenizer"])
    tokenizer_model: Optional[str] = _f(None, "SentencePiece model file.")
    vocab_size: Optional[int] = _f(None, "Vocabulary size (NullTokenizer).")
    mock_data: bool = _f(False, "Use Megatron's mock GPT dataset (random tokens).")
    data_cache_path: Optional[str] = _f(None, "Where dataset index caches (and the embedded corpus) are built.")


@dataclass
class CheckpointArgs:
    """Checkpointing, evaluation and logging."""

    save: Optional[str] = _f(None, "Directory to save checkpoints to.")
    load: Optional[str] = _f(None, "Directory to load the latest checkpoint from.")
    save_interval: Optional[int] = _f(None, "Save every N iterations (and at the end).")
    eval_interval: int = _f(100, "Evaluate on the validation split every N iterations (embedded default: 100).")
    eval_iters: int = _f(10, "Validation micro-batches per evaluation (embedded default: 10).")
    log_interval: int = _f(10, "Log every N iterations (embedded default: 10).")
    exit_interval: Optional[int] = _f(None, "Exit after the iteration that is a multiple of N.")
    tensorboard_dir: Optional[str] = _f(None, "Write TensorBoard scalars here.")
    finetune: bool = _f(False, "With --load: load only the model weights (any layout/plan), start at "
                               "iteration 0 with fresh optimizer, DiLoCo and data state.")


@dataclass
class PPUArgs:
    """Partial Parameter Updates (see :class:`megatron_ppu.config.PPUConfig`)."""

    ppu_slices: int = _f(1, "N: slices of every MLP (1 = train everything).")
    ppu_slice_attention_heads: bool = _f(False, "Also slice Q/K/V by head group.")
    ppu_slice_attention_output: bool = _f(False, "Negative control (paper App. C): also slice W_O by head group.")
    ppu_detach_frozen_jacobian: bool = _f(False, "Negative control (paper App. D): drop the frozen slices' "
                                                 "contribution to the input gradient.")


@dataclass
class DiLoCoArgs:
    """Outer loop (see :class:`megatron_ppu.config.DiLoCoConfig`)."""

    diloco_local_steps: int = _f(50, "H: inner steps per round; 0 = synchronous DDP baseline "
                                     "(embedded default: 50).")
    diloco_outer_lr: float = _f(0.7, "Outer Nesterov learning rate (paper: 0.4 at 1.3B).")
    diloco_outer_momentum: float = _f(0.9, "Outer Nesterov momentum.")
    diloco_streaming_fragments: int = _f(1, "F: fragments synced at staggered steps, counting the "
                                            "embeddings/output fragment (paper: 9 = 8 layer groups + 1).")
    diloco_replicas: Optional[int] = _f(None, "K: replicas; inner DP = DP / K. Default: every DP rank "
                                              "is a replica.")
    diloco_allreduce_dtype: str = _f("fp32", "Outer all-reduce payload dtype.", choices=["fp32", "bf16"])


@dataclass
class SubnetArgs:
    """Subnetwork data parallelism (see :mod:`megatron_ppu.subnet`)."""

    subnet_plan: str = _f("ppu", "Ownership plan: ppu (MLP slices, backward masking), neurons (MLP slices, "
                                 "forward masking), blocks (transformer blocks).",
                          choices=["ppu", "neurons", "blocks"])
    subnet_masking: str = _f("backward", "backward: full forward, sparse backward; forward: the non-held "
                                         "part is skipped in the forward too.", choices=["backward", "forward"])
    subnet_coverage: float = _f(1.0, "Blocks plan: fraction of the transformer blocks each replica holds.")
    subnet_sync: str = _f("outer", "outer: sync every H steps through DiLoCo; step: SDP, gradients averaged "
                                   "over each parameter's holders every step.", choices=["outer", "step"])


GROUPS = [ModelArgs, TrainingArgs, PrecisionArgs, ParallelArgs, DataArgs, CheckpointArgs, PPUArgs, DiLoCoArgs,
          SubnetArgs]


@dataclass
class TrainArgs:
    """All settings of one training run."""

    model: ModelArgs
    training: TrainingArgs
    precision: PrecisionArgs
    parallel: ParallelArgs
    data: DataArgs
    checkpoint: CheckpointArgs
    ppu_args: PPUArgs
    diloco_args: DiLoCoArgs
    subnet_args: SubnetArgs
    explicit_flags: frozenset = frozenset()

    def ppu(self) -> PPUConfig:
        p = self.ppu_args
        return PPUConfig(p.ppu_slices, p.ppu_slice_attention_heads, p.ppu_slice_attention_output,
                         "detach" if p.ppu_detach_frozen_jacobian else "full",
                         mlp_forward_masking=self.subnet_args.subnet_plan == "neurons")

    def subnet(self):
        from ..subnet import SubnetConfig

        s = self.subnet_args
        return SubnetConfig(plan=s.subnet_plan, masking=s.subnet_masking, coverage=s.subnet_coverage,
                            sync=s.subnet_sync, seed=self.training.seed)

    @property
    def uses_replicas(self) -> bool:
        """Whether DP ranks form replicas (DiLoCo outer loop or per-step SDP) rather than plain DDP."""
        return self.diloco_args.diloco_local_steps > 0 or self.subnet_args.subnet_sync == "step"

    def diloco(self, num_replicas: int) -> DiLoCoConfig:
        d = self.diloco_args
        return DiLoCoConfig(local_steps=d.diloco_local_steps, outer_lr=d.diloco_outer_lr,
                            outer_momentum=d.diloco_outer_momentum, nesterov=True,
                            num_replicas=num_replicas, streaming_fragments=d.diloco_streaming_fragments,
                            allreduce_dtype=d.diloco_allreduce_dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _base_type(tp):
    if get_origin(tp) is not None:
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (list, List):
            return list
        return _base_type(args[0])
    return tp


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one flag per dataclass field."""
    p = argparse.ArgumentParser(
        prog="pretrain_gpt_ppu.py",
        description="Megatron-Core GPT pre-training with DiLoCo and Partial Parameter Updates.",
        allow_abbrev=False,
    )
    for cls in GROUPS:
        g = p.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            tp = _base_type(hints[f.name])
            kw = {"dest": f.name, "help": f.metadata["help"], "default": f.default}
            if tp is bool:
                g.add_argument(flag, action="store_true", **kw)
                continue
            if tp is list:
                kw["nargs"] = f.metadata.get("nargs", "+")
                kw["type"] = str
            else:
                kw["type"] = tp
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            g.add_argument(flag, **kw)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainArgs:
    """Parse ``argv``; raise ``ValueError`` for unknown flags and inconsistent values."""
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        raise ValueError(
            f"unsupported argument(s) {' '.join(flags)}: megatron_ppu implements a subset of "
            f"Megatron-LM's flags and refuses the others rather than ignore them "
            f"(see `python pretrain_gpt_ppu.py --help`)."
        )
    values = vars(ns)
    groups = {cls: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for cls in GROUPS}
    explicit = frozenset(a.split("=")[0][2:].replace("-", "_") for a in (argv or []) if a.startswith("--"))
    args = TrainArgs(*groups.values(), explicit_flags=explicit)
    validate_args(args)
    return args


def validate_args(a: TrainArgs) -> None:
    """Cross-field checks that need no process groups (the rest happen at set-up)."""
    m, t, pr, par, d = a.model, a.training, a.precision, a.parallel, a.data
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
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1.")
    if t.train_iters < 1:
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
    if c.save and par.use_distributed_optimizer:
        raise ValueError("saving checkpoints with --use-distributed-optimizer is not supported yet; "
                         "drop one of the two flags.")
    if c.save_interval is not None and not c.save:
        raise ValueError("--save-interval needs --save DIR.")
    if c.save_interval is not None and c.save_interval < 1:
        raise ValueError("--save-interval must be >= 1.")
    for name in ("eval_interval", "log_interval"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    ppu, dl, sn = a.ppu(), a.diloco_args, a.subnet_args
    if sn.subnet_sync == "step" and a.precision.fp16:
        raise ValueError("--subnet-sync step does not support --fp16 (its loss scaling is per replica); "
                         "use --bf16.")
    if sn.subnet_sync == "step":
        unused = sorted(f for f in ("diloco_local_steps", "diloco_outer_lr", "diloco_outer_momentum",
                                    "diloco_streaming_fragments", "diloco_allreduce_dtype") if f in a.explicit_flags)
        if unused:
            raise ValueError(f"--subnet-sync step synchronises every step without the outer optimizer, so "
                             f"{', '.join('--' + u.replace('_', '-') for u in unused)} would be ignored; "
                             f"drop them or use --subnet-sync outer.")
    elif ppu.enabled and dl.diloco_local_steps == 0:
        raise ValueError("--ppu-slices > 1 needs the DiLoCo outer loop (--diloco-local-steps > 0): with "
                         "per-step gradient all-reduce the frozen slices would never be updated.")
    if sn.subnet_plan != "ppu" and not a.uses_replicas:
        raise ValueError(f"--subnet-plan {sn.subnet_plan} needs replicas: --diloco-local-steps > 0 or "
                         "--subnet-sync step.")
    if not a.uses_replicas and dl.diloco_replicas not in (None, 1):
        raise ValueError("--diloco-replicas needs --diloco-local-steps > 0 (synchronous DDP has one replica).")
    validate_diloco_config(a.diloco(dl.diloco_replicas or 1))
    if ppu.num_slices < 1 or (ppu.num_slices == 1 and (ppu.slice_attention_heads or ppu.slice_attention_output
                                                          or ppu.frozen_input_jacobian != "full")):
        validate_ppu_config(ppu, num_replicas=1, ffn_hidden_size=1, num_attention_heads=1, num_query_groups=None)
