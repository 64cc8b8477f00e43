"""Analytical cost model for PPU / (Streaming) DiLoCo / DDP training.

Predicts, before a cluster is booked, what one training configuration costs per
GPU: parameters, device (and host) memory, FLOPs per step, bytes on the wire per
synchronisation and the resulting step times under a bandwidth limit. It follows
the paper "Partial Parameter Updates for Efficient Distributed Training"
(Filippova et al., 2025): §3.1 (how memory is measured), Table 1, Appendix B
(ring all-reduce model) and Appendix C.2 (FLOPs formulas).

Everything here is plain arithmetic on dataclasses: no torch, no printing
(``tools/estimate.py`` is the command-line front end).

Units
-----
Bytes are bytes; ``GB`` in this module means 1e9 bytes. The paper's memory column
is reproduced with GB = 1e9; with GiB (2**30) every row would be ~7 % lower.
Bandwidth is in bytes per second (the paper's "2.875 GB/s" is 2.875e9 B/s =
23 Gbit/s). FLOPs count a multiply-add as 2.

The paper's model (1.3B, "GPT-3 XL")
------------------------------------
24 layers, hidden 2048, 16 heads, FFN 4 x 2048 = 8192 (GeLU/ReLU-type MLP, not
SwiGLU), sequence 1024, vocabulary 32,000 (stated in §3.1), rotary positions (no
position-embedding table). The paper does not say whether input and output
embeddings are tied; **tied** embeddings reproduce every trainable-parameter count
of Table 1 (1.2737B total: 1.3 -> 0.87 / 0.67 / 0.57 / 0.52 / 0.72 / 0.44 B;
untied embeddings would give 0.94 B for "1/2 mlps" instead of 0.87). Biases are
left out (they change the counts by < 0.1 %); norms are LayerNorms (weight and
bias). Per-GPU micro-batch 16 (global batch 512 over 32 nodes), no gradient
accumulation, no tensor or pipeline parallelism.

Memory model (what reproduces Table 1 and §2.1's "roughly 18 GB")
------------------------------------------------------------------
The paper's memory column counts only model state, not activations: "with
activation recomputation, peak memory is dominated by (i) optimizer states,
(ii) weights, (iii) gradients, (iv) outer-optimizer states, (v) offloaded
parameters". Reading its text and fitting its seven rows gives, per GPU:

* weights: **fp32 for every parameter, 4 B** ("a master copy of model parameters
  is typically maintained in float32 ..., with parameters cast to bfloat16 on the
  fly": no persistent bf16 copy). Frozen parameters are kept too (the forward
  pass and the input-gradient pass use them).
* gradients: **bf16, 2 B per trainable parameter** ("gradients are stored in
  bfloat16").
* inner AdamW state: **m and v in fp32, 8 B per trainable parameter**.
* outer state: Nesterov momentum **fp32 for every parameter** of a fragment, and
  the theta(t) snapshot ("offloaded parameters") **fp32 for the trainable
  parameters** of a fragment only: a frozen entry is never changed by the inner
  steps, so on that node it still equals theta(t) and needs no copy.
* Streaming DiLoCo: both live on the host; only one fragment is staged on the
  device at a time, so the device holds the **largest fragment** (3 of the 24
  layers: 8 groups of 3 layers plus a 9th fragment for the embeddings and the
  final norm, Appendix A.1).

So memory = 4 P + (2 + 8) P_train + 4 P_frag + 4 P_frag_train. A straight-line
fit of the paper's six PPU rows gives 10.43 GB per billion trainable parameters
and an intercept of 5.78 GB; this model has 10.47 (= 10 B/param + 4 B x 151M /
1.274B for the staged snapshot) and 5.70 GB (4 B x 1.274B weights + 4 B x 151M
staged momentum). DDP (no outer state) comes out at 14 B x 1.274B =
17.8 GB, the paper's "roughly 18 GB" (§2.1).

Result (``tools/estimate.py --paper-table``): the six PPU rows are reproduced
within 0.4-0.9 % (all slightly low); the Streaming DiLoCo row is 1.7 % low
(19.04 vs 19.36 GB). No consistent assumption found here closes that last gap:
the PPU rows fix the per-trainable-parameter slope to 10.43 B, and extrapolating
that line to the full model lands at 19.07 GB. The paper's full row may have
used the nominal "1.3B" parameters (which gives 19.3 GB), but that is a guess
and is *not* applied here.

Megatron memory layout (the default for the command line with ``--bf16``)
---------------------------------------------------------------------------
``Precision.megatron(bf16=True)``: bf16 model weights for every parameter, an
fp32 master copy of the trainable ones (Megatron's mixed-precision optimizer),
fp32 gradient buffers (Megatron-LM forces ``accumulate_allreduce_grads_in_fp32``
with bf16), Adam m/v fp32. Megatron's distributed optimizer (sharding inside a
replica) is not modelled.

Activation memory
-----------------
Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
models"), generalised to GQA, SwiGLU and any FFN width, per layer and
micro-batch (s sequence, b micro-batch, h hidden, a heads, t tensor-parallel,
bf16 activations, 1-byte dropout masks)::

    34 s b h + 5 a s^2 b  (t = 1, MHA, FFN = 4h, dropout on) -- exactly their formula

``selective`` recompute drops the attention-core s^2 terms; ``full`` recompute
keeps only each layer's input (2 s b h) plus, during the backward, one layer's
full activations. Fused/flash attention stores no s^2 terms. The first pipeline
stage holds min(pp, num_microbatches) micro-batches in flight. The output
layer's fp32 cross-entropy logits (4 s b v / t) are counted on the last stage.
PPU does not reduce activation memory (paper App. D: the full input Jacobian is
still computed). Activations are reported separately and are *not* part of the
paper comparison.

FLOPs (paper App. C.2, per step and replica)
--------------------------------------------
Forward: embedding B S H, Q/K/V projections, attention matmuls 4 B S^2 H (no
causal halving, as in the paper), W_O, MLP, output layer 2 B S H V + 3 B S V.
Backward: every linear layer's input Jacobian in full; its weight gradient times
the trained fraction (rho_mlp = 1/N for fc1/fc2, rho_attn = 1/N for Q/K/V when
heads are sliced, 1 for W_O and everything else); attention matmuls, embedding
and output layer 2x forward. "Model FLOPs" exclude activation recomputation (as
the paper's formulas do); "hardware FLOPs" add the recomputed forward.

The "15 % fewer FLOPs" of §3.2 / Fig. 2b compares *total* training FLOPs of
performance-matched runs: 1/4 MLPs at 26B tokens vs Streaming DiLoCo at 26B
(same perplexity, so the ratio is the per-step ratio 0.853: 14.7 % fewer);
1/2 MLPs at 26B vs Streaming DiLoCo at 28B (16.2 % fewer); 1/2 and 1/4 MLPs +
heads at 28B vs Streaming DiLoCo at 28B / 26B (13.4 % / 14.0 % fewer). All four
are "about 15 %"; ``paper_flops_comparisons()`` returns them.

Communication (paper §3.1, App. B)
----------------------------------
Bandwidth-optimal ring all-reduce (reduce-scatter + all-gather): every rank sends
2 (K-1)/K x M bytes, T = 2 (K-1)/K x M / B. DDP all-reduces the gradients every
step (bf16 in App. B: M = 2 B x 1.3e9 = 2.6 GB -> 1.75 s at 2.875 GB/s; with the
model's exact 1.274B parameters 1.72 s). DiLoCo / PPU all-reduce the dense
parameter delta of every parameter once per H steps (PPU's delta is zero outside
the trainable slice but the paper all-reduces it densely and reports "the same
bandwidth"); streaming splits it into per-fragment syncs with the same total.
Simulated step times (§3.2): DDP max(T_comp, T_comm) (perfect overlap); low-
communication methods T_comp + T_sync / H (no overlap).

PPU under tensor parallelism: every TP shard of a sliced weight is cut into N
slices (as ``megatron_ppu.ownership`` does), so each GPU trains 1/N of its shard.

Not modelled: data-parallel ranks inside a replica (distributed optimizer),
interleaved pipeline schedules, MoE, FP8, CPU/pinned staging buffers beyond the
one fragment, memory fragmentation and CUDA context / workspace memory.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_ppu.config import PPUConfig, validate_ppu_config
from megatron_ppu.sync.compress import QUANTIZED_KINDS, payload_bytes
from megatron_ppu.training.arguments import (
    TrainArgs,
    data_parallel_size,
    ffn_hidden_size,
    replica_count,
)
from megatron_ppu.training.schedule import batch_schedule

logger = logging.getLogger(__name__)

GB = 1e9

#: Bytes per value of stored state and of the DDP gradient all-reduce.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
#: Payload dtypes of the outer sync (``--diloco-allreduce-dtype``): int8 / fp8 also carry one fp32
#: scale per ``PPUShape.quantization_block`` values (:func:`outer_payload_bytes`).
OUTER_COMM_DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8")

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A GPT model's shape, with Megatron's meaning and defaults.

    ``ffn_hidden_size`` defaults to 4 x hidden, ``num_query_groups`` to the
    number of heads (plain multi-head attention), ``kv_channels`` to
    hidden / heads. ``tie_embeddings`` is Megatron's default (the flag is
    ``--untie-embeddings-and-output-weights``). With ``swiglu`` fc1 has 2 x ffn
    rows (gate and up halves). ``position_embedding_type`` "learned_absolute"
    adds a ``max_position_embeddings x hidden`` table; "rope"/"none" add none.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    vocab_size: int = 32000
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 1024
    max_position_embeddings: Optional[int] = None
    tie_embeddings: bool = True
    swiglu: bool = False
    add_bias_linear: bool = True
    normalization: str = "LayerNorm"
    position_embedding_type: str = "learned_absolute"
    dropout: bool = True
    fused_attention: bool = False

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def groups(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection: heads x kv_channels."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections: groups x kv_channels."""
        return self.groups * self.head_dim

    @property
    def fc1_rows(self) -> int:
        return 2 * self.ffn if self.swiglu else self.ffn

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings if self.max_position_embeddings is not None else self.seq_length


