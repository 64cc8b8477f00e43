"""Communication and simulated time (paper §3.1, §3.2, App. B): ring all-reduce bytes and time, the
outer sync's payload per dtype, DDP / DiLoCo / PPU traffic per step (``estimate_communication``) and the
simulated step time under a bandwidth limit (``simulate_step_time``, ``compute_time_from_flops``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

from megatron_ppu.estimate.flops import estimate_flops
from megatron_ppu.estimate.params import _parameter_groups
from megatron_ppu.estimate.shape import DTYPE_BYTES, EstimateConfig
from megatron_ppu.sync.compress import QUANTIZED_KINDS, payload_bytes

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
