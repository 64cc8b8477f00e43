"""Text tokenizers built on ``megatron.core.tokenizers``, with Megatron-LM's flags and id rules.

:func:`build_tokenizer` takes Megatron-LM's tokenizer settings (:class:`TokenizerOptions`, the
fields of Megatron-LM's ``_add_tokenizer_args``) and returns a :class:`MegatronCoreTokenizer`:
an object with ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``, ``vocab_size``,
``eod``, ``pad``, ``bos``, ``eos`` and ``unique_identifiers``, which is what megatron-core's
``GPTDatasetConfig(tokenizer=...)`` and ``tools/preprocess_data.py`` read. The text is always
encoded by a megatron-core tokenizer object (``MegatronTokenizer.from_pretrained``, the
libraries of ``megatron.core.tokenizers.text.libraries``); this module only picks its
constructor arguments and, with ``--legacy-tokenizer``, the id rules of Megatron-LM's legacy
tokenizers (``megatron/training/tokenizer/tokenizer.py``). :class:`TokenizerOptions` and
:class:`MegatronCoreTokenizer` are defined in :mod:`megatron_ppu.data.tokenizer_adapter` and
importable from here.

Default (megatron-core's conventions, what Megatron-LM's ``tools/preprocess_data.py`` uses
unless ``--legacy-tokenizer`` is given; the arguments are those of megatron-core's
``megatron/core/tokenizers/text/utils/build_tokenizer.py``):

* ``GPTSentencePieceTokenizer``, ``SentencePieceTokenizer``: plain SentencePiece ids;
  ``vocab_size`` is the model's piece count, ``eod`` the model's ``</s>`` (EOS) id.
  ``--tokenizer-sentencepiece-legacy`` with ``--tokenizer-special-tokens`` adds special tokens.
* ``GPT2BPETokenizer`` (``--vocab-file``, ``--merge-file``): the GPT-2 byte-level BPE through
  megatron-core's HuggingFace wrapper; ``eod`` is the EOS token ``<|endoftext|>``.
* ``HuggingFaceTokenizer`` (``--tokenizer-model``: a local tokenizer folder or a
  ``tokenizer.json`` file): megatron-core's HuggingFace wrapper; ids without BOS/EOS (unless
  ``--tokenizer-hf-include-special-tokens``), ``eod`` is the tokenizer's EOS token.
* ``TikTokenizer`` (``--tokenizer-model`` a tiktoken JSON vocabulary, ``--tiktoken-pattern``
  v1/v2, default v2): special tokens first (``<unk> <s> </s> <mask> <pad> <cls> <sep>`` then
  fillers up to ``--tiktoken-num-special-tokens``), ``eod`` = ``</s>``.
* ``NullTokenizer`` (``--vocab-size N``): the text is whitespace-separated integer ids
  (Megatron-LM accepts single spaces only); ``vocab_size`` and ``eod`` are the installed
  megatron-core's: ``N + 1`` and ``N`` before 0.18, ``N`` and ``N - 1`` from 0.18 on
  (:func:`megatron_ppu.patches.compat.null_tokenizer_convention`).

``--legacy-tokenizer`` (Megatron-LM's legacy ids, which its trainer in 0.16.1 always uses):

* ``SentencePieceTokenizer``: ``<CLS> <SEP> <EOD> <MASK>`` and the pad/BOS/EOS pieces
  (``<PAD> <BOS> <EOS>`` when the model lacks them), then ``<extra_id_i>`` for
  ``--vocab-extra-ids``, are appended after the model's pieces when absent from it; ``eod`` is
  ``<EOD>``, and these strings inside the text are encoded as their ids.
* ``GPT2BPETokenizer``: ``vocab_size`` is the size of ``vocab.json``, ``eod`` its
  ``<|endoftext|>``; special-token strings in the text are encoded as ordinary text.
* ``HuggingFaceTokenizer``: ``tokenizer(text).input_ids`` (BOS/EOS as the tokenizer adds them).
* ``TikTokenizer``: needs ``--tiktoken-pattern``; special tokens ``<unk> <s> </s>`` by default,
  special-token strings in the text are encoded as ordinary text.
* ``GPTSentencePieceTokenizer`` and ``NullTokenizer`` are the same in both modes.

Nothing is downloaded: HuggingFace tokenizers are read from local files only (a name that is not
an existing path is refused instead of being looked up on the Hub), so runs are
``HF_HUB_OFFLINE=1``-safe. Ids that a tokenizer does not define (no pad token, no EOS) are -1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizer

from megatron_ppu.data.inputs import TokenizerModelError, TokenizerModelNotFoundError
# The settings and the adapter object live in tokenizer_adapter; imported from here as before.
from megatron_ppu.data.tokenizer_adapter import (
    MegatronCoreTokenizer,
    TokenizerOptions,
    dataclass_from,
    tokenizer_options_from,
)
from megatron_ppu.patches import compat

__all__ = [
    "TOKENIZER_TYPES",
    "MEGATRON_TOKENIZER_TYPES",
    "TokenizerOptions",
    "dataclass_from",
    "MegatronCoreTokenizer",
    "build_tokenizer",
    "tokenizer_options_from",
]

logger = logging.getLogger(__name__)

#: The ``--tokenizer-type`` values implemented here.
TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "NullTokenizer",
)

#: Every ``--tokenizer-type`` choice of Megatron-LM (core_v0.16.1); the others are refused by name.
MEGATRON_TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "MultimodalTokenizer",
    "NullTokenizer",
    "NullMultimodalTokenizer",
    "SFTTokenizer",
)

_REFUSED_TYPES = {
    "BertWordPieceLowerCase": "a BERT WordPiece tokenizer (megatron_ppu trains GPT models only)",
    "BertWordPieceCase": "a BERT WordPiece tokenizer (megatron_ppu trains GPT models only)",
    "Llama2Tokenizer": "Megatron-LM's Llama-2 SentencePiece wrapper (use "
                       "GPTSentencePieceTokenizer with the same .model file, or "
                       "HuggingFaceTokenizer with the model's tokenizer folder)",
    "MultimodalTokenizer": "a multimodal tokenizer (megatron_ppu trains text GPT models only)",
    "NullMultimodalTokenizer": "a multimodal tokenizer (megatron_ppu trains text GPT models only)",
    "SFTTokenizer": "a fine-tuning (SFT prompt format) tokenizer (megatron_ppu pre-trains only)",
}

_GPT2_EOD = "<|endoftext|>"
# Files of a HuggingFace tokenizer folder that describe the tokenizer (linked next to a bare
# tokenizer.json when one is given as a file).
_HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _id(value) -> int:
    """A token id, or -1 where the tokenizer defines none."""
    return -1 if value is None else int(value)


def _core_id(core, name: str) -> int:
    """``core.<name>`` (eod, pad, bos, eos) as an id, -1 where megatron-core's wrapper has none
    (its HuggingFace wrapper raises instead of returning None for a missing EOS token)."""
    try:
        return _id(getattr(core, name))
    except (AttributeError, TypeError, KeyError, NameError, NotImplementedError):
        return -1


# --------------------------------------------------------------------------------------------
# Checks of the user's files and options
# --------------------------------------------------------------------------------------------


def _need_file(path: Optional[str], flag: str, what: str, tokenizer_type: str) -> str:
    if not path:
        raise TokenizerModelError(f"--tokenizer-type {tokenizer_type} needs {flag} PATH ({what}).")
    if not os.path.exists(path):
        raise TokenizerModelNotFoundError(
            f"{flag} {path!r} does not exist ({what} for --tokenizer-type {tokenizer_type}); "
            "check the path."
        )
    if not os.path.isfile(path):
        raise TokenizerModelError(f"{flag} {path!r} is not a regular file ({what}).")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TokenizerModelError(f"{flag} {path!r} cannot be read ({exc}); check its "
                                  "permissions.") from exc
    return path


def _refuse_unused(options: TokenizerOptions, allowed: Sequence[str]) -> None:
    """Refuse settings that the chosen tokenizer (and mode) would not read."""
    t = options.tokenizer_type
    mode = "with --legacy-tokenizer" if options.legacy_tokenizer else "without --legacy-tokenizer"
    checks = {
        "tokenizer_model": options.tokenizer_model is not None,
        "vocab_file": options.vocab_file is not None,
        "merge_file": options.merge_file is not None,
        "vocab_extra_ids": bool(options.vocab_extra_ids),
        "tokenizer_special_tokens": options.tokenizer_special_tokens is not None,
        "tiktoken_pattern": options.tiktoken_pattern is not None,
        "tiktoken_num_special_tokens": options.tiktoken_num_special_tokens != 1000,
        "tokenizer_sentencepiece_legacy": bool(options.tokenizer_sentencepiece_legacy),
        "tokenizer_hf_use_fast": bool(options.tokenizer_hf_use_fast),
        "tokenizer_hf_include_special_tokens": bool(options.tokenizer_hf_include_special_tokens),
        "trust_remote_code": bool(options.trust_remote_code),
    }
    unused = [name for name, given in checks.items() if given and name not in allowed]
    if unused:
        flags = " ".join("--" + n.replace("_", "-") for n in unused)
        raise TokenizerModelError(
            f"{flags}: not read by --tokenizer-type {t} {mode} (Megatron-LM would ignore it, "
            "so the output would not be what the flag asks for); drop it"
            + (" or change --legacy-tokenizer." if "vocab_extra_ids" in unused
               or "tokenizer_sentencepiece_legacy" in unused else ".")
        )


@contextlib.contextmanager
def _hf_folder(files: Dict[str, str], config: Optional[dict] = None) -> Iterator[str]:
    """A temporary HuggingFace tokenizer folder with links to ``files`` (name -> path)."""
    folder = tempfile.mkdtemp(prefix="megatron_ppu_tok_")
    try:
        for name, path in files.items():
            target = os.path.join(folder, name)
            try:
                os.symlink(os.path.abspath(path), target)
            except OSError:
                shutil.copyfile(path, target)
        if config is not None:
            with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _from_pretrained(path: Optional[str], library: str, **kwargs):
    """``MegatronTokenizer.from_pretrained`` with the user's errors as TokenizerModelError."""
    with warnings.catch_warnings():
        # transformers warns about tokenizers that it loads without a model config; not the
        # user's concern here.
        warnings.simplefilter("ignore")
        try:
            return MegatronTokenizer.from_pretrained(
                tokenizer_path=path, metadata_path={"library": library}, **kwargs
            )
        except (ValueError, AssertionError, OSError, KeyError, TypeError) as exc:
            raise TokenizerModelError(
                f"megatron-core could not build the {library} tokenizer from {path!r}: {exc}"
            ) from exc


