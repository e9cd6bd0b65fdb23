"""The data stage: raw files -> clean, filtered, deduplicated Parquet shards that training
streams.

Three Ray Data passes, none of which gathers rows on the driver:

1. *annotate*: read every record with its provenance, extract the task's fields, clean the
   text, assign the split (by hash of the normalized text when ``data.split`` is set),
   apply the length filters and compute the keys deduplication needs.
2. *deduplicate*: exact and MinHash-LSH near duplicates, within and across splits
   (``rayft.data.dedup``); the result is a small table of marks.
3. *finalize*: the marks are broadcast to the tasks that rewrite the rows, partitioned
   into ``part=<split>`` (kept) and ``part=<rejected|filtered|deduplicated|blank>``.

The report's counts are computed from the final shards, so what ``data_report.json`` says
is exactly what training reads. The shards are keyed by a hash of the data config, the
tokenizer and the input files, and reused when none of them changed.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rayft import __version__
from rayft.config import DataConfig, DedupConfig, RayftConfig, max_tokens
from rayft.console import say
from rayft.data import dedup, fs
from rayft.data.clean import clean_text, dedup_text, split_of, stable_hash
from rayft.data.features import write_windows
from rayft.data.read import BLANK, DataError, expand_sources, peek_columns, read_records
from rayft.tasks import Task, get_task
from rayft.tasks.common import canonical_label, sort_labels

PREPARE_VERSION = 5
SPLITS = ("train", "eval", "test")
REJECTED, FILTERED, DEDUPLICATED = "rejected", "filtered", "deduplicated"
META_FILE = "prepared.json"
# The row columns a dedup mark sets (reason, the row it repeats, similarity) and their types
MARKED = {f.name: f.type for f in dedup.MARK_SCHEMA if f.name != "_uid"}
PEEK_FILES = 64  # files whose header is checked on the driver before anything starts
EXAMPLE_LINES = 5  # line numbers per (file, reason) kept for error messages
CHAR_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
TOKEN_EDGES = [0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@dataclass
class Prepared:
    root: str
    splits: dict[str, str]  # split -> directory of its kept rows (Parquet)
    rows: dict[str, int]  # kept rows per split
    labels: list[str]  # id order; empty for tasks without class labels
    label_counts: dict[str, dict[str, int]]
    report: dict[str, Any]
    # windowed tasks: split -> directory of its tokenized features, and their counts
    features: dict[str, str] = field(default_factory=dict)
    feature_rows: dict[str, int] = field(default_factory=dict)
    reused: bool = False

    @property
    def units(self) -> dict[str, int]:
        """What the workers iterate over, per split: rows, or a windowed task's features."""
        if not self.features:
            return self.rows
        return {split: self.feature_rows.get(split, 0) for split in self.rows}

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


# ------------------------------------------------------------- checks before Ray starts


def split_fields(cfg: RayftConfig) -> dict[str, str | list[str]]:
    return {name: getattr(cfg.data, name) for name in SPLITS if getattr(cfg.data, name)}


def output_splits(cfg: RayftConfig) -> list[str]:
    """The splits the stage produces: the files given, or `data.split`'s carving of train."""
    named = set(split_fields(cfg))
    if cfg.data.split and cfg.data.eval is None:
        named |= set(cfg.data.split)
    return [s for s in SPLITS if s in named]


def required_columns(cfg: RayftConfig) -> dict[str, str]:
    """Config field -> column name that every input file must provide."""
    return get_task(cfg.task).columns(cfg.data)


def check_sources(cfg: RayftConfig) -> dict[str, list[str]]:
    """Expand every split's files and check the first records' columns, on the driver,
    so a typo fails in a second with the file named, not minutes later in a worker."""
    files = {
        split: expand_sources(spec, f"data.{split}", cfg.data.format)
        for split, spec in split_fields(cfg).items()
    }
    for split, paths in files.items():
        needed = required_columns(cfg)
        evaluated = split != "train" or (cfg.data.split and cfg.data.eval is None)
        if cfg.eval.slice_column and evaluated:  # a misspelt column would hide the slices
            needed["eval.slice_column"] = cfg.eval.slice_column
        for path in paths[:PEEK_FILES]:
            empty = f"data.{split}: {path} is empty (no rows); remove it or fill it"
            columns, missing = missing_column(cfg, path, needed, empty)
            if missing:
                key, column = missing
                hint = ""
                if cfg.data.columns:
                    hint = f" after data.columns renames {cfg.data.columns}"
                raise DataError(
                    f"{key} '{column}' not found in {os.path.basename(path)} "
                    f"(columns: {', '.join(columns)}){hint}; full path: {path}. "
                    f"Set {key} to one of the columns, or rename with data.columns"
                )
    return files


