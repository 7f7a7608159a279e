"""Build the packaged default vocabulary (strata/tokenization/default) from strata/data.

    python -m strata.tokenization.build_default_vocab [--out DIR]

Characters: every character that occurs at least twice in tinyshakespeare, the Tang
poems and the Analects (capped at 20000 ids). Words: the 30000 most frequent words
(specials included) that occur at least twice. Deterministic: running it again gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from strata.tokenization.tokenization_charword import CharWordTokenizer

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CORPORA = ("tinyshakespeare.txt", "tang_poems.txt", "lunyu.txt")
DEFAULT_DIR = Path(__file__).resolve().parent / "default"
VOCAB_SIZE = 20000
WORD_VOCAB_SIZE = 30000
MIN_FREQUENCY = 2


def corpus_texts(data_dir: Path = DATA_DIR):
    """Yield the bundled corpora one file at a time (each is a few MB)."""
    for name in CORPORA:
        yield (data_dir / name).read_text(encoding="utf-8")


def build_default(
    out_dir: str | os.PathLike = DEFAULT_DIR, data_dir: str | os.PathLike = DATA_DIR
) -> CharWordTokenizer:
    """Train on the corpora of `data_dir` and write the tokenizer folder `out_dir`."""
    tokenizer = CharWordTokenizer.train(
        corpus_texts(Path(data_dir)),
        vocab_size=VOCAB_SIZE,
        word_vocab_size=WORD_VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    # The package loads this folder through its own class: no code copy, no auto_map
    # (a second tokenization_charword.py in the package would only go stale).
    (out_dir / "tokenization_charword.py").unlink(missing_ok=True)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("auto_map", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="output folder (default: the packaged one)")
    args = parser.parse_args(argv)
    tokenizer = build_default(args.out)
    sizes = {p.name: p.stat().st_size for p in sorted(Path(args.out).iterdir())}
    print(f"{len(tokenizer)} character ids, {tokenizer.word_vocab_size} word ids -> {args.out} {sizes}")


if __name__ == "__main__":
    main()
