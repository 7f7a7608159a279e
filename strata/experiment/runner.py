"""Running the grid: one row per run in ``results.jsonl``, resumable, seeded.

Every run (a model trained on a task with a seed, or a model's efficiency run) has a
``run_id``: a hash of everything that determines its result (model spec, task and training
parameters, seed, harness version). A run whose id already has an ``"ok"`` row in
``results.jsonl`` is not run again, so an interrupted experiment continues where it
stopped and an edited config re-runs only the cells that changed. Rows with ``"error"`` or
``"skipped"`` are retried on the next invocation (the architecture may have been registered
since); the report reads the last row of each run id of the current grid.

Training uses the Hugging Face ``Trainer`` (strata.training.train's ``StrataTrainer``: AdamW,
linear warmup then cosine to a tenth of the peak learning rate). Weights are initialised
after ``transformers.set_seed(seed)``, and the Trainer shuffles with the same seed, so a run
is deterministic on CPU (same machine, same thread count).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from strata.experiment.config import HARNESS_VERSION, ExperimentConfig, RunSpec
from strata.experiment.efficiency import Stopwatch
from strata.experiment.models import (
    UnknownArchitecture,
    build_model,
    check_preset,
    count_parameters,
    match_parameters,
)
from strata.experiment.tasks import make_task

RESULTS_FILE = "results.jsonl"


# ----------------------------------------------------------------------------- bookkeeping
def read_results(path: Path) -> dict[str, dict]:
    """The last row of every run id in a results file (a truncated last line, from a crash, is ignored)."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "run_id" in row:
            rows[row["run_id"]] = row
    return rows


def _append(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def git_revision() -> str | None:
    """The commit of the strata checkout this code runs from ("+dirty" when strata/ has local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "strata"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    import transformers

    import strata

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "strata": strata.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available()}


def _nan_to_none(obj):
    """NaN and infinities as None, so results.jsonl stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


# ----------------------------------------------------------------------------- one run
def _progress_callback(update: Callable[[str], None], steps: int):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        loss = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]

        def on_step_end(self, args, state, control, **kwargs):
            loss = f" loss {self.loss:.3f}" if self.loss is not None else ""
            update(f"step {state.global_step}/{steps}{loss}")

    return Progress()