def missing_column(
    cfg: RayftConfig, path: str, needed: dict[str, str], empty: str
) -> tuple[list[str] | None, tuple[str, str] | None]:
    """The file's columns (None when nothing in its first lines parses: the quarantine
    will say why) and the first of `needed` (config key -> column) they lack after
    `data.columns` renames, as (key, column), or None. DataError(`empty`) when the file
    has no rows."""
    columns, has_rows = peek_columns(path, forced=cfg.data.format)
    if not has_rows:
        raise DataError(empty)
    present = [cfg.data.columns.get(c, c) for c in columns or ()]
    absent = [(key, column) for key, column in needed.items() if column not in present]
    return columns, absent[0] if columns is not None and absent else None


@contextlib.contextmanager
def _execution_options(**values: Any) -> Iterator[None]:
    """Set fields of Ray Data's execution options for the block; restore them after."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before = {name: getattr(options, name) for name in values}
    for name, value in values.items():
        setattr(options, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(options, name, value)


def ordered_execution() -> contextlib.AbstractContextManager[None]:
    """Ray Data keeps block order, so prepared shards and each worker's rows are the same
    from run to run (and in input order)."""
    return _execution_options(preserve_order=True)


def machine_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def data_stage_cpu_cap() -> int | None:
    """How many CPUs the data stage may use at once on a Ray of one node (this one) with
    more logical CPUs than cores: the cores. rayft's local Ray counts CPUs beyond the
    cores so training workers leave room for streaming batches; before training starts
    they would let Ray Data run a task per logical CPU, each a process to start and
    import into, all competing for the same cores (a cold data stage of a few hundred
    rows spawned 9 processes on 2 cores and took 17-23 s, 11-12.5 s at one task per core,
    in a one-off measurement recorded in benchmarks/RESULTS.md).
    None on a cluster, or where Ray counts no more CPUs than there are cores."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    if len(nodes) != 1 or nodes[0]["NodeID"] != here:
        return None
    cores = machine_cores()
    return cores if ray.cluster_resources().get("CPU", 0) > cores else None


def one_task_per_core() -> contextlib.AbstractContextManager[None]:
    """Hold the data stage's Ray Data executions to `data_stage_cpu_cap()` CPUs (a lower
    limit set by the caller stays)."""
    import ray.data

    cap = data_stage_cpu_cap()
    limits = ray.data.DataContext.get_current().execution_options.resource_limits
    if cap is None or limits.cpu <= cap:
        return contextlib.nullcontext()
    return _execution_options(resource_limits=limits.copy(cpu=cap))


def fast_parquet_reads() -> None:
    """Read Parquet with Ray Data's task-based reader. The default one in Ray 2.60
    (datasource V2) starts actors for every read: 5-7 s per read of a 100-row file on this
    project's 2-core machine, against 0.3 s for the task-based reader (measured side by
    side). rayft reads its own shards many times (counting, windows, each split, the
    quarantine), so it makes that choice for the process."""
    import ray.data

    ray.data.DataContext.get_current().use_datasource_v2 = False


# ------------------------------------------------------------- pass 1: annotate (Ray)


def _annotated_schema(task: Task) -> pa.Schema:
    return pa.schema(
        [
            ("part", pa.string()),
            ("_split", pa.string()),
            ("_source", pa.string()),
            ("_line", pa.int64()),
            ("_raw", pa.string()),
            ("_reason", pa.string()),
            ("_uid", pa.int64()),
            ("_key", pa.int64()),
            ("_sig", pa.binary()),
            ("_chars", pa.int64()),
            ("_tokens", pa.int64()),
            ("_truncated", pa.string()),
            ("_cleaned", pa.list_(pa.string())),
            *MARKED.items(),  # _dedup and the row a duplicate repeats
            ("_slice", pa.string()),
            *task.fields.items(),
        ]
    )


class _Row:
    """One record on its way through annotation (plain attributes, no per-row dicts)."""

    __slots__ = (
        "part", "reason", "fields", "split", "truncated", "cleaned", "chars", "tokens", "slice",
    )  # fmt: skip

    def __init__(self, reason: str | None, fields: dict | None, split: str):
        self.reason, self.fields, self.split = reason, fields, split
        self.part = split
        self.truncated: str | None = None
        self.cleaned: list[str] = []
        self.chars = self.tokens = None
        self.slice: str | None = None

    def reject(self, reason: str, part: str = REJECTED) -> None:
        self.reason, self.part = reason, part


