"""H-M-T-R against a GPT-style baseline of equal parameter count, on tinyshakespeare (CPU).

Sections (all by default), every model on one CPU thread (the machine is shared: the load
average is recorded before and after every section):

- ``recon``: stage 1 of the curriculum (autoencoder: encoder + decoder rebuild every block
  from its own capsule) at K = 4 and K = 8, ``--s1-seconds`` of wall-clock each; token
  reconstruction accuracy on the validation windows (capsule mean, no dropout).
- ``lm``: the K = 8 curriculum: the stage-1 model from ``recon``, then stage 2 (capsules
  precomputed by the frozen encoder, the reasoner trained ``--s2-seconds``), then stage 3
  (joint fine-tune, ``--s3-seconds``). The baseline (strata's Transformer: RoPE attention +
  SwiGLU blocks, width 256, depth and MLP width chosen for the closest parameter count)
  trains for the same total wall-clock as the whole curriculum (the training time of stages
  1, 2 and 3 plus the capsule precompute). Both see the same 128-token windows (random offsets, batch 16,
  AdamW, warmup then cosine over the time budget, peak lr: see BASELINE_LR / HMTR_LR) and are evaluated with the
  exact next-token loss on the same validation windows (bits per character). With
  ``--ablation`` H-M-T-R is also trained jointly from scratch for the same total time
  (no curriculum). ``--baseline-depths 5,9`` trains one baseline per depth instead and
  compares with the best of them.
- ``baselines``: only the baselines of ``--baseline-depths``, for the curriculum of the
  ``lm`` results already in ``--json`` (same budget, same H-M-T-R model in ``--out``).
- ``generate``: greedy decoding after a 2048-token prompt (the start of the validation
  text): decode tokens/s (time of ``generate(n + 1)`` minus ``generate(1)``, best of 2) and
  prefill time, for the trained K = 8 model, the K = 4 stage-1 model and the baseline; the
  reasoner's key/value cache (one entry per block) against the baseline's (one per token).

usage: .venv/bin/python bench/hmtr.py [--sections recon,lm,generate] [--s1-seconds 240]
       [--s2-seconds 60] [--s3-seconds 240] [--ablation] [--out bench/results/hmtr]
       [--json bench/results/hmtr.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package that transformers probes for: keep bench/ off the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import TrainingArguments, default_data_collator  # noqa: E402

import strata  # noqa: E402
from strata.training.hmtr_data import prepare_hmtr_data  # noqa: E402
from strata.training.hmtr_train import (  # noqa: E402
    HMTRStageTrainer,
    lm_metrics,
    load_stage_folder,
    reconstruction_metrics,
    train_hmtr_stage,
)
from strata.training.train import TimeBudgetCallback  # noqa: E402

SEQ_LEN, BATCH = 128, 16
# Peak learning rates: each model's better of {1e-3, 3e-3} in 240-second probes on this machine
# (baseline: 2.93 vs 2.98 bpc; H-M-T-R joint: 3.16 vs 3.40 bpc). Stage 1 uses 3e-3, stage 2 1e-3.
BASELINE_LR, HMTR_LR = 1e-3, 3e-3
HMTR_PRESET = "small"
PROMPT, NEW_TOKENS = 2048, 256
BASELINE_DEPTHS = range(2, 13)  # the baseline's depth is searched here unless --baseline-depths says


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def num_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def baseline_config(vocab: int, target: int, depths=BASELINE_DEPTHS):
    """strata's Transformer (width 256, 4 heads) whose depth (among ``depths``) and MLP width come closest to ``target``."""
    best = None
    for layers in depths:
        for inter in range(256, 2049, 64):
            cfg = strata.RetMambaConfig.from_preset("transformer-small", vocab_size=vocab, layer_pattern="A", num_hidden_layers=layers,
                                                    intermediate_size=inter, pad_token_id=0, bos_token_id=1,
                                                    eos_token_id=2, block_size=8)
            d = cfg.hidden_size
            params = vocab * d + layers * (4 * d * d + 3 * d * inter + 2 * d) + d
            if best is None or abs(params - target) < abs(best[0] - target):
                best = (params, cfg)
    return best[1]