def train_and_evaluate(model, task, settings: dict, seed: int, update: Callable[[str], None]) -> dict:
    """Train ``model`` on ``task`` with the Trainer; returns metrics, the loss curve and timings."""
    from transformers import TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from strata.training.train import StrataTrainer

    steps, batch = settings["steps"], settings["batch_size"]
    dataset = task.train_dataset(steps * batch, seed)
    with tempfile.TemporaryDirectory(prefix="strata-experiment-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=settings["lr"], warmup_steps=settings["warmup_steps"],
            weight_decay=settings["weight_decay"], adam_beta2=0.99, max_grad_norm=1.0,
            logging_steps=max(1, steps // settings["logging_points"]), save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, seed=seed, data_seed=seed, logging_nan_inf_filter=False,
            dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available(),
        )
        trainer = StrataTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
        for cls in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(cls)
        trainer.add_callback(_progress_callback(update, steps))
        with Stopwatch() as train_time:
            trainer.train()
        # a non-finite logged loss is kept as None (JSON null), and the first step it appears at is recorded
        curve = [[entry["step"], entry["loss"] if math.isfinite(entry["loss"]) else None]
                 for entry in trainer.state.log_history if "loss" in entry]
    update("evaluating")
    with Stopwatch() as eval_time:
        metrics = task.evaluate(model, settings["eval_batch_size"])
    tokens = steps * batch * task.train_seq_len
    diverged = next((step for step, loss in curve if loss is None), None)
    if diverged is not None:
        metrics["diverged_at_step"] = diverged
    metrics.update(train_loss=curve[-1][1] if curve and curve[-1][1] is not None else float("nan"),
                   train_tokens=tokens, train_tokens_per_s=tokens / train_time.wall,
                   train_tokens_per_cpu_s=tokens / max(train_time.cpu, 1e-9))
    chance = task.chance()
    if chance is not None:
        metrics["chance"] = chance
    return {"metrics": metrics, "curve": curve, "train_wall_s": train_time.wall, "train_cpu_s": train_time.cpu,
            "eval_wall_s": eval_time.wall, "eval_cpu_s": eval_time.cpu}


def execute(run: RunSpec, config: ExperimentConfig, update: Callable[[str], None]) -> dict:
    """Run one cell; never raises for a failure of the model (the row says what went wrong)."""
    from strata.experiment import efficiency

    row: dict[str, Any] = {
        "run_id": run.run_id, "experiment": config.name, "model": run.model.name,
        "model_type": run.model.model_type, "preset": run.model.preset, "overrides": dict(run.model.overrides),
        "task": run.task["name"], "kind": run.kind, "task_params": run.task, "seed": run.seed,
        "harness_version": HARNESS_VERSION, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    with Stopwatch() as total:
        try:
            overrides = dict(run.model.overrides)
            if run.model.match_params is not None:
                reference = config.model(run.model.match_params["reference"])
                overrides, row["param_match"] = match_parameters(run.model, reference)
            row["overrides"] = overrides
            if run.kind == "efficiency":
                model = build_model(run.model.model_type, run.model.preset, overrides, run.task["vocab_size"],
                                    seed=run.seed)
                row.update(count_parameters(model))
                row["metrics"] = efficiency.measure(model, run.task, progress=update)
            else:
                task = make_task(run.task)
                special = task.special_ids() if hasattr(task, "special_ids") else None
                model = build_model(run.model.model_type, run.model.preset, overrides, task.vocab_size, special,
                                    seed=run.seed)
                row.update(count_parameters(model))
                row.update(train_and_evaluate(model, task, run.task, run.seed, update))
            row["status"] = "ok" if _finite(row["metrics"]) else "error"
            if row["status"] == "error":
                step = row["metrics"].get("diverged_at_step")
                row["error"] = (f"training diverged: the training loss was not finite from step {step} on"
                                if step is not None else "a metric is not finite")
                row["metrics"] = _nan_to_none(row["metrics"])
        except UnknownArchitecture as error:
            row.update(status="skipped", error=str(error))
        except Exception as error:  # one failing cell must not end the experiment
            row.update(status="error", error=f"{type(error).__name__}: {error}",
                       traceback=traceback.format_exc(limit=8)[-4000:])
    row.update(wall_s=total.wall, cpu_s=total.cpu, load_average_end=[round(x, 2) for x in os.getloadavg()],
               finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return row


# ----------------------------------------------------------------------------- the grid
def check_registered(config: ExperimentConfig) -> list[str]:
    """Fail on presets unknown to registered architectures; return notes on unregistered model types."""
    notes = []
    for m in config.models:
        try:
            check_preset(m.model_type, m.preset)
        except UnknownArchitecture as error:
            notes.append(f"{m.name}: {error}; its runs are recorded as skipped")
    return notes


def run_experiment(config: ExperimentConfig, output_dir: str | os.PathLike, progress: bool = True,
                   command: str | None = None, log: Callable[[str], None] = print,
                   rerun: set[str] | frozenset[str] = frozenset()) -> dict:
    """Run every cell of ``config`` not yet done in ``output_dir``, then write the report.

    ``rerun``: model or task names whose cells run again even if finished (e.g. after the
    model's code changed); the new rows supersede the old ones.

    Returns {"output_dir", "ran", "reused", "errors", "skipped", "report"}.
    """
    import datasets
    from tqdm.auto import tqdm

    from strata.experiment.report import write_report

    datasets.disable_progress_bars()  # one bar: the runs'
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for note in check_registered(config):
        log(f"note: {note}")
    results_path = out / RESULTS_FILE
    done = read_results(results_path)
    runs = config.runs()
    unknown = set(rerun) - {m.name for m in config.models} - {t["name"] for t in config.tasks} - {"efficiency"}
    if unknown:
        raise ValueError(f"--rerun: no model or task named {sorted(unknown)}")
    todo = [r for r in runs if done.get(r.run_id, {}).get("status") != "ok"
            or r.model.name in rerun or r.task["name"] in rerun]
    log(f"{config.name}: {len(runs)} runs, {len(runs) - len(todo)} already done in {results_path}, "
        f"{len(todo)} to run")
    meta = {"config": config.raw, "source": config.source, "quick": config.quick, "command": command,
            "machine": dict(machine_info(), torch_threads=config.threads), "git_revision": git_revision()}
    previous = out / "experiment.json"
    history = json.loads(previous.read_text(encoding="utf-8")).get("commands", []) if previous.is_file() else []
    if command is not None and todo:  # the invocations that produced rows, in order
        history.append({"command": command, "runs": len(todo),
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    meta["commands"] = history
    if command is None and history:  # resumed from Python: keep the recorded command
        meta["command"] = history[-1]["command"]
    (out / "experiment.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n",
                                         encoding="utf-8")
    counts = {"ran": 0, "errors": 0, "skipped": 0}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        _run_all(todo, config, results_path, meta, counts, progress, tqdm)
    finally:
        torch.set_num_threads(threads_before)
    report = write_report(config, out, meta)
    return {"output_dir": out, "ran": counts["ran"], "reused": len(runs) - len(todo), "errors": counts["errors"],
            "skipped": counts["skipped"], "report": report}


def _run_all(todo, config, results_path, meta, counts, progress, tqdm) -> None:
    bar = tqdm(total=len(todo), unit="run", desc=config.name, dynamic_ncols=True, disable=not progress)
    for run in todo:
        bar.set_description_str(f"{run.model.name} / {run.task['name']} / s{run.seed}")

        def update(text, bar=bar):
            bar.set_postfix_str(text, refresh=True)

        row = execute(run, config, update)
        row.update(git_revision=meta["git_revision"], torch_threads=torch.get_num_threads())
        _append(results_path, row)
        counts["ran"] += 1
        if row["status"] != "ok":
            counts["errors" if row["status"] == "error" else "skipped"] += 1
            bar.write(f"{row['status']}: {run.label}: {row['error']}")
        bar.update(1)
    bar.close()
