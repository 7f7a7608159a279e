"""Tiny-ONN against the foundation's Transformer (RetMamba ``transformer`` preset), one run, CPU.

For each corpus (English: tinyshakespeare, Chinese: tang_poems, both bundled in strata/data):

- a CharWordTokenizer is trained on the first 90 % of the text (characters + a word
  vocabulary); the validation text is the next ``--val-chars`` characters after it;
- three models train for the same time, one after the other (``--train-seconds`` each, of
  wall-clock, or of this process's CPU time with ``--budget cpu``), same batches, AdamW,
  warm-up, clipping:
    tiny-onn        Tiny-ONN with the word embedding (causal word ids, see docs/tiny_onn.md)
    tiny-onn-noword Tiny-ONN without it (word_vocab_size=0): the ablation
    transformer     strata RetMamba ``transformer`` preset (Llama-style blocks: RoPE attention +
                    SwiGLU), its MLP width set so that its parameters outside the embedding
                    tables equal Tiny-ONN's (same width, depth, heads)
- reported: validation bits per character (blocks of ``--seq`` characters), training tokens/s
  (median step, warm-up excluded), CPU seconds used, parameter counts (total and outside the
  embedding tables), the mean fraction of heads / experts active per token on validation text,
  and, for Tiny-ONN, the bits per character on blocks 4x longer than trained, with plain RoPE
  and with YaRN (factor 4 through ``rope_scaling``, same weights).

The machine is shared with other jobs: the load average before and after and the CPU time
of this process are recorded with the numbers.

usage: .venv/bin/python bench/tiny_onn.py [--train-seconds 90] [--budget wall|cpu] [--cost]
       [--corpora shakespeare,tang] [--threads 1] [--json bench/results/tiny_onn.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import strata  # noqa: E402
from strata.modeling.modeling_tiny_onn import causal_word_token_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from harness import uptime_line  # noqa: E402

CORPORA = {"shakespeare": "tinyshakespeare.txt", "tang": "tang_poems.txt"}
MODEL_NAMES = ("tiny-onn", "tiny-onn-noword", "transformer")


# ----------------------------------------------------------------------------- data
def load_corpus(name: str, chars: int, val_chars: int, word_vocab: int):
    text = (ROOT / "strata" / "data" / CORPORA[name]).read_text(encoding="utf-8")[:chars]
    split = int(0.9 * len(text))
    train_text, val_text = text[:split], text[split : split + val_chars]
    tok = strata.CharWordTokenizer.train([train_text], vocab_size=8000, word_vocab_size=word_vocab)
    data = {}
    for part, t in (("train", train_text), ("val", val_text)):
        ids = tok(t)["input_ids"]
        words = causal_word_token_ids(tok, ids)
        data[part] = (torch.tensor(ids), torch.tensor(words))
        # characters outside the vocabulary become several byte ids: bits per *character*
        # divides by characters, so keep the ratio
        data[f"{part}_ids_per_char"] = len(ids) / len(t)
    return tok, data


# ----------------------------------------------------------------------------- models
def num_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def embedding_parameters(model) -> int:
    n = model.get_input_embeddings().weight.numel()
    word = getattr(getattr(model, "model", None), "word_embed", None)
    return n + (word.weight.numel() if word is not None else 0)


def onn_config(vocab: int, word_vocab: int, seq: int, **overrides):
    return strata.TinyONNConfig(
        vocab_size=vocab, word_vocab_size=word_vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_experts=16, expert_size=64, max_position_embeddings=seq, patch_size=4, **overrides,
    )


def build_models(vocab: int, word_vocab: int, seq: int) -> dict:
    torch.manual_seed(0)
    onn = strata.TinyONNForCausalLM(onn_config(vocab, word_vocab, seq))
    torch.manual_seed(0)
    noword = strata.TinyONNForCausalLM(onn_config(vocab, 0, seq))
    target = num_parameters(onn) - embedding_parameters(onn)
    # Transformer of the same width/depth/heads; SwiGLU width matched to Tiny-ONN's non-embedding parameters
    base = dict(vocab_size=vocab, hidden_size=128, num_attention_heads=8, layer_pattern="AA",
                max_position_embeddings=4 * seq)
    probe = strata.RetMambaForCausalLM(strata.RetMambaConfig.from_preset("transformer-tiny", intermediate_size=1, **base))
    fixed = num_parameters(probe) - embedding_parameters(probe) - 2 * 3 * 128  # 3 matrices of width 1 per block
    inter = round((target - fixed) / (2 * 3 * 128))
    torch.manual_seed(0)
    transformer = strata.RetMambaForCausalLM(
        strata.RetMambaConfig.from_preset("transformer-tiny", intermediate_size=inter, **base))
    return {"tiny-onn": onn, "tiny-onn-noword": noword, "transformer": transformer}


def describe(model) -> dict:
    total = num_parameters(model)
    return {"parameters": total, "non_embedding_parameters": total - embedding_parameters(model),
            "config": {k: v for k, v in model.config.to_diff_dict().items() if k not in ("architectures",)}}


# ----------------------------------------------------------------------------- training / evaluation
def batches(ids, words, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g).tolist()
        yield (torch.stack([ids[i : i + seq] for i in idx]), torch.stack([words[i : i + seq] for i in idx]))


def forward(name, model, x, w, **kwargs):
    if name == "tiny-onn":
        return model(x, word_token_ids=w, **kwargs)
    return model(x, **kwargs)


def train_for(name, model, ids, words, seconds, batch, seq, lr, warmup=30, budget="wall") -> dict:
    """Train for ``seconds`` of wall-clock (``budget="wall"``) or of this process's CPU time
    (``"cpu"``: on a shared machine, the same work for every model whatever the others run)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    data = batches(ids, words, batch, seq, seed=0)
    steps, losses, step_times, pis = 0, [], [], []
    cpu0, start = time.process_time(), time.perf_counter()
    spent = (lambda: time.process_time() - cpu0) if budget == "cpu" else (lambda: time.perf_counter() - start)
    while spent() < seconds:
        x, w = next(data)
        t0 = time.perf_counter()
        out = forward(name, model, x, w, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        steps += 1
        losses.append(out.loss.item())
        if getattr(out, "pi_score", None) is not None:
            pis.append(out.pi_score.item())
    model.eval()
    measured = step_times[3:] or step_times
    return {"steps": steps, "train_tokens": steps * batch * seq, "train_seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu0, "budget": budget,
            "train_tokens_per_s": batch * seq / statistics.median(measured),
            "train_tokens_per_cpu_s": steps * batch * seq / (time.process_time() - cpu0),
            "final_train_loss_nats": statistics.mean(losses[-20:]),
            "pi_score_last": statistics.mean(pis[-20:]) if pis else None}


IDS_PER_CHAR = 1.0  # of the validation text being evaluated (set per corpus)


@torch.no_grad()
def evaluate(name, model, ids, words, seq, batch=32, use_words=True) -> dict:
    n = (ids.numel() - 1) // seq
    x, y, w = ids[: n * seq].view(n, seq), ids[1 : n * seq + 1].view(n, seq), words[: n * seq].view(n, seq)
    total, heads, experts = 0.0, [], []
    for s in range(0, n, batch):
        out = forward(name if use_words else "no-words", model, x[s : s + batch], w[s : s + batch])
        total += F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y[s : s + batch].reshape(-1),
                                 reduction="sum").item()
        if getattr(out, "head_active_fraction", None) is not None:
            heads.append(out.head_active_fraction.item())
            experts.append(out.expert_active_fraction.item())
    row = {"bpc": total / (n * seq) / math.log(2) * IDS_PER_CHAR, "eval_tokens": n * seq}
    if heads:
        row["head_active_fraction"] = statistics.mean(heads)
        row["expert_active_fraction"] = statistics.mean(experts)
    return row