def stage_kwargs(quick: bool) -> dict:
    return dict(seq_len=SEQ_LEN, batch_size=BATCH, max_steps=100_000, logging_steps=20, progress=False,
                use_cpu=True, eval_max_windows=64 if quick else None)


# ----------------------------------------------------------------------------- sections
def section_recon(args, out: Path) -> dict:
    res = {"load_before": load()}
    for K in (int(k) for k in args.recon_blocks.split(",")):
        t = time.monotonic()
        r = train_hmtr_stage(1, out / f"hmtr-k{K}-stage1", preset=args.preset, config_overrides={**args.set, "block_size": K},
                             time_budget_s=args.s1_seconds, **stage_kwargs(args.quick))
        res[f"k{K}"] = dict(accuracy=r.metrics["eval_reconstruction_accuracy"],
                            tokens=r.metrics["eval_reconstruction_tokens"], steps=r.metrics["train_steps"],
                            train_s=r.metrics["train_runtime_s"], wall_s=time.monotonic() - t,
                            parameters=r.metrics["parameters"], load_after=load())
        print(f"stage 1, K={K}: reconstruction accuracy {r.metrics['eval_reconstruction_accuracy']:.5f} "
              f"over {r.metrics['eval_reconstruction_tokens']} validation tokens, {r.metrics['train_steps']} steps, "
              f"load {load()}", flush=True)
    return res


def train_baseline(args, tok, data, target_params: int, seconds: float, out: Path, depths=BASELINE_DEPTHS) -> dict:
    cfg = baseline_config(len(tok), target_params, depths)
    torch.manual_seed(0)
    model = strata.RetMambaForCausalLM(cfg)
    targs = TrainingArguments(output_dir=str(out.parent / "baseline-checkpoints"), max_steps=100_000,
                              per_device_train_batch_size=BATCH, learning_rate=BASELINE_LR, warmup_steps=20, adam_beta2=0.99,
                              max_grad_norm=1.0, logging_steps=20, save_strategy="no", report_to="none", use_cpu=True,
                              disable_tqdm=True, seed=0, remove_unused_columns=False)
    trainer = HMTRStageTrainer(model=model, args=targs, train_dataset=data.train, data_collator=default_data_collator,
                               callbacks=[TimeBudgetCallback(seconds)], time_budget_s=seconds, stage=3)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    t = time.monotonic()
    output = trainer.train()
    wall = time.monotonic() - t
    model.eval()
    model.save_pretrained(out)
    metrics = lm_metrics(model, data.validation, data.tokens_per_char,
                         max_windows=64 if args.quick else None)
    return dict(metrics, steps=int(trainer.state.global_step), train_s=float(output.metrics["train_runtime"]),
                wall_s=wall, parameters=num_parameters(model), layers=cfg.num_hidden_layers,
                intermediate_size=cfg.intermediate_size)


