"""H-M-T-R training data: texts -> K-aligned windows at random offsets, `<eos>`/`<pad>`, loss mask.

    load_dataset("text", ...)  rows of text (train / validation split as in strata.training.data)
      -> map(tokenize)         ids of every row, then `<eos>` (an <eos> ends every text)
      -> map(cut windows)      windows of ``seq_len`` tokens (a multiple of K); the block grid
                               starts at a random offset inside each text (augmentation, so
                               words do not always sit at the same place of a block)
      -> {"input_ids", "labels"}   labels = input_ids with `<pad>` -> -100 (masked from the loss)

Cutting one text (ids t_0 .. t_{n-1}, then <eos>) with offset o (0 <= o < seq_len, drawn per
text from ``seed`` and the row index; 0 for validation and for texts of at most ``seq_len``
tokens): windows start at 0 (the text's beginning, a shorter window), o, o + seq_len,
o + 2 seq_len, ...; windows are padded with <pad> to ``seq_len``. A piece of fewer than 2
tokens (nothing to predict: o = 1, or a lone <eos>) is dropped. Example (K = 8, seq_len = 16, o = 0), the seed's
"我爱 Julia 语言":

    input_ids: 我 爱 J u l i a 语 言 <eos> <pad> <pad> <pad> <pad> <pad> <pad>
    labels:    我 爱 J u l i a 语 言 <eos> -100  -100  -100  -100  -100  -100

Labels equal the inputs (models shift them inside their loss). Works with ``streaming=True``
(`IterableDataset` splits, windows cut lazily).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from strata.training.data import Corpus, load_text_splits, resolve_corpus, tokens_per_char


def check_window(seq_len: int, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2 or seq_len % block_size:
        raise ValueError(f"`seq_len` must be a multiple of block_size={block_size} and >= 2, got {seq_len!r}")


def text_offset(seed: int | None, index: int, length: int, seq_len: int) -> int:
    """Offset of the block grid in text number ``index`` of ``length`` tokens (0 when ``seed`` is None)."""
    if seed is None or length <= seq_len:
        return 0
    return random.Random(seed * 1_000_003 + index).randrange(seq_len)


def cut_windows(ids: list[int], seq_len: int, block_size: int, offset: int, eos_id: int, pad_id: int,
                add_eos: bool = True) -> list[list[int]]:
    """Windows of ``seq_len`` tokens of one text (see the module docstring)."""
    check_window(seq_len, block_size)
    if not 0 <= offset < seq_len:
        raise ValueError(f"`offset` must be in [0, seq_len={seq_len}), got {offset}")
    tokens = list(ids) + ([eos_id] if add_eos else [])
    starts = ([0] if offset >= 2 else []) + list(range(offset, len(tokens), seq_len))
    windows = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) and starts[i + 1] - start < seq_len else start + seq_len
        piece = tokens[start:end]
        if len(piece) < 2:  # nothing to predict
            continue
        windows.append(piece + [pad_id] * (seq_len - len(piece)))
    return windows


def labels_for(window: list[int], pad_id: int) -> list[int]:
    return [-100 if t == pad_id else t for t in window]


def make_windows(texts, tokenizer, seq_len: int, block_size: int, seed: int | None = None,
                 map_batch_size: int = 100):
    """Map a text dataset (``"text"`` column, Dataset or IterableDataset) to H-M-T-R windows."""
    check_window(seq_len, block_size)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None or pad_id is None:
        raise ValueError("the tokenizer needs an `<eos>` and a `<pad>` token (eos_token_id / pad_token_id)")

    def to_windows(batch, indices):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        inputs, labels = [], []
        for index, row in zip(indices, ids):
            if not row:
                continue
            offset = text_offset(seed, index, len(row) + 1, seq_len)
            for window in cut_windows(row, seq_len, block_size, offset, eos_id, pad_id):
                inputs.append(window)
                labels.append(labels_for(window, pad_id))
        return {"input_ids": inputs, "labels": labels}

    return texts.map(to_windows, batched=True, batch_size=map_batch_size, with_indices=True,
                     remove_columns=["text"])


@dataclass
class HMTRData:
    train: object  # Dataset or IterableDataset of {"input_ids", "labels"}
    validation: object
    seq_len: int
    block_size: int
    tokens_per_char: float
    corpus: Corpus | None


def prepare_hmtr_data(tokenizer, corpus: str | os.PathLike = "tinyshakespeare", seq_len: int = 128,
                      block_size: int = 8, seed: int = 0, sample_by: str | None = None,
                      streaming: bool = False) -> HMTRData:
    """Train windows at random offsets (``seed``) and validation windows at offset 0."""
    check_window(seq_len, block_size)
    _, info = resolve_corpus(corpus)
    texts = load_text_splits(corpus, sample_by=sample_by, streaming=streaming)
    train = make_windows(texts["train"], tokenizer, seq_len, block_size, seed=seed)
    validation = make_windows(texts["validation"], tokenizer, seq_len, block_size, seed=None)
    if not streaming:
        if len(train) == 0 or len(validation) == 0:
            raise ValueError(f"corpus {str(corpus)!r} gives no window of {seq_len} tokens "
                             f"({len(train)} train / {len(validation)} validation)")
        train, validation = train.with_format("torch"), validation.with_format("torch")
    return HMTRData(train, validation, seq_len, block_size, tokens_per_char(texts["validation"], tokenizer), info)
