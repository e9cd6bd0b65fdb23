"""Read corpora as streams of records that remember where they came from.

Every physical record becomes one row ``{_source, _line, _raw, _record, _reason}``:
``_record`` is the parsed record as JSON (or null), ``_reason`` says why it could not be
parsed (or null). Nothing is dropped here: unreadable lines travel on to be counted and
quarantined. Files are read in chunks, never whole, so a file larger than memory streams.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa

FORMATS = ("jsonl", "csv", "tsv", "parquet", "text", "arrow", "conll", "squad")
HUB = "hf://"
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",  # the shards of a `datasets.save_to_disk` directory
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")
BLOCK_ROWS = 8192
BLANK = "blank_line"  # not a row: counted apart, never quarantined

SCHEMA = pa.schema(
    [
        ("_source", pa.string()),
        ("_line", pa.int64()),
        ("_raw", pa.string()),
        ("_record", pa.string()),
        ("_reason", pa.string()),
    ]
)


class DataError(ValueError):
    """Input data cannot be used; the message names the file (and row) and the fix."""


@dataclass(frozen=True)
class RawRecord:
    line: int
    raw: str
    record: dict[str, Any] | None
    reason: str | None


def detect_format(path: str, forced: str | None = None) -> str | None:
    """The reader for `path`: `forced` (`data.format`) if given, else by extension."""
    if forced and forced != "auto":
        return forced
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def expand_sources(spec: str | list[str], field: str, forced: str | None = None) -> list[str]:
    """Files named by path(s), glob(s) or directories, sorted; errors name the config field."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for item in specs:
        if item.startswith(HUB):
            parse_hub(item, field)
            files.append(item)  # read through `datasets` (streaming), see HubDatasource
            continue
        if "://" in item:
            files.append(item)  # remote: listed and opened by Ray's filesystem layer
            continue
        saved = _saved_dataset_files(item, field) if os.path.isdir(item) else None
        if saved is not None:
            files.extend(saved)
        elif os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(item)
                for f in names
                if detect_format(f, forced) and not f.startswith((".", "_"))
            )
            if not found:
                raise DataError(
                    f"{field}: directory {item} holds no readable files "
                    f"(looked for {', '.join(sorted(_SUFFIXES))})"
                )
            files.extend(found)
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise DataError(f"{field}: glob {item!r} matches no files")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DataError(f"{field}: file {item} does not exist (check the path, or the cwd)")
    for path in files:
        if not path.startswith(HUB) and detect_format(path, forced) is None:
            raise DataError(
                f"{field}: cannot tell the format of {path} from its extension "
                f"(supported: {', '.join(sorted(_SUFFIXES))}, optionally .gz); "
                f"or name it with data.format ({', '.join(FORMATS)})"
            )
    return files


def _saved_dataset_files(directory: str, field: str) -> list[str] | None:
    """The Arrow shards of a `datasets.save_to_disk` directory, or None for other dirs."""
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        with open(os.path.join(directory, "dataset_dict.json")) as handle:
            splits = json.load(handle).get("splits", [])
        raise DataError(
            f"{field}: {directory} is a saved DatasetDict with splits {splits}; point "
            f"{field} at one of them, e.g. {os.path.join(directory, splits[0] if splits else 'train')}"
        )
    state = os.path.join(directory, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state) as handle:
        names = [entry["filename"] for entry in json.load(handle).get("_data_files", [])]
    if not names:
        raise DataError(f"{field}: saved dataset {directory} lists no data files in state.json")
    return [os.path.join(directory, name) for name in names]


def parse_hub(spec: str, field: str) -> dict[str, str]:
    """`hf://<dataset>?split=<split>[&name=<config>]` -> arguments of datasets.load_dataset."""
    from urllib.parse import parse_qs

    rest = spec[len(HUB) :]
    path, _, query = rest.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(params) - {"split", "name", "revision"}
    if not path or "split" not in params or unknown:
        raise DataError(
            f"{field}: {spec!r} is not a hub dataset spec; write "
            "hf://<dataset>?split=<split>[&name=<config>][&revision=<rev>]"
            + (f" (unknown parameter(s): {sorted(unknown)})" if unknown else "")
        )
    return {"path": path, **params}