def annotate_block(table: pa.Table, *, cfg_json: str, split: str) -> pa.Table:
    """Raw records -> rows with the task's cleaned fields, split, lengths and dedup keys,
    or the reason they cannot be used (quarantine) or were filtered out."""
    cfg = RayftConfig.model_validate_json(cfg_json)
    task, data = get_task(cfg.task), cfg.data
    carve = data.split if (split == "train" and data.split and data.eval is None) else None
    rows: list[_Row] = []
    for record_json, reason in zip(
        table.column("_record").to_pylist(), table.column("_reason").to_pylist(), strict=True
    ):
        rows.append(
            _annotate_record(record_json, reason, task, data, split, carve, cfg.eval.slice_column)
        )
    _token_filters(rows, task, cfg)
    texts = [
        _joined_text(task, r.fields) if r.part not in (REJECTED, "blank") else None for r in rows
    ]
    near = dedup_settings(cfg).near
    sig_index = [
        i for i, r in enumerate(rows) if near and r.part not in (REJECTED, FILTERED, "blank")
    ]
    sigs = dict(
        zip(
            sig_index,
            dedup.signatures([dedup_text(texts[i]) for i in sig_index], data.dedup),
            strict=True,
        )
    )
    sources, lines = table.column("_source").to_pylist(), table.column("_line").to_pylist()
    raws = table.column("_raw").to_pylist()
    out: dict[str, list[Any]] = {
        "part": [r.part for r in rows],
        "_split": [r.split for r in rows],
        "_source": sources,
        "_line": lines,
        "_raw": [raw if r.part == REJECTED else None for r, raw in zip(rows, raws, strict=True)],
        "_reason": [r.reason for r in rows],
        "_uid": [stable_hash(f"{s}\0{n}") for s, n in zip(sources, lines, strict=True)],
        "_key": [None if t is None else stable_hash(dedup_text(t)) for t in texts],
        "_sig": [sigs.get(i) for i in range(len(rows))],
        "_chars": [r.chars for r in rows],
        "_tokens": [r.tokens for r in rows],
        "_truncated": [r.truncated for r in rows],
        "_cleaned": [r.cleaned for r in rows],
        **{name: [None] * len(rows) for name in MARKED},
        "_slice": [r.slice for r in rows],
    }
    for name in task.fields:
        out[name] = [None if r.fields is None else r.fields.get(name) for r in rows]
    return pa.table(out, schema=_annotated_schema(task))


def _joined_text(task: Task, fields: dict[str, Any] | None) -> str | None:
    if fields is None:
        return None
    return "\n".join(fields[f] for f in task.text_fields if fields.get(f) is not None)


def renamed(record: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    """A record with its columns renamed by `data.columns`."""
    if not data.columns:
        return record
    return {data.columns.get(k, k): v for k, v in record.items()}


def clean_fields(task: Task, fields: dict[str, Any], data: DataConfig) -> set[str]:
    """Clean, in place, the text fields cleaning may rewrite; the steps that changed any."""
    steps: set[str] = set()
    for name in task.rewritable:
        if fields.get(name) is not None:
            fields[name], changed = clean_text(fields[name], data.clean)
            steps.update(changed)
    return steps


def _annotate_record(
    record_json: str | None,
    reason: str | None,
    task: Task,
    data: DataConfig,
    split: str,
    carve: dict[str, float] | None,
    slice_column: str | None = None,
) -> _Row:
    if reason is not None:
        row = _Row(reason, None, split)
        row.part = "blank" if reason == BLANK else REJECTED
        return row
    record = renamed(json.loads(record_json), data)
    fields, reason = task.extract(record, data)
    row = _Row(reason, fields, split)
    if fields is None:
        row.part = REJECTED
        return row
    if slice_column is not None:  # eval.slice_column: kept as text, missing as null
        value = record.get(slice_column)
        row.slice = None if value is None else str(value)
    group = None
    if carve and data.split_by:
        group = record.get(data.split_by)
        if group is None:
            row.reject(f"missing_{data.split_by}")  # the column `data.split_by` names
            return row
    row.cleaned = sorted(clean_fields(task, fields, data))
    primary = fields[task.text_fields[0]]
    if not primary:
        row.reject("empty_after_cleaning")
        return row
    if carve:
        key = str(group) if group is not None else dedup_text(_joined_text(task, fields))
        row.split = row.part = split_of(key, carve)
    row.chars = sum(len(fields[f]) for f in task.text_fields if fields.get(f) is not None)
    if row.chars < data.min_chars:
        row.reject("too_short_chars", FILTERED)
    elif data.max_chars and row.chars > data.max_chars:
        if data.overlong == "drop":
            row.reject("too_long_chars", FILTERED)
        else:
            for name in task.rewritable:
                if fields.get(name) is not None:
                    fields[name] = fields[name][: data.max_chars]
            row.truncated = "chars"
    return row


def _token_filters(rows: list[_Row], task: Task, cfg: RayftConfig) -> None:
    """Count tokens of the rows still in play (one batched call) and apply the limits."""
    from rayft.modeling import load_tokenizer

    live = [r for r in rows if r.part not in (REJECTED, FILTERED, "blank")]
    if not live:
        return
    tokenizer = load_tokenizer(cfg)
    first, second = (list(task.text_fields) + [None])[:2]
    texts = [r.fields[first] for r in live]
    pairs = [r.fields.get(second) or "" for r in live] if second else None
    if pairs is not None and not any(pairs):
        pairs = None
    with _quiet_tokenizer(tokenizer):
        enc = tokenizer(texts, pairs, truncation=False)
    data, limit = cfg.data, max_tokens(cfg)
    for i, (row, row_ids) in enumerate(zip(live, enc["input_ids"], strict=True)):
        row.tokens = len(row_ids)
        if row.tokens < data.min_tokens:
            row.reject("too_short_tokens", FILTERED)
        elif task.windows_long_rows:  # long rows become windows: only the question is limited
            # The first text's tokens in the pair encoding (QA needs a fast tokenizer).
            if enc.sequence_ids(i).count(0) > data.max_question_tokens:
                row.reject("question_too_long", FILTERED)
        elif row.tokens > limit:
            if data.overlong == "drop":
                row.reject("too_long_tokens", FILTERED)
            elif row.truncated is None:
                row.truncated = "tokens"


@contextlib.contextmanager
def _quiet_tokenizer(tokenizer: Any):
    """Counting tokens of long rows is the point here: silence the 'longer than the
    maximum' warning (truncation happens at tokenization, and is reported)."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        yield
    finally:
        tokenizer.model_max_length = saved


# ---------------------------------------------------------- pass 3: finalize (Ray)


@functools.lru_cache(maxsize=2)
def _load_marks(marks_dir: str) -> dict[int, tuple]:
    """The dedup marks, loaded once per worker process: one entry per duplicate found
    (small next to the corpus), broadcast to every task instead of shuffling the rows;
    each maps a row's uid to its values of the MARKED columns."""
    import pyarrow.dataset as pads

    if not fs.exists(marks_dir):
        return {}
    table = pads.dataset(marks_dir, format="parquet").to_table()
    columns = [table.column(name).to_pylist() for name in ("_uid", *MARKED)]
    return {mark[0]: mark[1:] for mark in zip(*columns, strict=True)}


def finalize_block(table: pa.Table, *, marks_dir: str | None) -> pa.Table:
    marks = _load_marks(marks_dir) if marks_dir else {}
    table = table.drop_columns(["_sig"])
    if not marks:
        return table
    parts, reasons = table.column("part").to_pylist(), table.column("_reason").to_pylist()
    marked = [table.column(name).to_pylist() for name in MARKED]
    for i, uid in enumerate(table.column("_uid").to_pylist()):
        mark = marks.get(uid)
        if mark is None:
            continue
        for column, value in zip(marked, mark, strict=True):
            column[i] = value
        if not mark[0].endswith("_kept"):
            parts[i], reasons[i] = DEDUPLICATED, mark[0]
    columns = {"part": (parts, pa.string()), "_reason": (reasons, pa.string())}
    columns.update(zip(MARKED, zip(marked, MARKED.values(), strict=True), strict=True))
    for name, (values, kind) in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))
    return table


