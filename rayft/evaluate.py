"""Evaluation helpers that need no model: baselines computed from label counts."""

from __future__ import annotations


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
