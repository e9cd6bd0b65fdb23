"""Token classification (named-entity recognition): words with one tag each.

Words are split into sub-tokens by the model's (fast) tokenizer; the first sub-token of
each word carries the word's tag and the rest are left out of the loss, or, with
`data.label_all_subtokens`, carry it too (a B- tag continues as I-). Predictions are read
at each word's first sub-token; words cut off by truncation count as predicted `O`, so
the entity scores are against every gold entity of the eval split."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rayft.config import DataConfig, RayftConfig, max_tokens
from rayft.tasks import Task
from rayft.tasks.common import IGNORE_INDEX, label_head_kwargs, pad_sequences
from rayft.tasks.entities import check_tags, entity_scores, spans


def extract_inputs(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    tokens = record.get(data.tokens_column)
    if tokens is None:
        return None, "missing_tokens"
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        return None, "tokens_not_a_list_of_strings"
    if not tokens:
        return None, "no_tokens"
    # `text` stands for the sentence in cleaning statistics, length filters and dedup.
    return {"text": " ".join(tokens), "tokens": tokens}, None


def extract(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    fields, reason = extract_inputs(record, data)
    if fields is None:
        return None, reason
    tags = record.get(data.tags_column)
    if tags is None:
        return None, "missing_tags"
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return None, "tags_not_a_list_of_strings"
    if len(fields["tokens"]) != len(tags):
        return None, "tokens_and_tags_differ_in_length"
    tags = [t.strip() for t in tags]
    if check_tags(tags, data.tag_scheme) is not None:
        return None, f"tag_not_{data.tag_scheme}"
    if data.labels is not None and not set(tags) <= {str(x) for x in data.labels}:
        return None, "label_not_allowed"
    return {**fields, "tags": tags}, None


def _continuation(tag: str, label2id: dict[str, int]) -> str:
    """The tag a word's later sub-tokens get with `label_all_subtokens`."""
    if tag[:2] in ("B-", "S-") and f"I-{tag[2:]}" in label2id:
        return f"I-{tag[2:]}"
    return tag


def tokenize(
    batch: dict[str, np.ndarray], tokenizer: Any, cfg: RayftConfig, label2id: dict[str, int]
) -> dict[str, Any]:
    if not tokenizer.is_fast:
        raise ValueError(
            f"token_classification needs a fast tokenizer (word alignment); "
            f"{cfg.model.tokenizer or cfg.model.name_or_path} has none"
        )
    words = [[str(w) for w in row] for row in batch["tokens"]]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_tokens(cfg))
    labelled = "tags" in batch  # absent when predicting
    input_ids, labels, word_pos, gold = [], [], [], []
    for i in range(len(words)):
        tags = batch["tags"][i] if labelled else None
        ids = [label2id[t] for t in tags] if labelled else []
        row_labels, row_pos, previous = [], [], None
        for word in enc.word_ids(i):
            first = word is not None and word != previous
            if word is None or not labelled:
                row_labels.append(IGNORE_INDEX)
            elif first:
                row_labels.append(ids[word])
            elif cfg.data.label_all_subtokens:
                row_labels.append(label2id[_continuation(tags[word], label2id)])
            else:
                row_labels.append(IGNORE_INDEX)
            row_pos.append(word + 1 if first else 0)
            previous = word
        input_ids.append(np.asarray(enc["input_ids"][i], dtype=np.int32))
        labels.append(np.asarray(row_labels, dtype=np.int64))
        word_pos.append(np.asarray(row_pos, dtype=np.int32))
        gold.append(np.asarray(ids, dtype=np.int32))
    out = {"input_ids": input_ids, "word_pos": word_pos}
    if labelled:
        out.update(labels=labels, gold=gold)
    return out


