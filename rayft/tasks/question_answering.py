"""Extractive question answering (SQuAD v1.1 style): the answer is a span of the context.

A context longer than the window is cut into overlapping windows (`data.doc_stride` tokens
shared by neighbours), each carrying the question; a window trains on the first gold
answer's token span, or on the [CLS] position when that answer is not wholly inside it.
At evaluation every window proposes its best valid span (the `data.n_best` top starts x
top ends, end not before start, at most `data.max_answer_tokens` long, context tokens only)
and a question's answer is its highest-scoring window's span, cut from the context by the
tokenizer's character offsets. Contexts are never rewritten by cleaning: answers point
into them by character offset."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rayft.config import DataConfig, RayftConfig, doc_stride, max_tokens
from rayft.tasks import Task
from rayft.tasks.common import pad_sequences

NO_OFFSET = -1  # offset of a token outside the context (question, special, padding)


# --------------------------------------------------------------------------- records


def _answer_list(raw: Any) -> list[tuple[Any, Any]] | None:
    """SQuAD's `[{text, answer_start}, ...]` or the flat `{text: [...], answer_start: [...]}`."""
    if isinstance(raw, dict):
        texts, starts = raw.get("text"), raw.get("answer_start")
        if isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts):
            return list(zip(texts, starts, strict=True))
        return None
    if isinstance(raw, list) and all(isinstance(a, dict) for a in raw):
        return [(a.get("text"), a.get("answer_start")) for a in raw]
    return None


def locate(context: str, text: str, start: int) -> int | None:
    """Where `text` sits in `context`: at `start` when it does, else its occurrence nearest
    to `start` (off-by-some offsets are common in converted datasets), else None."""
    if context[start : start + len(text)] == text:
        return start
    found = [m.start() for m in re.finditer(re.escape(text), context)]
    return min(found, key=lambda i: abs(i - start)) if found else None