# -------------------------------------------------------------------- counting (Ray)

COUNT_KEYS = ["_split", "part", "_reason", "_dedup", "_source", "_truncated", "label"]


def _count_block(table: pa.Table, *, label_field: str | None) -> pa.Table:
    """Partial counts of one block: per key tuple, plus length histograms of kept rows
    (rows with kind 'chars' / 'tokens' and a bin index)."""
    columns = {k: table.column(k).to_pylist() for k in COUNT_KEYS[:-1]}
    labels = table.column(label_field).to_pylist() if label_field else [None] * table.num_rows
    # Tag sequences (token classification) are counted tag by tag, kept rows only.
    listed = label_field is not None and pa.types.is_list(table.schema.field(label_field).type)
    columns["label"] = [None] * table.num_rows if listed else labels
    tags: Counter = Counter()
    if listed:
        for split, part, row_tags in zip(columns["_split"], columns["part"], labels, strict=True):
            if part == split:
                tags.update((split, tag) for tag in row_tags or ())
    counted: Counter = Counter(zip(*(columns[k] for k in COUNT_KEYS), strict=True))
    cleaned: Counter = Counter()
    for split, steps in zip(columns["_split"], table.column("_cleaned").to_pylist(), strict=True):
        for step in steps or ():
            cleaned[(split, step)] += 1
    out: dict[str, list[Any]] = {k: [] for k in ["kind", *COUNT_KEYS, "bin", "n", "total", "max"]}

    def emit(kind: str, key: tuple, bin_: int | None, n: int, total: int = 0, top: int = 0) -> None:
        out["kind"].append(kind)
        for name, value in zip(COUNT_KEYS, key, strict=True):
            out[name].append(value)
        out["bin"].append(bin_)
        out["n"].append(n)
        out["total"].append(total)
        out["max"].append(top)

    for key, n in counted.items():
        emit("rows", key, None, n)
    for (split, step), n in cleaned.items():
        emit("cleaned", (split, None, step, None, None, None, None), None, n)
    for (split, tag), n in tags.items():
        emit("label", (split, None, None, None, None, None, tag), None, n)
    parts = np.asarray(columns["part"], dtype=object)
    splits = np.asarray(columns["_split"], dtype=object)
    kept = parts == splits
    for kind, edges in (("chars", CHAR_EDGES), ("tokens", TOKEN_EDGES)):
        values = table.column(f"_{kind}").to_numpy(zero_copy_only=False)
        for split in set(splits[kept]):
            mask = kept & (splits == split)
            lengths = values[mask].astype(np.int64)
            bins = np.searchsorted(edges, lengths, side="right") - 1
            for b, n in zip(*np.unique(bins, return_counts=True), strict=True):
                in_bin = lengths[bins == b]
                emit(
                    kind,
                    (split, None, None, None, None, None, None),
                    int(b),
                    int(n),
                    int(in_bin.sum()),
                    int(in_bin.max()),
                )
    return pa.table(out)


