"""Reading and preparing data: formats, provenance, labels, and errors that name the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayft.config import resolve_paths, validate_config
from rayft.data.prepare import check_sources, prepare
from rayft.data.read import BLANK, DataError, expand_sources, iter_records, open_local
from rayft.tasks.common import canonical_label, sort_labels


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def records(path) -> list:
    with open_local(str(path)) as stream:
        return list(iter_records(stream, str(path)))


def test_jsonl_bom_crlf_blank_and_bad_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "one", "label": 1}\r\n'
        b"\r\n"
        b"{not json\n"
        b"[1, 2]\n"
        b'{"text": "caf\xc3\xa9", "label": "x"}\n'
        b'{"text": "\xff\xfe", "label": 0}\n'
        b'{"text": "no newline", "label": 0}'
    )
    got = [(r.line, r.reason, r.record) for r in records(path)]
    assert got == [
        (1, None, {"text": "one", "label": 1}),
        (2, BLANK, None),
        (3, "invalid_json", None),
        (4, "json_not_an_object", None),
        (5, None, {"text": "café", "label": "x"}),
        (6, "invalid_utf8", None),
        (7, None, {"text": "no newline", "label": 0}),
    ]
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert [(r.line, r.reason) for r in records(gz)] == [(g[0], g[1]) for g in got]


def test_csv_quotes_multiline_field_counts_and_tsv_literal_quotes(tmp_path):
    csv_path = tmp_path / "b.csv"
    csv_path.write_text(
        'text,label\r\n"hello, ""world""",pos\r\n"two\nlines",neg\nshort\n\nlast,pos\n',
        newline="",
    )
    got = [(r.line, r.reason, r.record) for r in records(csv_path)]
    assert got == [
        (2, None, {"text": 'hello, "world"', "label": "pos"}),
        (3, None, {"text": "two\nlines", "label": "neg"}),
        (5, "wrong_field_count", None),
        (6, BLANK, None),
        (7, None, {"text": "last", "label": "pos"}),
    ]
    tsv = tmp_path / "c.tsv"
    tsv.write_text('sentence\tlabel\nit \'s a "gem" \t1\n')
    assert records(tsv)[0].record == {"sentence": 'it \'s a "gem" ', "label": "1"}


