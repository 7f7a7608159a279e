"""The tasks of an experiment: what a model is trained on and how it is scored.

Every task is generated or bundled locally and deterministic given its seed.

- ``lm``: character-level language modelling on a bundled corpus (tinyshakespeare, English;
  tang_poems, Chinese); score: bits per character on a fixed held-out split (the first
  ``eval_blocks`` validation blocks of strata.training.data's 90/10 split).
- ``mqar``: multi-query associative recall, Zoology's setup (Arora et al. 2023): key-value
  pairs, then the keys again in random order at random places; the model must answer each
  with its value. Score: accuracy over the queries.
- ``selective_copying``: the Mamba paper's task (Gu & Dao 2023): ``num_tokens`` data tokens
  scattered among noise tokens, then a separator; the model must write the data tokens in
  order. Score: per-token and whole-sequence accuracy.
- ``induction``: induction heads with length extrapolation (Mamba paper, section 4.1.2): a
  trigger token followed by a target somewhere in a random sequence, the trigger again at the
  end; the model must answer the target. Trained at ``seq_len``, scored at every length of
  ``eval_lengths`` (longer ones measure extrapolation).
- ``listops``: ListOps-style nested expressions (Nangia & Bowman 2018, the LRA's ListOps) over
  digits with MAX, MIN, MED (median) and SM (sum mod 10); the model reads the expression and
  ``=`` and must answer the digit. Score: accuracy (the majority-answer rate is reported as the
  baseline).

Synthetic tasks use their own small vocabulary with ids 0, 1, 2 reserved (pad, bos, eos)
and are written as language modelling: ``labels`` equal the inputs at the positions to be
predicted and -100 elsewhere, so every causal LM trains on them with its own loss.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

PAD, BOS, EOS = 0, 1, 2
FIRST_TOKEN = 3
IGNORE = -100


class ExampleDataset(torch.utils.data.Dataset):
    """Rows of ``input_ids`` / ``labels`` tensors, for the Trainer."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per (seed, purpose): the evaluation set never depends on the training seed."""
    return np.random.default_rng([seed, sum(ord(c) * 31 ** i for i, c in enumerate(purpose)) % (2 ** 31)])