def extract_inputs(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    question = record.get(data.question_column)
    context = record.get(data.context_column)
    if question is None:
        return None, "missing_question"
    if context is None:
        return None, "missing_context"
    if not isinstance(question, str) or not isinstance(context, str):
        return None, "question_or_context_not_a_string"
    if not question.strip() or not context.strip():
        return None, "empty_question_or_context"
    return {"question": question, "context": context}, None


def extract(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    fields, reason = extract_inputs(record, data)
    if fields is None:
        return None, reason
    context = fields["context"]
    answers = _answer_list(record.get(data.answers_column))
    if answers is None:
        return None, "answers_not_squad_style"
    if not answers:
        return None, "no_answers"  # SQuAD v2's unanswerable questions are not supported
    texts, starts = [], []
    for text, start in answers:
        if not isinstance(text, str) or not text.strip():
            return None, "answer_text_empty"
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            return None, "answer_start_not_an_offset"
        lead = len(text) - len(text.lstrip())
        text = text.strip()
        where = locate(context, text, start + lead)
        if where is None:
            return None, "answer_not_in_context"
        texts.append(text)
        starts.append(where)
    return {**fields, "answer_texts": texts, "answer_starts": starts}, None


# ---------------------------------------------------------------------- tokenization


def tokenize(
    batch: dict[str, np.ndarray], tokenizer: Any, cfg: RayftConfig, label2id: dict[str, int]
) -> dict[str, Any]:
    """Rows -> windows. Each window: input ids, the gold span's token positions (or the
    [CLS] position), every token's character offsets in the context (-1 elsewhere), and
    what evaluation needs to score its question (example id, context, gold answers)."""
    if not tokenizer.is_fast:
        raise ValueError(
            f"question_answering needs a fast tokenizer (offset mapping); "
            f"{cfg.model.tokenizer or cfg.model.name_or_path} has none"
        )
    contexts = [str(c) for c in batch["context"]]
    enc = tokenizer(
        [str(q).lstrip() for q in batch["question"]],
        contexts,
        truncation="only_second",
        max_length=max_tokens(cfg),
        stride=doc_stride(cfg),
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    cls_id = tokenizer.cls_token_id
    sources, lines = batch["_source"], batch["_line"]
    labelled = "answer_texts" in batch  # absent when predicting
    names = ["input_ids", "offset_start", "offset_end", "example_id", "context", "_row"]
    if labelled:
        names += ["start_positions", "end_positions", "answers"]
    if "token_type_ids" in enc:
        names.append("token_type_ids")
    out: dict[str, list[Any]] = {name: [] for name in names}
    for i, row in enumerate(enc["overflow_to_sample_mapping"]):
        ids = enc["input_ids"][i]
        in_context = np.asarray([s == 1 for s in enc.sequence_ids(i)])
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int32).reshape(-1, 2)
        starts = np.where(in_context, offsets[:, 0], NO_OFFSET).astype(np.int32)
        ends = np.where(in_context, offsets[:, 1], NO_OFFSET).astype(np.int32)
        out["input_ids"].append(np.asarray(ids, dtype=np.int32))
        out["offset_start"].append(starts)
        out["offset_end"].append(ends)
        out["example_id"].append(f"{sources[row]}:{lines[row]}")
        out["context"].append(contexts[row])
        out["_row"].append(row)
        if labelled:
            first_text, first_start = batch["answer_texts"][row][0], batch["answer_starts"][row][0]
            begin = int(first_start)
            span = token_span(starts, ends, begin, begin + len(first_text))
            null = ids.index(cls_id) if cls_id in ids else 0
            out["start_positions"].append(span[0] if span else null)
            out["end_positions"].append(span[1] if span else null)
            out["answers"].append([str(a) for a in batch["answer_texts"][row]])
        if "token_type_ids" in out:
            out["token_type_ids"].append(np.asarray(enc["token_type_ids"][i], dtype=np.int8))
    if labelled:
        out["start_positions"] = np.asarray(out["start_positions"], dtype=np.int64)
        out["end_positions"] = np.asarray(out["end_positions"], dtype=np.int64)
    out["_row"] = np.asarray(out["_row"], dtype=np.int64)
    return out


def token_span(starts: np.ndarray, ends: np.ndarray, begin: int, end: int) -> tuple | None:
    """The first and last context tokens covering characters [begin, end), or None when
    the window does not hold the whole answer."""
    tokens = np.nonzero(starts != NO_OFFSET)[0]
    if not len(tokens) or starts[tokens[0]] > begin or ends[tokens[-1]] < end:
        return None
    first = tokens[starts[tokens] <= begin][-1]
    last = tokens[ends[tokens] >= end][0]
    return int(first), int(last)


def collate(batch: dict[str, np.ndarray], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id, multiple)
    offset_start, _ = pad_sequences(batch["offset_start"], NO_OFFSET, multiple)
    offset_end, _ = pad_sequences(batch["offset_end"], NO_OFFSET, multiple)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "_offset_start": offset_start,
        "_offset_end": offset_end,
    }
    for name in ("start_positions", "end_positions"):  # absent when predicting
        if name in batch:
            out[name] = torch.tensor(np.asarray(batch[name], dtype=np.int64))
    if "token_type_ids" in batch:
        out["token_type_ids"], _ = pad_sequences(batch["token_type_ids"], 0, multiple)
    return out


def auto_class() -> Any:
    from transformers import AutoModelForQuestionAnswering

    return AutoModelForQuestionAnswering


def model_kwargs(labels: list[str]) -> dict[str, Any]:
    return {}


# ----------------------------------------------------------------------- predictions


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    in_context: np.ndarray,
    n_best: int,
    max_answer_tokens: int,
) -> tuple[float, int, int] | None:
    """(score, first token, last token) of the best valid span of one window: among the
    `n_best` highest start and end logits over context tokens, end >= start and at most
    `max_answer_tokens` long; score = start logit + end logit. None: no valid span."""
    positions = np.nonzero(in_context)[0]
    if not len(positions):
        return None
    k = min(n_best, len(positions))
    starts = positions[np.argsort(-start_logits[positions], kind="stable")[:k]]
    ends = positions[np.argsort(-end_logits[positions], kind="stable")[:k]]
    scores = start_logits[starts][:, None] + end_logits[ends][None, :]
    length = ends[None, :] - starts[:, None]
    scores = np.where((length >= 0) & (length < max_answer_tokens), scores, -np.inf)
    i, j = np.unravel_index(np.argmax(scores), scores.shape)
    if not np.isfinite(scores[i, j]):
        return None
    return float(scores[i, j]), int(starts[i]), int(ends[j])


