"""The encoding side of ``preprocess_data``: JSONL lines into ``.bin/.idx``, in worker processes.

This module owns how documents are turned into token ids and written: :class:`DocumentEncoder`
(one raw JSONL line -> token ids per JSON key, in this process or inside a worker), the
``multiprocessing.Pool`` workers fed with bounded look-ahead through the ordered ``imap``
(:func:`encode_range`: one contiguous range of input lines into one ``.bin/.idx`` per key), and
the partition processes whose outputs are merged in input order (:func:`run_partitions`).
:mod:`megatron_ppu.data.preprocess` owns the settings, the checks, the temporary outputs and their
renaming into place, the report and the CLI; it re-exports :class:`DocumentEncoder`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy

from megatron_ppu.data.inputs import (
    MalformedInputError,
    count_lines,
    get_text_field,
    iter_raw_lines,
    parse_json_line,
)
from megatron_ppu.data.tokenizers import build_tokenizer

if TYPE_CHECKING:
    from megatron_ppu.data.preprocess import PreprocessConfig

__all__ = ["DocumentEncoder", "EncodeStats", "encode_range", "run_partitions"]

# preprocess_data's progress and warnings, under the logger name they have always had.
logger = logging.getLogger("megatron_ppu.data.preprocess")

_BLANK, _DOC, _ERROR = 0, 1, 2


@dataclass
class EncodeStats:
    """Counts of one encoding run (one partition, or all of them added up with :meth:`add`)."""

    documents: int = 0
    blank_lines: int = 0
    skipped_malformed: int = 0
    input_bytes: int = 0
    documents_written: Counter = field(default_factory=Counter)
    sequences: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    missing_keys: Counter = field(default_factory=Counter)
    empty_documents: Counter = field(default_factory=Counter)

    def add(self, other: "EncodeStats") -> None:
        """Add ``other``'s counts to these."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class DocumentEncoder:
    """Turns one raw JSONL line into token ids per key (runs inside the workers).

    Args:
        config: the run's :class:`~megatron_ppu.data.preprocess.PreprocessConfig`.
        paths: the input files (errors name ``paths[file_index]``).
    """

    def __init__(self, config: PreprocessConfig, paths: Sequence[str]):
        self.keys = tuple(config.json_keys)
        self.paths = list(paths)
        self.append_eod = config.append_eod
        self.tokenizer = build_tokenizer(config.tokenizer_options())
        self.eod = self.tokenizer.eod
        self.id_dtype = numpy.int32 if self.tokenizer.vocab_size < 2**31 else numpy.int64
        self.splitter = None
        if config.split_sentences:
            from megatron_ppu.data.sentence_split import build_sentence_splitter

            self.splitter = build_sentence_splitter(config.keep_newlines, config.lang)

    def _tokenize(self, text: str, path: str, line: int, key: str) -> List[int]:
        try:
            return self.tokenizer.tokenize(text)
        except (ValueError, TypeError) as exc:
            raise MalformedInputError(
                f"{path}:{line}: key {key!r} cannot be tokenized: {exc}", path=path, line=line
            ) from None

    def encode(self, item: Tuple[int, int, bytes]):
        """Encode ``(file_index, line_number, raw_line)``.

        Returns:
            ``(status, payload, n_bytes)``: status blank/doc/error; for a document the payload
            has one entry per key: ``None`` (missing), ``()`` (empty) or ``(ids, lengths)``.
        """
        file_index, line, raw = item
        path = self.paths[file_index]
        try:
            data = parse_json_line(raw, path, line)
            if data is None:
                return _BLANK, None, len(raw)
            entries = []
            for key in self.keys:
                value = get_text_field(data, key, path, line)
                if value is None:
                    entries.append(None)
                    continue
                if isinstance(value, list):
                    sentences = value
                elif not value.strip():
                    sentences = []
                elif self.splitter is not None:
                    sentences = self.splitter.split(value)
                else:
                    sentences = [value]
                ids: List[int] = []
                lengths: List[int] = []
                for sentence in sentences:
                    sentence_ids = self._tokenize(sentence, path, line, key)
                    if sentence_ids:
                        ids.extend(sentence_ids)
                        lengths.append(len(sentence_ids))
                if not ids:
                    entries.append(())
                    continue
                if self.append_eod:
                    ids.append(self.eod)
                    lengths[-1] += 1
                entries.append((numpy.asarray(ids, dtype=self.id_dtype), lengths))
            return _DOC, entries, len(raw)
        except MalformedInputError as exc:
            return _ERROR, exc, len(raw)


def _worker_init(config: PreprocessConfig, paths: Sequence[str]) -> None:
    # A forked worker inherits the parent's heap (torch, megatron-core: millions of objects);
    # without freezing it, every full garbage collection walks and dirties those pages, which
    # made sentence splitting with 2 workers slower than with 1.
    gc.freeze()
    # Per-process state of a Pool worker: the encoder lives on this function object, so the
    # parent process holds no module-level state. A failing initializer would make the Pool
    # respawn workers forever, so the error is kept and raised by the first task instead.
    try:
        _worker_encode.encoder, _worker_encode.error = DocumentEncoder(config, paths), None
    except Exception as exc:  # noqa: BLE001 - re-raised in _worker_encode
        _worker_encode.encoder, _worker_encode.error = None, exc


def _worker_encode(item):
    if _worker_encode.encoder is None:
        raise _worker_encode.error
    return _worker_encode.encoder.encode(item)


