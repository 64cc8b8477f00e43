"""JSONL -> Megatron ``.bin/.idx`` preprocessing (``tools/preprocess_data.py``).

Same flags and outputs as Megatron-LM's ``tools/preprocess_data.py``: for every ``--json-keys``
key, ``{output_prefix}_{key}_{document|sentence}.bin/.idx`` written with megatron-core's
:class:`~megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`, so megatron-core's
``IndexedDataset`` (and Megatron-LM unchanged) reads them. Token dtype is megatron-core's
``DType.optimal_dtype(tokenizer.vocab_size)``: uint16 below 65,500 ids, int32 otherwise.

The tokenizer flags are Megatron-LM's (all 17 of ``_add_tokenizer_args``; see
:mod:`megatron_ppu.data.tokenizers`): megatron-core's tokenizers by default, Megatron-LM's legacy
ids with ``--legacy-tokenizer``, and the same ``.bin/.idx`` bytes as Megatron-LM's own tool in
both modes (tests/test_tokenizers.py). ``--keep-newlines`` splits with Megatron-LM's Punkt
variant (:mod:`megatron_ppu.data.sentence_split`).

Differences from Megatron-LM, all on purpose:

* The output does not depend on ``--workers`` or ``--partitions``: documents are encoded by a
  ``multiprocessing.Pool`` through the ordered ``imap``, and partitions are *contiguous* ranges
  of the input (Megatron-LM's default round-robin partitioning reorders documents), merged in
  order (both in :mod:`megatron_ppu.data.preprocess_workers`). ``--keep-sequential-samples`` is
  accepted and is always in effect.
* Sentence splitting runs inside the encoding workers (no intermediate ``*_ss.json`` file) with
  offline Punkt parameters (see :mod:`megatron_ppu.data.sentence_split`).
* Bad input follows the policy of :mod:`megatron_ppu.data.inputs`: malformed JSON and invalid
  UTF-8 stop with an error naming file and line (or are skipped and counted with
  ``--skip-malformed``); blank lines, missing keys and empty documents are skipped and counted
  (Megatron-LM writes empty documents; they are useless to a GPT dataset).
* Outputs are written under a temporary directory next to the prefix and renamed into place
  only on success; a failure leaves no ``.bin``/``.idx`` (and keeps older outputs intact).
* Input is fed to the workers with bounded look-ahead, so memory stays flat on large files.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy

from megatron_ppu.data.inputs import (
    DataToolError,
    EmptyOutputError,
    TokenizerModelError,
    expand_input_paths,
)
# Encoding and writing (the worker pool, the partitions) live in preprocess_workers;
# DocumentEncoder is importable from here as before.
from megatron_ppu.data.preprocess_workers import DocumentEncoder, encode_range, run_partitions
from megatron_ppu.data.tokenizers import (
    MEGATRON_TOKENIZER_TYPES,
    TOKENIZER_TYPES,
    TokenizerOptions,
    build_tokenizer,
    dataclass_from,
    tokenizer_options_from,
)

__all__ = [
    "PreprocessConfig",
    "PreprocessReport",
    "DocumentEncoder",
    "output_prefix_for",
    "preprocess_data",
    "build_arg_parser",
    "config_from_args",
    "main",
]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PreprocessConfig(TokenizerOptions):
    """Settings of :func:`preprocess_data` (the CLI flags of ``tools/preprocess_data.py``).

    Attributes:
        input: JSONL file(s) or glob(s) (``.gz`` is decompressed).
        output_prefix: outputs are ``{output_prefix}_{key}_{document|sentence}.bin/.idx``.
        tokenizer_type, tokenizer_model, vocab_size, ...: every field of
            :class:`~megatron_ppu.data.tokenizers.TokenizerOptions` (Megatron-LM's tokenizer
            settings), with ``tools/preprocess_data.py``'s default tokenizer type.
        json_keys: keys to extract; one output per key.
        split_sentences: split documents into sentences (Punkt); outputs are ``*_sentence``.
        keep_newlines: keep the whitespace (newlines) after each sentence when splitting.
        append_eod: append the tokenizer's end-of-document id to every document.
        lang: Punkt language.
        workers: encoding processes (1: encode in this process).
        partitions: contiguous input partitions processed in parallel, then merged;
            ``workers`` must be a multiple.
        log_interval: log progress every this many documents.
        chunksize: documents per task sent to a worker.
        skip_malformed: skip and count malformed JSON / invalid UTF-8 lines instead of failing.
        start_method: multiprocessing start method (default ``fork`` where available).
    """

    input: Union[str, Sequence[str]]
    output_prefix: str
    tokenizer_type: str = "GPTSentencePieceTokenizer"  # (TokenizerOptions: None) preprocess_data.py's default
    json_keys: Sequence[str] = ("text",)
    split_sentences: bool = False
    keep_newlines: bool = False
    append_eod: bool = False
    lang: str = "english"
    workers: int = 1
    partitions: int = 1
    log_interval: int = 1000
    chunksize: int = 32
    skip_malformed: bool = False
    start_method: Optional[str] = None

    def tokenizer_options(self) -> TokenizerOptions:
        """The tokenizer settings of this run."""
        return tokenizer_options_from(self)


@dataclass
class PreprocessReport:
    """Counts and outputs of a :func:`preprocess_data` run (per-key dicts are keyed by JSON key)."""

    outputs: Dict[str, str]
    level: str
    dtype: str
    vocab_size: int
    input_files: List[str]
    documents: int = 0
    blank_lines: int = 0
    skipped_malformed: int = 0
    input_bytes: int = 0
    documents_written: Dict[str, int] = field(default_factory=dict)
    sequences: Dict[str, int] = field(default_factory=dict)
    tokens: Dict[str, int] = field(default_factory=dict)
    missing_keys: Dict[str, int] = field(default_factory=dict)
    empty_documents: Dict[str, int] = field(default_factory=dict)
    workers: int = 1
    partitions: int = 1
    seconds: float = 0.0
    encode_seconds: float = 0.0

    @property
    def documents_per_second(self) -> float:
        """Input documents (non-blank lines) per second of encoding (setup excluded)."""
        return self.documents / self.encode_seconds if self.encode_seconds > 0 else 0.0

    @property
    def megabytes_per_second(self) -> float:
        """Input MiB per second of encoding (setup excluded)."""
        return self.input_bytes / 2**20 / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def summary(self) -> str:
        """A human-readable multi-line report."""
        lines = [
            f"input: {len(self.input_files)} file(s), {self.documents} documents, "
            f"{self.input_bytes / 2**20:.2f} MiB; {self.blank_lines} blank lines, "
            f"{self.skipped_malformed} malformed lines skipped",
            f"time: {self.seconds:.2f} s in all, encoding {self.encode_seconds:.2f} s "
            f"({self.documents_per_second:.1f} docs/s, {self.megabytes_per_second:.2f} MiB/s) "
            f"with {self.workers} worker(s), {self.partitions} partition(s)",
        ]
        for key, prefix in self.outputs.items():
            lines.append(
                f"[{key}] {prefix}.bin/.idx ({self.dtype}, vocab {self.vocab_size}): "
                f"{self.documents_written.get(key, 0)} documents, {self.sequences.get(key, 0)} "
                f"{self.level}s, {self.tokens.get(key, 0)} tokens; skipped "
                f"{self.missing_keys.get(key, 0)} missing key, {self.empty_documents.get(key, 0)} "
                "empty"
            )
        return "\n".join(lines)


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    """The dataset prefix Megatron-LM uses: ``{output_prefix}_{key}_{document|sentence}``."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def _validate(config: PreprocessConfig) -> None:
    if config.workers < 1:
        raise ValueError(f"--workers must be >= 1, not {config.workers}.")
    if config.partitions < 1:
        raise ValueError(f"--partitions must be >= 1, not {config.partitions}.")
    if config.workers % config.partitions != 0:
        raise ValueError(
            f"--workers ({config.workers}) must be a multiple of --partitions "
            f"({config.partitions}): each partition gets workers/partitions processes."
        )
    if not config.json_keys:
        raise ValueError("--json-keys needs at least one key.")
    if len(set(config.json_keys)) != len(config.json_keys):
        raise ValueError(f"--json-keys has duplicates: {list(config.json_keys)}.")
    if config.keep_newlines and not config.split_sentences:
        logger.warning("--keep-newlines only matters with --split-sentences; ignoring it.")


