"""H-M-T-R training: the two-stage curriculum of the seed and a joint third stage, with the Trainer.

    stage 1  autoencoder        encoder + decoder rebuild every block from its own capsule
                                (reasoner frozen); metric: token reconstruction accuracy
    stage 2  latent prediction  encoder and decoder frozen; capsules precomputed once into
                                memory-mapped .npy files (manifest with the encoder's SHA-256:
                                stale capsules are refused); the reasoner learns to predict the
                                next capsule (MSE + cosine, or the energy score)
    stage 3  joint fine-tune    every part, next-token cross-entropy of the exact LM

Each stage is one `Trainer` run that saves a Hub-ready folder (weights, flat code, tokenizer,
card, ``hmtr_stage.json``); stages 2 and 3 start from the previous stage's folder
(``init_from``). ``resume=True`` continues from the last checkpoint in
``OUTPUT_DIR/checkpoints`` (written every ``save_steps``); ``push_to_hub`` uploads the folder.

    python -m strata.training.hmtr_train --stage 1 --preset small --output-dir outputs/hmtr-1
    python -m strata.training.hmtr_train --stage 2 --init-from outputs/hmtr-1 --output-dir outputs/hmtr-2
    python -m strata.training.hmtr_train --stage 3 --init-from outputs/hmtr-2 --output-dir outputs/hmtr-3

(also ``strata train --arch hmtr --stage N ...``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainingArguments, default_data_collator
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from strata.training.data import bits_per_character
from strata.training.export import check_push_possible, push_folder, write_hub_folder
from strata.training.hmtr_capsules import (
    MANIFEST,
    encoder_fingerprint,
    load_capsules,
    precompute_capsules,
)
from strata.training.hmtr_data import prepare_hmtr_data
from strata.training.train import (
    ProgressBarCallback,
    RunInfoCallback,
    StrataTrainer,
    TimeBudgetCallback,
    WarmupCosineSchedule,
    build_model,
    build_tokenizer,
)

STAGES = (1, 2, 3)
STAGE_FILE = "hmtr_stage.json"
DEFAULT_LR = {1: 3e-3, 2: 1e-3, 3: 1e-3}
STAGE_NAMES = {1: "autoencoder", 2: "latent prediction", 3: "joint fine-tune"}


# ----------------------------------------------------------------------------- parts and losses
def set_trainable(model, stage: int) -> dict[str, int]:
    """Freeze what ``stage`` does not train; return trainable parameter counts per part."""
    if stage not in STAGES:
        raise ValueError(f"`stage` must be one of {STAGES}, got {stage!r}")
    m = model.model
    trains = {1: ("embed_tokens", "encoder", "decoder"), 2: ("reasoner",),
              3: ("embed_tokens", "encoder", "reasoner", "decoder")}[stage]
    counts = {}
    for part in ("embed_tokens", "encoder", "reasoner", "decoder"):
        on = part in trains
        n = 0
        for p in getattr(m, part).parameters():
            p.requires_grad_(on)
            n += p.numel() if on else 0
        counts[part] = n
    return counts


class StageSchedule(WarmupCosineSchedule):
    """`WarmupCosineSchedule` whose saved state holds numbers only, so a run resumes from its
    checkpoint (``torch.load(weights_only=True)`` refuses the clock function the parent keeps
    in its state). A state loaded in another process restarts the time budget's clock, as
    `TimeBudgetCallback` does."""

    clock = staticmethod(time.monotonic)

    def __init__(self, max_steps: int, warmup_steps: int, time_budget_s: float | None = None):
        super().__init__(max_steps, warmup_steps, time_budget_s, clock=time.monotonic)
        del self.clock  # the class attribute: not part of the state
        self.pid = os.getpid()

    def __call__(self, step: int) -> float:
        if self.pid != os.getpid():
            self.start, self.pid = self.clock(), os.getpid()
        return super().__call__(step)


class HMTRStageTrainer(StrataTrainer):
    """`StrataTrainer` whose loss is the stage's: autoencoder, latent, or the LM's own."""

    def __init__(self, *args, stage: int, **kwargs):
        self.stage = stage
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            schedule = StageSchedule(num_training_steps, self.args.get_warmup_steps(num_training_steps),
                                     self.time_budget_s)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.stage == 1:
            out = model.autoencoder_loss(inputs["input_ids"], inputs.get("labels"))
        elif self.stage == 2:
            out = model.latent_loss(inputs["capsules"], inputs.get("capsule_mask"))
        else:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return (out["loss"], out) if return_outputs else out["loss"]


def _batches(dataset, batch_size: int, limit: int | None):
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield dataset[start : min(n, start + batch_size)]


@torch.no_grad()
def reconstruction_metrics(model, windows, batch_size: int = 32, max_windows: int | None = None) -> dict[str, float]:
    """Stage 1 on held-out windows (eval mode: the capsule's mean, no dropout): token
    reconstruction accuracy and cross-entropy over the real tokens."""
    was = model.training
    model.eval()
    correct = scored = 0
    ce_sum = 0.0
    for rows in _batches(windows, batch_size, max_windows):
        out = model.autoencoder_loss(torch.as_tensor(rows["input_ids"]), torch.as_tensor(rows["labels"]))
        n = int(out["scored"])
        correct += int(out["correct"])
        scored += n
        ce_sum += float(out["ce"]) * n
    model.train(was)
    return {"eval_reconstruction_accuracy": correct / max(1, scored), "eval_reconstruction_ce": ce_sum / max(1, scored),
            "eval_reconstruction_tokens": scored}


@torch.no_grad()
def latent_metrics(model, capsules, batch_size: int = 64, max_windows: int | None = None) -> dict[str, float]:
    """Stage 2 on held-out capsules: MSE and cosine of the reasoner's (noise-0) prediction."""
    was = model.training
    model.eval()
    tot = {"mse": 0.0, "cosine": 0.0}
    weight = 0
    n = len(capsules) if max_windows is None else min(max_windows, len(capsules))
    for start in range(0, n, batch_size):
        items = [capsules[i] for i in range(start, min(n, start + batch_size))]
        caps = torch.stack([it["capsules"] for it in items])
        mask = torch.stack([it["capsule_mask"] for it in items])
        out = model.latent_loss(caps, mask)
        w = int(mask.sum())
        tot["mse"] += float(out["mse"]) * w
        tot["cosine"] += float(out["cosine"]) * w
        weight += w
    model.train(was)
    return {"eval_latent_mse": tot["mse"] / max(1, weight), "eval_latent_cosine": tot["cosine"] / max(1, weight)}


@torch.no_grad()
def lm_metrics(model, windows, tokens_per_char: float, batch_size: int = 16,
               max_windows: int | None = None) -> dict[str, float]:
    """Exact next-token loss of any causal LM on windows (``labels`` -100 not scored): mean
    nats per predicted token, bits per character, perplexity and top-1 accuracy."""
    was = model.training
    model.eval()
    nll = 0.0
    hits = count = 0
    for rows in _batches(windows, batch_size, max_windows):
        ids = torch.as_tensor(rows["input_ids"])
        labels = torch.as_tensor(rows["labels"])[:, 1:]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        keep = labels != -100
        nll += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        hits += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        count += int(keep.sum())
    model.train(was)
    loss = nll / max(1, count)
    return {"eval_loss": loss, "eval_bpc": bits_per_character(loss, tokens_per_char),
            "eval_perplexity": math.exp(loss), "eval_accuracy": hits / max(1, count), "eval_tokens": count}


# ----------------------------------------------------------------------------- encoder from a Mamba
def init_encoder_from_mamba(model, mamba, copy_embeddings: bool = True) -> list[str]:
    """Initialise the H-M-T-R encoder from a Transformers ``MambaForCausalLM`` (or ``MambaModel``):
    its first ``encoder_layers`` blocks, its final norm and (``copy_embeddings``) its token
    embeddings. Shapes must match exactly (hidden size, state size, expansion, conv width,
    step rank, vocabulary); a mismatch is refused naming the tensor. Returns the copied names."""
    backbone = getattr(mamba, "backbone", mamba)
    enc = model.model.encoder
    if len(backbone.layers) < len(enc.layers):
        raise ValueError(f"the Mamba model has {len(backbone.layers)} layers, the encoder needs {len(enc.layers)}")
    pairs = []
    for i, layer in enumerate(enc.layers):
        src = backbone.layers[i]
        pairs.append((f"encoder.layers.{i}.norm.weight", layer.norm.weight, src.norm.weight))
        for name, p in layer.mixer.named_parameters():
            pairs.append((f"encoder.layers.{i}.mixer.{name}", p, src.mixer.get_parameter(name)))
    pairs.append(("encoder.norm.weight", enc.norm.weight, backbone.norm_f.weight))
    if copy_embeddings:
        pairs.append(("embed_tokens.weight", model.model.embed_tokens.weight, backbone.embeddings.weight))
    for name, dst, src in pairs:
        if dst.shape != src.shape:
            raise ValueError(f"cannot initialise {name}: Mamba has shape {tuple(src.shape)}, "
                             f"the encoder {tuple(dst.shape)}")
    with torch.no_grad():
        for _, dst, src in pairs:
            dst.copy_(src)
    return [name for name, _, _ in pairs]


# ----------------------------------------------------------------------------- the stage run
@dataclass
class StageResult:
    stage: int
    folder: Path
    metrics: dict[str, float]
    model: Any
    tokenizer: Any
    log_history: list[dict] = field(default_factory=list)


def load_stage_folder(folder: str | os.PathLike):
    """(model, tokenizer, stage info) of a folder written by a previous stage."""
    from transformers import AutoTokenizer

    from strata.modeling.modeling_hmtr import HMTRForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"`init_from` {str(folder)!r} is not a model folder (no config.json)")
    model = HMTRForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    info = json.loads((folder / STAGE_FILE).read_text()) if (folder / STAGE_FILE).is_file() else {}
    return model, tokenizer, info


