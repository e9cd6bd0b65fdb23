"""Entity-level scoring of tag sequences (NER): spans from IOB1 / IOB2 / BIOES tags, then
exact span-and-type matching, micro-averaged, with a per-type breakdown.

Chunking follows the CoNLL evaluation script's rules, which read all three schemes: a
chunk starts at B- or S-, or at an I- / E- whose type differs from the running chunk (or
that follows O); it ends before O, B-, S-, a type change, and after E- or S-."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

SCHEMES = ("IOB1", "IOB2", "BIOES")
_PREFIXES = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}

Span = tuple[str, int, int]  # (type, first word, last word)


def split_tag(tag: str) -> tuple[str, str]:
    """'B-person' -> ('B', 'person'); 'O' -> ('O', '')."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def check_tags(tags: Sequence[str], scheme: str) -> str | None:
    """The first tag that the scheme cannot contain (None if all are fine)."""
    allowed = _PREFIXES[scheme]
    for tag in tags:
        prefix, kind = split_tag(tag)
        if prefix != "O" and (len(prefix) != 1 or prefix not in allowed or not kind):
            return tag
    return None


def spans(tags: Sequence[str]) -> list[Span]:
    out: list[Span] = []
    start, current = None, ""
    prev_prefix = "O"
    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        begins = prefix in ("B", "S") or (
            prefix in ("I", "E") and (kind != current or prev_prefix in ("O", "E", "S"))
        )
        if start is not None and (prefix == "O" or begins):
            out.append((current, start, i - 1))
            start, current = None, ""
        if begins:
            start, current = i, kind
        if start is not None and prefix in ("E", "S"):
            out.append((current, start, i))
            start, current = None, ""
        prev_prefix = prefix
    if start is not None:
        out.append((current, start, len(tags) - 1))
    return out


def _prf(hits: int, predicted: int, gold: int) -> dict[str, float]:
    precision = hits / predicted if predicted else 0.0
    recall = hits / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(
    predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]
) -> dict[str, object]:
    """Micro precision / recall / F1 over exact (type, span) matches, token accuracy, and
    the same figures per entity type (with the gold count as `support`)."""
    hits, n_pred, n_gold = Counter(), Counter(), Counter()
    correct = total = 0
    for pred_tags, gold_tags in zip(predicted, gold, strict=True):
        if len(pred_tags) != len(gold_tags):
            raise ValueError(f"{len(pred_tags)} predicted tags for {len(gold_tags)} words")
        p, g = set(spans(pred_tags)), set(spans(gold_tags))
        for kind, *_ in p:
            n_pred[kind] += 1
        for kind, *_ in g:
            n_gold[kind] += 1
        for kind, *_ in p & g:
            hits[kind] += 1
        correct += sum(a == b for a, b in zip(pred_tags, gold_tags, strict=True))
        total += len(gold_tags)
    overall = _prf(sum(hits.values()), sum(n_pred.values()), sum(n_gold.values()))
    per_type = {
        kind: {**_prf(hits[kind], n_pred[kind], n_gold[kind]), "support": n_gold[kind]}
        for kind in sorted(set(n_gold) | set(n_pred))
    }
    return {**overall, "token_accuracy": correct / total if total else 0.0, "per_type": per_type}
