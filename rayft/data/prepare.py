"""The data stage: raw files -> annotated rows -> Parquet shards that training streams.

Every record read is annotated with where it came from and, when unusable, why. Rows are
written once, partitioned into ``part=<split>`` (kept) and ``part=rejected``; the counts in
``data_report.json`` and the quarantine files are computed from those shards, so what the
report says is exactly what training reads. The shards are keyed by a hash of the data
config and the input files, and reused when neither changed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from rayft import __version__
from rayft.config import DataConfig, RayftConfig
from rayft.data import fs
from rayft.data.read import BLANK, DataError, expand_sources, peek_columns, read_records
from rayft.tasks import Task, get_task
from rayft.tasks.common import canonical_label, sort_labels

PREPARE_VERSION = 1
SPLITS = ("train", "eval")
REJECTED = "rejected"
META_FILE = "prepared.json"
PEEK_FILES = 64  # files whose header is checked on the driver before anything starts


@dataclass
class Prepared:
    root: str
    splits: dict[str, str]  # split -> directory of its kept rows (Parquet)
    rows: dict[str, int]  # kept rows per split
    labels: list[str]  # id order; empty for tasks without class labels
    label_counts: dict[str, dict[str, int]]
    report: dict[str, Any]
    reused: bool = False

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


# ------------------------------------------------------------- checks before Ray starts


def split_fields(cfg: RayftConfig) -> dict[str, str | list[str]]:
    return {name: getattr(cfg.data, name) for name in SPLITS if getattr(cfg.data, name)}


def required_columns(cfg: RayftConfig) -> dict[str, str]:
    """Config field -> column name that every input file must provide."""
    d = cfg.data
    needed = {"data.text_column": d.text_column}
    if get_task(cfg.task).label_field:
        needed["data.label_column"] = d.label_column
    if d.text_pair_column:
        needed["data.text_pair_column"] = d.text_pair_column
    return needed


def check_sources(cfg: RayftConfig) -> dict[str, list[str]]:
    """Expand every split's files and check the first records' columns, on the driver,
    so a typo fails in a second with the file named, not minutes later in a worker."""
    files = {
        split: expand_sources(spec, f"data.{split}") for split, spec in split_fields(cfg).items()
    }
    needed = required_columns(cfg)
    for split, paths in files.items():
        for path in paths[:PEEK_FILES]:
            columns, has_rows = peek_columns(path)
            if not has_rows:
                raise DataError(f"data.{split}: {path} is empty (no rows); remove it or fill it")
            if columns is None:
                continue  # nothing parsable in the first lines: the quarantine will say why
            renamed = [cfg.data.columns.get(c, c) for c in columns]
            for field, column in needed.items():
                if column not in renamed:
                    hint = ""
                    if cfg.data.columns:
                        hint = f" after data.columns renames {cfg.data.columns}"
                    raise DataError(
                        f"{field} '{column}' not found in {os.path.basename(path)} "
                        f"(columns: {', '.join(columns)}){hint}; full path: {path}. "
                        f"Set {field} to one of the columns, or rename with data.columns"
                    )
    return files


# --------------------------------------------------------------------- annotation (Ray)


def _annotated_schema(task: Task) -> pa.Schema:
    return pa.schema(
        [
            ("part", pa.string()),
            ("_split", pa.string()),
            ("_source", pa.string()),
            ("_line", pa.int64()),
            ("_raw", pa.string()),
            ("_reason", pa.string()),
            *task.fields.items(),
        ]
    )


def annotate_block(table: pa.Table, *, task_name: str, data: DataConfig, split: str) -> pa.Table:
    """Raw records -> rows with the task's fields, or the reason they cannot be used."""
    task = get_task(task_name)
    out: dict[str, list[Any]] = defaultdict(list)
    for row in table.to_pylist():
        reason, fields = row["_reason"], None
        if reason is None:
            record = json.loads(row["_record"])
            if data.columns:
                record = {data.columns.get(k, k): v for k, v in record.items()}
            fields, reason = task.extract(record, data)
        part = split if reason is None else ("blank" if reason == BLANK else REJECTED)
        out["part"].append(part)
        out["_split"].append(split)
        out["_source"].append(row["_source"])
        out["_line"].append(row["_line"])
        out["_raw"].append(None if reason is None else row["_raw"])
        out["_reason"].append(reason)
        for name in task.fields:
            out[name].append(None if fields is None else fields.get(name))
    return pa.table(dict(out), schema=_annotated_schema(task))