# --------------------------------------------------------------------------------------------
# One builder per type
# --------------------------------------------------------------------------------------------


def _sentencepiece(options: TokenizerOptions) -> MegatronCoreTokenizer:
    t = options.tokenizer_type
    model = _need_file(options.tokenizer_model, "--tokenizer-model", "a SentencePiece .model "
                       "file written by tools/train_tokenizer.py or sentencepiece", t)
    identity = {"tokenizer_model": os.path.abspath(model)}
    _check_sentencepiece_model(model)
    if not options.legacy_tokenizer or t == "GPTSentencePieceTokenizer":
        if options.legacy_tokenizer:
            _refuse_unused(options, ("tokenizer_model",))
        else:
            _refuse_unused(options, ("tokenizer_model", "tokenizer_special_tokens",
                                     "tokenizer_sentencepiece_legacy"))
        if options.tokenizer_special_tokens and not options.tokenizer_sentencepiece_legacy:
            raise TokenizerModelError(
                "--tokenizer-special-tokens with a SentencePiece tokenizer needs "
                "--tokenizer-sentencepiece-legacy (megatron-core adds special tokens only in "
                "its SentencePiece wrapper's legacy mode)."
            )
        legacy_wrapper = bool(options.tokenizer_sentencepiece_legacy)
        core = _from_pretrained(model, "sentencepiece", legacy=legacy_wrapper,
                                special_tokens=options.tokenizer_special_tokens)
        sp = core._tokenizer
        if legacy_wrapper:
            identity["special_tokens"] = options.tokenizer_special_tokens
            sp_proc = sp.tokenizer
            eod, pad, bos, eos = sp_proc.eos_id(), sp_proc.pad_id(), sp_proc.bos_id(), \
                sp_proc.eos_id()
        else:
            eod, pad, bos, eos = core.eod, core.pad, core.bos, core.eos
        return MegatronCoreTokenizer(core, options, eod=_id(eod), vocab_size=core.vocab_size,
                                     pad=_id(pad), bos=_id(bos), eos=_id(eos), identity=identity)
    # Legacy SentencePieceTokenizer: Megatron-LM's _SentencePieceTokenizer ids, through
    # megatron-core's SentencePiece wrapper in its legacy (special tokens) mode.
    _refuse_unused(options, ("tokenizer_model", "vocab_extra_ids"))
    proc = sentencepiece.SentencePieceProcessor(model_file=model)

    def piece(piece_id: int, fallback: str) -> str:
        return proc.id_to_piece(piece_id) if 0 <= piece_id < proc.get_piece_size() else fallback

    special = OrderedDict([("cls_token", "<CLS>"), ("sep_token", "<SEP>"), ("eod_token", "<EOD>"),
                           ("mask_token", "<MASK>"), ("pad_token", piece(proc.pad_id(), "<PAD>")),
                           ("bos_token", piece(proc.bos_id(), "<BOS>")),
                           ("eos_token", piece(proc.eos_id(), "<EOS>"))])
    for i in range(int(options.vocab_extra_ids or 0)):
        special[f"extra_id_{i}"] = f"<extra_id_{i}>"
    core = _from_pretrained(model, "sentencepiece", legacy=True, special_tokens=dict(special),
                            trim_spm_separator_after_special_token=False)
    sp = core._tokenizer
    ids = {name: sp.token_to_id(token) for name, token in special.items()}
    identity["vocab_extra_ids"] = int(options.vocab_extra_ids or 0)
    return MegatronCoreTokenizer(core, options, eod=ids["eod_token"], vocab_size=sp.vocab_size,
                                 pad=ids["pad_token"], bos=ids["bos_token"],
                                 eos=ids["eos_token"], identity=identity,
                                 cls=ids["cls_token"], sep=ids["sep_token"],
                                 mask=ids["mask_token"])


