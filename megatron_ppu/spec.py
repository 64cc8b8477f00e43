"""ModuleSpecs that plug the partial linears into Megatron-Core's GPT layer."""
from __future__ import annotations

import copy
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from .config import PPUConfig
from .layers import (
    PPUAttentionOutputRowParallelLinear,
    PPUMLPColumnParallelLinear,
    PPUMLPRowParallelLinear,
    PPUQKVColumnParallelLinear,
)


class _BoundLinear:
    """A class-like callable binding slice arguments, for spec fields that Megatron
    calls directly instead of through ``build_module`` (``linear_qkv``)."""

    def __init__(self, cls, **params):
        self.cls = cls
        self.params = params

    def __call__(self, *args, **kwargs):
        return self.cls(*args, **self.params, **kwargs)

    def __repr__(self):
        return f"{self.cls.__name__}({self.params})"


def get_gpt_layer_ppu_spec(
    ppu: PPUConfig,
    slice_index: int,
    *,
    normalization: Optional[str] = None,
    qk_layernorm: bool = False,
    use_transformer_engine: bool = False,
) -> ModuleSpec:
    """Megatron's local GPT layer spec with the PPU partial linears for replica slice ``slice_index``.

    With ``ppu.num_slices == 1`` this is Megatron's own local spec unchanged (plain
    DiLoCo / DDP). ``linear_proj`` (W_O) is replaced only for the paper's negative
    control ``ppu.slice_attention_output``.

    Args:
        ppu: the slicing configuration.
        slice_index: n = k mod N for this rank's replica k.
        normalization: "LayerNorm" or "RMSNorm", as in ``get_gpt_layer_local_spec``.
        qk_layernorm: as in ``get_gpt_layer_local_spec``.
        use_transformer_engine: Transformer Engine partial layers are not implemented
            yet; asking for them is an error rather than a silent fallback.
    """
    if use_transformer_engine:
        raise ValueError(
            "Transformer Engine partial linears are not available in this version of "
            "megatron_ppu; use the local spec (--transformer-impl local)."
        )
    n = ppu.num_slices
    if not 0 <= slice_index < n:
        raise ValueError(f"slice_index {slice_index} must be in [0, {n}).")
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    if n == 1:
        return spec
    params = {"num_slices": n, "slice_index": slice_index, "frozen_input_jacobian": ppu.frozen_input_jacobian}
    mlp_params = dict(params, forward_mask=ppu.mlp_forward_masking)
    mlp = spec.submodules.mlp.submodules
    mlp.linear_fc1 = ModuleSpec(module=PPUMLPColumnParallelLinear, params=dict(mlp_params))
    mlp.linear_fc2 = ModuleSpec(module=PPUMLPRowParallelLinear, params=dict(mlp_params))
    attn = spec.submodules.self_attention.submodules
    if ppu.slice_attention_heads:
        attn.linear_qkv = _BoundLinear(PPUQKVColumnParallelLinear, **params)
    if ppu.slice_attention_output:
        attn.linear_proj = ModuleSpec(module=PPUAttentionOutputRowParallelLinear, params=dict(params))
    return spec
