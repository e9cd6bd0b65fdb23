"""The report's plots (PNG): learning curves, confusion matrix, per-entity F1, slices."""

from __future__ import annotations

import os
from typing import Any

from rayft.evaluate import lower_is_better


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], h[key]) for h in history if _num(h.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def learning_curves(
    output_dir: str,
    history: list[dict[str, Any]],
    metric: str | None,
    baselines: dict[str, dict[str, Any]],
    limit: float | None,
) -> str:
    """Train and eval loss, the primary metric against the baselines, and the forgetting
    ratio against its limit, per step."""
    plt = _pyplot()
    panels = ["loss"]
    if metric and _series(history, metric)[0]:
        panels.append(metric)
    if _series(history, "forgetting_ratio")[0]:
        panels.append("forgetting_ratio")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            for key in ("train_loss", "eval_loss"):
                steps, values = _series(history, key)
                if steps:
                    ax.plot(steps, values, marker="o", markersize=3, label=key)
            ax.set_title("loss")
        elif panel == "forgetting_ratio":
            steps, values = _series(history, panel)
            ax.plot(steps, values, marker="o", markersize=3, color="#c44e52", label="ratio")
            if _num(limit):
                ax.axhline(limit, color="black", linestyle="--", label=f"max_forgetting {limit:g}")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title("forgetting (after / before)")
        else:
            steps, values = _series(history, panel)
            ax.plot(steps, values, marker="o", markersize=3, label="fine-tuned")
            for i, (name, scores) in enumerate(baselines.items(), start=1):
                if _num(scores.get(panel)):
                    colour = f"C{i}"
                    ax.axhline(scores[panel], linestyle="--", linewidth=1, color=colour, label=name)
                    values = [*values, scores[panel]]
            if lower_is_better(panel) and min(values) > 0 and max(values) / min(values) > 50:
                ax.set_yscale("log")
            ax.set_title(f"eval {panel} (dashed: baselines)")
        for i in range(1, len(history)):  # two_stage: where the head-only phase ends
            if history[i].get("phase") != history[i - 1].get("phase"):
                ax.axvline(history[i - 1]["step"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _save(fig, os.path.join(output_dir, "learning_curves.png"))


def confusion(output_dir: str, matrix: Any, labels: list[str]) -> str:
    plt = _pyplot()
    size = min(max(4.5, 0.6 * len(labels) + 2.5), 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    rotate = max(map(len, labels)) > 4
    ax.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticklabels(labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 25:
        top = matrix.max() or 1
        for i in range(len(labels)):
            for j in range(len(labels)):
                colour = "white" if matrix[i][j] > top / 2 else "black"
                ax.text(j, i, f"{matrix[i][j]:,}", ha="center", va="center", color=colour)
    ax.set_title(f"confusion matrix ({int(matrix.sum()):,} eval rows)")
    return _save(fig, os.path.join(output_dir, "confusion_matrix.png"))


def entity_f1(output_dir: str, per_type: dict[str, Any]) -> str:
    plt = _pyplot()
    kinds = [k for k, s in per_type.items() if isinstance(s, dict)]
    f1 = [per_type[k].get("f1") or 0.0 for k in kinds]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(kinds) + 2), 4.2))
    ax.bar([f"{k}\n(n={per_type[k].get('support', '?')})" for k in kinds], f1, color="#4c72b0")
    for i, value in enumerate(f1):
        ax.text(i, value + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("F1")
    ax.set_title("entity F1 per type (n: gold entities)")
    return _save(fig, os.path.join(output_dir, "entity_f1.png"))


def slices(output_dir: str, s: dict[str, Any], metric: str, min_rows: int) -> str | None:
    values = {k: v for k, v in s["values"].items() if isinstance(v, dict) and _num(v.get(metric))}
    if not values:
        return None
    plt = _pyplot()
    names = list(values)
    scores = [values[k][metric] for k in names]
    compared = [not (_num(values[k].get("rows")) and values[k]["rows"] < min_rows) for k in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 4.2))
    colours = ["#4c72b0" if c else "#b0b0b0" for c in compared]
    ax.bar([str(n) for n in names], scores, color=colours)
    for i, name in enumerate(names):
        ax.text(i, scores[i], f"n={values[name].get('rows', '?')}", ha="center", va="bottom")
    best = values.get(s.get("best"), {}).get(metric)
    if _num(best) and _num(s.get("max_slice_gap")) and not lower_is_better(metric):
        ax.axhline(
            best - s["max_slice_gap"], color="#c44e52", linestyle="--", label="best - max_slice_gap"
        )
        ax.legend(fontsize=8)
    ax.set_ylim(0, max(scores) * 1.2 if max(scores) > 0 else 1)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by {s.get('column')} (grey: too few rows to compare)")
    return _save(fig, os.path.join(output_dir, "slices.png"))