def _check_sentencepiece_model(model: str) -> None:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        with open(model, "rb") as handle:
            processor.LoadFromSerializedProto(handle.read())
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError depending on version
        raise TokenizerModelError(
            f"Tokenizer model {model!r} is not a valid SentencePiece model ({exc}). Pass the "
            ".model file (not the .vocab), or retrain it with tools/train_tokenizer.py."
        ) from exc
    if processor.get_piece_size() <= 0:
        raise TokenizerModelError(f"Tokenizer model {model!r} has no pieces.")


def _huggingface_core(options: TokenizerOptions, folder: str, **extra):
    kwargs = dict(
        vocab_file=None, merges_file=None,
        additional_special_tokens=options.tokenizer_special_tokens or [],
        use_fast=bool(options.tokenizer_hf_use_fast),
        trust_remote_code=bool(options.trust_remote_code),
        include_special_tokens=bool(options.tokenizer_hf_include_special_tokens),
    )
    kwargs.update(extra)
    return _from_pretrained(folder, "huggingface", **kwargs)


def _gpt2(options: TokenizerOptions) -> MegatronCoreTokenizer:
    t = options.tokenizer_type
    vocab = _need_file(options.vocab_file, "--vocab-file", "the GPT-2 vocab.json", t)
    merges = _need_file(options.merge_file, "--merge-file", "the GPT-2 merges.txt", t)
    try:
        with open(vocab, "r", encoding="utf-8") as handle:
            encoder = json.load(handle)
        if not isinstance(encoder, dict):
            raise ValueError("not a JSON object of token -> id")
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenizerModelError(f"--vocab-file {vocab!r} is not a GPT-2 vocab.json ({exc}); "
                                  "pass the vocab.json that belongs with --merge-file.") from exc
    if _GPT2_EOD not in encoder:
        raise TokenizerModelError(
            f"--vocab-file {vocab!r} has no {_GPT2_EOD!r} token, which GPT2BPETokenizer uses as "
            "end-of-document; add it to the vocabulary (the GPT-2 files have it)."
        )
    identity = {"vocab_file": os.path.abspath(vocab), "merge_file": os.path.abspath(merges)}
    if options.legacy_tokenizer:
        _refuse_unused(options, ("vocab_file", "merge_file"))
    else:
        _refuse_unused(options, ("vocab_file", "merge_file", "tokenizer_special_tokens",
                                 "tokenizer_hf_use_fast", "tokenizer_hf_include_special_tokens"))
        identity["special_tokens"] = options.tokenizer_special_tokens
        identity["include_special_tokens"] = options.tokenizer_hf_include_special_tokens
    # GPT-2's own tokenizer class over the user's two files, in a local folder: megatron-core's
    # "GPT2BPETokenizer" entry would fetch the `gpt2` tokenizer from the Hub instead.
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": int(1e30),
              "unk_token": _GPT2_EOD, "bos_token": _GPT2_EOD, "eos_token": _GPT2_EOD,
              "add_prefix_space": False, "errors": "replace"}
    if options.legacy_tokenizer:
        # Megatron-LM's legacy GPT-2 tokenizer has no special tokens: "<|endoftext|>" in the
        # text is encoded as text.
        config["split_special_tokens"] = True
    with _hf_folder({"vocab.json": vocab, "merges.txt": merges}, config) as folder:
        core = _huggingface_core(options, folder)
    hf = core._tokenizer.tokenizer
    if options.legacy_tokenizer:
        hf.split_special_tokens = True
        return MegatronCoreTokenizer(
            core, options, eod=encoder[_GPT2_EOD], vocab_size=len(encoder), pad=-1,
            bos=-1, eos=-1, identity=identity)
    return MegatronCoreTokenizer(core, options, eod=_core_id(core, "eod"),
                                 vocab_size=core.vocab_size, pad=_core_id(core, "pad"),
                                 bos=_core_id(core, "bos"), eos=_core_id(core, "eos"),
                                 identity=identity)


