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
            (query groups under GQA).
        slice_attention_output: negative control of the paper (App. C): also slice
            the output projection W_O (``linear_proj``) by head group. The paper found
            it degrades perplexity; it exists to reproduce that.
        frozen_input_jacobian: ``"full"`` (the method: the frozen slices still
            contribute to the input gradient) or ``"detach"`` (negative control of
            App. D, "detach-all-but-k": only the owned slice contributes to dX).
        mlp_forward_masking: subnetwork data parallelism's neuron plan with forward
            masking (see :mod:`megatron_ppu.subnet`): in training the MLP hidden units
            this replica does not own are dropped from the forward pass too, with the
            MLP output scaled by N; evaluation uses the full MLP.
    """

    num_slices: int = 1
    slice_attention_heads: bool = False
    slice_attention_output: bool = False
    frozen_input_jacobian: str = "full"
    mlp_forward_masking: bool = False

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
    if ppu.frozen_input_jacobian not in ("full", "detach"):
        raise ValueError(f"frozen input Jacobian must be 'full' or 'detach', got {ppu.frozen_input_jacobian!r}.")
    if n == 1:
        if ppu.slice_attention_heads or ppu.slice_attention_output or ppu.frozen_input_jacobian != "full":
            raise ValueError("--ppu-slice-attention-heads/--ppu-slice-attention-output/"
                             "--ppu-detach-frozen-jacobian need --ppu-slices > 1.")
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
    if ppu.slice_attention_heads or ppu.slice_attention_output:
        if multi_latent_attention:
            raise ValueError("--ppu-slice-attention-heads is not supported with multi-latent attention.")
        if attention_output_gate:
            raise ValueError("--ppu-slice-attention-heads is not supported with an attention output gate.")
        groups = num_query_groups or num_attention_heads
        what = "--num-query-groups" if num_query_groups and num_query_groups != num_attention_heads else "--num-attention-heads"
        if groups % tp != 0 or (groups // tp) % n != 0:
            raise ValueError(
                f"with head slicing, the attention head groups per tensor-parallel "
                f"rank ({what} {groups} / TP {tp}) must be divisible by --ppu-slices {n}. Use a "
                f"multiple of {tp * n} for {what}, fewer slices, or drop --ppu-slice-attention-heads."
            )


def _divisors(k: int) -> list:
    return [d for d in range(1, k + 1) if k % d == 0]


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo / Streaming DiLoCo outer loop (paper Algorithm 1, lines 4-15).

    Attributes:
        local_steps: H, inner steps between two syncs of a fragment. ``0`` turns the
            outer loop off: plain synchronous data parallel over all DP ranks (the
            DDP baseline).
        outer_lr: outer learning rate (default: the PPU paper's 0.4, Streaming DiLoCo's setup; DiLoCo used 0.7).
        outer_momentum: Nesterov momentum of the outer SGD (paper: 0.9).
        nesterov: Nesterov (True, as in the paper) or heavy-ball momentum.
        num_replicas: K, the number of replicas (DP ranks are split into K groups).
        streaming_fragments: F, the number of fragments synchronised at staggered
            steps (Streaming DiLoCo). ``1`` syncs everything at once. With F > 1 the
            parameters outside the transformer layers (embeddings, final norm,
            output layer) form one fragment and the layers of each pipeline stage
            are cut into the remaining F - 1 groups of consecutive layers; so the
            paper's "24 layers in 8 groups of 3 + embeddings" is F = 9.
        allreduce_dtype: dtype of the outer all-reduce payload, "fp32" or "bf16".
    """

    local_steps: int = 100
    outer_lr: float = 0.4
    outer_momentum: float = 0.9
    nesterov: bool = True
    num_replicas: int = 1
    streaming_fragments: int = 1
    allreduce_dtype: str = "fp32"

    @property
    def enabled(self) -> bool:
        return self.local_steps > 0


def validate_diloco_config(cfg: DiLoCoConfig, *, data_parallel_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the flag and the fix for an invalid outer-loop schedule."""
    if cfg.local_steps < 0:
        raise ValueError(f"--diloco-local-steps must be >= 0 (0 = synchronous DDP), got {cfg.local_steps}.")
    if cfg.num_replicas < 1:
        raise ValueError(f"--diloco-replicas must be >= 1, got {cfg.num_replicas}.")
    if data_parallel_size is not None and data_parallel_size % cfg.num_replicas != 0:
        raise ValueError(
            f"--diloco-replicas {cfg.num_replicas} must divide the data-parallel size {data_parallel_size} "
            f"(world size / (TP x PP)); choose one of "
            f"{[d for d in range(1, data_parallel_size + 1) if data_parallel_size % d == 0]}."
        )
    if cfg.allreduce_dtype not in ("fp32", "bf16"):
        raise ValueError(f"--diloco-allreduce-dtype must be fp32 or bf16, got {cfg.allreduce_dtype!r}.")
    if not cfg.enabled:
        if cfg.streaming_fragments != 1:
            raise ValueError("--diloco-streaming-fragments needs --diloco-local-steps > 0.")
        return
    if not cfg.outer_lr > 0:
        raise ValueError(f"--diloco-outer-lr must be > 0, got {cfg.outer_lr}.")
    if not 0 <= cfg.outer_momentum < 1:
        raise ValueError(f"--diloco-outer-momentum must be in [0, 1), got {cfg.outer_momentum}.")
    if cfg.nesterov and cfg.outer_momentum == 0:
        raise ValueError("Nesterov outer momentum needs --diloco-outer-momentum > 0.")
    if cfg.streaming_fragments < 1:
        raise ValueError(f"--diloco-streaming-fragments must be >= 1, got {cfg.streaming_fragments}.")
    if cfg.streaming_fragments > cfg.local_steps:
        raise ValueError(
            f"--diloco-streaming-fragments {cfg.streaming_fragments} exceeds --diloco-local-steps "
            f"{cfg.local_steps}: each fragment needs its own sync step within a round (H >= F). "
            f"Raise --diloco-local-steps or use fewer fragments."
        )
