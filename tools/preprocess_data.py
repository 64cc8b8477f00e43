#!/usr/bin/env python
"""Tokenize JSONL documents into Megatron ``.bin/.idx`` datasets (Megatron-LM's flags).

Example::

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \
        --append-eod --workers 2

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