def _collect_counts(rows_dir: str, label_field: str | None) -> list[dict[str, Any]]:
    import ray.data

    columns = [*COUNT_KEYS[:-1], "_cleaned", "_chars", "_tokens"] + (
        [label_field] if label_field else []
    )
    partial = ray.data.read_parquet(rows_dir, columns=columns).map_batches(
        functools.partial(_count_block, label_field=label_field), batch_format="pyarrow"
    )
    return partial.take_all()


# ------------------------------------------------------------------------- the stage


def cache_key(cfg: RayftConfig, files: dict[str, list[str]]) -> str:
    not_in_key = {
        "shuffle_buffer_rows",
        "max_bad_fraction",
        "materialize",
        "materialize_max_mb",
        "cache_dir",
        "n_best",  # read at prediction time only
        "max_answer_tokens",
    }
    m = cfg.model
    payload = {
        "version": [PREPARE_VERSION, __version__],
        "task": cfg.task,
        "data": cfg.data.model_dump(mode="json", exclude=not_in_key),
        "tokenizer": [m.tokenizer or m.name_or_path, m.revision, max_tokens(cfg)],
        "slice_column": cfg.eval.slice_column,
        "files": {split: [fs.fingerprint(p) for p in paths] for split, paths in files.items()},
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepared_root(cfg: RayftConfig, files: dict[str, list[str]]) -> str:
    base = cfg.data.cache_dir or fs.join(
        cfg.storage_path or os.path.join(cfg.output_dir, "ray"), "prepared"
    )
    return fs.join(base, cache_key(cfg, files))


def prepare(
    cfg: RayftConfig, files: dict[str, list[str]] | None = None, *, outputs: bool = True
) -> Prepared:
    """Run (or reuse) the data stage; write quarantine/, dropped/, data_report.json and
    data_report.png to output_dir (unless `outputs` is False: a tune trial reuses the
    shards its search prepared and reported); fail when the data cannot train well."""
    files = files or check_sources(cfg)
    fast_parquet_reads()
    with one_task_per_core():
        return _prepare(cfg, files, outputs)


def _prepare(cfg: RayftConfig, files: dict[str, list[str]], outputs: bool) -> Prepared:
    task = get_task(cfg.task)
    root = prepared_root(cfg, files)
    rows_dir = fs.join(root, "rows")
    meta = fs.read_json(fs.join(root, META_FILE))
    if meta is not None:
        prepared = Prepared(**meta, reused=True)
        say(f"data: reusing prepared shards {root}")
    else:
        started = time.time()
        fs.remove(root)
        with ordered_execution():
            _run_passes(cfg, files, root, rows_dir)
        counts = _collect_counts(rows_dir, task.label_field)
        prepared = _summarize(cfg, files, root, rows_dir, counts, time.time() - started)
        prepared.report["bad_examples"] = _write_quarantine(cfg, rows_dir, prepared)
        _write_dropped(cfg, rows_dir, prepared)
        if task.windowed:
            with ordered_execution():
                prepared.features, prepared.feature_rows = write_windows(
                    cfg, prepared.splits, prepared.rows, root
                )
            prepared.report["windows"] = prepared.feature_rows
        fs.write_json(fs.join(root, META_FILE), _meta(prepared))
    if outputs:
        os.makedirs(cfg.output_dir, exist_ok=True)
        if prepared.reused:
            _write_quarantine(cfg, rows_dir, prepared)
            _write_dropped(cfg, rows_dir, prepared)
        _write_report(cfg, prepared)
    _check_bad_fraction(cfg, prepared)
    _check_labels(cfg, prepared)
    return prepared


def _run_passes(cfg: RayftConfig, files: dict[str, list[str]], root: str, rows_dir: str) -> None:
    stage_dir, marks_dir = fs.join(root, "stage"), fs.join(root, "marks")
    cfg_json = cfg.model_dump_json()
    annotated = [
        read_records(paths, cfg.data.format).map_batches(
            functools.partial(annotate_block, cfg_json=cfg_json, split=split),
            batch_format="pyarrow",
        )
        for split, paths in files.items()
    ]
    dataset = annotated[0].union(*annotated[1:]) if len(annotated) > 1 else annotated[0]
    say("data: reading, cleaning and filtering")
    dataset.write_parquet(stage_dir)
    marks = _find_duplicates(cfg, stage_dir, marks_dir)
    import ray.data

    say("data: writing prepared shards")
    ray.data.read_parquet(stage_dir).map_batches(
        functools.partial(finalize_block, marks_dir=marks_dir if marks else None),
        batch_format="pyarrow",
    ).write_parquet(rows_dir, partition_cols=["part"])
    fs.remove(stage_dir)


def dedup_settings(cfg: RayftConfig) -> DedupConfig:
    """`data.dedup` as this task uses it: near-duplicate search only where the task allows
    it, and by the task's default when unset (see `Task.near_dedup`)."""
    d, task = cfg.data.dedup, get_task(cfg.task)
    near = task.near_dedup_default if d.near is None else d.near
    return d.model_copy(update={"near": near and task.near_dedup})


def _find_duplicates(cfg: RayftConfig, stage_dir: str, marks_dir: str) -> bool:
    """Pass 2: write the dedup marks; False when there is nothing to look for."""
    import ray.data
    from ray.data.expressions import col

    d = dedup_settings(cfg)
    # Nothing to look for: no duplicates within a split wanted, and no other split to
    # check against (or that check switched off too).
    if not (d.exact or d.near or (d.remove_contaminated and len(output_splits(cfg)) > 1)):
        return False
    columns = ["part", "_uid", "_split", "_source", "_line", "_key", "_sig"]
    kept_rows = _parquet_rows(stage_dir)  # from the files' footers: sizes the shuffle
    if kept_rows < 2:
        return False
    kept = ray.data.read_parquet(stage_dir, columns=columns).filter(
        expr=col("part") == col("_split")
    )
    kinds = "exact and near duplicates" if d.near else "exact duplicates"
    say(f"data: looking for {kinds} among up to {kept_rows:,} rows")
    dedup.find_duplicates(kept, d, kept_rows).write_parquet(marks_dir)
    return True


def _parquet_rows(directory: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(directory, format="parquet").count_rows()


def _meta(prepared: Prepared) -> dict[str, Any]:
    meta = asdict(prepared)
    meta.pop("reused")
    return meta


def _summarize(
    cfg: RayftConfig,
    files: dict[str, list[str]],
    root: str,
    rows_dir: str,
    counts: list[dict[str, Any]],
    seconds: float,
) -> Prepared:
    label_field = get_task(cfg.task).label_field
    splits = output_splits(cfg)
    per_split = {
        split: {
            "read": 0,
            "kept": 0,
            "filtered": Counter(),
            "deduplicated": Counter(),
            "quarantined": Counter(),
            "blank_lines": 0,
            "truncated": Counter(),
            "cleaned": Counter(),
            "contamination_kept": Counter(),
        }
        for split in splits
    }
    sources: dict[str, Counter] = defaultdict(Counter)
    label_counts: dict[str, Counter] = defaultdict(Counter)
    hist: dict[str, dict[str, dict[int, list[int]]]] = defaultdict(lambda: defaultdict(dict))
    for row in counts:
        kind, split, n = row["kind"], row["_split"], row["n"]
        if kind == "cleaned":
            per_split[split]["cleaned"][row["_reason"]] += n
            continue
        if kind == "label":
            label_counts[split][row["label"]] += n
            continue
        if kind != "rows":
            entry = hist[split][kind].setdefault(row["bin"], [0, 0, 0])
            entry[0] += n
            entry[1] += row["total"]
            entry[2] = max(entry[2], row["max"])
            continue
        entry, part, reason = per_split[split], row["part"], row["_reason"]
        if part == "blank":
            entry["blank_lines"] += n
            continue
        entry["read"] += n
        sources[row["_source"]]["read"] += n
        if part == REJECTED:
            entry["quarantined"][reason] += n
            sources[row["_source"]][reason] += n
        elif part == FILTERED:
            entry["filtered"][reason] += n
        elif part == DEDUPLICATED:
            entry["deduplicated"][reason] += n
        else:
            entry["kept"] += n
            if row["_truncated"]:
                entry["truncated"][row["_truncated"]] += n
            if row["_dedup"]:
                entry["contamination_kept"][row["_dedup"]] += n
            if label_field and row["label"] is not None:
                label_counts[split][row["label"]] += n
    for entry in per_split.values():
        for name in (
            "filtered",
            "deduplicated",
            "quarantined",
            "truncated",
            "cleaned",
            "contamination_kept",
        ):
            entry[name] = dict(entry[name].most_common())
    if cfg.data.labels is not None:
        labels = [canonical_label(x) for x in cfg.data.labels]
    else:
        labels = sort_labels(list(label_counts["train"])) if label_field else []
    totals = _totals(per_split)
    report = {
        **totals,
        "splits": per_split,
        "files": {split: paths for split, paths in files.items()},
        "sources": {
            src: {"read": c.pop("read"), "quarantined": dict(c.most_common())}
            for src, c in sorted(sources.items())
        },
        "labels": {split: dict(c.most_common()) for split, c in label_counts.items()},
        "lengths": {split: _histograms(kinds) for split, kinds in hist.items()},
        "settings": {
            "clean": cfg.data.clean.model_dump(),
            "dedup": dedup_settings(cfg).model_dump(),
            "min_chars": cfg.data.min_chars,
            "max_chars": cfg.data.max_chars,
            "min_tokens": cfg.data.min_tokens,
            "max_tokens": max_tokens(cfg),
            "overlong": cfg.data.overlong,
            "split": cfg.data.split,
        },
        "prepare_seconds": round(seconds, 2),
    }
    return Prepared(
        root=root,
        splits={split: fs.join(rows_dir, f"part={split}") for split in splits},
        rows={split: per_split[split]["kept"] for split in splits},
        labels=labels,
        label_counts={split: dict(c) for split, c in label_counts.items()},
        report=report,
    )


def _totals(per_split: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The corpus-wide identity: read = kept + filtered + deduplicated + quarantined."""
    totals: dict[str, Any] = {"read": 0, "kept": 0, "blank_lines": 0}
    grouped: dict[str, Counter] = {
        k: Counter() for k in ("filtered", "deduplicated", "quarantined")
    }
    for entry in per_split.values():
        for key in ("read", "kept", "blank_lines"):
            totals[key] += entry[key]
        for key, counter in grouped.items():
            counter.update(entry[key])
    for key, counter in grouped.items():
        totals[key] = {"total": sum(counter.values()), **dict(counter.most_common())}
    dedup_kinds = Counter()
    for reason, n in grouped["deduplicated"].items():
        dedup_kinds["exact" if "exact" in reason else "near"] += n
    totals["deduplicated"].update({"exact": dedup_kinds["exact"], "near": dedup_kinds["near"]})
    contamination = Counter()
    for entry in per_split.values():
        for reason, n in [*entry["deduplicated"].items(), *entry["contamination_kept"].items()]:
            if reason.startswith("contamination"):
                contamination["exact" if "exact" in reason else "near"] += n
    totals["contamination"] = {"exact": contamination["exact"], "near": contamination["near"]}
    return totals


def _histograms(kinds: dict[str, dict[int, list[int]]]) -> dict[str, Any]:
    out = {}
    for kind, edges in (("chars", CHAR_EDGES), ("tokens", TOKEN_EDGES)):
        bins = kinds.get(kind, {})
        n = sum(v[0] for v in bins.values())
        counts = [bins.get(i, [0])[0] for i in range(len(edges))]
        out[kind] = {
            "edges": edges,  # bin i holds lengths in [edges[i], edges[i+1]); the last is open
            "counts": counts,
            "mean": round(sum(v[1] for v in bins.values()) / n, 2) if n else None,
            "max": max((v[2] for v in bins.values()), default=None),
        }
    return out


# -------------------------------------------------------------- checks and outputs


def _write_by_split(directory: str, paths: list[str], columns: list[str], record: Any) -> None:
    """Stream the rows of prepared Parquet `paths` to directory/<split>.jsonl, one
    `record(row)` each; `columns` are read besides the split and provenance."""
    import ray.data

    os.makedirs(directory)
    rows = ray.data.read_parquet(paths, columns=["_split", "_source", "_line", "_reason", *columns])
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}
        for row in rows.iter_rows():
            split = row["_split"]
            if split not in handles:
                path = os.path.join(directory, f"{split}.jsonl")
                handles[split] = stack.enter_context(open(path, "w"))
            handles[split].write(json.dumps(record(row), ensure_ascii=False) + "\n")


def _write_quarantine(cfg: RayftConfig, rows_dir: str, prepared: Prepared) -> dict[str, Any]:
    """Stream the rejected rows to output_dir/quarantine/<split>.jsonl; return the first
    line numbers per (file, reason) for error messages."""

    qdir = os.path.join(cfg.output_dir, "quarantine")
    shutil.rmtree(qdir, ignore_errors=True)  # never leave an earlier run's rows behind
    total = prepared.report["quarantined"]["total"]
    examples: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    if not total:
        return {}

    def record(row: dict[str, Any]) -> dict[str, Any]:
        lines = examples[row["_source"]][row["_reason"]]
        if len(lines) < EXAMPLE_LINES:
            lines.append(row["_line"])
        return {k: row[f"_{k}"] for k in ("source", "line", "reason", "raw")}

    _write_by_split(qdir, [fs.join(rows_dir, f"part={REJECTED}")], ["_raw"], record)
    say(f"data: {total:,} row(s) quarantined -> {qdir}/")
    return {src: {r: sorted(v) for r, v in reasons.items()} for src, reasons in examples.items()}


DROPPED_TEXT_CHARS = 300  # of each dropped row's text in dropped/: enough to recognize it


def _write_dropped(cfg: RayftConfig, rows_dir: str, prepared: Prepared) -> None:
    """Stream the rows that were read and usable but do not train (filtered by a length
    limit, or removed as duplicates) to output_dir/dropped/<split>.jsonl: where each came
    from, why it went, the start of its text, and for a duplicate the row it repeats."""

    out = os.path.join(cfg.output_dir, "dropped")
    shutil.rmtree(out, ignore_errors=True)  # never leave an earlier run's rows behind
    report = prepared.report
    total = report["filtered"]["total"] + report["deduplicated"]["total"]
    if not total:
        return
    task = get_task(cfg.task)

    def record(row: dict[str, Any]) -> dict[str, Any]:
        entry = {k: row[f"_{k}"] for k in ("source", "line", "reason")}
        entry["text"] = (_joined_text(task, row) or "")[:DROPPED_TEXT_CHARS]
        if row["_of_source"] is not None:
            entry["duplicate_of"] = {
                "source": row["_of_source"],
                "line": row["_of_line"],
                "similarity": round(row["_similarity"], 3),
            }
        return entry

    parts = [fs.join(rows_dir, f"part={p}") for p in (FILTERED, DEDUPLICATED)]
    columns = ["_of_source", "_of_line", "_similarity", *task.text_fields]
    _write_by_split(out, [p for p in parts if fs.exists(p)], columns, record)
    say(f"data: {total:,} row(s) filtered or deduplicated -> {out}/")


def _check_bad_fraction(cfg: RayftConfig, prepared: Prepared) -> None:
    """Fail before training when a file is mostly unusable: that is a wrong column, format
    or encoding, not noise."""
    limit = cfg.data.max_bad_fraction
    examples = prepared.report.get("bad_examples", {})
    for source, entry in prepared.report["sources"].items():
        bad = sum(entry["quarantined"].values())
        if not entry["read"] or bad / entry["read"] <= limit:
            continue
        top = list(entry["quarantined"].items())[:3]
        reasons = "; ".join(
            f"{reason}: {n} (lines {', '.join(map(str, examples.get(source, {}).get(reason, [])))})"
            for reason, n in top
        )
        raise DataError(
            f"{source}: {bad} of {entry['read']} rows ({bad / entry['read']:.1%}) cannot be used, "
            f"over data.max_bad_fraction={limit}. Top reasons: {reasons}. The rows are in "
            f"{cfg.output_dir}/quarantine/; fix the file (or its column settings), or raise "
            "data.max_bad_fraction to train on the rest"
        )


def _check_labels(cfg: RayftConfig, prepared: Prepared) -> None:
    """Fail early, naming the file and label, when training could not go well."""
    report = prepared.report["splits"]
    for split, entry in report.items():
        if entry["kept"] == 0:
            lost = {**entry["quarantined"], **entry["filtered"], **entry["deduplicated"]}
            reasons = ", ".join(f"{r} ({n})" for r, n in lost.items()) or "none"
            where = ", ".join(
                prepared.report["files"].get(split, prepared.report["files"]["train"])
            )
            raise DataError(
                f"data.{split}: no usable rows in {where}; "
                f"rows were rejected for: {reasons}. See {cfg.output_dir}/quarantine/ "
                f"and {cfg.output_dir}/data_report.json"
            )
    label_field = get_task(cfg.task).label_field
    if not label_field:
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
            where = _first_row_with_label(prepared.splits[split], label_field, label)
            raise DataError(
                f"data.{split} label '{label}' ({where}) never occurs in data.train "
                f"(labels: {', '.join(prepared.labels)}); add training rows with it, "
                "or list every label in data.labels"
            )


def _holds_label(value: Any, label: str) -> bool:
    """A row's label is `label`, or its tag sequence contains it (token classification);
    a string label is compared whole, never searched for characters."""
    if isinstance(value, str) or value is None:
        return value == label
    return label in list(value)


def _first_row_with_label(split_dir: str, column: str, label: str) -> str:
    import ray.data

    rows = (
        ray.data.read_parquet(split_dir, columns=["_source", "_line", column])
        .filter(lambda row: _holds_label(row[column], label))
        .take(1)
    )
    if not rows:
        return "location unknown"
    return f"first seen in {rows[0]['_source']} line {rows[0]['_line']}"


def _write_report(cfg: RayftConfig, prepared: Prepared) -> None:
    report = dict(prepared.report, cache=prepared.root, reused=prepared.reused)
    with open(os.path.join(cfg.output_dir, "data_report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    from rayft.data.plots import plot_report

    plot_report(report, os.path.join(cfg.output_dir, "data_report.png"))
    _say_summary(report)


def _say_summary(report: dict[str, Any]) -> None:
    parts = [f"read {report['read']:,}", f"kept {report['kept']:,}"]
    for key in ("filtered", "deduplicated", "quarantined"):
        detail = {k: v for k, v in report[key].items() if k != "total" and v}
        if key == "deduplicated":
            detail = {k: v for k, v in detail.items() if k not in ("exact", "near")}
        text = ", ".join(f"{k} {v:,}" for k, v in detail.items())
        parts.append(f"{key} {report[key]['total']:,}" + (f" ({text})" if text else ""))
    contamination = report["contamination"]
    if contamination["exact"] or contamination["near"]:
        parts.append(
            f"train rows duplicating eval/test: exact {contamination['exact']}, near {contamination['near']}"
        )
    say("data: " + "; ".join(parts))
