"""Input handling shared by the data tools: errors, input expansion and JSONL reading.

This module is deliberately light (standard library only) so that worker processes of
:mod:`megatron_ppu.data.preprocess` and :mod:`megatron_ppu.data.tokenizer_training` can
import it cheaply.

Bad-input policy (the same for ``tools/preprocess_data.py`` and ``tools/train_tokenizer.py``):

* a missing input file, or a glob that matches nothing: :class:`InputFileNotFoundError`
  (a ``FileNotFoundError``) before any output is created;
* a line that is not valid UTF-8, or not a JSON object: :class:`InvalidUTF8Error` /
  :class:`MalformedJSONError` (both ``ValueError``), naming the file and the 1-based line
  number; with ``skip_malformed=True`` (CLI ``--skip-malformed``) the line is skipped and
  counted instead;
* a JSON value of the wrong type under a requested key (a number, an object, ...):
  :class:`MalformedJSONError` as above;
* a blank line, a missing key (or a ``null`` value), an empty or whitespace-only document:
  skipped and counted in the final report.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import IO, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "DataToolError",
    "InputFileNotFoundError",
    "MalformedInputError",
    "MalformedJSONError",
    "InvalidUTF8Error",
    "TokenizerModelError",
    "TokenizerModelNotFoundError",
    "EmptyOutputError",
    "expand_input_paths",
    "open_input",
    "iter_raw_lines",
    "count_lines",
    "decode_line",
    "get_text_field",
    "parse_json_line",
]


class DataToolError(Exception):
    """Marker base class of every error raised on purpose by the data tools."""


class InputFileNotFoundError(DataToolError, FileNotFoundError):
    """An input file (or every file of a glob) does not exist."""


class MalformedInputError(DataToolError, ValueError):
    """A line of an input file cannot be used; ``path`` and ``line`` locate it (1-based)."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.line = line

    def __reduce__(self):
        # Keep path/line when the error travels back from a worker process.
        return (type(self), (str(self), self.path, self.line))


class MalformedJSONError(MalformedInputError):
    """A JSONL line is not a JSON object, or a requested key holds a value of the wrong type."""


class InvalidUTF8Error(MalformedInputError):
    """A line of an input file is not valid UTF-8."""


class TokenizerModelError(DataToolError, ValueError):
    """A tokenizer cannot be built: unreadable model file, bad option, unknown type."""


class TokenizerModelNotFoundError(DataToolError, FileNotFoundError):
    """The tokenizer model file does not exist."""


class EmptyOutputError(DataToolError, ValueError):
    """The input held no usable document, so no dataset (or tokenizer) can be written."""


_GLOB_CHARS = set("*?[")


def expand_input_paths(spec: Union[str, Sequence[str]]) -> List[str]:
    """Expand an ``--input`` value into a list of existing files.

    Args:
        spec: a path, a glob pattern (``data/*.jsonl``), a comma-separated list of them, or a
            sequence of such strings. A glob is expanded in sorted order so that the output does
            not depend on the directory listing order.

    Returns:
        The files, in the order given (each glob sorted).

    Raises:
        InputFileNotFoundError: a path does not exist, is not a regular file, or a glob matches
            no file.
    """
    items: List[str] = []
    for entry in [spec] if isinstance(spec, str) else list(spec):
        items.extend(part for part in str(entry).split(",") if part)
    if not items:
        raise InputFileNotFoundError(
            "No input file was given: pass --input PATH (a file or a glob)."
        )
    paths: List[str] = []
    for item in items:
        item = os.path.expanduser(item)
        if _GLOB_CHARS & set(item):
            matches = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not matches:
                raise InputFileNotFoundError(
                    f"Input glob {item!r} matches no file: check the pattern and the directory."
                )
            paths.extend(matches)
        elif not os.path.exists(item):
            raise InputFileNotFoundError(
                f"Input file {item!r} does not exist: check the --input path."
            )
        elif not os.path.isfile(item):
            raise InputFileNotFoundError(
                f"Input {item!r} is not a regular file: pass a file or a glob such as "
                f"'{os.path.join(item, '*.jsonl')}'."
            )
        else:
            paths.append(item)
    return paths


def open_input(path: str) -> IO[bytes]:
    """Open an input file for reading bytes; ``.gz`` files are decompressed on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_raw_lines(
    paths: Sequence[str], start: int = 0, stop: Optional[int] = None
) -> Iterator[Tuple[int, int, bytes]]:
    """Yield ``(file_index, line_number, raw_line)`` for the lines of ``paths``, in order.

    Lines are numbered from 1 inside each file. ``start``/``stop`` select a contiguous range of
    the global line index over all files (used to cut the input into partitions).
    """
    position = 0
    for file_index, path in enumerate(paths):
        with open_input(path) as handle:
            for line_number, raw in enumerate(handle, start=1):
                if stop is not None and position >= stop:
                    return
                if position >= start:
                    yield file_index, line_number, raw
                position += 1


def count_lines(paths: Sequence[str]) -> int:
    """Count the lines of ``paths`` (a final line without a newline counts)."""
    total = 0
    for path in paths:
        with open_input(path) as handle:
            for _ in handle:
                total += 1
    return total


def decode_line(raw: bytes, path: str, line: int) -> str:
    """Decode a raw line as strict UTF-8.

    Raises:
        InvalidUTF8Error: naming the file, the line and the byte offset.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidUTF8Error(
            f"{path}:{line}: invalid UTF-8 at byte {exc.start} of the line ({exc.reason}). "
            "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or pass "
            "--skip-malformed to skip such lines.",
            path=path,
            line=line,
        ) from None


def parse_json_line(raw: bytes, path: str, line: int) -> Optional[dict]:
    """Parse one JSONL line into a dict; return ``None`` for a blank line.

    Raises:
        InvalidUTF8Error: the line is not valid UTF-8.
        MalformedJSONError: the line is not valid JSON, or not a JSON object.
    """
    text = decode_line(raw, path, line)
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedJSONError(
            f"{path}:{line}: malformed JSON ({exc.msg} at column {exc.colno}). Each line must "
            "be one JSON object such as {\"text\": \"...\"}; fix the line, or pass "
            "--skip-malformed to skip such lines.",
            path=path,
            line=line,
        ) from None
    if not isinstance(data, dict):
        raise MalformedJSONError(
            f"{path}:{line}: expected a JSON object, got a JSON {type(data).__name__}. Each "
            "line must be one JSON object such as {\"text\": \"...\"}; fix the line, or pass "
            "--skip-malformed to skip such lines.",
            path=path,
            line=line,
        )
    return data


def get_text_field(data: dict, key: str, path: str, line: int) -> Optional[Union[str, List[str]]]:
    """Return ``data[key]`` as a string or a list of strings, or ``None`` if missing/null.

    A list of strings is accepted as a document already split into sentences (the format of
    Megatron-LM's intermediate ``*_ss.json`` files).

    Raises:
        MalformedJSONError: the value is of another type.
    """
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise MalformedJSONError(
        f"{path}:{line}: key {key!r} holds a JSON {type(value).__name__}, expected a string "
        "(or a list of strings). Check --json-keys, or pass --skip-malformed to skip such lines.",
        path=path,
        line=line,
    )
