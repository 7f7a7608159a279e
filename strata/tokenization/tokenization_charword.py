"""CharWordTokenizer: one id per character, plus the word each character belongs to.

Design (Tiny-ONN, seed 004 section 2.2-2.3): a small character vocabulary (~20k covers
Chinese and Latin) feeds `char_embed`; a separate word vocabulary feeds `word_embed`,
aligned with the characters, so the model sees both levels at its first layer.

Ids of the character vocabulary:

    0 <pad>   1 <bos>   2 <eos>   3 <unk>      specials (<unk> only appears in word ids)
    4 .. 259  <0x00> .. <0xFF>                 byte fallback
    260 ..    single characters, most frequent first

A character outside the vocabulary becomes the UTF-8 bytes of that character, so
`decode(encode(s)) == s` for every Python string, lone surrogates included (they are
written with the `surrogatepass` rule: U+D800 -> ED A0 80).

The word vocabulary starts with the same four specials. Words are: runs of letters,
digits, apostrophes and combining marks (any script but Han); runs of whitespace;
every other character alone; runs of Han characters are cut by jieba (HMM off).
`word_ids` numbers the words of each sequence from 0 (-1 on special tokens and
padding), `word_token_ids` is the word's id in the word vocabulary (`<unk>` if absent);
on special tokens and padding `word_token_ids` equals `input_ids` (<pad> 0, <bos> 1,
<eos> 2, <unk> 3; any other special token gets 0).

This file is copied alone into saved tokenizer folders (remote code): it imports
only the standard library, numpy, transformers and jieba.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import json
import logging
import os
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import repeat
from typing import NamedTuple

import numpy as np
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken, BatchEncoding, TruncationStrategy
from transformers.utils import PaddingStrategy

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json", "word_vocab_file": "word_vocab.json"}

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BYTE_OFFSET = len(SPECIAL_TOKENS)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
FIRST_CHAR_ID = BYTE_OFFSET + 256  # 260
MAX_CODE_POINT = 0x10FFFF

# Han ideographs: CJK unified (BMP, extension A), compatibility ideographs, planes 2-3.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U000323af"
_HAN_RUN = re.compile(f"([{_HAN}]+)")
_APOSTROPHES = "'\u2019"
_SURROGATE_ESCAPES = re.compile("[\udc80-\udcff]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_DECODE_ERRORS = "strata.charword"

logger = logging.getLogger(__name__)


def _decode_error_handler(exc):
    """UTF-8 decoding of byte tokens: lone surrogates come back (surrogatepass);
    byte sequences that are not UTF-8 at all (a model can emit them) become U+FFFD."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    try:
        return codecs.lookup_error("surrogatepass")(exc)
    except UnicodeDecodeError:
        return codecs.lookup_error("replace")(exc)


codecs.register_error(_DECODE_ERRORS, _decode_error_handler)


# ---------------------------------------------------------------------------------
# Word segmentation
# ---------------------------------------------------------------------------------

_JIEBA = None
_LOCK = threading.Lock()
_BASIC_MARKS = "\u0300-\u036f"  # combining diacritics of decomposed Latin, Greek, Cyrillic


def _unit_pattern(joiners: str) -> re.Pattern:
    """A unit of non-Han text: a run of letters/digits (`str.isalnum`, Han excluded) and
    joiners (apostrophes, combining marks), a run of whitespace, or any other character.
    `L+(?:J+L*)*|J+(?:L+J*)*` is `(?:L|J)+` unrolled, which `re` runs twice as fast."""
    letter, joiner = f"[^\\W_{_HAN}]", f"[{_APOSTROPHES}{joiners}]"
    return re.compile(f"{letter}+(?:{joiner}+{letter}*)*|{joiner}+(?:{letter}+{joiner}*)*|\\s+|.", re.DOTALL)


# ASCII text: the same units (letters and digits are [A-Za-z0-9], the one joiner is ').
_ASCII_UNITS = re.compile(r"[A-Za-z0-9']+|\s+|.", re.DOTALL)
_BASIC_UNITS = _unit_pattern(_BASIC_MARKS)
_FULL_UNITS = None  # every combining mark as a joiner; built on first need
_OTHER_MARKS = None  # (bool table over code points, set of characters): marks beyond _BASIC_MARKS
_SHORT_UNITS: dict[str, list[str]] = {}  # units of short non-Han pieces ("，", "。\n\n", ...)


def _full_units() -> tuple[re.Pattern, tuple[np.ndarray, frozenset]]:
    """`re` tests a class of hundreds of ranges slowly (~0.2 us per character), so the
    pattern with every combining mark is used only for text that holds such a mark."""
    global _FULL_UNITS, _OTHER_MARKS
    if _FULL_UNITS is None:
        with _LOCK:
            if _FULL_UNITS is None:
                category = unicodedata.category
                marks = np.fromiter(
                    (category(c)[0] == "M" for c in map(chr, range(MAX_CODE_POINT + 1))),
                    dtype=bool,
                    count=MAX_CODE_POINT + 1,
                )
                edges = np.flatnonzero(np.diff(np.concatenate([[False], marks, [False]]).astype(np.int8)))
                ranges = zip(edges[0::2].tolist(), (edges[1::2] - 1).tolist())
                body = "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges)
                other = marks.copy()
                other[0x300:0x370] = False
                _OTHER_MARKS = (other, frozenset(map(chr, np.flatnonzero(other).tolist())))
                _FULL_UNITS = _unit_pattern(body)
    return _FULL_UNITS, _OTHER_MARKS


