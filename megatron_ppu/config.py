"""Configuration dataclasses for megatron_ppu, validated in one place.

Each feature has one documented dataclass. ``validate_*`` functions raise
``ValueError`` with a message that names the offending setting and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PPUConfig:
    """Partial Parameter Updates (paper §2.2).

    Attributes:
        num_slices: N, the number of disjoint slices of every sliced weight.
            Replica k trains slice ``k mod N``. ``1`` means every replica trains
            everything (plain DiLoCo / DDP).
        slice_attention_heads: also slice the Q/K/V projection by head group
            (query groups under GQA). The output projection W_O is never sliced.
    """

    num_slices: int = 1
    slice_attention_heads: bool = False

    @property
    def enabled(self) -> bool:
        return self.num_slices > 1


def validate_ppu_config(
    ppu: PPUConfig,
    *,
    num_replicas: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: Optional[int],
    tensor_model_parallel_size: int = 1,
    num_moe_experts: Optional[int] = None,
    multi_latent_attention: bool = False,
    attention_output_gate: bool = False,
    gradient_accumulation_fusion: bool = False,
) -> None:
    """Check that ``ppu`` can slice this model on this layout; raise ``ValueError`` otherwise."""
    n = ppu.num_slices
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--ppu-slices must be a positive integer, got {n!r}.")
    if num_replicas < 1:
        raise ValueError(f"the number of replicas must be >= 1, got {num_replicas}.")
    if num_replicas % n != 0:
        raise ValueError(
            f"--ppu-slices {n} does not divide the number of replicas K={num_replicas}: every "
            f"slice must be trained by the same number K/N of replicas. Use a --ppu-slices that "
            f"divides {num_replicas} (e.g. {_divisors(num_replicas)}) or change --diloco-replicas."
        )
    if n == 1:
        if ppu.slice_attention_heads:
            raise ValueError("--ppu-slice-attention-heads needs --ppu-slices > 1.")
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
    if ppu.slice_attention_heads:
        if multi_latent_attention:
            raise ValueError("--ppu-slice-attention-heads is not supported with multi-latent attention.")
        if attention_output_gate:
            raise ValueError("--ppu-slice-attention-heads is not supported with an attention output gate.")
        groups = num_query_groups or num_attention_heads
        what = "--num-query-groups" if num_query_groups and num_query_groups != num_attention_heads else "--num-attention-heads"
        if groups % tp != 0 or (groups // tp) % n != 0:
            raise ValueError(
                f"with --ppu-slice-attention-heads, the attention head groups per tensor-parallel "
                f"rank ({what} {groups} / TP {tp}) must be divisible by --ppu-slices {n}. Use a "
                f"multiple of {tp * n} for {what}, fewer slices, or drop --ppu-slice-attention-heads."
            )


def _divisors(k: int) -> list:
    return [d for d in range(1, k + 1) if k % d == 0]
