"""Text tokenizers with the interface Megatron's data pipeline expects.

:func:`build_tokenizer` returns an object with ``tokenize(text) -> list[int]``,
``detokenize(ids) -> str``, ``vocab_size``, ``eod``, ``pad`` and ``bos`` (plus ``eos`` and
``unique_identifiers``), which is what megatron-core's ``GPTDatasetConfig(tokenizer=...)``
reads (``vocab_size``, ``eod``, ``pad``). The classes are duck-typed rather than subclasses of
megatron-core's deprecated ``MegatronLegacyTokenizer`` (whose constructor logs a deprecation
warning) or of the new ``MegatronTokenizerBase`` (which wants a metadata/config pair); they
reproduce the id conventions of Megatron-LM's tokenizers of the same names, so a ``.bin``
written here reads the same in Megatron-LM:

* ``GPTSentencePieceTokenizer``: plain SentencePiece ids; ``vocab_size`` is the model's piece
  count, ``eod`` is the model's ``</s>`` (EOS) id, ``pad``/``bos`` the model's pad/BOS ids
  (-1 when the model has none).
* ``SentencePieceTokenizer``: SentencePiece plus the special tokens ``<CLS> <SEP> <EOD> <MASK>``
  and the pad/BOS/EOS pieces (named ``<PAD> <BOS> <EOS>`` when the model lacks them), appended
  after the model's pieces when absent from it; ``eod`` is the id of ``<EOD>``, and these
  strings inside the text are tokenized as their special ids.
* ``NullTokenizer``: the text is whitespace-separated integer ids (Megatron splits on single
  spaces; any whitespace is accepted here); ``vocab_size`` is ``--vocab-size + 1`` and ``eod``
  is ``--vocab-size``.

This module imports only ``sentencepiece`` and the standard library so that preprocessing
workers start fast.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_ppu.data.inputs import TokenizerModelError, TokenizerModelNotFoundError

__all__ = [
    "TOKENIZER_TYPES",
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "NullTokenizer",
    "build_tokenizer",
]

TOKENIZER_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "NullTokenizer")


def _load_sentencepiece(model_path: Optional[str]):
    if not model_path:
        raise TokenizerModelError(
            "A SentencePiece tokenizer needs --tokenizer-model PATH (a .model file written by "
            "tools/train_tokenizer.py or sentencepiece)."
        )
    if not os.path.exists(model_path):
        raise TokenizerModelNotFoundError(
            f"Tokenizer model {model_path!r} does not exist: check --tokenizer-model, or train "
            "one with tools/train_tokenizer.py."
        )
    if not os.path.isfile(model_path):
        raise TokenizerModelError(f"Tokenizer model {model_path!r} is not a regular file.")
    import sentencepiece

    try:
        with open(model_path, "rb") as handle:
            proto = handle.read()
    except OSError as exc:
        raise TokenizerModelError(
            f"Tokenizer model {model_path!r} cannot be read ({exc}); check its permissions."
        ) from exc
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError depending on version
        raise TokenizerModelError(
            f"Tokenizer model {model_path!r} is not a valid SentencePiece model ({exc}). Pass "
            "the .model file (not the .vocab), or retrain it with tools/train_tokenizer.py."
        ) from exc
    if processor.get_piece_size() <= 0:
        raise TokenizerModelError(f"Tokenizer model {model_path!r} has no pieces.")
    return processor


class GPTSentencePieceTokenizer:
    """SentencePiece tokenizer with Megatron-LM's ``GPTSentencePieceTokenizer`` id conventions.

    Args:
        model_path: path of the SentencePiece ``.model`` file.
    """

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._sp = _load_sentencepiece(model_path)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        """Identifiers that megatron-core may hash into dataset cache descriptions."""
        return OrderedDict([("class", type(self).__name__), ("tokenizer_path", self.model_path)])

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the model's piece count)."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id: the model's EOS id (-1 when the model has no EOS piece)."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        """End-of-sentence id (same as :attr:`eod`)."""
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        """Padding id (-1 when the model has no pad piece)."""
        return self._sp.pad_id()

    @property
    def bos(self) -> int:
        """Beginning-of-sentence id (-1 when the model has no BOS piece)."""
        return self._sp.bos_id()

    def tokenize(self, text: str) -> List[int]:
        """Encode ``text`` into token ids."""
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode token ids into text."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """Return the piece string of one id."""
        return self._sp.id_to_piece(int(token_id))


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """SentencePiece tokenizer with Megatron-LM's ``SentencePieceTokenizer`` conventions.

    Special tokens ``<CLS> <SEP> <EOD> <MASK>`` and the pad/BOS/EOS pieces get ids (appended
    after the model's pieces when the model does not contain them); ``vocab_size`` counts them.

    Args:
        model_path: path of the SentencePiece ``.model`` file.
    """

    def __init__(self, model_path: str):
        super().__init__(model_path)
        sp = self._sp
        self._vocab: Dict[str, int] = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self._special: Dict[str, int] = {}

        def add(token: str) -> int:
            if token not in self._vocab:
                self._vocab[token] = len(self._vocab)
            self._special[token] = self._vocab[token]
            return self._vocab[token]

        self._cls = add("<CLS>")
        self._sep = add("<SEP>")
        self._eod = add("<EOD>")
        self._mask = add("<MASK>")
        ids = {}
        for name, fallback in (("pad", "<PAD>"), ("bos", "<BOS>"), ("eos", "<EOS>")):
            piece_id = getattr(sp, f"{name}_id")()
            token = sp.id_to_piece(piece_id) if 0 <= piece_id < sp.get_piece_size() else fallback
            ids[name] = add(token)
        self._pad, self._bos, self._eos = ids["pad"], ids["bos"], ids["eos"]
        self._inv_special = {v: k for k, v in self._special.items()}
        # Longest first, so that a token that is a prefix of another never shadows it.
        ordered = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in ordered))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self._vocab)

    @property
    def eod(self) -> int:
        """Id of ``<EOD>``."""
        return self._eod

    @property
    def eos(self) -> int:
        """Id of the EOS piece."""
        return self._eos

    @property
    def pad(self) -> int:
        """Id of the pad piece."""
        return self._pad

    @property
    def bos(self) -> int:
        """Id of the BOS piece."""
        return self._bos

    @property
    def cls(self) -> int:
        """Id of ``<CLS>``."""
        return self._cls

    @property
    def sep(self) -> int:
        """Id of ``<SEP>``."""
        return self._sep

    @property
    def mask(self) -> int:
        """Id of ``<MASK>``."""
        return self._mask

    def tokenize(self, text: str) -> List[int]:
        """Encode ``text``; occurrences of special-token strings become their ids."""
        ids: List[int] = []
        position = 0
        for match in self._special_re.finditer(text):
            if match.start() > position:
                ids.extend(self._sp.encode(text[position : match.start()]))
            ids.append(self._special[match.group(0)])
            position = match.end()
        if position < len(text):
            ids.extend(self._sp.encode(text[position:]))
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode ids; special ids become their token strings (no extra spaces are added)."""
        parts: List[str] = []
        run: List[int] = []
        for token_id in (int(i) for i in ids):
            if token_id in self._inv_special:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._inv_special[token_id])
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)


