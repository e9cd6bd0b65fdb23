"""report.md / report.html / PNG plots from a run's files, built by hand: no Ray, no model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from rayft.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(out: Path, name: str, content: object) -> None:
    path = out / name
    if name.endswith(".yaml"):
        path.write_text(yaml.safe_dump(content))
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in content))
    else:
        path.write_text(json.dumps(content))


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _config(task: str, method: str, **eval_section: object) -> dict:
    return {
        "task": task,
        "method": method,
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
        "data": {"train": "reviews/train.jsonl", "eval": "reviews/eval.jsonl", "labels": None},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "deepspeed": {"stage": 2, "offload_optimizer": False, "precision": "auto"},
        "train": {"epochs": 3, "lr": 2e-5, "batch_size": 16, "grad_accum": 2, "max_seq_len": 128},
        "lora": {"r": 8, "alpha": 16},
        "eval": {"max_forgetting": 1.2, "max_slice_gap": 0.1, **eval_section},
    }


def _data_report() -> dict:
    split = {
        "train": {
            "read": 500,
            "kept": 470,
            "filtered": {"too_short": 12},
            "deduplicated": {"exact": 8, "near": 4},
            "quarantined": {"missing_label": 6},
        },
        "eval": {
            "read": 120,
            "kept": 118,
            "filtered": {},
            "deduplicated": {"contamination_exact": 2},
            "quarantined": {},
        },
    }
    return {
        "read": 620,
        "kept": 588,
        "filtered": {"total": 12, "too_short": 12},
        "deduplicated": {"total": 14, "exact": 10, "near": 4},
        "quarantined": {"total": 6, "missing_label": 6},
        "contamination": {"exact": 2, "near": 0},
        "splits": split,
    }


def _classification_run(out: Path, *, forgetting_exceeded: bool, gap_exceeded: bool) -> None:
    _write(out, "config.yaml", _config("sequence_classification", "full", slice_column="dialect"))
    ratio = 1.4213 if forgetting_exceeded else 1.0512
    gap = 0.1875 if gap_exceeded else 0.0437
    metrics = {
        "eval_loss": 0.4123,
        "train_loss": 0.3311,
        "wall_seconds": 312.5,
        "timings": {
            "ray_start": 2.5,
            "data": 20.0,
            "launch": 15.0,
            "setup": 10.0,
            "train": 240.0,
            "eval": 12.0,
            "checkpoint": 3.0,
            "export": 2.0,
            "outputs": 0.5,
        },  # fmt: skip
        "train_rows": 470,
        "step": 90,
        "epoch": 3.0,
        "accuracy": 0.8475,
        "precision": 0.8402,
        "recall": 0.8391,
        "f1": 0.8396,
        "test_accuracy": 0.8312,
        "test_loss": 0.4501,
        "baselines": {
            "majority": {
                "accuracy": 0.4068,
                "precision": 0.1356,
                "recall": 0.3333,
                "f1": 0.1928,
                "label": "neutral",
            },
            "frozen": {
                "accuracy": 0.7119,
                "precision": 0.7021,
                "recall": 0.6988,
                "f1": 0.7002,
                "eval_loss": 0.6934,
                "wall_seconds": 41.0,
            },
            "pretrained": {
                "accuracy": 0.8733,
                "precision": 0.3311,
                "recall": 0.3333,
                "f1": 0.3322,
                "eval_loss": 1.0987,
            },
        },
        "forgetting": {
            "measure": "mlm_loss",
            "head": "probe",
            "before": 3.1234,
            "after": round(3.1234 * ratio, 4),
            "ratio": ratio,
            "max_forgetting": 1.2,
            "exceeded": forgetting_exceeded,
            "tokens": 16384,
            "text": "rayft/resources/general_text.txt",
        },
        "slices": {
            "column": "dialect",
            "metric": "accuracy",
            "values": {
                "en-GB": {"rows": 60, "accuracy": 0.9 - gap, "f1": 0.85},
                "en-US": {"rows": 52, "accuracy": 0.9, "f1": 0.88},
                "en-IN": {"rows": 6, "accuracy": 0.5, "f1": 0.4},
            },
            "best": "en-US",
            "worst": "en-GB",
            "gap": gap,
            "max_slice_gap": 0.1,
            "min_slice_rows": 10,
            "exceeded": gap_exceeded,
        },
        "selected_checkpoint": {
            "path": "runs/x/ray/checkpoint_000002",
            "step": 60,
            "metric": "accuracy",
            "value": 0.8475,
            "forgetting_ratio": 1.1,
        },
    }
    _write(out, "metrics.json", metrics)
    history = [{"step": 0, "epoch": 0.0, "phase": "full", "eval_loss": 1.0987, "accuracy": 0.33}]
    for step in (30, 60, 90):
        history.append(
            {
                "step": step,
                "epoch": step / 30,
                "phase": "full",
                "train_loss": 1.0 - step / 150,
                "lr": 2e-5,
                "eval_loss": 1.0 - step / 200,
                "accuracy": 0.5 + step / 300,
                "forgetting_ratio": 1.0 + step / 300 * ratio / 1.4,
            }
        )
    _write(out, "history.jsonl", history)
    labels = ["negative", "neutral", "positive"]
    predictions = []
    for i in range(60):  # true label i % 3; every 5th row is predicted as the next label
        true = labels[i % 3]
        predicted = labels[(i + 1) % 3] if i % 5 == 0 else true
        predictions.append(
            {"source": "eval.jsonl", "line": i + 1, "label": true, "prediction": predicted}
        )
    predictions[0]["score"] = 0.51
    _write(out, "eval_predictions.jsonl", predictions)
    _write(out, "data_report.json", _data_report())


def test_classification_report_compares_flags_and_plots(tmp_path):
    _classification_run(tmp_path, forgetting_exceeded=True, gap_exceeded=True)
    written = write_report(str(tmp_path))

    names = sorted(Path(p).name for p in written)
    assert names == sorted(
        [
            "report.md",
            "report.html",
            "learning_curves.png",
            "confusion_matrix.png",
            "slices.png",
        ]
    )
    for path in map(Path, written):
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            width, height = _png_size(path)
            assert 300 <= width <= 2500 and 250 <= height <= 2000, (path.name, width, height)
    # three panels: losses, accuracy with baselines, forgetting
    assert (
        _png_size(tmp_path / "learning_curves.png")[0] > 1.5 * _png_size(tmp_path / "slices.png")[0]
    )

    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# rayft report: sequence_classification, full")
    assert "wall time 5m 12s" in md
    assert "| `deepspeed.stage` | 2 |" in md
    assert "| `train.lr` | 2e-05 |" in md
    assert "| global batch (derived) | 64 rows |" in md
    assert "`lora.r`" not in md  # a full run: adapter settings are noise
    # data summary: per split and overall
    assert "| train | 500 | 470 | 12 | 12 | 6 |" in md
    assert "| **all** | 620 | 588 | 12 | 14 | 6 |" in md
    assert "2 exact, 0 near" in md
    # baselines table with the right numbers, and the verdict per baseline
    assert "| **fine-tuned (full)** | 0.8475 | 0.8402 | 0.8391 | 0.8396 | 0.4123 |" in md
    assert "| majority (always `neutral`) | 0.4068 | 0.1356 | 0.3333 | 0.1928 | — |" in md
    assert "| frozen | 0.7119 | 0.7021 | 0.6988 | 0.7002 | 0.6934 |" in md
    assert (
        "| pretrained (untrained new head: chance level) | 0.8733 | 0.3311 | 0.3333 | 0.3322 | 1.0987 |"
        in md
    )
    assert "- beats majority: 0.8475 vs 0.4068 (+0.4407)" in md
    assert "- beats frozen: 0.8475 vs 0.7119 (+0.1356)" in md
    assert "- does **not** beat pretrained: 0.8475 vs 0.8733 (-0.0258)" in md
    assert "The frozen baseline trained in 41.0s; the run took 5m 12s." in md
    assert "Test split, scored once by the final model: accuracy 0.8312 · loss 0.4501." in md
    assert (
        "Best checkpoint kept by Ray Train: `runs/x/ray/checkpoint_000002` (step 60, accuracy 0.8475"
        in md
    )
    # where the time went: a row per section, in the run's order, the rest as "other"
    assert "5m 12s in all; the training steps took 77% of it." in md
    assert "| ray_start | joining or starting Ray (driver) | 2.5s | 1% |" in md
    assert (
        "| train | optimizer steps, waiting for batches included (workers) | 4m 00s | 77% |" in md
    )
    assert md.index("| ray_start |") < md.index("| train | optimizer") < md.index("| outputs |")
    assert "| other | config checks, tracking, what no section covers | 7.5s | 2% |" in md
    # confusion: 12 of 60 rows wrong, 4 per true label
    assert "on 60 eval rows" in md and "(4 rows)" in md
    # forgetting: probe explained, flagged in the glance and in its section
    assert "| masked-LM loss | 3.1234 | 4.4393 | 1.4213 | 1.2000 |" in md
    assert "the checkpoint has no masked-LM head, so a small MLM head (a probe) was trained" in md
    assert "same probe scores the backbone before and after" in md
    assert "forgetting ratio 1.4213: **FLAGGED**" in md
    assert "Result: **FLAGGED**: above `eval.max_forgetting` = 1.2000." in md
    # slices: the small slice is listed but not compared, the gap is flagged
    assert "| en-IN | 6 | 0.5000 | too few rows: not compared |" in md
    assert "| en-US | 52 | 0.9000 | best |" in md
    assert "Gap between `en-US` and `en-GB`: 0.1875, **FLAGGED**" in md
    assert md.count("**FLAGGED**") == 4  # glance + section, for forgetting and for slices
    for image in ("learning_curves.png", "confusion_matrix.png", "slices.png"):
        assert f"]({image})" in md

    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<table>") == 6  # config, data, baselines, time, forgetting, slices
    assert "<td>0.8475</td>" in page or 'right;">0.8475</td>' in page
    for image in ("learning_curves.png", "confusion_matrix.png", "slices.png"):
        assert f'src="{image}"' in page
    assert "<strong>FLAGGED</strong>" in page


def test_no_flags_when_within_limits(tmp_path):
    _classification_run(tmp_path, forgetting_exceeded=False, gap_exceeded=False)
    write_report(str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "FLAGGED" not in md
    assert "forgetting ratio 1.0512: within `eval.max_forgetting` = 1.2000" in md
    assert "within `eval.max_slice_gap` = 0.1000" in md


@pytest.mark.parametrize("head", ["pretrained", "model"])
def test_forgetting_heads_other_than_probe_are_not_called_probes(tmp_path, head):
    _classification_run(tmp_path, forgetting_exceeded=False, gap_exceeded=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    metrics["forgetting"].update(head=head, max_forgetting=None, exceeded=False)
    if head == "model":
        metrics["forgetting"]["measure"] = "perplexity"
    _write(tmp_path, "metrics.json", metrics)
    write_report(str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "probe" not in md
    assert "no limit set (`eval.max_forgetting`)" in md
    assert ("own masked-LM / LM head" in md) == (head == "pretrained")
    assert ("| perplexity |" in md) == (head == "model")


def test_token_classification_report_plots_entity_f1(tmp_path):
    _write(tmp_path, "config.yaml", _config("token_classification", "lora"))
    per_type = {
        "location": {"precision": 0.71, "recall": 0.64, "f1": 0.6732, "support": 25},
        "person": {"precision": 0.82, "recall": 0.79, "f1": 0.8047, "support": 48},
    }
    metrics = {
        "eval_loss": 0.2214,
        "train_loss": 0.1877,
        "wall_seconds": 4000.0,
        "train_rows": 3394,
        "step": 640,
        "epoch": 2.0,
        "precision": 0.7801,
        "recall": 0.7402,
        "f1": 0.7596,
        "token_accuracy": 0.9412,
        "per_type": per_type,
        "baselines": {"majority": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "label": "O"}},
        "baselines_note": "Compare with method=frozen for a cheaper model.",
    }
    _write(tmp_path, "metrics.json", metrics)
    history = [
        {"step": s, "epoch": s / 320, "phase": "lora", "train_loss": 1 / s, "eval_loss": 2 / s}
        for s in (320, 640)
    ]
    _write(tmp_path, "history.jsonl", history)
    # a token-classification predictions file must not be read as class labels
    _write(tmp_path, "eval_predictions.jsonl", [{"tags": ["O"], "prediction": ["O"]}])
    written = {Path(p).name for p in write_report(str(tmp_path))}
    assert written == {"report.md", "report.html", "learning_curves.png", "entity_f1.png"}
    _png_size(tmp_path / "entity_f1.png")
    md = (tmp_path / "report.md").read_text()
    assert "wall time 1h 06m" in md
    assert "| `lora.r` | 8 |" in md
    assert "| **fine-tuned (lora)** | 0.7801 | 0.7402 | 0.7596 | 0.9412 | 0.2214 |" in md
    assert "- beats majority: 0.7596 vs 0.0000 (+0.7596)" in md  # primary metric: f1
    assert "| person | 0.8200 | 0.7900 | 0.8047 | 48 |" in md
    assert "> Compare with method=frozen for a cheaper model." in md
    assert "![entity F1](entity_f1.png)" in md
    assert "Not measured (`eval.general_text` unset" in md
    assert "No slices" in md and "No data_report.json" in md
    assert "FLAGGED" not in md


def test_metrics_only_run_still_writes_a_report(tmp_path):
    note = "the model has no output embeddings to score text with"
    metrics = {"eval_loss": 2.5, "perplexity": 12.18, "token_loss": 2.5}
    _write(tmp_path, "metrics.json", {**metrics, "forgetting": {"not_measured": note}})
    (tmp_path / "history.jsonl").write_text('{"step": 10, "eval_loss": 2.5}\n{"step": 2')
    written = {Path(p).name for p in write_report(str(tmp_path))}
    assert written == {"report.md", "report.html", "learning_curves.png"}
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# rayft report: causal_lm")  # inferred from the metrics
    assert "No config.yaml" in md and "No baselines" in md
    assert "history.jsonl: 1 line(s) that are not JSON objects skipped." in md
    assert "| **fine-tuned (unknown method)** | 12.1800 | 2.5000 | 2.5000 |" in md
    assert f"Not measured: {note}" in md and "forgetting ratio" not in md


def test_empty_directory_still_writes_a_report(tmp_path):
    written = {Path(p).name for p in write_report(str(tmp_path))}
    assert written == {"report.md", "report.html"}
    assert "No metrics.json" in (tmp_path / "report.md").read_text()
