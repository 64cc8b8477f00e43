"""Fixtures shared by the test files.

``tiny_data``: a small real dataset made with the project's own tools (a SentencePiece
tokenizer trained on 40 documents of the embedded corpus, then Megatron ``.bin/.idx``),
built once per test module. ``data_flags(tiny_data)``: the trainer flags that read it.
"""
import os
import sys

import pytest

from tests.harness import REPO


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small real dataset made with the project's own tools (tokenizer + preprocessing)."""
    sys.path.insert(0, str(REPO / "tools"))
    from megatron_ppu.data.default_corpus import write_default_corpus_jsonl

    import preprocess_data
    import train_tokenizer

    d = tmp_path_factory.mktemp("tiny-data")
    jsonl = d / "corpus.jsonl"
    write_default_corpus_jsonl(str(jsonl), max_documents=40)
    train_tokenizer.main(["--input", str(jsonl), "--output-prefix", str(d / "tok"), "--vocab-size", "500"])
    preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(d / "tiny"), "--tokenizer-type",
                          "GPTSentencePieceTokenizer", "--tokenizer-model", str(d / "tok.model"), "--append-eod"])
    prefix = str(d / "tiny_text_document")
    assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
    return {"prefix": prefix, "model": str(d / "tok.model"), "dir": d}


def data_flags(tiny):
    """The trainer flags that train on ``tiny`` (the ``tiny_data`` fixture's value)."""
    return ["--data-path", tiny["prefix"], "--tokenizer-type", "GPTSentencePieceTokenizer",
            "--tokenizer-model", tiny["model"], "--data-cache-path", str(tiny["dir"] / "cache"), "--split", "90,10,0"]