# ---------------------------------------------------------------- line-level decoding


def iter_lines(stream: IO[bytes], chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) for each line; CRLF and a leading BOM removed."""
    number, tail, first = 0, b"", True
    while True:
        chunk = stream.read(chunk_size)
        if not chunk:
            break
        if first:
            chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
        *lines, tail = (tail + chunk).split(b"\n")
        for line in lines:
            number += 1
            yield number, line[:-1] if line.endswith(b"\r") else line
    if tail:
        yield number + 1, tail[:-1] if tail.endswith(b"\r") else tail


def _decode(line: bytes) -> tuple[str, str | None]:
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError:
        return line.decode("utf-8", errors="backslashreplace"), "invalid_utf8"


# ------------------------------------------------------------------- format readers


def _read_jsonl(stream: IO[bytes]) -> Iterator[RawRecord]:
    """One JSON object per line. A line holding a whole SQuAD document (the official
    files are one line) becomes that document's questions, as `_read_squad` reads it."""
    questions = 0
    for number, line in iter_lines(stream):
        text, bad = _decode(line)
        if not text.strip():
            yield RawRecord(number, text, None, BLANK)
        elif bad:
            yield RawRecord(number, text, None, bad)
        else:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                yield RawRecord(number, text, None, "invalid_json")
                continue
            if is_squad_document(record):
                for question in squad_records(record, questions):
                    questions += 1
                    yield question
            elif isinstance(record, dict):
                yield RawRecord(number, text, record, None)
            else:
                yield RawRecord(number, text, None, "json_not_an_object")


def is_squad_document(record: Any) -> bool:
    """A SQuAD-format document: `{"data": [{"title", "paragraphs": [...]}, ...]}`."""
    if not isinstance(record, dict) or not isinstance(record.get("data"), list):
        return False
    return bool(record["data"]) and all(
        isinstance(a, dict) and isinstance(a.get("paragraphs"), list) for a in record["data"]
    )


def squad_records(document: dict[str, Any], before: int = 0) -> Iterator[RawRecord]:
    """One record per question: `{id, title, question, context, answers}` with answers
    as SQuAD writes them. The position (`_line`) is the question's ordinal in the file,
    1-based, since the document has no line per question."""
    number = before
    for article in document["data"]:
        title = article.get("title")
        for paragraph in article["paragraphs"]:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                number += 1
                raw = json.dumps(paragraph, ensure_ascii=False)[:2000]
                yield RawRecord(number, raw, None, "squad_paragraph_without_qas")
                continue
            for qa in qas:
                number += 1
                if not isinstance(qa, dict):
                    yield RawRecord(number, json.dumps(qa)[:2000], None, "json_not_an_object")
                    continue
                record = {
                    "id": qa.get("id"),
                    "title": title,
                    "question": qa.get("question"),
                    "context": context,
                    "answers": qa.get("answers"),
                }
                raw = json.dumps({"title": title, **qa}, ensure_ascii=False)
                yield RawRecord(number, raw, record, None)


def _read_squad(stream: IO[bytes]) -> Iterator[RawRecord]:
    """A SQuAD JSON file, also pretty-printed: parsed whole (SQuAD files are tens of MB
    at most, and JSON has no record boundaries to stream by)."""
    text, bad = _decode(stream.read().removeprefix(b"\xef\xbb\xbf"))
    if bad:
        yield RawRecord(1, text[:2000], None, bad)
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        yield RawRecord(exc.lineno, text[:2000], None, "invalid_json")
        return
    if not is_squad_document(document):
        yield RawRecord(1, text[:2000], None, "not_a_squad_document")
        return
    yield from squad_records(document)


def _read_text(stream: IO[bytes]) -> Iterator[RawRecord]:
    for number, line in iter_lines(stream):
        text, bad = _decode(line)
        if not text.strip():
            yield RawRecord(number, text, None, BLANK)
        else:
            yield RawRecord(number, text, None if bad else {"text": text}, bad)


