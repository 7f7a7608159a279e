"""Train a strata model with the Hugging Face Trainer and export a Hub-ready folder.

    corpus --(data.prepare_lm_data)--> blocks --> Trainer --> evaluate (loss, bits/char)
           --(export.write_hub_folder)--> weights + flat code + tokenizer + generation config + card

``train_model`` is what ``strata train`` and ``python -m strata.training.demo`` run.
The learning rate warms up linearly, then follows a cosine to a tenth of its peak over
``max_steps`` or, when ``time_budget_s`` is set, over the time budget, whichever ends
first; so a run cut by its time budget still ends at the low learning rate.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_callback import ProgressCallback

from strata.training.data import LMData, bits_per_character, load_text_splits, prepare_lm_data
from strata.training.export import check_push_possible, push_folder, write_hub_folder

RUN_INFO_FILE = "strata_run.json"  # written into Trainer checkpoints; read by `strata export`
MIN_LR_RATE = 0.1


# ----------------------------------------------------------------------------- tokenizer and model
def corpus_tokenizer(texts, max_chars: int = 6000, **kwargs):
    """A CharWordTokenizer trained on ``texts``: 4 specials + 256 bytes + the corpus's characters.

    Only the character vocabulary feeds strata's causal LMs, so the word vocabulary is
    left at its four specials; at most ``max_chars`` characters, most frequent first.
    """
    from strata.tokenization import CharWordTokenizer
    from strata.tokenization.tokenization_charword import FIRST_CHAR_ID, SPECIAL_TOKENS

    return CharWordTokenizer.train(texts, vocab_size=FIRST_CHAR_ID + max_chars,
                                   word_vocab_size=len(SPECIAL_TOKENS), **kwargs)


def build_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase, corpus) -> PreTrainedTokenizerBase:
    """``"corpus"``: trained on the training split of ``corpus``; ``"default"``: the packaged
    default vocabulary; a folder: ``AutoTokenizer.from_pretrained``; or a tokenizer object."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer == "corpus":
        train_text = load_text_splits(corpus)["train"]
        return corpus_tokenizer(row["text"] for row in train_text)
    if tokenizer == "default":
        from strata.tokenization import load_default_tokenizer

        return load_default_tokenizer()
    if Path(tokenizer).is_dir():
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=True)
    raise ValueError(f"`tokenizer` must be 'corpus', 'default' or a tokenizer folder, got {str(tokenizer)!r}")


def architecture(arch: str):
    """(config class, causal LM class) of a registered strata architecture."""
    import strata

    if arch not in strata.ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; available: {sorted(strata.ARCHITECTURES)}")
    config_cls, _, lm_cls, _ = strata.ARCHITECTURES[arch]
    return config_cls, lm_cls


