"""MT-HOPE against the foundation's `transformer` and `mamba` presets, in one run (CPU).

Models (character vocabulary of tinyshakespeare, ~400 ids):
- ``mt_hope``: preset ``small`` (dim 128: stream 256 wide, 2 recurrent blocks, Titans
  test-time memory, slot memory, 3 continuum-memory levels);
- ``transformer`` / ``mamba``: RetMamba presets ``transformer-small`` / ``mamba-small``
  (hidden 256) with 3 blocks and the MLP width chosen so that the parameter count
  matches ``mt_hope`` (counts are printed and saved);
- ablations of ``mt_hope``: ``no_mobius`` (use_mobius=False), ``no_memory_system``
  (use_memory_system=False), ``no_test_time_memory`` (use_neural_memory=False).

Sections:
- ``train``: every model trains for ``--train-seconds`` (equal budget; by default of this
  process's CPU time, which with one thread equals the wall-clock of a quiet machine and
  is not eaten by other processes on a shared one; ``--budget wall`` for wall-clock) on
  random 128-character blocks of the training split (batch 16, AdamW lr 2e-3, 30 warm-up
  steps, clipping 1.0); reported: steps, training tokens/s (wall and CPU time of this
  process), validation bits per character on 128-character blocks of the first
  ``--val-chars`` characters of the validation split.
- ``latency``: per-token greedy decoding latency (median of ``--decode-tokens`` one-token
  forwards through the cache, wall and CPU time, the three models' steps interleaved)
  after prompts of 256 and 4096 tokens,
  for mt_hope, transformer and mamba (freshly initialised; latency does not depend on
  the weights).
- ``continual`` (not in the default sections): mt_hope trains for ``--train-seconds``, then
  ``continual_update`` reads an unseen validation passage (2,048 characters, 2 passes);
  loss on it and on old training text before and after (forgetting).

One torch thread. The machine is shared with other processes: CPU time is reported
next to wall time, and the load average at start and end.

usage: .venv/bin/python bench/mt_hope.py [--sections train,latency] [--train-seconds 120]
       [--json bench/results/mt_hope.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import strata  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIXER = {"transformer": "A", "mamba": "M"}
ABLATIONS = {
    "no_mobius": dict(use_mobius=False),
    "no_memory_system": dict(use_memory_system=False),
    "no_test_time_memory": dict(use_neural_memory=False),
}


# ----------------------------------------------------------------------------- models
def num_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def mt_hope(vocab: int, preset: str = "small", **overrides):
    return strata.MTHopeForCausalLM(strata.MTHopeConfig.from_preset(preset, vocab_size=vocab, **overrides))


def matched_baseline(family: str, vocab: int, target: int, layers: int = 3):
    """RetMamba ``<family>-small`` with ``layers`` blocks, MLP width (multiple of 64) matching ``target``."""
    best = None
    for inter in range(64, 4097, 64):
        cfg = strata.RetMambaConfig.from_preset(f"{family}-small", vocab_size=vocab, layer_pattern=MIXER[family] * layers,
                                                intermediate_size=inter, max_position_embeddings=32768)
        with torch.device("meta"):
            n = num_parameters(strata.RetMambaForCausalLM(cfg))
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, cfg)
    return strata.RetMambaForCausalLM(best[1])


def build_all(vocab: int, names) -> dict:
    torch.manual_seed(0)
    models = {"mt_hope": mt_hope(vocab)}
    target = num_parameters(models["mt_hope"])
    for name in names:
        torch.manual_seed(0)
        if name in ("transformer", "mamba"):
            models[name] = matched_baseline(name, vocab, target)
        elif name in ABLATIONS:
            models[name] = mt_hope(vocab, **ABLATIONS[name])
    return {k: v for k, v in models.items() if k in names}


def describe(model) -> dict:
    c = model.config
    return {"class": type(model).__name__, "parameters": num_parameters(model), "hidden_size": c.hidden_size,
            "layer_pattern": c.layer_pattern, "intermediate_size": getattr(c, "intermediate_size", None)}


# ----------------------------------------------------------------------------- data / training
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


@torch.no_grad()
def bits_per_char_blocks(model, val, block=128, batch=32) -> float:
    model.eval()
    n = (val.numel() - 1) // block
    x = val[: n * block].view(n, block)
    y = val[1 : n * block + 1].view(n, block)
    total = 0.0
    for s in range(0, n, batch):
        logits = model(x[s : s + batch], use_cache=False).logits
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y[s : s + batch].reshape(-1),
                                 reduction="sum").item()
    return total / (n * block) / math.log(2)


def train_for(model, train, seconds, batch=16, length=128, lr=2e-3, warmup=30, budget="cpu", max_steps=None) -> dict:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    g = torch.Generator().manual_seed(0)
    steps, losses = 0, []
    measured_tokens, measured_wall, measured_cpu = 0, 0.0, 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    spent = (lambda: time.process_time() - cpu_start) if budget == "cpu" else (lambda: time.perf_counter() - start)
    while (spent() < seconds) if max_steps is None else (steps < max_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = torch.randint(0, train.numel() - length - 1, (batch,), generator=g)
        x = torch.stack([train[i : i + length] for i in idx.tolist()])
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        losses.append(loss.item())
        if steps > 3:  # exclude warm-up steps from the throughput
            measured_tokens += batch * length
            measured_wall += time.perf_counter() - t0
            measured_cpu += time.process_time() - c0
    model.eval()
    return {"steps": steps, "train_tokens": steps * batch * length, "train_seconds": time.perf_counter() - start,
            "train_cpu_seconds": time.process_time() - cpu_start, "budget": budget,
            "train_tokens_per_s": measured_tokens / max(measured_wall, 1e-9),
            "train_tokens_per_cpu_s": measured_tokens / max(measured_cpu, 1e-9),
            "final_train_loss_nats": statistics.mean(losses[-20:])}


def run_train(names, seconds, val_chars, budget="cpu", max_steps=None) -> dict:
    tok, train, val = shakespeare_data()
    val = val[: val_chars + 1]
    models = build_all(len(tok), names)
    if not models:
        raise ValueError(f"no known model in {names}; choose from mt_hope, transformer, mamba, {', '.join(ABLATIONS)}")
    results = {}
    for name, model in models.items():
        row = {"model": describe(model), **train_for(model, train, seconds, budget=budget, max_steps=max_steps)}
        row["val_bpc"] = bits_per_char_blocks(model, val)
        results[name] = row
        print(f"  {name:20s} {row['model']['parameters']:>9,d} params: {row['steps']:4d} steps, "
              f"{row['train_tokens_per_s']:6.0f} tok/s (cpu {row['train_tokens_per_cpu_s']:6.0f}), "
              f"val bpc {row['val_bpc']:.3f}", flush=True)
    if "mt_hope" in results:
        base = results["mt_hope"]["val_bpc"]
        results["ablation_delta_bpc"] = {k: results[k]["val_bpc"] - base for k in ABLATIONS if k in results}
    return results


# ----------------------------------------------------------------------------- latency
@torch.no_grad()
def decode_latency(models: dict, prompt_len: int, tokens: int, vocab: int) -> dict:
    """Per-token latency of every model after the same prompt; the models' steps are interleaved
    (A B C A B C ...) so that load from other processes hits all of them alike."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, vocab, (1, prompt_len), generator=g)
    caches, tokens_now, rows = {}, {}, {}
    for name, model in models.items():
        model.eval()
        cache = strata.RecurrentCache(model.config.num_hidden_layers)
        t0 = time.perf_counter()
        for s in range(0, prompt_len, 1024):  # prefill in chunks through the cache
            out = model(prompt[:, s : s + 1024], past_key_values=cache, use_cache=True, logits_to_keep=1)
        rows[name] = {"prompt": prompt_len, "prefill_s": time.perf_counter() - t0, "wall": [], "cpu": []}
        caches[name], tokens_now[name] = cache, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(tokens):
        for name, model in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(tokens_now[name], past_key_values=caches[name], use_cache=True)
            tokens_now[name] = out.logits[:, -1].argmax(-1, keepdim=True)
            rows[name]["wall"].append(time.perf_counter() - t0)
            rows[name]["cpu"].append(time.process_time() - c0)
    for name, row in rows.items():
        wall, cpu = row.pop("wall"), row.pop("cpu")
        row["decode_ms_per_token"] = 1e3 * statistics.median(wall)
        row["decode_cpu_ms_per_token"] = 1e3 * statistics.median(cpu)
        row["state_bytes"] = sum(t.numel() * t.element_size() for layer in caches[name].layers
                                 for t in layer.tensors.values())
    return rows