def _units_of(text: str) -> list[str]:
    """Units of text that holds no Han character."""
    if text.isascii():
        return _ASCII_UNITS.findall(text)
    full, (other_table, other_set) = _full_units()
    if len(text) < 256:
        has_other_marks = not other_set.isdisjoint(text)
    else:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        has_other_marks = bool(other_table[cps].any())
    return (full if has_other_marks else _BASIC_UNITS).findall(text)


def _jieba():
    """A private jieba.Tokenizer with the default dictionary, loaded once per process.
    Private, so `jieba.add_word` calls elsewhere never change this tokenizer's words."""
    global _JIEBA
    if _JIEBA is None:
        with _LOCK:
            if _JIEBA is None:
                import jieba

                jieba.setLogLevel(logging.WARNING)
                segmenter = jieba.Tokenizer()
                segmenter.initialize()
                _JIEBA = segmenter
    return _JIEBA


def _cut_han_runs(runs: list[str]) -> list[str]:
    """jieba (HMM off, deterministic) over runs of Han characters, in one call: the words
    of each run, runs separated by a "\n" item."""
    segmenter = _jieba()
    joined = "\n".join(runs)
    words = segmenter.lcut(joined, HMM=False)
    # jieba yields every "\n" alone and no word holds one, so the "\n" items separate the
    # runs; checked (cheaply) all the same, the per-run fallback costs only speed.
    if words.count("\n") != len(runs) - 1 or sum(map(len, words)) != len(joined):
        words = []
        for run in runs:
            words += segmenter.lcut(run, HMM=False)
            words.append("\n")
        words.pop()
    return words


def split_words(text: str) -> list[str]:
    """Cut `text` into the word units of `word_ids`; `"".join(split_words(text)) == text`.

    - a run of Han characters (CJK unified ideographs, extensions, compatibility
      ideographs) is cut by jieba, accurate mode without HMM (dictionary words only, so
      the result never depends on statistics of the input);
    - a run of letters and digits of any other script (`str.isalnum`), apostrophes
      (' and U+2019) and combining marks is one word: "It's", "naïve", "नमस्ते";
    - a run of whitespace is one unit ("\\r\\n\\t  ");
    - every other character (punctuation, symbols, emoji, "_", controls) is a unit alone.
    """
    return split_words_batch([text])[0]


def split_words_batch(texts: list[str]) -> list[list[str]]:
    """`split_words` of each text, with one jieba call for the Han runs of all of them."""
    layouts, runs = [], []
    for text in texts:
        parts = None if text.isascii() else _HAN_RUN.split(text)
        layouts.append(parts)
        if parts is not None and len(parts) > 1:
            runs += parts[1::2]
    words = _cut_han_runs(runs) if runs else []
    find, start, runs_left = words.index, 0, len(runs)
    cache = _SHORT_UNITS
    result = []
    for text, parts in zip(texts, layouts):
        if parts is None:
            result.append(_ASCII_UNITS.findall(text))
            continue
        if len(parts) == 1:
            result.append(_units_of(text))
            continue
        units = []
        for i, part in enumerate(parts):  # other text, Han run, other text, ..., other text
            if i % 2:
                runs_left -= 1
                end = find("\n", start) if runs_left else len(words)
                units += words[start:end]
                start = end + 1
            elif part:
                got = cache.get(part)
                if got is None:
                    got = _units_of(part)
                    if len(part) <= 16:
                        if len(cache) >= 4096:
                            cache.clear()
                        cache[part] = got
                units += got
        result.append(units)
    return result


# ---------------------------------------------------------------------------------
# Vocabulary files
# ---------------------------------------------------------------------------------


def _check_vocab(vocab, what: str, word_level: bool) -> dict[str, int]:
    """Validate a token -> id mapping; raise ValueError naming `what` and the problem."""
    if not isinstance(vocab, Mapping):
        raise ValueError(f"{what}: expected a JSON object mapping token -> id, got {type(vocab).__name__}")
    for token, index in vocab.items():
        if not isinstance(token, str) or not token:
            raise ValueError(f"{what}: every token must be a non-empty string, got {token!r}")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"{what}: the id of {token!r} must be an integer, got {index!r}")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{what}: ids must be 0 .. {len(ids) - 1} without gaps or repeats")
    by_id = {index: token for token, index in vocab.items()}
    expected = SPECIAL_TOKENS if word_level else SPECIAL_TOKENS + BYTE_TOKENS
    for index, token in enumerate(expected[: len(ids)]):
        if by_id[index] != token:
            raise ValueError(f"{what}: id {index} must be {token!r}, found {by_id[index]!r}")
    if len(ids) < len(expected):
        raise ValueError(f"{what}: has {len(ids)} entries, fewer than the {len(expected)} reserved tokens")
    if not word_level:
        for index in range(FIRST_CHAR_ID, len(ids)):
            token = by_id[index]
            if len(token) != 1:
                raise ValueError(f"{what}: id {index} must be a single character, found {token!r}")
            if 0xD800 <= ord(token) <= 0xDFFF:
                raise ValueError(f"{what}: id {index} is a lone surrogate, which cannot be a vocabulary entry")
    return dict(vocab)