class _LineFeed:
    """Feeds decoded lines to csv.reader while remembering which physical lines (and
    decoding failures) make up the record it is assembling."""

    def __init__(self, lines: Iterable[tuple[int, bytes]]):
        self._lines = iter(lines)
        self.start = 0
        self.parts: list[str] = []
        self.bad: str | None = None

    def reset(self) -> None:
        self.start, self.parts, self.bad = 0, [], None

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        number, line = next(self._lines)
        text, bad = _decode(line)
        if not self.parts:
            self.start = number
        self.parts.append(text)
        self.bad = self.bad or bad
        return text + "\n"


def _read_delimited(stream: IO[bytes], delimiter: str) -> Iterator[RawRecord]:
    feed = _LineFeed(iter_lines(stream))
    # TSV fields cannot hold a tab, so quotes are literal text (as in GLUE's files).
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(feed, delimiter=delimiter, quoting=quoting, strict=False)
    header: list[str] | None = None
    while True:
        feed.reset()
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield RawRecord(feed.start, "\n".join(feed.parts), None, "malformed_csv")
            continue
        raw = "\n".join(feed.parts)
        if not row or not any(cell.strip() for cell in row):
            yield RawRecord(feed.start, raw, None, BLANK)
        elif header is None:
            header = [h.strip() for h in row]
        elif feed.bad:
            yield RawRecord(feed.start, raw, None, feed.bad)
        elif len(row) != len(header):
            yield RawRecord(feed.start, raw, None, "wrong_field_count")
        else:
            yield RawRecord(feed.start, raw, dict(zip(header, row, strict=True)), None)


def _rows_as_records(rows: Iterable[dict[str, Any]]) -> Iterator[RawRecord]:
    """Already-structured rows (Parquet, Arrow, `datasets`), numbered from 1."""
    for number, row in enumerate(rows, start=1):
        yield RawRecord(number, json.dumps(row, ensure_ascii=False, default=str), row, None)


def _read_parquet(stream: IO[bytes]) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(stream).iter_batches(batch_size=BLOCK_ROWS)
    return _rows_as_records(row for batch in batches for row in batch.to_pylist())


def _read_arrow(stream: IO[bytes]) -> Iterator[RawRecord]:
    import pyarrow.ipc as ipc

    batches = ipc.open_stream(stream)
    return _rows_as_records(row for batch in batches for row in batch.to_pylist())


def _conll_sentence(lines: list[tuple[int, str, str | None]]) -> RawRecord:
    first = lines[0][0]
    raw = "\n".join(text for _, text, _ in lines)
    bad = next((b for _, _, b in lines if b), None)
    if bad:
        return RawRecord(first, raw, None, bad)
    tokens, tags = [], []
    for _, text, _ in lines:
        cells = text.split("\t") if "\t" in text else text.split()
        cells = [c.strip() for c in cells]
        if len(cells) < 2 or not cells[0] or not cells[-1]:
            return RawRecord(first, raw, None, "conll_line_without_tag")
        tokens.append(cells[0])
        tags.append(cells[-1])
    return RawRecord(first, raw, {"tokens": tokens, "tags": tags}, None)


def _read_conll(stream: IO[bytes]) -> Iterator[RawRecord]:
    """CoNLL columns: a word per line, its token first and its tag last (tab- or
    space-separated); a blank line (or one of only whitespace) ends a sentence, which is
    one record, numbered by its first line. `-DOCSTART-` lines are not records."""
    sentence: list[tuple[int, str, str | None]] = []
    for number, line in iter_lines(stream):
        text, bad = _decode(line)
        if not text.strip() or text.startswith("-DOCSTART-"):
            if sentence:
                yield _conll_sentence(sentence)
                sentence = []
            if text.strip():
                yield RawRecord(number, text, None, BLANK)  # counted apart, like blank lines
            continue
        sentence.append((number, text, bad))
    if sentence:
        yield _conll_sentence(sentence)


