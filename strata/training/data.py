"""Training data with `datasets`: text file -> train/validation split -> tokens -> fixed-length blocks.

    load_dataset("text", data_files=path, sample_by=...)    rows of text
      -> split_rows                                        90% train / 10% validation
      -> tokenize (no special tokens)                      token ids per row
      -> pack_blocks                                       concatenated, cut into blocks of `block_size`
                                                           {"input_ids": block, "labels": block}

Labels equal the inputs: the model shifts them by one inside its loss, as every
Transformers causal LM does. The remainder shorter than one block is dropped (once per
split in memory; once per map batch of 1,000 rows when streaming).

The split follows nanoGPT: with ``sample_by="document"`` (one row per file) every
document is cut at 90% of its characters, so on tinyshakespeare the training text is
``text[:int(0.9 * len(text))]`` and the validation text the rest. With
``sample_by="paragraph"`` (one row per blank-line separated paragraph, e.g. one poem)
every tenth paragraph goes to validation, which needs no row count and so also works
when streaming. ``streaming=True`` gives ``IterableDataset`` splits that tokenize
lazily; the Trainer then needs ``max_steps``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import DatasetDict, IterableDatasetDict, load_dataset

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TRAIN_FRACTION = 0.9
VALIDATION_EVERY = 10  # paragraph mode: rows 9, 19, 29, ... are validation


@dataclass(frozen=True)
class Corpus:
    """A text corpus bundled in strata/data (see strata/data/SOURCES.md)."""

    name: str
    filename: str
    sample_by: str  # "document" or "paragraph": how `load_dataset("text")` makes rows
    title: str
    hub_dataset: str | None  # the Hub dataset holding the same text, for model card metadata
    language: str | None
    source: str
    example_prompt: str  # a natural start for a generated sample


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus("tinyshakespeare", "tinyshakespeare.txt", "document", "tiny Shakespeare",
               "karpathy/tiny_shakespeare", "en", "karpathy/char-rnn data/tinyshakespeare/input.txt (public domain)",
               "ROMEO:"),
        Corpus("tang_poems", "tang_poems.txt", "paragraph", "Tang poems (全唐诗, traditional characters)",
               None, "zh", "chinese-poetry/chinese-poetry 全唐诗 (MIT licence)", "靜夜思\n李白\n"),
        Corpus("lunyu", "lunyu.txt", "paragraph", "The Analects (论语, simplified characters)",
               None, "zh", "chinese-poetry/chinese-poetry 论语 (MIT licence)", "子曰："),
    )
}


def corpus_names() -> list[str]:
    return sorted(CORPORA)


def corpus_path(name: str) -> Path:
    """Path of a bundled corpus, e.g. ``corpus_path("tinyshakespeare")``."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; bundled corpora: {corpus_names()} (or pass a path to a .txt file)")
    return DATA_DIR / CORPORA[name].filename


def resolve_corpus(corpus: str | os.PathLike) -> tuple[Path, Corpus]:
    """A bundled corpus name or a path to a UTF-8 text file -> (path, its Corpus description).

    A local file is described by its name, so model cards can name the data of their results.
    """
    if isinstance(corpus, str) and corpus in CORPORA:
        return corpus_path(corpus), CORPORA[corpus]
    path = Path(corpus)
    if path.is_file():
        return path, Corpus(path.stem, path.name, "document", path.name, None, None, str(path), "\n")
    raise ValueError(
        f"unknown corpus {str(corpus)!r}: not a bundled corpus {corpus_names()} and not an existing text file"
    )


def load_text_splits(corpus: str | os.PathLike = "tinyshakespeare", sample_by: str | None = None,
                     streaming: bool = False) -> DatasetDict | IterableDatasetDict:
    """Rows of raw text with a ``"train"`` and a ``"validation"`` split (column ``"text"``)."""
    path, info = resolve_corpus(corpus)
    sample_by = sample_by or info.sample_by
    if sample_by not in ("document", "paragraph"):
        raise ValueError(f"`sample_by` must be 'document' or 'paragraph', got {sample_by!r}")
    raw = load_dataset("text", data_files={"text": str(path)}, sample_by=sample_by, streaming=streaming)["text"]
    splits = {name: split_rows(raw, name, sample_by) for name in ("train", "validation")}
    return IterableDatasetDict(splits) if streaming else DatasetDict(splits)


