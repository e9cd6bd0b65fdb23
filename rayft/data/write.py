"""Rows out to one file, in order, a batch at a time: JSON lines, CSV or Parquet by
extension (`rayft predict`'s predictions), and JSON lines opened at their first row (its
quarantine). The counterpart of `read.py`, for the formats whose rows can be appended."""

from __future__ import annotations

import csv
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from rayft.data.read import DataError

WRITE_FORMATS = (".jsonl", ".csv", ".parquet")


class LazyJsonLines:
    """A JSON-lines file opened at its first row (no empty file when there is none)."""

    def __init__(self, path: Path):
        self.path, self.handle = path, None

    def write(self, row: dict[str, Any]) -> None:
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __enter__(self) -> LazyJsonLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.close()


class RowWriter:
    """Rows -> one file, in order, in the format its extension names. CSV and Parquet need
    every row's columns before their header / schema: rows are staged as JSON lines beside
    the file and converted at the end, so memory holds one batch at a time either way."""

    CHUNK_ROWS = 8192  # rows per Parquet row group when converting

    def __init__(self, path: str):
        self.path = path
        self.kind = Path(path).suffix.lower()
        self.staged = path if self.kind == ".jsonl" else f"{path}.partial.jsonl"
        self.columns: dict[str, None] = {}  # union of the rows' columns, in order
        self.schema: pa.Schema | None = None

    def __enter__(self) -> RowWriter:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.staged, "w", encoding="utf-8")
        return self

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.columns.update(dict.fromkeys(row))
        if self.kind == ".parquet" and rows:
            self.schema = _unify(self.schema, _arrow_rows(rows).schema)

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.handle.close()
        if self.staged == self.path:
            return
        try:
            if kind is None and self.kind == ".csv":
                _staged_to_csv(self.staged, self.path, list(self.columns))
            elif kind is None:
                _staged_to_parquet(self.staged, self.path, self.schema, self.CHUNK_ROWS)
        finally:
            os.remove(self.staged)


def _arrow_rows(rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """Rows -> a table with every column any of them has (`from_pylist` alone would take
    the first row's columns as the schema)."""
    try:
        if schema is not None:
            return pa.Table.from_pylist(rows, schema=schema)
        names = dict.fromkeys(k for row in rows for k in row)
        return pa.table({name: [row.get(name) for row in rows] for name in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(
            f"the rows cannot be written as Parquet ({exc}): a column holds values of "
            "different types; write .jsonl instead"
        ) from None


def _unify(schema: pa.Schema | None, other: pa.Schema) -> pa.Schema:
    if schema is None:
        return other
    try:
        return pa.unify_schemas([schema, other], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(
            f"the rows cannot be written as Parquet ({exc}): a column holds values of "
            "different types; write .jsonl instead"
        ) from None


def _staged_to_csv(staged: str, path: str, columns: list[str]) -> None:
    """Lists and mappings (entities, tags, nested input values) are written as JSON."""
    with open(staged, encoding="utf-8") as rows, open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for line in rows:
            row = json.loads(line)
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
            )


def _staged_to_parquet(staged: str, path: str, schema: pa.Schema | None, chunk: int) -> None:
    import pyarrow.parquet as pq

    with open(staged, encoding="utf-8") as rows:
        if schema is None:  # no row predicted: an empty file
            pq.write_table(pa.table({}), path)
            return
        with pq.ParquetWriter(path, schema) as writer:
            while lines := list(itertools.islice(rows, chunk)):
                writer.write_table(_arrow_rows([json.loads(x) for x in lines], schema))
