#!/usr/bin/env python
"""Tokenize JSONL documents into Megatron ``.bin/.idx`` datasets (Megatron-LM's flags).

Example::

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \
        --append-eod --workers 2

GPT-2 BPE files, a local HuggingFace tokenizer, or Megatron-LM's legacy ids::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \
        --append-eod
    python tools/preprocess_data.py ... --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model path/to/tokenizer_folder
    python tools/preprocess_data.py ... --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model --legacy-tokenizer

The logic lives in :mod:`megatron_ppu.data.preprocess`; see docs/data.md.
"""
import os
import sys

if __package__ in (None, ""):
    # Run as a script from a checkout: make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ppu.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    main()
