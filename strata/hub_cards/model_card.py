"""Model cards for strata models: Hub metadata (YAML front matter) and a body a newcomer can use.

The metadata is built with ``huggingface_hub.ModelCardData`` (``library_name``,
``pipeline_tag``, ``tags``, ``license``, ``datasets``, ``base_model`` and a
``model-index`` with the run's evaluation results), so the Hub shows the widget, the
``custom_code`` badge and the evaluation table. The body says what the architecture is,
how to load, generate with and fine-tune the model, what was measured and the limits.

Per-architecture text lives in ``ARCHITECTURE_CARDS``: a new architecture adds one entry.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable

from huggingface_hub import EvalResult, ModelCardData

# Metrics that become model-index evaluation results: key -> (metric type, display name).
EVAL_METRICS = {
    "eval_loss": ("loss", "Validation loss (nats per token)"),
    "eval_bpc": ("bpc", "Validation bits per character"),
    "eval_perplexity": ("perplexity", "Validation perplexity (per token)"),
}
# Other numbers of a run, shown in the body: key -> (label, format).
RUN_NUMBERS = {
    "train_loss": ("final training loss (nats per token, last logging window)", "{:.4f}"),
    "train_steps": ("optimizer steps", "{:,}"),
    "train_tokens": ("training tokens seen", "{:,}"),
    "train_runtime_s": ("training time (seconds)", "{:.0f}"),
    "parameters": ("parameters", "{:,}"),
}
# Settings of a run (the `training` argument), shown in the body: key -> label.
RUN_SETTINGS = {
    "corpus_title": "corpus",
    "preset": "preset",
    "seq_len": "sequence length (tokens)",
    "batch_size": "batch size (sequences)",
    "lr": "peak learning rate",
    "warmup_steps": "warmup steps",
    "weight_decay": "weight decay",
    "time_budget_s": "time budget (seconds)",
    "device": "device",
    "torch_threads": "CPU threads",
    "seed": "seed",
}
_MODEL_ID_LINE = re.compile(r'^model_id = ".*"  # a Hub repo id or a local folder$', re.MULTILINE)


@dataclass(frozen=True)
class ArchitectureCard:
    title: str  # e.g. "RetMamba (RetNet x Mamba fusion)"
    tags: tuple[str, ...]  # extra Hub tags
    summary: str  # one paragraph: what the architecture is
    describe: Callable[[Any], str]  # the specific config: layer pattern and the like
    limits: tuple[str, ...] = ()  # architecture-specific limitations, one bullet each


# ----------------------------------------------------------------------------- retmamba
_RETMAMBA_MIXERS = {
    "A": "causal softmax attention with rotary positions and a key/value cache (the Transformer baseline)",
    "R": "multi-scale retention: per head a decaying linear-attention state (the RetNet baseline)",
    "M": "a Mamba selective state-space mixer: causal depthwise convolution, then a scan whose step "
         "size depends on the input (the Mamba baseline)",
    "F": "fusion: retention and a Mamba selective scan run side by side on the same input and are mixed "
         "per token and channel by a learned gate, out = g * retention(x) + (1 - g) * mamba(x), "
         "g = sigmoid(W x)",
}


def _describe_retmamba(config) -> str:
    pattern = config.layer_pattern
    lines = [
        f"Layer pattern `{pattern}`: one letter per block, from the embedding up "
        f"({config.num_hidden_layers} blocks). Each block is RMSNorm -> token mixer -> residual, "
        "RMSNorm -> SwiGLU MLP -> residual; the letter picks the token mixer:",
        "",
    ]
    for letter in sorted(set(pattern), key=pattern.index):
        lines.append(f"- `{letter}` ({pattern.count(letter)} of {len(pattern)}): {_RETMAMBA_MIXERS[letter]}.")
    if "F" in pattern and getattr(config, "fusion", "gate") == "selective_decay":
        lines.append("- fusion variant `selective_decay`: the retention decay of every head is also modulated "
                     "by a Mamba-style step size, gamma(h, t) = exp(delta(h, t) * log gamma(h)).")
    if "F" in pattern and not getattr(config, "fusion_gate", True):
        lines.append("- the fusion gate is off (ablation): the two branches are summed.")
    lines += ["", f"Generation runs `block_size = {config.block_size}` decoding steps per block inside the "
              "model and hands each block to the streamer at once."]
    return "\n".join(lines)


def _describe_thl(config) -> str:
    tiers = ", ".join(f"tier {k} every {tau} token{'s' if tau > 1 else ''}"
                      for k, tau in enumerate(config.timescales))
    local = (f"sliding-window attention over the last {config.local_window} token embeddings "
             f"({config.local_heads} heads) enriches each token before the router"
             if config.local_window else "no local attention (the router and the tiers see raw embeddings)")
    return "\n".join([
        f"- {config.num_hidden_layers} GRU tiers on clocks: {tiers}; a tier that is not due holds its state.",
        f"- a memory bank of {config.memory_slots} slots of width {config.hidden_size}: {config.router_heads} "
        f"router heads each read the top {config.router_top_k} slots per token; a novelty-gated writer stores "
        f"new content in an empty or {config.eviction_policy.replace('_', ' ')} slot, or reinforces the most "
        "similar one.",
        f"- {local}.",
        f"- training backpropagates through time in chunks of {config.tbptt_length} tokens.",
        "",
        f"Generation runs `block_size = {config.block_size}` decoding steps per block inside the model and "
        "hands each block to the streamer at once.",
    ])


def _describe_hmtr(config) -> str:
    K = config.block_size
    capsule = ("a Gaussian (variational) capsule; the language model uses its mean"
               if config.capsule == "variational" else "a deterministic capsule")
    head = ("an energy-score head (evaluated with noise 0, so the model stays a deterministic LM)"
            if config.loss == "energy" else "a linear head trained with MSE and cosine")
    return "\n".join([
        f"- block size K = {K}: one capsule, one reasoner step and one encoder pass per {K} tokens.",
        f"- encoder: {config.encoder_layers} Mamba blocks (state {config.state_size}); the output at the last "
        f"position of every block, through the capsule head, is {capsule} of width {config.hidden_size}.",
        f"- reasoner: {config.reasoner_layers} Transformer blocks ({config.num_attention_heads} heads) over the "
        f"capsules, after a learned start capsule; {head} predicts the next capsule.",
        f"- decoder: {config.decoder_layers} {config.decoder_cell.upper()} layer(s) of width "
        f"{config.decoder_hidden_size}, started from the predicted capsule; it reads the tokens of the block and "
        "predicts each next one.",
        "",
        "The logits at every position are the decoder's distribution given the predicted capsule of the "
        "current block and the earlier tokens of that block, so the model is an exact autoregressive LM: "
        "its perplexity and bits per character compare directly with any other LM's.",
    ])


def _describe_tiny_onn(config) -> str:
    rope = config.rope_type
    rope_text = ("plain RoPE" if rope == "default" else
                 f"RoPE with {rope} scaling (factor {config.rope_parameters.get('factor')}) from the standard "
                 "`rope_scaling` dict")
    word = (f"`char_embed[input_ids] + word_embed[word_token_ids]` ({config.word_vocab_size:,} words)"
            if config.word_vocab_size else "`char_embed[input_ids]` (no word embedding)")
    return "\n".join([
        f"- text embedding: {word}; the 1D position is {rope_text}, native context "
        f"{config.max_position_embeddings:,} tokens.",
        f"- image / spectrogram patches ({config.num_channels}x{config.patch_size}x{config.patch_size}) enter the "
        "same sequence through `patch_embed`, rotated by a 2D RoPE of the patch's (x, y).",
        f"- {config.num_hidden_layers} blocks, each: DynSIHA attention over a pool of {config.num_attention_heads} "
        f"heads (width {config.head_dim}) and MoIE over {config.num_experts} experts of width {config.expert_size}; "
        "every token opens a variable number of heads / experts by threshold gating, "
        "logits = cos(h, S) - sigmoid(g), with a top-k fallback "
        f"(k_min = {config.min_active_heads} heads, {config.min_active_experts} experts).",
        f"- training adds a surprise routing loss (weight {config.gate_loss_weight}) and reports the PI score.",
        "",
        f"Generation runs `block_size = {config.block_size}` decoding steps per block inside the model; pass "
        "`tokenizer=` to `generate` so that new characters get word ids.",
    ])


def _describe_mt_hope(config) -> str:
    mixers = {"R": "complex gated recurrence", "I": "incidence attention"}
    blocks = ", ".join(mixers[c] for c in config.layer_pattern)
    mobius = (f"each followed by an adaptive Möbius coupling ({config.num_mobius_cycles} cycles"
              f"{', chirality flip' if config.mobius_chirality_flip else ''}"
              f"{', conjugation' if config.mobius_conjugate else ''})" if config.use_mobius else "without Möbius couplings")
    lines = [
        f"- twistor stream: omega and pi, {config.dim // 2} complex channels each (width {config.hidden_size}).",
        f"- {len(config.layer_pattern)} sequence blocks ({blocks}), {mobius}.",
    ]
    if config.use_neural_memory:
        lines.append(f"- Titans neural memory: {config.memory_heads} heads, 2-layer MLP memories of width "
                     f"{config.memory_hidden_size}, trained at test time by gradient descent with momentum and "
                     f"forgetting, chunks of {config.memory_chunk_size} tokens.")
    if config.use_memory_system:
        lines.append(f"- slot memory: {config.num_memories} slots, {config.num_memory_cycles} update cycles per "
                     f"token{', phase compression' if config.phase_compression else ''}.")
    lines.append(f"- continuum memory: {len(config.cms_periods)} MLP levels with update periods "
                 f"{config.cms_periods} tokens (`model.continual_update`).")
    return "\n".join(lines)


ARCHITECTURE_CARDS: dict[str, ArchitectureCard] = {
    "retmamba": ArchitectureCard(
        title="RetMamba (RetNet x Mamba fusion)",
        tags=("retnet", "mamba", "state-space-model", "linear-attention"),
        summary=(
            "RetMamba is a decoder-only language model whose fusion blocks combine two recurrent token "
            "mixers: multi-scale retention from RetNet, which keeps per head a matrix state that decays "
            "at a fixed rate, and the selective state-space scan of Mamba, whose decay and input gate "
            "depend on the token. A learned per-channel gate decides, for every token, how much each "
            "branch contributes. Both branches carry a fixed-size state from token to token, so decoding "
            "costs the same for every new token however long the text already is (blocks of softmax "
            "attention, if the layer pattern has any, keep a growing key/value cache instead). The same "
            "model class also builds the Transformer, RetNet, Mamba and hybrid baselines through its "
            "layer pattern."
        ),
        describe=_describe_retmamba,
        limits=(
            "The code in this folder runs strata's PyTorch kernels (a chunked selective scan and chunkwise "
            "retention) on every device; there are no fused GPU kernels in it, so on a GPU it is slower "
            "than models of the same size that have them.",
        ),
    ),
    "thl": ArchitectureCard(
        title="THL (tiered hierarchical recurrence with a memory bank)",
        tags=("recurrent", "gru", "memory-augmented", "sparse-routing"),
        summary=(
            "THL is a recurrent language model with a fixed-size state. Stacked GRU tiers run on "
            "different clocks: the lowest tier reads every token, higher tiers update less often and "
            "so summarise longer spans. Beside the tiers sits a memory bank of slots: at every token a "
            "sparse router reads the few slots whose keys match the current state best, and a writer "
            "stores what is new (judged by its cosine distance to the slots) in a free or rarely used "
            "slot. Tier states and bank together have a size independent of the text length, so every "
            "new token costs the same however long the text already is."
        ),
        describe=_describe_thl,
        limits=(
            "The recurrence runs token by token in PyTorch, so training processes a sequence "
            "step by step and is slower per token than attention or chunked-scan models of the same size.",
            "The top-k reads and the novelty decisions are discrete: gradients flow through the values "
            "read and the slots written, not through the choice of slots.",
        ),
    ),
    "tiny_onn": ArchitectureCard(
        title="Tiny-ONN (dynamic experts, char + word embedding)",
        tags=("mixture-of-experts", "dynamic-sparsity", "character-level", "multimodal"),
        summary=(
            "Tiny-ONN is a decoder-only language model whose attention heads and feed-forward experts are "
            "chosen per token: a threshold gate compares the token with one learned key per head or expert "
            "and opens every one whose cosine similarity clears a learned threshold, so easy tokens use few "
            "and hard tokens many. Characters are the tokens; the word each character belongs to is added "
            "as a second embedding, so the first layer sees both levels. Image or spectrogram patches enter "
            "the same single tower with a 2D rotary encoding of their position. A routing loss teaches the "
            "gates to send each token to the experts whose outputs the language-model loss is least "
            "sensitive to."
        ),
        describe=_describe_tiny_onn,
        limits=(
            "All heads and experts are computed densely and masked (einsum), so sparsity saves no compute "
            "on this implementation; it shapes what the model learns, not its speed.",
            "Word ids during generation need the tokenizer (`generate(..., tokenizer=tok)`); without it the "
            "word term is left out.",
        ),
    ),
    "mt_hope": ArchitectureCard(
        title="MT-HOPE (Möbius-twistor recurrent LM with HOPE memories)",
        tags=("recurrent", "test-time-training", "titans", "continual-learning", "complex-valued"),
        summary=(
            "MT-HOPE is an attention-free recurrent language model. Every token is a twistor: two complex "
            "vectors (omega and pi) stored as real and imaginary parts. Complex gated linear recurrences mix "
            "the sequence; between them, input-conditioned Möbius maps z -> (az + b)/(cz + d), kept well "
            "conditioned, couple the layers. A Titans neural memory, a small MLP per head, is trained while "
            "the model reads, by gradient descent with momentum and forgetting on an associative loss, so "
            "the model keeps learning inside a long text. A slot memory and a chain of MLP levels updating "
            "at different frequencies (HOPE's continuum memory) follow; the latter supports continual "
            "learning of new text. All state has a fixed size, so each new token costs the same however "
            "long the text already is."
        ),
        describe=_describe_mt_hope,
        limits=(
            "The Titans memory is computed in chunks with a Python loop over chunks; training is slower "
            "per token than a Transformer of the same size on short texts.",
            "Bidirectional configurations are encoders only (`MTHopeModel`); they cannot generate.",
        ),
    ),
    "hmtr": ArchitectureCard(
        title="H-M-T-R (hierarchical Mamba-Transformer-RNN)",
        tags=("mamba", "hierarchical", "latent-reasoning", "gru"),
        summary=(
            "H-M-T-R splits language modelling into compressing, planning and speaking. A causal Mamba "
            "encoder reads the tokens and, at the end of every block of K tokens, emits a capsule: one "
            "vector summarising the text so far. A GPT-style Transformer reasoner runs over the capsules, "
            "K times fewer positions than tokens, and predicts the capsule of the next block. A small "
            "recurrent decoder unfolds that prediction into the K tokens of the block. Generation runs the "
            "encoder and the reasoner once per block and only the small decoder for every token; the "
            "reasoner's key/value cache holds one entry per block instead of one per token."
        ),
        describe=_describe_hmtr,
        limits=(
            "Inside a block the next token depends on the earlier tokens of the block only through the small "
            "recurrent decoder and the predicted capsule; the training curriculum (autoencoder, latent "
            "prediction, joint fine-tune) matters for quality.",
        ),
    ),
}


def architecture_card(model_type: str) -> ArchitectureCard:
    if model_type not in ARCHITECTURE_CARDS:
        raise ValueError(f"no model card text for model_type {model_type!r}; known: {sorted(ARCHITECTURE_CARDS)} "
                         "(add an entry to strata.hub_cards.model_card.ARCHITECTURE_CARDS)")
    return ARCHITECTURE_CARDS[model_type]


# ----------------------------------------------------------------------------- pieces of the body
def _number(value: Any, fmt: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _config_rows(config, parameters: int) -> list[tuple[str, str]]:
    rows = [("parameters", f"{parameters:,}")]
    for key, label in (("hidden_size", "hidden size"), ("num_hidden_layers", "blocks"),
                       ("num_attention_heads", "attention / retention heads"),
                       ("intermediate_size", "MLP width"), ("state_size", "SSM state size"),
                       ("conv_kernel", "convolution width"), ("expand", "Mamba expansion"),
                       ("vocab_size", "vocabulary"), ("tie_word_embeddings", "tied input/output embeddings")):
        if hasattr(config, key):
            rows.append((label, f"`{getattr(config, key)}`"))
    return rows


def _tokenizer_text(tokenizer) -> str:
    if tokenizer is None:
        return "No tokenizer was saved with this model; use the one it was trained with."
    name = type(tokenizer).__name__
    size = len(tokenizer)
    if name == "CharWordTokenizer":
        chars = tokenizer.vocab_size - 260
        return (
            f"`CharWordTokenizer` (strata), {size:,} tokens: 4 special tokens (`<pad>`, `<bos>`, `<eos>`, "
            f"`<unk>`), 256 byte tokens and {chars:,} single characters. Every character is one token; a "
            "character outside the vocabulary becomes its UTF-8 bytes, so any text encodes and decodes "
            "exactly. Its code is `tokenization_charword.py` in this folder."
        )
    return f"`{name}`, {size:,} tokens."


def _evaluation_text(metrics: dict[str, Any], eval_dataset: dict[str, str] | None) -> str:
    rows = [(name, _number(metrics[key], "{:.4f}")) for key, (_, name) in EVAL_METRICS.items() if key in metrics]
    rows += [(label, _number(metrics[key], fmt)) for key, (label, fmt) in RUN_NUMBERS.items() if key in metrics]
    if not rows:
        return "No evaluation was run for this folder."
    where = f" on the validation split of {eval_dataset['name']}" if eval_dataset else ""
    text = [f"Measured at the end of training{where}:", "", _table(rows, ("metric", "value"))]
    if "eval_bpc" in metrics:
        text += ["", "Bits per character = validation loss / ln 2 x (validation tokens / validation characters); "
                     "with one token per character it is the loss in bits."]
    if eval_dataset and "shakespeare" in eval_dataset.get("type", ""):
        text += ["", "For scale: nanoGPT's character-level models reach a validation loss of about 1.47 nats "
                     "(2.12 bits per character) with 10.7M parameters trained on a GPU, and about 1.88 nats "
                     "(2.71 bits per character) in its small CPU configuration, on the same 90% / 10% split."]
    return "\n".join(text)


def _settings_text(training: dict[str, Any] | None) -> str:
    if not training:
        return ""
    rows = [(label, f"`{training[key]}`") for key, label in RUN_SETTINGS.items()
            if training.get(key) is not None]
    overrides = training.get("config_overrides") or {}
    if overrides:
        rows.append(("config changes to the preset", ", ".join(f"`{k}={v}`" for k, v in sorted(overrides.items()))))
    if not rows:
        return ""
    return "\n".join(["Training run (Hugging Face `Trainer`, AdamW, linear warmup then cosine decay to a tenth "
                      "of the peak learning rate):", "", _table(rows, ("setting", "value")), "", ""])


# ----------------------------------------------------------------------------- the card
def render_model_card(
    model,
    tokenizer=None,
    metrics: dict[str, Any] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    *,
    eval_dataset: dict[str, str] | None = None,
    training: dict[str, Any] | None = None,
    model_id: str | None = None,
    model_name: str | None = None,
    language: str | list[str] | None = None,
    example_prompt: str = "ROMEO:",
) -> str:
    """The README.md of a Hub-ready folder: YAML metadata, then the card body.

    Args:
        model: a strata causal LM (its config decides the architecture text).
        tokenizer: the tokenizer saved with it.
        metrics: numbers of the run; ``eval_loss`` / ``eval_bpc`` / ``eval_perplexity`` become
            model-index evaluation results, ``train_loss``, ``train_steps``, ``train_tokens``,
            ``train_runtime_s``, ``parameters`` are listed in the body.
        datasets: Hub dataset ids the model was trained on (metadata ``datasets``).
        eval_dataset: ``{"type": hub id or name, "name": display name, "split": ...}`` of the
            evaluation results (default: the first of ``datasets``, split ``validation``).
        training: settings of the run (see ``RUN_SETTINGS``).
        model_id: Hub repo id or folder used in the code examples.
    """
    config = model.config
    model_type = config.model_type
    arch = architecture_card(model_type)
    metrics = dict(metrics or {})
    parameters = int(metrics.get("parameters") or sum(p.numel() for p in model.parameters()))
    model_id = model_id or getattr(config, "name_or_path", "") or model_type
    model_name = model_name or model_id.rstrip("/").split("/")[-1] or model_type
    if eval_dataset is None and datasets:
        eval_dataset = {"type": datasets[0], "name": datasets[0], "split": "validation"}

    eval_results = []
    for key, (metric_type, metric_name) in EVAL_METRICS.items():
        if key not in metrics:
            continue
        if eval_dataset is None:
            raise ValueError(f"metric {key!r} needs the dataset it was measured on: pass `datasets` or `eval_dataset`")
        eval_results.append(EvalResult(
            task_type="text-generation", task_name="Text generation",
            dataset_type=eval_dataset["type"], dataset_name=eval_dataset["name"],
            dataset_split=eval_dataset.get("split", "validation"),
            metric_type=metric_type, metric_name=metric_name, metric_value=float(metrics[key]),
        ))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=language,
        tags=["strata", model_type, "custom_code", *arch.tags],
        datasets=datasets or None,
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
    )

    import strata  # the installed package decides the documented LoRA targets

    lora_targets = strata.lora_target_modules(model_type) if model_type in strata.ARCHITECTURES else []
    trained_on = f" trained on {eval_dataset['name']}" if eval_dataset else ""
    base = f" It was fine-tuned from `{base_model}`." if base_model else ""
    body = f"""
