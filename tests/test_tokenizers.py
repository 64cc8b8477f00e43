"""Tokenizers through megatron-core (megatron_ppu.data.tokenizers), in preprocessing and training.

The tokenizer files are made here: a byte-level BPE trained with the `tokenizers` package on the
embedded corpus, written as GPT-2 ``vocab.json`` + ``merges.txt``, as ``tokenizer.json`` and as
a HuggingFace tokenizer folder; a tiny SentencePiece model; a tiktoken vocabulary. Ids are
checked against the libraries themselves (`tokenizers`, `transformers`, `sentencepiece`,
`tiktoken`) encoding the same text.

With ``MEGATRON_LM_DIR`` pointing at a Megatron-LM source checkout (tag core_v0.16.1; only its
``megatron/training``, ``megatron/legacy`` and ``tools/preprocess_data.py`` are used, with the
installed megatron-core), the outputs are also compared byte for byte with Megatron-LM's own
``tools/preprocess_data.py``; without it those tests are skipped.
"""

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from megatron_ppu.data.inputs import TokenizerModelError, TokenizerModelNotFoundError
from megatron_ppu.data.preprocess import preprocess_data
from megatron_ppu.data.sentence_split import SentenceSplitter
from megatron_ppu.data.tokenizers import build_tokenizer
from tests.harness import REPO, run_ranks
from tests.conftest import MODEL

EOT = "<|endoftext|>"
# Text with the cases that separate the conventions: a special-token string inside the text,
# SentencePiece's legacy specials, repeated spaces, newlines, non-ASCII.
SAMPLE = f"Mr. Smith went{EOT} to Washington.  \n\n Café naïveté — 42%. <EOD> peace<MASK>war"


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _bytes_of(prefix):
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    """Tokenizer files and a JSONL corpus made from the embedded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from megatron_ppu.data.default_corpus import iter_default_documents
    from megatron_ppu.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

    d = tmp_path_factory.mktemp("tok-files")
    docs = [doc["text"][:6000] for doc in iter_default_documents(max_documents=24)]
    docs += ["He said (it was fine.) Then left.It was late.  \"Quoted.\" Next one.\n",
             "Café naïveté — 42%.\n\nA second paragraph. And a third sentence!"]
    jsonl = d / "corpus.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (d / "gpt2").mkdir()
    bpe.model.save(str(d / "gpt2"))  # vocab.json + merges.txt
    bpe.save(str(d / "tokenizer.json"))
    # A HuggingFace folder whose tokenizer adds a BOS (EOT) in front, and names EOT as EOS.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", special_tokens=[(EOT, bpe.token_to_id(EOT))])
    (d / "hf").mkdir()
    bpe.save(str(d / "hf" / "tokenizer.json"))
    (d / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT}))

    sp = train_tokenizer(TokenizerTrainingConfig(
        inputs=[str(jsonl)], output_prefix=str(d / "sp"), vocab_size=500, num_threads=1))
    _tiktoken_vocab(d / "tiktoken.json", docs[:4])
    return {"dir": d, "docs": docs, "jsonl": str(jsonl), "vocab": str(d / "gpt2" / "vocab.json"),
            "tiktoken": str(d / "tiktoken.json"),
            "merges": str(d / "gpt2" / "merges.txt"), "tokenizer_json": str(d / "tokenizer.json"),
            "hf": str(d / "hf"), "sp": sp.model_path}


def _gpt2_reference(tok_files, special: bool):
    """GPT-2 byte-level BPE from the two files with the `tokenizers` library (no megatron code)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ref = Tokenizer(models.BPE.from_file(tok_files["vocab"], tok_files["merges"]))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    if special:
        ref.add_special_tokens([EOT])
    return ref


