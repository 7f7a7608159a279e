import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shakespeare() -> str:
    return (ROOT / "strata" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def char_tokenizer(shakespeare, tmp_path_factory):
    """A small CharWordTokenizer trained on tinyshakespeare (65 characters + bytes + specials)."""
    from strata import CharWordTokenizer

    tok = CharWordTokenizer.train([shakespeare], vocab_size=400, word_vocab_size=2000)
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return CharWordTokenizer.from_pretrained(folder)