# {model_name}

A {arch.title} language model with {parameters:,} parameters{trained_on}, built with
strata, a package that brings new architectures to Hugging Face Transformers.{base}

## Architecture

{arch.summary}

{arch.describe(config)}

{_table(_config_rows(config, parameters), ("setting", "value"))}

## Tokenizer

{_tokenizer_text(tokenizer)}

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

model_id = "{model_id}"  # a Hub repo id or a local folder
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)

inputs = tokenizer({json.dumps(example_prompt, ensure_ascii=False)}, return_tensors="pt")
model.generate(**inputs, streamer=TextStreamer(tokenizer))  # sampling defaults: generation_config.json
```

`trust_remote_code=True` runs the Python files of this folder (`configuration_{model_type}.py`,
`modeling_{model_type}.py` and the modules they import): a self-contained copy of strata's code, so
strata need not be installed. Read them before you trust them. Where strata is installed,
`import strata` registers the architecture and its tokenizer with the
Auto classes, and the folder loads without `trust_remote_code`. `pipeline("text-generation",
model=model_id, trust_remote_code=True)` works too; from the command line:
`strata generate FOLDER --prompt {shlex.quote(example_prompt.splitlines()[0] if example_prompt.strip() else "A")}`.

## How to fine-tune

The model is a regular `PreTrainedModel`: the Hugging Face `Trainer` trains it on blocks of token
ids whose `labels` equal their `input_ids` (the model shifts them by one). strata builds such blocks
from a text file with the `datasets` library:

```python
from strata.training.data import prepare_lm_data
from transformers import Trainer, TrainingArguments

