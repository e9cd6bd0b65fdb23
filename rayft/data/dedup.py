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


MARK_SCHEMA = pa.schema([("_uid", pa.int64()), ("_dedup", pa.string())])


def judge_block(
    table: pa.Table, *, threshold: float, remove_duplicates: bool, remove_contaminated: bool
) -> pa.Table:
    """All entries of each bucket are in this block: mark the rows that must go."""
    marks: list[tuple[int, str]] = []
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
    return pa.table(
        {"_uid": [m[0] for m in marks], "_dedup": [m[1] for m in marks]}, schema=MARK_SCHEMA
    )


def _judge_exact(
    members: list, remove_duplicates: bool, remove_contaminated: bool
) -> list[tuple[int, str]]:
    marks = []
    first_in_split: dict[str, Any] = {}
    for m in members:
        if m.split not in first_in_split:
            first_in_split[m.split] = m
        elif remove_duplicates:
            marks.append((m.uid, "duplicate_exact"))
    held_out = any(split != "train" for split in first_in_split)
    if held_out and "train" in first_in_split:
        reason = "contamination_exact" if remove_contaminated else "contamination_exact_kept"
        marks.append((first_in_split["train"].uid, reason))
    return marks


def _judge_near(
    members: list, threshold: float, remove_contaminated: bool
) -> list[tuple[int, str]]:
    marks = []
    for j, m in enumerate(members[1:], start=1):
        for earlier in members[: min(j, MAX_PAIRWISE)]:
            if earlier.key == m.key or jaccard(earlier.sig, m.sig) < threshold:
                continue  # identical texts are the exact pass's business
            if earlier.split == m.split:
                marks.append((m.uid, "duplicate_near"))
            elif m.split == "train" or earlier.split == "train":
                train_row = m if m.split == "train" else earlier
                reason = "contamination_near" if remove_contaminated else "contamination_near_kept"
                marks.append((train_row.uid, reason))
            else:
                continue  # eval and test resembling each other: not ours to fix
            break
    return marks


def resolve_block(table: pa.Table) -> pa.Table:
    """Several marks for one row (shuffled together by uid) -> the highest-priority one."""
    if not table.num_rows:
        return table
    order = {reason: i for i, reason in enumerate(PRIORITY)}
    best: dict[int, str] = {}
    for uid, reason in zip(
        table.column("_uid").to_pylist(), table.column("_dedup").to_pylist(), strict=True
    ):
        current = best.get(uid)
        if current is None or order.get(reason, 99) < order.get(current, 99):
            best[uid] = reason
    return pa.table({"_uid": list(best), "_dedup": list(best.values())}, schema=MARK_SCHEMA)


def find_duplicates(kept: Any, dedup: DedupConfig, kept_rows: int) -> Any:
    """Ray Dataset of kept rows (with _uid, _split, _source, _line, _key, _sig) -> marks
    (_uid, _dedup reason). Exact buckets are always built, since the cross-split
    contamination check relies on them; `dedup.exact` only decides whether repeats within
    a split are removed."""
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
