"""Named-entity recognition (`task: token_classification`): the CoNLL reader, word to
sub-token alignment, entity-level scores checked by hand, and a toy run that learns."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

from rayft.config import validate_config
from rayft.data.read import BLANK, iter_records
from rayft.tasks.entities import check_tags, entity_scores, spans
from tests.conftest import SHARED_DATA

WNUT = SHARED_DATA / "wnut17"


# ---------------------------------------------------------------------------- metrics


def test_spans_follow_each_scheme():
    assert spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # IOB1: I- opens an entity; B- only separates two adjacent ones of a type.
    assert spans(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == [
        ("PER", 0, 1),
        ("PER", 2, 2),
        ("LOC", 4, 4),
    ]
    # BIOES: S- is a whole entity, E- closes one (and opens one after O).
    assert spans(["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "E-ORG"]) == [
        ("PER", 0, 0),
        ("LOC", 1, 3),
        ("ORG", 5, 5),
    ]
    # A type change inside an entity ends it and starts another.
    assert spans(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert spans(["O", "O"]) == []
    assert check_tags(["O", "B-PER", "E-PER"], "IOB2") == "E-PER"
    assert check_tags(["O", "B-PER", "E-PER"], "BIOES") is None
    assert check_tags(["B-"], "IOB2") == "B-"
    assert check_tags(["PER"], "IOB1") == "PER"


def test_entity_scores_match_hand_counts():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG"]]
    # Entities: gold PER(0-1) LOC(3) ORG(1); predicted PER(0) LOC(3) ORG(0-1): one exact hit.
    scores = entity_scores(pred, gold)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    assert scores["token_accuracy"] == pytest.approx(3 / 6)  # 3 of 4, then 0 of 2
    per_type = scores["per_type"]
    assert per_type["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per_type["PER"]["f1"] == 0.0 and per_type["PER"]["support"] == 1
    assert per_type["ORG"]["precision"] == 0.0
    # Two of three found, one spurious: P 2/3, R 2/3.
    scores = entity_scores([["B-PER", "O", "B-LOC", "B-ORG"]], [["B-PER", "O", "B-LOC", "O"]])
    assert (scores["precision"], scores["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert scores["f1"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="2 predicted tags for 3 words"):
        entity_scores([["O", "O"]], [["O", "O", "O"]])


# ----------------------------------------------------------------------------- reader


def read(text: str, path: str = "x.conll", forced: str | None = None) -> list:
    return list(iter_records(io.BytesIO(text.encode()), path, forced))


def test_conll_reader_sentences_docstart_separators_and_bad_lines():
    text = (
        "-DOCSTART- -X- O O\n"
        "\n"
        "EU NNP B-NP B-ORG\n"  # space-separated, tag in the last column
        "rejects VBZ B-VP O\n"
        "\t\n"  # a separator holding only a tab, as in WNUT's train file
        "Peter\tB-person\n"
        "Blackburn\tI-person\n"
        "\n"
        "\n"
        "lonely\n"  # no tag column: the whole sentence is quarantined, by its first line
        "word\tO\n"
    )
    records = read(text)
    assert [r.reason for r in records] == [BLANK, None, None, "conll_line_without_tag"]
    assert [r.line for r in records] == [1, 3, 6, 10]
    assert records[1].record == {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}
    assert records[2].record == {"tokens": ["Peter", "Blackburn"], "tags": ["B-person", "I-person"]}
    assert records[3].raw == "lonely\nword\tO"
    # data.format names the reader for an extension that says nothing.
    assert read("a\tO\n", "emerging.test.annotated", "conll")[0].record == {
        "tokens": ["a"],
        "tags": ["O"],
    }


@pytest.mark.skipif(not WNUT.is_dir(), reason="../shared/data/wnut17 is not present")
def test_wnut17_files_read_to_the_documented_sentence_counts():
    expected = {"wnut17train.conll": 3394, "emerging.dev.conll": 1009}
    expected["emerging.test.annotated"] = 1287
    for name, sentences in expected.items():
        with open(WNUT / name, "rb") as stream:
            records = list(iter_records(stream, name, "conll"))
        assert all(r.reason is None for r in records), name
        assert len(records) == sentences, name


# -------------------------------------------------------------------------- alignment


def test_first_subtoken_carries_the_tag_and_the_rest_are_ignored(tmp_path):
    import numpy as np

    from rayft.modeling import load_tokenizer
    from rayft.tasks.common import IGNORE_INDEX as IGNORE
    from rayft.tasks.token_classification import tokenize
    from tests.fixtures.models import tiny_bert

    # "newyork" is not in the vocabulary, "new" is: it splits into new + ##york.
    model = tiny_bert(tmp_path / "m", ["alice", "in", "new", "##york"])
    base = {"model": {"name_or_path": model}, "data": {"train": "t.conll", "eval": "e.conll"}}
    batch = {
        "tokens": np.array([np.array(["alice", "in", "newyork"])], dtype=object),
        "tags": np.array([np.array(["B-PER", "O", "B-LOC"])], dtype=object),
    }
    label2id = {"B-LOC": 0, "B-PER": 1, "I-LOC": 2, "I-PER": 3, "O": 4}
    for label_all, expected in ((False, [1, 4, 0, IGNORE]), (True, [1, 4, 0, 2])):
        cfg = validate_config(
            {**base, "task": "token_classification", "data": {**base["data"],
             "label_all_subtokens": label_all}}
        )  # fmt: skip
        out = tokenize(batch, load_tokenizer(cfg), cfg, label2id)
        # [CLS] alice in new ##york [SEP]
        assert out["labels"][0].tolist() == [IGNORE, *expected, IGNORE]
        assert out["word_pos"][0].tolist() == [0, 1, 2, 3, 0, 0]
        assert out["gold"][0].tolist() == [1, 4, 0]


# ---------------------------------------------------------------------- a toy that learns

PEOPLE = ["alice", "bob", "carol", "dave"]
PLACES = [["paris"], ["london"], ["new", "york"], ["rio", "de", "janeiro"]]
FILLER = ["met", "visited", "saw", "the", "a", "in", "today", "then", "we", "went"]


def ner_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(2, 4)):
            kind = rng.choice(["filler", "filler", "person", "place"])
            if kind == "person":
                tokens.append(rng.choice(PEOPLE))
                tags.append("B-person")
            elif kind == "place":
                words = rng.choice(PLACES)
                tokens += words
                tags += ["B-location"] + ["I-location"] * (len(words) - 1)
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_conll(path: Path, rows: list[dict]) -> str:
    lines = []
    for row in rows:
        lines += [f"{t}\t{g}" for t, g in zip(row["tokens"], row["tags"], strict=True)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_toy_ner_learns_with_lora_on_zero3(tmp_path, ray_session):
    from rayft.trainer import fit
    from tests.fixtures.models import tiny_bert

    words = PEOPLE + [w for p in PLACES for w in p] + FILLER
    model = tiny_bert(tmp_path / "tiny-ner", words)
    train = write_conll(tmp_path / "train.conll", ner_rows(240, seed=0))
    eval_rows = ner_rows(40, seed=1)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    test = write_conll(tmp_path / "test.conll", ner_rows(30, seed=2))
    cfg = validate_config(
        {
            "task": "token_classification",
            "method": "lora",
            "model": {"name_or_path": model},
            "data": {"train": train, "eval": str(tmp_path / "eval.jsonl"), "test": test,
                     "dedup": {"exact": False, "near": False, "remove_contaminated": False}},
            "output_dir": str(tmp_path / "out"),
            "scaling": {"num_workers": 2},
            "deepspeed": {"stage": 3},
            "train": {"epochs": 4, "batch_size": 8, "lr": 1e-2, "log_every_steps": 20},
            "lora": {"r": 8, "alpha": 16},  # target modules: peft's default for BERT
            "eval": {"baselines": ["majority", "pretrained"]},  # forgetting: measured
        }
    )  # fmt: skip
    metrics = fit(cfg)
    assert metrics["baselines"]["majority"]["f1"] == 0.0
    assert metrics["f1"] > 0.9, metrics
    # data.test is scored once by the final model, apart from eval.
    assert metrics["test_rows"] == 30 and metrics["test_f1"] > 0.9, metrics
    assert "test_per_type" in metrics and "test_loss" in metrics
    assert metrics["per_type"]["location"]["support"] == sum(
        t == "B-location" for r in eval_rows for t in r["tags"]
    )
    history = [json.loads(line) for line in (tmp_path / "out/history.jsonl").open()]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    predictions = [json.loads(line) for line in (tmp_path / "out/eval_predictions.jsonl").open()]
    assert len(predictions) == 40
    assert predictions[0]["tags"] == eval_rows[0]["tags"]
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["labels"]["train"]["B-person"] > 0
    # The exported model tags a sentence on its own, as transformers loads it.
    from transformers import AutoModelForTokenClassification

    adapter = json.loads((tmp_path / "out/adapter/adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and set(adapter["target_modules"]) == {"query", "value"}
    exported = AutoModelForTokenClassification.from_pretrained(tmp_path / "out/model")
    assert exported.config.id2label[0] == "B-location"
    # `rayft export` of the final checkpoint: ZeRO-3 shards consolidated; merged, the
    # model equals the run's own export; unmerged, the adapter on the base equals it too.
    from peft import PeftModel

    from rayft.cli import main

    checkpoint = metrics["checkpoint_path"]
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    assert (
        main(["export", "--checkpoint", checkpoint, "--out", str(merged_dir), "--merge-lora"]) == 0
    )
    assert main(["export", "--checkpoint", checkpoint, "--out", str(adapter_dir)]) == 0
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    with torch.no_grad():
        reference = exported.eval()(input_ids=ids).logits
        merged = AutoModelForTokenClassification.from_pretrained(merged_dir).eval()
        assert torch.allclose(merged(input_ids=ids).logits, reference, atol=1e-5)
        base = AutoModelForTokenClassification.from_pretrained(
            model, num_labels=exported.config.num_labels
        )
        tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
        assert torch.allclose(tuned(input_ids=ids).logits, reference, atol=1e-5)
