"""CharWordTokenizer: round trip, word ids, HF behaviour, save/load, AutoTokenizer, bad input."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.tokenization import (
    DEFAULT_TOKENIZER_PATH,
    CharWordTokenizer,
    load_default_tokenizer,
    register_tokenizer,
    split_words,
)
from strata.tokenization.tokenization_charword import BYTE_TOKENS, SPECIAL_TOKENS

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEED_EXAMPLE = "我爱 Julia 语言"  # seed 000's data example
# Every code point, lone surrogates included (st.text() alone leaves category Cs out).
ANY_CHAR = st.characters(exclude_categories=()) | st.sampled_from("\ud800\udc80\udfff\r\n\t 😀𠀀e\u0301")
ANY_TEXT = st.text(ANY_CHAR)


@pytest.fixture(scope="module")
def default_tok():
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def small_tok():
    """Trained on two lines; every id below is worked out by hand from the counts.

    characters: " " x3; J a i l u 言 语 x2 (code point order); 我 爱 x1
        -> " " 260, J 261, a 262, i 263, l 264, u 265, 言 266, 语 267, 我 268, 爱 269
    words: " " x3; Julia 语言 x2; 我 爱 x1
        -> " " 4, Julia 5, 语言 6, 我 7, 爱 8
    """
    return CharWordTokenizer.train([SEED_EXAMPLE, "Julia 语言"], vocab_size=1000, word_vocab_size=100)


# -- round trip ----------------------------------------------------------------------

HARD_STRINGS = [
    "",
    "plain ascii",
    "👩‍👩‍👧‍👦 family emoji, 🇫🇷 flag, ❤️ with VS16",
    "CJK extension B 𠀀𠀁 and plane 3 𰀀",
    "e\u0301 combining, Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇ zalgo",
    "controls \x00\x01\x1f\x7f\x85 and BOM \ufeff",
    "CRLF\r\nCR\rLF\n\ttab  two spaces    four",
    "lone surrogates \ud800 \udfff \udc80 and a pair written as two \ud83d\ude00 vs 😀",
    "\U0010ffff private use \ue000",
    "混合 text 和 中文，标点！",
]


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_hard_strings(default_tok, text):
    ids = default_tok(text)["input_ids"]
    assert default_tok.decode(ids) == text
    assert 3 not in ids  # <unk> never stands for a character


def test_surrogate_pair_is_not_the_emoji(default_tok):
    lone_pair = default_tok.encode("\ud83d\ude00")
    emoji = default_tok.encode("😀")
    assert lone_pair != emoji
    assert default_tok.decode(lone_pair) == "\ud83d\ude00"
    assert default_tok.decode(emoji) == "😀"
    byte = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    assert emoji == [byte["<0xF0>"], byte["<0x9F>"], byte["<0x98>"], byte["<0x80>"]]
    # surrogatepass: U+D83D -> ED A0 BD
    assert lone_pair[:3] == [byte["<0xED>"], byte["<0xA0>"], byte["<0xBD>"]]


@PROPERTY
@given(ANY_TEXT)
def test_round_trip_any_text(default_tok, text):
    ids = default_tok(text)["input_ids"]
    assert default_tok.decode(ids) == text
    if "<unk>" not in text:
        assert 3 not in ids


@pytest.fixture(scope="module")
def bos_eos_tok():
    return load_default_tokenizer(add_bos_token=True, add_eos_token=True)


@PROPERTY
@given(st.lists(st.text(ANY_CHAR, max_size=30), max_size=6))
def test_round_trip_batch_with_specials(bos_eos_tok, text_list):
    enc = bos_eos_tok(text_list, padding=True, split_special_tokens=True)
    assert bos_eos_tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == text_list
    for text, row, mask in zip(text_list, enc["input_ids"], enc["attention_mask"]):
        assert bos_eos_tok.decode(row[: sum(mask)]) == "<bos>" + text + "<eos>"


def test_in_vocabulary_text_uses_no_byte_tokens(default_tok, shakespeare):
    ids = np.array(default_tok(shakespeare[:20000])["input_ids"])
    assert ((ids >= 4) & (ids < 260)).sum() == 0
    assert len(ids) == 20000


# -- word segmentation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, units",
    [
        ("Hello, world! It's 42 o'clock.",
         ["Hello", ",", " ", "world", "!", " ", "It's", " ", "42", " ", "o'clock", "."]),
        (SEED_EXAMPLE, ["我", "爱", " ", "Julia", " ", "语言"]),
        ("我来到北京清华大学", ["我", "来到", "北京", "清华大学"]),
        ("Julia语言很好", ["Julia", "语言", "很", "好"]),
        ("他说：“你好！”", ["他", "说", "：", "“", "你好", "！", "”"]),
        ("a  b\r\n\tc...", ["a", "  ", "b", "\r\n\t", "c", ".", ".", "."]),
        ("snake_case don’t", ["snake", "_", "case", " ", "don’t"]),
        ("cafe\u0301 naïve", ["cafe\u0301", " ", "naïve"]),
        ("नमस्ते दुनिया", ["नमस्ते", " ", "दुनिया"]),  # vowel signs (Mc/Mn) stay in the word
        ("𠀀𠀁中文😀", ["𠀀", "𠀁", "中文", "😀"]),
    ],
)
def test_split_words_hand_checked(text, units):
    assert split_words(text) == units


def _reference_units(text):
    """Readable twin of the regexes for text without Han: group letters/digits
    (str.isalnum) with apostrophes and combining marks, group whitespace, rest alone."""
    def kind(c):
        if (c.isalnum() and c != "_") or c in "'\u2019" or unicodedata.category(c)[0] == "M":
            return "word"
        if c.isspace():
            return "space"
        return None

    units = []
    for c in text:
        k = kind(c)
        if units and k is not None and kind(units[-1][0]) == k:
            units[-1] += c
        else:
            units.append(c)
    return units


_NO_HAN = st.text(
    ANY_CHAR.filter(lambda c: not re.match("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U000323af]", c))
    | st.sampled_from("'’\u0301\u093f a1_ \nнаї")
)


@PROPERTY
@given(_NO_HAN)
def test_split_words_matches_reference(text):
    assert split_words(text) == _reference_units(text)


@PROPERTY
@given(st.text(st.sampled_from("我爱北京天安门语言好 Julia,，。\n😀é")))
def test_split_words_mixed_covers_text(text):
    units = split_words(text)
    assert "".join(units) == text
    assert all(units)


# -- word ids ----------------------------------------------------------------------------


def test_small_vocab_is_as_worked_out(small_tok):
    chars = " Jailu言语我爱"
    assert [small_tok.convert_tokens_to_ids(c) for c in chars] == list(range(260, 270))
    assert len(small_tok) == 270
    words = {" ": 4, "Julia": 5, "语言": 6, "我": 7, "爱": 8}
    assert small_tok.get_word_vocab() == {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, **words}


def test_word_ids_seed_example(small_tok):
    enc = small_tok(SEED_EXAMPLE, return_word_ids=True)
    #                     我   爱   ' '  J    u    l    i    a    ' '  语   言
    assert enc["input_ids"] == [268, 269, 260, 261, 265, 264, 263, 262, 260, 267, 266]
    assert enc["word_ids"] == [0, 1, 2, 3, 3, 3, 3, 3, 4, 5, 5]
    assert enc["word_token_ids"] == [7, 8, 4, 5, 5, 5, 5, 5, 4, 6, 6]


def test_word_ids_seed_block_with_eos_and_pad(small_tok):
    """Seed 000: the block ends with <EOS>, then <PAD>, and the loss mask is 0 on <PAD>."""
    tok = CharWordTokenizer(vocab=small_tok.get_vocab(), word_vocab=small_tok.get_word_vocab(), add_eos_token=True)
    enc = tok(SEED_EXAMPLE, return_word_ids=True, padding="max_length", max_length=13)
    assert enc["input_ids"] == [268, 269, 260, 261, 265, 264, 263, 262, 260, 267, 266, 2, 0]
    assert enc["attention_mask"] == [1] * 12 + [0]
    assert enc["word_ids"] == [0, 1, 2, 3, 3, 3, 3, 3, 4, 5, 5, -1, -1]
    assert enc["word_token_ids"] == [7, 8, 4, 5, 5, 5, 5, 5, 4, 6, 6, 2, 0]


def test_unknown_words_and_byte_fallback_share_word(small_tok):
    enc = small_tok("Julia 😀x", return_word_ids=True)
    #                      J..a (5)     ' '  F0 9F 98 80         x  (x is not in the vocabulary: 1 byte)
    assert enc["input_ids"][5:] == [260, 4 + 0xF0, 4 + 0x9F, 4 + 0x98, 4 + 0x80, 4 + ord("x")]
    assert enc["word_ids"] == [0] * 5 + [1, 2, 2, 2, 2, 3]
    assert enc["word_token_ids"] == [5] * 5 + [4, 3, 3, 3, 3, 3]  # 😀 and x: word <unk>


def test_word_ids_english_default(default_tok):
    text = "To be, or not to be"
    enc = default_tok(text, return_word_ids=True)
    words = default_tok.get_word_vocab()
    expected_units = ["To", " ", "be", ",", " ", "or", " ", "not", " ", "to", " ", "be"]
    assert split_words(text) == expected_units
    assert enc["word_ids"] == [i for i, u in enumerate(expected_units) for _ in u]
    assert enc["word_token_ids"] == [words[u] for u in expected_units for _ in u]
    assert words["be"] != words["To"] != words[" "]


def test_word_ids_chinese_default(default_tok):
    text = "床前明月光，疑是地上霜。"
    units = ["床", "前", "明月光", "，", "疑", "是", "地上", "霜", "。"]
    assert split_words(text) == units
    enc = default_tok(text, return_word_ids=True)
    words = default_tok.get_word_vocab()
    assert enc["word_ids"] == [0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7, 8]
    assert enc["word_token_ids"] == [words[u] for u in units for _ in u]
    assert min(enc["word_token_ids"]) > 3  # every word of the line is in the Tang-poem word vocabulary


def test_pair_word_ids_restart(small_tok):
    enc = small_tok("Julia", "语言", return_word_ids=True, return_token_type_ids=True)
    assert enc["input_ids"] == [261, 265, 264, 263, 262, 267, 266]
    assert enc["word_ids"] == [0, 0, 0, 0, 0, 0, 0]
    assert enc["word_token_ids"] == [5] * 5 + [6, 6]
    assert enc["token_type_ids"] == [0] * 5 + [1, 1]


def test_split_into_words_input(small_tok):
    enc = small_tok(["Julia", "语言", "x"], is_split_into_words=True, return_word_ids=True)
    assert enc["input_ids"] == [261, 265, 264, 263, 262, 267, 266, 4 + ord("x")]
    assert enc["word_ids"] == [0] * 5 + [1, 1, 2]
    assert enc["word_token_ids"] == [5] * 5 + [6, 6, 3]


def test_offsets_mapping(default_tok):
    text = "Ab 😀 中文\ud800"
    enc = default_tok(text, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    assert len(spans) == len(enc["input_ids"])
    # every character appears once per token of it; bytes of one character share its span
    assert [text[a:b] for a, b in dict.fromkeys(spans)] == list(text)


# -- padding, truncation, tensors --------------------------------------------------------

BATCH = [SEED_EXAMPLE, "Julia", "", "语言 Julia 语言 Julia"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_keeps_word_ids_aligned(small_tok, side):
    single = [small_tok(t, return_word_ids=True) for t in BATCH]
    enc = small_tok(BATCH, return_word_ids=True, padding=True, padding_side=side, return_tensors="pt")
    width = max(len(s["input_ids"]) for s in single)
    for key in ("input_ids", "attention_mask", "word_ids", "word_token_ids"):
        assert enc[key].shape == (len(BATCH), width) and enc[key].dtype == torch.long
    for row, s in enumerate(single):
        n = len(s["input_ids"])
        real = slice(0, n) if side == "right" else slice(width - n, width)
        pad = slice(n, width) if side == "right" else slice(0, width - n)
        for key in ("input_ids", "word_ids", "word_token_ids"):
            assert enc[key][row, real].tolist() == s[key]
        assert enc["attention_mask"][row, real].tolist() == [1] * n
        assert enc["input_ids"][row, pad].tolist() == [0] * (width - n)
        assert enc["attention_mask"][row, pad].tolist() == [0] * (width - n)
        assert enc["word_ids"][row, pad].tolist() == [-1] * (width - n)
        assert enc["word_token_ids"][row, pad].tolist() == [0] * (width - n)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_word_ids_aligned(small_tok, side):
    full = small_tok(SEED_EXAMPLE, return_word_ids=True)
    small_tok.truncation_side = side
    try:
        enc = small_tok(SEED_EXAMPLE, return_word_ids=True, truncation=True, max_length=4)
    finally:
        small_tok.truncation_side = "right"
    keep = slice(0, 4) if side == "right" else slice(-4, None)
    for key in ("input_ids", "word_ids", "word_token_ids"):
        assert enc[key] == full[key][keep]


def test_truncation_with_specials_and_overflow(small_tok):
    tok = CharWordTokenizer(
        vocab=small_tok.get_vocab(), word_vocab=small_tok.get_word_vocab(), add_bos_token=True, add_eos_token=True
    )
    enc = tok(SEED_EXAMPLE, return_word_ids=True, truncation=True, max_length=5, return_overflowing_tokens=True)
    assert enc["input_ids"] == [1, 268, 269, 260, 2]
    assert enc["word_ids"] == [-1, 0, 1, 2, -1]
    assert enc["word_token_ids"] == [1, 7, 8, 4, 2]
    assert enc["overflowing_tokens"] == [261, 265, 264, 263, 262, 260, 267, 266]


def test_pad_to_multiple_and_tensors_single(small_tok):
    enc = small_tok("Julia", return_word_ids=True, padding="max_length", max_length=6, pad_to_multiple_of=4,
                    return_tensors="pt")
    assert enc["input_ids"].tolist() == [[261, 265, 264, 263, 262, 0, 0, 0]]
    assert enc["word_ids"].tolist() == [[0, 0, 0, 0, 0, -1, -1, -1]]
    np_enc = small_tok(["Julia", "语言"], padding=True, return_tensors="np", return_length=True)
    assert isinstance(np_enc["input_ids"], np.ndarray) and np_enc["input_ids"].shape == (2, 5)
    assert np_enc["length"].tolist() == [5, 2]


def test_tokenizer_pad_collates_word_columns(small_tok):
    features = [small_tok(t, return_word_ids=True) for t in ("Julia", "我")]
    batch = small_tok.pad(features, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[261, 265, 264, 263, 262], [268, 0, 0, 0, 0]]
    assert batch["word_ids"].tolist() == [[0] * 5, [0, -1, -1, -1, -1]]
    assert batch["word_token_ids"].tolist() == [[5] * 5, [7, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]


def test_ragged_tensors_need_padding(small_tok):
    with pytest.raises(ValueError, match="padding"):
        small_tok(["Julia", "我"], return_tensors="pt")


# -- special tokens, vocabulary API ------------------------------------------------------


def test_special_tokens_and_vocab_api(default_tok):
    assert [default_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (default_tok.pad_token_id, default_tok.bos_token_id, default_tok.eos_token_id) == (0, 1, 2)
    assert default_tok.unk_token_id == 3
    assert default_tok.convert_tokens_to_ids("<0x00>") == 4 and default_tok.convert_tokens_to_ids("<0xFF>") == 259
    assert len(default_tok) == default_tok.vocab_size == len(default_tok.get_vocab())
    assert default_tok.tokenize("a😀") == ["a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert default_tok.convert_tokens_to_string(["a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]) == "a😀"


def test_bos_eos_and_skip_special_tokens(bos_eos_tok):
    tok = bos_eos_tok
    ids = tok("ab")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 4
    assert tok.decode(ids) == "<bos>ab<eos>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok("ab", add_special_tokens=False)["input_ids"] == ids[1:-1]
    assert tok.get_special_tokens_mask(ids, already_has_special_tokens=True) == [1, 0, 0, 1]


def test_special_token_text_is_matched_unless_split(default_tok):
    ids = default_tok("a<eos>b")["input_ids"]
    assert ids[1] == 2 and len(ids) == 3
    split = default_tok("a<eos>b", split_special_tokens=True)["input_ids"]
    assert 2 not in split and default_tok.decode(split) == "a<eos>b"
    enc = default_tok("a<eos>b", return_word_ids=True)
    assert enc["word_ids"] == [0, -1, 1] and enc["word_token_ids"][1] == 2


def test_added_tokens_survive_save_load(tmp_path, small_tok):
    tok = CharWordTokenizer(vocab=small_tok.get_vocab(), word_vocab=small_tok.get_word_vocab())
    tok.add_special_tokens({"extra_special_tokens": ["<sep>"]})
    tok.add_tokens(["Julia语言"])
    assert len(tok) == 272
    enc = tok("我<sep>Julia语言", return_word_ids=True)
    assert enc["input_ids"] == [268, 270, 271]
    assert enc["word_ids"] == [0, -1, 1]
    assert enc["word_token_ids"] == [7, 0, 3]
    tok.save_pretrained(tmp_path)
    loaded = CharWordTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 272 and loaded("我<sep>Julia语言", return_word_ids=True) == enc
    assert loaded.decode(enc["input_ids"]) == "我<sep>Julia语言"


# -- save / load, AutoTokenizer ------------------------------------------------------------

SAMPLES = ["To be, or not to be", "子曰：學而時習之", SEED_EXAMPLE + " 😀\ud800\r\n"]


def test_save_load_identity(tmp_path):
    tok = load_default_tokenizer(add_bos_token=True)
    files = {Path(f).name for f in tok.save_pretrained(tmp_path)}
    assert {"tokenizer_config.json", "vocab.json", "word_vocab.json"} <= files
    assert (tmp_path / "tokenization_charword.py").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_charword.CharWordTokenizer", None]}
    assert config["tokenizer_class"] == "CharWordTokenizer" and config["add_bos_token"] is True
    loaded = CharWordTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.get_word_vocab() == tok.get_word_vocab()
    assert loaded.add_bos_token and not loaded.add_eos_token
    for text in SAMPLES:
        assert loaded(text, return_word_ids=True) == tok(text, return_word_ids=True)


def test_autotokenizer_after_registration(tmp_path, default_tok):
    from transformers import AutoTokenizer

    register_tokenizer()
    default_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is CharWordTokenizer
    for text in SAMPLES:
        assert loaded(text, return_word_ids=True) == default_tok(text, return_word_ids=True)
    assert type(AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_PATH)) is CharWordTokenizer


def _run_python(code: str, cwd: Path) -> dict:
    env = dict(os.environ, HF_MODULES_CACHE=str(cwd / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_remote_code_without_strata(tmp_path, default_tok):
    folder = tmp_path / "tok"
    default_tok.save_pretrained(folder)
    expected = {t: default_tok(t, return_word_ids=True).data for t in SAMPLES}
    result = _run_python(
        f"""
        import json, sys
        sys.modules["strata"] = None  # import strata fails from here on
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        texts = {SAMPLES!r}
        encs = {{t: tok(t, return_word_ids=True).data for t in texts}}
        again = tok.save_pretrained({str(tmp_path / "again")!r})
        tok2 = AutoTokenizer.from_pretrained({str(tmp_path / "again")!r}, trust_remote_code=True)
        print(json.dumps({{
            "module": type(tok).__module__,
            "encodings": encs,
            "decoded": [tok.decode(encs[t]["input_ids"]) for t in texts],
            "resaved_same": all(tok2(t, return_word_ids=True).data == encs[t] for t in texts),
        }}))
        """,
        tmp_path,
    )
    assert not result["module"].startswith("strata")
    assert result["encodings"] == expected
    assert result["decoded"] == SAMPLES
    assert result["resaved_same"]


def test_autotokenizer_through_a_config_class(tmp_path, default_tok):
    """register_tokenizer(ConfigClass): a model folder (config.json) finds the tokenizer
    through its config, even when tokenizer_config.json names no class."""
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    class ToyCharWordConfig(PretrainedConfig):
        model_type = "strata-toy-charword"

    AutoConfig.register("strata-toy-charword", ToyCharWordConfig, exist_ok=True)
    register_tokenizer(ToyCharWordConfig)
    folder = tmp_path / "model"
    default_tok.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("auto_map"), config.pop("tokenizer_class")
    config_path.write_text(json.dumps(config))
    ToyCharWordConfig().save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    assert type(loaded) is CharWordTokenizer
    assert loaded("Julia 语言", return_word_ids=True) == default_tok("Julia 语言", return_word_ids=True)


def test_pickle_round_trip(default_tok):
    clone = pickle.loads(pickle.dumps(default_tok))
    for text in SAMPLES:
        assert clone(text, return_word_ids=True) == default_tok(text, return_word_ids=True)


# -- compute_word_ids (generation) -------------------------------------------------------


@PROPERTY
@given(st.text(st.sampled_from("我爱北京天安门语言 Julia's,，。\n😀é\ud800<>")))
def test_compute_word_ids_matches_encoding(default_tok, text):
    enc = default_tok(text, return_word_ids=True)
    got = default_tok.compute_word_ids(enc["input_ids"])
    assert got == {"word_ids": enc["word_ids"], "word_token_ids": enc["word_token_ids"]}
    assert default_tok.compute_word_token_ids(enc["input_ids"]) == enc["word_token_ids"]


def test_compute_word_ids_batch_tensor(small_tok):
    enc = small_tok(BATCH, return_word_ids=True, padding=True, padding_side="left", return_tensors="pt")
    got = small_tok.compute_word_ids(enc["input_ids"])
    assert torch.equal(got["word_ids"], enc["word_ids"])
    assert torch.equal(got["word_token_ids"], enc["word_token_ids"])


def test_compute_word_ids_non_canonical_ids(small_tok):
    byte = {t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    # "Julia" spelled with byte tokens for J and a: still one word, the known word "Julia"
    ids = [byte["<0x4A>"], 265, 264, 263, byte["<0x61>"], 260, 268]
    assert small_tok.decode(ids) == "Julia 我"
    assert small_tok.compute_word_ids(ids) == {"word_ids": [0, 0, 0, 0, 0, 1, 2],
                                               "word_token_ids": [5, 5, 5, 5, 5, 4, 7]}
    # a broken UTF-8 sequence (lead byte E6 alone) decodes to U+FFFD, one word of its own
    ids = [261, byte["<0xE6>"], 268]
    assert small_tok.decode(ids) == "J\ufffd我"
    assert small_tok.compute_word_ids(ids)["word_ids"] == [0, 1, 2]


# -- training ----------------------------------------------------------------------------


def test_train_streams_and_respects_limits():
    consumed = []

    def stream():
        for line in ["aaa bbb", "aaa ccc", "aaa b"]:
            consumed.append(line)
            yield line

    tok = CharWordTokenizer.train(stream(), vocab_size=262, word_vocab_size=6, min_frequency=1)
    assert len(consumed) == 3
    assert len(tok) == 262  # specials + bytes + the two most frequent characters
    assert [tok.convert_ids_to_tokens(i) for i in (260, 261)] == ["a", "b"]
    assert list(tok.get_word_vocab()) == list(SPECIAL_TOKENS) + [" ", "aaa"]
    assert tok.decode(tok.encode("cab")) == "cab"
    tok = CharWordTokenizer.train(["aaa bbb", "aaa c"], min_frequency=2)
    assert [tok.convert_ids_to_tokens(i) for i in range(260, len(tok))] == ["a", "b", " "]
    assert tok.get_word_vocab()["aaa"] == 5 and "bbb" not in tok.get_word_vocab()


def test_train_characters_only():
    tok = CharWordTokenizer.train(["Julia 语言", "Julia"], vocab_size=300, word_vocab_size=4)
    assert tok.get_word_vocab() == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert len(tok) == 260 + len(set("Julia 语言"))
    assert tok("Julia", return_word_ids=True)["word_token_ids"] == [3] * 5


def test_default_tokenizer_files(default_tok):
    folder = Path(DEFAULT_TOKENIZER_PATH)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 2_000_000
    assert not (folder / "tokenization_charword.py").exists()
    assert 6000 < len(default_tok) <= 20000 and 20000 <= default_tok.word_vocab_size <= 30000
    corpora = Path(DEFAULT_TOKENIZER_PATH).parents[1] / "data"
    lunyu = (corpora / "lunyu.txt").read_text(encoding="utf-8")
    vocab = default_tok.get_vocab()
    repeated = [c for c, n in Counter(lunyu).items() if n >= 2]
    assert repeated and all(c in vocab for c in repeated)  # built from >= 2 occurrences in all corpora


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad, name", [(123, "int"), (b"bytes", "bytes"), ({"a": 1}, "dict"), (3.5, "float")])
def test_non_string_input(default_tok, bad, name):
    with pytest.raises(TypeError, match=name):
        default_tok(bad)


def test_non_string_in_batch(default_tok):
    with pytest.raises(TypeError, match="NoneType"):
        default_tok(["ok", None])
    with pytest.raises(TypeError, match="float"):
        default_tok.encode([1, 2.5])


def test_bad_training_arguments():
    with pytest.raises(ValueError, match=r"vocab_size must be at least 260 \(4 special tokens \+ 256 byte"):
        CharWordTokenizer.train(["abc"], vocab_size=259)
    with pytest.raises(ValueError, match="word_vocab_size"):
        CharWordTokenizer.train(["abc"], word_vocab_size=2)
    with pytest.raises(TypeError, match="not one string"):
        CharWordTokenizer.train("abc")
    with pytest.raises(TypeError, match="item 1 is int"):
        CharWordTokenizer.train(["abc", 5])
    with pytest.raises(TypeError, match="min_frequency must be an int"):
        CharWordTokenizer.train(["abc"], min_frequency=1.5)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a valid JSON vocabulary"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"<bos>": 0, "<pad>": 1}), "id 0 must be '<pad>'"),
        (json.dumps({**{t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}, "x": 261}), "without gaps"),
        (json.dumps({**{t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}, "xy": 260}), "single character"),
        (json.dumps({**{t: i for i, t in enumerate(SPECIAL_TOKENS)}}), "fewer than the 260"),
        (json.dumps({**{t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}, "x": "260"}), "must be an integer"),
    ],
)
def test_corrupt_vocab_file(tmp_path, default_tok, content, message):
    default_tok.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        CharWordTokenizer.from_pretrained(tmp_path)
    assert "vocab.json" in str(info.value)


def test_corrupt_or_missing_word_vocab(tmp_path, default_tok):
    default_tok.save_pretrained(tmp_path)
    (tmp_path / "word_vocab.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match="word_vocab.json"):
        CharWordTokenizer.from_pretrained(tmp_path)
    (tmp_path / "word_vocab.json").unlink()
    with pytest.raises(ValueError, match="word_vocab_file"):
        CharWordTokenizer.from_pretrained(tmp_path)


def test_decode_out_of_range_ids(default_tok):
    with pytest.raises(ValueError, match="token id 99999 is out of range"):
        default_tok.decode([5, 99999])
    with pytest.raises(ValueError, match="token id -100 is out of range"):
        default_tok.decode([-100, 5])


def test_decode_accepts_tensors_and_rejects_non_integers(default_tok):
    ids = default_tok("天雲 ok")["input_ids"]
    assert default_tok.decode(torch.tensor(ids)) == default_tok.decode(np.array(ids)) == "天雲 ok"
    assert default_tok.batch_decode(torch.tensor([ids, ids])) == ["天雲 ok"] * 2
    assert default_tok.batch_decode([]) == []
    for bad, name in (([1.5], "float"), ([True], "bool"), (["a"], "str")):
        with pytest.raises(TypeError, match=f"token ids must be integers, got {name}"):
            default_tok.decode(bad)


def test_build_default_vocab_script(tmp_path):
    from strata.tokenization.build_default_vocab import CORPORA, build_default

    data = tmp_path / "data"
    data.mkdir()
    texts = ["To be, or not to be.\n" * 3, "床前明月光\n" * 2, "子曰：学而时习之\n" * 2]
    for name, text in zip(CORPORA, texts):
        (data / name).write_text(text, encoding="utf-8")
    build_default(tmp_path / "a", data)
    build_default(tmp_path / "b", data)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["tokenizer_config.json", "vocab.json", "word_vocab.json"]  # no code copy
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "auto_map" not in json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    tok = CharWordTokenizer.from_pretrained(tmp_path / "a")
    assert tok("To be")["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "To be"]
    assert tok.get_word_vocab()["明月光"] > 3


@PROPERTY
@given(st.lists(st.text(st.sampled_from("我爱北京天安门语言 Julia's,，。\n😀é")), max_size=5))
def test_split_words_batch_equals_one_by_one(texts):
    from strata.tokenization.tokenization_charword import split_words_batch

    assert split_words_batch(texts) == [split_words(t) for t in texts]
