"""Train a SentencePiece tokenizer from JSONL or plain-text corpora (``tools/train_tokenizer.py``).

SentencePiece treats every input *line* as one training sentence and silently skips lines
longer than ``max_sentence_length`` bytes (4192 by default), so feeding it whole documents
(one JSONL line each) can drop most of a corpus without an error. Here every document is
split into its lines (paragraphs), blank lines are dropped, and any line still longer than
``max_sentence_length`` bytes is cut at whitespace into pieces below the limit; the limit
handed to SentencePiece is the same, so no text is dropped. The number of cut lines is logged
and reported.

The ``.model`` and ``.vocab`` files are written atomically: SentencePiece trains into a
temporary directory next to the target, and the files are moved into place with
``os.replace`` only after training succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

from megatron_ppu.data.inputs import (
    DataToolError,
    EmptyOutputError,
    MalformedInputError,
    decode_line,
    expand_input_paths,
    get_text_field,
    iter_raw_lines,
    parse_json_line,
)
from megatron_ppu.data.tokenizers import dataclass_from

__all__ = [
    "TokenizerTrainingError",
    "TokenizerTrainingConfig",
    "TokenizerTrainingResult",
    "iter_training_sentences",
    "split_long_line",
    "train_tokenizer",
    "build_arg_parser",
    "main",
]

logger = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")


class TokenizerTrainingError(DataToolError, ValueError):
    """SentencePiece refused to train (vocabulary too large for the corpus, bad option...)."""


@dataclass
class TokenizerTrainingConfig:
    """Settings of :func:`train_tokenizer` (the CLI flags of ``tools/train_tokenizer.py``).

    Attributes:
        inputs: input files or globs (JSONL or plain text).
        output_prefix: writes ``{output_prefix}.model`` and ``{output_prefix}.vocab``.
        vocab_size: number of pieces.
        model_type: ``bpe``, ``unigram``, ``char`` or ``word``.
        json_keys: keys whose text is used, for JSONL inputs.
        input_format: ``auto`` (by file suffix: .jsonl/.json/.ndjson[.gz] are JSONL), ``jsonl``
            or ``text`` (one training sentence per line).
        byte_fallback: map unknown characters to byte pieces (``<0xNN>``) instead of ``<unk>``.
        character_coverage: fraction of characters covered by the character set.
        input_sentence_size: sample at most this many sentences for training (0: all).
        max_sentence_length: longest training sentence in bytes; longer lines are cut at
            whitespace first, so none is dropped.
        shuffle_input_sentence: shuffle before sampling ``input_sentence_size`` sentences.
        lossless: ``detokenize(tokenize(text)) == text`` for any text: identity normalization,
            whitespace kept as is, no dummy prefix, byte fallback on.
        normalization_rule_name: SentencePiece normalization (default ``nmt_nfkc``, or
            ``identity`` when ``lossless``).
        hard_vocab_limit: fail when the corpus cannot fill ``vocab_size`` pieces (SentencePiece's
            default); when False the vocabulary may come out smaller.
        num_threads: training threads (default: the CPU count).
        user_defined_symbols: pieces always kept whole.
        max_documents: stop after this many documents (JSONL lines or text lines).
        skip_malformed: skip (and count) malformed JSON / invalid UTF-8 lines instead of failing.
        sample_bytes: size of the sample on which bytes/token is measured.
        verbose: let SentencePiece log its progress to stderr.
        extra_options: further ``SentencePieceTrainer.train`` keyword arguments.
    """

    inputs: Union[str, Sequence[str]]
    output_prefix: str
    vocab_size: int = 32000
    model_type: str = "bpe"
    json_keys: Sequence[str] = ("text",)
    input_format: str = "auto"
    byte_fallback: bool = False
    character_coverage: float = 0.9995
    input_sentence_size: int = 0
    max_sentence_length: int = 16384
    shuffle_input_sentence: bool = True
    lossless: bool = False
    normalization_rule_name: Optional[str] = None
    hard_vocab_limit: bool = True
    num_threads: Optional[int] = None
    user_defined_symbols: Sequence[str] = ()
    max_documents: Optional[int] = None
    skip_malformed: bool = False
    sample_bytes: int = 1_000_000
    verbose: bool = False
    extra_options: Dict[str, object] = field(default_factory=dict)


@dataclass
class TokenizerTrainingResult:
    """What :func:`train_tokenizer` wrote and measured."""

    model_path: str
    vocab_path: str
    vocab_size: int
    documents: int
    sentences: int
    training_bytes: int
    long_lines_split: int
    blank_lines: int
    missing_keys: int
    empty_documents: int
    skipped_malformed: int
    bytes_per_token: float
    seconds: float

    def summary(self) -> str:
        """A human-readable multi-line report."""
        return "\n".join(
            [
                f"tokenizer model: {self.model_path}",
                f"vocab file:      {self.vocab_path}",
                f"vocab size:      {self.vocab_size}",
                f"documents:       {self.documents}",
                f"training lines:  {self.sentences} ({self.training_bytes / 1e6:.2f} MB; "
                f"{self.long_lines_split} long lines cut to fit max_sentence_length)",
                f"skipped:         {self.blank_lines} blank lines, {self.missing_keys} missing "
                f"keys, {self.empty_documents} empty documents, {self.skipped_malformed} "
                "malformed lines",
                f"bytes/token:     {self.bytes_per_token:.3f} (on a sample of the training text)",
                f"time:            {self.seconds:.2f} s",
            ]
        )


def split_long_line(line: str, max_bytes: int) -> List[str]:
    """Cut ``line`` at whitespace into pieces of at most ``max_bytes`` UTF-8 bytes.

    A single word longer than the limit is cut between characters. Runs of whitespace at a cut
    collapse (the pieces are training sentences, not text to restore).
    """
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    pieces: List[str] = []
    current: List[str] = []
    current_bytes = 0
    for word in line.split():
        word_bytes = len(word.encode("utf-8"))
        if word_bytes > max_bytes:
            if current:
                pieces.append(" ".join(current))
                current, current_bytes = [], 0
            chunk, chunk_bytes = [], 0
            for char in word:
                char_bytes = len(char.encode("utf-8"))
                if chunk_bytes + char_bytes > max_bytes:
                    pieces.append("".join(chunk))
                    chunk, chunk_bytes = [], 0
                chunk.append(char)
                chunk_bytes += char_bytes
            if chunk:
                current, current_bytes = ["".join(chunk)], chunk_bytes
            continue
        extra = word_bytes + (1 if current else 0)
        if current and current_bytes + extra > max_bytes:
            pieces.append(" ".join(current))
            current, current_bytes = [word], word_bytes
        else:
            current.append(word)
            current_bytes += extra
    if current:
        pieces.append(" ".join(current))
    return pieces


def _is_jsonl(path: str, input_format: str) -> bool:
    if input_format == "jsonl":
        return True
    if input_format == "text":
        return False
    if input_format != "auto":
        raise ValueError(f"--input-format must be auto, jsonl or text, not {input_format!r}.")
    return path.lower().endswith(_JSONL_SUFFIXES)


@dataclass
class _Counters:
    documents: int = 0
    sentences: int = 0
    training_bytes: int = 0
    long_lines_split: int = 0
    blank_lines: int = 0
    missing_keys: int = 0
    empty_documents: int = 0
    skipped_malformed: int = 0


def iter_training_sentences(
    config: TokenizerTrainingConfig, counters: Optional[_Counters] = None
) -> Iterator[str]:
    """Yield the training sentences of ``config.inputs`` (non-empty, within the length limit).

    Raises:
        InputFileNotFoundError, MalformedJSONError, InvalidUTF8Error: see
            :mod:`megatron_ppu.data.inputs`.
    """
    counters = counters if counters is not None else _Counters()
    paths = expand_input_paths(config.inputs)
    max_bytes = int(config.max_sentence_length)

    def lines_of(text: str) -> Iterator[str]:
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            pieces = split_long_line(line, max_bytes)
            if len(pieces) > 1:
                counters.long_lines_split += 1
            for piece in pieces:
                counters.sentences += 1
                counters.training_bytes += len(piece.encode("utf-8"))
                yield piece

    for file_index, line_number, raw in iter_raw_lines(paths):
        if config.max_documents is not None and counters.documents >= config.max_documents:
            return
        path = paths[file_index]
        try:
            if _is_jsonl(path, config.input_format):
                data = parse_json_line(raw, path, line_number)
                if data is None:
                    counters.blank_lines += 1
                    continue
                texts = []
                for key in config.json_keys:
                    value = get_text_field(data, key, path, line_number)
                    if value is None:
                        counters.missing_keys += 1
                        continue
                    texts.append(value if isinstance(value, str) else "\n".join(value))
            else:
                line = decode_line(raw, path, line_number)
                if not line.strip():
                    counters.blank_lines += 1
                    continue
                texts = [line]
        except MalformedInputError:
            if not config.skip_malformed:
                raise
            counters.skipped_malformed += 1
            continue
        counters.documents += 1
        for text in texts:
            if not text.strip():
                counters.empty_documents += 1
                continue
            yield from lines_of(text)


def _trainer_options(config: TokenizerTrainingConfig) -> Dict[str, object]:
    default_rule = "identity" if config.lossless else "nmt_nfkc"
    normalization = config.normalization_rule_name or default_rule
    options: Dict[str, object] = dict(
        vocab_size=int(config.vocab_size),
        model_type=config.model_type,
        character_coverage=float(config.character_coverage),
        byte_fallback=bool(config.byte_fallback or config.lossless),
        input_sentence_size=int(config.input_sentence_size),
        shuffle_input_sentence=bool(config.shuffle_input_sentence),
        max_sentence_length=int(config.max_sentence_length),
        hard_vocab_limit=bool(config.hard_vocab_limit),
        num_threads=int(config.num_threads or os.cpu_count() or 1),
        normalization_rule_name=normalization,
        minloglevel=0 if config.verbose else 2,
    )
    if config.lossless:
        options.update(remove_extra_whitespaces=False, add_dummy_prefix=False)
    if config.user_defined_symbols:
        options["user_defined_symbols"] = list(config.user_defined_symbols)
    options.update(config.extra_options)
    return options


def _target_paths(output_prefix: str):
    prefix = os.path.abspath(os.path.expanduser(output_prefix))
    if prefix.endswith(".model"):
        prefix = prefix[: -len(".model")]
    return prefix, prefix + ".model", prefix + ".vocab"


def train_tokenizer(config: TokenizerTrainingConfig) -> TokenizerTrainingResult:
    """Train a SentencePiece model as configured and write it atomically.

    Returns:
        A :class:`TokenizerTrainingResult` (paths, vocabulary size, counts, bytes/token).

    Raises:
        InputFileNotFoundError: an input is missing.
        MalformedJSONError, InvalidUTF8Error: a bad input line (unless ``skip_malformed``).
        EmptyOutputError: the inputs hold no training text.
        TokenizerTrainingError: SentencePiece failed (e.g. vocabulary too large for the corpus).
    """
    import sentencepiece

    start = time.perf_counter()
    if config.model_type not in ("bpe", "unigram", "char", "word"):
        raise TokenizerTrainingError(
            f"--model-type must be bpe, unigram, char or word, not {config.model_type!r}."
        )
    expand_input_paths(config.inputs)  # fail on a missing input before creating anything
    prefix, model_path, vocab_path = _target_paths(config.output_prefix)
    parent = os.path.dirname(prefix)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(prefix)}.tmp-")
    counters = _Counters()
    try:
        text_path = os.path.join(tmp_dir, "train.txt")
        sample: List[str] = []
        sample_size = 0
        with open(text_path, "w", encoding="utf-8", newline="\n") as out:
            for sentence in iter_training_sentences(config, counters):
                out.write(sentence)
                out.write("\n")
                if sample_size < config.sample_bytes:
                    sample.append(sentence)
                    sample_size += len(sentence.encode("utf-8"))
        if counters.sentences == 0:
            raise EmptyOutputError(
                f"No training text in {config.inputs!r}: every document was blank, empty or "
                f"lacked the keys {list(config.json_keys)} ({counters.missing_keys} missing keys, "
                f"{counters.empty_documents} empty documents). Check --json-keys and the input."
            )
        options = _trainer_options(config)
        logger.info(
            "Training a %s SentencePiece model (vocab %d) on %d lines (%.2f MB) from %d documents",
            options["model_type"], options["vocab_size"], counters.sentences,
            counters.training_bytes / 1e6, counters.documents,
        )
        try:
            sentencepiece.SentencePieceTrainer.train(
                input=text_path, model_prefix=os.path.join(tmp_dir, "spm"), **options
            )
        except (RuntimeError, OSError) as exc:
            hint = ""
            if "smaller than required_chars" in str(exc):
                hint = (
                    " The characters of the corpus (plus 256 byte pieces with byte fallback) do "
                    "not fit: raise --vocab-size or lower --character-coverage."
                )
            elif "Vocabulary size too high" in str(exc):
                hint = (
                    " The corpus is too small for that many pieces: lower --vocab-size, or pass "
                    "--no-hard-vocab-limit."
                )
            detail = str(exc).strip().rstrip(".")
            raise TokenizerTrainingError(
                f"SentencePiece training failed: {detail}.{hint}"
            ) from None
        processor = sentencepiece.SentencePieceProcessor(
            model_file=os.path.join(tmp_dir, "spm.model")
        )
        vocab_size = processor.get_piece_size()
        tokens = sum(len(ids) for ids in processor.encode(sample)) if sample else 0
        bytes_per_token = sample_size / tokens if tokens else 0.0
        os.replace(os.path.join(tmp_dir, "spm.vocab"), vocab_path)
        os.replace(os.path.join(tmp_dir, "spm.model"), model_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    result = TokenizerTrainingResult(
        model_path=model_path,
        vocab_path=vocab_path,
        vocab_size=vocab_size,
        bytes_per_token=bytes_per_token,
        seconds=time.perf_counter() - start,
        **dataclasses.asdict(counters),
    )
    if counters.long_lines_split:
        logger.info(
            "%d lines were longer than max_sentence_length=%d bytes and were cut at whitespace",
            counters.long_lines_split, config.max_sentence_length,
        )
    logger.info(
        "Wrote %s: vocab size %d, %.3f bytes/token on a %.2f MB sample",
        model_path, vocab_size, bytes_per_token, sample_size / 1e6,
    )
    return result


def build_arg_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tools/train_tokenizer.py``."""
    parser = argparse.ArgumentParser(
        description="Train a SentencePiece tokenizer from JSONL or plain-text files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="Input files or globs (JSONL, or plain text with one sentence "
                            "per line).")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Keys whose text is used, for JSONL inputs.")
    group.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                       help="auto: .jsonl/.json/.ndjson[.gz] files are JSONL, others plain text.")
    group.add_argument("--max-documents", type=int, default=None,
                       help="Use at most this many documents.")
    group.add_argument("--skip-malformed", action="store_true",
                       help="Skip and count malformed JSON / invalid UTF-8 lines instead of "
                            "failing.")
    group = parser.add_argument_group("model")
    group.add_argument("--output-prefix", "--model-prefix", dest="output_prefix", required=True,
                       help="Writes PREFIX.model and PREFIX.vocab.")
    group.add_argument("--vocab-size", type=int, default=32000, help="Number of pieces.")
    group.add_argument("--model-type", choices=["bpe", "unigram", "char", "word"], default="bpe")
    group.add_argument("--byte-fallback", action="store_true",
                       help="Map unknown characters to byte pieces instead of <unk>.")
    group.add_argument("--character-coverage", type=float, default=0.9995)
    group.add_argument("--input-sentence-size", type=int, default=0,
                       help="Sample at most this many training lines (0: all).")
    group.add_argument("--max-sentence-length", type=int, default=16384,
                       help="Longest training line in bytes; longer lines are cut at whitespace "
                            "(SentencePiece would silently drop them).")
    group.add_argument("--no-shuffle-input-sentence", dest="shuffle_input_sentence",
                       action="store_false", help="Do not shuffle before sampling.")
    group.add_argument("--lossless", action="store_true",
                       help="Identity normalization, whitespace kept, no dummy prefix, byte "
                            "fallback: detokenize(tokenize(text)) == text.")
    group.add_argument("--normalization-rule-name", default=None,
                       help="SentencePiece normalization (nmt_nfkc, nfkc, identity, ...).")
    group.add_argument("--no-hard-vocab-limit", dest="hard_vocab_limit", action="store_false",
                       help="Allow a smaller vocabulary when the corpus is too small.")
    group.add_argument("--num-threads", type=int, default=None, help="Default: the CPU count.")
    group.add_argument("--user-defined-symbols", nargs="*", default=[],
                       help="Pieces always kept whole.")
    group.add_argument("--verbose", action="store_true", help="Show SentencePiece's own log.")
    return parser


def config_from_args(args: argparse.Namespace) -> TokenizerTrainingConfig:
    """Turn parsed CLI arguments (dests = field names, ``--input`` = ``inputs``) into a
    :class:`TokenizerTrainingConfig`."""
    return dataclass_from(TokenizerTrainingConfig, args, inputs=args.input)


def _configure_cli_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            stream=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> TokenizerTrainingResult:
    """Entry point of ``tools/train_tokenizer.py``; prints the final report.

    Raises:
        SystemExit: with an ``error: ...`` message (exit status 1) on bad input.
    """
    args = build_arg_parser().parse_args(argv)
    _configure_cli_logging()
    try:
        result = train_tokenizer(config_from_args(args))
    except DataToolError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(result.summary())
    return result