class Task:
    """Base class: ``PARAMS`` are the task's keys, ``DEFAULTS`` their default values."""

    KIND = ""
    PARAMS: set[str] = set()
    DEFAULTS: dict[str, Any] = {}
    LOWER_IS_BETTER = False
    PRIMARY = "accuracy"  # the metric tables and figures lead with

    def __init__(self, params: dict[str, Any]):
        self.p = params

    # -- what the runner needs
    @property
    def vocab_size(self) -> int:
        return self.p["vocab_size"]

    @property
    def train_seq_len(self) -> int:
        return self.p["seq_len"]

    def train_dataset(self, n: int, seed: int):
        ids, labels = self.generate(n, _rng(seed, f"{self.KIND}-train"), self.p["seq_len"])
        return ExampleDataset(torch.from_numpy(ids), torch.from_numpy(labels))

    def evaluate(self, model, batch_size: int) -> dict[str, float]:
        # The evaluation set depends on the task's parameters only: every model and seed sees the same one.
        ids, labels = self.generate(self.p["eval_examples"], _rng(12345, f"{self.KIND}-eval"), self.p["seq_len"])
        return score_predictions(model, ids, labels, batch_size)

    def generate(self, n: int, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def validate(cls, where: str, params: dict[str, Any]) -> dict[str, Any]:
        return params


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_predictions(model, ids: np.ndarray, labels: np.ndarray, batch_size: int) -> dict[str, float]:
    """Greedy accuracy and mean loss at the labelled positions (``labels`` aligned with the inputs,
    as the model's own loss reads them: the logits at t predict labels[t + 1])."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = seq_correct = 0
    loss_sum = 0.0
    for start in range(0, len(ids), batch_size):
        x = torch.from_numpy(ids[start:start + batch_size]).to(device)
        y = torch.from_numpy(labels[start:start + batch_size]).to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        target = y[:, 1:]
        mask = target != IGNORE
        pred = logits.argmax(-1)
        hit = (pred == target) & mask
        correct += int(hit.sum())
        total += int(mask.sum())
        seq_correct += int(((pred == target) | ~mask).all(-1).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
    return {"accuracy": correct / total, "sequence_accuracy": seq_correct / len(ids), "eval_loss": loss_sum / total}


# ----------------------------------------------------------------------------- MQAR
class MQARTask(Task):
    KIND = "mqar"
    PARAMS = {"seq_len", "num_kv_pairs", "vocab_size", "eval_examples"}
    DEFAULTS = dict(seq_len=64, num_kv_pairs=4, vocab_size=256, eval_examples=512)

    @classmethod
    def validate(cls, where, p):
        if p["seq_len"] < 4 * p["num_kv_pairs"]:
            raise ValueError(f"{where}: seq_len ({p['seq_len']}) must be >= 4 x num_kv_pairs ({p['num_kv_pairs']}): "
                             "the pairs, then room for every query and its answer")
        if (p["vocab_size"] - FIRST_TOKEN) // 2 < p["num_kv_pairs"]:
            raise ValueError(f"{where}: vocab_size {p['vocab_size']} leaves fewer than num_kv_pairs distinct keys")
        return p

    def generate(self, n, rng, seq_len):
        pairs = self.p["num_kv_pairs"]
        half = (self.p["vocab_size"] - FIRST_TOKEN) // 2
        context = 2 * pairs
        ids = np.zeros((n, seq_len), dtype=np.int64)
        labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
        slots = (seq_len - context) // 2  # query slots: (key, answer) at an even offset of the query region
        for i in range(n):
            keys = rng.choice(half, size=pairs, replace=False) + FIRST_TOKEN
            values = rng.integers(0, half, size=pairs) + FIRST_TOKEN + half
            ids[i, 0:context:2], ids[i, 1:context:2] = keys, values
            order = rng.permutation(pairs)
            where = context + 2 * np.sort(rng.choice(slots, size=pairs, replace=False))
            ids[i, where], ids[i, where + 1] = keys[order], values[order]
            labels[i, where + 1] = values[order]
        return ids, labels

    def chance(self) -> float:
        return 1.0 / ((self.p["vocab_size"] - FIRST_TOKEN) // 2)


# ----------------------------------------------------------------------------- selective copying
class SelectiveCopyingTask(Task):
    KIND = "selective_copying"
    PARAMS = {"seq_len", "num_tokens", "num_data_tokens", "eval_examples"}
    DEFAULTS = dict(seq_len=64, num_tokens=8, num_data_tokens=8, eval_examples=512)
    # layout: [context of seq_len - num_tokens - 1 positions: data tokens among noise] SEP [data tokens]

    @classmethod
    def validate(cls, where, p):
        if p["seq_len"] < 2 * p["num_tokens"] + 1:
            raise ValueError(f"{where}: seq_len ({p['seq_len']}) must be >= 2 x num_tokens + 1")
        return p

    @property
    def vocab_size(self):
        return FIRST_TOKEN + 2 + self.p["num_data_tokens"]  # noise, separator, data tokens

    def generate(self, n, rng, seq_len):
        m, k = self.p["num_tokens"], self.p["num_data_tokens"]
        noise, sep = FIRST_TOKEN, FIRST_TOKEN + 1
        context = seq_len - m - 1
        ids = np.full((n, seq_len), noise, dtype=np.int64)
        labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
        for i in range(n):
            data = rng.integers(0, k, size=m) + FIRST_TOKEN + 2
            ids[i, np.sort(rng.choice(context, size=m, replace=False))] = data
            ids[i, context] = sep
            ids[i, context + 1:] = data
            labels[i, context + 1:] = data
        return ids, labels

    def chance(self) -> float:
        return 1.0 / self.p["num_data_tokens"]


# ----------------------------------------------------------------------------- induction heads
class InductionTask(Task):
    KIND = "induction"
    PARAMS = {"seq_len", "num_data_tokens", "eval_lengths", "eval_examples"}
    DEFAULTS = dict(seq_len=64, num_data_tokens=16, eval_lengths=[64, 128, 256, 512, 1024], eval_examples=256)

    @classmethod
    def validate(cls, where, p):
        lengths = p["eval_lengths"]
        if not isinstance(lengths, list) or not lengths or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 8 for x in lengths):
            raise ValueError(f"{where}: eval_lengths must be a non-empty list of lengths >= 8, got {lengths!r}")
        if p["seq_len"] < 8:
            raise ValueError(f"{where}: seq_len must be >= 8, got {p['seq_len']}")
        p["eval_lengths"] = sorted(set(lengths))
        return p

    @property
    def vocab_size(self):
        return FIRST_TOKEN + 1 + self.p["num_data_tokens"]  # trigger, data tokens

    def generate(self, n, rng, seq_len):
        trigger = FIRST_TOKEN
        ids = rng.integers(0, self.p["num_data_tokens"], size=(n, seq_len)) + FIRST_TOKEN + 1
        labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
        for i in range(n):
            at = rng.integers(0, seq_len - 3)  # trigger position; its target follows
            ids[i, at] = trigger
            ids[i, -2] = trigger
            ids[i, -1] = ids[i, at + 1]
            labels[i, -1] = ids[i, at + 1]
        return ids, labels

    def evaluate(self, model, batch_size):
        metrics = {}
        for length in self.p["eval_lengths"]:
            ids, labels = self.generate(self.p["eval_examples"], _rng(12345 + length, "induction-eval"), length)
            # long sequences: fewer per batch, so memory stays bounded
            scores = score_predictions(model, ids, labels, max(1, batch_size * self.p["seq_len"] // length))
            metrics[f"accuracy@{length}"] = scores["accuracy"]
        trained = [x for x in self.p["eval_lengths"] if x <= self.p["seq_len"]]
        longer = [x for x in self.p["eval_lengths"] if x > self.p["seq_len"]]
        metrics["accuracy"] = (np.mean([metrics[f"accuracy@{x}"] for x in trained]) if trained
                               else metrics[f"accuracy@{self.p['eval_lengths'][0]}"])
        if longer:
            metrics["extrapolation_accuracy"] = float(np.mean([metrics[f"accuracy@{x}"] for x in longer]))
        metrics["accuracy"] = float(metrics["accuracy"])
        return metrics

    def chance(self) -> float:
        return 1.0 / self.p["num_data_tokens"]


# ----------------------------------------------------------------------------- ListOps
LISTOPS_OPS = ("MAX", "MIN", "MED", "SM")


def listops_value(op: str, args: list[int]) -> int:
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":
        return int(sorted(args)[len(args) // 2])  # upper median: always a digit
    return sum(args) % 10


class ListOpsTask(Task):
    KIND = "listops"
    PARAMS = {"seq_len", "max_depth", "max_args", "eval_examples"}
    DEFAULTS = dict(seq_len=96, max_depth=3, max_args=4, eval_examples=512)
    # tokens: digits 0-9, the four operators, '[', ']', '='
    DIGIT0 = FIRST_TOKEN
    OP0 = FIRST_TOKEN + 10
    OPEN, CLOSE, EQUALS = FIRST_TOKEN + 14, FIRST_TOKEN + 15, FIRST_TOKEN + 16

    @classmethod
    def validate(cls, where, p):
        if p["max_args"] < 2 or p["max_depth"] < 1:
            raise ValueError(f"{where}: need max_args >= 2 and max_depth >= 1, got {p['max_args']}, {p['max_depth']}")
        if p["seq_len"] < 8:
            raise ValueError(f"{where}: seq_len must be >= 8, got {p['seq_len']}")
        return p

    @property
    def vocab_size(self):
        return self.EQUALS + 1

    def _tree(self, rng, depth: int) -> tuple[list[int], int]:
        if depth == 0 or (depth < self.p["max_depth"] and rng.random() < 0.3):
            digit = int(rng.integers(0, 10))
            return [self.DIGIT0 + digit], digit
        op = int(rng.integers(0, len(LISTOPS_OPS)))
        tokens, values = [self.OPEN, self.OP0 + op], []
        for _ in range(int(rng.integers(2, self.p["max_args"] + 1))):
            sub, value = self._tree(rng, depth - 1)
            tokens += sub
            values.append(value)
        return tokens + [self.CLOSE], listops_value(LISTOPS_OPS[op], values)

    def generate(self, n, rng, seq_len):
        ids = np.full((n, seq_len), PAD, dtype=np.int64)
        labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
        for i in range(n):
            while True:  # rejection: an expression that fits, with its answer, in seq_len tokens
                tokens, value = self._tree(rng, self.p["max_depth"])
                if len(tokens) + 2 <= seq_len:
                    break
            row = tokens + [self.EQUALS, self.DIGIT0 + value]
            ids[i, :len(row)] = row  # right padding: a causal model never sees it before the answer
            labels[i, len(row) - 1] = self.DIGIT0 + value
        return ids, labels

    def evaluate(self, model, batch_size):
        ids, labels = self.generate(self.p["eval_examples"], _rng(12345, "listops-eval"), self.p["seq_len"])
        metrics = score_predictions(model, ids, labels, batch_size)
        answers = labels[labels != IGNORE]
        metrics["majority_baseline"] = float(np.bincount(answers).max() / len(answers))
        return metrics

    def chance(self) -> float:
        return 0.1


# ----------------------------------------------------------------------------- language modelling
@functools.lru_cache(maxsize=4)
def _corpus_tokenizer(corpus: str):
    from strata.training.data import load_text_splits
    from strata.training.train import corpus_tokenizer

    train_text = load_text_splits(corpus)["train"]
    return corpus_tokenizer(row["text"] for row in train_text)


@functools.lru_cache(maxsize=8)
def _lm_data(corpus: str, seq_len: int):
    from strata.training.data import prepare_lm_data

    return prepare_lm_data(_corpus_tokenizer(corpus), corpus, block_size=seq_len)


class LMTask(Task):
    KIND = "lm"
    PARAMS = {"corpus", "seq_len", "eval_blocks"}
    DEFAULTS = dict(corpus="tinyshakespeare", seq_len=128, eval_blocks=128)
    LOWER_IS_BETTER = True
    PRIMARY = "bpc"

    @classmethod
    def validate(cls, where, p):
        from strata.training.data import CORPORA

        if p["corpus"] not in CORPORA:
            raise ValueError(f"{where}: corpus must be a bundled corpus {sorted(CORPORA)}, got {p['corpus']!r}")
        if p["seq_len"] < 2:
            raise ValueError(f"{where}: seq_len must be >= 2, got {p['seq_len']}")
        return p

    @property
    def tokenizer(self):
        return _corpus_tokenizer(self.p["corpus"])

    @property
    def vocab_size(self):
        return len(self.tokenizer)

    def special_ids(self) -> dict[str, int]:
        tok = self.tokenizer
        return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}

    def train_dataset(self, n, seed):
        return _lm_data(self.p["corpus"], self.p["seq_len"]).train  # the Trainer samples it with the run's seed

    @torch.no_grad()
    def evaluate(self, model, batch_size):
        from strata.training.data import bits_per_character

        data = _lm_data(self.p["corpus"], self.p["seq_len"])
        blocks = data.validation["input_ids"][: self.p["eval_blocks"]]
        ids = blocks.numpy() if isinstance(blocks, torch.Tensor) else np.asarray(blocks)
        scores = score_predictions(model, ids, ids.copy(), batch_size)
        return {"bpc": bits_per_character(scores["eval_loss"], data.tokens_per_char),
                "eval_loss": scores["eval_loss"], "accuracy": scores["accuracy"],
                "perplexity": math.exp(scores["eval_loss"]), "eval_tokens": int(ids.size)}

    def chance(self) -> float | None:
        return None


TASK_KINDS: dict[str, type[Task]] = {
    cls.KIND: cls for cls in (LMTask, MQARTask, SelectiveCopyingTask, InductionTask, ListOpsTask)
}


def validate_task(where: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Check a task entry (without training keys) and fill in its defaults."""
    cls = TASK_KINDS[entry["kind"]]
    params = {k: v for k, v in entry.items() if k != "kind"}
    unknown = sorted(set(params) - cls.PARAMS)
    if unknown:
        raise ValueError(f"experiment config: {where}: unknown key(s) {unknown} for kind {cls.KIND!r}; "
                         f"allowed: {sorted(cls.PARAMS)} and training keys")
    params = dict(cls.DEFAULTS, **params)
    for key, value in params.items():
        if key in ("corpus", "eval_lengths"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"experiment config: {where}.{key}: expected a whole number >= 1, got {value!r}")
    try:
        params = cls.validate(where, params)
    except ValueError as error:
        raise ValueError(f"experiment config: {error}") from None
    return {"kind": cls.KIND, **params}


def make_task(task: dict[str, Any]) -> Task:
    cls = TASK_KINDS[task["kind"]]
    return cls({k: task[k] for k in cls.PARAMS})
