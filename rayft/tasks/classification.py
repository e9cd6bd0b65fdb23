"""Sequence classification (sentiment, topic, NLI-style pairs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rayft.config import DataConfig, RayftConfig, max_tokens
from rayft.evaluate import majority_baseline
from rayft.tasks import Task
from rayft.tasks.common import canonical_label, label_head_kwargs, pad_sequences


def extract_inputs(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    text = record.get(data.text_column)
    if text is None:
        return None, "missing_text"
    if not isinstance(text, str):
        return None, "text_not_a_string"
    if not text.strip():
        return None, "empty_text"
    pair = None
    if data.text_pair_column:
        pair = record.get(data.text_pair_column)
        if pair is None:
            return None, "missing_text_pair"
        if not isinstance(pair, str):
            return None, "text_pair_not_a_string"
    return {"text": text, "text_pair": pair}, None


def extract(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    fields, reason = extract_inputs(record, data)
    if fields is None:
        return None, reason
    raw_label = record.get(data.label_column)
    if raw_label is None:
        return None, "missing_label"
    label = canonical_label(raw_label)
    if label is None:
        return None, "invalid_label"
    if data.labels is not None and label not in {canonical_label(x) for x in data.labels}:
        return None, "label_not_allowed"
    return {**fields, "label": label}, None


def tokenize(
    batch: dict[str, np.ndarray], tokenizer: Any, cfg: RayftConfig, label2id: dict[str, int]
) -> dict[str, Any]:
    pairs = [str(p) for p in batch["text_pair"]] if cfg.data.text_pair_column else None
    enc = tokenizer(
        [str(t) for t in batch["text"]],
        pairs,
        truncation=True,
        max_length=max_tokens(cfg),
    )
    out = {"input_ids": [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]}
    if "label" in batch:  # absent when predicting
        out["labels"] = np.asarray([label2id[label] for label in batch["label"]], dtype=np.int64)
    if "token_type_ids" in enc:
        out["token_type_ids"] = [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
    return out


def collate(batch: dict[str, np.ndarray], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id, multiple)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "labels" in batch:
        out["labels"] = torch.tensor(np.asarray(batch["labels"], dtype=np.int64))
    if "token_type_ids" in batch:
        out["token_type_ids"], _ = pad_sequences(batch["token_type_ids"], 0, multiple)
    return out


def auto_class() -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def references(batch: dict[str, Any]) -> list[int]:
    return [int(x) for x in batch["labels"]]


def predict(outputs: Any, batch: dict[str, Any], cfg: RayftConfig) -> list[Any]:
    probs = torch.softmax(outputs.logits.float(), dim=-1)
    score, label = probs.max(dim=-1)
    return [(int(i), float(s)) for i, s in zip(label.tolist(), score.tolist(), strict=True)]


def compute_metrics(preds: list[Any], refs: list[Any], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_pred = [p[0] for p in preds]
    ids = list(range(len(labels)))
    precision, recall, f1, _ = precision_recall_fscore_support(
        refs, y_pred, labels=ids, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(refs, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def describe(row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    label_id, score = row["prediction"]
    return {
        "source": row["source"],
        "line": row["line"],
        "label": labels[row["reference"]],
        "prediction": labels[label_id],
        "score": round(score, 6),
    }


def present(prediction: Any, row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    label_id, score = prediction
    return {"prediction": labels[label_id], "score": score}


def columns(data: DataConfig) -> dict[str, str]:
    needed = {"data.text_column": data.text_column, "data.label_column": data.label_column}
    if data.text_pair_column:
        needed["data.text_pair_column"] = data.text_pair_column
    return needed


TASK = Task(
    name="sequence_classification",
    fields={"text": pa.string(), "text_pair": pa.string(), "label": pa.string()},
    text_fields=("text", "text_pair"),
    extract=extract,
    label_field="label",
    tokenize=tokenize,
    collate=collate,
    auto_class=auto_class,
    model_kwargs=label_head_kwargs,
    predict=predict,
    references=references,
    compute_metrics=compute_metrics,
    describe=describe,
    peft_task_type="SEQ_CLS",
    columns=columns,
    baseline=majority_baseline,
    metric_names=("accuracy", "precision", "recall", "f1"),
    label_columns=("data.label_column",),
    extract_inputs=extract_inputs,
    present=present,
    prediction_columns=("prediction", "score"),
)
