"""A byte-level BPE tokenizer trained on the spot (the ``tokenizers`` package), no downloads."""

from __future__ import annotations

import numpy as np
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``vocab_size`` entries (including ``<|endoftext|>``) on ``text``.

    Returned as a transformers tokenizer, so ``save_pretrained`` puts it next to the model.
    """
    bpe = ByteLevelBPETokenizer()
    chunks = (text[start:start + 65536] for start in range(0, len(text), 65536))
    bpe.train_from_iterator(chunks, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> np.ndarray:
    """Token ids of ``text`` as a 1-D int64 array."""
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
