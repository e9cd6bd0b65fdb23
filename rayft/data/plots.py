"""data_report.png: where the rows went, the label distribution and the length histograms."""

from __future__ import annotations

from typing import Any


def _bin_labels(edges: list[int]) -> list[str]:
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)]
    return [*labels, f"{edges[-1]}+"]


def plot_report(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(report["splits"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    outcomes = ["kept", "filtered", "deduplicated", "quarantined"]
    bottom = [0] * len(splits)
    for outcome, colour in zip(outcomes, ["#4c72b0", "#dd8452", "#937860", "#c44e52"], strict=True):
        values = [
            report["splits"][s][outcome]
            if outcome == "kept"
            else sum(report["splits"][s][outcome].values())
            for s in splits
        ]
        ax.bar(splits, values, bottom=bottom, label=outcome, color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_title(f"rows read: {report['read']:,}")
    ax.set_ylabel("rows")
    ax.legend()

    ax = axes[0][1]
    labels_by_split = report.get("labels", {})
    labels = sorted({label for counts in labels_by_split.values() for label in counts})
    if labels:
        width = 0.8 / max(1, len(labels_by_split))
        for i, (split, counts) in enumerate(labels_by_split.items()):
            total = sum(counts.values()) or 1
            xs = [j + i * width for j in range(len(labels))]
            ax.bar(xs, [counts.get(lb, 0) / total for lb in labels], width=width, label=split)
        ax.set_xticks([j + width * (len(labels_by_split) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30 if len(labels) > 6 else 0)
        ax.set_ylabel("share of kept rows")
        ax.set_title("label distribution")
        ax.legend()
    else:
        ax.axis("off")

    for ax, kind in zip(axes[1], ("chars", "tokens"), strict=True):
        for split, lengths in report.get("lengths", {}).items():
            hist = lengths[kind]
            ax.plot(_bin_labels(hist["edges"]), hist["counts"], marker="o", label=split)
        limit = report["settings"].get("max_tokens") if kind == "tokens" else None
        title = f"length in {kind} (kept rows)"
        if limit:
            title += f"; longer than {limit} are {report['settings']['overlong']}d"
        ax.set_title(title)
        ax.set_ylabel("rows")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