def section_lm(args, out: Path, recon: dict | None) -> dict:
    res = {"load_before": load()}
    s1 = out / "hmtr-k8-stage1"
    if not (s1 / "config.json").is_file():
        raise SystemExit(f"section lm needs the K=8 stage-1 model of section recon in {s1}")
    s1_info = json.loads((s1 / "hmtr_stage.json").read_text())
    s1_seconds = s1_info["metrics"]["train_runtime_s"]
    kw = stage_kwargs(args.quick)
    t = time.monotonic()
    r2 = train_hmtr_stage(2, out / "hmtr-k8-stage2", init_from=s1, time_budget_s=args.s2_seconds, **kw)
    s2_wall = time.monotonic() - t
    print(f"stage 2: latent cosine {r2.metrics['eval_latent_cosine']:.3f}, bpc {r2.metrics['eval_bpc']:.3f} "
          f"(decoder on predicted capsules, before the joint fine-tune), {s2_wall:.0f} s with the capsule "
          f"precompute, load {load()}", flush=True)
    t = time.monotonic()
    r3 = train_hmtr_stage(3, out / "hmtr-k8-stage3", init_from=out / "hmtr-k8-stage2", time_budget_s=args.s3_seconds,
                          lr=HMTR_LR, **kw)
    s3_wall = time.monotonic() - t
    # the baseline's budget: every second H-M-T-R spent training or precomputing capsules
    total = (s1_seconds + r2.metrics.get("capsule_precompute_s", 0.0) + r2.metrics["train_runtime_s"]
             + r3.metrics["train_runtime_s"])
    res["hmtr"] = dict(stage2=dict(r2.metrics, wall_s=s2_wall), stage3=dict(r3.metrics, wall_s=s3_wall),
                       stage1_s=s1_seconds, total_s=total, bpc=r3.metrics["eval_bpc"], parameters=r3.metrics["parameters"])
    print(f"stage 3: bpc {r3.metrics['eval_bpc']:.4f} after {r3.metrics['train_steps']} steps; curriculum total "
          f"{total:.0f} s, load {load()}", flush=True)

    if not args.no_baseline:
        res.update(train_baselines(args, out, total))
        res["bpc_ratio"] = res["hmtr"]["bpc"] / res["baseline"]["eval_bpc"]
    if args.ablation:
        t = time.monotonic()
        ra = train_hmtr_stage(3, out / "hmtr-k8-joint", preset=args.preset, config_overrides={**args.set, "block_size": 8},
                              time_budget_s=total, lr=HMTR_LR, **kw)
        res["joint_from_scratch"] = dict(ra.metrics, wall_s=time.monotonic() - t)
        print(f"ablation, joint from scratch: bpc {ra.metrics['eval_bpc']:.4f}, load {load()}", flush=True)
    res["load_after"] = load()
    return res


def train_baselines(args, out: Path, seconds: float) -> dict:
    """The baseline(s) for ``seconds``: the closest parameter count overall, or at each of ``--baseline-depths``.

    Returns {"baselines": {depth: metrics}, "baseline": the one with the lowest validation bpc}.
    """
    model, tok, _ = load_stage_folder(out / "hmtr-k8-stage3")
    data = prepare_hmtr_data(tok, "tinyshakespeare", seq_len=SEQ_LEN, block_size=8, seed=0)
    depth_sets = [[d] for d in args.baseline_depths] if args.baseline_depths else [BASELINE_DEPTHS]
    runs = {}
    for depths in depth_sets:  # several: each keeps its folder, and `baseline` gets a copy of the best
        folder = out / ("baseline" if len(depth_sets) == 1 else f"baseline-{depths[0]}l")
        r = train_baseline(args, tok, data, num_parameters(model), seconds, folder, depths)
        runs[r["layers"]] = r
        print(f"baseline ({r['layers']} layers, MLP {r['intermediate_size']}): bpc {r['eval_bpc']:.4f} after "
              f"{r['steps']} steps ({r['parameters']:,} parameters), load {load()}", flush=True)
    best = min(runs, key=lambda k: runs[k]["eval_bpc"])
    if len(depth_sets) > 1:
        shutil.copytree(out / f"baseline-{best}l", out / "baseline", dirs_exist_ok=True)
    return {"baselines": runs, "baseline": runs[best]}


def section_baselines(args, out: Path, lm: dict | None) -> dict:
    """More baselines for the curriculum of an earlier ``lm`` section (same budget), against its H-M-T-R."""
    if not lm or "hmtr" not in lm:
        raise SystemExit("section baselines needs the results of section lm in --json")
    res = dict(load_before=load(), **train_baselines(args, out, lm["hmtr"]["total_s"]))
    res["bpc_ratio"] = lm["hmtr"]["bpc"] / res["baseline"]["eval_bpc"]
    res["load_after"] = load()
    return res


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor) -> dict:
    def run(n):
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
        return time.perf_counter() - t

    run(2)  # warm-up
    one = min(run(1) for _ in range(2))
    full = min(run(NEW_TOKENS + 1) for _ in range(2))
    out = model(prompt, use_cache=True)
    cache = out.past_key_values
    total_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors.values())
    res = dict(decode_tokens_per_s=NEW_TOKENS / (full - one), prefill_s=one, cache_bytes=total_bytes)
    if hasattr(model.model, "reasoner_cache_nbytes"):
        res["reasoner_kv_bytes"] = model.model.reasoner_cache_nbytes(cache)
    else:
        res["kv_bytes"] = total_bytes
    return res