# --------------------------------------------------------------------------------------------
# Id conventions, against the tokenizer libraries themselves
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_gpt2_bpe_ids_match_the_tokenizers_library(tok_files):
    vocab = json.loads(Path(tok_files["vocab"]).read_text())
    for legacy in (False, True):
        tok = build_tokenizer("GPT2BPETokenizer", vocab_file=tok_files["vocab"],
                              merge_file=tok_files["merges"], legacy_tokenizer=legacy)
        # megatron-core treats <|endoftext|> in the text as the special token; Megatron-LM's
        # legacy GPT-2 tokenizer has no special tokens and encodes it as text.
        ref = _gpt2_reference(tok_files, special=not legacy)
        assert (tok.vocab_size, tok.eod, tok.pad) == (len(vocab), vocab[EOT], -1)
        for text in [SAMPLE] + tok_files["docs"][:3]:
            ids = tok.tokenize(text)
            assert ids == ref.encode(text).ids
            assert ref.decode(ids, skip_special_tokens=False) == text
        if legacy:
            assert vocab[EOT] not in tok.tokenize(SAMPLE)
            assert tok.detokenize(tok.tokenize(SAMPLE)) == SAMPLE
        else:
            assert vocab[EOT] in tok.tokenize(SAMPLE)


@pytest.mark.timeout(120)
def test_huggingface_tokenizer_folder_and_file_offline(tok_files, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = Tokenizer.from_file(str(Path(tok_files["hf"]) / "tokenizer.json"))
    eot = ref.token_to_id(EOT)
    new = build_tokenizer("HuggingFaceTokenizer", tok_files["hf"])
    legacy = build_tokenizer("HuggingFaceTokenizer", tok_files["hf"], legacy_tokenizer=True)
    with_specials = build_tokenizer("HuggingFaceTokenizer", tok_files["hf"],
                                    tokenizer_hf_include_special_tokens=True)
    for text in [SAMPLE] + tok_files["docs"][:3]:
        # megatron-core: no special tokens added; legacy: tokenizer(text).input_ids (BOS first).
        assert new.tokenize(text) == ref.encode(text, add_special_tokens=False).ids
        assert legacy.tokenize(text) == ref.encode(text).ids
        assert legacy.tokenize(text)[0] == eot
        assert with_specials.tokenize(text) == ref.encode(text).ids
    for tok in (new, legacy):
        assert (tok.vocab_size, tok.eod) == (ref.get_vocab_size(), eot)
    doc = tok_files["docs"][0]
    assert new.detokenize(new.tokenize(doc)) == doc

    # A bare tokenizer.json file works too (no EOS named: eod is -1).
    bare = build_tokenizer("HuggingFaceTokenizer", tok_files["tokenizer_json"])
    plain = Tokenizer.from_file(tok_files["tokenizer_json"])
    assert bare.tokenize(SAMPLE) == plain.encode(SAMPLE, add_special_tokens=False).ids
    assert bare.eod == -1

    # A name that is not a local path is never looked up on the Hub.
    with pytest.raises(TokenizerModelNotFoundError, match="does not download"):
        build_tokenizer("HuggingFaceTokenizer", "meta-llama/Llama-3.1-8B")


@pytest.mark.timeout(120)
def test_sentencepiece_conventions_new_and_legacy(tok_files):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tok_files["sp"])
    n = sp.get_piece_size()
    for t in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        tok = build_tokenizer(t, tok_files["sp"])
        # megatron-core's: the model's own pieces, EOD = the model's </s>.
        assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (n, sp.eos_id(), sp.bos_id(),
                                                               sp.pad_id())
        assert tok.tokenize(SAMPLE) == sp.encode(SAMPLE)
    gpt_legacy = build_tokenizer("GPTSentencePieceTokenizer", tok_files["sp"],
                                 legacy_tokenizer=True)
    assert (gpt_legacy.vocab_size, gpt_legacy.eod) == (n, sp.eos_id())
    legacy = build_tokenizer("SentencePieceTokenizer", tok_files["sp"], legacy_tokenizer=True,
                             vocab_extra_ids=2)
    # Megatron-LM's legacy ids: <CLS> <SEP> <EOD> <MASK> <PAD> appended (the model has <s> and
    # </s> but no pad piece), then <extra_id_0> <extra_id_1>.
    assert legacy.vocab_size == n + 7
    assert (legacy.cls, legacy.sep, legacy.eod, legacy.mask, legacy.pad) == tuple(range(n, n + 5))
    assert (legacy.bos, legacy.eos) == (sp.bos_id(), sp.eos_id())
    assert legacy.tokenize("peace <EOD>war<extra_id_1>") == (
        sp.encode("peace ") + [n + 2] + sp.encode("war") + [n + 6])


