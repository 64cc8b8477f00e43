#!/usr/bin/env python
"""Train a SentencePiece tokenizer from JSONL or plain-text files.

Example::

    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --output-prefix tok \
        --vocab-size 8000 --model-type bpe --byte-fallback

The logic lives in :mod:`megatron_ppu.data.tokenizer_training`; see docs/data.md.
"""
import os
import sys

if __package__ in (None, ""):
    # Run as a script from a checkout: make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ppu.data.tokenizer_training import main  # noqa: E402

if __name__ == "__main__":
    main()