READERS: dict[str, Callable[[IO[bytes]], Iterator[RawRecord]]] = {
    "conll": _read_conll,
    "jsonl": _read_jsonl,
    "text": _read_text,
    "csv": lambda s: _read_delimited(s, ","),
    "tsv": lambda s: _read_delimited(s, "\t"),
    "parquet": _read_parquet,
    "arrow": _read_arrow,
    "squad": _read_squad,
}


def iter_records(stream: IO[bytes], path: str, forced: str | None = None) -> Iterator[RawRecord]:
    fmt = detect_format(path, forced)
    if fmt is None:
        raise DataError(f"cannot tell the format of {path} from its extension")
    return READERS[fmt](stream)


def open_local(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def peek_columns(
    path: str, max_lines: int = 1000, forced: str | None = None
) -> tuple[list[str] | None, bool]:
    """(columns of the first parsable record, whether the file holds any non-blank row)."""
    if "://" in path:
        return None, True  # remote and hub sources are checked by the workers
    with open_local(path) as stream:
        seen_row = False
        for i, rec in enumerate(iter_records(stream, path, forced)):
            if rec.reason != BLANK:
                seen_row = True
            if rec.record is not None:
                return list(rec.record), True
            if i >= max_lines:
                break
    return None, seen_row


# ----------------------------------------------------------------------- Ray Datasource


def _block(path: str, rows: list[RawRecord]) -> pa.Table:
    return pa.table(
        {
            "_source": [path] * len(rows),
            "_line": [r.line for r in rows],
            "_raw": [r.raw for r in rows],
            "_record": [
                None if r.record is None else json.dumps(r.record, ensure_ascii=False, default=str)
                for r in rows
            ],
            "_reason": [r.reason for r in rows],
        },
        schema=SCHEMA,
    )


def _blocks(source: str, records: Iterable[RawRecord]) -> Iterator[pa.Table]:
    """Records of one source -> Arrow blocks of up to BLOCK_ROWS rows."""
    rows: list[RawRecord] = []
    for record in records:
        rows.append(record)
        if len(rows) >= BLOCK_ROWS:
            yield _block(source, rows)
            rows = []
    if rows:
        yield _block(source, rows)


def _records_datasource_class():
    # Imported lazily: Ray is heavy and this module is used by `rayft validate` too.
    from ray.data.datasource import FileBasedDatasource

    class RecordsDatasource(FileBasedDatasource):
        """Any supported format -> rows with provenance, streamed block by block."""

        def __init__(self, paths: list[str], forced: str | None = None):
            super().__init__(paths)
            self.forced = forced

        def _open_input_source(self, filesystem, path, **open_args):
            if detect_format(path, self.forced) == "parquet":  # random access to its footer
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            return _blocks(path, iter_records(f, path, self.forced))

    return RecordsDatasource


def _hub_datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class HubDatasource(Datasource):
        """A `datasets` dataset read as a stream, one read task per shard of its files."""

        def __init__(self, spec: str):
            self.spec = spec

        def _load(self):
            import datasets

            return datasets.load_dataset(**parse_hub(self.spec, "data"), streaming=True)

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            shards = max(1, min(parallelism, self._load().num_shards))
            return [
                ReadTask(
                    lambda index=index: self._read_shard(index, shards),
                    BlockMetadata(None, None, None, input_files=(self.spec,)),
                    per_task_row_limit=per_task_row_limit,
                )
                for index in range(shards)
            ]

        def _read_shard(self, index: int, shards: int) -> Iterator[pa.Table]:
            source = self.spec if shards == 1 else f"{self.spec}#shard={index}"
            stream = self._load().shard(num_shards=shards, index=index)
            return _blocks(source, _rows_as_records(stream))

    return HubDatasource


def read_records(paths: list[str], forced: str | None = None):
    """A Ray Dataset of raw records (schema ``SCHEMA``) from files of any supported format
    (`forced`: `data.format`), and hub datasets (``hf://...``)."""
    import ray.data

    files = [p for p in paths if not p.startswith(HUB)]
    source = _records_datasource_class()
    parts = [ray.data.read_datasource(source(files, forced))] if files else []
    hub = _hub_datasource_class()
    parts += [ray.data.read_datasource(hub(p)) for p in paths if p.startswith(HUB)]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