def _tiktoken_vocab(path, docs, size=300):
    """A tiktoken vocabulary (Megatron's JSON list format) from byte-pair counts of ``docs``."""
    from collections import Counter

    ranks = [bytes([i]) for i in range(256)]
    words = Counter(w.encode() for text in docs for w in text.split())
    seqs = {w: [bytes([b]) for b in w] for w in words}
    while len(ranks) < size:
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks.append(a + b)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", errors="replace")} for i, t in enumerate(ranks)]
    Path(path).write_text(json.dumps(entries))
    return {t: i for i, t in enumerate(ranks)}


@pytest.mark.timeout(120)
def test_tiktoken_against_tiktoken(tok_files, tmp_path):
    import tiktoken
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import (
        _PATTERN_TIKTOKEN_V1,
        _PATTERN_TIKTOKEN_V2,
    )

    path = tmp_path / "tiktoken.json"
    ranks = _tiktoken_vocab(path, tok_files["docs"][:4])
    specials = 10
    vocab = len(ranks) + specials
    text = "The Congress <s> of 1861 </s> said: peace!"
    for legacy, pattern, names in ((False, _PATTERN_TIKTOKEN_V2, None),
                                   (True, _PATTERN_TIKTOKEN_V1, ["<unk>", "<s>", "</s>"])):
        tok = build_tokenizer("TikTokenizer", str(path), vocab_size=vocab, legacy_tokenizer=legacy,
                              tiktoken_pattern="v1" if legacy else None,
                              tiktoken_num_special_tokens=specials)
        special = names or ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"]
        special = special + [f"<SPECIAL_{i}>" for i in range(len(special), specials)]
        ref = tiktoken.Encoding(name="ref", pat_str=pattern,
                                mergeable_ranks={t: r + specials for t, r in ranks.items()},
                                special_tokens={t: i for i, t in enumerate(special)})
        expected = ref.encode_ordinary(text) if legacy else ref.encode(text, allowed_special="all")
        assert tok.tokenize(text) == expected
        assert (tok.vocab_size, tok.eod, tok.bos) == (vocab, 2, 1)
        assert (1 in tok.tokenize(text)) is (not legacy)  # "<s>" in the text: special or text
    with pytest.raises(TokenizerModelError, match="--tiktoken-pattern"):
        build_tokenizer("TikTokenizer", str(path), vocab_size=vocab, legacy_tokenizer=True)


@pytest.mark.timeout(60)
def test_null_tokenizer():
    from importlib.metadata import version

    from packaging.version import Version

    tok = build_tokenizer("NullTokenizer", vocab_size=10)
    if Version(version("megatron-core")) >= Version("0.18"):  # NullTokenizer(N): N ids, eod N-1 (Megatron-LM's convention there)
        assert (tok.vocab_size, tok.eod, tok.pad) == (10, 9, -1)
        top = 9
    else:  # N + 1 ids, eod N
        assert (tok.vocab_size, tok.eod, tok.pad) == (11, 10, -1)
        top = 10
    assert tok.tokenize(f"1 2 {top}") == [1, 2, top]
    assert tok.detokenize([1, 2, top]) == f"1 2 {top}"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize(f"1 {top + 1}")


@pytest.mark.timeout(60)
def test_refusals_name_the_problem_and_the_fix(tok_files):
    cases = [
        (dict(tokenizer_type="BertWordPieceCase", vocab_file=tok_files["vocab"]),
         "BERT WordPiece"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=tok_files["vocab"]),
         "needs --merge-file"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=tok_files["vocab"],
              merge_file=tok_files["merges"], tokenizer_model=tok_files["sp"]),
         "--tokenizer-model: not read by --tokenizer-type GPT2BPETokenizer"),
        (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok_files["sp"],
              vocab_extra_ids=3), "--vocab-extra-ids: not read"),
        (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok_files["sp"],
              tokenizer_special_tokens=["<x>"]), "needs --tokenizer-sentencepiece-legacy"),
        (dict(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=tok_files["sp"],
              tokenizer_metadata="m.json"), "--tokenizer-metadata is not supported"),
        (dict(tokenizer_type="TikTokenizer", tokenizer_model=tok_files["vocab"],
              tiktoken_special_tokens=["<unk>"]), "with --tokenizer-special-tokens instead"),
        (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tok_files["vocab"]),
         "not a valid SentencePiece model"),
    ]
    for kwargs, message in cases:
        t = kwargs.pop("tokenizer_type")
        with pytest.raises(ValueError, match=message):
            build_tokenizer(t, **kwargs)
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=tok_files["vocab"], merge_file="nope.txt")


