"""The settings of megatron_ppu's features, each defined once.

One frozen dataclass per feature (:class:`PPUConfig`, :class:`DiLoCoConfig`,
:class:`SubnetConfig`, :class:`FaultToleranceConfig`) holds the library defaults, the help text and the command-line flag
of every setting: a field made with :func:`setting` becomes the flag
``--<FLAG_PREFIX>-<field-name>`` of ``pretrain_gpt_ppu.py`` (``DiLoCoConfig.local_steps`` is
``--diloco-local-steps``), or the flag named in its ``flag`` metadata where Megatron-style
naming differs (``num_replicas`` is ``--diloco-replicas``); ``const`` makes a ``store_const``
flag (``--ppu-detach-frozen-jacobian`` sets ``frozen_input_jacobian="detach"``); ``cli=False``
marks a field the parser derives instead of reading (``SubnetConfig.seed`` is ``--seed``).
:mod:`megatron_ppu.training.arguments` builds the parser from these fields.

Each feature has one ``validate_*`` function, called once at parse time
(:func:`megatron_ppu.training.arguments.validate_args`); it raises ``ValueError`` with a
message that names the offending flag and the fix. The rules that also need the replica
count (known once the world size is) are the small ``check_*`` functions below, which the
``validate_*`` functions call when the count is known and the builder calls otherwise: every
rule is written once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, List, Optional, Tuple

_NO_CONST = object()


def setting(default, help: str, *, flag: Optional[str] = None, cli: bool = True, const=_NO_CONST,
            **extra) -> dataclasses.Field:
    """A dataclass field that is also a command-line flag (see the module docstring).

    ``extra`` goes into the metadata too (``choices=[...]``, ``nargs="+"``)."""
    meta = {"help": help, "cli": cli, **extra}
    if flag is not None:
        meta["flag"] = flag
    if const is not _NO_CONST:
        meta["const"] = const
    return field(default=default, metadata=meta)


def field_flag(f: dataclasses.Field, prefix: str = "") -> str:
    """The command-line flag of a settings field: its ``flag`` metadata, else the field name
    with dashes after ``--<prefix>-`` (no prefix: Megatron-LM's own flags)."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    return "--" + (prefix + "-" if prefix else "") + f.name.replace("_", "-")


def field_dest(f: dataclasses.Field, prefix: str = "") -> str:
    """The argparse ``dest`` of a settings field: the field name for Megatron-LM's flags, the
    flag's name with underscores for a feature's (``--diloco-replicas`` -> ``diloco_replicas``:
    the name Megatron-LM-style checkpoint args and ``explicit_flags`` use)."""
    return field_flag(f, prefix)[2:].replace("-", "_") if prefix else f.name


def cli_fields(cls) -> Iterator[Tuple[dataclasses.Field, str, str]]:
    """``(field, flag, dest)`` of every field of settings class ``cls`` that is a flag."""
    prefix = getattr(cls, "FLAG_PREFIX", "")
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True):
            yield f, field_flag(f, prefix), field_dest(f, prefix)


def _divisors(k: int) -> list:
    return [d for d in range(1, k + 1) if k % d == 0]