def _huggingface(options: TokenizerOptions) -> MegatronCoreTokenizer:
    t = options.tokenizer_type
    path = options.tokenizer_model
    if not path:
        raise TokenizerModelError(
            f"--tokenizer-type {t} needs --tokenizer-model PATH: a local HuggingFace tokenizer "
            "folder (with tokenizer.json or tokenizer_config.json) or a tokenizer.json file."
        )
    if not os.path.exists(path):
        raise TokenizerModelNotFoundError(
            f"--tokenizer-model {path!r} is not a local file or folder. megatron_ppu does not "
            "download tokenizers at run time: fetch it beforehand (e.g. `huggingface-cli "
            f"download {path} --local-dir DIR` on a machine with network access) and pass DIR."
        )
    if options.legacy_tokenizer:
        _refuse_unused(options, ("tokenizer_model", "trust_remote_code"))
    else:
        _refuse_unused(options, ("tokenizer_model", "vocab_file", "merge_file",
                                 "tokenizer_special_tokens", "tokenizer_hf_use_fast",
                                 "tokenizer_hf_include_special_tokens", "trust_remote_code"))
    identity = {"tokenizer_model": os.path.abspath(path)}
    for name in ("vocab_file", "merge_file", "tokenizer_special_tokens",
                 "tokenizer_hf_include_special_tokens"):
        if getattr(options, name):
            identity[name] = getattr(options, name)
    if options.legacy_tokenizer:
        # Megatron-LM's legacy _HuggingFaceTokenizer: AutoTokenizer defaults, and
        # tokenizer(text).input_ids (the tokenizer's own BOS/EOS included).
        extra = dict(use_fast=True, include_special_tokens=True, additional_special_tokens=[])
    else:
        extra = {}
        for name, key in (("vocab_file", "vocab_file"), ("merge_file", "merges_file")):
            if getattr(options, name):
                extra[key] = _need_file(getattr(options, name), "--" + name.replace("_", "-"),
                                        "a tokenizer file", t)
    if os.path.isdir(path):
        core = _huggingface_core(options, path, **extra)
    else:
        files = {"tokenizer.json": path}
        parent = os.path.dirname(os.path.abspath(path))
        for name in _HF_SIDE_FILES:
            if os.path.isfile(os.path.join(parent, name)):
                files[name] = os.path.join(parent, name)
        with _hf_folder(files) as folder:
            core = _huggingface_core(options, folder, **extra)
    return MegatronCoreTokenizer(core, options, eod=_core_id(core, "eod"),
                                 vocab_size=core.vocab_size, pad=_core_id(core, "pad"),
                                 bos=_core_id(core, "bos"), eos=_core_id(core, "eos"),
                                 identity=identity)