# --------------------------------------------------------------------------------------------
# tools/preprocess_data.py
# --------------------------------------------------------------------------------------------


def _preprocess_cli(argv):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py")] + argv,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.timeout(600)
def test_preprocess_gpt2_and_huggingface_round_trip(tok_files, tmp_path):
    docs = tok_files["docs"]
    gpt2 = _gpt2_reference(tok_files, special=True)
    eot = gpt2.token_to_id(EOT)
    runs = {
        "gpt2": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tok_files["vocab"],
                 "--merge-file", tok_files["merges"]],
        "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_files["hf"]],
    }
    for name, flags in runs.items():
        _preprocess_cli(["--input", tok_files["jsonl"], "--output-prefix", str(tmp_path / name),
                         "--append-eod", "--workers", "2"] + flags)
        dataset = _indexed(str(tmp_path / f"{name}_text_document"))
        assert dataset.index.dtype == numpy.uint16
        assert len(dataset) == len(docs)
        for i, text in enumerate(docs):
            ids = dataset[i].tolist()
            assert ids[-1] == eot and eot not in ids[:-1]  # EOD once, at the end
            assert ids[:-1] == gpt2.encode(text).ids  # the `tokenizers` library's own ids
            assert gpt2.decode(ids[:-1], skip_special_tokens=False) == text
    assert _bytes_of(str(tmp_path / "gpt2_text_document")) == \
        _bytes_of(str(tmp_path / "hf_text_document"))


