"""Memory model (paper §3.1, Table 1): model state per GPU (weights, gradients, inner and outer
optimizer state, offloaded parameters) and activations (``activation_bytes``, ``estimate_memory``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Dict, Optional

from megatron_ppu.estimate.params import _parameter_groups, padded_vocab_size
from megatron_ppu.estimate.shape import DTYPE_BYTES, EstimateConfig

logger = logging.getLogger(__name__)

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
