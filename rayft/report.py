"""report.md and report.html, with PNG plots beside them, written into output_dir after a run.

They answer two questions: did fine-tuning beat the obvious alternatives (baselines scored
on the same eval split), and did it wreck what the model knew (forgetting on general text,
gaps between slices of the eval data)? Only the run's files are read, never Ray, torch or
the model, so `write_report(output_dir)` can rebuild a report at any time. A missing
optional file or key skips its section with a one-line note.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from rayft import report_plots as plots_png
from rayft.evaluate import PRIMARY_METRIC, lower_is_better
from rayft.timing import SECTIONS

REPORT_MD = "report.md"
REPORT_HTML = "report.html"

# Each task's metrics in the order rayft/tasks registers them (the task registry is not
# imported: it pulls in numpy, pyarrow and tokenizers just to name four columns).
TASK_METRICS = {
    "sequence_classification": ("accuracy", "precision", "recall", "f1"),
    "token_classification": ("precision", "recall", "f1", "token_accuracy"),
    "question_answering": ("exact_match", "f1"),
    "causal_lm": ("perplexity", "token_loss"),
}
BASELINE_ORDER = ("majority", "frozen", "pretrained")
# The settings that decide what a run means, shown in its config table (unset ones skipped).
SETTINGS = """model.name_or_path model.revision data.train data.eval data.test
    scaling.num_workers scaling.use_gpu deepspeed.stage deepspeed.offload_optimizer
    deepspeed.precision train.epochs train.lr train.batch_size train.grad_accum
    train.max_seq_len train.seed"""
FLAG = "**FLAGGED**"

HEADS = {
    "pretrained": "the checkpoint's own masked-LM / LM head scores the general text, "
    "before fine-tuning and after it.",
    "probe": "the checkpoint has no masked-LM head, so a small MLM head (a probe) was "
    "trained on the frozen pretrained backbone over the general text before fine-tuning, "
    "then frozen. The same probe scores the backbone before and after fine-tuning, so the "
    "ratio measures how far the backbone's representations moved away from what predicts "
    "general text.",
    "model": "a causal LM's own output layer: the perplexity of the model itself on the "
    "general text, before fine-tuning and after it.",
}


@dataclass
class _Run:
    dir: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    data_report: dict[str, Any] | None
    task: str
    method: str
    notes: list[str] = field(default_factory=list)  # files that could not be read

    @property
    def primary(self) -> str | None:
        return PRIMARY_METRIC.get(self.task)

    @property
    def baselines(self) -> dict[str, dict[str, Any]]:
        found = self.metrics.get("baselines")
        if not isinstance(found, dict):
            return {}
        ordered = [*BASELINE_ORDER, *sorted(set(found) - set(BASELINE_ORDER))]
        return {k: found[k] for k in ordered if isinstance(found.get(k), dict)}


def write_report(output_dir: str) -> list[str]:
    """Read the run's files in output_dir and write report.md, report.html and the PNG plots
    beside them; return the paths written."""
    run = _read(output_dir)
    plots: list[str] = []
    sections = [
        _title(run),
        _glance(run),
        _settings(run),
        _data(run),
        _metrics(run, plots),
        _training(run, plots),
        _time(run),
        _forgetting(run),
        _slices(run, plots),
    ]
    text = "\n".join(line for section in sections for line in [*section, ""]).rstrip() + "\n"
    md_path = os.path.join(output_dir, REPORT_MD)
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(text)
    html_path = os.path.join(output_dir, REPORT_HTML)
    with open(html_path, "w", encoding="utf-8") as handle:
        handle.write(_html(text, _title_text(run)))
    return [md_path, html_path, *plots]


# ------------------------------------------------------------------------------ reading


def _read(output_dir: str) -> _Run:
    notes: list[str] = []
    config = _read_file(os.path.join(output_dir, "config.yaml"), yaml.safe_load, notes)
    metrics = _read_file(os.path.join(output_dir, "metrics.json"), json.load, notes)
    data_report = _read_file(os.path.join(output_dir, "data_report.json"), json.load, notes)
    history = _read_jsonl(os.path.join(output_dir, "history.jsonl"), notes)
    config = config if isinstance(config, dict) else {}
    metrics = metrics if isinstance(metrics, dict) else {}
    return _Run(
        dir=output_dir,
        config=config,
        metrics=metrics,
        history=[h for h in history if isinstance(h.get("step"), (int, float))],
        data_report=data_report if isinstance(data_report, dict) else None,
        task=str(config.get("task") or _infer_task(metrics)),
        method=str(config.get("method") or "unknown method"),
        notes=notes,
    )


def _read_file(path: str, parse: Any, notes: list[str]) -> Any:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return parse(handle)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        notes.append(f"{os.path.basename(path)} could not be read ({exc}).")
        return None


def _read_jsonl(path: str, notes: list[str]) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    rows, bad = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if bad:
        notes.append(f"{os.path.basename(path)}: {bad} line(s) that are not JSON objects skipped.")
    return rows


def _infer_task(metrics: dict[str, Any]) -> str:
    """The task, from its metrics, for a run whose config.yaml is missing."""
    if "perplexity" in metrics:
        return "causal_lm"
    if "exact_match" in metrics:
        return "question_answering"
    if "token_accuracy" in metrics or "per_type" in metrics:
        return "token_classification"
    if "accuracy" in metrics:
        return "sequence_classification"
    return "unknown task"


def _get(mapping: dict[str, Any], dotted: str) -> Any:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


# ----------------------------------------------------------------------------- formatting


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return _cell(value)


def _cell(value: Any) -> str:
    """Text that cannot break a markdown table row, nor inject HTML into report.html
    (labels, slice values and paths come from the data)."""
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    text = html.escape(str(value), quote=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _duration(seconds: Any) -> str:
    if not _num(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A markdown table; `align` has one letter per column, `l` or `r` (default: the first
    column left, numbers right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(rule) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _note(text: str) -> str:
    return f"_{text}_"


# ------------------------------------------------------------------------------- sections


def _title_text(run: _Run) -> str:
    return f"rayft report: {run.task}, {run.method}"


def _title(run: _Run) -> list[str]:
    m = run.metrics
    model = _get(run.config, "model.name_or_path")
    facts = [
        f"model `{model}`" if model else None,
        f"wall time {_duration(m.get('wall_seconds'))}" if "wall_seconds" in m else None,
        f"{m['step']:,} steps" if _num(m.get("step")) else None,
        f"{m['epoch']:g} epochs" if _num(m.get("epoch")) else None,
        f"{m['train_rows']:,} training rows" if _num(m.get("train_rows")) else None,
    ]
    lines = [f"# {_title_text(run)}", "", " · ".join(f for f in facts if f) or "(no run facts)"]
    for problem in run.notes:
        lines += ["", _note(problem)]
    if not m:
        lines += ["", _note("No metrics.json in this directory: metric sections are skipped.")]
    return lines


def _comparisons(run: _Run) -> list[tuple[str, str, float, float]]:
    """(baseline, "beats" | "ties" | "does not beat", ours, theirs) on the primary metric."""
    metric = run.primary
    ours = run.metrics.get(metric) if metric else None
    if not _num(ours):
        return []
    out = []
    for name, scores in run.baselines.items():
        theirs = scores.get(metric)
        if not _num(theirs):
            continue
        diff = (theirs - ours) if lower_is_better(metric) else (ours - theirs)
        verdict = "ties" if abs(diff) < 1e-12 else "beats" if diff > 0 else "does **not** beat"
        out.append((name, verdict, ours, theirs))
    return out


def _glance(run: _Run) -> list[str]:
    lines = []
    comparisons = _comparisons(run)
    if comparisons:
        parts = [f"{verdict} {name} ({theirs:.4f})" for name, verdict, _, theirs in comparisons]
        lines.append(
            f"- {run.primary} {comparisons[0][2]:.4f}: the fine-tuned model " + "; ".join(parts)
        )
    forgetting = run.metrics.get("forgetting")
    if isinstance(forgetting, dict) and _num(forgetting.get("ratio")):
        lines.append(
            f"- forgetting ratio {forgetting['ratio']:.4f}: {_forgetting_limit(forgetting)}"
        )
    slices = run.metrics.get("slices")
    if isinstance(slices, dict) and _num(slices.get("gap")):
        column = slices.get("column")
        lines.append(f"- slice gap {slices['gap']:.4f} on `{column}`: {_gap_limit(slices)}")
    return ["## At a glance", "", *lines] if lines else []


def _settings(run: _Run) -> list[str]:
    if not run.config:
        return ["## Configuration", "", _note("No config.yaml: settings are not shown.")]
    keys = SETTINGS.split()
    if run.method == "lora":
        keys += ["lora.r", "lora.alpha", "lora.target_modules"]
    if run.method == "two_stage":
        keys += ["two_stage.head_epochs", "two_stage.head_lr"]
    keys.append("eval.max_forgetting")
    if _get(run.config, "eval.slice_column"):
        keys += ["eval.slice_column", "eval.max_slice_gap"]
    rows = []
    for key in keys:
        value = _get(run.config, key)
        if value is None or value == []:
            continue
        if isinstance(value, bool):
            shown = "true" if value else "false"  # as written in the YAML
        else:
            shown = f"{value:g}" if isinstance(value, float) else _cell(value)
        if key == "deepspeed.stage" and value == "auto" and "zero_stage" in run.metrics:
            shown += f" (ran stage {run.metrics['zero_stage']})"
        rows.append([f"`{key}`", shown])
    sizes = [_get(run.config, k) for k in ("train.batch_size", "train.grad_accum")]
    sizes.append(_get(run.config, "scaling.num_workers"))
    if all(isinstance(s, int) for s in sizes):
        rows.append(["global batch (derived)", f"{sizes[0] * sizes[1] * sizes[2]:,} rows"])
    return ["## Configuration", "", *_table(["setting", "value"], rows, align="ll")]


def _count(value: Any) -> int:
    """A data-report count: a number, or a `{reason: n}` mapping (with or without `total`)."""
    if _num(value):
        return int(value)
    if isinstance(value, dict):
        if _num(value.get("total")):
            return int(value["total"])
        return int(sum(v for v in value.values() if _num(v)))
    return 0


def _data(run: _Run) -> list[str]:
    report = run.data_report
    head = ["## Data", ""]
    if report is None:
        return [*head, _note("No data_report.json: the data summary is skipped.")]
    columns = ("read", "kept", "filtered", "deduplicated", "quarantined")
    rows = [
        [split, *(f"{_count(entry.get(c)):,}" for c in columns)]
        for split, entry in (report.get("splits") or {}).items()
        if isinstance(entry, dict)
    ]
    rows.append(["**all**", *(f"{_count(report.get(c)):,}" for c in columns)])
    lines = [*head, *_table(["split", *columns], rows)]
    reasons = []
    for kind in ("filtered", "deduplicated", "quarantined"):
        found = report.get(kind)
        if isinstance(found, dict):
            top = [(r, n) for r, n in found.items() if r not in ("total", "exact", "near") and n]
            top.sort(key=lambda item: -item[1])
            if top:
                reasons.append(f"{kind}: " + ", ".join(f"{r} {n:,}" for r, n in top[:3]))
    if reasons:
        lines += ["", "Top reasons: " + "; ".join(reasons) + "."]
    contamination = report.get("contamination")
    if isinstance(contamination, dict) and _count(contamination):
        lines += [
            "",
            f"Training rows duplicating an eval/test row: {contamination.get('exact', 0):,} "
            f"exact, {contamination.get('near', 0):,} near.",
        ]
    if os.path.exists(os.path.join(run.dir, "data_report.png")):
        lines += ["", "![data report](data_report.png)"]
    return lines


def _metrics(run: _Run, plots: list[str]) -> list[str]:
    m = run.metrics
    if not m:
        return []
    baselines = run.baselines
    names = TASK_METRICS.get(run.task, ())
    columns = [n for n in names if any(_num(r.get(n)) for r in (m, *baselines.values()))]
    columns.append("eval_loss")
    rows = [[f"**fine-tuned ({run.method})**", *(_fmt(m.get(c)) for c in columns)]]
    for name, scores in baselines.items():
        label = f"{name} (always `{_cell(scores['label'])}`)" if "label" in scores else name
        if name == "pretrained" and run.task != "causal_lm":
            label = "pretrained (untrained new head: chance level)"
        if "error" in scores:
            label = f"{name} (failed: {_cell(scores['error'])})"
        rows.append([label, *(_fmt(scores.get(c)) for c in columns)])
    lines = ["## Metrics against baselines", "", *_table(["model", *columns], rows)]
    comparisons = _comparisons(run)
    if comparisons:
        arrow = "lower" if lower_is_better(run.primary or "") else "higher"
        lines += ["", f"On {run.primary} ({arrow} is better), the fine-tuned model:", ""]
        lines += [
            f"- {verdict} {name}: {ours:.4f} vs {theirs:.4f} ({ours - theirs:+.4f})"
            for name, verdict, ours, theirs in comparisons
        ]
    elif not baselines:
        lines += ["", _note("No baselines in metrics.json (see `eval.baselines`).")]
    frozen = baselines.get("frozen", {})
    if _num(frozen.get("wall_seconds")) and _num(m.get("wall_seconds")):
        lines += [
            "",
            f"The frozen baseline trained in {_duration(frozen['wall_seconds'])}; "
            f"the run took {_duration(m['wall_seconds'])}.",
        ]
    if m.get("baselines_note"):
        lines += ["", f"> {_cell(m['baselines_note'])}"]
    tested = [(k[5:], v) for k, v in m.items() if k.startswith("test_") and _num(v)]
    if tested:
        shown = " · ".join(f"{k} {_fmt(v)}" for k, v in tested)
        lines += ["", f"Test split, scored once by the final model: {shown}."]
    selected = m.get("selected_checkpoint")
    if isinstance(selected, dict):
        parts = [f"step {_fmt(selected.get('step'))}"]
        if selected.get("metric"):
            parts.append(f"{selected['metric']} {_fmt(selected.get('value'))}")
        if _num(selected.get("forgetting_ratio")):
            parts.append(f"forgetting ratio {selected['forgetting_ratio']:.4f}")
        lines += [
            "",
            f"Best checkpoint kept by Ray Train: `{selected.get('path')}` ({', '.join(parts)}). "
            "`model/` holds the final model, not this checkpoint (a DeepSpeed training "
            "state, resumable; not exported).",
        ]
    if run.task == "sequence_classification":
        lines += _confusion(run, plots)
    per_type = m.get("per_type")
    if isinstance(per_type, dict) and per_type:
        lines += _entities(run, per_type, plots)
    return lines


def _limit_text(value: Any, limit: Any, exceeded: Any, key: str) -> str:
    """`**FLAGGED**: above <key> = <limit>`, or within it; `exceeded` as the run decided it."""
    if not _num(limit):
        return f"no limit set (`{key}`)"
    if exceeded is None and _num(value):
        exceeded = value > limit
    return f"{FLAG}: above `{key}` = {limit:.4f}" if exceeded else f"within `{key}` = {limit:.4f}"


def _forgetting_limit(f: dict[str, Any]) -> str:
    return _limit_text(
        f.get("ratio"), f.get("max_forgetting"), f.get("exceeded"), "eval.max_forgetting"
    )


def _gap_limit(s: dict[str, Any]) -> str:
    return _limit_text(
        s.get("gap"), s.get("max_slice_gap"), s.get("exceeded"), "eval.max_slice_gap"
    )


def _forgetting(run: _Run) -> list[str]:
    head = ["## Forgetting", ""]
    f = run.metrics.get("forgetting")
    if not isinstance(f, dict):
        return [*head, _note("Not measured (`eval.general_text` unset, or metrics.json absent).")]
    if "ratio" not in f:  # the run could not measure it, and says why
        return [*head, _note(f"Not measured: {_cell(f.get('not_measured', 'no ratio'))}")]
    measure = f.get("measure", "?")
    what = "masked-LM loss" if measure == "mlm_loss" else str(measure)
    text = f" from `{f['text']}`" if f.get("text") else ""
    tokens = f"{f['tokens']:,} tokens" if _num(f.get("tokens")) else "general text"
    lines = [
        *head,
        f"The {what} on {tokens}{text}, before fine-tuning and after it; the ratio is "
        "after / before, so above 1 means the model got worse at general text.",
        "",
        *_table(
            ["measure", "before", "after", "ratio", "limit"],
            [[what, *(_fmt(f.get(k)) for k in ("before", "after", "ratio", "max_forgetting"))]],
        ),
        "",
        f"Result: {_forgetting_limit(f)}.",
    ]
    if f.get("head") in HEADS:
        lines += ["", f"Scored by `{f['head']}`: {HEADS[f['head']]}"]
    return lines


def _slices(run: _Run, plots: list[str]) -> list[str]:
    head = ["## Slices", ""]
    s = run.metrics.get("slices")
    if not isinstance(s, dict) or not isinstance(s.get("values"), dict):
        return [*head, _note("No slices (`eval.slice_column` unset).")]
    metric = str(s.get("metric") or run.primary)
    min_rows = s.get("min_slice_rows") if _num(s.get("min_slice_rows")) else 0
    rows = []
    for value, scores in s["values"].items():
        if not isinstance(scores, dict):
            continue
        marks = [mark for mark in ("best", "worst") if s.get(mark) == value]
        if _num(scores.get("rows")) and scores["rows"] < min_rows:
            marks.append("too few rows: not compared")
        rows.append(
            [_cell(value), _fmt(scores.get("rows")), _fmt(scores.get(metric)), ", ".join(marks)]
        )
    lines = [
        *head,
        f"`{metric}` per value of `{s.get('column')}` (slices under {min_rows} rows are "
        "listed, not compared).",
        "",
        *_table(["slice", "rows", metric, "note"], rows, align="lrrl"),
        "",
    ]
    if _num(s.get("gap")):
        lines.append(
            f"Gap between `{_cell(s.get('best'))}` and `{_cell(s.get('worst'))}`: "
            f"{s['gap']:.4f}, {_gap_limit(s)}."
        )
    else:
        lines.append("Fewer than two slices have enough rows to compare.")
    path = plots_png.slices(run.dir, s, metric, min_rows)
    if path:
        plots.append(path)
        lines += ["", f"![{metric} per slice]({os.path.basename(path)})"]
    return lines


def _training(run: _Run, plots: list[str]) -> list[str]:
    head = ["## Training", ""]
    if not run.history:
        return [*head, _note("No history.jsonl: learning curves are skipped.")]
    limit = (run.metrics.get("forgetting") or {}).get("max_forgetting")
    limit = limit if _num(limit) else _get(run.config, "eval.max_forgetting")
    path = plots_png.learning_curves(run.dir, run.history, run.primary, run.baselines, limit)
    plots.append(path)
    final = run.history[-1]
    return [
        *head,
        f"{len(run.history)} evaluations; the last at step {_fmt(final.get('step'))} "
        f"(train loss {_fmt(final.get('train_loss'))}, eval loss {_fmt(final.get('eval_loss'))}).",
        "",
        f"![learning curves]({os.path.basename(path)})",
    ]


def _time(run: _Run) -> list[str]:
    """Where the wall time went (metrics.json's `timings`), a row per section."""
    timings = run.metrics.get("timings")
    wall = run.metrics.get("wall_seconds")
    if not isinstance(timings, dict) or not _num(wall) or wall <= 0:
        return []
    rows = [
        [name, SECTIONS.get(name, ""), _duration(seconds), f"{100 * seconds / wall:.0f}%"]
        for name, seconds in timings.items()
        if _num(seconds)
    ]
    rest = wall - sum(s for s in timings.values() if _num(s))
    if rest > 0:
        rows.append(["other", "config checks, tracking, what no section covers", _duration(rest),
                     f"{100 * rest / wall:.0f}%"])  # fmt: skip
    return [
        "## Where the time went",
        "",
        f"{_duration(wall)} in all; the training steps took "
        f"{100 * (timings.get('train') or 0) / wall:.0f}% of it.",
        "",
        *_table(["section", "what", "time", "share"], rows, align="llrr"),
    ]


def _confusion(run: _Run, plots: list[str]) -> list[str]:
    problems: list[str] = []
    rows = _read_jsonl(os.path.join(run.dir, "eval_predictions.jsonl"), problems)
    pairs = [
        (str(r["label"]), str(r["prediction"])) for r in rows if "label" in r and "prediction" in r
    ]
    notes = [line for problem in problems for line in ("", _note(problem))]
    if not pairs:
        return [*notes, "", _note("No labelled eval_predictions.jsonl: no confusion matrix.")]
    from sklearn.metrics import confusion_matrix

    seen = {label for pair in pairs for label in pair}
    declared = [str(label) for label in _get(run.config, "data.labels") or []]
    rest = sorted(seen - set(declared), key=lambda v: (0, int(v)) if v.isdigit() else (1, v))
    labels = [*declared, *rest]
    matrix = confusion_matrix([t for t, _ in pairs], [p for _, p in pairs], labels=labels)
    path = plots_png.confusion(run.dir, matrix, labels)
    plots.append(path)
    errors = [
        (int(matrix[i][j]), labels[i], labels[j])
        for i in range(len(labels))
        for j in range(len(labels))
        if i != j and matrix[i][j]
    ]
    lines = [*notes, "", f"![confusion matrix]({os.path.basename(path)})"]
    if errors:
        n, true, pred = max(errors)
        lines[-1:-1] = [
            f"Most frequent error on {len(pairs):,} eval rows: `{_cell(true)}` predicted as "
            f"`{_cell(pred)}` ({n:,} rows).",
            "",
        ]
    return lines


def _entities(run: _Run, per_type: dict[str, Any], plots: list[str]) -> list[str]:
    rows = [
        [
            _cell(kind),
            *(_fmt(s.get(k)) for k in ("precision", "recall", "f1", "support")),
        ]
        for kind, s in per_type.items()
        if isinstance(s, dict)
    ]
    path = plots_png.entity_f1(run.dir, per_type)
    plots.append(path)
    return [
        "",
        "Per entity type:",
        "",
        *_table(["type", "precision", "recall", "f1", "support"], rows),
        "",
        f"![entity F1]({os.path.basename(path)})",
    ]


# ----------------------------------------------------------------------------------- html

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1000px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 0 0.2em; }
blockquote { border-left: 4px solid #ddd; margin-left: 0; padding-left: 1em; color: #555; }
"""


def _html(markdown_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )
