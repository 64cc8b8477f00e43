"""Command-line arguments with Megatron-LM's flag names, generated from dataclasses.

Each group of settings is one dataclass; a field's ``metadata`` holds its help text
(and optionally choices), and the flag is the field name with dashes. Booleans are
``store_true`` flags (``store_false`` for a field whose default is True, with Megatron-LM's
``--no-...`` spelling in the field's ``flag`` metadata), as in Megatron-LM. megatron_ppu's
own features are the dataclasses of :mod:`megatron_ppu.config` (``PPUConfig``,
``DiLoCoConfig``, ``SubnetConfig``), used as they are: their fields are the flags
``--ppu-*``, ``--diloco-*``, ``--subnet-*`` (:func:`megatron_ppu.config.cli_fields`) and their
defaults are the only ones. Every flag's ``--help`` shows its default.
Megatron-LM's groups (``ModelArgs`` ... ``CheckpointArgs``) are defined in :mod:`.arg_groups`.

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
    cli_fields,
    field_flag,  # noqa: F401 (re-exported: the flag of a settings field)
    validate_diloco_config,
    validate_fault_tolerance_config,
    validate_ppu_config,
    validate_subnet_config,
)
from .arg_groups import (  # noqa: F401 (re-exported: the settings groups' names elsewhere)
    CheckpointArgs, DataArgs, ModelArgs, ParallelArgs, PrecisionArgs, TrainingArgs)
from .megatron_compat import EXTRA_FLAGS, field_verdicts, verdict
from .megatron_lm_flags import MEGATRON_LM_TAG, table as megatron_lm_table
from .schedule import (  # noqa: F401 (re-exported: the trainer's and the tools' names for them)
    batch_schedule, check_layout, data_parallel_size, lr_schedule, replica_count, validate_schedule)


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

    def all_flag_values(self) -> Dict[str, object]:
        """:meth:`flag_values` of every group (Megatron-LM's groups, then megatron_ppu's features)."""
        out: Dict[str, object] = {}
        for cls in GROUPS:
            out.update(self.flag_values(getattr(self, GROUP_ATTR[cls])))
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
#: Of these (and --train-iters / --train-samples), the ones only training needs: a cost estimate
#: (``parse_args(for_training=False)``, ``tools/estimate.py``) takes the model, parallelism and method
#: flags alone.
TRAINING_ONLY = ("lr", "train_iters", "train_samples")

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


def build_parser(prog: str = TRAINER_PROG, description: str = TRAINER_DESCRIPTION,
                 megatron_lm_tag: Optional[str] = None) -> argparse.ArgumentParser:
    """argparse parser with one flag per settings field, plus every other Megatron-LM flag
    (hidden, collected so that each is accepted or refused by name, never "unrecognized").

    ``megatron_lm_tag``: whose Megatron-LM flags (a tag of :mod:`.megatron_lm_flags`); default
    the installed megatron-core's. The parser keeps it as ``megatron_lm_tag`` / ``megatron_lm_flags``.

    Another CLI (``tools/estimate.py``) takes this parser and adds its own options to it; their
    values come back in :attr:`TrainArgs.extra` from :func:`parse_args`."""
    megatron_lm_tag = megatron_lm_tag or MEGATRON_LM_TAG
    megatron_lm_flags = megatron_lm_table(megatron_lm_tag)
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter,
        epilog=f"Every other Megatron-LM ({megatron_lm_tag}) flag is recognised: accepted when it cannot change "
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
    p.megatron_lm_tag, p.megatron_lm_flags = megatron_lm_tag, megatron_lm_flags
    arity = dict({f: v[2] for f, v in megatron_lm_flags.items()}, **EXTRA_FLAGS)
    for flag, nargs in arity.items():
        if flag in known:
            continue
        kw = {"dest": _MEGATRON_DEST + flag, "default": _UNSET, "help": argparse.SUPPRESS}
        if nargs == 0:
            p.add_argument(flag, action="store_const", const=True, **kw)
        else:
            p.add_argument(flag, nargs=None if nargs == 1 else nargs, type=str, **kw)
    return p


def _world_size_from_env() -> Optional[int]:
    """``WORLD_SIZE`` of a torchrun / local-ranks launch (Megatron-LM's validate_args reads it
    too); None when not launched as ranks."""
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w else None


def parse_args(argv: Optional[Sequence[str]] = None, *, parser: Optional[argparse.ArgumentParser] = None,
               world_size: Optional[int] = None, for_training: bool = True) -> TrainArgs:
    """Parse ``argv`` with the trainer's parser (or ``parser``, one made by :func:`build_parser`
    with a caller's options added); raise ``ValueError`` for unknown flags and inconsistent values.

    ``world_size``: the number of ranks the run will have (default: ``WORLD_SIZE`` when set);
    with it every setting is validated here, including the rules that need the replica count;
    without it those wait for :func:`check_layout` at build time. ``for_training=False`` (the cost
    estimate, ``tools/estimate.py``): the flags only training needs (:data:`TRAINING_ONLY`) are
    optional."""
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
        kind, why = verdict(flag, v, parser.megatron_lm_flags)
        (accepted if kind == "accepted" else refused).append((flag, v, why))
    dest_of = {o: a.dest for o, a in parser._option_string_actions.items()}
    field_accepted, field_refused = field_verdicts(values, dest_of)  # the value rules of implemented flags
    accepted += field_accepted
    refused += field_refused
    problems = []
    if refused:
        problems.append("unsupported Megatron-LM feature(s), refused rather than ignored (ignoring them could "
                        "change what is trained):\n" + "\n".join(
                            f"  {f}{'' if v is True else ' ' + (' '.join(v) if isinstance(v, list) else str(v))}: {w}"
                            for f, v, w in sorted(refused)))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")] or unknown
        problems.append(f"unrecognized argument(s) {' '.join(flags)}: neither a megatron_ppu flag nor one of "
                        f"Megatron-LM's ({parser.megatron_lm_tag}) (see `python pretrain_gpt_ppu.py --help`).")
    if problems:
        raise ValueError("\n".join(problems) + "\nSee docs/flags.md for what megatron_ppu does with every "
                                                "Megatron-LM flag.")
    explicit = frozenset(dest_of.get(a.split("=")[0], a.split("=")[0][2:].replace("-", "_"))
                         for a in argv if a.startswith("--"))
    if values["use_checkpoint_args"]:
        if not values["load"]:
            raise ValueError("--use-checkpoint-args needs --load DIR (the checkpoint to take the model flags from).")
        from .checkpointing.megatron_lm import apply_checkpoint_args

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
    validate_args(args, world_size=world_size if world_size is not None else _world_size_from_env(),
                  for_training=for_training)
    return args


_GROUP_OF = {f.name: GROUP_ATTR[cls] for cls in MEGATRON_GROUPS for f in dataclasses.fields(cls)}


def validate_args(a: TrainArgs, world_size: Optional[int] = None, for_training: bool = True) -> None:
    """Every check that needs no process groups, once, at parse time: Megatron-LM's cross-field
    rules, then one ``validate_*`` function per feature (:mod:`megatron_ppu.config`). With
    ``world_size`` the replica-count rules run too; without it :func:`check_layout` runs them
    at build time. ``for_training=False``: :data:`TRAINING_ONLY` flags are optional (a cost estimate)."""
    m, t, pr, par, d = a.model, a.training, a.precision, a.parallel, a.data
    missing = [n for n in REQUIRED if getattr(getattr(a, _GROUP_OF[n]), n) is None
               and (for_training or n not in TRAINING_ONLY)]
    if for_training and t.train_iters is None and t.train_samples is None:
        missing.append("train_iters")
    if missing:
        raise ValueError(
            f"{', '.join('--' + n.replace('_', '-') for n in missing)} required: Megatron-LM has no default for "
            f"{'it' if len(missing) == 1 else 'them'}, and a run given data or model flags uses Megatron-LM's "
            f"defaults (only a run without data and model flags is the embedded default run"
            + (f", --train-samples may replace --train-iters" if "train_iters" in missing else "") + ").")
    validate_schedule(t)
    if m.swiglu and m.squared_relu:
        raise ValueError("--swiglu and --squared-relu are mutually exclusive (both choose the MLP activation).")
    if pr.bf16 and pr.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive.")
    if m.deterministic_mode and any(f == "--use-flash-attn" for f, _, _ in a.accepted):
        raise ValueError("--use-flash-attn cannot be used with --deterministic-mode (Megatron-LM's validate_args "
                         "refuses it too); drop one of them.")
    if m.deterministic_mode and m.attention_backend in ("flash", "fused"):
        raise ValueError(f"--attention-backend {m.attention_backend} cannot be used with --deterministic-mode: "
                         "torch does not guarantee deterministic backward passes of its fused attention kernels "
                         "on CUDA; use --attention-backend auto (torch's math kernel on CUDA) or local.")
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
    if any(getattr(c, f) is not None for f in ("wandb_project", "wandb_exp_name", "wandb_save_dir", "wandb_entity")):
        from .metrics import check_wandb_flags  # imports wandb (only when a W&B flag is given)

        check_wandb_flags(c)
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
                                    sn.sync == "outer", explicit=a.explicit_flags)
    if ft.enabled and dp is not None:
        dp *= dl.num_replicas  # each torchrun job is one replica: the run's data parallelism is K x the job's
    k = replica_count(a, dp)
    validate_diloco_config(dl, data_parallel_size=dp if a.uses_replicas else None)
    validate_subnet_config(sn, num_slices=ppu.num_slices, num_replicas=k, num_layers=m.num_layers)
    validate_ppu_config(ppu, num_replicas=k, ffn_hidden_size=ffn_hidden_size(m),
                        num_attention_heads=m.num_attention_heads,
                        num_query_groups=m.num_query_groups if m.group_query_attention else None,
                        tensor_model_parallel_size=par.tensor_model_parallel_size)