@dataclass(frozen=True)
class TrainShape:
    """Per-replica batch and model-parallel layout.

    ``num_microbatches`` is the gradient-accumulation count per step (Megatron:
    global_batch / (micro_batch x data-parallel size)). ``recompute_granularity``
    is Megatron's: "none", "selective" (core attention) or "full" (every layer,
    one layer per checkpoint).
    """

    micro_batch_size: int = 1
    num_microbatches: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str = "none"


@dataclass(frozen=True)
class PPUShape:
    """Partial-parameter-update and DiLoCo layout.

    * ``slices`` N: every MLP (and, with ``slice_attention_heads``, the Q/K/V of
      every attention) is split into N slices; a replica trains one. N = 1 is
      plain (Streaming) DiLoCo.
    * ``replicas`` K: nodes (replicas) taking part in the sync; K % N == 0.
    * ``local_steps`` H: inner steps between syncs.
    * ``streaming_fragments`` F: number of transformer-layer groups synchronised
      separately. F = 1 is non-streaming DiLoCo (one sync of everything). For
      F > 1 the non-layer parameters (embeddings, final norm, output layer) form
      one extra fragment, as in the paper's 8 groups of 3 layers + 1.
    * ``outer_optimizer``: False models plain DDP (per-step gradient all-reduce,
      no outer state).
    * ``outer_state_placement``: where the outer momentum and theta(t) snapshot
      live. "device": all on the GPU. "stream": on the host, one fragment staged
      on the GPU at a time (the paper's Streaming DiLoCo assumption). "host":
      entirely on the host (the outer step runs on the CPU).
    * ``snapshot_scope``: "trainable" (frozen entries equal theta(t) and need no
      copy; reproduces the paper) or "all".
    * ``quantization_block``: values per fp32 scale of an int8 / fp8 outer payload
      (``--diloco-quantization-block``).
    """

    slices: int = 1
    slice_attention_heads: bool = False
    replicas: int = 1
    local_steps: int = 100
    streaming_fragments: int = 1
    outer_optimizer: bool = True
    outer_state_placement: str = "stream"
    snapshot_scope: str = "trainable"
    quantization_block: int = 256