def collate(batch: dict[str, np.ndarray], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id, multiple)
    word_pos, _ = pad_sequences(batch["word_pos"], 0, multiple)
    # Keys starting with "_" are for `predict`, not the model.
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "_word_pos": word_pos}
    if "labels" in batch:
        out["labels"], _ = pad_sequences(batch["labels"], IGNORE_INDEX, multiple)
    return out


def auto_class() -> Any:
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification


def predict(outputs: Any, inputs: dict[str, Any], cfg: RayftConfig) -> list[list[tuple[int, int]]]:
    """Per row: (word index, predicted tag id) for every word the model saw."""
    best = outputs.logits.argmax(dim=-1).cpu()
    word_pos = inputs["_word_pos"].cpu()
    rows = []
    for tags, pos in zip(best.tolist(), word_pos.tolist(), strict=True):
        rows.append([(p - 1, t) for p, t in zip(pos, tags, strict=True) if p > 0])
    return rows


def references(batch: dict[str, Any]) -> list[list[int]]:
    return [[int(x) for x in row] for row in batch["gold"]]


def word_tags(prediction: list[Any], n_words: int, labels: list[str]) -> list[str]:
    """Predicted tag per word; words the model never saw (truncated) are `O`."""
    tags = ["O"] * n_words
    for word, tag in prediction:
        tags[word] = labels[tag]
    return tags


def compute_metrics(preds: list[Any], refs: list[Any], labels: list[str]) -> dict[str, Any]:
    predicted = [word_tags(p, len(r), labels) for p, r in zip(preds, refs, strict=True)]
    gold = [[labels[t] for t in r] for r in refs]
    scores = entity_scores(predicted, gold)
    unseen = sum(len(r) - len(p) for p, r in zip(preds, refs, strict=True))
    return {**scores, "words_truncated": unseen}


def baseline(
    train_counts: dict[str, int], eval_counts: dict[str, int], labels: list[str]
) -> dict[str, Any]:
    """Tag every word with the most frequent training tag (`O` in practice): no entities
    found, so entity precision / recall / F1 are 0 and token accuracy is that tag's share."""
    tag = max(sorted(train_counts), key=lambda t: train_counts[t])
    total = sum(eval_counts.values())
    return {
        "label": tag,
        "token_accuracy": eval_counts.get(tag, 0) / total if total else 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
    }


def describe(row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    gold = [labels[t] for t in row["reference"]]
    return {
        "source": row["source"],
        "line": row["line"],
        "tags": gold,
        "prediction": word_tags(row["prediction"], len(gold), labels),
    }


def present(prediction: Any, row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """`predicted_tags`, one per word, and the `entities` they mark: {type, text, start,
    end} with `start` and `end` word indices as in a slice (`tokens[start:end]`)."""
    words = [str(w) for w in row["tokens"]]
    tags = word_tags(prediction, len(words), labels)
    entities = [
        {"type": kind, "text": " ".join(words[first : last + 1]), "start": first, "end": last + 1}
        for kind, first, last in spans(tags)
    ]
    return {"entities": entities, "predicted_tags": tags}


def columns(data: DataConfig) -> dict[str, str]:
    return {"data.tokens_column": data.tokens_column, "data.tags_column": data.tags_column}


TASK = Task(
    name="token_classification",
    fields={
        "text": pa.string(),
        "tokens": pa.list_(pa.string()),
        "tags": pa.list_(pa.string()),
    },
    text_fields=("text",),
    extract=extract,
    label_field="tags",
    tokenize=tokenize,
    collate=collate,
    auto_class=auto_class,
    model_kwargs=label_head_kwargs,
    predict=predict,
    references=references,
    compute_metrics=compute_metrics,
    describe=describe,
    peft_task_type="TOKEN_CLS",
    columns=columns,
    baseline=baseline,
    metric_names=("precision", "recall", "f1", "token_accuracy"),
    label_columns=("data.tags_column",),
    extract_inputs=extract_inputs,
    present=present,
    prediction_columns=("entities", "predicted_tags"),
)
