"""The experiment file: schema, validation, ``--quick`` and the grid of runs.

An experiment file (YAML) declares models, tasks and seeds; the grid is every
(model, task, seed), plus one efficiency run per model::

    name: my_study                 # report folder name (default: the file's stem)
    description: free text for the report
    seeds: [0, 1]
    threads: 1                     # torch CPU threads (default 1: see docs/experiments.md)
    focus: fusion                  # optional: the model whose wins and losses the report spells out
    models:
      - name: fusion               # unique label used in tables and figures
        model_type: retmamba       # a key of strata.ARCHITECTURES
        preset: fusion-tiny        # a preset of that architecture's config
        overrides: {fusion_gate: false}      # optional config fields
      - name: mamba
        model_type: retmamba
        preset: mamba-tiny
        match_params: {reference: fusion, field: intermediate_size, multiple: 16}   # optional
    training:                      # defaults of every task (each task may override them)
      steps: 200
      batch_size: 16
      lr: 3.0e-3
    tasks:
      - {name: lm_en, kind: lm, corpus: tinyshakespeare, seq_len: 128}
      - {name: mqar_64, kind: mqar, seq_len: 64, num_kv_pairs: 4}
    efficiency:                    # optional; omit or set to null to skip
      context_lengths: [256, 1024, 4096, 16384]
    quick:                         # optional: deep-merged over the file by --quick
      training: {steps: 20}

Unknown keys, unknown task kinds, bad values and duplicate names are errors (``ValueError``
naming the key). A ``model_type`` that is not registered in ``strata.ARCHITECTURES`` is NOT
an error here: the runner writes a ``status: "skipped"`` row for each of its runs, so a shared
config may list architectures that land later. A preset unknown to a registered architecture
is an error (checked by :func:`check_registered`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bumped when a change to the harness changes what a run measures; part of every run id,
# so results of an older harness are not mistaken for current ones on resume.
HARNESS_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

TOP_KEYS = {"name", "description", "seeds", "focus", "threads", "models", "training", "tasks", "efficiency", "quick"}
MODEL_KEYS = {"name", "model_type", "preset", "overrides", "match_params", "description"}
MATCH_KEYS = {"reference", "field", "multiple", "low", "high"}
TRAINING_KEYS = {"steps", "batch_size", "lr", "warmup_steps", "weight_decay", "eval_batch_size", "logging_points"}
TRAINING_DEFAULTS = dict(steps=200, batch_size=16, lr=3e-3, warmup_steps=20, weight_decay=0.1, eval_batch_size=32,
                         logging_points=20)
EFFICIENCY_KEYS = {"context_lengths", "decode_tokens", "train_batch_size", "train_seq_len", "train_steps",
                   "flops_context_lengths", "vocab_size", "max_seconds"}
EFFICIENCY_DEFAULTS = dict(context_lengths=[256, 1024, 4096, 16384], decode_tokens=32, train_batch_size=8,
                           train_seq_len=256, train_steps=3, flops_context_lengths=[256, 4096], vocab_size=256,
                           max_seconds=120.0)

# --quick without a `quick:` section: a smoke run of every cell in a few minutes.
QUICK_DEFAULTS = {
    "seeds": "first",
    "training": {"steps": 12},
    "task_caps": {"eval_examples": 64, "seq_len": 64, "eval_lengths": [64, 128], "eval_blocks": 16, "steps": 12,
                  "batch_size": 8},
    "efficiency": {"context_lengths": [256, 1024], "decode_tokens": 8, "train_steps": 1,
                   "flops_context_lengths": [256], "train_seq_len": 64, "train_batch_size": 4},
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    match_params: dict[str, Any] | None = None
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model_type": self.model_type, "preset": self.preset,
                "overrides": dict(self.overrides), "match_params": self.match_params}


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a model trained and evaluated on a task with a seed (or an efficiency run)."""

    model: ModelSpec
    task: dict[str, Any]  # full task parameters, training settings included (see tasks.py)
    seed: int
    threads: int = 1  # torch CPU threads: part of the key (timings and float reductions depend on it)

    @property
    def kind(self) -> str:
        return self.task["kind"]

    @property
    def run_id(self) -> str:
        """Hash of everything that determines the run's result: the resume key of results.jsonl."""
        key = {"v": HARNESS_VERSION, "model": self.model.as_dict(), "task": self.task, "seed": self.seed,
               "threads": self.threads}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.model.name} / {self.task['name']} / seed {self.seed}"


