"""Perpetual training (Tiny-ONN seed 004, section 1.2): a model that lives on disk and keeps learning.

Three pieces, all usable with any strata (or Transformers) causal LM:

- ``PerpetualStore``: one folder per model life.

      <dir>/manifest.json           the last complete state: model_id, step, config, and for
                                    every tensor the file that holds its current value + digest
      <dir>/tensors/<step>-<id>.safetensors   tensors written at that step (only those that changed)
      <dir>/lifecycle.jsonl         append-only log, one JSON object per line

  ``save`` hashes every tensor (BLAKE2b of its bytes), writes only the changed ones into a
  new safetensors file (write, flush, fsync, rename), then writes the new manifest to a
  temporary file, fsyncs it, and renames it over ``manifest.json`` (atomic on POSIX), and
  fsyncs the folder. A process killed at any moment therefore leaves either the previous
  or the new manifest, and every file that manifest names is complete. Files no manifest
  names any more (superseded tensors, temporary files of a killed save) are removed after
  the swap and when a store is opened.

- ``PIPlasticity``: the PI score modulates plasticity. With ``PI_ema`` an exponential moving
  average of the model's PI score, every optimizer step uses

      lr_effective = lr_scheduled * (max_scale - (max_scale - min_scale) * PI_ema)

  High PI (the model predicts its stream well and its routing is not surprised) consolidates:
  smaller steps; low PI (surprise) makes it plastic: larger steps. The scale is applied just
  before ``optimizer.step()`` and the scheduled rate restored just after, so the scheduler is
  untouched.

- ``PerpetualTrainer`` (a ``transformers.Trainer``) + ``PerpetualCallback``: gives the model a
  persistent identity (``config.model_id``, a UUID set once and never changed), appends one
  lifecycle record per optimizer step (step, data fingerprint = BLAKE2b of the step's input
  ids, loss, PI, learning rates), saves an increment every ``save_every`` steps, applies
  ``PIPlasticity``, re-initialises dead experts of models that have ``reinit_dead_experts``
  every ``reinit_dead_every`` steps, and adds the model's routing metrics (``pi_score``,
  ``gate_loss``, ``surprise``, ``head_active_fraction``, ``expert_active_fraction``,
  ``lr_scale``) to the Trainer logs, hence to TensorBoard / any ``report_to`` integration.
  Metrics the backward pass produces (Tiny-ONN's routing loss, surprise and the PI score
  that uses them) are read from ``model.routing_stats()`` after every backward.

Loading: ``PerpetualStore(dir).load_model()`` (or ``load_state_dict()``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback

FORMAT = "strata-perpetual/1"
MANIFEST = "manifest.json"
LIFECYCLE = "lifecycle.jsonl"
TENSORS = "tensors"
# Routing metrics a model output may carry; the Trainer logs their mean since the last log.
MODEL_METRICS = ("pi_score", "gate_loss", "surprise", "head_active_fraction", "expert_active_fraction",
                 "output_entropy")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old or the whole new content."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def ensure_model_id(model) -> str:
    """The model's persistent identity: ``config.model_id``, a UUID set once."""
    config = model.config
    if not getattr(config, "model_id", None):
        config.model_id = str(uuid.uuid4())
    return config.model_id