def predict(outputs: Any, inputs: dict[str, Any], cfg: RayftConfig) -> list[Any]:
    """Per window: (score, answer's first character, character after its end), or None."""
    start_logits = outputs.start_logits.float().cpu().numpy()
    end_logits = outputs.end_logits.float().cpu().numpy()
    offset_start = inputs["_offset_start"].cpu().numpy()
    offset_end = inputs["_offset_end"].cpu().numpy()
    rows = []
    for r in range(len(start_logits)):
        span = best_span(
            start_logits[r],
            end_logits[r],
            offset_start[r] != NO_OFFSET,
            cfg.data.n_best,
            cfg.data.max_answer_tokens,
        )
        if span is None:
            rows.append(None)
        else:
            score, first, last = span
            rows.append((score, int(offset_start[r, first]), int(offset_end[r, last])))
    return rows


def references(batch: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    return [
        (str(e), str(c), [str(a) for a in answers])
        for e, c, answers in zip(
            batch["example_id"], batch["context"], batch["answers"], strict=True
        )
    ]


def answers_by_question(preds: list[Any], refs: list[Any]) -> dict[str, tuple[str, float, list]]:
    """Example id -> (predicted answer text, its score, gold answers): each question's
    highest-scoring window wins."""
    best: dict[str, tuple[str, float, list[str]]] = {}
    for pred, (example, context, gold) in zip(preds, refs, strict=True):
        if example not in best:
            best[example] = ("", float("-inf"), gold)
        if pred is not None and pred[0] > best[example][1]:
            best[example] = (context[pred[1] : pred[2]], pred[0], gold)
    return best


# --------------------------------------------------------------------------- metrics
# Exact match and F1 as the official SQuAD v1.1 evaluation defines them: answers are
# compared after lower-casing, removing punctuation and the articles a / an / the, and
# collapsing whitespace; F1 is over the bag of remaining words; each question scores its
# best match among the gold answers.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    predicted, truth = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(predicted) & Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def squad_scores(answers: dict[str, tuple[str, float, list[str]]]) -> dict[str, float]:
    n = len(answers)
    em = sum(max(exact_match(p, g) for g in gold) for p, _, gold in answers.values())
    f1 = sum(max(f1_score(p, g) for g in gold) for p, _, gold in answers.values())
    return {"exact_match": em / n if n else 0.0, "f1": f1 / n if n else 0.0, "questions": n}


def compute_metrics(preds: list[Any], refs: list[Any], labels: list[str]) -> dict[str, Any]:
    return squad_scores(answers_by_question(preds, refs))


def per_example(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One predictions-file row per question: its best window's answer."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["source"], row["line"])
        score = row["prediction"][0] if row["prediction"] is not None else float("-inf")
        kept = best.get(key)
        if kept is None or score > kept["_score"]:
            best[key] = {**row, "_score": score}
    return [{k: v for k, v in r.items() if k != "_score"} for r in best.values()]


def describe(row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    _, context, gold = row["reference"]
    pred = row["prediction"]
    answer = context[pred[1] : pred[2]] if pred is not None else ""
    return {
        "source": row["source"],
        "line": row["line"],
        "answers": gold,
        "prediction": answer,
        "score": round(pred[0], 4) if pred is not None else None,
        "exact_match": max(exact_match(answer, g) for g in gold),
        "f1": round(max(f1_score(answer, g) for g in gold), 4),
    }


def present(prediction: Any, row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """The best window's answer, cut from the context, and its score (start + end logit);
    an empty answer and no score when no window holds a valid span."""
    if prediction is None:
        return {"answer": "", "score": None}
    score, begin, end = prediction
    return {"answer": str(row["context"])[begin:end], "score": score}


def columns(data: DataConfig) -> dict[str, str]:
    return {
        "data.question_column": data.question_column,
        "data.context_column": data.context_column,
        "data.answers_column": data.answers_column,
    }


TASK = Task(
    name="question_answering",
    fields={
        "question": pa.string(),
        "context": pa.string(),
        "answer_texts": pa.list_(pa.string()),
        "answer_starts": pa.list_(pa.int64()),
    },
    text_fields=("question", "context"),
    extract=extract,
    label_field=None,
    tokenize=tokenize,
    collate=collate,
    auto_class=auto_class,
    model_kwargs=model_kwargs,
    predict=predict,
    references=references,
    compute_metrics=compute_metrics,
    describe=describe,
    peft_task_type="QUESTION_ANS",
    columns=columns,
    baseline=None,  # no labels to count: no trivial predictor to score
    metric_names=("exact_match", "f1"),
    rewritable_fields=("question",),
    windowed=True,
    windows_long_rows=True,
    near_dedup=False,
    per_example=per_example,
    label_columns=("data.answers_column",),
    extract_inputs=extract_inputs,
    present=present,
    prediction_columns=("answer", "score"),
)
