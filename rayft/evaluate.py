"""Evaluation helpers that need no model: baselines from label counts, slice metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayft.config import RayftConfig
    from rayft.tasks import Task


def majority_baseline(
    train_counts: dict[str, int], eval_counts: dict[str, int], labels: list[str]
) -> dict[str, float | str]:
    """Always predict the most frequent training label; score it on the eval split with the
    same definitions as the model (accuracy, macro precision / recall / F1 over `labels`)."""
    majority = max(sorted(train_counts), key=lambda label: train_counts[label])
    total = sum(eval_counts.values())
    hits = eval_counts.get(majority, 0)
    accuracy = hits / total if total else 0.0
    # Only the majority class is ever predicted: its precision is the accuracy, its recall
    # is 1 when it occurs at all; every other class scores 0.
    precision_m = accuracy
    recall_m = 1.0 if hits else 0.0
    f1_m = 2 * precision_m * recall_m / (precision_m + recall_m) if hits else 0.0
    k = max(len(labels), 1)
    return {
        "label": majority,
        "accuracy": accuracy,
        "precision": precision_m / k,
        "recall": recall_m / k,
        "f1": f1_m / k,
    }


MISSING_SLICE = "(missing)"


# The metric a task is judged by first (slices, reports).
PRIMARY_METRIC = {
    "sequence_classification": "accuracy",
    "token_classification": "f1",
    "question_answering": "f1",
    "causal_lm": "perplexity",
}


def primary_metric(cfg: RayftConfig, task: Task) -> str:
    """The metric slices are compared by: `eval.slice_metric`, else the task's primary."""
    return cfg.eval.slice_metric or PRIMARY_METRIC[task.name]


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def slice_metrics(
    preds: list[Any],
    refs: list[Any],
    slices: list[str | None],
    task: Task,
    labels: list[str],
    cfg: RayftConfig,
    examples: list[Any] | None = None,
) -> dict[str, Any]:
    """The task's metrics per value of `eval.slice_column`, and the largest gap of the
    slice metric between slices with at least `eval.min_slice_rows` rows. `examples`
    names each prediction's row (QA windows of one question share it), so `rows` counts
    rows, not windows."""
    metric = primary_metric(cfg, task)
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(slices):
        groups.setdefault(MISSING_SLICE if value is None else str(value), []).append(i)
    values: dict[str, dict[str, Any]] = {}
    for value, index in sorted(groups.items()):
        scores = task.compute_metrics([preds[i] for i in index], [refs[i] for i in index], labels)
        values[value] = {
            "rows": len({examples[i] for i in index}) if examples else len(index),
            **{k: v for k, v in scores.items() if isinstance(v, (int, float))},
        }
    compared = {v: s[metric] for v, s in values.items() if s["rows"] >= cfg.eval.min_slice_rows}
    out: dict[str, Any] = {
        "column": cfg.eval.slice_column,
        "metric": metric,
        "values": values,
        "min_slice_rows": cfg.eval.min_slice_rows,
        "max_slice_gap": cfg.eval.max_slice_gap,
    }
    if len(compared) >= 2:
        sign = -1 if lower_is_better(metric) else 1
        best = max(compared, key=lambda v: sign * compared[v])
        worst = min(compared, key=lambda v: sign * compared[v])
        gap = abs(compared[best] - compared[worst])
        out.update(best=best, worst=worst, gap=gap, exceeded=gap > cfg.eval.max_slice_gap)
    else:
        out.update(best=None, worst=None, gap=None, exceeded=False)
    return out


# Pushes a value over the forgetting limit below (or, minimized, above) every value within
# it, keeping the order among those over it: "best within the limit" as one number that
# Ray Train's checkpoint ranking and Tune's schedulers can compare.
OVER_LIMIT_PENALTY = 1e9


def within_forgetting(value: float, ratio: float | None, limit: float | None, mode: str) -> float:
    if limit is None or ratio is None or ratio <= limit:
        return value
    return value - OVER_LIMIT_PENALTY if mode == "max" else value + OVER_LIMIT_PENALTY


def within_forgetting_key(metric: str) -> str:
    return f"{metric}_within_forgetting"


def add_within_forgetting(
    metrics: dict[str, Any], cfg: RayftConfig, metric: str | None = None, mode: str | None = None
) -> None:
    """With `eval.max_forgetting`, add `<metric>_within_forgetting` (default: the metric
    ranking checkpoints) to a report that carries the metric."""
    metric = metric or cfg.checkpoint.metric
    limit = cfg.eval.max_forgetting
    if limit is None or not isinstance(metrics.get(metric), (int, float)):
        return
    metrics[within_forgetting_key(metric)] = within_forgetting(
        metrics[metric], metrics.get("forgetting_ratio"), limit, mode or cfg.checkpoint.mode
    )