class PerpetualStore:
    """Incremental, crash-safe on-disk state of one model (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        (self.dir / TENSORS).mkdir(parents=True, exist_ok=True)
        self._manifest = self.read_manifest()
        self._collect_garbage()

    # ------------------------------------------------------------------ reading
    def read_manifest(self) -> dict | None:
        path = self.dir / MANIFEST
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a perpetual-training manifest ({FORMAT}); format={manifest.get('format')!r}")
        return manifest

    @property
    def manifest(self) -> dict | None:
        return self._manifest

    def load_state_dict(self, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of the last complete state (digests checked when ``verify``)."""
        manifest = self.read_manifest()
        if manifest is None:
            raise FileNotFoundError(f"no complete state in {self.dir}: {MANIFEST} is missing")
        by_file = defaultdict(list)
        for name, entry in manifest["tensors"].items():
            by_file[entry["file"]].append(name)
        state = {}
        for file, names in by_file.items():
            with safe_open(str(self.dir / TENSORS / file), framework="pt") as f:
                for name in names:
                    state[name] = f.get_tensor(manifest["tensors"][name]["key"])
                    if verify and tensor_digest(state[name]) != manifest["tensors"][name]["digest"]:
                        raise ValueError(f"tensor {name} in {file} does not match its digest in {MANIFEST}")
        for alias, target in manifest.get("aliases", {}).items():
            state[alias] = state[target]
        return state

    def load_model(self, model_cls=None, verify: bool = True, **config_overrides):
        """Build the model from the manifest's config and load the last complete state."""
        manifest = self.read_manifest()
        if manifest is None:
            raise FileNotFoundError(f"no complete state in {self.dir}: {MANIFEST} is missing")
        config_dict = dict(manifest["config"], **config_overrides)
        config = type(AutoConfig.for_model(config_dict["model_type"])).from_dict(config_dict)
        model = AutoModelForCausalLM.from_config(config) if model_cls is None else model_cls(config)
        missing, unexpected = model.load_state_dict(self.load_state_dict(verify=verify), strict=False)
        if missing or unexpected:
            raise ValueError(f"the stored state does not fit the model: missing {missing}, unexpected {unexpected}")
        return model

    def read_log(self) -> list[dict]:
        """The lifecycle records; a torn last line (a process killed mid-append) is skipped."""
        path = self.dir / LIFECYCLE
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    # ------------------------------------------------------------------ writing
    def append_log(self, record: dict) -> None:
        """Append one JSON line (flushed and fsynced): the log is never rewritten."""
        line = json.dumps(record, sort_keys=True) + "\n"
        path = self.dir / LIFECYCLE
        with open(path, "a", encoding="utf-8") as f:
            if f.tell() > 0:  # a torn last line from a killed process must not swallow this one
                with open(path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        f.write("\n")
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def save(self, model, step: int, metadata: dict | None = None) -> dict:
        """Write the tensors of ``model`` that changed since the last save; swap the manifest.

        Returns ``{"step", "written": [names], "file": name or None}``.
        """
        model_id = ensure_model_id(model)
        previous = self.read_manifest()
        if previous is not None and previous.get("model_id") not in (None, model_id):
            raise ValueError(
                f"{self.dir} holds the life of model {previous['model_id']}, not of {model_id}: "
                "one store per model identity"
            )
        state = model.state_dict()
        tensors, aliases, seen = {}, {}, {}
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if t.numel() and key in seen:  # tied weights: stored once
                aliases[name] = seen[key]
            else:
                seen[key] = name
                tensors[name] = t
        old = previous["tensors"] if previous else {}
        entries, changed = {}, {}
        for name, t in tensors.items():
            digest = tensor_digest(t)
            if name in old and old[name]["digest"] == digest:
                entries[name] = old[name]
            else:
                changed[name] = t
                entries[name] = {"digest": digest, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        file = None
        if changed:
            file = f"{step:012d}-{uuid.uuid4().hex[:8]}.safetensors"
            keys = {name: f"t{i}" for i, name in enumerate(changed)}  # names may hold characters keys should not
            payload = {keys[n]: t.detach().contiguous().cpu() for n, t in changed.items()}
            tmp = self.dir / TENSORS / f".{file}.tmp"
            save_file(payload, str(tmp), metadata={"model_id": model_id, "step": str(step)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / TENSORS / file)
            _fsync_dir(self.dir / TENSORS)
            for name in changed:
                entries[name] = dict(entries[name], file=file, key=keys[name])
        manifest = {
            "format": FORMAT,
            "model_id": model_id,
            "step": int(step),
            "time": time.time(),
            "config": model.config.to_dict(),
            "tensors": entries,
            "aliases": aliases,
            "written": sorted(changed),
            "metadata": metadata or {},
        }
        _atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._manifest = manifest
        self._collect_garbage()
        return {"step": int(step), "written": sorted(changed), "file": file}

    def _collect_garbage(self) -> None:
        """Remove tensor files the current manifest does not name (superseded, or torn by a kill)."""
        live = {e["file"] for e in (self._manifest or {}).get("tensors", {}).values()}
        for path in (self.dir / TENSORS).iterdir():
            if path.name not in live:
                path.unlink(missing_ok=True)
        for path in self.dir.glob(f".{MANIFEST}.*.tmp"):
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- plasticity
@dataclass
class PIPlasticity:
    """lr scale = max_scale - (max_scale - min_scale) * PI_ema (see the module docstring)."""

    min_scale: float = 0.5
    max_scale: float = 2.0
    ema: float = 0.9
    pi_ema: float | None = None

    def __post_init__(self):
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"`ema` must be in [0, 1), got {self.ema}")

    def update(self, pi: float) -> float:
        """Feed this step's PI score; return the learning-rate scale of this step."""
        if not 0.0 <= pi <= 1.0:
            raise ValueError(f"a PI score lies in [0, 1], got {pi}")
        self.pi_ema = pi if self.pi_ema is None else self.ema * self.pi_ema + (1 - self.ema) * pi
        return self.scale()

    def scale(self) -> float:
        if self.pi_ema is None:
            return 1.0
        return self.max_scale - (self.max_scale - self.min_scale) * self.pi_ema


# --------------------------------------------------------------------------- Trainer
class _StepRecorder:
    """What the Trainer saw during the current optimizer step (all micro-batches)."""

    def __init__(self):
        self.reset_step()
        self.since_log = defaultdict(list)

    def reset_step(self):
        self.fingerprint = hashlib.blake2b(digest_size=16)
        self.losses, self.metrics = [], defaultdict(list)

    def observe(self, inputs: dict, loss: torch.Tensor, outputs) -> None:
        """A training forward: fingerprint its data, keep its loss and the model's metrics."""
        for key in ("input_ids", "word_token_ids", "pixel_values"):
            value = inputs.get(key) if isinstance(inputs, dict) else None
            if isinstance(value, torch.Tensor):
                self.fingerprint.update(key.encode())
                self.fingerprint.update(value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.losses.append(float(loss.detach()))
        self.pending = {}
        for key in MODEL_METRICS:
            value = outputs.get(key) if hasattr(outputs, "get") else None
            if value is not None:
                self.pending[key] = float(value)

    def observe_backward(self, stats: dict) -> None:
        """After its backward: metrics that only the backward pass knows (Tiny-ONN's routing
        loss, surprise and exact PI, ``model.routing_stats()``) replace the forward's."""
        merged = dict(getattr(self, "pending", {}), **{k: v for k, v in stats.items() if k in MODEL_METRICS})
        for key, value in merged.items():
            self.metrics[key].append(value)
        self.pending = {}


def _mean(values):
    return sum(values) / len(values) if values else None


class PerpetualCallback(TrainerCallback):
    """Identity, lifecycle log, incremental saves, PI plasticity, dead-expert re-initialisation."""

    def __init__(self, store: PerpetualStore, recorder: _StepRecorder, save_every: int = 1,
                 plasticity: PIPlasticity | None = None, reinit_dead_every: int = 0):
        if save_every < 1:
            raise ValueError(f"`save_every` must be >= 1, got {save_every}")
        self.store, self.recorder = store, recorder
        self.save_every, self.plasticity, self.reinit_dead_every = save_every, plasticity, reinit_dead_every
        self._scheduled_lrs: list[float] | None = None
        self.lr_scale = 1.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model_id = ensure_model_id(model)
        self.store.append_log({"event": "train_begin", "model_id": model_id, "step": state.global_step,
                               "time": time.time()})

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.lr_scale = 1.0
        pi = _mean(self.recorder.metrics.get("pi_score", []))
        if self.plasticity is not None and pi is not None:
            self.lr_scale = self.plasticity.update(pi)
        if optimizer is not None:
            self._scheduled_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_scale

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and self._scheduled_lrs is not None:
            for group, lr in zip(optimizer.param_groups, self._scheduled_lrs):
                group["lr"] = lr

    def on_step_end(self, args, state, control, model=None, **kwargs):
        rec = self.recorder
        record = {
            "event": "step",
            "model_id": model.config.model_id,
            "step": state.global_step,
            "time": time.time(),
            "data_fingerprint": rec.fingerprint.hexdigest(),
            "loss": _mean(rec.losses),
            "pi": _mean(rec.metrics.get("pi_score", [])),
            "lr": self._scheduled_lrs[0] if self._scheduled_lrs else None,
            "lr_scale": self.lr_scale,
            "lr_effective": self._scheduled_lrs[0] * self.lr_scale if self._scheduled_lrs else None,
        }
        for key in ("gate_loss", "expert_active_fraction", "head_active_fraction"):
            if rec.metrics.get(key):
                record[key] = _mean(rec.metrics[key])
        rec.since_log["lr_scale"].append(self.lr_scale)
        for key, values in rec.metrics.items():
            rec.since_log[key].extend(values)
        if self.reinit_dead_every and state.global_step % self.reinit_dead_every == 0 and hasattr(
                model, "reinit_dead_experts"):
            record["reinit_dead_experts"] = model.reinit_dead_experts()
        self.store.append_log(record)
        if state.global_step % self.save_every == 0:
            saved = self.store.save(model, state.global_step, metadata={"data_fingerprint": record["data_fingerprint"]})
            self.store.append_log({"event": "save", "step": state.global_step, "tensors_written": len(saved["written"]),
                                   "file": saved["file"], "time": time.time()})
        rec.reset_step()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        manifest = self.store.manifest
        if manifest is None or manifest["step"] != state.global_step:
            self.store.save(model, state.global_step)
        self.store.append_log({"event": "train_end", "step": state.global_step, "time": time.time()})


class PerpetualTrainer(Trainer):
    """``Trainer`` in perpetual mode: ``PerpetualTrainer(model, args, perpetual_dir=..., ...)``.

    Extra arguments: ``perpetual_dir`` (the store), ``save_every`` (steps between increments),
    ``plasticity`` (a ``PIPlasticity``, or None for a fixed learning rate),
    ``reinit_dead_every`` (steps between dead-expert re-initialisations, 0 = never).
    """

    def __init__(self, *args, perpetual_dir: str | os.PathLike, save_every: int = 1,
                 plasticity: PIPlasticity | None = None, reinit_dead_every: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.perpetual_store = PerpetualStore(perpetual_dir)
        self._recorder = _StepRecorder()
        self.perpetual_callback = PerpetualCallback(self.perpetual_store, self._recorder, save_every, plasticity,
                                                    reinit_dead_every)
        self.add_callback(self.perpetual_callback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._recorder.observe(inputs, loss, outputs)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        stats = self.model.routing_stats() if hasattr(self.model, "routing_stats") else {}
        self._recorder.observe_backward(stats)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the means of the model's metrics since the last one
            for key, values in self._recorder.since_log.items():
                if values:
                    logs[key] = round(_mean(values), 6)
            self._recorder.since_log = defaultdict(list)
        super().log(logs, start_time)