def _tiktoken(options: TokenizerOptions) -> MegatronCoreTokenizer:
    t = options.tokenizer_type
    path = _need_file(options.tokenizer_model, "--tokenizer-model", "a tiktoken JSON vocabulary "
                      "(a list of {rank, token_bytes, token_str})", t)
    _refuse_unused(options, ("tokenizer_model", "tokenizer_special_tokens", "tiktoken_pattern",
                             "tiktoken_num_special_tokens"))
    pattern = options.tiktoken_pattern
    if options.legacy_tokenizer and pattern is None:
        raise TokenizerModelError("--legacy-tokenizer TikTokenizer needs --tiktoken-pattern v1 "
                                  "or v2 (Megatron-LM's legacy TikTokenizer has no default).")
    if pattern is not None and pattern not in ("v1", "v2"):
        raise TokenizerModelError(f"--tiktoken-pattern must be v1 or v2, not {pattern!r}.")
    special = options.tokenizer_special_tokens
    kwargs = {"pattern": pattern or "v2",
              "num_special_tokens": int(options.tiktoken_num_special_tokens)}
    if options.vocab_size:
        kwargs["vocab_size"] = int(options.vocab_size)
    if options.legacy_tokenizer:
        # Megatron-LM's legacy CustomTikTokenizer requires only <unk> <s> </s>; megatron-core's
        # wrapper wants seven named tokens. The ids of the given tokens, of the fillers and of
        # the BPE ranks are the same; the extra names are only reachable through special-token
        # strings in the text, which the legacy tokenizer encodes as ordinary text (below).
        special = list(special) if special else ["<unk>", "<s>", "</s>"]
        for required in ("<unk>", "<s>", "</s>"):
            if required not in special:
                raise TokenizerModelError(f"--tokenizer-special-tokens must include "
                                          f"{required!r} (Megatron-LM's TikTokenizer needs "
                                          "<unk> <s> </s>).")
        named = list(special)
        for extra in ("<mask>", "<pad>", "<cls>", "<sep>"):
            if extra not in named:
                named.append(extra)
        if len(named) > int(options.tiktoken_num_special_tokens):
            raise TokenizerModelError("--tiktoken-num-special-tokens is smaller than the number "
                                      "of special tokens.")
        special = named
    core = _from_pretrained(path, "tiktoken", special_tokens=special, **kwargs)
    tik = core._tokenizer
    identity = {"tokenizer_model": os.path.abspath(path), "pattern": kwargs["pattern"],
                "num_special_tokens": kwargs["num_special_tokens"],
                "vocab_size": kwargs.get("vocab_size"), "special_tokens": special}
    encode = tik.tokenizer.encode_ordinary if options.legacy_tokenizer else None
    decode = tik.tokenizer.decode
    pad = -1 if options.legacy_tokenizer else tik.pad_id
    return MegatronCoreTokenizer(core, options, eod=core.eod, vocab_size=core.vocab_size,
                                 pad=_id(pad), bos=_id(tik.bos_id), eos=_id(tik.eos_id),
                                 encode=encode, decode=decode, identity=identity)