class NullTokenizer:
    """Tokenizer for text that already is whitespace-separated integer ids (Megatron's).

    Args:
        vocab_size: the number of regular ids; ids ``0 .. vocab_size`` are valid, the last one
            being the end-of-document id.
    """

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 1:
            raise TokenizerModelError(
                "NullTokenizer needs --vocab-size N (N >= 1): the ids in the text are < N and N "
                "is the end-of-document id."
            )
        self._size = int(vocab_size)

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        """Identifiers that megatron-core may hash into dataset cache descriptions."""
        return OrderedDict([("class", type(self).__name__), ("vocab_size", str(self._size))])

    @property
    def vocab_size(self) -> int:
        """``--vocab-size + 1`` (the end-of-document id is counted)."""
        return self._size + 1

    @property
    def eod(self) -> int:
        """End-of-document id (``--vocab-size``)."""
        return self._size

    @property
    def eos(self) -> int:
        """Same as :attr:`eod`."""
        return self._size

    @property
    def pad(self) -> int:
        """No padding id: -1."""
        return -1

    @property
    def bos(self) -> int:
        """No BOS id: -1."""
        return -1

    def tokenize(self, text: str) -> List[int]:
        """Parse whitespace-separated integer ids.

        Raises:
            ValueError: a token is not an integer or is outside ``[0, vocab_size)``.
        """
        try:
            ids = [int(token) for token in text.split()]
        except ValueError as exc:
            raise ValueError(
                f"NullTokenizer expects whitespace-separated integer ids, got {exc}"
            ) from None
        for token_id in ids:
            if not 0 <= token_id <= self._size:
                raise ValueError(
                    f"NullTokenizer id {token_id} is outside [0, {self._size}] "
                    f"(--vocab-size {self._size}); raise --vocab-size."
                )
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Join ids with single spaces."""
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
):
    """Build a tokenizer by Megatron-LM type name.

    Args:
        tokenizer_type: ``GPTSentencePieceTokenizer``, ``SentencePieceTokenizer`` or
            ``NullTokenizer``.
        tokenizer_model: the SentencePiece ``.model`` path (SentencePiece types).
        vocab_size: the number of ids (``NullTokenizer``).

    Raises:
        TokenizerModelNotFoundError: the model file does not exist.
        TokenizerModelError: unknown type, missing option, or unreadable model.
    """
    if tokenizer_type == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerModelError(
        f"Unknown --tokenizer-type {tokenizer_type!r}; supported: {', '.join(TOKENIZER_TYPES)}."
    )