# ---------------------------------------------------------------------------------- PPU
@dataclass(frozen=True)
class PPUConfig:
    """Partial Parameter Updates (paper §2.2).

    Attributes:
        num_slices: N, the number of disjoint slices of every sliced weight.
            Replica k trains slice ``k mod N``. ``1`` means every replica trains
            everything (plain DiLoCo / DDP).
        slice_attention_heads: also slice the Q/K/V projection by head group
            (query groups under GQA).
        slice_attention_output: negative control of the paper (App. C): also slice
            the output projection W_O (``linear_proj``) by head group. The paper found
            it degrades perplexity; it exists to reproduce that.
        frozen_input_jacobian: ``"full"`` (the method: the frozen slices still
            contribute to the input gradient) or ``"detach"`` (negative control of
            App. D, "detach-all-but-k": only the owned slice contributes to dX).
        mlp_forward_masking: subnetwork data parallelism's neuron plan with forward
            masking (see :mod:`megatron_ppu.subnet`): in training the MLP hidden units
            this replica does not own are dropped from the forward pass too, with the
            MLP output scaled by N; evaluation uses the full MLP. Not a flag: the parser
            sets it for ``--subnet-plan neurons``.
        sliced_lr_mult: a single-owner remedy (issue 16): the inner learning rate of the owned
            slices (every sliced weight and bias) is ``lr x sliced_lr_mult`` (and ``min_lr x`` it),
            through Megatron's per-group overrides; 1.0 is the paper's method.
    """

    FLAG_PREFIX: ClassVar[str] = "ppu"

    num_slices: int = setting(1, "N: slices of every MLP (1 = train everything).", flag="--ppu-slices")
    slice_attention_heads: bool = setting(False, "Also slice Q/K/V by head group.")
    slice_attention_output: bool = setting(False, "Negative control (paper App. C): also slice W_O by head group.")
    frozen_input_jacobian: str = setting(
        "full", "Negative control (paper App. D): drop the frozen slices' contribution to the input gradient "
                "(frozen_input_jacobian 'detach' instead of 'full').",
        flag="--ppu-detach-frozen-jacobian", const="detach")
    mlp_forward_masking: bool = setting(False, "SDP neuron plan: forward masking of the MLP.", cli=False)
    sliced_lr_mult: float = setting(1.0, "Inner learning rate (and min lr) of the owned slices x this factor "
                                         "(a remedy for slices with few owners, issue 16; 1.0 = the paper).")

    @property
    def enabled(self) -> bool:
        return self.num_slices > 1


def check_slices_divide_replicas(num_slices: int, num_replicas: int) -> None:
    """Every slice must be trained by the same number K/N of replicas."""
    if num_replicas < 1:
        raise ValueError(f"the number of replicas must be >= 1, got {num_replicas}.")
    if num_replicas % num_slices != 0:
        raise ValueError(
            f"--ppu-slices {num_slices} does not divide the number of replicas K={num_replicas}: every "
            f"slice must be trained by the same number K/N of replicas. Use a --ppu-slices that "
            f"divides {num_replicas} (e.g. {_divisors(num_replicas)}) or change --diloco-replicas."
        )


