"""`rayft predict` and `rayft eval` on models exported by rayft's own `export_model`: rows
round-trip with their columns, predictions equal what transformers gives directly, bad
rows are quarantined and counted, eval reproduces the metrics by hand. QA and causal_lm
run the prediction actor in-process (no Ray), to keep the file short."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from rayft.cli import main
from rayft.config import validate_config
from rayft.data.read import SCHEMA, iter_records
from rayft.tasks import get_task
from rayft.tasks.entities import spans
from tests.fixtures.data import WORDS, sentiment_rows
from tests.fixtures.models import tiny_bert, tiny_decoder

LABELS = ["negative", "positive"]
TAGS = ["B-location", "B-person", "I-location", "I-person", "O"]
NER_WORDS = ["alice", "bob", "paris", "new", "york", "met", "in", "the", "we", "saw"]


def export(root: Path, backbone: str, task: str, labels: list[str], **data) -> Path:
    """A model directory exactly as `rayft train` exports it (`export_model`), holding
    seeded untrained weights; returns `<root>/model`."""
    from rayft.checkpoint import export_model
    from rayft.modeling import build_skeleton

    cfg = validate_config(
        {"task": task, "model": {"name_or_path": backbone}, "train": {"max_seq_len": 32},
         "data": {"train": "t.jsonl", "eval": "e.jsonl", **data}}
    )  # fmt: skip
    torch.manual_seed(0)
    state = build_skeleton(get_task(task), cfg, labels).state_dict()
    export_model(state, cfg, labels, [], str(root))
    return root / "model"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classifier")
    return export(root, tiny_bert(root / "base", WORDS), "sequence_classification", LABELS)


def direct(model_dir: Path, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) per text, from transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits, -1)
    score, index = probs.max(-1)
    return [(LABELS[i], s) for i, s in zip(index.tolist(), score.tolist(), strict=True)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- predict


def test_predict_jsonl_and_csv_round_trip_with_quarantine(
    tmp_path, ray_session, classifier, capsys
):
    good = [
        {"id": i, "text": r["text"], **({"label": r["label"]} if i % 3 else {}), "meta": {"k": [i]}}
        for i, r in enumerate(sentiment_rows(11, seed=3))
    ]  # fmt: skip
    lines = [json.dumps(r) for r in good[:4]]
    lines += [
        "{not json",
        "",
        json.dumps({"id": 90, "text": "   "}),
        json.dumps({"id": 91, "text": 7}),
    ]
    lines += [json.dumps({"id": 92, "label": "positive"})]
    lines += [json.dumps(r) for r in good[4:]]
    lines += [
        json.dumps({"id": 93, "text": good[0]["text"], "label": "not-a-label"})
    ]  # still predicted
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds" / "out.jsonl"
    argv = ["predict", "--model", str(classifier), "--input", str(source), "--output", str(out)]
    assert main([*argv, "--batch-size", "4"]) == 0

    expected_rows = [*good, {"id": 93, "text": good[0]["text"], "label": "not-a-label"}]
    predicted = read_jsonl(out)
    assert [
        {k: v for k, v in p.items() if k not in ("prediction", "score")} for p in predicted
    ] == (expected_rows)  # every input column unchanged, in input order
    reference = direct(classifier, [r["text"] for r in expected_rows])
    assert [p["prediction"] for p in predicted] == [label for label, _ in reference]
    assert [p["score"] for p in predicted] == pytest.approx([s for _, s in reference], abs=1e-4)
    quarantined = read_jsonl(tmp_path / "preds" / "out.quarantine.jsonl")
    assert [(q["line"], q["reason"]) for q in quarantined] == [
        (5, "invalid_json"), (7, "empty_text"), (8, "text_not_a_string"), (9, "missing_text"),
    ]  # fmt: skip
    assert quarantined[0]["raw"] == "{not json" and quarantined[0]["source"] == str(source)
    summary = capsys.readouterr().out
    assert "read 16 rows: predicted 12, quarantined 4 (" in summary
    assert "1 blank line(s) skipped" in summary and str(out) in summary

    # CSV in, CSV out: cells unchanged (strings), the broken row quarantined.
    table = tmp_path / "in.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        writer.writerows([[i, r["text"], r.get("label", "")] for i, r in enumerate(good[:5])])
        handle.write('5,"a row, with one field too many",positive,extra\n')
        writer.writerows([[i + 6, r["text"], ""] for i, r in enumerate(good[5:])])
    out_csv = tmp_path / "out.csv"
    assert main(["predict", "--model", str(classifier), "--input", str(table), "--output",
                 str(out_csv)]) == 0  # fmt: skip
    with out_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id", "text", "label", "prediction", "score"]
    assert [r["text"] for r in rows] == [r["text"] for r in good]
    assert [r["id"] for r in rows] == [str(i) for i in range(5)] + [str(i + 6) for i in range(6)]
    assert [r["prediction"] for r in rows] == [label for label, _ in reference[:11]]
    assert [float(r["score"]) for r in rows] == pytest.approx(
        [s for _, s in reference[:11]], abs=1e-4
    )
    assert [(q["line"], q["reason"]) for q in read_jsonl(tmp_path / "out.quarantine.jsonl")] == [
        (7, "wrong_field_count")
    ]


def test_cli_errors_name_the_path_and_exit_2(tmp_path, classifier, capsys):
    missing = tmp_path / "no-such-run" / "model"
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "the film was great"}) + "\n")
    assert main(["predict", "--model", str(missing), "--input", str(data), "--output",
                 str(tmp_path / "o.jsonl")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert str(missing) in err and "no such directory" in err and "<output_dir>/model" in err
    (tmp_path / "plain").mkdir()
    assert main(["eval", "--model", str(tmp_path / "plain"), "--data", str(data),
                 "--config", str(data)]) == 2  # fmt: skip
    assert "not a rayft export (no rayft.json in it)" in capsys.readouterr().err
    argv = ["predict", "--model", str(classifier), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--input", str(tmp_path / "absent.jsonl")]) == 2
    assert f"--input: file {tmp_path / 'absent.jsonl'} does not exist" in capsys.readouterr().err
    argv = ["predict", "--model", str(classifier), "--input", str(data)]
    assert main([*argv, "--output", str(tmp_path / "o.txt")]) == 2
    assert "end the file name with .jsonl, .csv, .parquet" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "o.jsonl"), "data.text_column=review"]) == 2
    assert "data.text_column 'review' not found in" in capsys.readouterr().err


# ------------------------------------------------------------------------------- eval


def test_eval_scores_labelled_rows_like_training_with_slices(tmp_path, ray_session, classifier):
    rows = [{**r, "group": "ab"[i % 3 == 0]} for i, r in enumerate(sentiment_rows(30, seed=5))]
    source = tmp_path / "holdout.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(7, json.dumps({"text": "the hotel was quite fine", "label": "neutral"}))
    source.write_text("\n".join(lines) + "\n")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": "some-base-model"},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_bad_fraction": 0.1,
                 "dedup": {"exact": False, "near": False}},
        "eval": {"slice_column": "group", "min_slice_rows": 5},
    }))  # fmt: skip
    argv = ["eval", "--model", str(classifier), "--data", str(source), "--config", str(config)]
    assert main(argv) == 0

    out = classifier.parent / "eval-holdout"  # the default: beside the model directory
    metrics = json.loads((out / "metrics.json").read_text())
    predicted = [label for label, _ in direct(classifier, [r["text"] for r in rows])]
    hits = [p == r["label"] for p, r in zip(predicted, rows, strict=True)]
    assert metrics["eval_rows"] == 30
    assert metrics["accuracy"] == pytest.approx(sum(hits) / 30)
    assert set(metrics) >= {"accuracy", "precision", "recall", "f1", "slices"}
    slices = metrics["slices"]["values"]
    for group in "ab":
        mine = [h for h, r in zip(hits, rows, strict=True) if r["group"] == group]
        assert slices[group]["rows"] == len(mine)
        assert slices[group]["accuracy"] == pytest.approx(sum(mine) / len(mine))
    assert metrics["slices"]["gap"] == pytest.approx(
        abs(slices["a"]["accuracy"] - slices["b"]["accuracy"])
    )
    described = read_jsonl(out / "eval_predictions.jsonl")
    assert [d["prediction"] for d in described] == predicted
    assert [d["label"] for d in described] == [r["label"] for r in rows]
    assert [d["line"] for d in described] == [i + 1 if i < 7 else i + 2 for i in range(30)]
    (bad,) = read_jsonl(out / "quarantine" / "train.jsonl")
    assert (bad["line"], bad["reason"]) == (8, "label_not_allowed")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(classifier)
    assert saved["data"]["labels"] == LABELS
    assert (out / "report.md").is_file() and (out / "data_report.json").is_file()


# ------------------------------------------- QA and causal_lm: the actor, in-process


def raw_table(path: Path, text: str) -> pa.Table:
    """Rows as `read_records` gives them to the actors."""
    path.write_text(text)
    with path.open("rb") as stream:
        records = list(iter_records(stream, str(path)))
    return pa.table(
        {
            "_source": [str(path)] * len(records),
            "_line": [r.line for r in records],
            "_raw": [r.raw for r in records],
            "_record": [None if r.record is None else json.dumps(r.record) for r in records],
            "_reason": [r.reason for r in records],
        },
        schema=SCHEMA,
    )


def actor(model: Path, *overrides: str, labelled: bool = False) -> object:
    """The actor of `rayft predict` (or with `labelled`, `rayft eval`), built as they
    build it, without Ray."""
    from rayft.inference import Predictor, inference_config, read_model_info

    info = read_model_info(str(model))
    cfg = inference_config(str(model), info, "x.jsonl", None, list(overrides))
    return Predictor(cfg.model_dump_json(), info["labels"], labelled, batch_size=4, gpu=False)


def test_question_answering_answers_from_the_best_window(tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from rayft.tasks import question_answering as qa

    words = ["we", "home", "new", "york", "where", "was", "it", "who", "came", "alice"]
    model = export(tmp_path, tiny_bert(tmp_path / "base", words), "question_answering", [],
                   doc_stride=8, max_question_tokens=8)  # fmt: skip
    long = " ".join(["we"] * 30 + ["new", "york"] + ["home"] * 30)  # three windows of 32
    rows = [{"question": "where was it", "context": long, "answers": []},
            {"question": "who came", "context": "alice came home"}, {"question": "who came"}]  # fmt: skip
    table = raw_table(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    predictor = actor(model, "data.doc_stride=8", "data.max_question_tokens=8")
    out = predictor(table).to_pylist()
    assert [r["_reason"] for r in out] == [None, None, "missing_context"]
    answers = [json.loads(r["_output"]) for r in out[:2]]
    # The long context's answer is its best window's span, found here by hand.
    tokenizer = AutoTokenizer.from_pretrained(model)
    enc = tokenizer("where was it", long, truncation="only_second", max_length=32, stride=8,
                    return_overflowing_tokens=True, return_offsets_mapping=True)  # fmt: skip
    assert len(enc["input_ids"]) == 3
    qa_model = AutoModelForQuestionAnswering.from_pretrained(model).eval()
    best = None
    for w in range(3):
        with torch.no_grad():
            logits = qa_model(input_ids=torch.tensor([enc["input_ids"][w]]),
                              token_type_ids=torch.tensor([enc["token_type_ids"][w]]))  # fmt: skip
        in_context = np.array([s == 1 for s in enc.sequence_ids(w)])
        span = qa.best_span(logits.start_logits[0].numpy(), logits.end_logits[0].numpy(),
                            in_context, 20, 30)  # fmt: skip
        if span and (best is None or span[0] > best[0]):
            offsets = enc["offset_mapping"][w]
            best = (span[0], long[offsets[span[1]][0] : offsets[span[2]][1]])
    assert answers[0]["answer"] == best[1]
    assert answers[0]["score"] == pytest.approx(best[0], abs=1e-4)
    assert answers[1]["answer"] in "alice came home"
    # `rayft eval`: prepared rows with answers score the same windows, one row per question.
    at = long.index("new york")
    prepared = pa.Table.from_pylist(
        [{"question": "where was it", "context": long, "answer_texts": ["new york"],
          "answer_starts": [at], "_source": "qa.jsonl", "_line": 1, "_slice": None}]
    )  # fmt: skip
    settings = ("data.doc_stride=8", "data.max_question_tokens=8")
    (scored,) = actor(model, *settings, labelled=True)(prepared).to_pylist()
    prediction = json.loads(scored["_prediction"])
    assert prediction[0] == pytest.approx(best[0], abs=1e-4)
    assert long[prediction[1] : prediction[2]] == best[1]
    assert json.loads(scored["_reference"]) == ["qa.jsonl:1", long, ["new york"]]
    metrics = qa.compute_metrics([prediction], [json.loads(scored["_reference"])], [])
    assert metrics["questions"] == 1 and metrics["exact_match"] == float(best[1] == "new york")


def test_token_classification_entities_follow_the_predicted_tags_into_parquet(tmp_path):
    import pyarrow.parquet as pq

    from rayft.data.write import RowWriter

    model = export(tmp_path, tiny_bert(tmp_path / "base", NER_WORDS), "token_classification", TAGS)
    rng = np.random.default_rng(0)
    rows = [
        {"tokens": [str(w) for w in rng.choice(NER_WORDS, rng.integers(2, 9))]} for _ in range(12)
    ]
    rows[3]["tags"] = ["O"] * len(rows[3]["tokens"])  # tags are allowed, and ignored
    lines = [json.dumps(r) for r in rows[:5]] + [json.dumps({"tokens": "alice met bob"})]
    lines += [json.dumps(r) for r in rows[5:]]
    out = actor(model)(raw_table(tmp_path / "sentences.jsonl", "\n".join(lines))).to_pylist()
    assert out[5]["_output"] is None and out[5]["_reason"] == "tokens_not_a_list_of_strings"
    predicted = [
        {**json.loads(r["_record"]), **json.loads(r["_output"])} for r in out if r["_output"]
    ]
    with RowWriter(str(tmp_path / "entities.parquet")) as writer:  # as `predict_file` writes
        writer.write(predicted[:4])
        writer.write(predicted[4:])
    written = pq.read_table(tmp_path / "entities.parquet").to_pylist()
    assert [r["tokens"] for r in written] == [r["tokens"] for r in rows]
    assert written[3]["tags"] == rows[3]["tags"] and written[0]["tags"] is None
    found = 0
    for row in written:
        tags = row["predicted_tags"]
        assert len(tags) == len(row["tokens"]) and set(tags) <= set(TAGS)
        assert [(e["type"], e["start"], e["end"] - 1) for e in row["entities"]] == spans(tags)
        for entity in row["entities"]:
            assert entity["text"] == " ".join(row["tokens"][entity["start"] : entity["end"]])
        found += len(row["entities"])
    assert found, "an untrained head still tags some words as entities"


def test_causal_lm_generates_from_the_training_prompt(tmp_path):
    from transformers import AutoModelForCausalLM

    from rayft.modeling import load_tokenizer
    from rayft.tasks import causal_lm as lm
    from tests.fixtures.models import CHAT_TEMPLATE

    words = ["what", "color", "is", "the", "sky", "blue", "grass", "green", "?"]
    base = tiny_decoder(tmp_path / "base", words, chat_template=CHAT_TEMPLATE)
    model = export(tmp_path, base, "causal_lm", [], chat_template="always")
    rows = [
        {"prompt": "what color is the sky ?"},
        {"instruction": "what color is the grass"},
        {"messages": [{"role": "user", "content": "the sky is"}]},
        {"prompt": "the grass is", "response": "green"},
        {"response": "blue"},
    ]
    table = raw_table(tmp_path / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    predictor = actor(model, "data.chat_template=always", "generate.max_new_tokens=6")
    out = predictor(table).to_pylist()
    assert [r["_reason"] for r in out] == [None] * 4 + ["no_prompt_instruction_or_messages"]
    generations = [json.loads(r["_output"])["generation"] for r in out[:4]]
    # Each prompt is what training's sample_prompts asks (the row with its answer), and
    # the batched, left-padded generation equals generating each prompt alone.
    cfg = predictor.cfg
    tokenizer = load_tokenizer(cfg)
    full = [{**rows[0], "response": "blue"}, {**rows[1], "output": "green"},
            {"messages": [*rows[2]["messages"], {"role": "assistant", "content": "blue"}]},
            rows[3]]  # fmt: skip
    decoder = AutoModelForCausalLM.from_pretrained(model).eval()
    for row, generation in zip(full, generations, strict=True):
        fields, _ = lm.extract(row, cfg.data)
        (prompt,) = lm.sample_prompts([{**fields, "_source": "s", "_line": 1}], tokenizer, cfg)
        ids = torch.tensor([lm.prompt_ids(prompt["prompt"], tokenizer, cfg)])
        alone = decoder.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=cfg.generate.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True)  # fmt: skip
        assert generation == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True)