def _count_block(table: pa.Table, *, label_field: str | None) -> pa.Table:
    """Partial counts of one block: (split, part, reason, label) -> n."""
    keys = ["_split", "part", "_reason"] + ([label_field] if label_field else [])
    counted = Counter(zip(*(table.column(k).to_pylist() for k in keys), strict=True))
    columns: dict[str, list[Any]] = {k: [] for k in keys}
    columns["n"] = []
    for key, n in counted.items():
        for name, value in zip(keys, key, strict=True):
            columns[name].append(value)
        columns["n"].append(n)
    return pa.table(columns)


# ------------------------------------------------------------------------- the stage


def cache_key(cfg: RayftConfig, files: dict[str, list[str]]) -> str:
    payload = {
        "version": [PREPARE_VERSION, __version__],
        "task": cfg.task,
        "data": cfg.data.model_dump(mode="json", exclude={"shuffle_buffer_rows"}),
        "files": {split: [fs.fingerprint(p) for p in paths] for split, paths in files.items()},
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare(cfg: RayftConfig, files: dict[str, list[str]] | None = None) -> Prepared:
    """Run (or reuse) the data stage; write quarantine and data_report.json to output_dir."""

    files = files or check_sources(cfg)
    task = get_task(cfg.task)
    root = fs.join(cfg.storage_path or os.path.join(cfg.output_dir, "ray"), "prepared")
    root = fs.join(root, cache_key(cfg, files))
    rows_dir = fs.join(root, "rows")
    meta = fs.read_json(fs.join(root, META_FILE))
    if meta is not None:
        prepared = Prepared(**meta, reused=True)
        print(f"[rayft] data: reusing prepared shards {root}")
    else:
        started = time.time()
        fs.remove(root)
        annotated = [
            read_records(paths).map_batches(
                functools.partial(annotate_block, task_name=cfg.task, data=cfg.data, split=split),
                batch_format="pyarrow",
            )
            for split, paths in files.items()
        ]
        dataset = annotated[0].union(*annotated[1:]) if len(annotated) > 1 else annotated[0]
        dataset.write_parquet(rows_dir, partition_cols=["part"])
        counts = _collect_counts(rows_dir, task.label_field)
        prepared = _summarize(cfg, files, root, rows_dir, counts, time.time() - started)
        fs.write_json(fs.join(root, META_FILE), _meta(prepared))
    _check_labels(cfg, prepared)
    _write_outputs(cfg, prepared, rows_dir)
    return prepared


def _meta(prepared: Prepared) -> dict[str, Any]:
    meta = asdict(prepared)
    meta.pop("reused")
    return meta


def _collect_counts(rows_dir: str, label_field: str | None) -> list[dict[str, Any]]:
    import ray.data

    columns = ["_split", "part", "_reason"] + ([label_field] if label_field else [])
    partial = ray.data.read_parquet(rows_dir, columns=columns).map_batches(
        functools.partial(_count_block, label_field=label_field), batch_format="pyarrow"
    )
    return partial.take_all()


def _summarize(
    cfg: RayftConfig,
    files: dict[str, list[str]],
    root: str,
    rows_dir: str,
    counts: list[dict[str, Any]],
    seconds: float,
) -> Prepared:
    label_field = get_task(cfg.task).label_field
    per_split: dict[str, dict[str, Any]] = {}
    label_counts: dict[str, Counter] = defaultdict(Counter)
    for split in files:
        per_split[split] = {
            "files": files[split],
            "lines_read": 0,
            "blank_lines": 0,
            "rows": 0,
            "kept": 0,
            "quarantined": Counter(),
        }
    for row in counts:
        split, part, reason, n = row["_split"], row["part"], row["_reason"], row["n"]
        entry = per_split[split]
        entry["lines_read"] += n
        if part == "blank":
            entry["blank_lines"] += n
            continue
        entry["rows"] += n
        if part == REJECTED:
            entry["quarantined"][reason] += n
        else:
            entry["kept"] += n
            if label_field:
                label_counts[split][row[label_field]] += n
    for entry in per_split.values():
        entry["quarantined"] = dict(entry["quarantined"].most_common())
    if cfg.data.labels is not None:
        labels = [canonical_label(x) for x in cfg.data.labels]
    else:
        labels = sort_labels(list(label_counts["train"])) if label_field else []
    report = {
        "splits": per_split,
        "labels": {split: dict(c.most_common()) for split, c in label_counts.items()},
        "prepare_seconds": round(seconds, 2),
    }
    return Prepared(
        root=root,
        splits={split: fs.join(rows_dir, f"part={split}") for split in files},
        rows={split: per_split[split]["kept"] for split in files},
        labels=labels,
        label_counts={split: dict(c) for split, c in label_counts.items()},
        report=report,
    )


def _check_labels(cfg: RayftConfig, prepared: Prepared) -> None:
    """Fail early, naming the file and label, when training could not go well."""
    report = prepared.report["splits"]
    for split, entry in report.items():
        if entry["kept"] == 0:
            reasons = ", ".join(f"{r} ({n})" for r, n in entry["quarantined"].items()) or "none"
            raise DataError(
                f"data.{split}: no usable rows in {', '.join(entry['files'])}; "
                f"rows were rejected for: {reasons}. See {cfg.output_dir}/quarantine/"
            )
    if not get_task(cfg.task).label_field:
        return
    train_labels = set(prepared.label_counts.get("train", {}))
    if len(train_labels) < 2 and cfg.data.labels is None:
        raise DataError(
            f"data.train has only the label(s) {sorted(train_labels)}; classification needs "
            "at least two (check data.label_column)"
        )
    known = set(prepared.labels)
    for split, counts in prepared.label_counts.items():
        unseen = sorted(set(counts) - known)
        if unseen:
            label = unseen[0]
            where = _first_row_with_label(prepared.splits[split], label)
            raise DataError(
                f"data.{split} label '{label}' ({where}) never occurs in data.train "
                f"(labels: {', '.join(prepared.labels)}); add training rows with it, "
                "or list every label in data.labels"
            )


def _first_row_with_label(split_dir: str, label: str) -> str:
    import ray.data

    rows = (
        ray.data.read_parquet(split_dir, columns=["_source", "_line", "label"])
        .filter(lambda row: row["label"] == label)
        .take(1)
    )
    if not rows:
        return "location unknown"
    return f"first seen in {rows[0]['_source']} line {rows[0]['_line']}"


def _write_outputs(cfg: RayftConfig, prepared: Prepared, rows_dir: str) -> None:
    import ray.data

    os.makedirs(cfg.output_dir, exist_ok=True)
    quarantined = sum(sum(e["quarantined"].values()) for e in prepared.report["splits"].values())
    qdir = os.path.join(cfg.output_dir, "quarantine")
    shutil.rmtree(qdir, ignore_errors=True)  # never leave an earlier run's rows behind
    if quarantined:
        os.makedirs(qdir)
        rejected = ray.data.read_parquet(
            fs.join(rows_dir, f"part={REJECTED}"),
            columns=["_split", "_source", "_line", "_reason", "_raw"],
        )
        with contextlib.ExitStack() as stack:
            handles: dict[str, Any] = {}
            for row in rejected.iter_rows():
                split = row["_split"]
                if split not in handles:
                    path = os.path.join(qdir, f"{split}.jsonl")
                    handles[split] = stack.enter_context(open(path, "w"))
                record = {
                    "source": row["_source"],
                    "line": row["_line"],
                    "reason": row["_reason"],
                    "raw": row["_raw"],
                }
                handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"[rayft] data: {quarantined} row(s) quarantined -> {qdir}/")
    report = dict(prepared.report, cache=prepared.root, reused=prepared.reused)
    with open(os.path.join(cfg.output_dir, "data_report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