def validate_ppu_config(
    ppu: PPUConfig,
    *,
    num_replicas: Optional[int] = None,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: Optional[int],
    tensor_model_parallel_size: int = 1,
    num_moe_experts: Optional[int] = None,
    multi_latent_attention: bool = False,
    attention_output_gate: bool = False,
    gradient_accumulation_fusion: bool = False,
) -> None:
    """Check that ``ppu`` can slice this model on this layout; raise ``ValueError`` otherwise.

    ``num_replicas`` None (not known yet): the builder checks it with
    :func:`check_slices_divide_replicas` once the world size is known. The shape rules here
    (the MLP hidden units and the head groups per TP rank divisible by N) are the only copy
    of them: the layers (:mod:`megatron_ppu.layers`) only assert them."""
    n = ppu.num_slices
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--ppu-slices must be a positive integer, got {n!r}.")
    if num_replicas is not None:
        check_slices_divide_replicas(n, num_replicas)
    if ppu.frozen_input_jacobian not in ("full", "detach"):
        raise ValueError(f"frozen input Jacobian must be 'full' or 'detach', got {ppu.frozen_input_jacobian!r}.")
    if n == 1:
        if ppu.slice_attention_heads or ppu.slice_attention_output or ppu.frozen_input_jacobian != "full":
            raise ValueError("--ppu-slice-attention-heads/--ppu-slice-attention-output/"
                             "--ppu-detach-frozen-jacobian need --ppu-slices > 1.")
        return
    tp = tensor_model_parallel_size
    if ffn_hidden_size % tp != 0 or (ffn_hidden_size // tp) % n != 0:
        raise ValueError(
            f"the MLP hidden size per tensor-parallel rank (--ffn-hidden-size {ffn_hidden_size} / "
            f"--tensor-model-parallel-size {tp}) must be divisible by --ppu-slices {n}: each TP "
            f"shard is cut into N slices. Choose --ffn-hidden-size as a multiple of {tp * n}."
        )
    if num_moe_experts:
        raise ValueError("PPU slicing of mixture-of-experts MLPs is not supported; drop --num-experts.")
    if gradient_accumulation_fusion:
        raise ValueError(
            "the PPU partial linears compute weight gradients themselves; pass "
            "--no-gradient-accumulation-fusion (gradient_accumulation_fusion=False)."
        )
    if ppu.slice_attention_heads or ppu.slice_attention_output:
        if multi_latent_attention:
            raise ValueError("--ppu-slice-attention-heads is not supported with multi-latent attention.")
        if attention_output_gate:
            raise ValueError("--ppu-slice-attention-heads is not supported with an attention output gate.")
        groups = num_query_groups or num_attention_heads
        what = "--num-query-groups" if num_query_groups and num_query_groups != num_attention_heads else "--num-attention-heads"
        if groups % tp != 0 or (groups // tp) % n != 0:
            raise ValueError(
                f"with head slicing, the attention head groups per tensor-parallel "
                f"rank ({what} {groups} / TP {tp}) must be divisible by --ppu-slices {n}. Use a "
                f"multiple of {tp * n} for {what}, fewer slices, or drop --ppu-slice-attention-heads."
            )


# ------------------------------------------------------------------------------- DiLoCo
ALLREDUCE_DTYPES = ("fp32", "bf16", "fp8", "int8")
QUANTIZED_DTYPES = ("fp8", "int8")


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo / Streaming DiLoCo outer loop (paper Algorithm 1, lines 4-15).

    Attributes:
        local_steps: H, inner steps between two syncs of a fragment. ``0`` turns the
            outer loop off: plain synchronous data parallel over all DP ranks (the
            DDP baseline). Default 50, what ``pretrain_gpt_ppu.py`` has always trained with.
        outer_lr: outer learning rate (default: the PPU paper's 0.4, Streaming DiLoCo's setup; DiLoCo used 0.7).
        outer_momentum: Nesterov momentum of the outer SGD (paper: 0.9).
        nesterov: Nesterov (True, as in the paper) or heavy-ball momentum (not a flag).
        num_replicas: K, the number of replicas (DP ranks are split into K groups); None:
            every data-parallel rank is a replica (the builder resolves it from the layout).
        streaming_fragments: F, the number of fragments synchronised at staggered
            steps (Streaming DiLoCo). ``1`` syncs everything at once. With F > 1 the
            parameters outside the transformer layers (embeddings, final norm,
            output layer) form one fragment and the layers of each pipeline stage
            are cut into the remaining F - 1 groups of consecutive layers; so the
            paper's "24 layers in 8 groups of 3 + embeddings" is F = 9.
        allreduce_dtype: payload of the cross-replica reduction: "fp32", "bf16" (an all-reduce
            in that dtype), or "int8" / "fp8" (e4m3): a quantized reduce-scatter + all-gather with one
            fp32 scale per block of ``quantization_block`` values (:mod:`megatron_ppu.sync.compress`).
        quantization_block: values per fp32 scale of the int8 / fp8 payload.
        error_feedback: int8 / fp8 only: each rank keeps what quantization dropped from its Δ (on
            the collective's device: host memory under gloo on CPU, the GPU under NCCL; in the
            checkpoint) and adds it to its next Δ.
        sync_delay: τ, inner steps between launching a fragment's reduction and applying it; the
            reduction overlaps those steps (0: synchronous, as in Algorithm 1).
        merge_alpha: α, with τ > 0: the local parameters after the delayed outer step are
            (1 − α)·θ(t+1) + α·θ_local (torchft's ``fragment_update_alpha``; 0 takes θ(t+1)).
        eval_model: what evaluation scores: "global" (every fragment's θ(t)) or "local".
        owner_damping: γ, the single-owner remedy (``docs/overlap.md`` has the others' semantics;
            issue 16): the averaged Δ of an element trained by m < K replicas is scaled by
            (m / K)^γ, i.e. Σ_k Δ_k / m^(1−γ) / K^γ. 0: Algorithm 1's count normalisation (the
            paper); 1: divide by K as if the non-owners had contributed Δ = 0 (plain DiLoCo's mean
            over replicas). Elements every replica trains (m = K) are unaffected.
        merge_diagnostic: at every sync, score a fixed probe batch on the replicas' local models
            (mean), the plain merge θ(t) + Δ̄ and θ(t+1), and log the merge gain
            (:class:`megatron_ppu.sync.diloco.MergeDiagnostic`).
    """

    FLAG_PREFIX: ClassVar[str] = "diloco"

    local_steps: int = setting(50, "H: inner steps per round; 0 = synchronous DDP baseline.")
    outer_lr: float = setting(0.4, "Outer Nesterov learning rate (the PPU paper's 0.4, as in Streaming DiLoCo; "
                                   "the original DiLoCo used 0.7).")
    outer_momentum: float = setting(0.9, "Outer Nesterov momentum.")
    nesterov: bool = setting(True, "Nesterov (True) or heavy-ball outer momentum.", cli=False)
    num_replicas: Optional[int] = setting(None, "K: replicas; inner DP = DP / K. None: every DP rank is a replica.",
                                          flag="--diloco-replicas")
    streaming_fragments: int = setting(1, "F: fragments synced at staggered steps, counting the "
                                          "embeddings/output fragment (paper: 9 = 8 layer groups + 1).")
    allreduce_dtype: str = setting("fp32", "Payload of the cross-replica reduction: fp32 / bf16 all-reduce, or "
                                           "int8 / fp8 (e4m3) quantized reduce-scatter + all-gather with an fp32 "
                                           "scale per --diloco-quantization-block values.",
                                   choices=list(ALLREDUCE_DTYPES))
    quantization_block: int = setting(256, "Values per fp32 scale of an int8 / fp8 payload.")
    error_feedback: bool = setting(False, "int8 / fp8: keep each rank's quantization residual (on the "
                                          "collective's device, checkpointed) and add it to its next delta.")
    sync_delay: int = setting(0, "tau: inner steps a fragment's reduction overlaps before its outer step is "
                                 "applied (0 = synchronous; must be below the steps between two fragment syncs).")
    merge_alpha: float = setting(0.0, "alpha, with --diloco-sync-delay > 0: local parameters after the delayed "
                                      "outer step = (1 - alpha) x global + alpha x local (0 = take the global).")
    eval_model: str = setting("global", "What evaluation scores: global = the global model (every fragment's "
                                        "latest synchronised parameters θ(t), the same on every replica: the model "
                                        "a user ships); local = each replica's local weights, averaged over "
                                        "replicas (for studies).", choices=["global", "local"])
    owner_damping: float = setting(0.0, "gamma: scale the averaged outer delta of elements trained by m < K "
                                        "replicas (PPU slices, SDP blocks) by (m/K)^gamma; 0 = the paper's "
                                        "count normalisation, 1 = divide by K (a remedy for slices with one "
                                        "owner, issue 16).")
    merge_diagnostic: bool = setting(False, "At every outer sync, score one probe batch (the first validation "
                                            "batch) on the replicas' local models (mean), the plain merge "
                                            "theta(t) + mean delta and theta(t+1), and log the merge gain (local - "
                                            "outer step; TensorBoard merge/*): whether the slicing is too fine for "
                                            "the number of replicas. Cost: 3 forward passes of the probe batch "
                                            "(one iteration's micro-batches) per fragment sync.")

    @property
    def enabled(self) -> bool:
        return self.local_steps > 0

    @property
    def quantized(self) -> bool:
        return self.allreduce_dtype in QUANTIZED_DTYPES


def fragment_offsets(num_fragments: int, local_steps: int) -> list:
    """The inner step (mod H) after which each fragment syncs: ((f + 1) H // F) mod H."""
    return [((f + 1) * local_steps // num_fragments) % local_steps for f in range(num_fragments)]


def min_sync_gap(num_fragments: int, local_steps: int) -> int:
    """The fewest inner steps between two consecutive fragment syncs (H with one fragment)."""
    offs = sorted(fragment_offsets(num_fragments, local_steps))
    if len(offs) == 1:
        return local_steps
    return min((offs[(i + 1) % len(offs)] - o) % local_steps for i, o in enumerate(offs))


def check_replicas_divide_data_parallel(num_replicas: int, data_parallel_size: int) -> None:
    """K replicas must split the DP ranks into equal inner-DP groups."""
    if data_parallel_size % num_replicas != 0:
        raise ValueError(
            f"--diloco-replicas {num_replicas} must divide the data-parallel size {data_parallel_size} "
            f"(world size / (TP x PP)); choose one of {_divisors(data_parallel_size)}."
        )


def validate_diloco_config(cfg: DiLoCoConfig, *, data_parallel_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the flag and the fix for an invalid outer-loop schedule."""
    if cfg.local_steps < 0:
        raise ValueError(f"--diloco-local-steps must be >= 0 (0 = synchronous DDP), got {cfg.local_steps}.")
    if cfg.num_replicas is not None and cfg.num_replicas < 1:
        raise ValueError(f"--diloco-replicas must be >= 1, got {cfg.num_replicas}.")
    if data_parallel_size is not None and cfg.num_replicas is not None:
        check_replicas_divide_data_parallel(cfg.num_replicas, data_parallel_size)
    if cfg.allreduce_dtype not in ALLREDUCE_DTYPES:
        raise ValueError(f"--diloco-allreduce-dtype must be one of {', '.join(ALLREDUCE_DTYPES)}, "
                         f"got {cfg.allreduce_dtype!r}.")
    if cfg.quantization_block < 1:
        raise ValueError(f"--diloco-quantization-block must be >= 1, got {cfg.quantization_block}.")
    if cfg.error_feedback and not cfg.quantized:
        raise ValueError(f"--diloco-error-feedback keeps the quantization residual of an int8 / fp8 payload; "
                         f"with --diloco-allreduce-dtype {cfg.allreduce_dtype} there is none. Drop the flag or "
                         f"use --diloco-allreduce-dtype int8 / fp8.")
    if cfg.sync_delay < 0:
        raise ValueError(f"--diloco-sync-delay must be >= 0, got {cfg.sync_delay}.")
    if not 0.0 <= cfg.merge_alpha <= 1.0:
        raise ValueError(f"--diloco-merge-alpha must be in [0, 1], got {cfg.merge_alpha}.")
    if cfg.merge_alpha != 0.0 and cfg.sync_delay == 0:
        raise ValueError("--diloco-merge-alpha mixes the local progress made during a delayed sync into the "
                         "outer step's result; with --diloco-sync-delay 0 there is none. Give "
                         "--diloco-sync-delay > 0 or drop --diloco-merge-alpha.")
    if not 0.0 <= cfg.owner_damping <= 1.0:
        raise ValueError(f"--diloco-owner-damping must be in [0, 1], got {cfg.owner_damping}.")
    if cfg.eval_model not in ("global", "local"):
        raise ValueError(f"--diloco-eval-model must be global or local, got {cfg.eval_model!r}.")
    if not cfg.enabled:
        outer_only = [flag for flag, given in (
            ("--diloco-streaming-fragments", cfg.streaming_fragments != 1),
            ("--diloco-allreduce-dtype", cfg.allreduce_dtype != "fp32"), ("--diloco-error-feedback", cfg.error_feedback),
            ("--diloco-sync-delay", cfg.sync_delay != 0), ("--diloco-merge-alpha", cfg.merge_alpha != 0.0),
            ("--diloco-merge-diagnostic", cfg.merge_diagnostic)) if given]
        if outer_only:
            raise ValueError(f"{', '.join(outer_only)} set the DiLoCo outer sync, which --diloco-local-steps 0 "
                             "(synchronous DDP) does not have: give --diloco-local-steps > 0 or drop them.")
        return
    if not cfg.outer_lr > 0:
        raise ValueError(f"--diloco-outer-lr must be > 0, got {cfg.outer_lr}.")
    if not 0 <= cfg.outer_momentum < 1:
        raise ValueError(f"--diloco-outer-momentum must be in [0, 1), got {cfg.outer_momentum}.")
    if cfg.nesterov and cfg.outer_momentum == 0:
        raise ValueError("Nesterov outer momentum needs --diloco-outer-momentum > 0.")
    if cfg.streaming_fragments < 1:
        raise ValueError(f"--diloco-streaming-fragments must be >= 1, got {cfg.streaming_fragments}.")
    if cfg.streaming_fragments > cfg.local_steps:
        raise ValueError(
            f"--diloco-streaming-fragments {cfg.streaming_fragments} exceeds --diloco-local-steps "
            f"{cfg.local_steps}: each fragment needs its own sync step within a round (H >= F). "
            f"Raise --diloco-local-steps or use fewer fragments."
        )
    gap = min_sync_gap(cfg.streaming_fragments, cfg.local_steps)
    if cfg.sync_delay >= gap:
        raise ValueError(
            f"--diloco-sync-delay {cfg.sync_delay} would keep two fragments' reductions in flight at once: with "
            f"--diloco-local-steps {cfg.local_steps} and --diloco-streaming-fragments {cfg.streaming_fragments} "
            f"the next fragment syncs {gap} inner step(s) after the previous one, and only one reduction may be "
            f"in flight. Use --diloco-sync-delay < {gap}, or fewer fragments / a larger H."
        )


# ------------------------------------------------------------------------ subnetworks (SDP)
@dataclass(frozen=True)
class SubnetConfig:
    """Subnetwork data parallelism (see :mod:`megatron_ppu.subnet`).

    Attributes:
        plan: "ppu", "neurons" or "blocks".
        masking: "backward" (full forward, sparse backward) or "forward" (non-held part
            skipped in the forward pass too).
        coverage: blocks plan: fraction of the transformer blocks each replica holds.
        sync: "outer" (every H steps through DiLoCo) or "step" (SDP: every step).
        seed: seed of the block assignment (not a flag: the parser sets it to ``--seed``).
    """

    FLAG_PREFIX: ClassVar[str] = "subnet"

    plan: str = setting("ppu", "Ownership plan: ppu (MLP slices, backward masking), neurons (MLP slices, "
                               "forward masking), blocks (transformer blocks).", choices=["ppu", "neurons", "blocks"])
    masking: str = setting("backward", "backward: full forward, sparse backward; forward: the non-held "
                                       "part is skipped in the forward too.", choices=["backward", "forward"])
    coverage: float = setting(1.0, "Blocks plan: fraction of the transformer blocks each replica holds.")
    sync: str = setting("outer", "outer: sync every H steps through DiLoCo; step: SDP, gradients averaged "
                                 "over each parameter's holders every step.", choices=["outer", "step"])
    seed: int = setting(0, "Seed of the block assignment.", cli=False)


def check_block_balance(num_replicas: int, num_layers: int, coverage: float) -> int:
    """Blocks per replica b; raises ``ValueError`` unless every replica holds the same number
    b >= 1 of blocks and every block the same number c >= 1 of holders (K b = L c)."""
    K, L = num_replicas, num_layers
    b_exact = coverage * L
    b = int(round(b_exact))
    if not 0 < coverage <= 1 or abs(b_exact - b) > 1e-9 or b < 1:
        raise ValueError(
            f"--subnet-coverage {coverage} x {L} layers must be a whole number >= 1 of blocks per "
            f"replica; use a multiple of 1/{L} (e.g. {', '.join(f'{i}/{L}' for i in range(1, L + 1))})."
        )
    if (K * b) % L:
        raise ValueError(
            f"{K} replicas holding {b} of {L} blocks each cannot hold every block the same number of "
            f"times (K*b = {K * b} is not a multiple of L = {L}); change --subnet-coverage or the "
            f"number of replicas."
        )
    return b


def validate_subnet_config(cfg: SubnetConfig, *, num_slices: int, num_replicas: Optional[int],
                           num_layers: int) -> None:
    """Raise ``ValueError`` naming the fix for an unusable plan. ``num_replicas`` None (not
    known yet): the builder checks the blocks' balance with :func:`check_block_balance`."""
    if cfg.plan not in ("ppu", "neurons", "blocks"):
        raise ValueError(f"--subnet-plan must be ppu, neurons or blocks, got {cfg.plan!r}.")
    if cfg.masking not in ("backward", "forward"):
        raise ValueError(f"--subnet-masking must be backward or forward, got {cfg.masking!r}.")
    if cfg.sync not in ("outer", "step"):
        raise ValueError(f"--subnet-sync must be outer or step, got {cfg.sync!r}.")
    if cfg.plan == "ppu" and cfg.masking != "backward":
        raise ValueError("--subnet-plan ppu is backward masking by definition; use --subnet-plan neurons "
                         "for forward-masked MLP slices.")
    if cfg.plan == "neurons":
        if cfg.masking != "forward":
            raise ValueError("--subnet-plan neurons with backward masking is PPU: use --subnet-plan ppu.")
        if num_slices < 2:
            raise ValueError("--subnet-plan neurons needs --ppu-slices N > 1 (each replica keeps 1/N of the units).")
    if cfg.plan == "blocks":
        if num_slices != 1:
            raise ValueError("--subnet-plan blocks does not combine with --ppu-slices > 1; use one plan.")
        if num_replicas is not None:
            check_block_balance(num_replicas, num_layers, cfg.coverage)
    elif cfg.coverage != 1.0:
        raise ValueError("--subnet-coverage applies to --subnet-plan blocks only (neurons/ppu: 1/--ppu-slices).")


# -------------------------------------------------------------------- fault tolerance (torchft)
FT_MODES = ("none", "torchft")
#: The torchft release the wire protocol and the bind patch (``patches/torchft.py``) are written for.
TORCHFT_VERSION = "0.2.0"


@dataclass(frozen=True)
class FaultToleranceConfig:
    """Replicas as independent jobs (issue 24): ``--fault-tolerance torchft``.

    Each replica is its own torchrun job (its world: TP x PP x inner-DP) in slot
    ``--ft-replica-id`` K of ``--diloco-replicas``; torchft's lighthouse forms a quorum per fragment
    sync, a replica that dies is left out of the next quorum, one that (re)joins heals from a live
    peer. ``none`` (the default) is today's single world, unchanged.

    Attributes:
        mode: ``"none"`` or ``"torchft"``.
        lighthouse: ``HOST:PORT`` of the ``torchft_lighthouse`` of the run.
        replica_id: this job's slot K, 0 <= K < ``--diloco-replicas`` (its PPU slice ``K mod N``,
            its SDP holdings, its data shard); a restarted replica keeps its slot.
        bind_address: the IP address every server this replica opens for the others (torchft's
            manager server, its checkpoint (heal) server, the gloo pairs) listens on and advertises;
            never the wildcard.
        min_replicas: fewest live replicas with which a sync may commit.
        timeout: seconds a cross-replica collective, a commit vote or a heal transfer may take
            before the sync is discarded and the member in fault is left out of the next quorum.
        quorum_timeout: seconds a replica waits for a quorum; must exceed the longest time between
            two fragment syncs (H / F inner steps) plus a restart of a replica that others wait for.
        connect_timeout: seconds to reach the lighthouse and the peers' manager servers.
        heartbeat_interval: seconds between this replica's heartbeats to the lighthouse; the
            lighthouse's ``--heartbeat_timeout_ms`` (how soon a silent replica is declared dead)
            must be several intervals (see the README's "Several sites").
    """

    FLAG_PREFIX: ClassVar[str] = "ft"

    mode: str = setting("none", "none: every replica in one torchrun world (a failure anywhere stops the run); "
                                "torchft: each replica its own torchrun job, joined through a torchft lighthouse "
                                "(survives the loss of replicas, joiners heal from a live peer).",
                        flag="--fault-tolerance", choices=list(FT_MODES))
    lighthouse: Optional[str] = setting(None, "HOST:PORT of the run's torchft_lighthouse (--fault-tolerance torchft).")
    replica_id: Optional[int] = setting(None, "This job's replica slot K, 0 <= K < --diloco-replicas: its PPU slice "
                                              "K mod N, SDP holdings and data shard (--fault-tolerance torchft).")
    bind_address: str = setting("127.0.0.1", "IP address the replica's servers for the other replicas (torchft "
                                             "manager, heal checkpoint server, gloo) listen on and advertise; the "
                                             "address the other sites reach this one at. Never the wildcard.")
    min_replicas: int = setting(1, "Fewest live replicas with which a fragment sync may commit.")
    timeout: float = setting(60.0, "Seconds a cross-replica reduction, commit vote or heal transfer may take before "
                                   "the sync is discarded (WAN: above the slowest fragment's transfer time).")
    quorum_timeout: float = setting(1800.0, "Seconds to wait for a quorum; must exceed the longest gap between two "
                                            "fragment syncs (H/F inner steps) on the slowest replica.")
    connect_timeout: float = setting(60.0, "Seconds to reach the lighthouse and the peers' manager servers.")
    heartbeat_interval: float = setting(1.0, "Seconds between heartbeats to the lighthouse (its "
                                             "--heartbeat_timeout_ms should be several of these).")

    @property
    def enabled(self) -> bool:
        return self.mode == "torchft"


def _host_port(value: str) -> Tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` / ``[V6]:PORT``; ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ft-lighthouse {value!r} is not HOST:PORT (e.g. 10.0.0.5:29510, the --bind of "
                         "torchft_lighthouse).")
    return host.strip("[]"), int(port)


def check_bind_address(address: str) -> None:
    """``--ft-bind-address`` must be one IP address of this host, not the wildcard."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"--ft-bind-address {address!r} is not an IP address: give the address of the interface "
                         "the other replicas reach this one at (e.g. 10.0.0.7; 127.0.0.1 for one host).") from None
    if ip.is_unspecified:
        raise ValueError(f"--ft-bind-address {address}: the wildcard would expose the replica's servers on every "
                         "interface; give the address of the one interface the other replicas reach this one at.")


def validate_fault_tolerance_config(cfg: FaultToleranceConfig, *, num_replicas: Optional[int], uses_outer_loop: bool,
                                    explicit: frozenset = frozenset()) -> None:
    """Raise ``ValueError`` naming the flag and the fix; ``explicit``: the dests given on the command
    line (an ``--ft-*`` flag given without ``--fault-tolerance torchft`` is refused, not ignored)."""
    if cfg.mode not in FT_MODES:
        raise ValueError(f"--fault-tolerance must be one of {', '.join(FT_MODES)}, got {cfg.mode!r}.")
    if not cfg.enabled:
        given = sorted(field_flag(f, FaultToleranceConfig.FLAG_PREFIX) for f, _, dest
                       in cli_fields(FaultToleranceConfig) if dest in explicit and f.name != "mode")
        if given:
            raise ValueError(f"{', '.join(given)} {'configures' if len(given) == 1 else 'configure'} "
                             f"--fault-tolerance torchft; with --fault-tolerance none "
                             "(one torchrun world) they would be ignored. Add --fault-tolerance torchft or drop them.")
        return
    missing = [flag for flag, v in (("--ft-lighthouse", cfg.lighthouse), ("--ft-replica-id", cfg.replica_id),
                                    ("--diloco-replicas", num_replicas)) if v is None]
    if missing:
        raise ValueError(f"--fault-tolerance torchft needs {', '.join(missing)}: the lighthouse to join, this job's "
                         "replica slot and the number of slots K of the run.")
    if not uses_outer_loop:
        raise ValueError("--fault-tolerance torchft synchronises replicas at the DiLoCo outer sync; give "
                         "--diloco-local-steps > 0 (per-step synchronisation, --diloco-local-steps 0 or "
                         "--subnet-sync step, has no point at which a replica may leave or join).")
    if not 0 <= cfg.replica_id < num_replicas:
        raise ValueError(f"--ft-replica-id {cfg.replica_id} is not a slot of --diloco-replicas {num_replicas}: "
                         f"give 0 <= K < {num_replicas}.")
    _host_port(cfg.lighthouse)
    check_bind_address(cfg.bind_address)
    if not 1 <= cfg.min_replicas <= num_replicas:
        raise ValueError(f"--ft-min-replicas {cfg.min_replicas} must be in [1, --diloco-replicas {num_replicas}].")
    for flag, v in (("--ft-timeout", cfg.timeout), ("--ft-quorum-timeout", cfg.quorum_timeout),
                    ("--ft-connect-timeout", cfg.connect_timeout), ("--ft-heartbeat-interval", cfg.heartbeat_interval)):
        if not v > 0:
            raise ValueError(f"{flag} must be > 0 seconds, got {v}.")
    if cfg.quorum_timeout < cfg.timeout:
        raise ValueError(f"--ft-quorum-timeout {cfg.quorum_timeout} is below --ft-timeout {cfg.timeout}: a quorum "
                         "waits for the slowest replica's whole round; raise --ft-quorum-timeout.")
    if cfg.heartbeat_interval >= cfg.timeout:
        raise ValueError(f"--ft-heartbeat-interval {cfg.heartbeat_interval} must be below --ft-timeout "
                         f"{cfg.timeout}.")
    check_torchft_installed()


def check_torchft_installed() -> None:
    """``ValueError`` with the install command unless torchft ``TORCHFT_VERSION`` is importable."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torchft")
    except PackageNotFoundError:
        found = None
    if found != TORCHFT_VERSION:
        raise ValueError(f"--fault-tolerance torchft needs torchft=={TORCHFT_VERSION} (found "
                         f"{found or 'none'}); install it with `pip install torchft=={TORCHFT_VERSION}` (the set-up, "
                         "scripts/setup_env.sh, does). Every process of a run must use the same torchft: 0.3 cannot "
                         "talk to 0.2.")


#: The feature settings, in the order of ``pretrain_gpt_ppu.py --help``.
FEATURES: List[type] = [PPUConfig, DiLoCoConfig, SubnetConfig, FaultToleranceConfig]
