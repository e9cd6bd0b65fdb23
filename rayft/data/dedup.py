"""Exact and near-duplicate detection across a corpus, distributed on Ray Data.

Every kept row contributes *bucket* entries: one for its normalized-text hash (exact) and
one per MinHash LSH band (near). Rows sharing a bucket are candidates. A hash shuffle puts
each bucket wholly inside one block, where candidates are judged with vectorized grouping
and, for near candidates, the signatures' estimated Jaccard similarity. The result is a
small table of *marks* (row uid -> why it goes), joined back to the rows; nothing is ever
collected on the driver.

Within a split the earliest row (by file, then line) is kept. Across splits, an eval or
test row is never removed: the training row that duplicates it is ("contamination").
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pyarrow as pa

from rayft.config import DedupConfig
from rayft.data.clean import stable_hash

EXACT, NEAR = "exact", "near"
# When a row is marked for several reasons, the first in this order is reported. A
# "_kept" reason is counted in the report but the row stays.
PRIORITY = [
    "duplicate_exact",
    "contamination_exact",
    "duplicate_near",
    "contamination_near",
    "contamination_exact_kept",
    "contamination_near_kept",
]
ROWS_PER_PARTITION = 200_000
SINGLE_TASK_ENTRIES = 500_000  # bucket entries judged in one task without a shuffle
MAX_PAIRWISE = 256  # larger near buckets compare members to the earliest few only


def band_params(dedup: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band) for the LSH index. A pair with Jaccard similarity s becomes
    a candidate with probability 1 - (1 - s^rows)^bands; candidates are then verified with
    the signatures, so a false positive costs a comparison while a false negative is a
    duplicate kept. The split minimizes the area of false positives (s < threshold) plus
    four times that of false negatives (s >= threshold)."""
    t = dedup.threshold
    best, best_cost = (1, dedup.num_perm), math.inf
    for bands in range(1, dedup.num_perm + 1):
        rows = dedup.num_perm // bands
        low, high = np.linspace(0, t, 200), np.linspace(t, 1, 200)
        false_pos = np.trapezoid(1 - (1 - low**rows) ** bands, low)
        false_neg = np.trapezoid((1 - high**rows) ** bands, high)
        cost = 0.2 * false_pos + 0.8 * false_neg
        if cost < best_cost:
            best, best_cost = (bands, rows), cost
    return best


def shingles(text: str, size: int) -> set[bytes]:
    data = text.encode("utf-8")
    if len(data) <= size:
        return {data}
    return {data[i : i + size] for i in range(len(data) - size + 1)}


def signatures(texts: list[str], dedup: DedupConfig) -> list[bytes]:
    """MinHash signatures (uint32 per permutation) as bytes, one per text."""
    if not texts:  # near-dedup off: no need for datasketch at all
        return []
    from datasketch import MinHash

    hashes = MinHash.bulk(
        [shingles(t, dedup.shingle_size) for t in texts], num_perm=dedup.num_perm, seed=1
    )
    return [h.hashvalues.astype(np.uint32).tobytes() for h in hashes]


def band_keys(signature: bytes, bands: int, rows: int) -> list[int]:
    values = np.frombuffer(signature, dtype=np.uint32)
    return [
        stable_hash(f"{b}:" + values[b * rows : (b + 1) * rows].tobytes().hex())
        for b in range(bands)
    ]


def jaccard(a: bytes, b: bytes) -> float:
    return float(np.mean(np.frombuffer(a, np.uint32) == np.frombuffer(b, np.uint32)))


CANDIDATE_SCHEMA = pa.schema(
    [
        ("bucket", pa.int64()),
        ("kind", pa.string()),
        ("_uid", pa.int64()),
        ("_split", pa.string()),
        ("_source", pa.string()),
        ("_line", pa.int64()),
        ("_key", pa.int64()),
        ("_sig", pa.binary()),
    ]
)


def candidates_block(table: pa.Table, *, near: bool, bands: int, rows: int) -> pa.Table:
    """Kept rows -> one exact-bucket entry each, plus one entry per LSH band."""
    columns = {name: table.column(name).to_pylist() for name in CANDIDATE_SCHEMA.names[2:]}
    out: dict[str, list[Any]] = {name: [] for name in CANDIDATE_SCHEMA.names}

    def emit(bucket: int, kind: str, i: int, with_sig: bool) -> None:
        out["bucket"].append(bucket)
        out["kind"].append(kind)
        for name, values in columns.items():
            out[name].append(values[i] if (name != "_sig" or with_sig) else None)

    for i, key in enumerate(columns["_key"]):
        emit(key, EXACT, i, with_sig=False)
        if near and columns["_sig"][i] is not None:
            for band in band_keys(columns["_sig"][i], bands, rows):
                emit(band, NEAR, i, with_sig=True)
    return pa.table(out, schema=CANDIDATE_SCHEMA)


# A mark: the row that goes (or is flagged), why, and the row it repeats (the one kept in
# its split, or the eval / test row it contaminates) with their similarity (1.0: exact).
MARK_SCHEMA = pa.schema(
    [
        ("_uid", pa.int64()),
        ("_dedup", pa.string()),
        ("_of_source", pa.string()),
        ("_of_line", pa.int64()),
        ("_similarity", pa.float64()),
    ]
)
Mark = tuple[int, str, str, int, float]


