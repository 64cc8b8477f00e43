"""``shape_from_args``: the cost model's ``EstimateConfig`` from the trainer's parsed flags, so that
``tools/estimate.py`` and the benchmarks estimate the run the trainer would build.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional

from megatron_ppu.estimate.shape import EstimateConfig, ModelShape, PPUShape, Precision, TrainShape
from megatron_ppu.training.arguments import TrainArgs, data_parallel_size, ffn_hidden_size, replica_count
from megatron_ppu.training.schedule import batch_schedule


def shape_from_args(args: TrainArgs, world_size: int, *, vocab_size: Optional[int] = None,
                    precision: Optional[Precision] = None, outer_state_placement: Optional[str] = None,
                    snapshot_scope: str = "trainable", fused_attention: bool = False) -> EstimateConfig:
    """The cost model's input for a parsed trainer command line (:func:`megatron_ppu.training.
    arguments.parse_args`) on ``world_size`` ranks: the one translation from the trainer's
    settings to the model's shapes, used by ``tools/estimate.py`` and the benchmarks.

    What the trainer derives, it derives the same way here: the MLP width (Megatron-LM's,
    SwiGLU included), the data-parallel size, the replica count K (every DP rank without
    ``--diloco-replicas``; DDP's gradient all-reduce runs over all DP ranks), the micro-batches
    per step, and the fragments: the trainer's ``--diloco-streaming-fragments`` F counts the
    embeddings/output fragment, the model's ``streaming_fragments`` counts layer groups
    (F - 1 for F > 1). The outer payload is ``--diloco-allreduce-dtype`` with
    ``--diloco-quantization-block``.

    Args:
        vocab_size: the tokenizer's vocabulary (default ``--vocab-size``; required if neither).
        precision: default :meth:`Precision.megatron` for ``--bf16``/``--fp16``, with the outer
            payload dtype of ``--diloco-allreduce-dtype``.
        outer_state_placement: default "stream" with several fragments, else "device".
        snapshot_scope, fused_attention: as in :class:`PPUShape` / :class:`ModelShape`.
    """
    m, d, par = args.model, args.diloco, args.parallel
    vocab = vocab_size if vocab_size is not None else args.data.vocab_size
    if vocab is None:
        raise ValueError("the cost model needs the vocabulary size: pass --vocab-size (the tokenizer's "
                         "vocabulary, before Megatron's padding).")
    dp = data_parallel_size(args, world_size)
    if dp is None:
        raise ValueError(f"world size {world_size} is not divisible by TP {par.tensor_model_parallel_size} x PP "
                         f"{par.pipeline_model_parallel_size}; give a multiple of their product.")
    k = replica_count(args, dp)
    ddp = not d.enabled and args.subnet.sync != "step"
    _, num_microbatches = batch_schedule(args.training, dp)
    model = ModelShape(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=ffn_hidden_size(m), num_query_groups=m.num_query_groups if m.group_query_attention else None,
        kv_channels=m.kv_channels, vocab_size=vocab, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings,
        tie_embeddings=not m.untie_embeddings_and_output_weights, swiglu=m.swiglu,
        add_bias_linear=not m.disable_bias_linear, normalization=m.normalization,
        position_embedding_type=m.position_embedding_type,
        dropout=m.attention_dropout > 0 or m.hidden_dropout > 0, fused_attention=fused_attention)
    train = TrainShape(micro_batch_size=args.training.micro_batch_size, num_microbatches=num_microbatches,
                       tensor_model_parallel_size=par.tensor_model_parallel_size,
                       pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                       sequence_parallel=par.sequence_parallel, recompute_granularity=m.recompute_granularity or "none")
    f = d.streaming_fragments - 1 if d.streaming_fragments > 1 else 1
    ppu = PPUShape(slices=args.ppu.num_slices, slice_attention_heads=args.ppu.slice_attention_heads,
                   replicas=dp if ddp else k, local_steps=max(d.local_steps, 1), streaming_fragments=f,
                   outer_optimizer=not ddp,
                   outer_state_placement=outer_state_placement or ("stream" if f > 1 else "device"),
                   snapshot_scope=snapshot_scope, quantization_block=d.quantization_block)
    if precision is None:
        precision = Precision.megatron(bf16=args.precision.bf16 or args.precision.fp16)
        precision = Precision(**{**asdict(precision), "outer_comm_dtype": d.allreduce_dtype})
    return EstimateConfig(model=model, train=train, ppu=ppu, precision=precision)
