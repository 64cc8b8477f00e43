"""Torch LayerNorm / RMSNorm for Megatron-Core specs that also work under sequence parallelism.

Megatron-Core 0.16.1 falls back to ``WrappedTorchNorm`` when neither Transformer Engine
nor apex is installed (and for RMSNorm in the local spec even with apex). It asserts
"sequence parallel not supported by torch LayerNorm" under ``sequence_parallel=True``,
on every device. Yet the torch norms are correct there: with sequence parallelism each
tensor-parallel rank normalises its own chunk of the sequence over the full hidden
dimension. What Megatron needs is that the (TP-replicated) norm parameters carry the
``sequence_parallel`` attribute, so that ``finalize_model_grads`` all-reduces their
gradients across the TP group (each rank saw only its chunk); without it the ranks'
copies drift apart and training silently differs. That is what apex's ``FusedLayerNorm``
and TE's norms do; :class:`TorchNorm` does the same with the torch norms.

:func:`megatron_ppu.spec.get_gpt_layer_ppu_spec` puts :class:`TorchNorm` wherever
Megatron's local spec has ``WrappedTorchNorm``, and
:func:`megatron_ppu.spec.get_gpt_decoder_ppu_spec` also uses it for the final norm.
"""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for p in module.parameters():
        # finalize_model_grads all-reduces across TP the grads of params marked like this
        # (when config.sequence_parallel), as for apex's FusedLayerNorm and TE's norms.
        setattr(p, "sequence_parallel", bool(config.sequence_parallel))


class TorchLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the hidden dimension, parameters marked ``sequence_parallel``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        _mark_sequence_parallel(self, config)


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the hidden dimension, parameters marked ``sequence_parallel``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        _mark_sequence_parallel(self, config)


class TorchNorm:
    """Drop-in replacement for Megatron's ``WrappedTorchNorm`` (same constructor, same choice
    by ``config.normalization``) that also supports ``config.sequence_parallel``.

    Returns a :class:`TorchLayerNorm` or a :class:`TorchRMSNorm`.

    Raises:
        ValueError: an option the torch norms do not implement (zero-centred gamma,
            persistent or memory-efficient layer norm, another normalisation).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm"):
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag, False):
                raise ValueError(f"TransformerConfig.{flag} is not supported by the torch norms; "
                                 "set it to False (or install apex / Transformer Engine).")
        if config.normalization == "LayerNorm":
            return TorchLayerNorm(config, hidden_size, eps)
        if config.normalization == "RMSNorm":
            return TorchRMSNorm(config, hidden_size, eps)
        raise ValueError(f"normalization {config.normalization!r}: the torch norms implement LayerNorm and "
                         "RMSNorm (--normalization).")