def _mark(row: Any, reason: str, of: Any, similarity: float) -> Mark:
    return (row.uid, reason, of.source, of.line, similarity)


def _marks_table(marks: list[Mark]) -> pa.Table:
    columns = list(zip(*marks, strict=True)) if marks else [()] * len(MARK_SCHEMA)
    return pa.table(
        {name: list(values) for name, values in zip(MARK_SCHEMA.names, columns, strict=True)},
        schema=MARK_SCHEMA,
    )


def judge_block(
    table: pa.Table, *, threshold: float, remove_duplicates: bool, remove_contaminated: bool
) -> pa.Table:
    """All entries of each bucket are in this block: mark the rows that must go."""
    marks: list[Mark] = []
    if table.num_rows:
        # itertuples cannot name fields that start with "_": judge on plain names.
        frame = table.to_pandas().rename(columns=lambda c: c.lstrip("_"))
        sizes = frame.groupby(["kind", "bucket"])["uid"].transform("size")
        shared = frame[sizes > 1].sort_values(["kind", "bucket", "source", "line"])
        for (kind, _), group in shared.groupby(["kind", "bucket"], sort=False):
            members = list(group.itertuples(index=False))
            if kind == EXACT:
                marks.extend(_judge_exact(members, remove_duplicates, remove_contaminated))
            else:
                marks.extend(_judge_near(members, threshold, remove_contaminated))
    return _marks_table(marks)


def _judge_exact(members: list, remove_duplicates: bool, remove_contaminated: bool) -> list[Mark]:
    marks = []
    first_in_split: dict[str, Any] = {}
    for m in members:
        if m.split not in first_in_split:
            first_in_split[m.split] = m
        elif remove_duplicates:
            marks.append(_mark(m, "duplicate_exact", first_in_split[m.split], 1.0))
    held_out = [row for split, row in first_in_split.items() if split != "train"]
    if held_out and "train" in first_in_split:
        reason = "contamination_exact" if remove_contaminated else "contamination_exact_kept"
        marks.append(_mark(first_in_split["train"], reason, held_out[0], 1.0))
    return marks


def _judge_near(members: list, threshold: float, remove_contaminated: bool) -> list[Mark]:
    marks = []
    for j, m in enumerate(members[1:], start=1):
        for earlier in members[: min(j, MAX_PAIRWISE)]:
            if earlier.key == m.key:
                continue  # identical texts are the exact pass's business
            similarity = jaccard(earlier.sig, m.sig)
            if similarity < threshold:
                continue
            if earlier.split == m.split:
                marks.append(_mark(m, "duplicate_near", earlier, similarity))
            elif m.split == "train" or earlier.split == "train":
                train_row, other = (m, earlier) if m.split == "train" else (earlier, m)
                reason = "contamination_near" if remove_contaminated else "contamination_near_kept"
                marks.append(_mark(train_row, reason, other, similarity))
            else:
                continue  # eval and test resembling each other: not ours to fix
            break
    return marks


def resolve_block(table: pa.Table) -> pa.Table:
    """Several marks for one row (shuffled together by uid) -> the highest-priority one."""
    if not table.num_rows:
        return table
    order = {reason: i for i, reason in enumerate(PRIORITY)}
    best: dict[int, Mark] = {}
    for mark in zip(*(table.column(name).to_pylist() for name in MARK_SCHEMA.names), strict=True):
        current = best.get(mark[0])
        if current is None or order.get(mark[1], 99) < order.get(current[1], 99):
            best[mark[0]] = mark
    return _marks_table(list(best.values()))


def find_duplicates(kept: Any, dedup: DedupConfig, kept_rows: int) -> Any:
    """Ray Dataset of kept rows (with _uid, _split, _source, _line, _key, _sig) -> marks
    (MARK_SCHEMA: the row, the reason, the row it repeats and their similarity). Exact
    buckets are always built, since the cross-split contamination check relies on them;
    `dedup.exact` only decides whether repeats within a split are removed."""
    bands, rows = band_params(dedup)
    entries = kept_rows * (1 + (bands if dedup.near else 0))
    candidates = kept.map_batches(
        functools.partial(candidates_block, near=dedup.near, bands=bands, rows=rows),
        batch_format="pyarrow",
    )
    judge = functools.partial(
        judge_block,
        threshold=dedup.threshold,
        remove_duplicates=dedup.exact,
        remove_contaminated=dedup.remove_contaminated,
    )
    if entries <= SINGLE_TASK_ENTRIES:
        # Small corpora: every bucket fits one task; skip the two hash shuffles, whose
        # fixed cost (seconds) dwarfs the work.
        return candidates.repartition(1).map_batches(
            functools.partial(_judge_and_resolve, judge=judge),
            batch_size=None,
            batch_format="pyarrow",
        )
    marks = candidates.repartition(_partitions(entries), keys=["bucket"]).map_batches(
        judge, batch_size=None, batch_format="pyarrow"
    )
    return marks.repartition(_partitions(kept_rows), keys=["_uid"]).map_batches(
        resolve_block, batch_size=None, batch_format="pyarrow"
    )


def _judge_and_resolve(table: pa.Table, *, judge: Any) -> pa.Table:
    return resolve_block(judge(table))


def _partitions(rows: int) -> int:
    return max(1, math.ceil(rows / ROWS_PER_PARTITION))
