"""Analytical cost model for PPU / (Streaming) DiLoCo / DDP training.

Predicts, before a cluster is booked, what one training configuration costs per
GPU: parameters, device (and host) memory, FLOPs per step, bytes on the wire per
synchronisation and the resulting step times under a bandwidth limit. It follows
the paper "Partial Parameter Updates for Efficient Distributed Training"
(Filippova et al., 2025): §3.1 (how memory is measured), Table 1, Appendix B
(ring all-reduce model) and Appendix C.2 (FLOPs formulas).

Everything here is plain arithmetic on dataclasses: no torch, no printing
(``tools/estimate.py`` is the command-line front end).

Units
-----
Bytes are bytes; ``GB`` in this module means 1e9 bytes. The paper's memory column
is reproduced with GB = 1e9; with GiB (2**30) every row would be ~7 % lower.
Bandwidth is in bytes per second (the paper's "2.875 GB/s" is 2.875e9 B/s =
23 Gbit/s). FLOPs count a multiply-add as 2.

The paper's model (1.3B, "GPT-3 XL")
------------------------------------
24 layers, hidden 2048, 16 heads, FFN 4 x 2048 = 8192 (GeLU/ReLU-type MLP, not
SwiGLU), sequence 1024, vocabulary 32,000 (stated in §3.1), rotary positions (no
position-embedding table). The paper does not say whether input and output
embeddings are tied; **tied** embeddings reproduce every trainable-parameter count
of Table 1 (1.2737B total: 1.3 -> 0.87 / 0.67 / 0.57 / 0.52 / 0.72 / 0.44 B;
untied embeddings would give 0.94 B for "1/2 mlps" instead of 0.87). Biases are
left out (they change the counts by < 0.1 %); norms are LayerNorms (weight and
bias). Per-GPU micro-batch 16 (global batch 512 over 32 nodes), no gradient
accumulation, no tensor or pipeline parallelism.

Memory model (what reproduces Table 1 and §2.1's "roughly 18 GB")
------------------------------------------------------------------
The paper's memory column counts only model state, not activations: "with
activation recomputation, peak memory is dominated by (i) optimizer states,
(ii) weights, (iii) gradients, (iv) outer-optimizer states, (v) offloaded
parameters". Reading its text and fitting its seven rows gives, per GPU:

* weights: **fp32 for every parameter, 4 B** ("a master copy of model parameters
  is typically maintained in float32 ..., with parameters cast to bfloat16 on the
  fly": no persistent bf16 copy). Frozen parameters are kept too (the forward
  pass and the input-gradient pass use them).
* gradients: **bf16, 2 B per trainable parameter** ("gradients are stored in
  bfloat16").
* inner AdamW state: **m and v in fp32, 8 B per trainable parameter**.
* outer state: Nesterov momentum **fp32 for every parameter** of a fragment, and
  the theta(t) snapshot ("offloaded parameters") **fp32 for the trainable
  parameters** of a fragment only: a frozen entry is never changed by the inner
  steps, so on that node it still equals theta(t) and needs no copy.
* Streaming DiLoCo: both live on the host; only one fragment is staged on the
  device at a time, so the device holds the **largest fragment** (3 of the 24
  layers: 8 groups of 3 layers plus a 9th fragment for the embeddings and the
  final norm, Appendix A.1).

So memory = 4 P + (2 + 8) P_train + 4 P_frag + 4 P_frag_train. A straight-line
fit of the paper's six PPU rows gives 10.43 GB per billion trainable parameters
and an intercept of 5.78 GB; this model has 10.47 (= 10 B/param + 4 B x 151M /
1.274B for the staged snapshot) and 5.70 GB (4 B x 1.274B weights + 4 B x 151M
staged momentum). DDP (no outer state) comes out at 14 B x 1.274B =
17.8 GB, the paper's "roughly 18 GB" (§2.1).

Result (``tools/estimate.py --paper-table``): the six PPU rows are reproduced
within 0.4-0.9 % (all slightly low); the Streaming DiLoCo row is 1.7 % low
(19.04 vs 19.36 GB). No consistent assumption found here closes that last gap:
the PPU rows fix the per-trainable-parameter slope to 10.43 B, and extrapolating
that line to the full model lands at 19.07 GB. The paper's full row may have
used the nominal "1.3B" parameters (which gives 19.3 GB), but that is a guess
and is *not* applied here.

Megatron memory layout (the default for the command line with ``--bf16``)
---------------------------------------------------------------------------
``Precision.megatron(bf16=True)``: bf16 model weights for every parameter, an
fp32 master copy of the trainable ones (Megatron's mixed-precision optimizer),
fp32 gradient buffers (Megatron-LM forces ``accumulate_allreduce_grads_in_fp32``
with bf16), Adam m/v fp32. Megatron's distributed optimizer (sharding inside a
replica) is not modelled.

Activation memory
-----------------
Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
models"), generalised to GQA, SwiGLU and any FFN width, per layer and
micro-batch (s sequence, b micro-batch, h hidden, a heads, t tensor-parallel,
bf16 activations, 1-byte dropout masks)::

    34 s b h + 5 a s^2 b  (t = 1, MHA, FFN = 4h, dropout on) -- exactly their formula

``selective`` recompute drops the attention-core s^2 terms; ``full`` recompute
keeps only each layer's input (2 s b h) plus, during the backward, one layer's
full activations. Fused/flash attention stores no s^2 terms. The first pipeline
stage holds min(pp, num_microbatches) micro-batches in flight. The output
layer's fp32 cross-entropy logits (4 s b v / t) are counted on the last stage.
PPU does not reduce activation memory (paper App. D: the full input Jacobian is
still computed). Activations are reported separately and are *not* part of the
paper comparison.

FLOPs (paper App. C.2, per step and replica)
--------------------------------------------
Forward: embedding B S H, Q/K/V projections, attention matmuls 4 B S^2 H (no
causal halving, as in the paper), W_O, MLP, output layer 2 B S H V + 3 B S V.
Backward: every linear layer's input Jacobian in full; its weight gradient times
the trained fraction (rho_mlp = 1/N for fc1/fc2, rho_attn = 1/N for Q/K/V when
heads are sliced, 1 for W_O and everything else); attention matmuls, embedding
and output layer 2x forward. "Model FLOPs" exclude activation recomputation (as
the paper's formulas do); "hardware FLOPs" add the recomputed forward.

The "15 % fewer FLOPs" of §3.2 / Fig. 2b compares *total* training FLOPs of
performance-matched runs: 1/4 MLPs at 26B tokens vs Streaming DiLoCo at 26B
(same perplexity, so the ratio is the per-step ratio 0.853: 14.7 % fewer);
1/2 MLPs at 26B vs Streaming DiLoCo at 28B (16.2 % fewer); 1/2 and 1/4 MLPs +
heads at 28B vs Streaming DiLoCo at 28B / 26B (13.4 % / 14.0 % fewer). All four
are "about 15 %"; ``paper_flops_comparisons()`` returns them.

Communication (paper §3.1, App. B)
----------------------------------
Bandwidth-optimal ring all-reduce (reduce-scatter + all-gather): every rank sends
2 (K-1)/K x M bytes, T = 2 (K-1)/K x M / B. DDP all-reduces the gradients every
step (bf16 in App. B: M = 2 B x 1.3e9 = 2.6 GB -> 1.75 s at 2.875 GB/s; with the
model's exact 1.274B parameters 1.72 s). DiLoCo / PPU all-reduce the dense
parameter delta of every parameter once per H steps (PPU's delta is zero outside
the trainable slice but the paper all-reduces it densely and reports "the same
bandwidth"); streaming splits it into per-fragment syncs with the same total.
Simulated step times (§3.2): DDP max(T_comp, T_comm) (perfect overlap); low-
communication methods T_comp + T_sync / H (no overlap).

PPU under tensor parallelism: every TP shard of a sliced weight is cut into N
slices (as ``megatron_ppu.ownership`` does), so each GPU trains 1/N of its shard.

Not modelled: data-parallel ranks inside a replica (distributed optimizer),
interleaved pipeline schedules, MoE, FP8, CPU/pinned staging buffers beyond the
one fragment, memory fragmentation and CUDA context / workspace memory.

Layout
------
This package re-exports every public name of its modules, so ``from megatron_ppu import estimate``
sees one namespace: ``shape`` (the configuration dataclasses and byte sizes), ``from_args``
(``shape_from_args``: the configuration from the trainer's flags), ``params`` (parameter inventory
and counts), ``memory``, ``flops``, ``comm`` (communication and simulated step time), ``combined``
(``estimate``: all of them at once) and ``paper`` (the paper's setting, published numbers and the
comparisons with them).
"""
from __future__ import annotations