def _null(options: TokenizerOptions) -> MegatronCoreTokenizer:
    if options.vocab_size is None or int(options.vocab_size) < 1:
        raise TokenizerModelError(
            "NullTokenizer needs --vocab-size N (N >= 1): the ids in the text are below N "
            "(megatron-core's NullTokenizer convention: see docs/data.md)."
        )
    _refuse_unused(options, ())
    size = int(options.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core = MegatronTokenizer.from_pretrained(metadata_path={"library": compat.null_tokenizer_library()},
                                                 vocab_size=size)

    def encode(text: str) -> List[int]:
        # Megatron-LM splits on single spaces (and fails on any other whitespace); any run of
        # whitespace separates ids here, which gives Megatron's ids wherever it has any.
        words = text.split()
        if not words:
            return []
        try:
            ids = core.tokenize(" ".join(words))
        except ValueError:
            raise ValueError(
                f"NullTokenizer expects whitespace-separated integer ids, got {text[:80]!r}"
            ) from None
        for token_id in ids:  # the installed megatron-core's ids, end-of-document included
            if not 0 <= token_id < core.vocab_size:
                raise ValueError(f"NullTokenizer id {token_id} is outside [0, {core.vocab_size - 1}] "
                                 f"(--vocab-size {size}); raise --vocab-size.")
        return ids

    return MegatronCoreTokenizer(core, options, eod=core.eod, vocab_size=core.vocab_size, pad=-1,
                                 bos=-1, eos=-1, encode=encode, identity={"vocab_size": size})


_BUILDERS = {
    "GPT2BPETokenizer": _gpt2,
    "HuggingFaceTokenizer": _huggingface,
    "TikTokenizer": _tiktoken,
    "SentencePieceTokenizer": _sentencepiece,
    "GPTSentencePieceTokenizer": _sentencepiece,
    "NullTokenizer": _null,
}


def build_tokenizer(
    tokenizer_type: "str | TokenizerOptions",
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
    **options,
) -> MegatronCoreTokenizer:
    """Build a tokenizer from Megatron-LM's tokenizer settings.

    Args:
        tokenizer_type: a :data:`TOKENIZER_TYPES` name, or a whole :class:`TokenizerOptions`
            (then no other argument may be given).
        tokenizer_model: ``--tokenizer-model``.
        vocab_size: ``--vocab-size``.
        options: further :class:`TokenizerOptions` fields (``vocab_file``, ``merge_file``,
            ``legacy_tokenizer``, ...).

    Raises:
        TokenizerModelNotFoundError: a tokenizer file does not exist.
        TokenizerModelError (a ValueError): unknown or unsupported type, missing or unused
            option, unreadable file.
    """
    if isinstance(tokenizer_type, TokenizerOptions):
        if tokenizer_model is not None or vocab_size is not None or options:
            raise TypeError("build_tokenizer(TokenizerOptions) takes no other argument")
        opts = tokenizer_type
    else:
        unknown = set(options) - {f.name for f in dataclasses.fields(TokenizerOptions)}
        if unknown:
            raise TypeError(f"unknown tokenizer option(s) {sorted(unknown)}")
        opts = TokenizerOptions(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                                vocab_size=vocab_size, **options)
    t = opts.tokenizer_type
    if t in _REFUSED_TYPES:
        raise TokenizerModelError(
            f"--tokenizer-type {t} is {_REFUSED_TYPES[t]}; not supported by megatron_ppu. "
            f"Supported: {', '.join(TOKENIZER_TYPES)}."
        )
    if t not in _BUILDERS:
        raise TokenizerModelError(
            f"Unknown --tokenizer-type {t!r}; supported: {', '.join(TOKENIZER_TYPES)}."
        )
    if opts.tokenizer_metadata is not None:
        raise TokenizerModelError(
            "--tokenizer-metadata is not supported: the metadata JSON picks a megatron-core "
            "tokenizer library/class, which megatron_ppu chooses from --tokenizer-type; drop it "
            "and pass --tokenizer-type (and its files) instead."
        )
    if opts.tiktoken_special_tokens is not None:
        raise TokenizerModelError(
            "--tiktoken-special-tokens is parsed but never read by Megatron-LM (core_v0.16.1); "
            "pass the special tokens with --tokenizer-special-tokens instead."
        )
    tokenizer = _BUILDERS[t](opts)
    logger.debug("Built %s (%s conventions): vocab_size=%d eod=%d pad=%d", t,
                 "legacy" if opts.legacy_tokenizer else "megatron-core", tokenizer.vocab_size,
                 tokenizer.eod, tokenizer.pad)
    return tokenizer
