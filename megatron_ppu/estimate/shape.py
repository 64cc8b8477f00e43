"""Configuration of the cost model: the model shape, the training shape, the PPU / DiLoCo method,
the precision, and the ``EstimateConfig`` that bundles them (with its validation); the byte-size
constants (``GB``, ``DTYPE_BYTES``, ``OUTER_COMM_DTYPES``). The units and the paper's model are
described in :mod:`megatron_ppu.estimate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_ppu.config import PPUConfig, validate_ppu_config


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