def build_model(arch: str, preset: str, tokenizer, **config_overrides):
    """A freshly initialised causal LM of ``arch``/``preset`` sized to ``tokenizer``."""
    config_cls, lm_cls = architecture(arch)
    config = config_cls.from_preset(
        preset,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    return lm_cls(config)


# ----------------------------------------------------------------------------- schedule and callbacks
class WarmupCosineSchedule:
    """LR factor: linear warmup, then cosine from 1 to ``MIN_LR_RATE`` over the run.

    Progress is ``step / max_steps``, or the fraction of ``time_budget_s`` spent if larger.
    """

    def __init__(self, max_steps: int, warmup_steps: int, time_budget_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_steps, self.warmup_steps, self.time_budget_s = max_steps, warmup_steps, time_budget_s
        self.clock = clock
        self.start = clock()

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = step / max(1, self.max_steps)
        if self.time_budget_s:
            progress = max(progress, (self.clock() - self.start) / self.time_budget_s)
        progress = min(1.0, progress)
        return MIN_LR_RATE + (1 - MIN_LR_RATE) * 0.5 * (1 + math.cos(math.pi * progress))


class StrataTrainer(Trainer):
    """Trainer whose schedule is ``WarmupCosineSchedule`` (step- and time-aware)."""

    def __init__(self, *args, time_budget_s: float | None = None, **kwargs):
        self.time_budget_s = time_budget_s
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            schedule = WarmupCosineSchedule(num_training_steps, self.args.get_warmup_steps(num_training_steps),
                                            self.time_budget_s)
            # A plain function, not the object: LambdaLR then saves no lambda state into the checkpoint
            # (the object's clock cannot be loaded with torch.load(weights_only=True) on resume).
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda step: schedule(step))
            self._created_lr_scheduler = True
        return self.lr_scheduler


class TimeBudgetCallback(TrainerCallback):
    """Stops training at the end of the first step that finishes ``seconds`` after training began."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        if seconds < 0:
            raise ValueError(f"the time budget must be >= 0 seconds, got {seconds}")
        self.seconds, self.clock = seconds, clock
        self.start: float | None = None
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() - self.start >= self.seconds:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control


class ProgressBarCallback(TrainerCallback):
    """One tqdm bar: over steps, or over seconds when the run has a time budget; shows the loss."""

    def __init__(self, time_budget_s: float | None = None):
        self.time_budget_s = time_budget_s
        self.bar = None
        self.start = 0.0
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.start = time.monotonic()
        if self.time_budget_s:
            self.bar = tqdm(total=round(self.time_budget_s), unit="s", desc="training", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt}s [{elapsed}{postfix}]")
        else:
            self.bar = tqdm(total=state.max_steps, unit="step", desc="training", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.postfix["step"] = str(state.global_step)
        if self.time_budget_s:
            self.bar.n = min(self.bar.total, time.monotonic() - self.start)
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.refresh()
        else:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.3f}"
            if "learning_rate" in logs:
                self.postfix["lr"] = f"{logs['learning_rate']:.1e}"

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunInfoCallback(TrainerCallback):
    """Writes ``strata_run.json`` (arch, preset, corpus, settings) into every Trainer checkpoint."""

    def __init__(self, info: dict[str, Any]):
        self.info = info

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / RUN_INFO_FILE).write_text(json.dumps(self.info, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- evaluation
def eval_metrics(eval_loss: float, tokens_per_char: float) -> dict[str, float]:
    """Validation loss (nats/token) -> loss, bits per character and perplexity."""
    return {
        "eval_loss": float(eval_loss),
        "eval_bpc": bits_per_character(float(eval_loss), tokens_per_char),
        "eval_perplexity": math.exp(float(eval_loss)),
    }


def evaluate_lm(model, tokenizer, corpus, seq_len: int = 128, batch_size: int = 16,
                max_blocks: int | None = None) -> dict[str, float]:
    """Loss and bits per character of ``model`` on the validation split of ``corpus``."""
    data = prepare_lm_data(tokenizer, corpus, block_size=seq_len)
    validation = data.validation
    if max_blocks is not None:
        validation = validation.select(range(min(max_blocks, len(validation))))
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none",
                                 disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, eval_dataset=validation, data_collator=default_data_collator)
        loss = trainer.evaluate()["eval_loss"]
    return eval_metrics(loss, data.tokens_per_char)


# ----------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    folder: Path  # the Hub-ready folder
    metrics: dict[str, float]
    model: Any
    tokenizer: Any
    log_history: list[dict] = field(default_factory=list)
    stopped_by_time_budget: bool = False


@dataclass
class RunSettings:
    arch: str
    preset: str
    corpus: str
    seq_len: int
    batch_size: int
    lr: float
    max_steps: int
    time_budget_s: float | None
    warmup_steps: int
    weight_decay: float
    seed: int
    config_overrides: dict[str, Any]


def train_model(
    arch: str = "retmamba",
    preset: str = "fusion-small",
    corpus: str | os.PathLike = "tinyshakespeare",
    output_dir: str | os.PathLike = "outputs/retmamba",
    max_steps: int = 1000,
    time_budget_s: float | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.1,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase = "corpus",
    config_overrides: dict[str, Any] | None = None,
    streaming: bool = False,
    eval_max_blocks: int | None = None,
    logging_steps: int = 10,
    save_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    use_cpu: bool = False,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private: bool | None = None,
    hub_token: str | None = None,
    resume_from_checkpoint: str | os.PathLike | bool | None = None,
) -> TrainResult:
    """Train ``arch``/``preset`` on ``corpus`` and write a Hub-ready folder to ``output_dir``.

    Trainer checkpoints (every ``save_steps`` steps, none by default) go to
    ``output_dir/checkpoints`` and are not uploaded. Returns the folder, the metrics
    (``eval_loss`` in nats per token, ``eval_bpc`` bits per character, ``train_loss`` of
    the last logging window, ...) and the trained model and tokenizer.

    ``resume_from_checkpoint``: a Trainer checkpoint folder (or True: the last one under
    ``output_dir/checkpoints``) to continue from. Runs unchanged under ``torchrun`` /
    ``accelerate launch`` (one process per device, ``batch_size`` per process); only the
    main process writes the folder and pushes (docs/distributed.md).
    """
    for name, value in (("max_steps", max_steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be at least 2, got {seq_len}")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}")
    architecture(arch)  # unknown architecture: fail before any work
    from strata.hub_cards.model_card import architecture_card

    architecture_card(arch)  # the card is written after training: make sure it can be
    if push_to_hub:
        hub_model_id = hub_model_id or Path(output_dir).resolve().name
        check_push_possible(hub_model_id)
    config_overrides = dict(config_overrides or {})
    folder = Path(output_dir)
    torch.manual_seed(seed)

    tok = build_tokenizer(tokenizer, corpus)
    model = build_model(arch, preset, tok, **config_overrides)
    data: LMData = prepare_lm_data(tok, corpus, block_size=seq_len, streaming=streaming)
    validation = data.validation
    if eval_max_blocks is not None:
        validation = validation.take(eval_max_blocks) if streaming else validation.select(
            range(min(eval_max_blocks, len(validation))))

    settings = RunSettings(arch, preset, str(corpus), seq_len, batch_size, lr, max_steps, time_budget_s,
                           warmup_steps, weight_decay, seed, config_overrides)
    args = TrainingArguments(
        output_dir=str(folder / "checkpoints"),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        adam_beta2=0.99,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        eval_strategy="no",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        disable_tqdm=False,
        seed=seed,
        use_cpu=use_cpu,
        dataloader_pin_memory=torch.cuda.is_available() and not use_cpu,
    )
    budget = TimeBudgetCallback(time_budget_s) if time_budget_s is not None else None
    trainer = StrataTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=validation,
        processing_class=tok,
        data_collator=default_data_collator,
        callbacks=[RunInfoCallback(asdict(settings))] + ([budget] if budget else []),
        time_budget_s=time_budget_s,
    )
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(ProgressBarCallback(time_budget_s))

    if resume_from_checkpoint is not None and not isinstance(resume_from_checkpoint, bool):
        resume_from_checkpoint = str(resume_from_checkpoint)
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    if progress:
        blocks = f"{len(validation)} " if not streaming else ""
        print(f"evaluating on the {blocks}validation blocks of {seq_len} tokens ...", flush=True)
    evaluation = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        **eval_metrics(evaluation["eval_loss"], data.tokens_per_char),
        "train_loss": float(losses[-1]) if losses else float(train_output.training_loss),
        "train_steps": int(trainer.state.global_step),
        "train_runtime_s": float(train_output.metrics.get("train_runtime", 0.0)),
        "train_tokens": int(trainer.state.global_step) * batch_size * seq_len,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }

    model.eval()
    training = dict(asdict(settings), corpus_title=data.corpus.title,
                    device=str(model.device), torch_threads=torch.get_num_threads())
    if trainer.is_world_process_zero():  # distributed runs: one writer
        write_hub_folder(model, tok, folder, metrics=metrics, corpus=data.corpus, training=training,
                         model_id=hub_model_id)
        if push_to_hub:
            push_folder(folder, hub_model_id, token=hub_token, private=hub_private)
    return TrainResult(folder, metrics, model, tok, list(trainer.state.log_history),
                       stopped_by_time_budget=bool(budget and budget.stopped_at_step is not None
                                                   and trainer.state.global_step < max_steps))