@dataclass(frozen=True)
class Precision:
    """Bytes of each kind of per-parameter state.

    ``params_dtype``: the persistent model weights (all parameters, frozen
    included). ``master_weights``: an extra fp32 copy of the *trainable*
    parameters kept by the optimizer (Megatron's mixed precision; leave False
    when the weights themselves are fp32). ``grad_dtype``: gradient buffers of
    the trainable parameters. ``optimizer_state_dtype``: Adam m and v.
    ``outer_state_dtype`` / ``snapshot_dtype``: Nesterov momentum and theta(t).
    ``grad_comm_dtype`` / ``outer_comm_dtype``: what goes on the wire for the
    per-step gradient all-reduce (DDP) and the outer delta all-reduce.
    """

    params_dtype: str = "bf16"
    master_weights: bool = True
    grad_dtype: str = "fp32"
    optimizer_state_dtype: str = "fp32"
    outer_state_dtype: str = "fp32"
    snapshot_dtype: str = "fp32"
    grad_comm_dtype: str = "fp32"
    outer_comm_dtype: str = "fp32"
    activation_dtype: str = "bf16"

    @classmethod
    def paper(cls) -> "Precision":
        """The paper's §3.1 assumptions (see the module docstring)."""
        return cls(params_dtype="fp32", master_weights=False, grad_dtype="bf16",
                   optimizer_state_dtype="fp32", outer_state_dtype="fp32",
                   snapshot_dtype="fp32", grad_comm_dtype="bf16",
                   outer_comm_dtype="bf16", activation_dtype="bf16")

    @classmethod
    def megatron(cls, bf16: bool = True) -> "Precision":
        """Megatron-LM's layout: bf16 weights + fp32 master/grads, or all fp32."""
        if bf16:
            return cls(params_dtype="bf16", master_weights=True, grad_dtype="fp32",
                       grad_comm_dtype="fp32", outer_comm_dtype="fp32",
                       activation_dtype="bf16")
        return cls(params_dtype="fp32", master_weights=False, grad_dtype="fp32",
                   grad_comm_dtype="fp32", outer_comm_dtype="fp32", activation_dtype="fp32")


@dataclass(frozen=True)
class EstimateConfig:
    """Everything the cost model needs; validated once, on construction."""

    model: ModelShape
    train: TrainShape = field(default_factory=TrainShape)
    ppu: PPUShape = field(default_factory=PPUShape)
    precision: Precision = field(default_factory=Precision)

    def __post_init__(self):
        _validate(self)


def _validate(cfg: EstimateConfig) -> None:
    """All configuration checks, in one place. Raises ValueError naming the fix."""
    m, t, p, pr = cfg.model, cfg.train, cfg.ppu, cfg.precision

    def positive(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                 "make_vocab_size_divisible_by", "seq_length"):
        positive(f"model.{name}", getattr(m, name))
    for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "max_position_embeddings"):
        if getattr(m, name) is not None:
            positive(f"model.{name}", getattr(m, name))
    for name in ("micro_batch_size", "num_microbatches", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size"):
        positive(f"train.{name}", getattr(t, name))
    for name in ("slices", "replicas", "local_steps", "streaming_fragments", "quantization_block"):
        positive(f"ppu.{name}", getattr(p, name))

    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ValueError(
            f"hidden_size {m.hidden_size} is not divisible by num_attention_heads "
            f"{m.num_attention_heads}: choose a divisible pair or set kv_channels")
    if m.num_attention_heads % m.groups:
        raise ValueError(
            f"num_attention_heads {m.num_attention_heads} must be a multiple of "
            f"num_query_groups {m.groups}: pick num_query_groups dividing the head count")
    if m.normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"normalization must be 'LayerNorm' or 'RMSNorm', got {m.normalization!r}")
    if m.position_embedding_type not in ("learned_absolute", "rope", "none"):
        raise ValueError("position_embedding_type must be 'learned_absolute', 'rope' or 'none', "
                         f"got {m.position_embedding_type!r}")
    if m.position_embedding_type == "learned_absolute" and m.max_positions < m.seq_length:
        raise ValueError(f"max_position_embeddings {m.max_positions} < seq_length {m.seq_length}: "
                         "raise max_position_embeddings or shorten the sequence")

    tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    if m.num_attention_heads % tp or m.groups % tp:
        raise ValueError(
            f"tensor_model_parallel_size {tp} must divide num_attention_heads "
            f"{m.num_attention_heads} and num_query_groups {m.groups}: lower the TP size")
    if m.ffn % tp:
        raise ValueError(f"tensor_model_parallel_size {tp} must divide ffn_hidden_size {m.ffn}")
    if m.num_layers % pp:
        raise ValueError(f"pipeline_model_parallel_size {pp} must divide num_layers "
                         f"{m.num_layers}: choose a PP size that divides the layer count")
    if t.sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1: drop sequence_parallel")
    if t.recompute_granularity not in ("none", "selective", "full"):
        raise ValueError("recompute_granularity must be 'none', 'selective' or 'full', "
                         f"got {t.recompute_granularity!r}")

    # The slicing rules are the implementation's own (each TP shard is cut into N slices).
    validate_ppu_config(PPUConfig(num_slices=p.slices, slice_attention_heads=p.slice_attention_heads),
                        num_replicas=p.replicas, ffn_hidden_size=m.ffn,
                        num_attention_heads=m.num_attention_heads,
                        num_query_groups=m.num_query_groups, tensor_model_parallel_size=tp)
    if p.streaming_fragments > m.num_layers:
        raise ValueError(f"streaming_fragments F={p.streaming_fragments} exceeds num_layers "
                         f"{m.num_layers}: use at most one fragment per layer")
    if not p.outer_optimizer and p.slices > 1:
        raise ValueError("partial parameter updates (slices > 1) need the outer optimizer: "
                         "set outer_optimizer=True (DDP has no slices)")
    if p.outer_state_placement not in ("device", "stream", "host"):
        raise ValueError("outer_state_placement must be 'device', 'stream' or 'host', "
                         f"got {p.outer_state_placement!r}")
    if p.snapshot_scope not in ("trainable", "all"):
        raise ValueError(f"snapshot_scope must be 'trainable' or 'all', got {p.snapshot_scope!r}")

    for name in ("params_dtype", "grad_dtype", "optimizer_state_dtype", "outer_state_dtype",
                 "snapshot_dtype", "grad_comm_dtype", "outer_comm_dtype", "activation_dtype"):
        value = getattr(pr, name)
        allowed = OUTER_COMM_DTYPES if name == "outer_comm_dtype" else sorted(DTYPE_BYTES)
        if value not in allowed:
            raise ValueError(f"precision.{name} must be one of {sorted(allowed)}, got {value!r}")