def split_rows(rows, split: str, sample_by: str):
    """The ``split`` part of a text dataset (Dataset or IterableDataset), see the module docstring."""
    if sample_by == "document":
        def cut(batch):
            texts = []
            for text in batch["text"]:
                boundary = int(len(text) * TRAIN_FRACTION)
                texts.append(text[:boundary] if split == "train" else text[boundary:])
            return {"text": texts}

        return rows.map(cut, batched=True)

    # Paragraph rows lost their blank-line separators; restore them so blocks read like the file.
    def keep(_, index):
        is_validation = index % VALIDATION_EVERY == VALIDATION_EVERY - 1
        return is_validation == (split == "validation")

    return rows.filter(keep, with_indices=True).map(lambda row: {"text": row["text"] + "\n\n"})


def pack_blocks(token_rows: list[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate rows of token ids and cut them into blocks; the remainder is dropped."""
    flat = [t for row in token_rows for t in row]
    n = len(flat) // block_size * block_size
    blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def tokenize_and_pack(texts, tokenizer, block_size: int, map_batch_size: int | None = 1000):
    """Map a text dataset (``"text"`` column) to blocks of ``block_size`` tokens.

    Rows are packed per map batch of ``map_batch_size`` rows (None: the whole dataset at
    once), so each batch drops its own remainder of fewer than ``block_size`` tokens.
    """
    if block_size < 2:
        raise ValueError(f"`block_size` must be at least 2 (one input and one next token), got {block_size}")

    def to_blocks(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return pack_blocks(ids, block_size)

    return texts.map(to_blocks, batched=True, batch_size=map_batch_size, remove_columns=["text"])


@dataclass
class LMData:
    """Packed blocks of both splits plus what bits-per-character needs."""

    train: object  # Dataset or IterableDataset of {"input_ids", "labels"}
    validation: object
    block_size: int
    tokens_per_char: float  # validation tokens / validation characters
    corpus: Corpus | None
    corpus_path: Path


def prepare_lm_data(tokenizer, corpus: str | os.PathLike = "tinyshakespeare", block_size: int = 128,
                    sample_by: str | None = None, streaming: bool = False) -> LMData:
    """Train and validation blocks of a corpus, tokenized with ``tokenizer``."""
    path, info = resolve_corpus(corpus)
    texts = load_text_splits(corpus, sample_by=sample_by, streaming=streaming)
    # In memory, each split is packed as one sequence (one remainder dropped per split);
    # streaming packs per map batch of rows.
    map_batch_size = 1000 if streaming else None
    train = tokenize_and_pack(texts["train"], tokenizer, block_size, map_batch_size)
    validation = tokenize_and_pack(texts["validation"], tokenizer, block_size, map_batch_size)
    if not streaming:
        if len(train) == 0 or len(validation) == 0:
            raise ValueError(
                f"corpus {str(corpus)!r} is too small for blocks of {block_size} tokens: "
                f"{len(train)} train / {len(validation)} validation blocks"
            )
        train = train.with_format("torch")
        validation = validation.with_format("torch")
    return LMData(train, validation, block_size, tokens_per_char(texts["validation"], tokenizer), info, path)


def tokens_per_char(texts, tokenizer) -> float:
    """Tokens per character of a text split: converts a per-token loss into bits per character."""
    chars = tokens = 0
    for row in texts:
        chars += len(row["text"])
        tokens += len(tokenizer(row["text"], add_special_tokens=False, verbose=False)["input_ids"])
    if chars == 0:
        raise ValueError("the validation split is empty")
    return tokens / chars


def bits_per_character(loss_nats_per_token: float, tokens_per_char_ratio: float) -> float:
    """bpc = loss (nats/token) / ln 2 * tokens/character; equals loss / ln 2 for a character tokenizer."""
    return loss_nats_per_token / math.log(2) * tokens_per_char_ratio