from megatron_ppu.estimate.shape import (  # noqa: F401 (re-exported)
    DTYPE_BYTES,
    EstimateConfig,
    GB,
    ModelShape,
    OUTER_COMM_DTYPES,
    PPUShape,
    Precision,
    TrainShape,
)
from megatron_ppu.estimate.from_args import (  # noqa: F401 (re-exported)
    shape_from_args,
)
from megatron_ppu.estimate.params import (  # noqa: F401 (re-exported)
    ParameterCounts,
    count_parameters,
    padded_vocab_size,
)
from megatron_ppu.estimate.memory import (  # noqa: F401 (re-exported)
    MemoryEstimate,
    activation_bytes,
    estimate_memory,
)
from megatron_ppu.estimate.flops import (  # noqa: F401 (re-exported)
    FlopsEstimate,
    estimate_flops,
    layer_flop_terms,
)
from megatron_ppu.estimate.comm import (  # noqa: F401 (re-exported)
    CommEstimate,
    TimeEstimate,
    compute_time_from_flops,
    estimate_communication,
    outer_payload_bytes,
    ring_allreduce_bytes_sent,
    ring_allreduce_time,
    simulate_step_time,
)
from megatron_ppu.estimate.combined import (  # noqa: F401 (re-exported)
    Estimate,
    estimate,
)
from megatron_ppu.estimate.paper import (  # noqa: F401 (re-exported)
    FlopsComparison,
    PAPER_BANDWIDTH_BYTES_PER_S,
    PAPER_DDP_MEMORY_GB,
    PAPER_DDP_STEP_COMM_S,
    PAPER_STEP_COMPUTE_S,
    PAPER_TABLE_1,
    PaperCommCheck,
    PaperRow,
    paper_comm_check,
    paper_config,
    paper_flops_comparisons,
    paper_model,
    paper_table,
)

__all__ = [
    "DTYPE_BYTES",
    "EstimateConfig",
    "GB",
    "ModelShape",
    "OUTER_COMM_DTYPES",
    "PPUShape",
    "Precision",
    "TrainShape",
    "shape_from_args",
    "ParameterCounts",
    "count_parameters",
    "padded_vocab_size",
    "MemoryEstimate",
    "activation_bytes",
    "estimate_memory",
    "FlopsEstimate",
    "estimate_flops",
    "layer_flop_terms",
    "CommEstimate",
    "TimeEstimate",
    "compute_time_from_flops",
    "estimate_communication",
    "outer_payload_bytes",
    "ring_allreduce_bytes_sent",
    "ring_allreduce_time",
    "simulate_step_time",
    "Estimate",
    "estimate",
    "FlopsComparison",
    "PAPER_BANDWIDTH_BYTES_PER_S",
    "PAPER_DDP_MEMORY_GB",
    "PAPER_DDP_STEP_COMM_S",
    "PAPER_STEP_COMPUTE_S",
    "PAPER_TABLE_1",
    "PaperCommCheck",
    "PaperRow",
    "paper_comm_check",
    "paper_config",
    "paper_flops_comparisons",
    "paper_model",
    "paper_table",
]
