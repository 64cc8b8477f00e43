"""ModuleSpecs that plug the partial linears into Megatron-Core's GPT layer.

Norms: wherever Megatron's local spec falls back to its torch norm (``WrappedTorchNorm``:
no apex/Transformer Engine, and RMSNorm always), these specs use
:class:`megatron_ppu.norms.TorchNorm`, which also works under ``--sequence-parallel``.
The final norm of the GPT model is not part of a layer spec (Megatron's
``TransformerBlock`` picks it from the installed packages), so a model that may run
with sequence parallelism is built from :func:`get_gpt_decoder_ppu_spec`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .attention import core_attention_for
from .config import PPUConfig
from .layers import (
    PPUAttentionOutputRowParallelLinear,
    PPUMLPColumnParallelLinear,
    PPUMLPRowParallelLinear,
    PPUQKVColumnParallelLinear,
)
from .norms import TorchNorm
from .patches import compat
from .subnet import MaskableTransformerLayer


def _with_torch_norms(spec: ModuleSpec) -> ModuleSpec:
    """A copy of ``spec`` with Megatron's ``WrappedTorchNorm`` replaced by :class:`TorchNorm`
    everywhere in its tree."""
    sub = spec.submodules
    if sub is None or not dataclasses.is_dataclass(sub):
        return spec
    changes = {}
    for f in dataclasses.fields(sub):
        value = getattr(sub, f.name)
        if value is WrappedTorchNorm:
            changes[f.name] = TorchNorm
        elif isinstance(value, ModuleSpec):
            inner = _with_torch_norms(value)
            changes[f.name] = dataclasses.replace(inner, module=TorchNorm) if inner.module is WrappedTorchNorm else inner
    return dataclasses.replace(spec, submodules=dataclasses.replace(sub, **changes))


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
    attention_backend: str = "local",
) -> ModuleSpec:
    """Megatron's local GPT layer spec with the PPU partial linears for replica slice ``slice_index``.

    With ``ppu.num_slices == 1`` this is Megatron's own local spec (plain DiLoCo / DDP),
    except for its torch norms, which are :class:`~megatron_ppu.norms.TorchNorm` (the same
    torch modules, plus sequence-parallel support), and its layer class,
    :class:`~megatron_ppu.subnet.MaskableTransformerLayer` (Megatron's ``TransformerLayer``
    unless the blocks plan masks it). ``linear_proj`` (W_O) is replaced only
    for the paper's negative control ``ppu.slice_attention_output``. For the whole decoder,
    final norm included, use :func:`get_gpt_decoder_ppu_spec`.

    Args:
        ppu: the slicing configuration.
        slice_index: n = k mod N for this rank's replica k.
        normalization: "LayerNorm" or "RMSNorm", as in ``get_gpt_layer_local_spec``.
        qk_layernorm: as in ``get_gpt_layer_local_spec``.
        use_transformer_engine: Transformer Engine partial layers are not implemented
            yet; asking for them is an error rather than a silent fallback.
        attention_backend: the ``core_attention`` (``--attention-backend``): ``"local"`` /
            ``"unfused"`` keep megatron-core's ``DotProductAttention`` (the default here, Megatron's
            own local spec); ``"auto"`` / ``"flash"`` / ``"fused"`` use
            :class:`~megatron_ppu.attention.SDPAttention` (torch's fused SDPA kernels).
    """
    if use_transformer_engine:
        raise ValueError(
            "Transformer Engine partial linears are not available in this version of "
            "megatron_ppu; use the local spec (--transformer-impl local)."
        )
    n = ppu.num_slices
    if not 0 <= slice_index < n:
        raise ValueError(f"slice_index {slice_index} must be in [0, {n}).")
    local = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    # megatron's layer, maskable by the SDP blocks plan (identical unless masked)
    spec = dataclasses.replace(_with_torch_norms(local), module=MaskableTransformerLayer)
    spec.submodules.self_attention.submodules.core_attention = core_attention_for(attention_backend)
    if n == 1:
        return spec
    params = {"num_slices": n, "slice_index": slice_index, "frozen_input_jacobian": ppu.frozen_input_jacobian}
    mlp_params = dict(params, forward_mask=ppu.mlp_forward_masking)
    mlp = compat.mlp_submodules(spec.submodules)  # a builder, not a ModuleSpec, from megatron-core 0.18
    mlp.linear_fc1 = ModuleSpec(module=PPUMLPColumnParallelLinear, params=dict(mlp_params))
    mlp.linear_fc2 = ModuleSpec(module=PPUMLPRowParallelLinear, params=dict(mlp_params))
    attn = spec.submodules.self_attention.submodules
    if ppu.slice_attention_heads:
        attn.linear_qkv = _BoundLinear(PPUQKVColumnParallelLinear, **params)
    if ppu.slice_attention_output:
        attn.linear_proj = ModuleSpec(module=PPUAttentionOutputRowParallelLinear, params=dict(params))
    return spec


def get_gpt_decoder_ppu_spec(
    config: TransformerConfig,
    ppu: PPUConfig,
    slice_index: int,
    *,
    normalization: Optional[str] = None,
    qk_layernorm: bool = False,
    use_transformer_engine: bool = False,
    attention_backend: str = "local",
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage for ``GPTModel(config, <this>, ...)``: the
    layers of :func:`get_gpt_layer_ppu_spec` and a final norm of the same class as the
    layers' norms (Megatron's ``get_gpt_decoder_block_spec`` does the same for its specs).

    With a plain layer spec, Megatron's ``TransformerBlock`` builds the final norm itself
    from whatever is installed (its torch norm without apex/TE), which refuses
    ``config.sequence_parallel``; this spec works with and without sequence parallelism.

    Args:
        config: the model's ``TransformerConfig`` (layers per stage, normalisation).
        ppu, slice_index, normalization, qk_layernorm, use_transformer_engine, attention_backend: as in
            :func:`get_gpt_layer_ppu_spec`.
        vp_stage, pp_rank: as in Megatron's ``get_num_layers_to_build`` (default: this rank).
    """
    layer = get_gpt_layer_ppu_spec(ppu, slice_index, normalization=normalization, qk_layernorm=qk_layernorm,
                                   use_transformer_engine=use_transformer_engine, attention_backend=attention_backend)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=layer.submodules.input_layernorm)
