"""The report of an experiment: ``report.md`` with tables and plain statements of who wins
what, and matplotlib figures (loss curves; quality against parameters; decoding latency,
memory and state size against context length; induction-head length extrapolation).

Everything is computed from ``results.jsonl`` (the last row of every run id of the current
grid), so ``strata experiment CONFIG --report-only`` rebuilds it without running anything.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from strata.experiment.config import ExperimentConfig
from strata.experiment.tasks import TASK_KINDS

REPORT_FILE = "report.md"
FIGURES = {
    "loss_curves": "loss_curves.png",
    "quality_vs_params": "quality_vs_params.png",
    "efficiency_vs_context": "efficiency_vs_context.png",
    "induction_extrapolation": "induction_extrapolation.png",
}


# ----------------------------------------------------------------------------- helpers
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return _fmt(mean, digits) + (f" ± {_fmt(std, digits)}" if std is not None else "")


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def current_rows(config: ExperimentConfig, rows_by_id: dict[str, dict]) -> dict[tuple, dict]:
    """{(model, task, seed): row} of the current grid."""
    out = {}
    for run in config.runs():
        row = rows_by_id.get(run.run_id)
        if row is not None:
            out[(run.model.name, run.task["name"], run.seed)] = row
    return out


class Results:
    def __init__(self, config: ExperimentConfig, rows_by_id: dict[str, dict]):
        self.config = config
        self.rows = current_rows(config, rows_by_id)

    def ok(self, model: str, task: str) -> list[dict]:
        return [r for (m, t, _), r in sorted(self.rows.items()) if m == model and t == task and r["status"] == "ok"]

    def metric(self, model: str, task: str, key: str) -> list[float]:
        return [r["metrics"][key] for r in self.ok(model, task) if r["metrics"].get(key) is not None]

    def any_row(self, model: str) -> dict | None:
        for (m, _, _), r in self.rows.items():
            if m == model and r["status"] == "ok":
                return r
        return None

    def efficiency(self, model: str) -> dict | None:
        rows = self.ok(model, "efficiency")
        return rows[0] if rows else None


# ----------------------------------------------------------------------------- findings
def rank_task(res: Results, task: dict, metric: str | None = None) -> list[tuple[str, float]]:
    cls = TASK_KINDS[task["kind"]]
    metric = metric or cls.PRIMARY
    scores = []
    for m in res.config.models:
        values = res.metric(m.name, task["name"], metric)
        if values:
            scores.append((m.name, statistics.fmean(values)))
    return sorted(scores, key=lambda s: s[1], reverse=not cls.LOWER_IS_BETTER)


def _gap(a: float, b: float, lower_is_better: bool) -> str:
    """How much better a is than b, absolute and relative."""
    diff = (b - a) if lower_is_better else (a - b)
    rel = diff / abs(b) * 100 if b else float("inf")
    return f"{_fmt(diff)} ({rel:+.1f}% relative)" if math.isfinite(rel) else _fmt(diff)


def task_findings(res: Results, task: dict) -> list[str]:
    cls = TASK_KINDS[task["kind"]]
    metric = cls.PRIMARY
    direction = "lower is better" if cls.LOWER_IS_BETTER else "higher is better"
    ranking = rank_task(res, task)
    if not ranking:
        return [f"- **{task['name']}**: no finished run."]
    best, score = ranking[0]
    tied = [m for m, v in ranking if abs(v - score) <= 1e-9 * max(1.0, abs(score))]
    line = f"- **{task['name']}** ({metric}, {direction}): **{best}** wins with {_fmt(score)}"
    if len(tied) > 1:
        rest = ranking[len(tied):]
        line = (f"- **{task['name']}** ({metric}, {direction}): **tie** between {', '.join(tied)} at {_fmt(score)}"
                + (f"; next {rest[0][0]} ({_fmt(rest[0][1])}), {_gap(score, rest[0][1], cls.LOWER_IS_BETTER)} behind"
                   if rest else ""))
    elif len(ranking) > 1:
        second, s2 = ranking[1]
        line += f", ahead of {second} ({_fmt(s2)}) by {_gap(score, s2, cls.LOWER_IS_BETTER)}"
        seeds = len(res.config.seeds)
        spreads = [s for m, _ in ranking[:2] for s in [_mean_std(res.metric(m, task["name"], metric))[1]] if s]
        if seeds > 1 and spreads and abs(score - s2) < max(spreads):
            line += "; the margin is within one seed standard deviation (not a clear win)"
        elif seeds == 1:
            line += " (one seed)"
    line += "."
    lines = [line]
    focus = res.config.focus
    if focus is not None and len(tied) > 1 and focus in tied:
        lines.append(f"  - {focus} ties for first: it does **not** win outright.")
    elif focus is not None and focus != best:
        names = [m for m, _ in ranking]
        if focus in names:
            fscore = dict(ranking)[focus]
            lines.append(f"  - {focus} does **not** win: rank {names.index(focus) + 1} of {len(ranking)} with "
                         f"{_fmt(fscore)}, behind {best} by {_gap(score, fscore, cls.LOWER_IS_BETTER)}.")
    elif focus == best:
        lines.append(f"  - {focus} wins this task.")
    chance = None
    rows = [r for m, _ in ranking for r in res.ok(m, task["name"])]
    if rows:
        chance = rows[0]["metrics"].get("chance")
    if chance is not None and not cls.LOWER_IS_BETTER and score < 2 * chance:
        lines.append(f"  - caution: the best score is under twice chance ({_fmt(chance)}): at this training budget "
                     "the task does not separate the models.")
    if task["kind"] == "induction":
        ext = rank_task(res, task, "extrapolation_accuracy")
        if ext:
            lines.append(f"  - length extrapolation (mean accuracy beyond the training length {task['seq_len']}): "
                         f"best {ext[0][0]} {_fmt(ext[0][1])}; " + ", ".join(f"{m} {_fmt(s)}" for m, s in ext[1:]))
    if task["kind"] == "listops":
        base = [r["metrics"].get("majority_baseline") for r in rows[:1]]
        if base and base[0] is not None:
            verdict = ("no model beats it" if score <= base[0] + 1e-9
                       else f"{sum(v > base[0] + 1e-9 for _, v in ranking)} model(s) beat it")
            lines.append(f"  - always answering the most frequent digit scores {_fmt(base[0])}: {verdict}.")
    return lines


def efficiency_findings(res: Results) -> list[str]:
    eff = {m.name: res.efficiency(m.name) for m in res.config.models}
    eff = {k: v for k, v in eff.items() if v is not None}
    if not eff:
        return []
    lines = []
    speed = sorted(((v["metrics"]["train_tokens_per_cpu_s"], k) for k, v in eff.items()), reverse=True)
    lines.append(f"- **training throughput** (tokens per CPU-second, batch {next(iter(eff.values()))['metrics']['train_batch']}"
                 f" x {next(iter(eff.values()))['metrics']['train_seq_len']}): **{speed[0][1]}** is fastest with "
                 f"{_fmt(speed[0][0])}" + (f", {speed[0][0] / speed[1][0]:.2f}x {speed[1][1]}" if len(speed) > 1 else "")
                 + "; " + ", ".join(f"{k} {_fmt(v)}" for v, k in speed[1:]) + ".")
    contexts = [set(p["context"] for p in v["metrics"]["contexts"]) for v in eff.values()]
    common = sorted(set.intersection(*contexts)) if contexts else []
    if common:
        top = common[-1]
        at = {k: next(p for p in v["metrics"]["contexts"] if p["context"] == top) for k, v in eff.items()}
        lat = sorted((p["cpu_ms_per_token"], k) for k, p in at.items())
        lines.append(f"- **decoding at a {top:,}-token context** (CPU ms per token): **{lat[0][1]}** is fastest with "
                     f"{_fmt(lat[0][0])}; " + ", ".join(f"{k} {_fmt(v)}" for v, k in lat[1:]) + ".")
        state = sorted((p["state_mb"], k) for k, p in at.items())
        lines.append(f"- **inference state at {top:,} tokens** (cache MB): smallest **{state[0][1]}** "
                     f"{_fmt(state[0][0])}; " + ", ".join(f"{k} {_fmt(v)}" for v, k in state[1:]) + ".")
        lo = common[0]
        grow = []
        for k, v in eff.items():
            pts = {p["context"]: p for p in v["metrics"]["contexts"]}
            if pts[lo]["cpu_ms_per_token"] > 0:
                grow.append((pts[top]["cpu_ms_per_token"] / pts[lo]["cpu_ms_per_token"], k))
        if len(common) > 1 and grow:
            grow.sort()
            lines.append(f"- **latency growth from {lo:,} to {top:,} tokens** (ratio of CPU ms per token): "
                         + ", ".join(f"{k} {r:.2f}x" for r, k in grow) + ".")
    skipped = [(k, s) for k, v in eff.items() for s in v["metrics"].get("skipped_contexts", [])]
    for k, s in skipped:
        lines.append(f"- {k}: context {s['context']:,} not measured ({s['reason']}).")
    return lines


def focus_table(res: Results) -> str:
    """Every model's primary metric minus the focus model's, per task (positive: the focus model is better)."""
    focus = res.config.focus
    if focus is None:
        return ""
    header, rows = ["model"], []
    columns = []
    for task in res.config.tasks:
        cls = TASK_KINDS[task["kind"]]
        ref = res.metric(focus, task["name"], cls.PRIMARY)
        if ref:
            columns.append((task, cls, statistics.fmean(ref)))
            header.append(f"{task['name']} ({cls.PRIMARY})")
    if not columns:
        return ""
    rows.append([f"**{focus}** (value)"] + [_fmt(ref) for _, _, ref in columns])
    for m in res.config.models:
        if m.name == focus:
            continue
        row = [m.name]
        for task, cls, ref in columns:
            values = res.metric(m.name, task["name"], cls.PRIMARY)
            if not values:
                row.append("-")
                continue
            # positive = the focus model is better
            diff = (statistics.fmean(values) - ref) if cls.LOWER_IS_BETTER else (ref - statistics.fmean(values))
            row.append(f"{diff:+.3f}")
        rows.append(row)
    return _table(header, rows)


# ----------------------------------------------------------------------------- figures
def _figures(res: Results, out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, MaxNLocator
    except ImportError:
        return {}
    made = {}
    config = res.config
    colors = {m.name: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(config.models)}
    tasks = config.tasks

    def grid(n):
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    # loss curves
    if tasks:
        fig, axes = grid(len(tasks))
        for ax, task in zip(axes, tasks):
            for m in config.models:
                for i, row in enumerate(res.ok(m.name, task["name"])):
                    if row.get("curve"):
                        steps = [step for step, _ in row["curve"]]
                        losses = [float("nan") if loss is None else loss for _, loss in row["curve"]]
                        ax.plot(steps, losses, color=colors[m.name], alpha=1.0 if i == 0 else 0.4,
                                label=m.name if i == 0 else None, lw=1.2)
            ax.set_title(task["name"])
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (nats/token)")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8,
                       bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(out / FIGURES["loss_curves"], dpi=110)
        plt.close(fig)
        made["loss_curves"] = FIGURES["loss_curves"]

        # quality vs parameters
        fig, axes = grid(len(tasks))
        for ax, task in zip(axes, tasks):
            cls = TASK_KINDS[task["kind"]]
            for m in config.models:
                rows = res.ok(m.name, task["name"])
                if not rows:
                    continue
                x = rows[0]["non_embedding_parameters"]
                ys = [r["metrics"][cls.PRIMARY] for r in rows]
                ax.scatter([x] * len(ys), ys, color=colors[m.name], s=18, alpha=0.5)
                ax.scatter([x], [statistics.fmean(ys)], color=colors[m.name], s=40, marker="D", label=m.name)
                ax.annotate(m.name, (x, statistics.fmean(ys)), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_title(f"{task['name']} ({cls.PRIMARY}, {'lower' if cls.LOWER_IS_BETTER else 'higher'} is better)",
                         fontsize=9)
            ax.set_xlabel("non-embedding parameters")
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e3:,.0f}k"))
            ax.set_ylabel(cls.PRIMARY)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / FIGURES["quality_vs_params"], dpi=110)
        plt.close(fig)
        made["quality_vs_params"] = FIGURES["quality_vs_params"]

    # efficiency vs context
    eff = {m.name: res.efficiency(m.name) for m in config.models}
    eff = {k: v for k, v in eff.items() if v is not None and v["metrics"]["contexts"]}
    if eff:
        fig, axes = plt.subplots(1, 4, figsize=(20, 4))
        panels = [("cpu_ms_per_token", "decode CPU ms / token"), ("ms_per_token", "decode wall ms / token"),
                  ("peak_rss_mb", "peak memory increase, prefill + decode (MB)"), ("state_mb", "cache / state size (MB)")]
        for ax, (key, label) in zip(axes, panels):
            for name, row in eff.items():
                pts = [(p["context"], p[key]) for p in row["metrics"]["contexts"] if p.get(key)]  # log axes: > 0
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[name], label=name, lw=1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / FIGURES["efficiency_vs_context"], dpi=110)
        plt.close(fig)
        made["efficiency_vs_context"] = FIGURES["efficiency_vs_context"]

    # induction extrapolation
    induction = [t for t in tasks if t["kind"] == "induction"]
    if induction:
        fig, axes = grid(len(induction))
        for ax, task in zip(axes, induction):
            for m in config.models:
                rows = res.ok(m.name, task["name"])
                if not rows:
                    continue
                lengths = task["eval_lengths"]
                acc = [statistics.fmean(r["metrics"][f"accuracy@{n}"] for r in rows) for n in lengths]
                ax.plot(lengths, acc, marker="o", color=colors[m.name], label=m.name, lw=1.2)
            ax.axvline(task["seq_len"], color="grey", ls="--", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("test sequence length (training length dashed)")
            ax.set_ylabel("accuracy")
            ax.set_title(task["name"])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / FIGURES["induction_extrapolation"], dpi=110)
        plt.close(fig)
        made["induction_extrapolation"] = FIGURES["induction_extrapolation"]
    return made


# ----------------------------------------------------------------------------- tables
_SECONDARY = {
    "lm": ["eval_loss", "accuracy"],
    "mqar": ["sequence_accuracy", "eval_loss"],
    "selective_copying": ["sequence_accuracy", "eval_loss"],
    "listops": ["eval_loss"],
    "induction": [],
}


def _task_table(res: Results, task: dict) -> str:
    cls = TASK_KINDS[task["kind"]]
    extra = list(_SECONDARY.get(task["kind"], []))
    if task["kind"] == "induction":
        extra = [f"accuracy@{n}" for n in task["eval_lengths"]]
    header = ["model", f"**{cls.PRIMARY}**"] + extra + ["final train loss", "train tok/s (wall)",
                                                         "train tok/CPU-s", "run wall s", "run CPU s"]
    rows = []
    for m in res.config.models:
        ok = res.ok(m.name, task["name"])
        if not ok:
            status = [r for (mm, t, _), r in res.rows.items() if mm == m.name and t == task["name"]]
            rows.append([m.name, status[0]["status"] if status else "not run"] + ["-"] * (len(header) - 2))
            continue
        rows.append([m.name, _cell(res.metric(m.name, task["name"], cls.PRIMARY))]
                    + [_cell(res.metric(m.name, task["name"], k)) for k in extra]
                    + [_cell(res.metric(m.name, task["name"], "train_loss")),
                       _cell(res.metric(m.name, task["name"], "train_tokens_per_s"), 0),
                       _cell(res.metric(m.name, task["name"], "train_tokens_per_cpu_s"), 0),
                       _cell([r["wall_s"] for r in ok], 1), _cell([r["cpu_s"] for r in ok], 1)])
    return _table(header, rows)


def _efficiency_tables(res: Results) -> str:
    eff = {m.name: res.efficiency(m.name) for m in res.config.models}
    eff = {k: v for k, v in eff.items() if v is not None}
    if not eff:
        return ""
    settings = res.config.efficiency
    parts = []
    flops_lengths = [str(n) for n in settings["flops_context_lengths"]]
    header = (["model", "params", "non-emb. params", "train tok/s (wall)", "train tok/CPU-s", "train step peak MB"]
              + [f"FLOPs/token @{n}" for n in flops_lengths])
    rows = []
    for name, row in eff.items():
        m = row["metrics"]
        rows.append([name, _params(row["parameters"]), _params(row["non_embedding_parameters"]),
                     _fmt(m["train_tokens_per_s"], 0), _fmt(m["train_tokens_per_cpu_s"], 0),
                     _fmt(m["train_peak_rss_mb"], 1)]
                    + [_fmt(m["flops_per_token"].get(n)) for n in flops_lengths])
    parts.append(_table(header, rows))
    contexts = settings["context_lengths"]
    for key, title in (("cpu_ms_per_token", "Decoding, CPU ms per generated token (batch 1)"),
                       ("ms_per_token", "Decoding, wall ms per generated token (batch 1)"),
                       ("peak_rss_mb", "Peak resident memory increase during prefill + decode (MB)"),
                       ("state_mb", "Cache / recurrent state after the prompt (MB)"),
                       ("prefill_tokens_per_s", "Prefill, tokens per second (wall)")):
        rows = []
        for name, row in eff.items():
            pts = {p["context"]: p for p in row["metrics"]["contexts"]}
            rows.append([name] + [_fmt(pts[n][key], 2) if n in pts else "skipped" for n in contexts])
        parts.append(f"**{title}**\n\n" + _table(["model"] + [f"{n:,}" for n in contexts], rows))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- the report
def write_report(config: ExperimentConfig, out: Path, meta: dict | None = None) -> Path:
    import json

    from strata.experiment.runner import RESULTS_FILE, read_results

    out = Path(out)
    if meta is None and (out / "experiment.json").is_file():
        meta = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    meta = meta or {}
    res = Results(config, read_results(out / RESULTS_FILE))
    figures = _figures(res, out)
    all_rows = list(res.rows.values())
    lines = [f"# Experiment `{config.name}`" + (" (QUICK MODE: smoke-test size, not for conclusions)"
                                                 if config.quick else ""), ""]
    if config.description:
        lines += [config.description, ""]
    command = meta.get("command")
    machine = meta.get("machine", {})
    walls = sum(r.get("wall_s", 0) for r in all_rows)
    cpus = sum(r.get("cpu_s", 0) for r in all_rows)
    loads = [x for r in all_rows for x in (r.get("load_average_start", [None])[0], r.get("load_average_end", [None])[0])
             if x is not None]
    starts = sorted(r["started"] for r in all_rows if "started" in r)
    revisions = sorted({r.get("git_revision") for r in all_rows if r.get("git_revision")})
    lines += [
        "## How this was produced", "",
        f"- command: `{command}`" if command else "- command: (not recorded)",
        *[f"  - run {i + 1}: `{h['command']}` ({h['runs']} runs, {h['date']})"
          for i, h in enumerate(meta.get("commands", [])) if len(meta.get("commands", [])) > 1],
        f"- config: `{meta.get('source')}`; results: `results.jsonl` (one row per run, keyed by run id)",
        f"- git revision of the runs: {', '.join(f'`{r}`' for r in revisions) or '(unknown)'}; "
        f"strata {machine.get('strata')}, torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}, Python {machine.get('python')}",
        f"- machine: {machine.get('cpu_count')} CPUs ({machine.get('processor')}), {machine.get('torch_threads')} torch "
        f"threads, CUDA {'yes' if machine.get('cuda') else 'no'}",
        f"- runs: {len(all_rows)} of {len(config.runs())} in the grid recorded"
        + (f", from {starts[0]} to {max(r.get('finished', '') for r in all_rows)} (UTC)" if starts else "")
        + f"; total {walls / 60:.1f} min wall, {cpus / 60:.1f} min CPU",
        f"- seeds: {config.seeds}; training: per task below (steps x batch x sequence length)",
    ]
    if loads:
        lines.append(f"- 1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} on "
                     f"{machine.get('cpu_count')} CPUs. Wall-clock figures are noisy when other processes share the "
                     "machine; CPU-time figures (this process's CPU seconds) are recorded beside them and are the "
                     "ones to compare.")
    lines.append("")

    # models
    lines += ["## Models", ""]
    rows = []
    for m in config.models:
        any_row = res.any_row(m.name)
        eff = res.efficiency(m.name)
        ref = eff or any_row
        match = ""
        if ref and ref.get("param_match"):
            pm = ref["param_match"]
            match = f"{pm['field']}={pm['value']} to match {pm['reference']} ({pm['relative_gap']:+.1%})"
        overrides = ref["overrides"] if ref else m.overrides
        rows.append([m.name, m.model_type, m.preset,
                     ", ".join(f"{k}={v}" for k, v in overrides.items()) or "-", match or "-",
                     _params(ref["non_embedding_parameters"]) if ref else "-",
                     m.description or "-"])
    lines += [_table(["model", "model_type", "preset", "config overrides", "parameter matching",
                      "non-emb. params", "what it is"], rows, ["---"] * 7), ""]
    lines += ["Parameter counts exclude the token embedding and LM head (they depend on each task's "
              "vocabulary); total counts per task are in `results.jsonl`.", ""]

    # findings
    lines += ["## Who wins what", ""]
    for task in config.tasks:
        lines += task_findings(res, task)
    lines += efficiency_findings(res)
    lines.append("")
    table = focus_table(res)
    if table:
        lines += [f"### Every model against {config.focus}", "",
                  f"Primary metric of each model minus {config.focus}'s, signed so that a **positive** number "
                  f"means **{config.focus} is better** and a negative one means the other model is better "
                  "(bits per character: lower is better; accuracies: higher is better).", "", table, ""]

    # per task
    lines += ["## Results per task", "",
              "Mean ± standard deviation over seeds (a single value: one seed).", ""]
    for task in config.tasks:
        settings = {k: v for k, v in task.items() if k not in ("name", "kind")}
        lines += [f"### {task['name']} ({task['kind']})", "",
                  "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
                  _task_table(res, task), ""]

    eff_tables = _efficiency_tables(res)
    if eff_tables:
        s = config.efficiency
        lines += ["## Efficiency", "",
                  f"Random-weight models at the vocabulary size {s['vocab_size']}. Training: batch "
                  f"{s['train_batch_size']} x {s['train_seq_len']} tokens, {s['train_steps']} timed steps. Decoding: "
                  f"a prompt of L - 1 tokens, then {s['decode_tokens']} greedy one-token cached forwards. FLOPs: "
                  "`torch.utils.flop_counter` on one forward (matrix products and attention only, attention "
                  "counted over the full L x L scores; element-wise recurrences are not counted, so recurrent "
                  "mixers are undercounted). The peak-memory table is dominated by the activations of the "
                  "one-pass prefill of the whole prompt, which grow with L for every architecture; what decoding "
                  "carries from token to token is the cache / state table.", "", eff_tables, ""]

    if figures:
        lines += ["## Figures", ""]
        titles = {"loss_curves": "Training loss curves", "quality_vs_params": "Quality against parameters",
                  "efficiency_vs_context": "Decoding latency, memory and state size against context length",
                  "induction_extrapolation": "Induction heads: accuracy against test length"}
        for key, file in figures.items():
            lines += [f"**{titles[key]}**", "", f"![{titles[key]}]({file})", ""]
    else:
        lines += ["(figures not drawn: matplotlib is not installed; `pip install strata[experiment]`)", ""]

    bad = [r for r in all_rows if r["status"] != "ok"]
    missing = len(config.runs()) - len(all_rows)
    if bad or missing:
        lines += ["## Skipped and failed runs", ""]
        for r in bad:
            lines.append(f"- {r['status']}: {r['model']} / {r['task']} / seed {r['seed']}: {r.get('error')}")
        if missing:
            lines.append(f"- {missing} run(s) of the grid have no row yet (interrupted or still running).")
        lines.append("")
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
