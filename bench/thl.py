"""THL against a Transformers Llama of equal parameter count, in one run (CPU).

Sections (all by default):

- ``memory``: peak memory and per-token decoding latency after a prompt of 1k, 8k and 32k
  tokens (each measurement in a fresh subprocess; both models prefill in chunks of 2048
  tokens through their cache, then decode ``--decode-tokens`` tokens one at a time).
  Peak memory = peak RSS of the process minus its RSS once the model is built; the state
  is THL's `RecurrentCache` or Llama's key/value cache.
- ``train``: both models train for ``--train-seconds`` of wall-clock each on tinyshakespeare
  characters (THL: truncated BPTT over 16 parallel streams, state carried across chunks of
  128 and reset every 512 tokens; Llama: random 128-token blocks, batch 16); training tokens/s and the validation
  bits per character reached (the first ``--val-chars`` characters of the validation
  split: Llama on 128-character blocks, THL on 128-character blocks and as 8 streams with
  its state carried).
- ``int8``: the trained THL in float32 and dynamically quantized INT8: weight bytes,
  per-token decoding latency, validation bits per character.

usage: .venv/bin/python bench/thl.py [--sections memory,train,int8] [--lengths 1024,8192,32768]
       [--train-seconds 300] [--json results.json] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import strata  # noqa: E402
from strata.modeling.inference_thl import model_nbytes, quantize_int8  # noqa: E402
from strata.modeling.modeling_thl import TBPTTStream, state_nbytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8000  # memory/latency section (a word-piece sized vocabulary)
PRESET = "small"


# ----------------------------------------------------------------------------- models
def num_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def thl_config(vocab: int):
    return strata.THLConfig.from_preset(PRESET, vocab_size=vocab)


def llama_config(vocab: int, target: int):
    """A Llama of THL's width whose depth (and MLP width) brings it closest to ``target`` parameters."""
    ref = thl_config(vocab)
    best = None
    for layers in range(1, 17):
        for inter in (512, 640, 768, 896, 1024):
            cfg = transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=ref.hidden_size, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=40_000, tie_word_embeddings=True,
                rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            )
            d, v = cfg.hidden_size, vocab
            params = v * d + layers * (4 * d * d + 3 * d * inter + 2 * d) + d
            if best is None or abs(params - target) < abs(best[0] - target):
                best = (params, cfg)
    return best[1]