def preprocess_data(config: PreprocessConfig) -> PreprocessReport:
    """Tokenize JSONL documents into megatron-core indexed datasets, one per JSON key.

    Returns:
        A :class:`PreprocessReport` with the output prefixes and counts.

    Raises:
        InputFileNotFoundError: an input file is missing (nothing is written).
        TokenizerModelNotFoundError, TokenizerModelError: the tokenizer cannot be built.
        SentenceSplitterUnavailableError: ``split_sentences`` without the Punkt data package.
        MalformedJSONError, InvalidUTF8Error, MalformedInputError: a bad line (unless
            ``skip_malformed``), naming file and line.
        EmptyOutputError: a key got no document at all.
        ValueError: inconsistent options.
    """
    begin = time.perf_counter()
    _validate(config)
    paths = expand_input_paths(config.input)
    tokenizer = build_tokenizer(config.tokenizer_options())
    if config.append_eod and tokenizer.eod < 0:
        raise TokenizerModelError(
            f"--append-eod needs an end-of-document id, but the {config.tokenizer_type} from "
            f"{config.tokenizer_model or config.vocab_file!r} has none (no EOS token); give the "
            "tokenizer an EOS token (SentencePiece: retrain with an EOS piece; HuggingFace: "
            "`eos_token` in tokenizer_config.json) or drop --append-eod."
        )
    if config.padded_vocab_size is not None:
        logger.info("--padded-vocab-size %d accepted: it does not change the output (as in "
                    "Megatron-LM, the token dtype follows the tokenizer's own vocabulary size, "
                    "%d).", config.padded_vocab_size, tokenizer.vocab_size)
    if config.split_sentences:
        from megatron_ppu.data.sentence_split import build_sentence_splitter

        build_sentence_splitter(config.keep_newlines, config.lang)  # fail early if unavailable
    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    level = "sentence" if config.split_sentences else "document"
    final = {
        key: output_prefix_for(config.output_prefix, key, config.split_sentences)
        for key in config.json_keys
    }
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(
        dir=out_dir, prefix=f".{os.path.basename(config.output_prefix) or 'out'}.tmp-"
    )
    logger.info(
        "Preprocessing %d file(s) into %s (%s, %s, %d worker(s), %d partition(s))",
        len(paths), ", ".join(p + ".bin/.idx" for p in final.values()),
        numpy.dtype(dtype).name, level, config.workers, config.partitions,
    )
    try:
        tmp = {key: os.path.join(tmp_dir, f"out_{n}") for n, key in enumerate(config.json_keys)}
        encode_begin = time.perf_counter()
        if config.partitions == 1:
            stats = encode_range(config, paths, 0, None, tmp, config.workers, dtype)
        else:
            stats = run_partitions(config, paths, tmp_dir, tmp, dtype)
        encode_seconds = time.perf_counter() - encode_begin
        for key in config.json_keys:
            if stats.documents_written[key] == 0:
                raise EmptyOutputError(
                    f"No document with text under key {key!r} in {paths}: "
                    f"{stats.documents} documents read, {stats.missing_keys[key]} without the "
                    f"key, {stats.empty_documents[key]} empty, {stats.blank_lines} blank lines, "
                    f"{stats.skipped_malformed} malformed lines skipped. Check --json-keys and "
                    "the input; nothing was written."
                )
        for key in config.json_keys:
            os.replace(tmp[key] + ".bin", final[key] + ".bin")
            os.replace(tmp[key] + ".idx", final[key] + ".idx")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    report = PreprocessReport(
        outputs=final,
        level=level,
        dtype=numpy.dtype(dtype).name,
        vocab_size=tokenizer.vocab_size,
        input_files=list(paths),
        documents=stats.documents,
        blank_lines=stats.blank_lines,
        skipped_malformed=stats.skipped_malformed,
        input_bytes=stats.input_bytes,
        documents_written=dict(stats.documents_written),
        sequences=dict(stats.sequences),
        tokens=dict(stats.tokens),
        missing_keys=dict(stats.missing_keys),
        empty_documents=dict(stats.empty_documents),
        workers=config.workers,
        partitions=config.partitions,
        seconds=time.perf_counter() - begin,
        encode_seconds=encode_seconds,
    )
    logger.info(
        "Done: %d documents in %.2f s (%.1f docs/s, %.2f MB/s)",
        report.documents, report.encode_seconds, report.documents_per_second,
        report.megabytes_per_second,
    )
    return report


