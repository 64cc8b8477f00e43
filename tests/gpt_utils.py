"""Helpers for tests that build small real Megatron GPT models (run inside harness ranks)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.transformer import TransformerConfig

from megatron_ppu.config import PPUConfig
from megatron_ppu.spec import get_gpt_decoder_ppu_spec

VOCAB = 128
SEQ = 16
# PPU_TEST_DEVICE=cuda (scripts/gpu_check.sh) builds the models and batches on the GPU.
DEVICE = torch.device("cuda") if os.environ.get("PPU_TEST_DEVICE") == "cuda" else torch.device("cpu")


def init_parallel(tp: int = 1, pp: int = 1) -> None:
    """(Re-)initialise Megatron's parallel state for this layout."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def make_config(*, swiglu: bool = False, gqa: bool = False, tp: int = 1, pp: int = 1, sp: bool = False,
                layers: int = 2, hidden: int = 64, heads: int = 8, ffn: int = 128, bias: bool = True,
                bf16: bool = False) -> TransformerConfig:
    import torch.nn.functional as F

    return TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
        num_query_groups=4 if gqa else None, gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu, add_bias_linear=bias,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=DEVICE.type == "cpu",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
    )


def build_gpt(config: TransformerConfig, ppu: Optional[PPUConfig] = None, slice_index: int = 0,
              seed: int = 1234) -> GPTModel:
    """A GPTModel for this rank's pipeline stage; the same seed gives the same weights with or
    without PPU (the partial linears split Megatron's own initialised weight)."""
    torch.manual_seed(seed)
    tp_random.model_parallel_cuda_manual_seed(seed)
    # Megatron's local spec (PPUConfig(1)) or the PPU one, as the decoder block: its torch norms
    # (megatron_ppu.norms) take sequence parallelism without any patch.
    spec = get_gpt_decoder_ppu_spec(config, ppu or PPUConfig(1), slice_index if ppu is not None else 0)
    return GPTModel(
        config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    ).to(DEVICE)


def batch(micro_batch: int = 2, seed: int = 0, num_micro_batches: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_micro_batches):
        tokens = torch.randint(0, VOCAB, (micro_batch, SEQ + 1), generator=g)
        out.append({
            "tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "position_ids": torch.arange(SEQ).expand(micro_batch, SEQ),
            "loss_mask": torch.ones(micro_batch, SEQ),
        })
        out[-1] = {k: v.to(DEVICE) for k, v in out[-1].items()}
    return out


def forward_backward(model, config, batches, forward_only: bool = False):
    """Megatron's own forward-backward schedule (pipelined when PP > 1). Returns mean loss
    on the last stage, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    it = iter(batches)

    def forward_step(data_iterator, model_):
        b = next(data_iterator)
        out = model_(b["tokens"], b["position_ids"], None, labels=b["labels"])

        def loss_func(output_tensor):
            loss = (output_tensor.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
            return loss, {"loss": loss.detach().clone()}  # megatron scales `loss` in place

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=it, model=[model] if not isinstance(model, list) else model,
        num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    if losses:
        return float(torch.stack([l["loss"] for l in losses]).mean())
    return None


class DiLoCoRank:
    """One rank of the hand-driven DiLoCo tests (test_diloco, test_outer_correctness,
    test_sync_overlap): a small GPT on this rank's replica (PPU 1/N when N > 1), its ownership plan,
    Megatron DDP and Adam (no clipping; Megatron's no-decay groups through its scheduler), and the
    outer loop built from ``outer`` (a DiLoCoConfig); the same seed-11 weights on every replica."""

    def __init__(self, layout, outer, *, N: int = 1, heads: bool = False, swiglu: bool = False, layers: int = 2,
                 lr: float = 3e-3, wd: float = 0.1):
        from megatron.core.optimizer import OptimizerConfig

        from megatron_ppu.optimizer import build_inner_optimizer, build_param_scheduler, wrap_model_ddp
        from megatron_ppu.ownership import build_ownership_plan
        from megatron_ppu.sync.diloco import DiLoCoSync, StaticReplicas

        self.layout, self.K = layout, layout.num_replicas
        self.cfg = make_config(swiglu=swiglu, layers=layers, hidden=32, heads=4, ffn=64)
        self.cfg._ppu_heads = heads
        self.model = build_gpt(self.cfg, PPUConfig(N, heads) if N > 1 else None, layout.slice_index(N), seed=11)
        self.plan = build_ownership_plan(self.model, self.K, N, layout.replica_index)
        self.ddp = wrap_model_ddp(self.model, layout)
        self.opt = build_inner_optimizer([self.ddp], OptimizerConfig(optimizer="adam", lr=lr, weight_decay=wd,
                                                                     clip_grad=0.0), layout)
        build_param_scheduler(self.opt, lr=lr, weight_decay=wd)  # applies megatron's no-decay groups
        self.loop = DiLoCoSync(self.model, self.plan, StaticReplicas(layout.replica_group), outer, self.opt)

    def inner_step(self, s: int) -> None:
        """Inner step ``s`` (1-based) on this replica's batch of that step, without the outer loop."""
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()
        forward_backward(self.ddp, self.cfg, batch(seed=1000 * self.layout.replica_index + s))
        assert self.opt.step()[0]

    def replica_states(self):
        """Every replica's model state (full layout), gathered over the replica group."""
        import torch.distributed as dist

        mine = {k: v for k, v in self.model.state_dict().items()
                if isinstance(v, torch.Tensor) and "_extra_state" not in k}
        everyone = [None] * self.K
        dist.all_gather_object(everyone, mine, group=self.layout.replica_group)
        return everyone