def section_generate(args, out: Path) -> dict:
    res = {"load_before": load(), "prompt_tokens": PROMPT, "new_tokens": NEW_TOKENS}
    models = {"hmtr_k8": out / "hmtr-k8-stage3", "hmtr_k4": out / "hmtr-k4-stage1", "baseline": out / "baseline"}
    tok = None
    for name, folder in models.items():
        if not (folder / "config.json").is_file():
            print(f"generate: {folder} missing, {name} skipped", flush=True)
            continue
        if name == "baseline":
            model = strata.RetMambaForCausalLM.from_pretrained(folder).eval()
        else:
            model, tok, _ = load_stage_folder(folder)
            model.eval()
        if tok is None:
            continue
        text = prepare_hmtr_data(tok, "tinyshakespeare", seq_len=SEQ_LEN, block_size=8).validation[:]["input_ids"]
        prompt = text.reshape(1, -1)[:, :PROMPT]
        res[name] = dict(decode_speed(model, prompt), block_size=getattr(model.config, "block_size", None),
                         parameters=num_parameters(model))
        print(f"{name}: {res[name]}", flush=True)
    if "baseline" in res:
        base = res["baseline"]
        for name in ("hmtr_k8", "hmtr_k4"):
            if name in res:
                K = res[name]["block_size"]
                res[name]["speedup"] = res[name]["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                res[name]["speedup_target"] = K / 2
                res[name]["kv_ratio"] = res[name]["reasoner_kv_bytes"] / base["kv_bytes"]
    res["load_after"] = load()
    return res


def _field(item: str) -> tuple[str, object]:
    name, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare string


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="recon,lm,generate")
    p.add_argument("--s1-seconds", type=float, default=240)
    p.add_argument("--s2-seconds", type=float, default=60)
    p.add_argument("--s3-seconds", type=float, default=240)
    p.add_argument("--ablation", action="store_true", help="also train H-M-T-R jointly from scratch (no curriculum)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "hmtr"), help="folder for the trained models")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "hmtr.json"))
    p.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke test")
    p.add_argument("--preset", default=HMTR_PRESET, help=f"H-M-T-R preset (default {HMTR_PRESET}), e.g. small-variational")
    p.add_argument("--recon-blocks", default="4,8", help="block sizes K of section recon (section lm needs 8)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the H-M-T-R preset (JSON value), e.g. --set decoder_layers=2")
    p.add_argument("--no-baseline", action="store_true",
                   help="section lm trains H-M-T-R only (compare with baselines of an earlier run: section baselines)")
    p.add_argument("--baseline-depths", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="train one baseline per depth (e.g. 5,9; MLP width for the closest parameter count) and "
                        "compare with the best; default: the closest parameter count over depths 2-12")
    args = p.parse_args(argv)
    args.set = dict(_field(item) for item in args.set)
    if args.quick:
        args.s1_seconds, args.s2_seconds, args.s3_seconds = 5, 3, 5
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    results.update(meta=dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                             preset=args.preset, overrides=args.set, seq_len=SEQ_LEN, batch_size=BATCH, baseline_lr=BASELINE_LR,
                             hmtr_lr=HMTR_LR, quick=args.quick,
                             started=time.strftime("%Y-%m-%d %H:%M:%S"), load=load()))
    if "recon" in sections:
        results["recon"] = section_recon(args, out)
        Path(args.json).write_text(json.dumps(results, indent=2))
    if "lm" in sections:
        results["lm"] = section_lm(args, out, results.get("recon"))
        Path(args.json).write_text(json.dumps(results, indent=2))
    if "baselines" in sections:
        results["baselines"] = section_baselines(args, out, results.get("lm"))
        Path(args.json).write_text(json.dumps(results, indent=2))
    if "generate" in sections:
        results["generate"] = section_generate(args, out)
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