def build_arg_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tools/preprocess_data.py`` (Megatron-LM's flag names)."""
    parser = argparse.ArgumentParser(
        description="Tokenize JSONL documents into Megatron .bin/.idx indexed datasets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("tokenizer (Megatron-LM's flags; see docs/data.md)")
    group.add_argument("--tokenizer-type", required=True, choices=MEGATRON_TOKENIZER_TYPES,
                       help=f"Implemented: {', '.join(TOKENIZER_TYPES)}; Megatron-LM's other "
                            "types are refused with the reason.")
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model file, tiktoken JSON vocabulary, or a local "
                            "HuggingFace tokenizer folder / tokenizer.json (never downloaded).")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: the text's ids are below N; the end-of-document id is N "
                            "(megatron-core < 0.18) or N-1 (>= 0.18, Megatron-LM's convention of the "
                            "installed version). TikTokenizer: vocabulary size (default 131072).")
    group.add_argument("--padded-vocab-size", type=int, default=None,
                       help="Accepted; does not change the output (as in Megatron-LM).")
    group.add_argument("--vocab-file", default=None,
                       help="GPT2BPETokenizer: vocab.json (HuggingFaceTokenizer: passed on).")
    group.add_argument("--merge-file", default=None,
                       help="GPT2BPETokenizer: merges.txt (HuggingFaceTokenizer: passed on).")
    group.add_argument("--vocab-extra-ids", type=int, default=0,
                       help="--legacy-tokenizer SentencePieceTokenizer: append <extra_id_0..N-1>.")
    group.add_argument("--tokenizer-metadata", default=None,
                       help="Refused: the tokenizer is chosen by --tokenizer-type.")
    group.add_argument("--tokenizer-special-tokens", nargs="+", default=None,
                       help="Special tokens (TikTokenizer; HuggingFace additional special "
                            "tokens; SentencePiece with --tokenizer-sentencepiece-legacy).")
    group.add_argument("--legacy-tokenizer", action="store_true",
                       help="Megatron-LM's legacy tokenizer ids instead of megatron-core's.")
    group.add_argument("--tiktoken-pattern", default=None, choices=["v1", "v2"],
                       help="TikTokenizer split pattern (default v2; required with "
                            "--legacy-tokenizer).")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids reserved for special tokens.")
    group.add_argument("--tiktoken-special-tokens", nargs="+", default=None,
                       help="Refused: Megatron-LM never reads it; use --tokenizer-special-tokens.")
    group.add_argument("--tokenizer-sentencepiece-legacy", action="store_true",
                       help="megatron-core SentencePiece wrapper's legacy mode (allows "
                            "--tokenizer-special-tokens).")
    group.add_argument("--tokenizer-hf-use-fast", action="store_true",
                       help="HuggingFace: use the fast tokenizer.")
    group.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                       help="HuggingFace: encode with the tokenizer's special tokens (BOS...).")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="HuggingFace: allow code shipped in the local tokenizer folder.")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="JSONL file(s) or glob(s), e.g. 'data/*.jsonl' (quote globs).")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Keys to extract from each JSON object; one output per key.")
    group.add_argument("--split-sentences", action="store_true",
                       help="Split documents into sentences (NLTK Punkt, offline).")
    group.add_argument("--keep-newlines", action="store_true",
                       help="Keep newlines between sentences when splitting.")
    group.add_argument("--skip-malformed", action="store_true",
                       help="Skip and count malformed JSON / invalid UTF-8 lines instead of "
                            "failing.")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append an end-of-document token to every document.")
    group.add_argument("--lang", default="english", help="Punkt language for sentence splitting.")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="Writes PREFIX_{key}_{document|sentence}.bin/.idx.")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="Encoding processes.")
    group.add_argument("--partitions", type=int, default=1,
                       help="Contiguous input partitions processed in parallel, then merged.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Log progress every N documents.")
    group.add_argument("--chunksize", type=int, default=32, help="Documents per worker task.")
    group.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default=None,
                       help="multiprocessing start method; unset: fork where available, "
                            "else spawn.")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="Accepted for Megatron-LM compatibility; order is always kept.")
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """Turn parsed CLI arguments (dests = field names) into a :class:`PreprocessConfig`."""
    return dataclass_from(PreprocessConfig, args, json_keys=tuple(args.json_keys))


def main(argv: Optional[Sequence[str]] = None) -> PreprocessReport:
    """Entry point of ``tools/preprocess_data.py``; prints the final report.

    Raises:
        SystemExit: with an ``error: ...`` message (exit status 1) on bad input or options.
    """
    args = build_arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            stream=sys.stderr)
    try:
        report = preprocess_data(config_from_args(args))
    except (DataToolError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(report.summary())
    return report