def _capsules_ready(folder: Path, model) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    return (manifest.get("encoder_sha256") == encoder_fingerprint(model)
            and {"train", "validation"} <= set(manifest.get("splits", {})))


def train_hmtr_stage(
    stage: int,
    output_dir: str | os.PathLike,
    init_from: str | os.PathLike | None = None,
    preset: str = "small",
    corpus: str | os.PathLike = "tinyshakespeare",
    tokenizer: Any = "corpus",
    config_overrides: dict[str, Any] | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float | None = None,
    max_steps: int = 1000,
    time_budget_s: float | None = None,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    save_steps: int | None = None,
    resume: bool = False,
    capsule_dir: str | os.PathLike | None = None,
    eval_max_windows: int | None = None,
    logging_steps: int = 10,
    seed: int = 0,
    progress: bool = True,
    use_cpu: bool = False,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool | None = None,
    hub_token: str | None = None,
) -> StageResult:
    """Run one stage of the curriculum and write a Hub-ready folder to ``output_dir``.

    Stage 1 builds ``preset`` (with ``config_overrides``, e.g. ``{"block_size": 4}``) and a
    tokenizer unless ``init_from`` names a folder; stage 2 requires ``init_from`` (the stage-1
    folder), stage 3 normally starts from the stage-2 folder and takes model, tokenizer and
    block size from it (without ``init_from`` it trains a new model jointly from scratch: the
    no-curriculum ablation).
    """
    if stage not in STAGES:
        raise ValueError(f"`stage` must be one of {STAGES}, got {stage!r}")
    for name, value in (("max_steps", max_steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if lr is not None and not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}")
    if stage == 2 and init_from is None:
        raise ValueError("stage 2 starts from the stage-1 folder (its frozen encoder and decoder): pass `init_from`")
    if init_from is not None and config_overrides:
        raise ValueError(f"a run from `init_from` keeps its architecture; `config_overrides` "
                         f"({sorted(config_overrides)}) apply to a new model only")
    if push_to_hub:
        hub_model_id = hub_model_id or Path(output_dir).resolve().name
        check_push_possible(hub_model_id)
    folder = Path(output_dir)
    torch.manual_seed(seed)
    previous = {}
    if init_from is not None:
        model, tok, previous = load_stage_folder(init_from)
    else:
        tok = build_tokenizer(tokenizer, corpus)
        model = build_model("hmtr", preset, tok, **dict(config_overrides or {}))
    if model.config.model_type != "hmtr":
        raise ValueError(f"`init_from` holds a {model.config.model_type!r} model, not an H-M-T-R one")
    K = model.config.block_size
    if seq_len % K:
        raise ValueError(f"`seq_len` ({seq_len}) must be a multiple of the model's block_size ({K})")
    lr = lr if lr is not None else DEFAULT_LR[stage]
    counts = set_trainable(model, stage)
    model.train()

    data = prepare_hmtr_data(tok, corpus, seq_len=seq_len, block_size=K, seed=seed)
    train_set, extra = data.train, {}
    if stage == 2:
        # beside the model folder, not in it: capsules never go to the Hub with the model
        cap_folder = Path(capsule_dir) if capsule_dir is not None else folder.parent / f"{folder.name}-capsules"
        if not _capsules_ready(cap_folder, model):
            if progress:
                print(f"precomputing capsules with the frozen encoder into {cap_folder} ...", flush=True)
            t0 = time.monotonic()
            for split, windows in (("train", data.train), ("validation", data.validation)):
                precompute_capsules(model, windows, cap_folder, split, progress=progress)
            extra["precompute_s"] = time.monotonic() - t0
        train_set = load_capsules(cap_folder, model, "train")
        extra["capsules"] = load_capsules(cap_folder, model, "validation")

    info = dict(arch="hmtr", stage=stage, stage_name=STAGE_NAMES[stage], preset=previous.get("preset", preset),
                corpus=str(corpus), seq_len=seq_len, batch_size=batch_size, lr=lr, max_steps=max_steps,
                time_budget_s=time_budget_s, warmup_steps=warmup_steps, weight_decay=weight_decay, seed=seed,
                block_size=K, init_from=str(init_from) if init_from else None,
                config_overrides=dict(config_overrides or {}), trainable_parameters=counts)
    args = TrainingArguments(
        output_dir=str(folder / "checkpoints"), max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, adam_beta2=0.99, max_grad_norm=1.0,
        logging_steps=logging_steps, eval_strategy="no", save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, report_to="none", disable_tqdm=False, seed=seed, use_cpu=use_cpu,
        remove_unused_columns=False, dataloader_pin_memory=torch.cuda.is_available() and not use_cpu,
    )
    budget = TimeBudgetCallback(time_budget_s) if time_budget_s is not None else None
    trainer = HMTRStageTrainer(
        model=model, args=args, train_dataset=train_set, processing_class=tok, data_collator=default_data_collator,
        callbacks=[RunInfoCallback(info)] + ([budget] if budget else []), time_budget_s=time_budget_s, stage=stage,
    )
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(ProgressBarCallback(time_budget_s))
    checkpoint = get_last_checkpoint(args.output_dir) if resume and Path(args.output_dir).is_dir() else None
    train_output = trainer.train(resume_from_checkpoint=checkpoint)

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics: dict[str, Any] = {
        "train_loss": float(losses[-1]) if losses else float(train_output.training_loss),
        "train_steps": int(trainer.state.global_step),
        "train_runtime_s": float(train_output.metrics.get("train_runtime", 0.0)),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    if "precompute_s" in extra:
        metrics["capsule_precompute_s"] = float(extra["precompute_s"])
    model.eval()
    if stage == 1:
        metrics.update(reconstruction_metrics(model, data.validation, max_windows=eval_max_windows))
    else:
        if stage == 2:
            metrics.update(latent_metrics(model, extra["capsules"], max_windows=eval_max_windows))
        metrics.update(lm_metrics(model, data.validation, data.tokens_per_char, max_windows=eval_max_windows))
    set_trainable(model, 3)  # save a model whose parameters all train by default
    info.update(resumed_from=checkpoint)
    training = dict(info, corpus_title=data.corpus.title, device=str(model.device),
                    torch_threads=torch.get_num_threads())
    write_hub_folder(model, tok, folder, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                     corpus=data.corpus, training=training, model_id=hub_model_id)
    (folder / STAGE_FILE).write_text(json.dumps(dict(info, metrics=metrics), indent=2) + "\n", encoding="utf-8")
    if push_to_hub:
        push_folder(folder, hub_model_id, token=hub_token, private=hub_private)
    return StageResult(stage, folder, metrics, model, tok, list(trainer.state.log_history))


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m strata.training.hmtr_train",
                                description="Run one stage of the H-M-T-R curriculum (1 autoencoder, 2 latent "
                                            "prediction, 3 joint fine-tune) with the Hugging Face Trainer.")
    p.add_argument("--stage", type=int, choices=STAGES, required=True)
    p.add_argument("--init-from", "--init_from", dest="init_from", default=None,
                   help="the previous stage's folder (required for stages 2 and 3)")
    p.add_argument("--preset", default="small", help="stage 1: HMTRConfig preset (default small)")
    p.add_argument("--set", dest="config_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="stage 1: change a config field, e.g. --set block_size=4 (repeatable)")
    p.add_argument("--corpus", default="tinyshakespeare")
    p.add_argument("--tokenizer", default="corpus")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    p.add_argument("--max-steps", dest="max_steps", type=int, default=1000)
    p.add_argument("--time-budget", dest="time_budget", type=float, default=None, metavar="SECONDS")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=128)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--save-steps", dest="save_steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR/checkpoints")
    p.add_argument("--capsule-dir", dest="capsule_dir", default=None,
                   help="stage 2: capsule folder (default: OUTPUT_DIR-capsules beside the model folder)")
    p.add_argument("--eval-max-windows", dest="eval_max_windows", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", action="store_true")
    p.add_argument("--hub-model-id", "--hub_model_id", dest="hub_model_id", default=None)
    p.add_argument("--private", action="store_true", default=None)
    return p


def parse_overrides(items) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if isinstance(item, tuple):
            out[item[0]] = item[1]
            continue
        if "=" not in item:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    return out


def run_from_args(args) -> StageResult:
    result = train_hmtr_stage(
        stage=args.stage, output_dir=args.output_dir, init_from=args.init_from, preset=args.preset,
        corpus=args.corpus, tokenizer=args.tokenizer, config_overrides=parse_overrides(args.config_overrides),
        seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
        time_budget_s=args.time_budget, save_steps=args.save_steps, resume=args.resume,
        capsule_dir=getattr(args, "capsule_dir", None), eval_max_windows=getattr(args, "eval_max_windows", None),
        seed=args.seed, progress=args.progress, use_cpu=args.cpu, push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id, hub_private=args.private,
    )
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.metrics.items())
    print(f"stage {result.stage} ({STAGE_NAMES[result.stage]}): {shown}")
    print(f"saved {result.folder}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_from_args(args)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("STRATA_DEBUG"):
            raise
        raise SystemExit(f"hmtr_train: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
