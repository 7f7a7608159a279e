"""`strata experiment`: config validation, task generators, the grid runner and its report.

The end-to-end test runs a smaller grid than `--quick` (two tiny models, every task kind, a
few steps each) and checks the report's structure, that metrics are finite, that a second
invocation re-runs nothing, and that a run is deterministic on CPU. Never timed assertions.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from strata.experiment import config as cfg
from strata.experiment import tasks as T
from strata.experiment.config import parse_config
from strata.experiment.models import count_parameters, non_embedding_count
from strata.experiment.report import FIGURES
from strata.experiment.runner import execute, read_results, run_experiment

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}

TINY_GRID = {
    "name": "unit",
    "seeds": [0],
    "focus": "transformer",
    "models": [
        {"name": "transformer", "model_type": "retmamba", "preset": "transformer-tiny", "overrides": SMALL},
        {"name": "retnet", "model_type": "retmamba", "preset": "retnet-tiny",
         "overrides": {"hidden_size": 32, "num_attention_heads": 2},
         "match_params": {"reference": "transformer", "field": "intermediate_size", "multiple": 8}},
        {"name": "future", "model_type": "not_landed_yet", "preset": "tiny"},
    ],
    "training": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "logging_points": 3},
    "tasks": [
        {"name": "lm", "kind": "lm", "corpus": "tinyshakespeare", "seq_len": 16, "eval_blocks": 4},
        {"kind": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 32, "eval_examples": 8},
        {"kind": "selective_copying", "seq_len": 16, "num_tokens": 3, "eval_examples": 8},
        {"kind": "induction", "seq_len": 12, "eval_lengths": [12, 24], "eval_examples": 8},
        {"kind": "listops", "seq_len": 24, "max_depth": 2, "max_args": 3, "eval_examples": 8},
    ],
    "efficiency": {"context_lengths": [16, 32], "decode_tokens": 2, "train_batch_size": 2, "train_seq_len": 16,
                   "train_steps": 1, "flops_context_lengths": [16, 64], "vocab_size": 32},
}


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    config = parse_config(copy.deepcopy(TINY_GRID))
    first = run_experiment(config, out, progress=False, command="strata experiment unit.yaml", log=lambda s: None)
    rows_after_first = (out / "results.jsonl").read_text().splitlines()
    second = run_experiment(config, out, progress=False, log=lambda s: None)
    return config, out, first, second, rows_after_first


# ----------------------------------------------------------------------------- end to end
def test_grid_rows_are_complete_and_finite(grid_run):
    config, out, first, _, _ = grid_run
    rows = read_results(out / "results.jsonl")
    assert first["ran"] == len(config.runs()) == 3 * 5 + 3
    ok = [r for r in rows.values() if r["status"] == "ok"]
    skipped = [r for r in rows.values() if r["status"] == "skipped"]
    assert len(ok) == 2 * 6 and first["errors"] == 0
    # the unregistered architecture: one clear skipped row per run, naming the model_type
    assert len(skipped) == 6 and all("not_landed_yet" in r["error"] and "not registered" in r["error"] for r in skipped)
    for row in ok:
        assert _finite(row["metrics"]), row
        assert row["parameters"] > row["non_embedding_parameters"] > 0
        assert row["wall_s"] > 0 and row["cpu_s"] > 0
        assert "git_revision" in row and row["seed"] == 0
        if row["kind"] != "efficiency":
            assert len(row["curve"]) >= 1 and row["metrics"]["train_tokens"] > 0
    lm = [r for r in ok if r["kind"] == "lm"]
    assert all(r["metrics"]["bpc"] > 0 for r in lm)
    induction = [r for r in ok if r["kind"] == "induction"]
    assert all({"accuracy@12", "accuracy@24", "extrapolation_accuracy"} <= set(r["metrics"]) for r in induction)
    eff = [r for r in ok if r["kind"] == "efficiency"]
    for r in eff:
        m = r["metrics"]
        assert [p["context"] for p in m["contexts"]] == [16, 32]
        assert m["flops_per_token"]["16"] > 0 and m["train_tokens_per_s"] > 0
    # the transformer's key/value cache grows with the context, and so do its attention FLOPs per token
    t = next(r for r in eff if r["model"] == "transformer")["metrics"]
    assert t["contexts"][1]["state_mb"] > t["contexts"][0]["state_mb"]
    assert t["flops_per_token"]["64"] > t["flops_per_token"]["16"]


def test_param_matching_recorded(grid_run):
    _, out, _, _, _ = grid_run
    rows = [r for r in read_results(out / "results.jsonl").values() if r["model"] == "retnet" and r["status"] == "ok"]
    match = rows[0]["param_match"]
    assert match["field"] == "intermediate_size" and match["value"] % 8 == 0
    assert rows[0]["overrides"]["intermediate_size"] == match["value"]
    assert abs(match["relative_gap"]) < 0.1
    transformer = next(r for r in read_results(out / "results.jsonl").values()
                       if r["model"] == "transformer" and r["kind"] == "efficiency")
    retnet = next(r for r in rows if r["kind"] == "efficiency")
    assert abs(retnet["non_embedding_parameters"] - transformer["non_embedding_parameters"]) \
        <= 0.1 * transformer["non_embedding_parameters"]


def test_second_run_reruns_nothing(grid_run):
    config, out, _, second, rows_after_first = grid_run
    # finished runs are reused; only the skipped rows (unregistered model_type) are retried
    assert second["reused"] == 2 * 6
    assert second["ran"] == second["skipped"] == 6 and second["errors"] == 0
    rows = (out / "results.jsonl").read_text().splitlines()
    assert rows[:len(rows_after_first)] == rows_after_first
    assert all(json.loads(line)["status"] == "skipped" for line in rows[len(rows_after_first):])


def test_report_structure(grid_run):
    config, out, _, _, _ = grid_run
    text = (out / "report.md").read_text()
    assert "`strata experiment unit.yaml`" in text
    for heading in ("## How this was produced", "## Models", "## Who wins what", "## Results per task",
                    "## Efficiency", "## Figures", "## Skipped and failed runs"):
        assert heading in text
    for task in config.tasks:
        assert f"### {task['name']} ({task['kind']})" in text
        assert f"**{task['name']}**" in text  # a finding per task
    # the focus model against every other one, per task; the unregistered model has no values
    focus = text.split("### Every model against transformer", 1)[1].split("\n## ", 1)[0]
    assert "| **transformer** (value) |" in focus and "| retnet | " in focus
    assert "| future | - | - | - | - | - |" in focus
    assert "CPU" in text and "load average" in text
    assert "not_landed_yet" in text
    for name in FIGURES.values():
        assert (out / name).stat().st_size > 1000
        assert f"]({name})" in text


def test_run_is_deterministic():
    config = parse_config(copy.deepcopy(TINY_GRID))
    run = next(r for r in config.runs() if r.model.name == "retnet" and r.task["kind"] == "mqar")
    a = execute(run, config, lambda s: None)
    b = execute(run, config, lambda s: None)
    assert a["status"] == b["status"] == "ok"
    assert a["curve"] == b["curve"]
    keep = ("accuracy", "eval_loss", "sequence_accuracy", "train_loss")
    assert {k: a["metrics"][k] for k in keep} == {k: b["metrics"][k] for k in keep}
    assert a["run_id"] == b["run_id"]


def test_rerun_runs_named_cells_again_and_records_each_command(tmp_path):
    raw = copy.deepcopy(TINY_GRID)
    raw["models"] = raw["models"][:1]
    raw["tasks"] = [raw["tasks"][1]]  # mqar
    raw["efficiency"] = None
    config = parse_config(raw)
    quiet = dict(progress=False, log=lambda s: None)
    assert run_experiment(config, tmp_path, command="first", **quiet)["ran"] == 1
    assert run_experiment(config, tmp_path, command="again", **quiet)["ran"] == 0
    assert run_experiment(config, tmp_path, command="rerun", rerun={"transformer"}, **quiet)["ran"] == 1
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["run_id"] == json.loads(lines[1])["run_id"]
    meta = json.loads((tmp_path / "experiment.json").read_text())
    assert [h["command"] for h in meta["commands"]] == ["first", "rerun"]  # "again" ran nothing
    with pytest.raises(ValueError, match="no model or task named"):
        run_experiment(config, tmp_path, rerun={"nobody"}, **quiet)


def test_resume_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"run_id": "a", "status": "ok"}) + "\n" + '{"run_id": "b", "stat')
    assert list(read_results(path)) == ["a"]


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(colour="red"), "unknown key(s) ['colour']"),
    (lambda c: c["tasks"].append({"kind": "sorting"}), "unknown task kind 'sorting'"),
    (lambda c: c["tasks"].append({"name": "x", "kind": "mqar", "seq_len": 8, "num_kv_pairs": 4}), "seq_len (8) must be >= 4"),
    (lambda c: c["tasks"].append({"name": "x", "kind": "mqar", "num_keys": 4}), "unknown key(s) ['num_keys']"),
    (lambda c: c["tasks"].append({"name": "x", "kind": "lm", "corpus": "wikipedia"}), "bundled corpus"),
    (lambda c: c["models"].append(dict(c["models"][0])), "duplicate model name 'transformer'"),
    (lambda c: c["models"][1]["match_params"].update(reference="nobody"), "no model named 'nobody'"),
    (lambda c: c["training"].update(steps=0), "training.steps"),
    (lambda c: c.update(seeds=[]), "seeds"),
    (lambda c: c.update(focus="nobody"), "focus"),
    (lambda c: c["efficiency"].update(context_lengths=[1]), "efficiency.context_lengths"),
    (lambda c: c.pop("models"), "missing required key 'models'"),
    (lambda c: c["tasks"].append({"kind": "mqar"}), "duplicate or reserved task name 'mqar'"),
    (lambda c: c.update(threads=0), "threads"),
])
def test_bad_configs_fail_with_a_clear_message(mutate, message):
    raw = copy.deepcopy(TINY_GRID)
    mutate(raw)
    with pytest.raises(ValueError, match="experiment config") as info:
        parse_config(raw)
    assert message in str(info.value)


def test_unknown_preset_of_a_registered_architecture_fails_before_running(tmp_path):
    raw = copy.deepcopy(TINY_GRID)
    raw["models"][0]["preset"] = "transformer-huge"
    with pytest.raises(ValueError, match="unknown preset 'transformer-huge'"):
        run_experiment(parse_config(raw), tmp_path, progress=False, log=lambda s: None)
    assert not (tmp_path / "results.jsonl").exists()


def test_cli_errors_are_one_line(tmp_path):
    from strata.cli import main

    with pytest.raises(SystemExit, match="strata experiment: experiment config .* does not exist"):
        main(["experiment", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        main(["experiment", str(bad)])


def test_cli_dry_run_lists_the_grid(tmp_path, capsys):
    import yaml

    from strata.cli import main

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(TINY_GRID))
    assert main(["experiment", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "18 runs" in out and "retnet / induction / seed 0" in out


def test_quick_shrinks_tasks_and_keeps_one_seed():
    raw = copy.deepcopy(TINY_GRID)
    raw["seeds"] = [0, 1, 2]
    raw["tasks"] = [{"kind": "induction", "seq_len": 256, "eval_lengths": [256, 1024], "steps": 500}]
    quick = parse_config(raw, quick=True)
    assert quick.name == "unit-quick" and quick.seeds == [0]
    task = quick.tasks[0]
    assert task["seq_len"] == 64 and task["eval_lengths"] == [64]
    assert task["steps"] <= cfg.QUICK_DEFAULTS["task_caps"]["steps"]
    full = parse_config(raw)
    assert {r.run_id for r in quick.runs()}.isdisjoint({r.run_id for r in full.runs()})


def test_shipped_configs_are_valid_and_list_every_registered_architecture():
    from pathlib import Path

    import strata

    root = Path(__file__).resolve().parent.parent / "experiments"
    seed = cfg.load_config(root / "seed003_fusion.yaml")
    assert {"fusion", "retnet", "mamba", "transformer"} <= {m.name for m in seed.models}
    kinds = {t["kind"] for t in seed.tasks}
    assert kinds == set(T.TASK_KINDS)
    mqar = sorted((t["seq_len"], t["num_kv_pairs"]) for t in seed.tasks if t["kind"] == "mqar")
    assert mqar == [(64, 4), (128, 8), (256, 16)]  # Zoology's settings
    everything = cfg.load_config(root / "all_architectures.yaml")
    assert set(strata.ARCHITECTURES) <= {m.model_type for m in everything.models}
    for path in (root / "seed003_fusion.yaml", root / "all_architectures.yaml"):
        assert cfg.load_config(path, quick=True).name.endswith("-quick")


# ----------------------------------------------------------------------------- task generators
def _task(kind, **params):
    return T.make_task(T.validate_task("test", {"kind": kind, **params}))


def test_mqar_answers_are_the_values_bound_to_the_keys():
    task = _task("mqar", seq_len=64, num_kv_pairs=8, vocab_size=64)
    ids, labels = task.generate(20, np.random.default_rng(0), 64)
    for row, lab in zip(ids, labels):
        bound = dict(zip(row[0:16:2], row[1:16:2]))
        assert len(bound) == 8  # distinct keys
        answers = np.nonzero(lab != T.IGNORE)[0]
        assert len(answers) == 8
        for pos in answers:
            assert row[pos] == lab[pos] == bound[row[pos - 1]]


def test_selective_copying_answer_is_the_data_tokens_in_order():
    task = _task("selective_copying", seq_len=40, num_tokens=6, num_data_tokens=5)
    ids, labels = task.generate(20, np.random.default_rng(1), 40)
    noise, sep = T.FIRST_TOKEN, T.FIRST_TOKEN + 1
    for row, lab in zip(ids, labels):
        context = row[:40 - 6 - 1]
        data = context[context != noise]
        assert row[40 - 6 - 1] == sep
        assert list(lab[-6:]) == list(data) == list(row[-6:])
        assert (lab[:-6] == T.IGNORE).all()


def test_induction_target_follows_the_first_trigger():
    task = _task("induction", seq_len=32)
    ids, labels = task.generate(50, np.random.default_rng(2), 32)
    trigger = T.FIRST_TOKEN
    for row, lab in zip(ids, labels):
        positions = np.nonzero(row == trigger)[0]
        assert len(positions) == 2 and positions[1] == 30
        assert lab[-1] == row[-1] == row[positions[0] + 1]
        assert (lab[:-1] == T.IGNORE).all()


def _eval_listops(tokens):
    """An independent evaluator: a stack machine over the token sequence."""
    ops = {T.ListOpsTask.OP0 + i: name for i, name in enumerate(T.LISTOPS_OPS)}
    stack = []
    for tok in tokens:
        if tok == T.ListOpsTask.OPEN:
            stack.append([])
        elif tok in ops:
            stack[-1].append(ops[tok])
        elif tok == T.ListOpsTask.CLOSE:
            op, *args = stack.pop()
            value = {"MAX": max, "MIN": min, "MED": lambda a: sorted(a)[len(a) // 2],
                     "SM": lambda a: sum(a) % 10}[op](args)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            digit = tok - T.ListOpsTask.DIGIT0
            if not stack:
                return digit
            stack[-1].append(digit)


def test_listops_answers_are_correct():
    task = _task("listops", seq_len=64, max_depth=3, max_args=4)
    ids, labels = task.generate(100, np.random.default_rng(3), 64)
    depths = []
    for row, lab in zip(ids, labels):
        (answer_pos,) = np.nonzero(lab != T.IGNORE)[0]
        assert row[answer_pos - 1] == T.ListOpsTask.EQUALS
        assert lab[answer_pos] - T.ListOpsTask.DIGIT0 == _eval_listops(row[:answer_pos - 1])
        assert (row[answer_pos + 1:] == T.PAD).all()
        depths.append((row == T.ListOpsTask.OPEN).sum())
    assert max(depths) >= 3  # nested expressions, not just single digits


def test_evaluation_set_is_fixed_and_independent_of_the_training_seed():
    task = _task("mqar", seq_len=32, num_kv_pairs=4, vocab_size=32)
    a, b = task.train_dataset(8, seed=0), task.train_dataset(8, seed=1)
    assert not torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.input_ids, task.train_dataset(8, seed=0).input_ids)


def test_accuracy_scoring_counts_exactly_the_labelled_positions():
    class Oracle(torch.nn.Module):
        """Predicts the next input token (a perfect model of any sequence it is shown)."""

        def __init__(self, vocab):
            super().__init__()
            self.vocab = vocab
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            nxt = torch.roll(input_ids, -1, dims=1)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float() * 10})

    task = _task("selective_copying", seq_len=24, num_tokens=4)
    ids, labels = task.generate(10, np.random.default_rng(4), 24)
    scores = T.score_predictions(Oracle(task.vocab_size), ids, labels, batch_size=4)
    assert scores["accuracy"] == scores["sequence_accuracy"] == 1.0


def test_non_embedding_count_excludes_the_vocabulary():
    from strata.experiment.models import build_model

    a = build_model("retmamba", "transformer-tiny", SMALL, vocab_size=32)
    b = build_model("retmamba", "transformer-tiny", SMALL, vocab_size=300)
    ca, cb = count_parameters(a), count_parameters(b)
    assert ca["non_embedding_parameters"] == cb["non_embedding_parameters"]
    assert cb["parameters"] - ca["parameters"] == (300 - 32) * 32  # tied embedding counted once
    assert non_embedding_count("retmamba", "transformer-tiny", SMALL) == ca["non_embedding_parameters"]