def _load_vocab_file(path, what: str, word_level: bool) -> dict[str, int]:
    if path is None:
        raise ValueError(f"CharWordTokenizer needs a {what} ({VOCAB_FILES_NAMES[what]}), none was given or found")
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not a valid JSON vocabulary: {e}") from e
    return _check_vocab(vocab, f"{what} {path}", word_level)


# ---------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _gc_paused():
    """Batch encoding makes a few small lists per sequence next to lists of millions of
    ints; the cyclic collector, triggered by the small ones, keeps walking the big ones
    (3x the encoding time). Nothing made here forms a cycle, so pause it meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_COLUMNS = ("ids", "word_ids", "word_token_ids", "offsets")


class _Layout(NamedTuple):
    """What `_encode_plus` asked for, computed once per call."""

    prefix: list
    suffix: list
    prefix_words: list
    suffix_words: list
    truncate: bool
    truncation_strategy: TruncationStrategy
    max_length: int | None
    stride: int
    token_type_ids: bool
    special_tokens_mask: bool
    overflowing: bool
    length: bool


def _wrap(prefix: list, seqs: list[list], suffix: list) -> list:
    """prefix + seq + suffix for each sequence, concatenated."""
    if not prefix and not suffix and len(seqs) == 1:
        return seqs[0]
    out = []
    for seq in seqs:
        out += prefix
        out += seq
        out += suffix
    return out


def _as_arrays(columns: dict, return_tensors, prepend_batch_axis: bool) -> dict:
    """Rectangular int columns straight to numpy/torch (BatchEncoding's own conversion
    walks every element in Python); anything else is left to BatchEncoding."""
    if return_tensors not in ("pt", "np"):
        return columns
    out = {}
    for key, value in columns.items():
        if key in ("overflowing_tokens", "num_truncated_tokens"):
            out[key] = value
            continue
        if prepend_batch_axis and isinstance(value, int):  # `length` of one sequence
            value = [value]
            prepend = False
        else:
            prepend = prepend_batch_axis
        rows = [value] if prepend else value
        if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != len(rows[0]) for r in rows):
            out[key] = value  # ragged: BatchEncoding raises its usual error
            continue
        array = np.array(rows, dtype=np.int64)
        if array.ndim == 1:  # no rows, or rows that are not lists of ints
            out[key] = value
            continue
        if array.size == 0 and key == "offset_mapping":
            array = array.reshape(len(rows), 0, 2)
        if return_tensors == "pt":
            import torch

            array = torch.from_numpy(array)
        out[key] = array
    return out


class CharWordTokenizer(PreTrainedTokenizer):
    """Character tokenizer with byte fallback and aligned word ids (see module docstring).

    Args:
        vocab_file / word_vocab_file: JSON files token -> id (what `save_pretrained` writes).
        vocab / word_vocab: the same mappings in memory (used by `train`); they win over files.
        add_bos_token / add_eos_token: put `<bos>` before / `<eos>` after each sequence when
            `add_special_tokens=True` (the default of `__call__`). Both default to False.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file=None,
        word_vocab_file=None,
        vocab: Mapping[str, int] | None = None,
        word_vocab: Mapping[str, int] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        **kwargs,
    ):
        if vocab is not None:
            self._vocab = _check_vocab(vocab, "vocab", word_level=False)
        else:
            self._vocab = _load_vocab_file(vocab_file, "vocab_file", word_level=False)
        if word_vocab is not None:
            self._word_vocab = _check_vocab(word_vocab, "word_vocab", word_level=True)
        else:
            self._word_vocab = _load_vocab_file(word_vocab_file, "word_vocab_file", word_level=True)
        self._id_to_token = [None] * len(self._vocab)
        for token, index in self._vocab.items():
            self._id_to_token[index] = token
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self._lut = self._build_lut()
        self._pieces: list[str] = []
        self._added_re = None
        self._added_first_chars = ""
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("split_special_tokens", False)
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            add_bos_token=self.add_bos_token,
            add_eos_token=self.add_eos_token,
            **kwargs,
        )
        self._refresh_added_tokens()

    # -- vocabulary ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the character vocabulary (specials + 256 bytes + characters)."""
        return len(self._vocab)

    @property
    def word_vocab_size(self) -> int:
        """Size of the word vocabulary (the `word_embed` table of a model)."""
        return len(self._word_vocab)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._vocab)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_word_vocab(self) -> dict[str, int]:
        return dict(self._word_vocab)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, UNK_ID)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < len(self._id_to_token):
            raise ValueError(f"token id {index} is out of range for a vocabulary of {len(self)} tokens")
        return self._id_to_token[index]

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        added = super()._add_tokens(new_tokens, special_tokens=special_tokens)
        if "_lut" in self.__dict__:  # the base __init__ adds the specials before we are ready
            self._refresh_added_tokens()
        return added

    def _refresh_added_tokens(self):
        """Rebuild the decode table and the splitter for tokens matched whole in text."""
        pieces = list(self._id_to_token)
        for b in range(256):  # ASCII bytes are their character; the others surrogate-escaped
            pieces[BYTE_OFFSET + b] = chr(b) if b < 0x80 else chr(0xDC00 + b)
        for index, token in sorted(self._added_tokens_decoder.items()):
            if index >= len(pieces):
                pieces.extend([""] * (index + 1 - len(pieces)))
            pieces[index] = token.content
        self._pieces = pieces
        contents = sorted({t.content for t in self._added_tokens_decoder.values() if t.content}, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        self._added_first_chars = "".join(sorted({c[0] for c in contents}))
        self._special_word_ids = {}
        for index in self.all_special_ids:
            token = self._pieces[index] if index < len(self._pieces) else None
            self._special_word_ids[index] = self._word_vocab.get(token, PAD_ID) if token in SPECIAL_TOKENS else PAD_ID

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lut", None)  # 4 MB; rebuilt from the vocabulary
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lut = self._build_lut()

    def _build_lut(self) -> np.ndarray:
        """Code point -> character id, -1 where the character is not in the vocabulary."""
        lut = np.full(MAX_CODE_POINT + 1, -1, dtype=np.int32)
        chars = self._id_to_token[FIRST_CHAR_ID:]
        lut[[ord(c) for c in chars]] = np.arange(FIRST_CHAR_ID, len(self._id_to_token), dtype=np.int32)
        return lut

    # -- the fast core: characters -> ids ------------------------------------------

    def _char_ids(self, text: str):
        """ids (int64 array) of `text`, and the number of tokens per character
        (None when every character is in the vocabulary)."""
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = self._lut[cps].astype(np.int64)
        missing = ids < 0
        if not missing.any():
            return ids, None
        missing_cps = cps[missing]
        n_bytes = 1 + (missing_cps >= 0x80).astype(np.int64) + (missing_cps >= 0x800) + (missing_cps >= 0x10000)
        counts = np.ones(len(ids), dtype=np.int64)
        counts[missing] = n_bytes
        out = np.repeat(ids, counts)
        raw = missing_cps.tobytes().decode("utf-32-le", "surrogatepass").encode("utf-8", "surrogatepass")
        out[out < 0] = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        return out, counts

    def _word_lookup(self, units: list[str]) -> np.ndarray:
        wv = self._word_vocab
        return np.fromiter(map(wv.get, units, repeat(UNK_ID)), dtype=np.int64, count=len(units))

    def _encode_plain(self, pieces: list[str], words: bool, offsets: bool) -> list[dict]:
        """Encode texts that hold no added token, all in one vectorised pass.
        Returns per piece {"ids", "word_ids"?, "word_token_ids"?, "offsets"?} as lists."""
        if not pieces:
            return []
        joined = "".join(pieces)
        char_lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        char_bounds = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(char_lens, out=char_bounds[1:])
        ids, counts = self._char_ids(joined)
        if counts is None:
            tok_bounds = char_bounds
        else:
            cum = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=cum[1:])
            tok_bounds = cum[char_bounds]
        columns = {"ids": ids}
        if words or offsets:
            piece_of_char = np.repeat(np.arange(len(pieces)), char_lens)
        if words:
            units, units_per_piece = [], []
            for piece_units in split_words_batch(pieces):
                units += piece_units
                units_per_piece.append(len(piece_units))
            unit_lens = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
            if unit_lens.sum() != len(joined):
                raise RuntimeError("word segmentation lost characters; please report this input")
            unit_starts = np.zeros(len(pieces), dtype=np.int64)
            np.cumsum(units_per_piece[:-1], out=unit_starts[1:])
            word_ids = np.repeat(np.arange(len(units), dtype=np.int64), unit_lens) - unit_starts[piece_of_char]
            word_tok = np.repeat(self._word_lookup(units), unit_lens)
            columns["word_ids"] = word_ids
            columns["word_token_ids"] = word_tok
        if offsets:
            columns["offsets"] = np.arange(len(joined), dtype=np.int64) - char_bounds[:-1][piece_of_char]
        if counts is not None:
            for key in columns:
                if key != "ids":
                    columns[key] = np.repeat(columns[key], counts)
        lists = {key: col.tolist() for key, col in columns.items()}
        if offsets:
            lists["offsets"] = list(zip(lists["offsets"], [o + 1 for o in lists["offsets"]]))
        if len(pieces) == 1:
            return [lists]
        bounds = tok_bounds.tolist()
        return [{key: lst[a:b] for key, lst in lists.items()} for a, b in zip(bounds, bounds[1:])]

    def _split_added(self, text: str, split_special_tokens: bool) -> list[str] | None:
        """Pieces of `text` around whole added/special tokens (odd indices), or None."""
        if split_special_tokens or self._added_re is None:
            return None
        if not any(c in text for c in self._added_first_chars):
            return None
        parts = self._added_re.split(text)
        return parts if len(parts) > 1 else None

    def _encode_texts(self, texts: list[str], words: bool, offsets: bool, split_special_tokens: bool):
        """Encode strings; added tokens written in the text map to their own id."""
        layouts, pieces = [], []
        for text in texts:
            parts = self._split_added(text, split_special_tokens)
            if parts is None:
                layouts.append(None)
                pieces.append(text)
            else:
                layouts.append(parts)
                pieces.extend(parts[0::2])
        encoded = self._encode_plain(pieces, words, offsets)
        results, k = [], 0
        special = self._special_word_ids
        for parts in layouts:
            if parts is None:
                results.append(encoded[k])
                k += 1
                continue
            item = {key: [] for key in encoded[k]}
            n_words, char_pos = 0, 0
            for i, part in enumerate(parts):
                if i % 2 == 0:
                    sub = encoded[k]
                    k += 1
                    item["ids"] += sub["ids"]
                    if words:
                        item["word_ids"] += [w + n_words for w in sub["word_ids"]]
                        item["word_token_ids"] += sub["word_token_ids"]
                        n_words += (sub["word_ids"][-1] + 1) if sub["word_ids"] else 0
                    if offsets:
                        item["offsets"] += [(a + char_pos, b + char_pos) for a, b in sub["offsets"]]
                else:
                    index = self._added_tokens_encoder[part]
                    item["ids"].append(index)
                    if words:
                        if index in special:
                            item["word_ids"].append(-1)
                            item["word_token_ids"].append(special[index])
                        else:
                            item["word_ids"].append(n_words)
                            item["word_token_ids"].append(self._word_vocab.get(part, UNK_ID))
                            n_words += 1
                    if offsets:
                        item["offsets"].append((char_pos, char_pos + len(part)))
                char_pos += len(part)
            results.append(item)
        return results

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        ids, _ = self._char_ids(text)
        return [self._id_to_token[i] for i in ids.tolist()]

    # -- word ids of given ids (generation) ----------------------------------------

    def compute_word_ids(self, token_ids):
        """`word_ids` and `word_token_ids` for a sequence of ids, by decoding and cutting
        the text into words again (what a model needs after generating new characters).

        Accepts a list of ints, or a 1-D/2-D numpy array or torch tensor (then returns the
        same type and shape, batches row by row). Returns a dict with both keys.
        """
        if hasattr(token_ids, "tolist") and not isinstance(token_ids, list):
            rows = token_ids.tolist()
            batched = isinstance(rows, list) and bool(rows) and isinstance(rows[0], list)
            seqs = rows if batched else [rows]
            out = [self._word_ids_of_ids(seq) for seq in seqs]
            result = {}
            for key in ("word_ids", "word_token_ids"):
                values = [o[key] for o in out] if batched else out[0][key]
                if type(token_ids).__module__.startswith("torch"):
                    import torch

                    result[key] = torch.tensor(values, dtype=torch.long, device=token_ids.device)
                else:
                    result[key] = np.asarray(values, dtype=np.int64)
            return result
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            out = [self._word_ids_of_ids(list(seq)) for seq in token_ids]
            return {key: [o[key] for o in out] for key in ("word_ids", "word_token_ids")}
        return self._word_ids_of_ids(list(token_ids))

    def compute_word_token_ids(self, token_ids):
        """Only the `word_token_ids` of `compute_word_ids`."""
        return self.compute_word_ids(token_ids)["word_token_ids"]

    def _word_ids_of_ids(self, ids: list[int]) -> dict:
        for kind in set(map(type, ids)) - {int}:
            if not issubclass(kind, np.integer) or issubclass(kind, bool):
                raise TypeError(f"token ids must be integers, got {kind.__name__}")
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        word_ids, word_tok = [-1] * len(ids), [PAD_ID] * len(ids)
        added = self._added_tokens_decoder
        special = self._special_word_ids
        array = np.asarray(ids, dtype=np.int64)
        # added/special tokens cut the ids into runs of character and byte ids
        cuts = np.flatnonzero((array < BYTE_OFFSET) | (array >= len(self._vocab))).tolist()
        n_words, start = 0, 0
        for end in cuts + [len(ids)]:
            if end > start:
                w_ids, w_tok = self._run_word_ids(ids[start:end])
                word_ids[start:end] = [w + n_words for w in w_ids]
                word_tok[start:end] = w_tok
                n_words += max(w_ids) + 1
            if end < len(ids):
                index = ids[end]
                if index in special:
                    word_tok[end] = special[index]
                else:
                    word_ids[end] = n_words
                    content = added[index].content if index in added else None
                    word_tok[end] = self._word_vocab.get(content, UNK_ID)
                    n_words += 1
            start = end + 1
        return {"word_ids": word_ids, "word_token_ids": word_tok}

    def _run_word_ids(self, run: list[int]) -> tuple[list[int], list[int]]:
        """Word ids of ids that are characters or bytes only."""
        text = self._decode_ids(run)
        enc = self._encode_plain([text], words=True, offsets=False)[0]
        if enc["ids"] == run:  # canonical encoding: aligned one to one
            return enc["word_ids"], enc["word_token_ids"]
        # Not what encode gives (bytes of an in-vocabulary character, broken UTF-8): group
        # the bytes as UTF-8 reads them, decode each group, give its tokens the word of
        # its first character.
        chunks = self._utf8_chunks(run)
        text = "".join(piece for _, piece in chunks)
        units = split_words(text)
        unit_lens = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
        unit_of_char = np.repeat(np.arange(len(units)), unit_lens).tolist()
        unit_tok = self._word_lookup(units).tolist()
        w_ids, w_tok = [0] * len(run), [0] * len(run)
        char = 0
        for positions, piece in chunks:
            for pos in positions:
                w_ids[pos] = unit_of_char[char]
                w_tok[pos] = unit_tok[unit_of_char[char]]
            char += len(piece)
        return w_ids, w_tok

    def _utf8_chunks(self, run: list[int]) -> list[tuple[list[int], str]]:
        """Split character/byte ids into (token positions, decoded text) chunks: one per
        character token, one per UTF-8 byte sequence (a lead byte and its continuations)."""
        chunks, group, expect = [], [], 0

        def flush():
            if group:
                data = bytes(run[p] - BYTE_OFFSET for p in group)
                chunks.append((list(group), data.decode("utf-8", _DECODE_ERRORS)))
                group.clear()

        for pos, index in enumerate(run):
            if not BYTE_OFFSET <= index < FIRST_CHAR_ID:
                flush()
                chunks.append(([pos], self._pieces[index]))
                expect = 0
                continue
            byte = index - BYTE_OFFSET
            if expect and 0x80 <= byte < 0xC0:
                group.append(pos)
                expect -= 1
            else:
                flush()
                group.append(pos)
                expect = 1 if 0xC0 <= byte < 0xE0 else 2 if 0xE0 <= byte < 0xF0 else 3 if 0xF0 <= byte < 0xF8 else 0
            if not expect:
                flush()
        flush()
        return chunks

    # -- special tokens ------------------------------------------------------------

    def _specials(self) -> tuple[list[int], list[int]]:
        prefix = [self.bos_token_id] if self.add_bos_token else []
        suffix = [self.eos_token_id] if self.add_eos_token else []
        return prefix, suffix

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        prefix, suffix = self._specials()
        out = prefix + list(token_ids_0) + suffix
        if token_ids_1 is not None:
            out += prefix + list(token_ids_1) + suffix
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when the ids already hold special tokens")
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in token_ids_0]
        prefix, suffix = self._specials()
        mask = [1] * len(prefix) + [0] * len(token_ids_0) + [1] * len(suffix)
        if token_ids_1 is not None:
            mask += [1] * len(prefix) + [0] * len(token_ids_1) + [1] * len(suffix)
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        prefix, suffix = self._specials()
        first = [0] * (len(prefix) + len(token_ids_0) + len(suffix))
        if token_ids_1 is None:
            return first
        return first + [1] * (len(prefix) + len(token_ids_1) + len(suffix))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        n = int(self.add_bos_token) + int(self.add_eos_token)
        return 2 * n if pair else n

    # -- encoding --------------------------------------------------------------------

    def _encode_plus(self, *args, **kwargs) -> BatchEncoding:
        with _gc_paused():
            return self._encode_all(*args, **kwargs)

    def _encode_all(
        self,
        text,
        text_pair=None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors=None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        split_special_tokens: bool | None = None,
        return_word_ids: bool = False,
        **kwargs,
    ) -> BatchEncoding:
        kwargs.pop("add_bos_token", None)
        kwargs.pop("add_eos_token", None)
        kwargs.pop("sanitize_control_tokens", None)
        if kwargs:  # as the transformers tokenizers do: say so, go on
            logger.warning(f"CharWordTokenizer ignores the keyword arguments {sorted(kwargs)}")
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
        batched = self._is_batch(text, is_split_into_words)
        if batched:
            texts = list(text)
            if text_pair is not None:
                if not isinstance(text_pair, (list, tuple)) or len(text_pair) != len(texts):
                    raise ValueError("If `text` is a batch, `text_pair` must be a batch of the same length")
                pairs = list(text_pair)
            else:
                pairs = [None] * len(texts)
                for k, item in enumerate(texts):  # (text, pair) tuples inside a batch
                    if isinstance(item, tuple) and len(item) == 2 and not is_split_into_words:
                        texts[k], pairs[k] = item
        else:
            texts, pairs = [text], [text_pair]

        # Encode every string of the batch in one pass, keep ids/words given as lists.
        sequences = texts + [p for p in pairs if p is not None]
        strings = []
        for k, seq in enumerate(sequences):
            self._check_input(seq, is_split_into_words)
            if isinstance(seq, str):
                strings.append(seq)
            elif is_split_into_words:
                strings.extend(seq)
        encoded_strings = iter(
            self._encode_texts(strings, return_word_ids, return_offsets_mapping, split_special_tokens)
        )
        encoded = []
        for seq in sequences:
            if isinstance(seq, str):
                encoded.append(next(encoded_strings))
            elif is_split_into_words:
                encoded.append(self._join_words(seq, [next(encoded_strings) for _ in seq], return_word_ids))
            else:  # ids given
                if return_offsets_mapping:
                    raise ValueError("return_offsets_mapping needs text input, not token ids")
                item = {"ids": list(seq)}
                if return_word_ids:
                    w = self._word_ids_of_ids(item["ids"])
                    item["word_ids"], item["word_token_ids"] = w["word_ids"], w["word_token_ids"]
                encoded.append(item)
        firsts = encoded[: len(texts)]
        seconds = iter(encoded[len(texts) :])
        prefix, suffix = self._specials() if add_special_tokens else ([], [])
        special = self._special_word_ids
        layout = _Layout(
            prefix=prefix,
            suffix=suffix,
            prefix_words=[special.get(i, PAD_ID) for i in prefix],
            suffix_words=[special.get(i, PAD_ID) for i in suffix],
            truncate=truncation_strategy != TruncationStrategy.DO_NOT_TRUNCATE and bool(max_length),
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            stride=stride,
            token_type_ids=bool(return_token_type_ids)
            or (return_token_type_ids is None and "token_type_ids" in self.model_input_names),
            special_tokens_mask=return_special_tokens_mask,
            overflowing=return_overflowing_tokens and not return_tensors,
            length=return_length,
        )
        examples = [
            self._prepare_example(first, next(seconds) if pair is not None else None, layout)
            for first, pair in zip(firsts, pairs)
        ]
        for example in examples:
            self._eventual_warn_about_too_long_sequence(example["input_ids"], max_length, verbose)
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = max((len(e["input_ids"]) for e in examples), default=0)
            padding_strategy = PaddingStrategy.MAX_LENGTH
        for example in examples:
            self._pad(
                example,
                max_length=max_length,
                padding_strategy=padding_strategy,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_attention_mask=return_attention_mask,
            )
        if not batched:
            return BatchEncoding(_as_arrays(examples[0], return_tensors, True), tensor_type=return_tensors)
        if not examples:  # an empty batch: the keys a batch would have, without rows
            keys = ["input_ids"] + ["attention_mask"] * bool(return_attention_mask)
            keys += ["word_ids", "word_token_ids"] * bool(return_word_ids)
            return BatchEncoding({key: [] for key in keys}, tensor_type=return_tensors)
        batch = {key: [e[key] for e in examples] for key in examples[0]}
        return BatchEncoding(_as_arrays(batch, return_tensors, False), tensor_type=return_tensors)

    @staticmethod
    def _is_batch(text, is_split_into_words: bool) -> bool:
        if not isinstance(text, (list, tuple)):
            return False
        if not text:
            return True
        if is_split_into_words:
            return isinstance(text[0], (list, tuple))
        return isinstance(text[0], (str, list, tuple))

    @staticmethod
    def _check_input(seq, is_split_into_words: bool):
        if isinstance(seq, str):
            return
        if isinstance(seq, (list, tuple)):
            if is_split_into_words:
                if all(isinstance(w, str) for w in seq):
                    return
                raise TypeError("with is_split_into_words=True every word must be a str")
            if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in seq):
                return
            bad = next(i for i in seq if not isinstance(i, (int, np.integer)) or isinstance(i, bool))
            raise TypeError(
                f"CharWordTokenizer encodes str, a list of str (a batch) or a list of int ids; "
                f"found an element of type {type(bad).__name__} in a list"
            )
        raise TypeError(
            f"CharWordTokenizer encodes str, a list of str (a batch) or a list of int ids, got {type(seq).__name__}"
        )

    def _join_words(self, word_list: list[str], parts: list[dict], words: bool) -> dict:
        """Pre-split input: word i of the list is word i of the sequence."""
        item = {"ids": [i for p in parts for i in p["ids"]]}
        if words:
            item["word_ids"] = [i for i, p in enumerate(parts) for _ in p["ids"]]
            wv = self._word_vocab
            item["word_token_ids"] = [wv.get(w, UNK_ID) for w, p in zip(word_list, parts) for _ in p["ids"]]
        if parts and "offsets" in parts[0]:
            item["offsets"] = [o for p in parts for o in p["offsets"]]
        return item

    def _prepare_example(self, first: dict, second: dict | None, layout: _Layout) -> dict:
        """Truncate (all aligned columns together), add special tokens, build the keys."""
        prefix, suffix = layout.prefix, layout.suffix
        n_special = (len(prefix) + len(suffix)) * (1 if second is None else 2)
        total = len(first["ids"]) + (len(second["ids"]) if second is not None else 0) + n_special
        overflowing = []
        if layout.truncate and total > layout.max_length:
            keys = [k for k in _COLUMNS if k in first]
            rows_a = list(zip(*(first[k] for k in keys)))
            rows_b = list(zip(*(second[k] for k in keys))) if second is not None else None
            rows_a, rows_b, overflowing = self.truncate_sequences(
                rows_a,
                pair_ids=rows_b,
                num_tokens_to_remove=total - layout.max_length,
                truncation_strategy=layout.truncation_strategy,
                stride=layout.stride,
            )
            first = {k: [r[j] for r in rows_a] for j, k in enumerate(keys)}
            if second is not None:
                second = {k: [r[j] for r in rows_b] for j, k in enumerate(keys)}
            overflowing = [r[0] for r in overflowing]
        seqs = [first] if second is None else [first, second]
        example = {"input_ids": _wrap(layout.prefix, [s["ids"] for s in seqs], layout.suffix)}
        if layout.token_type_ids:
            example["token_type_ids"] = [
                k for k, s in enumerate(seqs) for _ in range(len(prefix) + len(s["ids"]) + len(suffix))
            ]
        if layout.special_tokens_mask:
            example["special_tokens_mask"] = _wrap(
                [1] * len(prefix), [[0] * len(s["ids"]) for s in seqs], [1] * len(suffix)
            )
        if "word_ids" in first:
            example["word_ids"] = _wrap([-1] * len(prefix), [s["word_ids"] for s in seqs], [-1] * len(suffix))
            example["word_token_ids"] = _wrap(
                layout.prefix_words, [s["word_token_ids"] for s in seqs], layout.suffix_words
            )
        if "offsets" in first:
            example["offset_mapping"] = _wrap(
                [(0, 0)] * len(prefix), [s["offsets"] for s in seqs], [(0, 0)] * len(suffix)
            )
        if layout.overflowing and overflowing:
            example["overflowing_tokens"] = overflowing
            example["num_truncated_tokens"] = total - layout.max_length
        if layout.length:
            example["length"] = len(example["input_ids"])
        return example

    def _pad(
        self,
        encoded_inputs,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        """Pad one example; the word columns get -1 (`word_ids`) and <pad> (`word_token_ids`)."""
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        length = len(encoded_inputs["input_ids"])
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * length
        if padding_strategy == PaddingStrategy.DO_NOT_PAD or max_length is None or length >= max_length:
            return encoded_inputs
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        fills = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": self.pad_token_type_id,
            "special_tokens_mask": 1,
            "word_ids": -1,
            "word_token_ids": PAD_ID,
            "offset_mapping": (0, 0),
        }
        difference = max_length - length
        for key, fill in fills.items():
            if key in encoded_inputs:
                values = list(encoded_inputs[key])
                pad = [fill] * difference
                encoded_inputs[key] = values + pad if side == "right" else pad + values
        return encoded_inputs

    # -- decoding --------------------------------------------------------------------

    def _check_ids(self, ids: list[int]):
        if ids and (min(ids) < 0 or max(ids) >= len(self._pieces)):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {len(self._pieces)} tokens")

    def _decode_ids(self, ids: list[int]) -> str:
        self._check_ids(ids)
        text = "".join(map(self._pieces.__getitem__, ids))
        if _SURROGATE_ESCAPES.search(text) is None:
            return text
        return text.encode("utf-8", "surrogateescape").decode("utf-8", _DECODE_ERRORS)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs):
        if type(token_ids) is list and (not token_ids or type(token_ids[0]) is int):
            # one flat list of ids: skip the base class's element-by-element type walk
            return self._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        ids = token_ids if type(token_ids) is list else list(token_ids)
        for kind in set(map(type, ids)) - {int}:
            if not issubclass(kind, np.integer) or issubclass(kind, bool):
                raise TypeError(f"token ids must be integers, got {kind.__name__}")
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        text = self._decode_ids(ids)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        if len(sequences) == 0:  # an empty batch, not one empty sequence
            return []
        return super().batch_decode(
            sequences,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        ids = []
        for token in tokens:
            index = self._added_tokens_encoder.get(token, self._vocab.get(token))
            if index is None:
                ids.extend(self._char_ids(token)[0].tolist())
            else:
                ids.append(index)
        return self._decode_ids(ids)

    # -- files -----------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary needs an existing directory, got {save_directory}")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        paths = []
        for name, vocab in (("vocab_file", self._vocab), ("word_vocab_file", self._word_vocab)):
            path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES[name])
            ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
            with open(path, "w", encoding="utf-8") as f:
                json.dump(ordered, f, ensure_ascii=False, indent=0)
                f.write("\n")
            paths.append(path)
        return tuple(paths)

    def save_pretrained(self, save_directory, legacy_format=None, filename_prefix=None, push_to_hub=False, **kwargs):
        """Write vocab.json, word_vocab.json, tokenizer_config.json (with `auto_map`) and
        a copy of this module, so the folder loads with `trust_remote_code=True` alone."""
        files = super().save_pretrained(
            save_directory, legacy_format=legacy_format, filename_prefix=filename_prefix, push_to_hub=False, **kwargs
        )
        # transformers 5 drops add_bos_token/add_eos_token from the config it writes.
        config_path = os.path.join(
            str(save_directory), (filename_prefix + "-" if filename_prefix else "") + "tokenizer_config.json"
        )
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["add_bos_token"] = self.add_bos_token
        config["add_eos_token"] = self.add_eos_token
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory))), **kwargs)
        return files

    # -- training --------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 20000,
        word_vocab_size: int = 30000,
        min_frequency: int = 1,
        word_min_frequency: int | None = None,
        **kwargs,
    ) -> CharWordTokenizer:
        """Build a tokenizer from an iterable of strings, read once, one string at a time.

        The character vocabulary holds the 4 specials, the 256 byte tokens and then the
        characters seen at least `min_frequency` times, most frequent first (ties by code
        point), up to `vocab_size` ids in all. The word vocabulary holds the 4 specials and
        the words seen at least `word_min_frequency` (default `min_frequency`) times, up to
        `word_vocab_size`. Extra keyword arguments go to the constructor
        (`add_bos_token=True`, `model_max_length=...`).
        """
        for name, value, low in (
            ("vocab_size", vocab_size, FIRST_CHAR_ID),
            ("word_vocab_size", word_vocab_size, len(SPECIAL_TOKENS)),
            ("min_frequency", min_frequency, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                reason = " (4 special tokens + 256 byte tokens)" if name == "vocab_size" else ""
                raise ValueError(f"{name} must be at least {low}{reason}, got {value}")
        if word_min_frequency is None:
            word_min_frequency = min_frequency
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of strings (e.g. a list or a generator), not one string")
        if not isinstance(texts, Iterable):
            raise TypeError(f"texts must be an iterable of strings, got {type(texts).__name__}")
        chars, words = Counter(), Counter()
        count_words = word_vocab_size > len(SPECIAL_TOKENS)  # else no word is kept: skip the cutting
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must yield str, item {k} is {type(text).__name__}")
            chars.update(text)
            if count_words:
                words.update(split_words(text))
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
        ranked = sorted(
            (c for c, n in chars.items() if n >= min_frequency and not 0xD800 <= ord(c) <= 0xDFFF),
            key=lambda c: (-chars[c], ord(c)),
        )
        for c in ranked[: vocab_size - FIRST_CHAR_ID]:
            vocab[c] = len(vocab)
        word_vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        ranked_words = sorted(
            (
                w
                for w, n in words.items()
                if n >= word_min_frequency and w not in word_vocab and not _SURROGATES.search(w)
            ),
            key=lambda w: (-words[w], w),
        )
        for w in ranked_words[: word_vocab_size - len(SPECIAL_TOKENS)]:
            word_vocab[w] = len(word_vocab)
        return cls(vocab=vocab, word_vocab=word_vocab, **kwargs)


CharWordTokenizer.register_for_auto_class("AutoTokenizer")