def long_context(model, ids, words, seq) -> dict:
    """Bits per character on blocks 4x longer than trained: plain RoPE, then YaRN (same weights)."""
    long = 4 * seq
    rows = {"trained_seq": seq, "eval_seq": long, "rope": evaluate("tiny-onn", model, ids, words, long, batch=8)["bpc"]}
    original = model.config.rope_parameters
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": seq,
                                    "rope_theta": model.config.rope_theta}
    try:
        rows["yarn_factor_4"] = evaluate("tiny-onn", model, ids, words, long, batch=8)["bpc"]
    finally:
        model.config.rope_parameters = original
    rows["at_trained_seq"] = evaluate("tiny-onn", model, ids, words, seq, batch=8)["bpc"]
    return rows


def run_corpus(corpus, args) -> dict:
    t0 = time.perf_counter()
    tok, data = load_corpus(corpus, args.chars, args.val_chars, args.word_vocab)
    print(f"[{corpus}] tokenizer: {len(tok)} characters, {tok.word_vocab_size} words; "
          f"{data['train'][0].numel():,} train / {data['val'][0].numel():,} val ids "
          f"({data['val_ids_per_char']:.4f} ids per val character) "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    global IDS_PER_CHAR
    IDS_PER_CHAR = data["val_ids_per_char"]
    models = build_models(len(tok), tok.word_vocab_size, args.seq)
    rows = {"tokenizer": {"characters": len(tok), "words": tok.word_vocab_size,
                          "val_ids_per_char": data["val_ids_per_char"]}}
    for name in args.models:
        model = models[name]
        row = describe(model)
        row.update(train_for(name, model, *data["train"], args.train_seconds, args.batch, args.seq, args.lr,
                             budget=args.budget))
        row["val"] = evaluate(name, model, *data["val"], args.seq)
        if name == "tiny-onn":
            row["val_without_word_ids"] = evaluate(name, model, *data["val"], args.seq, use_words=False)
            row["long_context"] = long_context(model, *data["val"], args.seq)
        rows[name] = row
        extra = ""
        if "head_active_fraction" in row["val"]:
            extra = (f", heads active {row['val']['head_active_fraction']:.2f}, "
                     f"experts active {row['val']['expert_active_fraction']:.2f}")
        print(f"[{corpus}] {name:16s} params {row['parameters']:,} (non-emb {row['non_embedding_parameters']:,}), "
              f"{row['steps']} steps, {row['train_tokens_per_s']:.0f} tok/s ({row['train_tokens_per_cpu_s']:.0f} per CPU s), val bpc {row['val']['bpc']:.3f}{extra}",
              flush=True)
        if "long_context" in row:
            lc = row["long_context"]
            print(f"[{corpus}]   long context {lc['eval_seq']} (trained {lc['trained_seq']}): bpc RoPE {lc['rope']:.3f}, "
                  f"YaRN x4 {lc['yarn_factor_4']:.3f} (at trained length {lc['at_trained_seq']:.3f})", flush=True)
    return rows


def cost_breakdown(vocab=323, word_vocab=4000, batch=16, seq=128, steps=8) -> dict:
    """CPU seconds per training step (median of ``steps``, after 2 warm-up steps), interleaved:
    where Tiny-ONN's time goes compared with the Transformer."""
    models = build_models(vocab, word_vocab, seq)
    torch.manual_seed(0)
    no_gate = strata.TinyONNForCausalLM(onn_config(vocab, word_vocab, seq, gate_loss_weight=0.0))
    variants = {"transformer": (models["transformer"], "transformer"),
                "tiny-onn": (models["tiny-onn"], "tiny-onn"),
                "tiny-onn, no routing loss": (no_gate, "tiny-onn")}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, vocab, (batch, seq), generator=g)
    w = torch.randint(0, word_vocab, (batch, seq), generator=g)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in variants.items()}
    times = {k: [] for k in variants}

    def step(key):
        model, name = variants[key]
        model.train()
        out = forward(name, model, x, w, labels=x)
        out.loss.backward()
        opts[key].step()
        opts[key].zero_grad(set_to_none=True)

    for key in variants:
        for _ in range(2):
            step(key)
    for _ in range(steps):
        for key in variants:
            t0 = time.process_time()
            step(key)
            times[key].append(time.process_time() - t0)
    rows = {k: {"cpu_s_per_step": statistics.median(v)} for k, v in times.items()}
    base = rows["transformer"]["cpu_s_per_step"]
    for key, row in rows.items():
        row["vs_transformer"] = row["cpu_s_per_step"] / base
        print(f"[cost] {key:28s} {row['cpu_s_per_step'] * 1000:7.1f} CPU ms/step ({row['vs_transformer']:.2f}x)",
              flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default="shakespeare,tang")
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--train-seconds", type=float, default=90.0)
    parser.add_argument("--chars", type=int, default=600_000, help="characters of each corpus used (train + val)")
    parser.add_argument("--val-chars", type=int, default=32_768)
    parser.add_argument("--word-vocab", type=int, default=4000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", choices=("wall", "cpu"), default="wall",
                        help="--train-seconds of wall-clock (default) or of CPU time of this process")
    parser.add_argument("--cost", action="store_true", help="also time one training step of each model "
                        "(and of Tiny-ONN without the routing loss), interleaved, in CPU seconds")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    if args.quick:
        args.train_seconds, args.chars, args.val_chars, args.word_vocab = 3.0, 60_000, 2048, 500
    torch.set_num_threads(args.threads)
    meta = {"command": " ".join([".venv/bin/python bench/tiny_onn.py"] + (argv if argv is not None else sys.argv[1:])),
            "threads": args.threads, "load_start": uptime_line(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "settings": {k: v for k, v in vars(args).items()}}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = {"meta": meta}
    if args.cost:
        results["cost"] = cost_breakdown(steps=2 if args.quick else 8)
    for corpus in [c for c in args.corpora.split(",") if c]:
        results[corpus] = run_corpus(corpus, args)
    meta.update(load_end=uptime_line(), cpu_seconds=time.process_time() - cpu0, wall_seconds=time.perf_counter() - wall0)
    print(f"load: {meta['load_start']} -> {meta['load_end']}; {meta['wall_seconds']:.0f} s wall, "
          f"{meta['cpu_seconds']:.0f} s CPU", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