@dataclass
class ExperimentConfig:
    name: str
    description: str
    seeds: list[int]
    focus: str | None
    threads: int
    models: list[ModelSpec]
    tasks: list[dict[str, Any]]  # validated, training defaults merged in
    efficiency: dict[str, Any] | None
    quick: bool = False
    source: str | None = None  # the file it came from
    raw: dict[str, Any] = field(default_factory=dict)

    def runs(self) -> list[RunSpec]:
        """The grid, in execution order: task by task (so a report fills in column by column), then efficiency."""
        grid = [RunSpec(model, task, seed, self.threads)
                for task in self.tasks for seed in self.seeds for model in self.models]
        if self.efficiency is not None:
            task = dict(self.efficiency, name="efficiency", kind="efficiency")
            grid += [RunSpec(model, task, 0, self.threads) for model in self.models]
        return grid

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def _fail(where: str, message: str):
    raise ValueError(f"experiment config: {where}: {message}")


def _check_keys(where: str, mapping: Any, allowed: set[str], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(mapping, dict):
        _fail(where, f"expected a mapping, got {type(mapping).__name__} ({mapping!r})")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in required:
        if key not in mapping:
            _fail(where, f"missing required key {key!r}")
    return mapping


def _check_name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        _fail(where, f"a name must be letters, digits, '_', '-' or '.', got {value!r}")
    return value


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(where, f"expected a whole number >= 1, got {value!r}")
    return value


def _positive_float(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(where, f"expected a number > 0, got {value!r}")
    return float(value)


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _training(where: str, settings: dict) -> dict:
    _check_keys(where, settings, TRAINING_KEYS)
    for key in ("steps", "batch_size", "eval_batch_size", "logging_points"):
        if key in settings:
            _positive_int(f"{where}.{key}", settings[key])
    if "lr" in settings:
        _positive_float(f"{where}.lr", settings["lr"])
    if "warmup_steps" in settings and (isinstance(settings["warmup_steps"], bool)
                                       or not isinstance(settings["warmup_steps"], int)
                                       or settings["warmup_steps"] < 0):
        _fail(f"{where}.warmup_steps", f"expected a whole number >= 0, got {settings['warmup_steps']!r}")
    if "weight_decay" in settings and (not isinstance(settings["weight_decay"], (int, float))
                                       or settings["weight_decay"] < 0):
        _fail(f"{where}.weight_decay", f"expected a number >= 0, got {settings['weight_decay']!r}")
    return settings


def _models(entries: Any) -> list[ModelSpec]:
    if not isinstance(entries, list) or not entries:
        _fail("models", "expected a non-empty list of models")
    models, names = [], set()
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        _check_keys(where, entry, MODEL_KEYS, required=("model_type", "preset"))
        name = _check_name(f"{where}.name", entry.get("name", f"{entry['model_type']}-{entry['preset']}"))
        if name in names:
            _fail(where, f"duplicate model name {name!r} (give each entry its own `name`)")
        names.add(name)
        for key in ("model_type", "preset"):
            if not isinstance(entry[key], str) or not entry[key]:
                _fail(f"{where}.{key}", f"expected a non-empty string, got {entry[key]!r}")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict) or not all(isinstance(k, str) and k.isidentifier() for k in overrides):
            _fail(f"{where}.overrides", f"expected a mapping of config field names to values, got {overrides!r}")
        match = entry.get("match_params")
        if match is not None:
            if isinstance(match, str):
                match = {"reference": match}
            _check_keys(f"{where}.match_params", match, MATCH_KEYS, required=("reference",))
            match = {"field": "intermediate_size", "multiple": 16, **match}
            _positive_int(f"{where}.match_params.multiple", match["multiple"])
            if not isinstance(match["field"], str) or not match["field"].isidentifier():
                _fail(f"{where}.match_params.field", f"expected a config field name, got {match['field']!r}")
            if match["field"] in overrides:
                _fail(f"{where}.match_params", f"`{match['field']}` is both matched and set in overrides")
        models.append(ModelSpec(name, entry["model_type"], entry["preset"], dict(overrides), match,
                                str(entry.get("description", ""))))
    for m in models:
        if m.match_params is not None:
            ref = m.match_params["reference"]
            if ref not in names:
                _fail(f"model {m.name!r}.match_params.reference", f"no model named {ref!r}; models: {sorted(names)}")
            if ref == m.name:
                _fail(f"model {m.name!r}.match_params.reference", "a model cannot be matched to itself")
            ref_spec = next(x for x in models if x.name == ref)
            if ref_spec.match_params is not None:
                _fail(f"model {m.name!r}.match_params.reference", f"{ref!r} is itself matched; match to a fixed model")
    return models


def _apply_quick_caps(task: dict, caps: dict) -> dict:
    """--quick without a `quick:` section: shorten every task (lengths, eval sizes) to smoke-test size."""
    from strata.experiment.tasks import TASK_KINDS

    out = dict(task)
    cls = TASK_KINDS[task["kind"]]
    for key, cap in caps.items():
        if key not in cls.PARAMS or key not in out and key not in cls.DEFAULTS:
            continue
        value = out.get(key, cls.DEFAULTS.get(key))
        if isinstance(cap, list):
            out[key] = [x for x in value if x <= max(cap)] or cap[:1]
        elif isinstance(value, (int, float)):
            out[key] = min(value, cap)
    return out


def parse_config(raw: Any, quick: bool = False, source: str | None = None,
                 default_name: str = "experiment") -> ExperimentConfig:
    """Validate a loaded YAML document and build the experiment (``quick``: apply its ``quick:`` section)."""
    from strata.experiment.tasks import TASK_KINDS, validate_task

    _check_keys("top level", raw, TOP_KEYS, required=("models", "tasks"))
    raw = copy.deepcopy(raw)
    quick_section = raw.pop("quick", None)
    if quick_section is not None and not isinstance(quick_section, dict):
        _fail("quick", f"expected a mapping, got {quick_section!r}")
    caps = None
    if quick:
        if quick_section:
            _check_keys("quick", quick_section, TOP_KEYS - {"quick", "name"} | {"task_caps"})
            quick_section = dict(quick_section)
            caps = quick_section.pop("task_caps", None)
            raw = deep_merge(raw, quick_section)
        else:
            caps = QUICK_DEFAULTS["task_caps"]
            raw["seeds"] = (raw.get("seeds") or [0])[:1]
            raw["training"] = deep_merge(raw.get("training") or {}, QUICK_DEFAULTS["training"])
            if raw.get("efficiency", {}) is not None:
                raw["efficiency"] = deep_merge(raw.get("efficiency") or {}, QUICK_DEFAULTS["efficiency"])
    name = _check_name("name", raw.get("name", default_name))
    if quick:
        name += "-quick"
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        _fail("seeds", f"expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        _fail("seeds", f"duplicate seeds in {seeds}")
    models = _models(raw["models"])
    training = dict(TRAINING_DEFAULTS, **_training("training", raw.get("training") or {}))

    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        _fail("tasks", "expected a non-empty list of tasks")
    tasks, task_names = [], set()
    for i, entry in enumerate(raw["tasks"]):
        where = f"tasks[{i}]"
        if not isinstance(entry, dict) or "kind" not in entry:
            _fail(where, f"expected a mapping with a `kind` (one of {sorted(TASK_KINDS)}), got {entry!r}")
        if entry["kind"] not in TASK_KINDS:
            _fail(f"{where}.kind", f"unknown task kind {entry['kind']!r}; known: {sorted(TASK_KINDS)}")
        entry = dict(entry)
        task_name = _check_name(f"{where}.name", entry.pop("name", entry["kind"]))
        if task_name in task_names or task_name == "efficiency":
            _fail(where, f"duplicate or reserved task name {task_name!r}")
        task_names.add(task_name)
        own_training = {k: entry.pop(k) for k in list(entry) if k in TRAINING_KEYS}
        task = validate_task(f"{where} ({task_name})", entry)
        if caps:
            task = _apply_quick_caps(task, caps)
            task = validate_task(f"{where} ({task_name}) after --quick", task)
        task.update(_training(where, dict(training, **own_training)))
        for key in ("steps", "batch_size") if caps else ():
            if key in caps:
                task[key] = min(task[key], caps[key])
        task["name"] = task_name
        tasks.append(task)

    efficiency = raw.get("efficiency", {})
    if efficiency is not None:
        _check_keys("efficiency", efficiency, EFFICIENCY_KEYS)
        efficiency = dict(EFFICIENCY_DEFAULTS, **efficiency)
        for key in ("context_lengths", "flops_context_lengths"):
            lengths = efficiency[key]
            if not isinstance(lengths, list) or not lengths:
                _fail(f"efficiency.{key}", f"expected a non-empty list of lengths, got {lengths!r}")
            for x in lengths:
                _positive_int(f"efficiency.{key}", x)
                if x < 2:
                    _fail(f"efficiency.{key}", f"lengths must be >= 2, got {x}")
            efficiency[key] = sorted(lengths)
        for key in ("decode_tokens", "train_batch_size", "train_seq_len", "train_steps", "vocab_size"):
            _positive_int(f"efficiency.{key}", efficiency[key])
        if efficiency["vocab_size"] < 8:
            _fail("efficiency.vocab_size", f"must be >= 8, got {efficiency['vocab_size']}")
        _positive_float("efficiency.max_seconds", efficiency["max_seconds"])

    threads = raw.get("threads", 1)
    _positive_int("threads", threads)
    focus = raw.get("focus")
    if focus is not None and focus not in {m.name for m in models}:
        _fail("focus", f"no model named {focus!r}; models: {[m.name for m in models]}")
    return ExperimentConfig(name=name, description=str(raw.get("description", "")).strip(), seeds=list(seeds),
                            focus=focus, threads=threads, models=models, tasks=tasks, efficiency=efficiency, quick=quick,
                            source=source, raw=raw)


def load_config(path: str | Path, quick: bool = False) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"experiment config {path}: not valid YAML: {error}") from None
    if raw is None:
        raise ValueError(f"experiment config {path}: the file is empty")
    return parse_config(raw, quick=quick, source=str(path), default_name=path.stem)