data = prepare_lm_data(tokenizer, "my_text.txt", block_size=128)  # 90% train / 10% validation blocks

args = TrainingArguments("my-finetune", max_steps=500, learning_rate=1e-3, per_device_train_batch_size=16)
trainer = Trainer(model=model, args=args, train_dataset=data.train)
trainer.train()
trainer.save_model("my-finetune")  # weights, config and the code files again
```

PEFT LoRA: PEFT does not know the `{model_type}` model type, so name the layers to adapt. The
documented default, `strata.lora_target_modules("{model_type}")`, is:

```python
from peft import LoraConfig, get_peft_model

targets = {lora_targets!r}
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
```

## Training and evaluation

{_settings_text(training)}{_evaluation_text(metrics, eval_dataset)}

## Limitations

- {_size_limit(parameters, metrics, eval_dataset)}
- {_length_limit(tokenizer, training)}
{_bullets(arch.limits)}- Classes loaded with `trust_remote_code=True` are copies made by Transformers, not the classes of an
  installed strata package, so `isinstance` checks against strata's classes fail on them.

## License

{license}
"""
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


def _size_limit(parameters: int, metrics: dict[str, Any], eval_dataset: dict[str, str] | None) -> str:
    steps = metrics.get("train_steps")
    trained = f" for {steps:,} steps" if isinstance(steps, int) else ""
    data = f" on {eval_dataset['name']}" if eval_dataset else ""
    return (f"A small research model ({parameters:,} parameters) trained{trained}{data}: it imitates the "
            "surface of its training text (spelling, layout, names), not its meaning. Its output is not "
            "factual, may be offensive, and is not fit for any application beyond experiments.")


def _length_limit(tokenizer, training: dict[str, Any] | None) -> str:
    trained = (f"Training used sequences of {training['seq_len']} tokens"
               if training and training.get("seq_len") else "Training used sequences of a fixed length")
    chars = ("Every token is one character, so a text is as long in tokens as in characters. "
             if type(tokenizer).__name__ == "CharWordTokenizer" else "")
    return f"{chars}{trained}; the recurrent state runs on beyond that, but quality there was not measured."


def _bullets(lines) -> str:
    return "".join(f"- {line}\n" for line in lines)


def set_card_model_id(card: str, model_id: str) -> str:
    """Point the card's code examples at ``model_id`` (e.g. the Hub repo id when pushing)."""
    return _MODEL_ID_LINE.sub(f'model_id = "{model_id}"  # a Hub repo id or a local folder', card)