def shape_from_args(args: TrainArgs, world_size: int, *, vocab_size: Optional[int] = None,
                    precision: Optional[Precision] = None, outer_state_placement: Optional[str] = None,
                    snapshot_scope: str = "trainable", fused_attention: bool = False) -> EstimateConfig:
    """The cost model's input for a parsed trainer command line (:func:`megatron_ppu.training.
    arguments.parse_args`) on ``world_size`` ranks: the one translation from the trainer's
    settings to the model's shapes, used by ``tools/estimate.py`` and the benchmarks.

    What the trainer derives, it derives the same way here: the MLP width (Megatron-LM's,
    SwiGLU included), the data-parallel size, the replica count K (every DP rank without
    ``--diloco-replicas``; DDP's gradient all-reduce runs over all DP ranks), the micro-batches
    per step, and the fragments: the trainer's ``--diloco-streaming-fragments`` F counts the
    embeddings/output fragment, the model's ``streaming_fragments`` counts layer groups
    (F - 1 for F > 1). The outer payload is ``--diloco-allreduce-dtype`` with
    ``--diloco-quantization-block``.

    Args:
        vocab_size: the tokenizer's vocabulary (default ``--vocab-size``; required if neither).
        precision: default :meth:`Precision.megatron` for ``--bf16``/``--fp16``, with the outer
            payload dtype of ``--diloco-allreduce-dtype``.
        outer_state_placement: default "stream" with several fragments, else "device".
        snapshot_scope, fused_attention: as in :class:`PPUShape` / :class:`ModelShape`.
    """
    m, d, par = args.model, args.diloco, args.parallel
    vocab = vocab_size if vocab_size is not None else args.data.vocab_size
    if vocab is None:
        raise ValueError("the cost model needs the vocabulary size: pass --vocab-size (the tokenizer's "
                         "vocabulary, before Megatron's padding).")
    dp = data_parallel_size(args, world_size)
    if dp is None:
        raise ValueError(f"world size {world_size} is not divisible by TP {par.tensor_model_parallel_size} x PP "
                         f"{par.pipeline_model_parallel_size}; give a multiple of their product.")
    k = replica_count(args, dp)
    ddp = not d.enabled and args.subnet.sync != "step"
    _, num_microbatches = batch_schedule(args.training, dp)
    model = ModelShape(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=ffn_hidden_size(m), num_query_groups=m.num_query_groups if m.group_query_attention else None,
        kv_channels=m.kv_channels, vocab_size=vocab, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings,
        tie_embeddings=not m.untie_embeddings_and_output_weights, swiglu=m.swiglu,
        add_bias_linear=not m.disable_bias_linear, normalization=m.normalization,
        position_embedding_type=m.position_embedding_type,
        dropout=m.attention_dropout > 0 or m.hidden_dropout > 0, fused_attention=fused_attention)
    train = TrainShape(micro_batch_size=args.training.micro_batch_size, num_microbatches=num_microbatches,
                       tensor_model_parallel_size=par.tensor_model_parallel_size,
                       pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                       sequence_parallel=par.sequence_parallel, recompute_granularity=m.recompute_granularity or "none")
    f = d.streaming_fragments - 1 if d.streaming_fragments > 1 else 1
    ppu = PPUShape(slices=args.ppu.num_slices, slice_attention_heads=args.ppu.slice_attention_heads,
                   replicas=dp if ddp else k, local_steps=max(d.local_steps, 1), streaming_fragments=f,
                   outer_optimizer=not ddp,
                   outer_state_placement=outer_state_placement or ("stream" if f > 1 else "device"),
                   snapshot_scope=snapshot_scope, quantization_block=d.quantization_block)
    if precision is None:
        precision = Precision.megatron(bf16=args.precision.bf16 or args.precision.fp16)
        precision = Precision(**{**asdict(precision), "outer_comm_dtype": d.allreduce_dtype})
    return EstimateConfig(model=model, train=train, ppu=ppu, precision=precision)


# --------------------------------------------------------------------------
# Parameter inventory
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """One parameter tensor (or a per-layer family of them) on one pipeline stage."""

    name: str
    stage: int
    fragment: int
    numel: int  # full (unsharded) elements
    numel_rank: int  # elements on one tensor-parallel rank
    trained_fraction: float  # 1/N for sliced tensors, else 1
    counted_in_total: bool = True  # False for the tied output-layer copy on the last stage

    @property
    def trainable(self) -> float:
        return self.numel * self.trained_fraction

    @property
    def trainable_rank(self) -> float:
        return self.numel_rank * self.trained_fraction


def padded_vocab_size(cfg: EstimateConfig) -> int:
    """Megatron pads the vocabulary to a multiple of divisible_by x TP."""
    mult = cfg.model.make_vocab_size_divisible_by * cfg.train.tensor_model_parallel_size
    return int(math.ceil(cfg.model.vocab_size / mult) * mult)


def _layer_fragment(cfg: EstimateConfig, layer: int) -> int:
    # F contiguous groups whose sizes differ by at most one layer (24 / 8 -> 3 each).
    return layer * cfg.ppu.streaming_fragments // cfg.model.num_layers


def _nonlayer_fragment(cfg: EstimateConfig) -> int:
    f = cfg.ppu.streaming_fragments
    return 0 if f == 1 else f