def run_latency(prompts, tokens, vocab=400) -> dict:
    models = build_all(vocab, ("mt_hope", "transformer", "mamba"))
    results = {name: [] for name in models}
    for p in prompts:
        for name, row in decode_latency(models, p, tokens, vocab).items():
            results[name].append(row)
    for name, rows in results.items():
        print("  " + name + ": " + ", ".join(
            f"prompt {r['prompt']}: {r['decode_ms_per_token']:.2f} ms/token (cpu {r['decode_cpu_ms_per_token']:.2f}),"
            f" state {r['state_bytes'] / 2**20:.2f} MB" for r in rows), flush=True)
    results["growth_last_over_first"] = {
        name: rows[-1]["decode_ms_per_token"] / rows[0]["decode_ms_per_token"] for name, rows in results.items()}
    return results


# ----------------------------------------------------------------------------- continual learning
def run_continual(seconds, new_chars=2048, heldout_chars=2048, segment=128, lr=1e-3, epochs=2) -> dict:
    """Train mt_hope briefly, then ``continual_update`` on an unseen validation passage.

    New text: validation characters [20000, 20000 + new_chars); held-out old text: the
    training split's first ``heldout_chars`` characters (seen in training). Reported:
    losses (nats/token) before and after on both, forgetting = held-out change.
    """
    tok, train, val = shakespeare_data()
    torch.manual_seed(0)
    model = mt_hope(len(tok))
    row = train_for(model, train, seconds)
    report = model.continual_update(val[20000 : 20000 + new_chars], heldout=train[:heldout_chars],
                                    segment_length=segment, lr=lr, epochs=epochs)
    out = {"pretrain_steps": row["steps"], "segment_length": segment, "lr": lr, "epochs": epochs,
           "cms_periods": model.config.cms_periods, **report}
    print(f"  continual_update: new text {report['new_loss_before']:.3f} -> {report['new_loss_after']:.3f} nats, "
          f"held-out {report['heldout_loss_before']:.3f} -> {report['heldout_loss_after']:.3f} "
          f"(forgetting {report['forgetting']:+.3f}), updates per level {report['updates_per_level']}", flush=True)
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="train,latency")
    parser.add_argument("--models", default="mt_hope,transformer,mamba," + ",".join(ABLATIONS))
    parser.add_argument("--train-seconds", type=float, default=120.0)
    parser.add_argument("--val-chars", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=None,
                        help="train every model for this many steps instead of a time budget (equal-steps ablation)")
    parser.add_argument("--budget", default="cpu", choices=("cpu", "wall"),
                        help="what --train-seconds counts: this process's CPU time (default; with one thread it is "
                             "the wall-clock of a quiet machine) or wall-clock")
    parser.add_argument("--prompts", default="256,4096")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run (seconds)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_seconds, args.val_chars, args.prompts, args.decode_tokens = 3.0, 512, "64,128", 3
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    results = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
               "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "args": vars(args)}
    if "train" in sections:
        print(f"training, {args.steps} steps each" if args.steps else
              f"training, {args.train_seconds:.0f} s of {args.budget} time each", flush=True)
        results["train"] = run_train(args.models.split(","), args.train_seconds, args.val_chars, args.budget,
                                     args.steps)
    if "latency" in sections:
        print("decode latency", flush=True)
        results["latency"] = run_latency([int(p) for p in args.prompts.split(",")], args.decode_tokens)
    if "continual" in sections:
        print(f"continual learning after {args.train_seconds:.0f} s of training", flush=True)
        results["continual"] = run_continual(args.train_seconds)
    results["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k in ("load_average_start", "load_average_end")}))


if __name__ == "__main__":
    main()
