"""strata benchmarks (foundation issue, section 5): strata presets against Llama and HF Mamba.

    .venv/bin/python bench/run_all.py            # full run (~7 min on 2 quiet CPU cores)
    .venv/bin/python bench/run_all.py --max-foreign 0.1 --rerun-above 0.1 --wait 3600
                                                 # the same, on a machine shared with others
    .venv/bin/python bench/run_all.py --quick    # smaller shapes and fewer repeats (~3 min)
    .venv/bin/python bench/run_all.py --threads 1 --clock cpu --json ... --plot ...
                                                 # one thread, this process's CPU time
    .venv/bin/python bench/run_all.py --report docs/benchmarks_retmamba.json

Everything runs in one process, on the same shapes, with torch.set_num_threads(2), the
models of each comparison timed round-robin (see bench/harness.py):

1. training tokens/s (forward + backward + AdamW) and peak RSS of a step, every
   strata ``-small`` preset against ``LlamaForCausalLM`` at matched width/depth; HF
   ``MambaForCausalLM`` (a Python loop over positions on CPU: a few steps only) against
   strata's ``mamba`` preset at the same shape and at batch 1;
2. greedy decoding after prompts of 256 .. 16k tokens (batch 1): per-token latency and
   tokens/s of strata's block ``generate``, of the plain Transformers loop on the same
   model (``custom_generate=GenerationMixin._sample``, prompts 256 and 4096) and of
   Llama's / HF Mamba's own ``generate``; prefill tokens/s; cache size in bytes; peak
   RSS during prefill and decoding;
3. where a decoded token's time goes (weights, forward, loop), on the -small and -tiny
   presets, and the share of a training step spent in each strata kernel;
4. tables of ratios and of the targets (printed, and kept in the JSON with every
   number: docs/benchmarks_retmamba.json) and a PNG of throughput and cache size against
   context length (docs/figures/retmamba_throughput_vs_context.png).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402

import harness  # noqa: E402
import models  # noqa: E402

MB = 1024 * 1024

FULL = dict(
    train_batch=4, train_seq=256, train_warmup=2, train_steps=5,
    hf_mamba_seq=32, hf_mamba_steps=2,
    contexts=[256, 1024, 4096, 16384], hf_contexts=[256, 4096], new_tokens=64, repeats=3, tiny_new_tokens=128,
)
QUICK = dict(
    train_batch=2, train_seq=128, train_warmup=1, train_steps=3,
    hf_mamba_seq=16, hf_mamba_steps=1,
    contexts=[256, 1024, 4096], hf_contexts=[256, 4096], new_tokens=16, repeats=2, tiny_new_tokens=64,
)
TINY = dict(  # smoke test of the harness (tests/test_bench_smoke.py)
    train_batch=1, train_seq=32, train_warmup=1, train_steps=1,
    hf_mamba_seq=8, hf_mamba_steps=1,
    contexts=[32, 64], hf_contexts=[32, 64], new_tokens=4, repeats=1, tiny_new_tokens=4,
)

DECODE_MODELS = ["transformer", "retnet", "mamba", "hybrid", "fusion", "llama", "hf-mamba"]
TRAIN_MODELS = ["transformer", "retnet", "mamba", "hybrid", "fusion", "llama"]
HF_MAMBA = ["hf-mamba", "mamba"]  # the HF Mamba training comparison
TINY_MODELS = list(models.STRATA_FAMILIES)  # decode-time breakdown, -small and -tiny
KERNEL_MODELS = ["retnet", "mamba", "fusion"]  # kernel share of the training step


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------- sections


def run_training(settings, size, results):
    batch, seq = settings["train_batch"], settings["train_seq"]
    log(f"\n== training: batch {batch} x seq {seq} (forward + backward + AdamW), models interleaved, "
        f"median of {settings['train_steps']} steps")
    train = results.setdefault("train", {})
    named = {name: models.build(name, size) for name in TRAIN_MODELS}
    train.update(harness.train_round_robin(named, batch, seq, settings["train_steps"], settings["train_warmup"]))
    for name in named:
        r = train[name]
        log(f"  {name:12s} {r['tokens_per_s']:9.0f} tok/s   step {r['step_s'] * 1e3:7.1f} ms   "
            f"peak +{_mb(r['peak_rss_bytes'])} MB")
    del named
    gc.collect()

    # HF Mamba runs a Python loop over positions on CPU (tens of tokens/s): warmed up on a short
    # sequence, a few steps only, interleaved with strata's mamba preset on the same shape; then
    # at batch 1, where its loop is not amortised over rows.
    extra = results.setdefault("train_hf_mamba", {})
    for b, steps in ((batch, settings["hf_mamba_steps"]), (1, 1)):
        key = f"{b}x{seq}"
        if key in extra or not HF_MAMBA:
            continue
        log(f"== training, HF Mamba and strata mamba interleaved: batch {b} x seq {seq}, "
            f"median of {steps} HF step(s)")
        named = {name: models.build(name, size) for name in HF_MAMBA}
        steps_for = {name: steps if name == "hf-mamba" else settings["train_steps"] for name in named}
        runs = harness.train_round_robin(named, b, seq, steps_for, warmup=1,
                                         warmup_seq={"hf-mamba": settings["hf_mamba_seq"]})
        extra[key] = runs
        if b == batch and "hf-mamba" in runs:
            train["hf-mamba"] = runs["hf-mamba"]
        for name, r in runs.items():
            log(f"  {name:12s} {r['tokens_per_s']:9.1f} tok/s   step {r['step_s'] * 1e3:9.1f} ms   "
                f"peak +{_mb(r['peak_rss_bytes'])} MB")
        del named
        gc.collect()


def run_decoding(settings, size, results):
    log(f"\n== decoding: batch 1, greedy, {settings['new_tokens']} new tokens after a prompt, models interleaved, "
        f"median of {settings['repeats']}")
    decode = results.setdefault("decode", {})
    named = {name: models.build(name, size).eval() for name in DECODE_MODELS}
    for context in settings["contexts"]:
        tasks = {}
        for name, model in named.items():
            if name == "hf-mamba" and context not in settings["hf_contexts"]:
                continue
            modes = ["default"]
            if name in models.STRATA_FAMILIES and context in settings["hf_contexts"]:
                modes.append("hf")
            tasks[name] = harness.DecodeTask(model, context, modes)
        runs = harness.decode_round_robin(tasks, settings["new_tokens"], settings["repeats"],
                                          warm_prefill=context == settings["contexts"][0],
                                          prefill_repeats=settings["repeats"] if context <= 4096 else 1)
        for name, by_mode in runs.items():
            for mode, r in by_mode.items():
                decode.setdefault(name, {}).setdefault(mode, {})[str(context)] = r
                log(f"  {name:12s} {mode:7s} prompt {context:6d}: {r['ms_per_token']:7.2f} ms/token "
                    f"({r['tokens_per_s']:6.1f} tok/s)   prefill {r['prefill_tokens_per_s']:8.0f} tok/s   "
                    f"cache {r['state_bytes'] / MB:8.2f} MB   decode peak +{_mb(r['decode_peak_rss_bytes'])} MB")
        del tasks, runs
        gc.collect()
    del named
    gc.collect()


def run_kernel_share(settings, size, results):
    """Share of each training step spent in the strata kernels (see harness.kernel_share)."""
    log(f"\n== kernel share of a training step, batch {settings['train_batch']} x seq {settings['train_seq']}")
    out = results.setdefault("kernel_share", {})
    for name in KERNEL_MODELS:
        model = models.build(name, size)
        r = harness.kernel_share(model, settings["train_batch"], settings["train_seq"], repeats=settings["repeats"])
        out[name] = r
        parts = ", ".join(f"{k} {v['fwd_bwd_s'] * 1e3:.0f} ms ({v['share_of_step']:.0%})"
                          for k, v in r.items() if isinstance(v, dict))
        log(f"  {name:12s} step {r['step_s'] * 1e3:7.0f} ms: {parts}")
        del model
        gc.collect()


def run_breakdown(settings, size, results):
    """Per-token decode time split into weights, model forward and loop (harness.decode_breakdown)."""
    prompt = settings["contexts"][0]
    sizes = [size] + (["tiny"] if size != "tiny" else [])
    log(f"\n== where a decoded token's time goes: prompt {prompt}, {settings['tiny_new_tokens']} new tokens")
    out = results.setdefault("breakdown", {})
    for sz in sizes:
        for name in TINY_MODELS:
            model = models.build(name, sz).eval()
            r = harness.decode_breakdown(model, prompt, settings["tiny_new_tokens"], settings["repeats"])
            r["parameters"] = models.num_parameters(model)
            out[f"{name}-{sz}"] = r
            log(f"  {name + '-' + sz:18s} linears {r['linears_ms']:6.3f} ms ({r['linear_weights_mb']:5.1f} MB)   "
                f"forward {r['forward_ms']:6.3f}   block {r['block_ms']:6.3f}   HF loop {r['hf_ms']:6.3f} ms/token   "
                f"block x{r['block_x_hf']:.2f} (bound x{r['block_x_hf_bound']:.2f})")
            del model
            gc.collect()


# ----------------------------------------------------------------------------- summary


def _mb(value):
    return "  n/a" if value is None else f"{value / MB:5.1f}"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarize(results, settings):
    params = results["models"]
    train, decode = results.get("train", {}), results.get("decode", {})
    hfm = results.get("train_hf_mamba", {})
    lo, hi = str(settings["hf_contexts"][0]), str(settings["hf_contexts"][-1])
    rows = []
    for name in models.STRATA_FAMILIES:
        ref = "hf-mamba" if name == "mamba" else "llama"
        row = {"model": name, "reference": ref, "parameters": params[name]["parameters"],
               "ref_parameters": params[ref]["parameters"]}
        pair = train if name != "mamba" else hfm.get(f"{settings['train_batch']}x{settings['train_seq']}", {})
        row["train_x_ref"] = _ratio(_get(pair, name, "tokens_per_s"), _get(pair, ref, "tokens_per_s"))
        row["train_peak_x_ref"] = _ratio(_get(pair, name, "peak_rss_bytes"), _get(pair, ref, "peak_rss_bytes"))
        row["train_x_llama"] = _ratio(_get(train, name, "tokens_per_s"), _get(train, "llama", "tokens_per_s"))
        row["train_tokens_per_s"] = _get(train, name, "tokens_per_s")
        for ctx in (lo, hi):
            tps = _get(decode, name, "default", ctx, "tokens_per_s")
            row[f"decode_tps_{ctx}"] = tps
            row[f"decode_x_ref_{ctx}"] = _ratio(tps, _get(decode, ref, "default", ctx, "tokens_per_s"))
            row[f"decode_x_llama_{ctx}"] = _ratio(tps, _get(decode, "llama", "default", ctx, "tokens_per_s"))
            row[f"block_x_hf_{ctx}"] = _ratio(tps, _get(decode, name, "hf", ctx, "tokens_per_s"))
            row[f"state_x_ref_{ctx}"] = _ratio(_get(decode, name, "default", ctx, "state_bytes"),
                                               _get(decode, ref, "default", ctx, "state_bytes"))
            row[f"decode_peak_x_ref_{ctx}"] = _ratio(_get(decode, name, "default", ctx, "decode_peak_rss_bytes"),
                                                     _get(decode, ref, "default", ctx, "decode_peak_rss_bytes"))
        row["latency_hi_over_lo"] = _ratio(_get(decode, name, "default", hi, "ms_per_token"),
                                           _get(decode, name, "default", lo, "ms_per_token"))
        rows.append(row)
    results["summary"] = rows

    targets = []

    def target(name, value, threshold, op=">="):
        ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        targets.append({"target": name, "value": value, "threshold": f"{op} {threshold}", "met": ok})

    by = {r["model"]: r for r in rows}
    target("transformer training tokens/s vs Llama", by["transformer"]["train_x_ref"], 0.9)
    for key, runs in hfm.items():
        target(f"mamba training tokens/s vs HF Mamba, batch x seq {key}",
               _ratio(_get(runs, "mamba", "tokens_per_s"), _get(runs, "hf-mamba", "tokens_per_s")), 50)
    target("mamba training tokens/s vs transformer preset",
           _ratio(_get(train, "mamba", "tokens_per_s"), _get(train, "transformer", "tokens_per_s")), 0.5)
    p_m, p_t = params["mamba"]["parameters"], params["transformer"]["parameters"]
    target("mamba vs transformer, per parameter (tokens/s x params)",
           _ratio(_get(train, "mamba", "tokens_per_s") and _get(train, "mamba", "tokens_per_s") * p_m,
                  _get(train, "transformer", "tokens_per_s") and _get(train, "transformer", "tokens_per_s") * p_t), 0.5)
    for name in models.RECURRENT_FAMILIES:
        target(f"{name}: latency/token at {hi} vs {lo} prompt", by[name]["latency_hi_over_lo"], 1.2, "<=")
        sizes = [r["state_bytes"] for r in _get(decode, name, "default").values()] if _get(decode, name, "default") else []
        flat = (max(sizes) / min(sizes)) if sizes else None
        target(f"{name}: cache bytes, largest / smallest context", flat, 1.0, "<=")
    for name in models.STRATA_FAMILIES:
        for ctx in (lo, hi):
            target(f"{name}: block generate vs HF generate, greedy tokens/s, prompt {ctx}",
                   by[name][f"block_x_hf_{ctx}"], 2.0)
    for name, runs in results.get("breakdown", {}).items():
        if name.endswith("-tiny"):
            target(f"{name}: block generate vs HF generate, greedy tokens/s, prompt {runs['prompt_len']}",
                   runs["block_x_hf"], 2.0)
    results["targets"] = targets


def _fmt(value, spec=".2f", none="-"):
    return none if value is None else format(value, spec)


def print_tables(results, settings):
    params = results["models"]
    train, decode = results.get("train", {}), results.get("decode", {})
    lo, hi = str(settings["hf_contexts"][0]), str(settings["hf_contexts"][-1])
    lines = []
    add = lines.append
    meta = results["meta"]
    add(f"\nmachine load average (1, 5, 15 min): start {meta['load_start']}  end {meta.get('load_end')}; "
        "share of the CPUs used by other processes during each section: "
        + ", ".join(f"{k} {v:.0%}" for k, v in meta.get("foreign_cpu", {}).items())
        + "; during the kept timed runs (median / max): "
        + ", ".join(f"{k} {v['foreign_median']:.0%} / {v['foreign_max']:.0%} ({v['rerun']} rerun)"
                    for k, v in meta.get("timed_runs", {}).items()))
    add(f"\ntraining, batch {settings['train_batch']} x seq {settings['train_seq']}; HF Mamba: "
        f"{settings['hf_mamba_steps']} step(s) after a warm-up at seq {settings['hf_mamba_seq']}, interleaved with "
        "strata's mamba (rows 'paired'), and at batch 1")
    add("| model | params | train tok/s | peak RSS MB | x Llama tok/s | x Llama peak |")
    add("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in TRAIN_MODELS:
        r = train.get(name)
        if r is None:
            continue
        ll = train.get("llama", {})
        add(f"| {name} | {params[name]['parameters'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | "
            f"{_mb(r['peak_rss_bytes']).strip()} | {_fmt(_ratio(r['tokens_per_s'], ll.get('tokens_per_s')))} | "
            f"{_fmt(_ratio(r['peak_rss_bytes'], ll.get('peak_rss_bytes')))} |")
    for key, runs in results.get("train_hf_mamba", {}).items():
        for name in ("hf-mamba", "mamba"):
            r = runs.get(name)
            if r is None or (name in TRAIN_MODELS and r is train.get(name)):
                continue
            ll = train.get("llama", {}) if key == f"{settings['train_batch']}x{settings['train_seq']}" else {}
            add(f"| {name} ({key}, paired) | {params[name]['parameters'] / 1e6:.2f}M | {r['tokens_per_s']:.1f} | "
                f"{_mb(r['peak_rss_bytes']).strip()} | {_fmt(_ratio(r['tokens_per_s'], ll.get('tokens_per_s')))} | "
                f"{_fmt(_ratio(r['peak_rss_bytes'], ll.get('peak_rss_bytes')))} |")

    add(f"\ndecoding, batch 1, greedy, {settings['new_tokens']} new tokens: tokens/s (ms/token)")
    ctxs = [str(c) for c in settings["contexts"]]
    add("| model | mode | " + " | ".join(f"prompt {c}" for c in ctxs) + " | cache MB (largest prompt) |")
    add("| --- | --- | " + " | ".join("---:" for _ in ctxs) + " | ---: |")
    for name in DECODE_MODELS:
        for mode, label in (("default", "generate" if name in models.REFERENCES else "block generate"),
                            ("hf", "HF _sample loop")):
            runs = _get(decode, name, mode)
            if not runs:
                continue
            cells = []
            for c in ctxs:
                r = runs.get(c)
                cells.append("" if r is None else f"{r['tokens_per_s']:.1f} ({r['ms_per_token']:.2f})")
            last = runs[max(runs, key=int)]
            add(f"| {name} | {label} | " + " | ".join(cells) + f" | {last['state_bytes'] / MB:.2f} |")

    add(f"\nratios (strata preset / reference; reference = HF Mamba for mamba, else Llama)")
    add(f"| model | ref | train tok/s | train peak | decode tok/s @{lo} | @{hi} | x Llama @{lo} | @{hi} | "
        f"cache bytes @{hi} | decode peak @{hi} | block/HF loop @{lo} | @{hi} | latency {hi}/{lo} |")
    add("| --- | --- |" + " ---: |" * 11)
    for row in results["summary"]:
        add(f"| {row['model']} | {row['reference']} | {_fmt(row['train_x_ref'])} | {_fmt(row['train_peak_x_ref'])} | "
            f"{_fmt(row[f'decode_x_ref_{lo}'])} | {_fmt(row[f'decode_x_ref_{hi}'])} | "
            f"{_fmt(row[f'decode_x_llama_{lo}'])} | {_fmt(row[f'decode_x_llama_{hi}'])} | "
            f"{_fmt(row[f'state_x_ref_{hi}'], '.3f')} | {_fmt(row[f'decode_peak_x_ref_{hi}'])} | "
            f"{_fmt(row[f'block_x_hf_{lo}'])} | {_fmt(row[f'block_x_hf_{hi}'])} | {_fmt(row['latency_hi_over_lo'])} |")

    shares = results.get("kernel_share", {})
    if shares:
        add(f"\nkernel share of a training step (batch {settings['train_batch']} x seq {settings['train_seq']}): "
            "each kernel's calls replayed alone, forward + backward")
        add("| preset | step ms | kernel | calls | fwd+bwd ms | share |")
        add("| --- | ---: | --- | ---: | ---: | ---: |")
        for name, r in shares.items():
            for k, v in r.items():
                if isinstance(v, dict):
                    add(f"| {name} | {r['step_s'] * 1e3:.0f} | {k} | {v['calls_per_step']} | "
                        f"{v['fwd_bwd_s'] * 1e3:.0f} | {v['share_of_step']:.0%} |")

    brk = results.get("breakdown", {})
    if brk:
        add("\nwhere a decoded token's time goes (ms/token, batch 1, prompt "
            f"{next(iter(brk.values()))['prompt_len']}): linears = every weight applied once (weight streaming); "
            "forward = plain loop of one-token forwards; bound = HF loop / forward")
        add("| preset | params | weights MB | linears | forward | block generate | HF loop | block x HF | bound |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, r in brk.items():
            add(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['linear_weights_mb']:.1f} | {r['linears_ms']:.3f} | "
                f"{r['forward_ms']:.3f} | {r['block_ms']:.3f} | {r['hf_ms']:.3f} | {r['block_x_hf']:.2f} | "
                f"{r['block_x_hf_bound']:.2f} |")

    add("\ntargets")
    add("| target | measured | threshold | met |")
    add("| --- | ---: | --- | --- |")
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        add(f"| {t['target']} | {_fmt(t['value'])} | {t['threshold']} | {met} |")
    text = "\n".join(lines)
    log(text)
    return text


def plot(results, settings, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = results.get("decode", {})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for name in DECODE_MODELS:
        runs = _get(decode, name, "default")
        if not runs:
            continue
        ctx = sorted(int(c) for c in runs)
        style = dict(marker="o", linestyle="--" if name in models.REFERENCES else "-", label=name)
        axes[0].plot(ctx, [runs[str(c)]["tokens_per_s"] for c in ctx], **style)
        axes[1].plot(ctx, [runs[str(c)]["prefill_tokens_per_s"] for c in ctx], **style)
        axes[2].plot(ctx, [runs[str(c)]["state_bytes"] / MB for c in ctx], **style)
    titles = ("greedy decoding (batch 1): tokens/s", "prefill: tokens/s", "cache size after the prompt: MB")
    ticks = [int(c) for c in settings["contexts"]]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{c // 1024}k" if c >= 1024 else str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context (prompt) length, tokens")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend()
    meta = results["meta"]
    ref = results["models"]["transformer"]
    fig.suptitle(f"strata -{meta['size']} presets vs Llama / HF Mamba (hidden {ref['hidden_size']}, "
                 f"{ref['num_hidden_layers']} layers, batch 1, fp32), {meta['threads']} CPU thread(s), {meta.get('clock', 'wall')} clock, "
                 f"load {meta['load_start'][0]} -> {meta.get('load_end', ['?'])[0]}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"plot: {path}")


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats (~3 min)")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="print the tables of a saved results file and exit (nothing is run)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="preset size")
    parser.add_argument("--sections", default="train,decode,breakdown,kernels",
                        help="comma list of: train, decode, breakdown (where a decoded token's time goes, "
                             "also on the -tiny presets), kernels (kernel share of a training step)")
    parser.add_argument("--models", default=None,
                        help="comma list restricting the models timed (default: all), e.g. transformer,llama")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time by this process's CPU time (needs --threads 1), robust to other processes")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default docs/benchmarks_retmamba.json; --quick: bench/results/quick.json)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG (default docs/figures/retmamba_throughput_vs_context.png; "
                             "--quick: bench/results/quick.png)")
    parser.add_argument("--max-foreign", type=float, default=None,
                        help="wait (up to --wait seconds) until other processes use less than this fraction "
                             "of the CPUs (e.g. 0.1), measured over 10 s")
    parser.add_argument("--wait", type=float, default=600.0)
    parser.add_argument("--rerun-above", type=float, default=None,
                        help="throw away and rerun (up to 3 times) a timed run during which other processes used "
                             "more than this fraction of the CPUs (default with --max-foreign: max(0.25, it))")
    args = parser.parse_args(argv)

    if args.report is not None:
        results = json.loads(args.report.read_text())
        summarize(results, results["meta"]["settings"])
        print_tables(results, results["meta"]["settings"])
        return results
    settings = dict(TINY if args.tiny else QUICK if args.quick else FULL)
    default_json = ROOT / ("bench/results/quick.json" if (args.quick or args.tiny) else
                           "docs/benchmarks_retmamba.json")
    default_png = ROOT / ("bench/results/quick.png" if (args.quick or args.tiny) else
                          "docs/figures/retmamba_throughput_vs_context.png")
    json_path, png_path = args.json or default_json, args.plot or default_png

    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1")
    harness.set_clock(args.clock)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    gc.collect()
    gc.freeze()  # the objects of the imported libraries: later collections (before every memory reading) stay cheap
    try:
        return _run(args, settings, json_path, png_path, argv)
    finally:
        gc.unfreeze()


def _run(args, settings, json_path, png_path, argv):
    if args.max_foreign is not None:
        harness.wait_for_quiet(args.max_foreign, args.wait, log=log)
        harness.MAX_FOREIGN = args.rerun_above if args.rerun_above is not None else max(0.25, args.max_foreign)
    elif args.rerun_above is not None:
        harness.MAX_FOREIGN = args.rerun_above

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join([".venv/bin/python bench/run_all.py"] + given)
    results = {
        "meta": {
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "size": args.size,
            "settings": settings,
            "load_start": list(harness.load_average()),
            "uptime_start": harness.uptime_line(),
        },
        "models": {},
    }
    log(f"strata bench: {command}\n  {results['meta']['uptime_start']}  threads {torch.get_num_threads()}")
    started = time.time()
    for name in models.STRATA_FAMILIES + models.REFERENCES:
        model = models.build(name, args.size)
        results["models"][name] = models.describe(model)
        del model
    for name, d in results["models"].items():
        log(f"  {name:12s} {d['class']:22s} {d['parameters'] / 1e6:6.2f}M parameters, hidden {d['hidden_size']}, "
            f"{d['num_hidden_layers']} layers")

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.models:
        keep = {m.strip() for m in args.models.split(",")}
        TRAIN_MODELS[:] = [m for m in TRAIN_MODELS if m in keep]
        DECODE_MODELS[:] = [m for m in DECODE_MODELS if m in keep]
        HF_MAMBA[:] = [m for m in HF_MAMBA if m in keep]
        TINY_MODELS[:] = [m for m in TINY_MODELS if m in keep]
        KERNEL_MODELS[:] = [m for m in KERNEL_MODELS if m in keep]
    runners = {"train": run_training, "decode": run_decoding, "breakdown": run_breakdown,
               "kernels": run_kernel_share}
    foreign = results["meta"]["foreign_cpu"] = {}
    kept = results["meta"]["timed_runs"] = {}
    for section in sections:
        before = harness.CpuSnapshot()
        harness.STATS.update(runs=0, retries=0, foreign=[])
        runners[section](settings, args.size, results)
        after = harness.CpuSnapshot()
        foreign[section] = round(after.foreign_since(before), 3)
        shares = sorted(harness.STATS["foreign"]) or [0.0]
        kept[section] = {"runs": harness.STATS["runs"], "rerun": harness.STATS["retries"],
                         "foreign_median": round(statistics.median(shares), 3), "foreign_max": round(shares[-1], 3)}
        log(f"  [{section}: {after.wall - before.wall:.0f} s; other processes used {foreign[section]:.0%} "
            f"of the CPUs meanwhile (kept timed runs: median {kept[section]['foreign_median']:.0%}, "
            f"max {kept[section]['foreign_max']:.0%}; {kept[section]['rerun']} runs thrown away and rerun); "
            f"load {harness.load_average()[0]}]")

    results["meta"]["load_end"] = list(harness.load_average())
    results["meta"]["uptime_end"] = harness.uptime_line()
    results["meta"]["elapsed_s"] = round(time.time() - started, 1)
    if {"train", "decode"} <= set(sections):
        summarize(results, settings)
        results["table"] = print_tables(results, settings)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    log(f"\nresults: {json_path}  ({results['meta']['elapsed_s']} s; {results['meta']['uptime_end']})")
    if "decode" in sections:
        plot(results, settings, png_path)
    return results


if __name__ == "__main__":
    main()
