"""FLOPs model (paper App. C.2): forward and backward FLOPs per layer term, with the PPU's trained
fraction in the weight gradients, model vs hardware FLOPs (``layer_flop_terms``, ``estimate_flops``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from megatron_ppu.estimate.params import padded_vocab_size
from megatron_ppu.estimate.shape import EstimateConfig

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