@pytest.mark.timeout(300)
def test_preprocess_takes_megatrons_28_flags(tok_files, tmp_path):
    """Every flag of Megatron-LM's tools/preprocess_data.py parses here; the ones that cannot
    be honoured are refused with the reason."""
    from megatron_ppu.data.preprocess import build_arg_parser, config_from_args

    megatron_flags = [
        "--vocab-size", "--padded-vocab-size", "--vocab-file", "--merge-file", "--vocab-extra-ids",
        "--tokenizer-type", "--tokenizer-model", "--tokenizer-metadata",
        "--tokenizer-special-tokens", "--legacy-tokenizer", "--tiktoken-pattern",
        "--tiktoken-num-special-tokens", "--tiktoken-special-tokens",
        "--tokenizer-sentencepiece-legacy", "--tokenizer-hf-use-fast",
        "--tokenizer-hf-include-special-tokens", "--trust-remote-code", "--input", "--json-keys",
        "--split-sentences", "--keep-newlines", "--append-eod", "--lang", "--output-prefix",
        "--workers", "--partitions", "--log-interval", "--keep-sequential-samples"]
    assert len(megatron_flags) == 28
    known = {s for a in build_arg_parser()._actions for s in a.option_strings}
    assert [f for f in megatron_flags if f not in known] == []
    args = build_arg_parser().parse_args([
        "--input", tok_files["jsonl"], "--output-prefix", str(tmp_path / "p"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok_files["sp"],
        "--legacy-tokenizer", "--vocab-extra-ids", "1", "--padded-vocab-size", "1024",
        "--append-eod"])
    report = preprocess_data(config_from_args(args))
    dataset = _indexed(report.outputs["text"])
    import sentencepiece

    n = sentencepiece.SentencePieceProcessor(model_file=tok_files["sp"]).get_piece_size()
    assert report.vocab_size == n + 6 and dataset[0].tolist()[-1] == n + 2  # legacy <EOD>
    with pytest.raises(SystemExit, match="--tokenizer-metadata is not supported"):
        from megatron_ppu.data.preprocess import main

        main(["--input", tok_files["jsonl"], "--output-prefix", str(tmp_path / "q"),
              "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
              tok_files["sp"], "--tokenizer-metadata", "x.json"])


@pytest.mark.timeout(120)
def test_keep_newlines_splits_like_megatron():
    """Megatron's --keep-newlines regex: whitespace after a sentence end stays in the sentence,
    and no whitespace is needed before the next token (hand-derived expectations)."""
    keep = SentenceSplitter(keep_newlines=True)
    assert keep.split("  Mr. Smith went to Washington. He arrived!\n\nThen what? Dr. Who.\n") == [
        "  Mr. Smith went to Washington. ", "He arrived!\n\n", "Then what? ", "Dr. Who."]
    # Punkt realigns a closing bracket to the sentence; the whitespace after it goes nowhere.
    assert keep.split("He said (it was fine.) Then left.") == ["He said (it was fine.)",
                                                              "Then left."]
    assert SentenceSplitter().split("He arrived!\n\nThen what? Dr. Who.\n") == [
        "He arrived!", "Then what?", "Dr. Who."]


# --------------------------------------------------------------------------------------------
# Byte for byte against Megatron-LM's own tools/preprocess_data.py (needs its source)
# --------------------------------------------------------------------------------------------

_MEGATRON_RUNNER = textwrap.dedent('''
    """Run Megatron-LM's tools/preprocess_data.py from a source checkout with the installed
    megatron-core, without megatron/training/__init__.py (it imports triton/CUDA-only code)."""
    import importlib, os, runpy, sys, types
    src = os.environ["MEGATRON_LM_DIR"]
    sys.path.append(src)  # after site-packages: megatron.core stays the installed one
    import megatron
    pkg = types.ModuleType("megatron.training")
    pkg.__path__ = [os.path.join(src, "megatron", "training")]
    sys.modules["megatron.training"] = pkg
    megatron.training = pkg
    gv = importlib.import_module("megatron.training.global_vars")
    for name in dir(gv):
        if name.startswith("get_"):
            setattr(pkg, name, getattr(gv, name))
    utils = importlib.import_module("megatron.training.utils")
    for name in ("print_rank_0", "is_last_rank", "print_rank_last"):
        setattr(pkg, name, getattr(utils, name))
    if sys.argv[1] == "--splitter":
        mod = runpy.run_path(os.path.join(src, "tools", "preprocess_data.py"), run_name="mlm")
        import json
        from nltk.tokenize.punkt import PunktSentenceTokenizer
        from megatron_ppu.data.sentence_split import load_punkt_parameters
        splitter = PunktSentenceTokenizer(load_punkt_parameters(), lang_vars=mod["CustomLanguageVars"]())
        docs = json.load(open(sys.argv[2]))
        json.dump([splitter.tokenize(d) for d in docs], open(sys.argv[3], "w"))
    else:
        sys.argv = [os.path.join(src, "tools", "preprocess_data.py")] + sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
''')


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory):
    src = os.environ.get("MEGATRON_LM_DIR")
    if not src or not (Path(src) / "tools" / "preprocess_data.py").is_file():
        pytest.skip("MEGATRON_LM_DIR (a Megatron-LM core_v0.16.1 source checkout) is not set")
    runner = tmp_path_factory.mktemp("mlm") / "run_megatron_preprocess.py"
    runner.write_text(_MEGATRON_RUNNER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEGATRON_LM_DIR": src,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    probe = subprocess.run([sys.executable, str(runner), "--help"], capture_output=True,
                           text=True, env=env, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"Megatron-LM's preprocess_data.py does not run here: {probe.stderr[-500:]}")

    def run(argv):
        out = subprocess.run([sys.executable, str(runner)] + argv, capture_output=True,
                             text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]

    return run


