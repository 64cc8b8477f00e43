"""Everything at once: ``estimate`` runs the parameter, memory, FLOPs and communication models for one
configuration and returns them together as an ``Estimate``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_ppu.estimate.comm import CommEstimate, TimeEstimate, estimate_communication, simulate_step_time
from megatron_ppu.estimate.flops import FlopsEstimate, estimate_flops
from megatron_ppu.estimate.memory import MemoryEstimate, estimate_memory
from megatron_ppu.estimate.params import ParameterCounts, count_parameters
from megatron_ppu.estimate.shape import EstimateConfig

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