def test_parquet_rows_are_numbered(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    assert [(r.line, r.record) for r in records(path)] == [
        (1, {"text": "a", "label": 0}),
        (2, {"text": "b", "label": 1}),
    ]


def test_labels_are_canonical_strings_sorted_numerically_when_integers():
    assert [canonical_label(v) for v in (1, 1.0, "1", " pos ", True, 1.5, "", None)] == [
        "1", "1", "1", "pos", None, None, None, None,
    ]  # fmt: skip
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_labels(["World", "Sci/Tech", "Business"]) == ["Business", "Sci/Tech", "World"]


def _cfg(tmp_path, train, eval_, model="unused", **data):
    raw = {
        "model": {"name_or_path": model},
        "data": {"train": train, "eval": eval_, **data},
        "output_dir": str(tmp_path / "out"),
    }
    return resolve_paths(validate_config(raw))


def test_source_errors_name_the_field_file_and_fix(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine", "label": "a"}\n')
    with pytest.raises(DataError, match=r"data.train: file .*missing.jsonl does not exist"):
        check_sources(_cfg(tmp_path, str(tmp_path / "missing.jsonl"), str(good)))
    with pytest.raises(DataError, match=r"data.eval: glob .* matches no files"):
        check_sources(_cfg(tmp_path, str(good), str(tmp_path / "nope-*.jsonl")))
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("review,score\ngreat,5\n")
    with pytest.raises(DataError) as info:
        check_sources(_cfg(tmp_path, str(reviews), str(good), label_column="sentiment"))
    message = str(info.value)
    assert "data.text_column 'text' not found in reviews.csv (columns: review, score)" in message
    assert "data.columns" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"data.eval: .*empty.jsonl is empty \(no rows\)"):
        check_sources(_cfg(tmp_path, str(good), str(empty)))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format of .*data.xlsx"):
        expand_sources(str(odd), "data.train")
    # Renaming a column makes it usable.
    assert check_sources(
        _cfg(tmp_path, str(reviews), str(good), columns={"review": "text", "score": "label"})
    )


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prepare_counts_every_row_maps_labels_and_quarantines(tmp_path, ray_session, tiny_model):
    train = _write(
        tmp_path / "train.jsonl",
        [
            {"text": "stocks rally", "label": "Business"},
            {"text": "new chip", "label": "Sci/Tech"},
            "",
            "{broken",
            {"text": "   ", "label": "World"},
            {"text": 42, "label": "World"},
            {"label": "World"},
            {"text": "cup final", "label": "Sports"},
            {"text": "summit", "label": "World"},
            {"text": "no label"},
        ],
    )
    eval_ = _write(tmp_path / "eval.jsonl", [{"text": "x", "label": "Sports"}])
    cfg = _cfg(tmp_path, train, eval_, model=tiny_model, max_bad_fraction=1.0)
    prepared = prepare(cfg)
    assert prepared.labels == ["Business", "Sci/Tech", "Sports", "World"]
    split = prepared.report["splits"]["train"]
    assert split["read"] == 9 and split["blank_lines"] == 1
    assert split["kept"] == 4
    assert split["quarantined"] == {
        "invalid_json": 1,
        "empty_text": 1,
        "text_not_a_string": 1,
        "missing_text": 1,
        "missing_label": 1,
    }
    assert split["read"] == split["kept"] + sum(split["quarantined"].values())
    quarantine = read_jsonl(tmp_path / "out/quarantine/train.jsonl")
    assert sorted((q["line"], q["reason"]) for q in quarantine) == [
        (4, "invalid_json"),
        (5, "empty_text"),
        (6, "text_not_a_string"),
        (7, "missing_text"),
        (10, "missing_label"),
    ]
    assert all(q["source"] == train and q["raw"] for q in quarantine)
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["labels"]["train"]["World"] == 1
    # Same config and files: the prepared shards are reused, not recomputed.
    assert prepare(cfg).reused


def test_the_data_stage_runs_a_task_per_core_where_ray_counts_more_cpus(ray_session):
    """The session's Ray counts 6 logical CPUs on this 2-core machine (room for workers
    and streaming): the data stage is held to the cores, and a lower limit stays."""
    import ray.data

    from rayft.data.prepare import data_stage_cpu_cap, machine_cores, one_task_per_core

    options = ray.data.DataContext.get_current().execution_options
    before = options.resource_limits
    cores = machine_cores()
    expected = cores if ray_session.cluster_resources()["CPU"] > cores else None
    assert data_stage_cpu_cap() == expected
    with one_task_per_core():
        assert options.resource_limits.cpu == (expected or before.cpu)
    assert options.resource_limits.cpu == before.cpu  # restored
    options.resource_limits = before.copy(cpu=1)
    try:
        with one_task_per_core():
            assert options.resource_limits.cpu == 1
    finally:
        options.resource_limits = before


def test_unseen_eval_label_is_an_error_naming_label_file_and_line(
    tmp_path, ray_session, tiny_model
):
    train = _write(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    eval_ = _write(tmp_path / "e.jsonl", [{"text": "c", "label": 1}, {"text": "d", "label": 2}])
    with pytest.raises(DataError) as info:
        prepare(_cfg(tmp_path, train, eval_, model=tiny_model))
    message = str(info.value)
    assert "data.eval label '2'" in message and f"{eval_} line 2" in message
    assert "never occurs in data.train (labels: 0, 1)" in message
    # Declaring the full label set instead turns the rows outside it into quarantine.
    prepared = prepare(
        _cfg(tmp_path, train, eval_, model=tiny_model, labels=[0, 1], max_bad_fraction=1)
    )
    assert prepared.report["splits"]["eval"]["quarantined"] == {"label_not_allowed": 1}
    assert prepared.labels == ["0", "1"]


def test_a_split_with_no_usable_rows_fails_with_the_reasons(tmp_path, ray_session, tiny_model):
    train = _write(tmp_path / "t.jsonl", ["{bad", {"text": "", "label": 1}])
    eval_ = _write(tmp_path / "e.jsonl", [{"text": "c", "label": 1}])
    with pytest.raises(DataError, match=r"data.train: no usable rows .*invalid_json \(1\)"):
        prepare(_cfg(tmp_path, train, eval_, model=tiny_model, max_bad_fraction=1))


def test_a_label_is_matched_whole_or_as_a_tag_of_a_sequence():
    from rayft.data.prepare import _holds_label

    assert _holds_label("1", "1") and not _holds_label("10", "1")  # not a substring search
    assert _holds_label(["O", "B-person"], "B-person") and not _holds_label(["O"], "B")
    assert not _holds_label(None, "1")