@pytest.mark.timeout(900)
def test_byte_identical_to_megatron_lm_preprocess(megatron_lm, tok_files, tmp_path):
    # The corpus plus a document with every special-token string the conventions treat apart.
    jsonl = tmp_path / "corpus.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for text in tok_files["docs"] + [SAMPLE + " <s> </s> <pad> <CLS>"]:
            f.write(json.dumps({"text": text}) + "\n")
    base = ["--input", str(jsonl), "--workers", "1", "--append-eod"]
    cases = {
        "gptsp": ["--tokenizer-type", "GPTSentencePieceTokenizer",
                  "--tokenizer-model", tok_files["sp"]],
        "sp": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok_files["sp"]],
        "sp_legacy": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                      tok_files["sp"], "--legacy-tokenizer"],
        # (Megatron-LM's GPT2BPETokenizer without --legacy-tokenizer fetches `gpt2` from the Hub.)
        "gpt2_legacy": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                        tok_files["vocab"], "--merge-file", tok_files["merges"],
                        "--legacy-tokenizer"],
        "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_files["hf"]],
        "hf_legacy": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                      tok_files["hf"], "--legacy-tokenizer"],
        "tiktoken": ["--tokenizer-type", "TikTokenizer", "--tokenizer-model",
                     tok_files["tiktoken"], "--vocab-size", "1300"],
        "tiktoken_legacy": ["--tokenizer-type", "TikTokenizer", "--tokenizer-model",
                            tok_files["tiktoken"], "--vocab-size", "1300", "--tiktoken-pattern",
                            "v1", "--legacy-tokenizer"],
    }
    for name, flags in cases.items():
        megatron_lm(base + flags + ["--output-prefix", str(tmp_path / f"mlm_{name}")])
        _preprocess_cli(base + flags + ["--output-prefix", str(tmp_path / f"ours_{name}")])
        mlm = _bytes_of(str(tmp_path / f"mlm_{name}_text_document"))
        ours = _bytes_of(str(tmp_path / f"ours_{name}_text_document"))
        assert ours == mlm, name


@pytest.mark.timeout(300)
def test_keep_newlines_equals_megatron_lm_splitter(megatron_lm, tok_files, tmp_path):
    docs = tok_files["docs"]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    megatron_lm(["--splitter", str(tmp_path / "docs.json"), str(tmp_path / "split.json")])
    expected = json.loads((tmp_path / "split.json").read_text())
    keep = SentenceSplitter(keep_newlines=True)
    assert [keep.split(d) for d in docs] == expected


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_trainer_tokenizer_flags(tok_files):
    from megatron_ppu.training.arguments import parse_args
    from megatron_ppu.training.data import DataError, build_data_tokenizer, resolve_data

    base = MODEL + ["--train-iters", "2"]
    args = parse_args(base + ["--data-path", "x", "--tokenizer-type", "GPT2BPETokenizer",
                              "--vocab-file", tok_files["vocab"], "--merge-file",
                              tok_files["merges"], "--legacy-tokenizer"])
    tok = build_data_tokenizer(args)
    vocab = json.loads(Path(tok_files["vocab"]).read_text())
    assert (tok.vocab_size, tok.eod, tok.legacy) == (len(vocab), vocab[EOT], True)
    args = parse_args(base + ["--data-path", "x", "--tokenizer-type", "GPT2BPETokenizer",
                              "--vocab-file", tok_files["vocab"]])
    with pytest.raises(DataError, match="needs --merge-file"):
        build_data_tokenizer(args)
    # Tokenizer flags without --data-path would be ignored by the embedded corpus: refused.
    with pytest.raises(DataError, match="--vocab-file --merge-file: tokenizer flags"):
        resolve_data(parse_args(base + ["--vocab-file", tok_files["vocab"],
                                        "--merge-file", tok_files["merges"]]))


@pytest.mark.timeout(900)
def test_two_iterations_with_gpt2_bpe_data(tok_files, tmp_path):
    prefix = tmp_path / "gpt2"
    _preprocess_cli(["--input", tok_files["jsonl"], "--output-prefix", str(prefix),
                     "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tok_files["vocab"],
                     "--merge-file", tok_files["merges"], "--append-eod"])
    argv = MODEL + ["--data-path", f"{prefix}_text_document", "--tokenizer-type",
                    "GPT2BPETokenizer", "--vocab-file", tok_files["vocab"], "--merge-file",
                    tok_files["merges"], "--data-cache-path", str(tmp_path / "cache"),
                    "--split", "90,10,0", "--train-iters", "2", "--diloco-local-steps", "0"]
    res = run_ranks(2, "tests.conftest:_train_worker", {"runs": [argv]}, timeout=800,
                    env={"HF_HUB_OFFLINE": "1"})
    losses = [r[0]["losses"] for r in res if r[0]["logger"]][0]
    assert len(losses) == 2 and all(numpy.isfinite(losses))
    # The padded vocabulary of a 600-token BPE is 640: the initial loss is close to ln(640).
    assert abs(losses[0] - numpy.log(640)) < 0.5