def _bounded(items: Iterable, slots: threading.Semaphore, stop: threading.Event) -> Iterator:
    """Yield from ``items`` with at most N in flight (one slot is released per result)."""
    for item in items:
        while not slots.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield item


def _default_start_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def encode_range(
    config: PreprocessConfig,
    paths: Sequence[str],
    start: int,
    stop: Optional[int],
    prefixes: Dict[str, str],
    workers: int,
    dtype,
    label: str = "",
) -> EncodeStats:
    """Encode input lines ``[start, stop)`` into ``{prefix}.bin/.idx`` per key."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    stats = EncodeStats()
    keys = tuple(config.json_keys)
    builders = {key: IndexedDatasetBuilder(prefixes[key] + ".bin", dtype=dtype) for key in keys}
    items = iter_raw_lines(paths, start, stop)
    pool = None
    stop_event = threading.Event()
    log_interval = max(1, int(config.log_interval))
    ok = False
    try:
        if workers <= 1:
            encoder = DocumentEncoder(config, paths)
            results: Iterator = map(encoder.encode, items)
            slots = None
        else:
            context = multiprocessing.get_context(config.start_method or _default_start_method())
            pool = context.Pool(workers, initializer=_worker_init, initargs=(config, list(paths)))
            slots = threading.Semaphore(workers * config.chunksize * 8)
            results = pool.imap(
                _worker_encode, _bounded(items, slots, stop_event), config.chunksize
            )
        begin = time.perf_counter()
        for status, payload, n_bytes in results:
            if slots is not None:
                slots.release()
            stats.input_bytes += n_bytes
            if status == _BLANK:
                stats.blank_lines += 1
                continue
            if status == _ERROR:
                if not config.skip_malformed:
                    raise payload
                stats.skipped_malformed += 1
                logger.warning("Skipping malformed line: %s", payload)
                continue
            stats.documents += 1
            for key, entry in zip(keys, payload):
                if entry is None:
                    stats.missing_keys[key] += 1
                elif not entry:
                    stats.empty_documents[key] += 1
                else:
                    ids, lengths = entry
                    builders[key].add_document(ids, lengths)
                    stats.documents_written[key] += 1
                    stats.sequences[key] += len(lengths)
                    stats.tokens[key] += len(ids)
            if stats.documents % log_interval == 0:
                elapsed = max(time.perf_counter() - begin, 1e-9)
                logger.info(
                    "%sProcessed %d documents (%.1f docs/s, %.2f MB/s).",
                    label, stats.documents, stats.documents / elapsed,
                    stats.input_bytes / elapsed / 2**20,
                )
        for key in keys:
            builders[key].finalize(prefixes[key] + ".idx")
        ok = True
    finally:
        stop_event.set()
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
        for builder in builders.values():
            if not builder.data_file.closed:
                builder.data_file.close()
    return stats


def _partition_entry(config, paths, start, stop, prefixes, workers, dtype, label, result_path):
    """Body of a partition process: run :func:`encode_range`, pickle the stats or the error."""
    gc.freeze()
    try:
        outcome = ("ok", encode_range(config, paths, start, stop, prefixes, workers, dtype, label))
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it
        try:
            pickle.dumps(exc)
            outcome = ("error", exc)
        except Exception:
            outcome = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))
    with open(result_path, "wb") as handle:
        pickle.dump(outcome, handle)


def run_partitions(config, paths, tmp_dir, final_tmp_prefixes, dtype) -> EncodeStats:
    """Encode ``config.partitions`` contiguous ranges of the input in parallel processes (each
    with ``workers / partitions`` encoding workers), then merge them in order into
    ``{final_tmp_prefixes[key]}.bin/.idx``; re-raises the first partition's error."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    partitions = config.partitions
    total = count_lines(paths)
    bounds = [round(i * total / partitions) for i in range(partitions + 1)]
    context = multiprocessing.get_context(config.start_method or _default_start_method())
    jobs = []
    for index in range(partitions):
        prefixes = {key: os.path.join(tmp_dir, f"part{index}_{n}") for n, key in
                    enumerate(config.json_keys)}
        result_path = os.path.join(tmp_dir, f"part{index}.result")
        process = context.Process(
            target=_partition_entry,
            args=(config, list(paths), bounds[index], bounds[index + 1], prefixes,
                  config.workers // partitions, dtype, f"[partition {index}] ", result_path),
        )
        process.start()
        jobs.append((process, prefixes, result_path))
    stats = EncodeStats()
    error: Optional[BaseException] = None
    for index, (process, _, result_path) in enumerate(jobs):
        process.join()
        if error is not None:
            continue
        if not os.path.exists(result_path):
            error = RuntimeError(
                f"Partition {index} died with exit code {process.exitcode} and no report."
            )
            continue
        with open(result_path, "rb") as handle:
            status, value = pickle.load(handle)
        if status == "error":
            error = value
        else:
            stats.add(value)
    if error is not None:
        raise error
    for key in config.json_keys:
        builder = IndexedDatasetBuilder(final_tmp_prefixes[key] + ".bin", dtype=dtype)
        try:
            for _, prefixes, _ in jobs:
                builder.add_index(prefixes[key])
            builder.finalize(final_tmp_prefixes[key] + ".idx")
        finally:
            if not builder.data_file.closed:
                builder.data_file.close()
    return stats
