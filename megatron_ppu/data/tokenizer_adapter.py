"""The tokenizer as the rest of megatron_ppu sees it: its settings and the object built from them.

This module owns :class:`TokenizerOptions` (Megatron-LM's tokenizer flags, ``_add_tokenizer_args``,
with the same names and defaults), the helpers that fill it (and dataclasses like it) from parsed
arguments or other configs (:func:`dataclass_from`, :func:`tokenizer_options_from`), and
:class:`MegatronCoreTokenizer`, the adapter over a megatron-core tokenizer object that
``build_tokenizer`` returns (the ids, ``tokenize`` / ``detokenize`` and the identifiers that
megatron-core's dataset cache hashes). Which megatron-core tokenizer is built for which
``--tokenizer-type``, with which id rules, is decided in :mod:`megatron_ppu.data.tokenizers`,
which re-exports every name defined here.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, List, Optional

__all__ = [
    "TokenizerOptions",
    "dataclass_from",
    "tokenizer_options_from",
    "MegatronCoreTokenizer",
]

@dataclass
class TokenizerOptions:
    """Megatron-LM's tokenizer settings (``_add_tokenizer_args``; same names and defaults).

    Attributes:
        tokenizer_type: one of :data:`~megatron_ppu.data.tokenizers.TOKENIZER_TYPES`.
        tokenizer_model: SentencePiece ``.model``, tiktoken JSON vocabulary, or HuggingFace
            tokenizer folder / ``tokenizer.json``.
        vocab_size: ``NullTokenizer``: ids in the text are below it; ``TikTokenizer``: the
            vocabulary size (default 131072).
        vocab_file: GPT-2 ``vocab.json`` (``GPT2BPETokenizer``; passed on to HuggingFace).
        merge_file: GPT-2 ``merges.txt`` (``GPT2BPETokenizer``; passed on to HuggingFace).
        vocab_extra_ids: legacy ``SentencePieceTokenizer``: append ``<extra_id_0..N-1>``.
        tokenizer_metadata: refused (see :func:`~megatron_ppu.data.tokenizers.build_tokenizer`).
        tokenizer_special_tokens: special tokens (TikToken; HuggingFace additional special
            tokens; SentencePiece with ``tokenizer_sentencepiece_legacy``).
        legacy_tokenizer: Megatron-LM's legacy id rules instead of megatron-core's.
        tiktoken_pattern: ``v1`` or ``v2``.
        tiktoken_num_special_tokens: number of ids reserved for special tokens (TikToken).
        tiktoken_special_tokens: refused (Megatron-LM parses it but never reads it).
        tokenizer_sentencepiece_legacy: megatron-core SentencePiece wrapper's legacy mode (needed
            for ``tokenizer_special_tokens``).
        tokenizer_hf_use_fast: ask HuggingFace for its fast tokenizer.
        tokenizer_hf_include_special_tokens: HuggingFace: encode with the tokenizer's special
            tokens (``tokenizer(text).input_ids``).
        trust_remote_code: let HuggingFace run code shipped in the tokenizer folder.
        padded_vocab_size: accepted for Megatron-LM compatibility; a tokenizer does not use it.
    """

    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_extra_ids: int = 0
    tokenizer_metadata: Optional[str] = None
    tokenizer_special_tokens: Optional[List[str]] = None
    legacy_tokenizer: bool = False
    tiktoken_pattern: Optional[str] = None
    tiktoken_num_special_tokens: int = 1000
    tiktoken_special_tokens: Optional[List[str]] = None
    tokenizer_sentencepiece_legacy: bool = False
    tokenizer_hf_use_fast: bool = False
    tokenizer_hf_include_special_tokens: bool = False
    trust_remote_code: bool = False
    padded_vocab_size: Optional[int] = None


def dataclass_from(cls, obj, **overrides):
    """Build the dataclass ``cls`` from any object with (some of) its field names as attributes
    (the others keep their defaults).

    Args:
        cls: a dataclass.
        obj: an ``argparse.Namespace``, another dataclass (e.g. the trainer's ``DataArgs``), or None.
        overrides: values that replace the object's.
    """
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)
              if f.init and obj is not None and hasattr(obj, f.name)}
    values.update(overrides)
    return cls(**values)


def tokenizer_options_from(obj, **overrides) -> TokenizerOptions:
    """:class:`TokenizerOptions` from any object with (some of) its attribute names (e.g. the
    trainer's ``DataArgs`` or :class:`~megatron_ppu.data.preprocess.PreprocessConfig`)."""
    return dataclass_from(TokenizerOptions, obj, **overrides)


class MegatronCoreTokenizer:
    """A megatron-core tokenizer with Megatron-LM's id rules for one ``--tokenizer-type``.

    Built by :func:`~megatron_ppu.data.tokenizers.build_tokenizer`; not meant to be constructed
    directly.

    Attributes:
        core: the megatron-core tokenizer object (``MegatronTokenizerText``).
        options: the :class:`TokenizerOptions` it was built from.
    """

    def __init__(self, core, options: TokenizerOptions, *, eod: int, vocab_size: int,
                 pad: int, bos: int, eos: int, encode=None, decode=None, identity=None,
                 cls: int = -1, sep: int = -1, mask: int = -1):
        self.core = core
        self._cls, self._sep, self._mask = int(cls), int(sep), int(mask)
        self.options = options
        self._eod, self._vocab_size = int(eod), int(vocab_size)
        self._pad, self._bos, self._eos = int(pad), int(bos), int(eos)
        self._encode = encode or core.tokenize
        self._decode = decode or core.detokenize
        self._identity = identity or {}

    @property
    def tokenizer_type(self) -> str:
        """The ``--tokenizer-type`` name."""
        return self.options.tokenizer_type

    @property
    def legacy(self) -> bool:
        """Whether Megatron-LM's legacy id rules are in effect."""
        return bool(self.options.legacy_tokenizer)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        """Identifiers that megatron-core hashes into dataset cache descriptions (stable across
        runs and ranks: the type, the mode and the user's file paths)."""
        ids = OrderedDict([("class", type(self).__name__), ("tokenizer_type", self.tokenizer_type),
                           ("legacy", str(self.legacy))])
        ids.update((k, str(v)) for k, v in self._identity.items())
        return ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids (before Megatron's padding to a multiple)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id (-1 when the tokenizer has none)."""
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id (-1 when the tokenizer has none)."""
        return self._pad

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id (-1 when the tokenizer has none)."""
        return self._bos

    @property
    def eos(self) -> int:
        """End-of-sequence id (-1 when the tokenizer has none)."""
        return self._eos

    @property
    def cls(self) -> int:
        """``<CLS>`` id (legacy SentencePieceTokenizer; -1 otherwise)."""
        return self._cls

    @property
    def sep(self) -> int:
        """``<SEP>`` id (legacy SentencePieceTokenizer; -1 otherwise)."""
        return self._sep

    @property
    def mask(self) -> int:
        """``<MASK>`` id (legacy SentencePieceTokenizer; -1 otherwise)."""
        return self._mask

    def tokenize(self, text: str) -> List[int]:
        """Encode ``text`` into token ids."""
        return [int(i) for i in self._encode(text)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode token ids into text."""
        return self._decode([int(i) for i in ids])