def build(name: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    thl = strata.THLForCausalLM(thl_config(vocab))
    if name == "thl":
        return thl.float()
    cfg = llama_config(vocab, num_parameters(thl))
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").float()


def describe(model) -> dict:
    c = model.config
    out = {"class": type(model).__name__, "parameters": num_parameters(model), "hidden_size": c.hidden_size,
           "layers": c.num_hidden_layers, "vocab_size": c.vocab_size}
    if c.model_type == "thl":
        out.update(memory_slots=c.memory_slots, timescales=c.timescales, local_window=c.local_window)
    else:
        out.update(intermediate_size=c.intermediate_size)
    return out


# ----------------------------------------------------------------------------- memory / latency
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, length: int, decode_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = build(name, VOCAB).eval()
    ids = torch.randint(4, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
    gc.collect()
    base = _rss()
    chunk = 2048
    with torch.no_grad():
        if name == "thl":
            cache = strata.RecurrentCache(model.config.num_hidden_layers)
        else:
            cache = transformers.DynamicCache(config=model.config)
        start = time.perf_counter()
        for s in range(0, length, chunk):
            out = model(ids[:, s : s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
    if name == "thl":
        state = state_nbytes(cache)
    else:
        state = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": name, "prompt_tokens": length, "prefill_s": prefill, "prefill_tokens_per_s": length / prefill,
        "decode_ms_per_token_median": 1e3 * statistics.median(times),
        "decode_ms_per_token_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
        "peak_memory_mb": (peak - base) / 2**20, "state_mb": state / 2**20,
    }


def run_memory(lengths, decode_tokens, threads) -> list[dict]:
    rows = []
    for length in lengths:
        for name in ("thl", "llama"):
            cmd = [sys.executable, __file__, "--child", f"{name}:{length}:{decode_tokens}:{threads}"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                raise RuntimeError(f"{name} at {length} tokens failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {name:5s} {length:6d} tokens: decode {row['decode_ms_per_token_median']:.2f} ms/token, "
                  f"peak +{row['peak_memory_mb']:.1f} MB, state {row['state_mb']:.2f} MB, "
                  f"prefill {row['prefill_tokens_per_s']:.0f} tok/s", flush=True)
    return rows


# ----------------------------------------------------------------------------- training / bpc
def shakespeare_data():
    text = (ROOT / "strata" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    tok = strata.CharWordTokenizer.train([text[:split]], vocab_size=400, word_vocab_size=2000)
    train = torch.tensor(tok(text[:split])["input_ids"])
    val_text = text[split:]
    val = torch.tensor(tok(val_text)["input_ids"])
    if len(val) != len(val_text):
        raise RuntimeError("the character tokenizer does not map one character to one token here")
    return tok, train, val


def bits_per_char_blocks(model, val, block=128, batch=64) -> float:
    n = (val.numel() - 1) // block
    x = val[: n * block].view(n, block)
    y = val[1 : n * block + 1].view(n, block)
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, batch):
            logits = model(x[s : s + batch]).logits
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y[s : s + batch].reshape(-1),
                                     reduction="sum").item()
    return total / (n * block) / math.log(2)


def bits_per_char_streams(model, val, streams=8, chunk=512, stats=None) -> float:
    """Bits per character of ``streams`` contiguous parts of ``val``, state carried. ``stats``
    (a dict) receives the memory slots written per stream at the end."""
    n = (val.numel() - 1) // streams
    x = val[: n * streams].view(streams, n)
    y = val[1 : n * streams + 1].view(streams, n)
    cache = strata.RecurrentCache(model.config.num_hidden_layers)
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, chunk):
            logits = model(x[:, s : s + chunk], past_key_values=cache, use_cache=True).logits
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y[:, s : s + chunk].reshape(-1),
                                     reduction="sum").item()
    if stats is not None:
        written = cache.layer(0).get("written")
        stats.update(stream_tokens=n, slots_written_per_stream=written.sum(-1).float().mean().item(),
                     memory_slots=written.shape[-1])
    return total / (n * streams) / math.log(2)


def train_for(name, model, train, seconds, batch=16, length=128, lr=2e-3, warmup=30) -> dict:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    g = torch.Generator().manual_seed(0)
    tokens, steps, losses = 0, 0, []
    measured_tokens, measured_time = 0, 0.0
    start = time.perf_counter()
    if name == "thl":
        n = train.numel() // batch
        streams = train[: n * batch].view(batch, n)
        offset = int(torch.randint(0, n // 2, (1,), generator=g))
        batches = iter(TBPTTStream(model, streams[:, offset:], chunk_length=length, reset_every=4 * length))
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        if name == "thl":
            loss = next(batches)
        else:
            idx = torch.randint(0, train.numel() - length - 1, (batch,), generator=g)
            x = torch.stack([train[i : i + length] for i in idx.tolist()])
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        tokens += batch * length
        losses.append(loss.item())
        if steps > 3:  # exclude warm-up steps from the throughput
            measured_tokens += batch * length
            measured_time += time.perf_counter() - t0
    model.eval()
    return {"steps": steps, "train_tokens": tokens, "train_seconds": time.perf_counter() - start,
            "train_tokens_per_s": measured_tokens / max(measured_time, 1e-9),
            "final_train_loss_nats": statistics.mean(losses[-20:])}


def run_train(seconds, val_chars, lr) -> tuple[dict, object, object, object]:
    tok, train, val = shakespeare_data()
    val = val[: val_chars + 1]
    vocab = len(tok)
    results = {}
    models = {}
    for name in ("thl", "llama"):
        model = build(name, vocab)
        row = {"model": describe(model), **train_for(name, model, train, seconds, lr=lr)}
        row["val_bpc_128_blocks"] = bits_per_char_blocks(model, val)
        if name == "thl":
            stats = {}
            row["val_bpc_streaming"] = bits_per_char_streams(model, val, stats=stats)
            row["memory_use"] = stats
        results[name] = row
        models[name] = model
        print(f"  {name:5s}: {row['steps']} steps, {row['train_tokens_per_s']:.0f} train tok/s, "
              f"val bpc (128 blocks) {row['val_bpc_128_blocks']:.3f}"
              + (f", streaming {row['val_bpc_streaming']:.3f}" if name == "thl" else ""), flush=True)
    results["train_tokens_per_s_ratio_thl_over_llama"] = (
        results["thl"]["train_tokens_per_s"] / results["llama"]["train_tokens_per_s"])
    return results, models["thl"], tok, val


# ----------------------------------------------------------------------------- int8
def decode_latency_ms(model, prompt, tokens=200) -> float:
    cache = strata.RecurrentCache(model.config.num_hidden_layers)
    times = []
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(tokens):
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run_int8(model, val) -> dict:
    q = quantize_int8(model)
    prompt = val[None, :256]
    rows = {}
    for label, m in (("float32", model), ("int8", q)):
        rows[label] = {"weight_mb": model_nbytes(m) / 2**20, "decode_ms_per_token_median": decode_latency_ms(m, prompt),
                       "val_bpc_streaming": bits_per_char_streams(m, val)}
        print(f"  {label:7s}: {rows[label]['weight_mb']:.2f} MB, {rows[label]['decode_ms_per_token_median']:.2f} "
              f"ms/token, val bpc {rows[label]['val_bpc_streaming']:.4f}", flush=True)
    rows["bpc_change"] = rows["int8"]["val_bpc_streaming"] - rows["float32"]["val_bpc_streaming"]
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="memory,train,int8")
    parser.add_argument("--lengths", default="1024,8192,32768")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--train-seconds", type=float, default=300.0)
    parser.add_argument("--val-chars", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 threads oversubscribe badly)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, length, decode, threads = args.child.split(":")
        print(json.dumps(memory_child(name, int(length), int(decode), int(threads))))
        return
    if args.quick:
        args.lengths, args.decode_tokens, args.train_seconds, args.val_chars = "256,512", 4, 5.0, 1024
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    results = {
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
        "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
        "models_memory_section": {n: describe(build(n, VOCAB)) for n in ("thl", "llama")},
    }
    print(json.dumps(results["models_memory_section"], indent=1), flush=True)
    if "memory" in sections:
        print("memory / latency", flush=True)
        results["memory"] = run_memory([int(x) for x in args.lengths.split(",")], args.decode_tokens, args.threads)
    thl = val = None
    if "train" in sections:
        print(f"training, {args.train_seconds:.0f} s each", flush=True)
        results["train"], thl, _, val = run_train(args.train_seconds, args.val_chars, args.lr)
    if "int8" in sections:
        if thl is None:
            tok, _, val = shakespeare_data()
            val = val[: args.val_chars + 1]
            thl = build("thl", len(tok)).eval()
        print("int8", flush=True)
        results["int8"] = run_int8(thl, val)
    results["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
