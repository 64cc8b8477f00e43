"""Parameter inventory: every parameter group of the model with its size, layer and fragment, the
padded vocabulary, and the total / trainable / per-GPU parameter counts (``count_parameters``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

from megatron_ppu.estimate.shape import EstimateConfig

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
