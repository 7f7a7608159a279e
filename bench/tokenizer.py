"""Encode throughput of CharWordTokenizer next to GPT-2's fast tokenizer and jieba.

    .venv/bin/python bench/tokenizer.py [--repeats 3] [--json bench/results/tokenizer.json]

Corpora: strata/data (tinyshakespeare = English, tang_poems + lunyu = Chinese), MB of
UTF-8 input per second, best of `--repeats` runs, one process.

Figures are MB per CPU-second (the process's CPU time, robust to other load on a
shared machine) and MB per wall-second, of the fastest of the repeats:

- one string per corpus: `tok(text)` (characters only), `tok(text, return_word_ids=True)`;
- a batch of lines (one sequence per line, lists returned);
- a batch of 1024-character chunks, padded, `return_tensors="pt"` (a training batch);
- `decode` of the whole corpus;
- GPT-2: `GPT2Tokenizer` (the transformers 5 fast tokenizer, Rust) with a byte-level BPE
  of 50257 tokens trained here on the same corpora (nothing is downloaded); its batch
  calls use every core (Rust threads), CharWordTokenizer one;
- jieba alone: `jieba.Tokenizer().lcut(text, HMM=False)`, the segmenter CharWordTokenizer
  calls for Han text, on the same strings, and `split_words` (the whole word cutter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from transformers import GPT2Tokenizer  # noqa: E402

from strata.tokenization import load_default_tokenizer, split_words  # noqa: E402
from strata.tokenization.tokenization_charword import _jieba  # noqa: E402

DATA = ROOT / "strata" / "data"
CORPORA = {
    "english (tinyshakespeare)": ["tinyshakespeare.txt"],
    "chinese (tang_poems + lunyu)": ["tang_poems.txt", "lunyu.txt"],
}


def best_rate(fn, n_bytes: int, repeats: int) -> tuple[float, float]:
    """(MB per CPU-second, MB per wall-second) of the fastest of `repeats` calls; 1 MB = 10^6 bytes.

    CPU time (`time.process_time`, all threads of the process) is the figure to compare
    on a shared machine: other processes stretch wall time, not the CPU time spent here.
    Rust batch calls run on several threads, so their CPU time adds the threads up."""
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return n_bytes / best_cpu / 1e6, n_bytes / best_wall / 1e6


def gpt2_tokenizer(texts: list[str], folder: Path) -> GPT2Tokenizer:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=50257, min_frequency=2, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    tok = GPT2Tokenizer.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    return tok


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="CharWordTokenizer encode throughput")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    info = machine()
    print(f"# machine: {info}")
    texts = {name: "".join((DATA / f).read_text(encoding="utf-8") for f in files) for name, files in CORPORA.items()}
    tok = load_default_tokenizer()
    segmenter = _jieba()
    split_words("预热，naïve")  # load jieba's dictionary, build the word patterns before timing
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gpt2 = gpt2_tokenizer(list(texts.values()), Path(tmp))
    print(f"# GPT-2 byte-level BPE (50257 tokens) trained on the corpora in {time.perf_counter() - start:.0f} s")
    results = {"machine": info, "repeats": args.repeats, "corpora": {}}
    for name, text in texts.items():
        n = len(text.encode("utf-8"))
        lines = text.splitlines(keepends=True)
        chunks = [text[i : i + 1024] for i in range(0, len(text), 1024)]
        ids = tok(text)["input_ids"]
        r = args.repeats
        rows = {
            "CharWord, one string, characters": best_rate(lambda: tok(text), n, r),
            "CharWord, one string, + word ids": best_rate(lambda: tok(text, return_word_ids=True), n, r),
            "GPT-2 fast, one string": best_rate(lambda: gpt2(text), n, r),
            "GPT-2 Rust core alone (tokenizers.Tokenizer.encode), one string": best_rate(
                lambda: gpt2._tokenizer.encode(text), n, r
            ),
            "CharWord, batch of lines, characters": best_rate(lambda: tok(lines), n, r),
            "CharWord, batch of lines, + word ids": best_rate(lambda: tok(lines, return_word_ids=True), n, r),
            "GPT-2 fast, batch of lines": best_rate(lambda: gpt2(lines), n, r),
            "GPT-2 Rust core alone (encode_batch), batch of lines": best_rate(
                lambda: gpt2._tokenizer.encode_batch(lines), n, r
            ),
            "CharWord, 1k-char chunks, padded pt": best_rate(
                lambda: tok(chunks, padding=True, return_tensors="pt"), n, r
            ),
            "CharWord, 1k-char chunks, padded pt, + word ids": best_rate(
                lambda: tok(chunks, padding=True, return_tensors="pt", return_word_ids=True), n, r
            ),
            "GPT-2 fast, 1k-char chunks, padded pt": best_rate(
                lambda: gpt2(chunks, padding=True, return_tensors="pt"), n, r
            ),
            "CharWord decode, one string": best_rate(lambda: tok.decode(ids), n, r),
            "jieba alone (lcut, HMM off), one string": best_rate(lambda: segmenter.lcut(text, HMM=False), n, r),
            "split_words (the word cutter), one string": best_rate(lambda: split_words(text), n, r),
        }
        results["corpora"][name] = {
            "bytes": n,
            "MB per CPU-second": {k: round(v[0], 2) for k, v in rows.items()},
            "MB per wall-second": {k: round(v[1], 2) for k, v in rows.items()},
        }
        print(f"\n## {name}: {n / 1e6:.2f} MB, {len(text)} characters, {len(lines)} lines, {len(chunks)} chunks")
        print("| measurement | MB/s (CPU time) | MB/s (wall) |\n| --- | ---: | ---: |")
        for key, (cpu, wall) in rows.items():
            print(f"| {key} | {cpu:.2f} | {wall:.2f} |", flush=True)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\n# load average at end: {results['machine']['load_average_at_end']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