def _parameter_groups(cfg: EstimateConfig) -> List[_Group]:
    m, t, p = cfg.model, cfg.train, cfg.ppu
    tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    h = m.hidden_size
    rho_mlp = 1.0 / p.slices
    rho_attn = 1.0 / p.slices if p.slice_attention_heads else 1.0
    norm = 2 * h if m.normalization == "LayerNorm" else h
    bias = m.add_bias_linear
    qkv_out = m.q_dim + 2 * m.kv_dim
    per_stage = m.num_layers // pp
    V = padded_vocab_size(cfg)
    groups: List[_Group] = []

    def add(name, stage, frag, numel, numel_rank, frac=1.0, counted=True):
        if numel:
            groups.append(_Group(name, stage, frag, numel, numel_rank, frac, counted))

    last = pp - 1
    nl = _nonlayer_fragment(cfg)
    add("embedding.word", 0, nl, V * h, V * h // tp)
    if m.position_embedding_type == "learned_absolute":
        add("embedding.position", 0, nl, m.max_positions * h, m.max_positions * h)
    for layer in range(m.num_layers):
        st, fr = layer // per_stage, _layer_fragment(cfg, layer)
        pre = f"layer{layer}."
        add(pre + "input_norm", st, fr, norm, norm)
        add(pre + "qkv.weight", st, fr, qkv_out * h, qkv_out * h // tp, rho_attn)
        if bias:
            add(pre + "qkv.bias", st, fr, qkv_out, qkv_out // tp, rho_attn)
        add(pre + "proj.weight", st, fr, h * m.q_dim, h * m.q_dim // tp)
        if bias:
            add(pre + "proj.bias", st, fr, h, h)
        add(pre + "pre_mlp_norm", st, fr, norm, norm)
        add(pre + "fc1.weight", st, fr, m.fc1_rows * h, m.fc1_rows * h // tp, rho_mlp)
        if bias:
            add(pre + "fc1.bias", st, fr, m.fc1_rows, m.fc1_rows // tp, rho_mlp)
        add(pre + "fc2.weight", st, fr, h * m.ffn, h * m.ffn // tp, rho_mlp)
        if bias:
            add(pre + "fc2.bias", st, fr, h, h)
    add("final_norm", last, nl, norm, norm)
    if not m.tie_embeddings:
        add("output_layer", last, nl, V * h, V * h // tp)
    elif pp > 1:
        # Megatron keeps a copy of the tied embedding on the last stage.
        add("output_layer(tied copy)", last, nl, V * h, V * h // tp, counted=False)
    return groups


@dataclass
class ParameterCounts:
    """Parameter counts. Per-replica numbers are for the whole (unsharded) model;
    per-rank numbers for one GPU of the peak stage (TP shard of one PP stage)."""

    total: int
    trainable: float  # per replica (every replica trains the same amount)
    frozen: float
    mlp_total: int
    attention_qkv_total: int
    embedding_total: int
    per_stage_total_rank: List[int]
    per_stage_trainable_rank: List[float]

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total


def count_parameters(cfg: EstimateConfig) -> ParameterCounts:
    groups = _parameter_groups(cfg)
    pp = cfg.train.pipeline_model_parallel_size
    total = sum(g.numel for g in groups if g.counted_in_total)
    trainable = sum(g.trainable for g in groups if g.counted_in_total)
    mlp = sum(g.numel for g in groups if ".fc1." in g.name or ".fc2." in g.name)
    qkv = sum(g.numel for g in groups if ".qkv." in g.name)
    emb = sum(g.numel for g in groups if g.name.startswith("embedding") or g.name == "output_layer")
    st_total = [sum(g.numel_rank for g in groups if g.stage == s) for s in range(pp)]
    st_train = [sum(g.trainable_rank for g in groups if g.stage == s) for s in range(pp)]
    return ParameterCounts(total=total, trainable=trainable, frozen=total - trainable,
                           mlp_total=mlp, attention_qkv_total=qkv, embedding_total=emb,
                           per_stage_total_rank=st_total, per_stage_trainable_rank=st_train)


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes on one GPU of the peak pipeline stage (and on its host)."""

    stage: int
    weights: float
    master_weights: float
    gradients: float
    optimizer_state: float
    outer_momentum: float  # on device
    snapshot: float  # on device
    activations: float
    host_outer_momentum: float
    host_snapshot: float

    @property
    def model_state(self) -> float:
        """What the paper's memory column counts: everything but activations."""
        return (self.weights + self.master_weights + self.gradients + self.optimizer_state
                + self.outer_momentum + self.snapshot)

    @property
    def total(self) -> float:
        return self.model_state + self.activations

    @property
    def host_total(self) -> float:
        return self.host_outer_momentum + self.host_snapshot

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d.update(model_state=self.model_state, total=self.total, host_total=self.host_total)
        return d


def activation_bytes(cfg: EstimateConfig, stage: int = 0) -> float:
    """Peak activation bytes on one GPU of pipeline ``stage`` (module docstring)."""
    m, t = cfg.model, cfg.train
    tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    s, b, h, a = m.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads
    e = DTYPE_BYTES[cfg.precision.activation_dtype]
    sbh = s * b * h
    rep = tp if t.sequence_parallel else 1  # divisor of the "replicated" sbh terms
    mask = 1 if m.dropout else 0

    # Per layer, no recompute.
    replicated = (e * sbh  # input norm input
                  + e * sbh  # QKV input
                  + mask * sbh  # attention-output dropout mask
                  + e * sbh  # pre-MLP norm input
                  + e * sbh  # fc1 input
                  + mask * sbh)  # MLP-output dropout mask
    sharded = (e * s * b * (m.q_dim + m.kv_dim)  # Q, K for Q K^T
               + e * s * b * m.kv_dim  # V
               + e * s * b * m.q_dim  # W_O input
               + e * s * b * m.fc1_rows  # activation-function input
               + e * s * b * m.ffn)  # fc2 input
    if m.fused_attention:
        core = 4 * a * s * b  # fp32 softmax statistics only
    else:
        core = (e + (1 + e) * mask) * a * s * s * b  # softmax out (+ dropout mask and output)
    full_layer = replicated / rep + (sharded + core) / tp

    g = t.recompute_granularity
    if g == "none":
        per_layer = full_layer
        working = 0.0
    elif g == "selective":
        per_layer = full_layer - core / tp
        working = core / tp  # one layer's recomputed core attention
    else:
        per_layer = e * sbh / rep  # layer input only
        working = full_layer  # one layer recomputed during the backward

    layers = m.num_layers // pp
    inflight = min(pp - stage, t.num_microbatches) if pp > 1 else 1
    total = layers * per_layer * inflight + working
    if stage == 0:
        total += mask * sbh / rep * inflight  # embedding dropout mask
    if stage == pp - 1:
        V = padded_vocab_size(cfg)
        total += e * sbh / rep  # final norm input
        total += e * sbh / rep  # output-layer input
        total += 4 * s * b * V / tp  # fp32 cross-entropy logits
    return float(total)


def estimate_memory(cfg: EstimateConfig) -> MemoryEstimate:
    """Device and host memory of one GPU of the stage with the largest total."""
    pr, p = cfg.precision, cfg.ppu
    groups = _parameter_groups(cfg)
    pp = cfg.train.pipeline_model_parallel_size
    best: Optional[MemoryEstimate] = None
    for stage in range(pp):
        gs = [g for g in groups if g.stage == stage]
        n_all = sum(g.numel_rank for g in gs)
        n_train = sum(g.trainable_rank for g in gs)
        weights = DTYPE_BYTES[pr.params_dtype] * n_all
        master = 4 * n_train if pr.master_weights else 0.0
        grads = DTYPE_BYTES[pr.grad_dtype] * n_train
        opt = 2 * DTYPE_BYTES[pr.optimizer_state_dtype] * n_train

        host_mom = host_snap = dev_mom = dev_snap = 0.0
        if p.outer_optimizer:
            mom_b, snap_b = DTYPE_BYTES[pr.outer_state_dtype], DTYPE_BYTES[pr.snapshot_dtype]

            def snap_elems(sel):
                return sum(g.numel_rank if p.snapshot_scope == "all" else g.trainable_rank
                           for g in sel)

            all_mom, all_snap = mom_b * n_all, snap_b * snap_elems(gs)
            if p.outer_state_placement == "device":
                dev_mom, dev_snap = all_mom, all_snap
            else:
                host_mom, host_snap = all_mom, all_snap
                if p.outer_state_placement == "stream":
                    frags = sorted({g.fragment for g in gs})
                    staged = [(mom_b * sum(g.numel_rank for g in gs if g.fragment == f),
                               snap_b * snap_elems([g for g in gs if g.fragment == f]))
                              for f in frags]
                    dev_mom, dev_snap = max(staged, key=lambda x: x[0] + x[1])
        est = MemoryEstimate(stage=stage, weights=weights, master_weights=master, gradients=grads,
                             optimizer_state=opt, outer_momentum=dev_mom, snapshot=dev_snap,
                             activations=activation_bytes(cfg, stage),
                             host_outer_momentum=host_mom, host_snapshot=host_snap)
        if best is None or est.total > best.total:
            best = est
    logger.debug("memory estimate: %s", best)
    return best


# --------------------------------------------------------------------------
# FLOPs (paper App. C.2)
# --------------------------------------------------------------------------


def layer_flop_terms(cfg: EstimateConfig, tokens: int) -> Dict[str, Dict[str, float]]:
    """FLOPs of one transformer layer for ``tokens`` = B x S tokens.

    Returns {component: {"forward", "dgrad", "wgrad", "rho"}}: ``dgrad`` is the
    input Jacobian (always computed in full), ``wgrad`` the *dense* weight
    gradient, to be multiplied by the trained fraction ``rho``. The attention
    matmuls have no weights; their whole backward is under "dgrad".
    """
    m, p = cfg.model, cfg.ppu
    h, S = m.hidden_size, m.seq_length
    rho_mlp = 1.0 / p.slices
    rho_attn = 1.0 / p.slices if p.slice_attention_heads else 1.0

    def linear(fan_in, fan_out, rho):
        f = 2.0 * tokens * fan_in * fan_out
        return {"forward": f, "dgrad": f, "wgrad": f, "rho": rho}

    core = 4.0 * tokens * S * m.q_dim  # Q K^T and A V, 2 B S^2 H each (paper: no causal halving)
    return {
        "qkv": linear(h, m.q_dim + 2 * m.kv_dim, rho_attn),
        "attention_core": {"forward": core, "dgrad": 2.0 * core, "wgrad": 0.0, "rho": 1.0},
        "proj": linear(m.q_dim, h, 1.0),
        "fc1": linear(h, m.fc1_rows, rho_mlp),
        "fc2": linear(m.ffn, h, rho_mlp),
    }


@dataclass
class FlopsEstimate:
    """FLOPs of one training step of one replica (all its micro-batches)."""

    tokens_per_step: int
    forward: float
    backward: float
    backward_dense: float  # the same model with every parameter trained
    recompute: float
    gpus_per_replica: int

    @property
    def model_flops(self) -> float:
        """Forward + backward, without recomputation (the paper's count)."""
        return self.forward + self.backward

    @property
    def model_flops_dense(self) -> float:
        return self.forward + self.backward_dense

    @property
    def hardware_flops(self) -> float:
        return self.model_flops + self.recompute

    @property
    def ratio_vs_dense(self) -> float:
        """Model FLOPs relative to training every parameter (Streaming DiLoCo/DDP)."""
        return self.model_flops / self.model_flops_dense

    @property
    def per_gpu_hardware_flops(self) -> float:
        """Mean over the replica's TP x PP GPUs."""
        return self.hardware_flops / self.gpus_per_replica

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d.update(model_flops=self.model_flops, model_flops_dense=self.model_flops_dense,
                 hardware_flops=self.hardware_flops, ratio_vs_dense=self.ratio_vs_dense,
                 per_gpu_hardware_flops=self.per_gpu_hardware_flops)
        return d


def estimate_flops(cfg: EstimateConfig) -> FlopsEstimate:
    m, t = cfg.model, cfg.train
    tokens = t.micro_batch_size * t.num_microbatches * m.seq_length
    h, L, V = m.hidden_size, m.num_layers, padded_vocab_size(cfg)
    terms = layer_flop_terms(cfg, tokens)
    emb = float(tokens * h)
    out = 2.0 * tokens * h * V + 3.0 * tokens * V
    layer_fwd = sum(c["forward"] for c in terms.values())
    layer_bwd = sum(c["dgrad"] + c["wgrad"] * c["rho"] for c in terms.values())
    layer_bwd_dense = sum(c["dgrad"] + c["wgrad"] for c in terms.values())
    forward = emb + L * layer_fwd + out
    backward = 2 * emb + L * layer_bwd + 2 * out
    backward_dense = 2 * emb + L * layer_bwd_dense + 2 * out
    g = t.recompute_granularity
    recompute = {"none": 0.0, "selective": L * terms["attention_core"]["forward"],
                 "full": L * layer_fwd}[g]
    return FlopsEstimate(tokens_per_step=tokens, forward=forward, backward=backward,
                         backward_dense=backward_dense, recompute=recompute,
                         gpus_per_replica=t.tensor_model_parallel_size * t.pipeline_model_parallel_size)


# --------------------------------------------------------------------------
# Communication and simulated time (paper §3.1, §3.2, App. B)
# --------------------------------------------------------------------------


def ring_allreduce_bytes_sent(message_bytes: float, ranks: int) -> float:
    """Bytes each rank sends in a bandwidth-optimal ring all-reduce: 2(K-1)/K x M."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    return 2.0 * (ranks - 1) / ranks * message_bytes


def ring_allreduce_time(message_bytes: float, ranks: int, bandwidth_bytes_per_s: float) -> float:
    """T_comm = 2(K-1)/K x M / B (a lower bound: peak link bandwidth, no latency)."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth_bytes_per_s}")
    return ring_allreduce_bytes_sent(message_bytes, ranks) / bandwidth_bytes_per_s


@dataclass
class CommEstimate:
    """Communication of one GPU (its TP/PP shard) with its peers in the other replicas."""

    replicas: int
    bandwidth_bytes_per_s: Optional[float]
    ddp_grad_bytes: float  # message all-reduced every step by DDP
    ddp_bytes_sent_per_step: float
    sync_bytes: float  # dense outer delta of all fragments (once per H steps)
    sync_bytes_sent: float
    largest_fragment_bytes: float
    local_steps: int
    ddp_step_comm_s: Optional[float] = None
    sync_s: Optional[float] = None  # all fragments of one round
    largest_fragment_sync_s: Optional[float] = None

    @property
    def amortized_sync_s(self) -> Optional[float]:
        return None if self.sync_s is None else self.sync_s / self.local_steps

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d["amortized_sync_s"] = self.amortized_sync_s
        return d


def outer_payload_bytes(numel: int, ranks: int, dtype: str, block: int = 256) -> float:
    """Bytes of one rank's outer-sync payload for ``numel`` values over ``ranks`` replicas in
    ``dtype`` (``--diloco-allreduce-dtype``): fp32 4 B/value, bf16 2; int8 / fp8 1 B/value plus an
    fp32 scale per ``block`` values, with the trainer's padding of the quantized collectives
    (:func:`megatron_ppu.sync.compress.payload_bytes`, the implementation's own count). The ring
    all-reduce and the quantized reduce-scatter + all-gather send the same 2(K-1)/K of it."""
    if dtype in QUANTIZED_KINDS:
        if ranks <= 1:  # no collective runs; the payload it would carry
            return float(numel + 4 * math.ceil(numel / block))
        return float(payload_bytes(numel, ranks, dtype, block))
    return float(DTYPE_BYTES[dtype] * numel)


def estimate_communication(cfg: EstimateConfig,
                           bandwidth_bytes_per_s: Optional[float] = None) -> CommEstimate:
    pr, p = cfg.precision, cfg.ppu
    groups = _parameter_groups(cfg)
    pp = cfg.train.pipeline_model_parallel_size
    k = p.replicas
    # The busiest rank: the stage with most parameters.
    stage = max(range(pp), key=lambda s: sum(g.numel_rank for g in groups if g.stage == s))
    gs = [g for g in groups if g.stage == stage]
    n_rank = sum(g.numel_rank for g in gs)
    grad_msg = DTYPE_BYTES[pr.grad_comm_dtype] * n_rank
    sync_msg = outer_payload_bytes(n_rank, k, pr.outer_comm_dtype, p.quantization_block)
    frag = max(sum(g.numel_rank for g in gs if g.fragment == f) for f in {g.fragment for g in gs})
    frag_msg = outer_payload_bytes(frag, k, pr.outer_comm_dtype, p.quantization_block)
    c = CommEstimate(replicas=k, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                     ddp_grad_bytes=grad_msg,
                     ddp_bytes_sent_per_step=ring_allreduce_bytes_sent(grad_msg, k),
                     sync_bytes=sync_msg, sync_bytes_sent=ring_allreduce_bytes_sent(sync_msg, k),
                     largest_fragment_bytes=frag_msg, local_steps=p.local_steps)
    if bandwidth_bytes_per_s is not None:
        c.ddp_step_comm_s = ring_allreduce_time(grad_msg, k, bandwidth_bytes_per_s)
        c.sync_s = ring_allreduce_time(sync_msg, k, bandwidth_bytes_per_s)
        c.largest_fragment_sync_s = ring_allreduce_time(frag_msg, k, bandwidth_bytes_per_s)
    return c


@dataclass
class TimeEstimate:
    """Simulated wall-clock time (paper §3.2, App. B)."""

    compute_s_per_step: float
    comm_s_per_step: float  # DDP: per-step all-reduce; low-comm: sync / H
    step_s: float
    global_tokens_per_step: int
    tokens: Optional[float] = None
    steps: Optional[int] = None
    time_to_tokens_s: Optional[float] = None


def simulate_step_time(cfg: EstimateConfig, bandwidth_bytes_per_s: float,
                       compute_s_per_step: float, tokens: Optional[float] = None) -> TimeEstimate:
    """DDP: max(T_comp, T_comm) (perfect overlap, favouring DDP as the paper does);
    DiLoCo/PPU: T_comp + T_sync / H (no overlap). ``compute_s_per_step`` is the
    time one GPU needs for one step's forward + backward (the paper measured
    0.44 s for the 1.3B model on an H100; use ``compute_time_from_flops`` for an
    estimate)."""
    if compute_s_per_step < 0:
        raise ValueError(f"compute_s_per_step must be >= 0, got {compute_s_per_step}")
    comm = estimate_communication(cfg, bandwidth_bytes_per_s)
    if cfg.ppu.outer_optimizer:
        per_step_comm = comm.amortized_sync_s
        step = compute_s_per_step + per_step_comm
    else:
        per_step_comm = comm.ddp_step_comm_s
        step = max(compute_s_per_step, per_step_comm)
    t = cfg.train
    gtok = cfg.ppu.replicas * t.micro_batch_size * t.num_microbatches * cfg.model.seq_length
    est = TimeEstimate(compute_s_per_step=compute_s_per_step, comm_s_per_step=per_step_comm,
                       step_s=step, global_tokens_per_step=gtok)
    if tokens is not None:
        est.tokens = tokens
        est.steps = int(math.ceil(tokens / gtok))
        est.time_to_tokens_s = est.steps * step
    return est


def compute_time_from_flops(cfg: EstimateConfig, peak_flops_per_s: float, mfu: float) -> float:
    """Seconds per step of one GPU: hardware FLOPs per GPU / (peak x utilisation)."""
    if peak_flops_per_s <= 0 or not 0 < mfu <= 1:
        raise ValueError("peak_flops_per_s must be > 0 and mfu in (0, 1]")
    return estimate_flops(cfg).per_gpu_hardware_flops / (peak_flops_per_s * mfu)


# --------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------


@dataclass
class Estimate:
    config: EstimateConfig
    params: ParameterCounts
    memory: MemoryEstimate
    flops: FlopsEstimate
    comm: CommEstimate
    time: Optional[TimeEstimate] = None

    def as_dict(self) -> dict:
        p = self.params
        return {
            "config": asdict(self.config),
            "params": dict(asdict(p), trainable_fraction=p.trainable_fraction),
            "memory_bytes": self.memory.as_dict(),
            "flops": self.flops.as_dict(),
            "comm": self.comm.as_dict(),
            "time": None if self.time is None else asdict(self.time),
        }


def estimate(cfg: EstimateConfig, bandwidth_bytes_per_s: Optional[float] = None,
             compute_s_per_step: Optional[float] = None,
             tokens: Optional[float] = None) -> Estimate:
    """Parameters, memory, FLOPs, communication and (given a bandwidth and a
    per-step compute time) simulated step time of one configuration."""
    time = None
    if bandwidth_bytes_per_s is not None and compute_s_per_step is not None:
        time = simulate_step_time(cfg, bandwidth_bytes_per_s, compute_s_per_step, tokens)
    return Estimate(config=cfg, params=count_parameters(cfg), memory=estimate_memory(cfg),
                    flops=estimate_flops(cfg),
                    comm=estimate_communication(cfg, bandwidth_bytes_per_s), time=time)


# --------------------------------------------------------------------------
# The paper's 1.3B / 32-node setting and its published numbers
# --------------------------------------------------------------------------

PAPER_BANDWIDTH_BYTES_PER_S = 2.875e9  # App. B, "Wi-Fi 7/8"
PAPER_STEP_COMPUTE_S = 0.44  # App. B, measured on one H100
PAPER_DDP_STEP_COMM_S = 1.75  # App. B
PAPER_DDP_MEMORY_GB = 18.0  # §2.1, "roughly 18 GB"

# Table 1: (name, N, heads sliced, tokens (B), perplexity, memory GB, trainable B)
PAPER_TABLE_1: Tuple[Tuple[str, int, bool, float, float, float, float], ...] = (
    ("Streaming DiLoCo", 1, False, 26, 12.75, 19.36, 1.3),
    ("1/2 mlps", 2, False, 26, 12.24, 14.87, 0.87),
    ("1/4 mlps", 4, False, 26, 12.72, 12.77, 0.67),
    ("1/8 mlps", 8, False, 26, 13.59, 11.72, 0.57),
    ("1/16 mlps", 16, False, 26, 14.21, 11.19, 0.52),
    ("1/2 mlps + 1/2 heads", 2, True, 28, 12.22, 13.29, 0.72),
    ("1/4 mlps + 1/4 heads", 4, True, 28, 12.79, 10.41, 0.44),
)


def paper_model() -> ModelShape:
    """The paper's 1.3B model (GPT-3 XL shape, vocabulary 32k, rotary, tied)."""
    return ModelShape(num_layers=24, hidden_size=2048, num_attention_heads=16,
                      ffn_hidden_size=8192, vocab_size=32000, seq_length=1024,
                      tie_embeddings=True, swiglu=False, add_bias_linear=False,
                      normalization="LayerNorm", position_embedding_type="rope",
                      dropout=False, fused_attention=True)


def paper_config(slices: int = 1, slice_attention_heads: bool = False,
                 outer_optimizer: bool = True) -> EstimateConfig:
    """One row of the paper's setting: 32 nodes, micro-batch 16, full
    recompute, H = 100, 8 layer groups (+ embeddings) streamed from the host."""
    return EstimateConfig(
        model=paper_model(),
        train=TrainShape(micro_batch_size=16, num_microbatches=1,
                         recompute_granularity="full"),
        ppu=PPUShape(slices=slices, slice_attention_heads=slice_attention_heads, replicas=32,
                     local_steps=100, streaming_fragments=8 if outer_optimizer else 1,
                     outer_optimizer=outer_optimizer, outer_state_placement="stream"),
        precision=Precision.paper())


@dataclass
class PaperRow:
    name: str
    slices: int
    heads: bool
    tokens_b: float
    paper_memory_gb: float
    paper_trainable_b: float
    trainable_b: float
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    outer_gb: float  # momentum + snapshot staged on the device
    memory_gb: float  # model state (the paper's measure)
    activations_gb: float  # reported separately, not in the paper's column
    flops_ratio: float  # per-step model FLOPs vs Streaming DiLoCo
    total_flops: float  # at the row's token budget

    @property
    def memory_ratio(self) -> float:
        return self.memory_gb / self.paper_memory_gb

    @property
    def trainable_ratio(self) -> float:
        return self.trainable_b / self.paper_trainable_b


def paper_table() -> List[PaperRow]:
    """Predictions for every row of Table 1, next to the paper's numbers."""
    rows = []
    for name, n, heads, tok, _ppl, mem, trn in PAPER_TABLE_1:
        cfg = paper_config(n, heads)
        pc, me, fl = count_parameters(cfg), estimate_memory(cfg), estimate_flops(cfg)
        rows.append(PaperRow(
            name=name, slices=n, heads=heads, tokens_b=tok, paper_memory_gb=mem,
            paper_trainable_b=trn, trainable_b=pc.trainable / 1e9,
            weights_gb=(me.weights + me.master_weights) / GB, gradients_gb=me.gradients / GB,
            optimizer_gb=me.optimizer_state / GB, outer_gb=(me.outer_momentum + me.snapshot) / GB,
            memory_gb=me.model_state / GB, activations_gb=me.activations / GB,
            flops_ratio=fl.ratio_vs_dense,
            total_flops=fl.model_flops / fl.tokens_per_step * tok * 1e9))
    return rows


@dataclass
class FlopsComparison:
    ours: str
    ours_tokens_b: float
    baseline_tokens_b: float
    total_flops_ratio: float  # ours / Streaming DiLoCo

    @property
    def fewer_percent(self) -> float:
        return 100.0 * (1.0 - self.total_flops_ratio)


def paper_flops_comparisons() -> List[FlopsComparison]:
    """The performance-matched total-FLOPs comparisons behind "15 % fewer FLOPs"
    (§3.2, Fig. 2b; pairing taken from the text and Table 1's perplexities)."""
    per_token = {}
    for name, n, heads, *_ in PAPER_TABLE_1:
        f = estimate_flops(paper_config(n, heads))
        per_token[name] = f.model_flops / f.tokens_per_step
    pairs = [("1/4 mlps", 26, 26),  # 12.72 vs 12.75 at equal tokens
             ("1/2 mlps", 26, 28),  # SD given 28B "to match the performance of the 1/2-MLP"
             ("1/2 mlps + 1/2 heads", 28, 28),  # matches 1/2 mlps, so SD at 28B
             ("1/4 mlps + 1/4 heads", 28, 26)]  # matches 1/4 mlps, so SD at 26B
    base = per_token["Streaming DiLoCo"]
    return [FlopsComparison(name, t, tb, per_token[name] * t / (base * tb)) for name, t, tb in pairs]


@dataclass
class PaperCommCheck:
    """App. B: DDP step at 2.875 GB/s, low-comm amortised sync, and §3.2/Fig. 3's
    "roughly 2x faster" (DDP to 26B tokens vs low-comm to 44B tokens)."""

    ddp_comm_s_nominal: float  # M = 2 B x 1.3e9, the paper's own M
    ddp_comm_s_model: float  # M = 2 B x this model's parameter count
    amortized_sync_s: float
    ddp_memory_gb: float
    ddp_time_to_26b_s: float
    lowcomm_time_to_44b_s: float

    @property
    def speedup(self) -> float:
        return self.ddp_time_to_26b_s / self.lowcomm_time_to_44b_s


def paper_comm_check() -> PaperCommCheck:
    ddp = paper_config(1, outer_optimizer=False)
    sd = paper_config(1)
    bw = PAPER_BANDWIDTH_BYTES_PER_S
    nominal = ring_allreduce_time(2 * 1.3e9, 32, bw)
    comm = estimate_communication(ddp, bw)
    t_ddp = simulate_step_time(ddp, bw, PAPER_STEP_COMPUTE_S, tokens=26e9)
    t_low = simulate_step_time(sd, bw, PAPER_STEP_COMPUTE_S, tokens=44e9)
    return PaperCommCheck(ddp_comm_s_nominal=nominal, ddp_comm_s_model=comm.ddp_step_comm_s,
                          amortized_sync_s=estimate_communication(sd, bw).amortized_sync_s,
                          ddp_memory_gb=estimate_memory(ddp).model_state / GB,
                          ddp_time_to_26b_s=t_ddp.time_to_tokens_s,
                          lowcomm_time_to_44b_s=t_low.time_to_tokens_s)
