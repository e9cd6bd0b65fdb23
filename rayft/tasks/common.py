"""Pieces shared by tasks: label canonicalization, padding, metrics helpers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # label of positions the loss skips (transformers' convention)
PAD_MULTIPLE = 8  # tensor-core friendly shapes on GPUs, and fewer distinct shapes to compile


def pad_multiple(device: torch.device | str) -> int:
    """What padded lengths round up to on ``device``: `PAD_MULTIPLE` on GPUs; on CPUs the
    longest row, since rounding up there only adds work (7.7% more positions on SST-2
    sentences at batch 32; benchmarks/RESULTS.md, Overhead)."""
    return PAD_MULTIPLE if torch.device(device).type == "cuda" else 1


def canonical_label(value: Any) -> str | None:
    """Labels travel as strings: 1, 1.0 and "1" are the same label; bools are not labels."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def sort_labels(labels: list[str]) -> list[str]:
    """Numeric order when every label is an integer, else lexicographic."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def label_head_kwargs(labels: list[str]) -> dict[str, Any]:
    """Model config for a head with one output per label, named both ways."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def pad_sequences(
    seqs: np.ndarray | list, pad_value: int, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged int sequences -> (padded [n, L], attention mask [n, L]); L is the longest
    row rounded up to ``multiple`` (dynamic padding: short batches stay short), which the
    caller takes from its device (`pad_multiple`)."""
    lengths = [len(s) for s in seqs]
    width = max(lengths, default=1)
    width = -(-width // multiple) * multiple
    ids = np.full((len(seqs), width), pad_value, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        ids[i, :n] = seq
        mask[i, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
