"""Fused core attention without Transformer Engine: megatron-core's ``DotProductAttention``
computed by ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score and
probability matrices (``baddbmm``, softmax, dropout, ``bmm``). :class:`SDPAttention` has the
same constructor and forward signature and the same semantics, and hands the whole product
to one SDPA call, which on CUDA runs torch's flash, memory-efficient or cuDNN kernels (no
``s x s`` tensor kept for the backward pass) and on CPU torch's flash kernel (or its math
kernel where the flash one cannot run, e.g. with attention dropout).

Semantics kept from ``DotProductAttention`` (megatron-core 0.16.1):

* layout ``[s, b, heads_per_partition, head_dim]`` in, ``[s, b, heads_per_partition x head_dim]``
  out; the heads are those of this tensor-parallel rank (``num_attention_heads / tp``);
* grouped-query attention: key and value heads repeated (``repeat_interleave``) to the query
  heads, query head ``i`` reading group ``i // (heads / groups)``;
* causal mask when ``attn_mask_type`` is causal and no mask is given (and ``sq > 1``); an
  explicit boolean ``attention_mask`` (True = masked out, megatron-core's convention) replaces
  it. One difference: a query row whose keys are *all* masked gets zeros here (torch's SDPA),
  the mean of the values in ``DotProductAttention`` (its mask fills -10000, not -inf);
* softmax scale ``1/sqrt(head_dim)`` unless ``softmax_scale`` is given.
  ``apply_query_key_layer_scaling`` divides the Q.K^T scale by the layer number and multiplies
  it back inside the fp32 softmax (an fp16 overflow guard; the same net scale); the SDPA
  kernels accumulate the scores in fp32 anyway, so the net scale is what they are given;
* attention dropout on the probabilities with ``config.attention_dropout`` (or the
  ``attention_dropout`` argument), in training mode only, drawn inside
  ``get_cuda_rng_tracker().fork()`` unless ``config.sequence_parallel`` (as
  ``DotProductAttention`` does), so tensor-parallel ranks draw from the model-parallel state
  and recompute replays the same mask. The masks themselves are the kernel's, not the same
  bits as ``DotProductAttention``'s.

Kernel choice (``backend``, from ``--attention-backend``): ``"auto"`` lets torch pick (on
CUDA: flash, then cuDNN / memory-efficient, then math); on CUDA ``"flash"`` allows only
``SDPBackend.FLASH_ATTENTION`` and ``"fused"`` only ``CUDNN_ATTENTION`` / ``EFFICIENT_ATTENTION``
(Transformer Engine's names for its flash and cuDNN fused attention); a call none of them
can run raises ``ValueError`` naming the flag. With ``config.deterministic_mode`` only ``"auto"``
is allowed, and on CUDA it runs torch's math kernel (torch does not guarantee deterministic
backward passes of the fused ones). On CPU every backend uses whatever kernels torch has there:
its flash kernel, or its math kernel where that cannot run (attention dropout in training).

Not supported (``DotProductAttention`` has them, the trainer never configures them): a
non-vanilla ``softmax_type`` (softmax offset), sliding-window attention, context parallelism,
packed sequences, an attention bias. These raise at construction / call.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch import Tensor

logger = logging.getLogger(__name__)

#: ``--attention-backend`` values served by :class:`SDPAttention` / by megatron-core's ``DotProductAttention``.
SDPA_BACKENDS = ("auto", "flash", "fused")
LOCAL_BACKENDS = ("unfused", "local")


def _cuda_kernels(backend: str, deterministic: bool):
    """The SDPA kernels ``backend`` allows on CUDA (None: torch's own choice among all)."""
    from torch.nn.attention import SDPBackend

    if deterministic:  # torch does not guarantee deterministic backward passes of its fused kernels
        assert backend == "auto", "SDPAttention refuses flash/fused with deterministic_mode at construction"
        return [SDPBackend.MATH]
    return {"auto": None, "flash": [SDPBackend.FLASH_ATTENTION],
            "fused": [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]}[backend]


class SDPAttention(MegatronModule):
    """megatron-core's ``DotProductAttention`` on ``torch.nn.functional.scaled_dot_product_attention``
    (see the module docstring for the semantics kept and the kernels allowed).

    Args: as ``DotProductAttention`` (config, layer_number, attn_mask_type, attention_type,
    attention_dropout, softmax_scale, cp_comm_type, pg_collection), plus ``backend``: ``"auto"``,
    ``"flash"`` or ``"fused"`` (which SDPA kernels may run on CUDA).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        *,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        if backend not in SDPA_BACKENDS:
            raise ValueError(f"SDPAttention backend {backend!r}: use one of {SDPA_BACKENDS}.")
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by the SDPA attention (nor by megatron-core's "
                             "DotProductAttention).")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type {config.softmax_type!r} (softmax offset) is not supported by the SDPA "
                             "attention; use --attention-backend local.")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("sliding-window attention is not supported by the SDPA attention; use "
                             "--attention-backend local.")
        if config.deterministic_mode and backend != "auto":
            raise ValueError(f"--attention-backend {backend} cannot be used with --deterministic-mode: torch does not "
                             "guarantee deterministic backward passes of its fused attention kernels on CUDA; use "
                             "auto (torch's math kernel on CUDA) or local.")
        self.backend = backend
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        assert hasattr(pg_collection, "tp"), "SDPAttention's pg_collection must have a tp process group"
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        # the net scale of DotProductAttention's scores (apply_query_key_layer_scaling divides it by the
        # layer number before the matmul and multiplies it back in the fp32 softmax)
        self.softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None \
            else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """``[sq, b, np, hn]`` query, ``[sk, b, ng, hn]`` key and value -> ``[sq, b, np * hn]``.

        ``attn_mask_type`` is not used, as in ``DotProductAttention`` (the constructor's counts)."""
        assert packed_seq_params is None, "packed sequences are not supported by SDPAttention (nor DotProductAttention)"
        assert attention_bias is None, "an attention bias is not supported by SDPAttention (nor DotProductAttention)"
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if rep > 1:
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        sq, b, sk = query.size(0), query.size(1), key.size(0)
        # [s, b, np, hn] -> [b, np, s, hn] (views; the kernels need only a unit stride in hn)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, is_causal = None, False
        if attention_mask is not None:
            assert attention_mask.dtype == torch.bool, "megatron-core attention masks are boolean (True = masked out)"
            mask = ~attention_mask  # SDPA: True = takes part
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            assert sq == sk, "causal mask is only for self attention"
            is_causal = True
        p = self.dropout_p if self.training else 0.0
        call = functools.partial(self._sdpa, q, k, v, mask, p, is_causal)
        if p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = call()
        else:
            context = call()
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _sdpa(self, q, k, v, mask, p, is_causal) -> Tensor:
        kernels = _cuda_kernels(self.backend, self.config.deterministic_mode) if q.is_cuda else None
        return sdpa(q, k, v, mask, p, is_causal, self.softmax_scale, kernels, self.backend)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
         kernels=None, backend: str = "auto") -> Tensor:
    """``scaled_dot_product_attention`` on ``[b, heads, s, head_dim]``, restricted to ``kernels`` (a list of
    ``SDPBackend``, in priority order; None: torch's choice). A call none of them can run raises
    ``ValueError`` naming ``--attention-backend backend``."""
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    from torch.nn.attention import sdpa_kernel

    try:
        with sdpa_kernel(kernels, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=scale)
    except RuntimeError as e:
        if "kernel" not in str(e) and "backend" not in str(e):
            raise
        raise ValueError(
            f"--attention-backend {backend}: none of torch's {[k.name for k in kernels]} kernels can run this "
            f"attention (device {q.device.type}, dtype {q.dtype}, head dim {q.size(-1)}, dropout {dropout_p}, "
            f"{'explicit mask' if mask is not None else 'causal' if is_causal else 'no mask'}; torch's warnings "
            f"above say why). Use --attention-backend auto (torch picks a kernel that can) or local.") from e


def core_attention_for(backend: str):
    """The ``core_attention`` of the layer spec for an ``--attention-backend`` value: megatron-core's
    ``DotProductAttention`` for ``unfused`` / ``local``, :class:`SDPAttention` restricted to ``backend``'s
    kernels for ``auto`` / ``flash`` / ``fused``."""
    if backend in LOCAL_BACKENDS:
        return DotProductAttention
    if backend in SDPA_BACKENDS:
        return functools.partial(SDPAttention, backend=backend)
    raise ValueError(f"--attention-backend {backend!r}: use one of {SDPA_BACKENDS + LOCAL_BACKENDS}.")
