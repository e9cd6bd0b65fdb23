"""The data stage as a corpus pipeline: cleaning, filters, deduplication, contamination,
splitting, every reader, and a report that accounts for every row."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayft import cli
from rayft.config import CleanConfig, resolve_paths, validate_config
from rayft.data.clean import clean_text, dedup_text, split_of
from rayft.data.prepare import prepare
from rayft.data.read import DataError, expand_sources
from rayft.data.synth import synthesize

VOCAB = (
    "plot cast music scene actor camera pacing script dialogue score editing villain hero "
    "world book season episode audience theatre warm dull sharp slow bright odd grim"
).split()
LONG = "A terrible film dull and far too long for its story " * 5


def _cfg(tmp_path, train, eval_=None, model="unused", **data):
    raw = {
        "model": {"name_or_path": model},
        "data": {"train": train, "eval": eval_, **data},
        "output_dir": str(tmp_path / "out"),
    }
    return resolve_paths(validate_config(raw))


def _lines(path: Path, lines: list) -> str:
    blob = b"".join(
        (x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode())
        + b"\n"
        for x in lines
    )
    path.write_bytes(blob)
    return str(path)


def _kept_texts(split_dir: str) -> list[str]:
    return pq.read_table(split_dir, columns=["text"]).column("text").to_pylist()


def test_cleaning_steps_and_keys():
    clean = CleanConfig(strip_html=True)
    text, steps = clean_text("<p>Cafe\u0301&amp;  bar</p>\u200b\x07 ok", clean)
    assert text == "Café& bar ok"
    assert steps == ["strip_html", "unicode", "remove_control", "collapse_whitespace"]
    assert clean_text("plain text", CleanConfig()) == ("plain text", [])
    assert dedup_text("  The   MOVIE\tis ﬁne ") == "the movie is fine"
    # The split of a text is a pure function of its bytes: pinned, so it holds everywhere.
    fractions = {"train": 0.9, "eval": 0.1}
    eval_rows = [i for i in range(12) if split_of(f"row {i}", fractions) == "eval"]
    assert eval_rows == [7, 10]  # BLAKE2b of the text: the same on every machine and run


def test_bad_row_fixture_report_adds_up_exactly(tmp_path, ray_session, tiny_model):
    """Every kind of unusable, filtered and duplicate row once; the report must account
    for each of them, and quarantine/ must hold the quarantined ones with line numbers."""
    base = "The movie was wonderful and moving from start to end of it all"
    train = _lines(
        tmp_path / "train.jsonl",
        [
            {"text": base, "label": "pos"},  # 1 kept
            "",  # 2 blank line: not a row
            "{broken",  # 3 invalid_json
            "[1, 2]",  # 4 json_not_an_object
            {"text": None, "label": "pos"},  # 5 missing_text (null)
            {"label": "neg"},  # 6 missing_text
            {"text": 42, "label": "neg"},  # 7 text_not_a_string
            {"text": "   ", "label": "neg"},  # 8 empty_text
            {"text": "\u200b\x07", "label": "neg"},  # 9 empty_after_cleaning
            {"text": "A fine film with a story", "label": "meh"},  # 10 label_not_allowed
            {"text": base.upper().replace(" ", "  "), "label": "pos"},  # 11 duplicate_exact
            {"text": base + "!", "label": "pos"},  # 12 duplicate_near
            {"text": "ok", "label": "neg"},  # 13 too_short_chars
            {"text": LONG * 2, "label": "neg"},  # 14 too_long_chars
            {"text": "great", "label": "pos"},  # 15 too_short_tokens
            b'{"text": "caf\xe9 \xff", "label": "neg"}',  # 16 invalid_utf8
            {"text": "Acting was  superb although the plot felt thin", "label": "neg"},  # 17 kept
            {"text": "An instant classic that I will watch again and again", "label": "pos"},  # 18
            {"text": "Boring characters and a predictable plot ruined it all.", "label": "neg"},
            {"text": LONG[:150], "label": "neg"},  # 20 too_long_tokens
            {"text": "Gorgeous photography but the dialogue is clumsy", "label": "neg"},  # 21 kept
        ],
    )
    eval_ = _lines(
        tmp_path / "eval.jsonl",
        [
            {"text": "An instant classic that I will watch again and again", "label": "pos"},
            {"text": "Boring characters and a predictable plot ruined it all", "label": "neg"},
            {"text": "A warm funny story with a lovely cast", "label": "pos"},
            "{bad",
        ],
    )
    cfg = _cfg(
        tmp_path, train, eval_, model=tiny_model, labels=["neg", "pos"], min_chars=5,
        max_chars=200, min_tokens=4, max_tokens=16, overlong="drop", max_bad_fraction=0.5,
    )  # fmt: skip
    prepared = prepare(cfg)
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    t = report["splits"]["train"]
    assert t["blank_lines"] == 1 and t["read"] == 20
    assert t["quarantined"] == {
        "missing_text": 2, "invalid_json": 1, "json_not_an_object": 1, "text_not_a_string": 1,
        "empty_text": 1, "empty_after_cleaning": 1, "label_not_allowed": 1, "invalid_utf8": 1,
    }  # fmt: skip
    assert t["filtered"] == {
        "too_short_chars": 1, "too_long_chars": 1, "too_short_tokens": 1, "too_long_tokens": 1
    }  # fmt: skip
    assert t["deduplicated"] == {
        "duplicate_exact": 1, "duplicate_near": 1, "contamination_exact": 1,
        "contamination_near": 1,
    }  # fmt: skip
    assert t["kept"] == 3 and prepared.rows == {"train": 3, "eval": 3}
    assert t["cleaned"] == {"collapse_whitespace": 5, "remove_control": 1}
    # The identity, per split and for the corpus.
    for entry in report["splits"].values():
        lost = sum(sum(entry[k].values()) for k in ("filtered", "deduplicated", "quarantined"))
        assert entry["read"] == entry["kept"] + lost
    assert (
        report["read"]
        == 24
        == report["kept"]
        + sum(report[k]["total"] for k in ("filtered", "deduplicated", "quarantined"))
    )
    assert report["deduplicated"]["exact"] == 2 and report["deduplicated"]["near"] == 2
    assert report["contamination"] == {"exact": 1, "near": 1}
    assert report["labels"] == {"train": {"neg": 2, "pos": 1}, "eval": {"pos": 2, "neg": 1}}
    assert sum(report["lengths"]["train"]["tokens"]["counts"]) == 3
    assert (tmp_path / "out/data_report.png").stat().st_size > 10_000
    quarantine = [json.loads(x) for x in (tmp_path / "out/quarantine/train.jsonl").open()]
    assert sorted(q["line"] for q in quarantine) == [3, 4, 5, 6, 7, 8, 9, 10, 16]
    assert all(q["source"] == train and q["raw"] and q["reason"] for q in quarantine)
    assert json.loads((tmp_path / "out/quarantine/eval.jsonl").read_text())["line"] == 4
    # The rows that were usable but do not train are listed too, with the row each
    # duplicate repeats: the first train row, or the eval row it contaminates.
    dropped = {d["line"]: d for d in map(json.loads, (tmp_path / "out/dropped/train.jsonl").open())}
    assert {line: d["reason"] for line, d in dropped.items()} == {
        11: "duplicate_exact", 12: "duplicate_near", 13: "too_short_chars", 14: "too_long_chars",
        15: "too_short_tokens", 18: "contamination_exact", 19: "contamination_near",
        20: "too_long_tokens",
    }  # fmt: skip
    assert dropped[13]["text"] == "ok" and "duplicate_of" not in dropped[13]
    assert len(dropped[14]["text"]) == 300  # the start of a long row, not all of it
    assert all(d["source"] == train for d in dropped.values())
    of = {line: dropped[line]["duplicate_of"] for line in (11, 12, 18, 19)}
    assert of[11] == {"source": train, "line": 1, "similarity": 1.0}
    assert (of[12]["source"], of[12]["line"]) == (train, 1) and 0.8 <= of[12]["similarity"] <= 1
    assert of[18] == {"source": eval_, "line": 1, "similarity": 1.0}
    assert (of[19]["source"], of[19]["line"]) == (eval_, 2) and 0.8 <= of[19]["similarity"] <= 1
    assert not (tmp_path / "out/dropped/eval.jsonl").exists()
    # What training reads is exactly the kept rows, cleaned.
    assert sorted(_kept_texts(prepared.splits["train"])) == [
        "Acting was superb although the plot felt thin",
        "Gorgeous photography but the dialogue is clumsy",
        "The movie was wonderful and moving from start to end of it all",
    ]

    # Over data.max_bad_fraction: fails before training, naming the file, the top
    # reasons and their line numbers (the prepared shards are reused: no recompute).
    with pytest.raises(DataError) as info:
        prepare(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_bad_fraction": 0.3})})
        )
    message = str(info.value)
    assert (
        f"{train}: 9 of 20 rows (45.0%) cannot be used, over data.max_bad_fraction=0.3" in message
    )
    assert "missing_text: 2 (lines 5, 6)" in message and "quarantine/" in message


def test_known_duplicates_across_splits_are_counted_and_removed_from_train(
    tmp_path, ray_session, tiny_model, monkeypatch
):
    """A synthetic corpus whose duplicates are known: within-split repeats match the
    generator's counts exactly, and eval rows copied into train are contamination. The
    first run takes the hash-shuffle path of large corpora, the second the one-task path."""
    from rayft.data import dedup

    monkeypatch.setattr(dedup, "SINGLE_TASK_ENTRIES", 0)
    manifest = synthesize(str(tmp_path / "train"), 1500, files=3, bad_rate=0.0, seed=3)
    evaluation = synthesize(str(tmp_path / "eval"), 60, files=1, duplicate_rate=0,
                            near_duplicate_rate=0, bad_rate=0, seed=4)  # fmt: skip
    eval_rows = [json.loads(x) for x in (tmp_path / "eval/part-0000.jsonl").open()]
    leaked = tmp_path / "train/part-0099.jsonl"
    _lines(leaked, [*eval_rows[:30], *({**r, "text": r["text"] + "!"} for r in eval_rows[30:50])])
    cfg = _cfg(tmp_path, str(tmp_path / "train"), str(tmp_path / "eval"), model=tiny_model)
    report = prepare(cfg).report
    train = report["splits"]["train"]
    assert train["deduplicated"]["contamination_exact"] == 30
    assert train["deduplicated"]["contamination_near"] == 20
    within = train["deduplicated"]["duplicate_exact"] + train["deduplicated"]["duplicate_near"]
    assert within == manifest["exact_duplicates"] + manifest["near_duplicates"]
    assert train["kept"] == manifest["unique"] and report["splits"]["eval"]["kept"] == 60
    # Each leaked eval row names the eval row it copies; every duplicate within train
    # names the row it repeats, which was kept or (a repeat of a near duplicate) is itself
    # listed, one link nearer a kept row.
    dropped = [json.loads(x) for x in (tmp_path / "out/dropped/train.jsonl").open()]
    assert len(dropped) == sum(train["deduplicated"].values())
    leaks = {(d["line"], d["duplicate_of"]["line"]) for d in dropped
             if d["reason"] == "contamination_exact"}  # fmt: skip
    assert leaks == {(i, i) for i in range(1, 31)}
    assert all(d["source"] == str(leaked) for d in dropped if d["reason"].startswith("contam"))
    assert all(d["duplicate_of"]["source"].startswith(str(tmp_path / "eval"))
               for d in dropped if d["reason"].startswith("contam"))  # fmt: skip
    listed = {(d["source"], d["line"]): d for d in dropped}
    within = [d for d in dropped if d["reason"].startswith("duplicate")]
    assert within
    for d in within:
        link, hops = d["duplicate_of"], 1
        while (link["source"], link["line"]) in listed:  # ends at a row that trains
            d, hops = listed[link["source"], link["line"]], hops + 1
            link = d["duplicate_of"]
            assert hops < 5 and d["reason"].startswith("duplicate"), d
        assert link["source"].startswith(str(tmp_path / "train"))
    assert evaluation["unique"] == 60
    # Counted either way; with remove_contaminated off the training rows stay.
    monkeypatch.undo()
    kept_cfg = _cfg(tmp_path, str(tmp_path / "train"), str(tmp_path / "eval"), model=tiny_model,
                    dedup={"remove_contaminated": False})  # fmt: skip
    report = prepare(kept_cfg).report
    train = report["splits"]["train"]
    assert train["contamination_kept"] == {
        "contamination_exact_kept": 30,
        "contamination_near_kept": 20,
    }
    assert train["kept"] == manifest["unique"] + 50
    assert report["contamination"] == {"exact": 30, "near": 20}


def test_every_reader_and_the_cli(tmp_path, ray_session, tiny_model):
    """jsonl, jsonl.gz, csv, tsv, parquet, a save_to_disk directory and a `datasets`
    dataset through hf://, in one corpus; the split carved by hash is stable, and
    `rayft data prepare` runs the same stage."""
    import datasets

    def rows(tag: str, n: int = 8) -> list[dict]:
        def text(i: int) -> str:
            rng = random.Random(f"{tag}-{i}")
            return f"{tag} {i}: " + " ".join(rng.choice(VOCAB) for _ in range(10))

        return [{"text": text(i), "label": i % 2} for i in range(n)]

    d = tmp_path / "corpus"
    d.mkdir()
    _lines(d / "a.jsonl", rows("jsonl"))
    (d / "b.jsonl.gz").write_bytes(
        gzip.compress(Path(_lines(tmp_path / "b", rows("gz"))).read_bytes())
    )
    csv_rows = rows("csv")
    (d / "c.csv").write_text(
        "text,label\r\n" + "".join(f'"{r["text"]}",{r["label"]}\r\n' for r in csv_rows)
    )
    (d / "d.tsv").write_text(
        "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows("tsv"))
    )
    pq.write_table(pa.Table.from_pylist(rows("parquet")), d / "e.parquet")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows("arrow")).save_to_disk(str(saved))
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    _lines(hub_dir / "train.jsonl", rows("hub"))
    hub = f"hf://{hub_dir}?split=train"
    assert len(expand_sources([str(d), str(saved), hub], "data.train")) == 7

    config = tmp_path / "prep.yaml"
    config.write_text(
        f"model: {{name_or_path: {tiny_model}}}\noutput_dir: {tmp_path / 'out'}\n"
        f"data:\n  train: [{d}, {saved}, '{hub}']\n  split: {{train: 0.75, eval: 0.25}}\n"
        "  max_chars: 40\n"
    )
    assert cli.main(["data", "prepare", "--config", str(config)]) == 0
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["read"] == report["kept"] == 56
    assert len(report["sources"]) == 7 and all(s["read"] == 8 for s in report["sources"].values())
    assert (
        report["splits"]["train"]["truncated"]["chars"]
        + report["splits"]["eval"]["truncated"]["chars"]
        == 56
    )
    # The carved split is a function of the text: recompute it independently.
    texts = [r["text"] for tag in ("jsonl", "gz", "csv", "tsv", "parquet", "arrow", "hub")
             for r in rows(tag)]  # fmt: skip
    carve = {"train": 0.75, "eval": 0.25}
    expected = sorted(t[:40] for t in texts if split_of(dedup_text(t), carve) == "eval")
    prepared_eval = sorted(_kept_texts(report["cache"] + "/rows/part=eval"))
    assert prepared_eval == expected and 0 < len(expected) < 56

    dict_dir = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("x"))}).save_to_disk(
        str(dict_dir)
    )
    with pytest.raises(DataError, match=r"is a saved DatasetDict with splits \['train'\]; point"):
        expand_sources(str(dict_dir), "data.train")
    with pytest.raises(DataError, match="not a hub dataset spec"):
        expand_sources("hf://imdb", "data.train")
