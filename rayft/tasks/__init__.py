"""Tasks: what a record means, how it is tokenized and batched, which model head learns it,
and how predictions are scored. One module per task, registered by name in ``TASKS``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from rayft.config import DataConfig, RayftConfig


@dataclass(frozen=True)
class Task:
    name: str
    # Columns (name -> arrow type) that `extract` fills for a usable record.
    fields: dict[str, pa.DataType]
    # record (dict, columns already renamed) -> (fields, None) or (None, reason)
    # Fields holding text: cleaned, length-filtered and hashed for deduplication, in order
    # (the first is the main text; the first two are tokenized as a pair for counting).
    text_fields: tuple[str, ...]
    extract: Callable[[dict[str, Any], DataConfig], tuple[dict[str, Any] | None, str | None]]
    # Column whose values are labels to map to ids (None: the task has no class labels).
    label_field: str | None
    # batch of kept rows (numpy) -> model features (ragged arrays allowed)
    tokenize: Callable[[dict[str, np.ndarray], Any, RayftConfig, dict[str, int]], dict[str, Any]]
    # (batch of features (numpy), pad id, multiple) -> tensors for the model, padded to the
    # batch's longest row rounded up to the multiple (`common.pad_multiple` of the device)
    collate: Callable[[dict[str, np.ndarray], int, int], dict[str, Any]]
    # transformers Auto* class (imported lazily) and its from_pretrained/config kwargs
    auto_class: Callable[[], Any]
    model_kwargs: Callable[[list[str]], dict[str, Any]]
    # (model outputs, collated batch, config) -> per-row predictions (plain Python values)
    predict: Callable[[Any, dict[str, Any], RayftConfig], list[Any]]
    # batch (numpy) -> per-row references that `compute_metrics` compares predictions to
    references: Callable[[dict[str, Any]], list[Any]]
    # (predictions, references, labels) -> metrics
    compute_metrics: Callable[[list[Any], list[Any], list[str]], dict[str, float]]
    # a prediction row (source, line, prediction, reference) -> readable JSON record
    describe: Callable[[dict[str, Any], list[str]], dict[str, Any]]
    # peft task type for LoRA
    peft_task_type: str
    # data config -> {config field: column} every input file must have
    columns: Callable[[DataConfig], dict[str, str]]
    # (train label counts, eval label counts, labels) -> the trivial predictor's metrics
    baseline: Callable[[dict[str, int], dict[str, int], list[str]], dict[str, Any]] | None
    # the eval metrics `compute_metrics` reports (eval_loss comes with every task)
    metric_names: tuple[str, ...] = ()
    # Text fields that cleaning and `data.max_chars` may rewrite (default: all of
    # `text_fields`); others are kept verbatim (QA answers point into the context by offset).
    rewritable_fields: tuple[str, ...] | None = None
    # `tokenize` turns a row into any number of features (QA windows over a long context),
    # each naming its row in `_row`: features are then tokenized once, when the data is
    # prepared, and counted, since every worker must know how many it will get.
    windowed: bool = False
    # A row longer than the window becomes several windows (QA contexts) instead of being
    # truncated; then only its first text field is limited, by `data.max_question_tokens`.
    windows_long_rows: bool = False
    # Near-duplicate search over the joined text fields makes sense for the task (not for
    # QA: questions on one passage share nearly all their text, yet are distinct examples).
    near_dedup: bool = True
    # ... and is on when `data.dedup.near` is unset. Off for causal_lm: instruction rows
    # built from one template ("Identify which instrument is string or percussion: Bak,
    # Fiddle") pass 0.8 on character shingles yet teach different answers: on the shared
    # Dolly sample it removed 15 of 1,000 rows, 14 of them distinct (docs/data.md).
    near_dedup_default: bool = True
    # (engine, config) -> None or an error: checks the model can do what the config asks
    # (run on every rank before training, after the engine is built)
    check_model: Callable[[Any, RayftConfig], None] | None = None
    # generative tasks: (first eval rows, tokenizer, config) -> prompts, and
    # (engine, prompts, tokenizer, config) -> prompts with the model's answers
    sample_prompts: Callable[[list[dict[str, Any]], Any, RayftConfig], list[dict]] | None = None
    generate: Callable[[Any, list[dict], Any, RayftConfig], list[dict]] | None = None
    # rank 0's per-feature prediction rows -> one row per example, for the predictions file
    per_example: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
    # `rayft predict` / `rayft eval` (rayft.inference) from here on.
    # Config fields among `columns` that name what is learned (label, tags, answers):
    # prediction does not need them.
    label_columns: tuple[str, ...] = ()
    # record -> the model's inputs only, checked as `extract` checks them; a missing (or
    # unusable) label, tag list, answer or response is no reason to reject the record
    extract_inputs: (
        Callable[[dict[str, Any], DataConfig], tuple[dict[str, Any] | None, str | None]] | None
    ) = None
    # (one row's prediction, the row's fields, labels) -> the columns `rayft predict` adds,
    # named in `prediction_columns`
    present: Callable[[Any, dict[str, Any], list[str]], dict[str, Any]] | None = None
    prediction_columns: tuple[str, ...] = ()
    # generative tasks: (model, rows, tokenizer, config) -> per-row predictions of `rayft
    # predict` (greedy answers), instead of `tokenize` -> forward -> `predict`
    generate_rows: Callable[[Any, dict[str, np.ndarray], Any, RayftConfig], list[Any]] | None = None

    @property
    def rewritable(self) -> tuple[str, ...]:
        """The text fields cleaning and `data.max_chars` may rewrite."""
        return self.text_fields if self.rewritable_fields is None else self.rewritable_fields

    @property
    def row_columns(self) -> list[str]:
        """What is read back from prepared shards: the task's fields and provenance."""
        return [*self.fields, "_source", "_line", "_slice"]


def get_task(name: str) -> Task:
    from rayft.tasks import causal_lm, classification, question_answering, token_classification

    tasks = (
        classification.TASK,
        token_classification.TASK,
        question_answering.TASK,
        causal_lm.TASK,
    )
    registry = {t.name: t for t in tasks}
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(registry))}") from None
