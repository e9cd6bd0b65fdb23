"""Batch inference with a model rayft exported: `rayft predict` (rows -> a file of
predictions) and `rayft eval` (labelled rows -> the metrics training reports).

Both stream through Ray Data. Rows are read by rayft's own readers (`predict`) or prepared
by its data stage (`eval`); a pool of `Predictor` actors, each holding the model once,
turns batches of rows into predictions with the task's own code (its extraction,
tokenization, `predict`, and for QA its choice of a question's best window). The driver
only writes what comes back, a batch at a time, in input order.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rayft.config import (
    ConfigError,
    RayftConfig,
    deep_merge,
    dump_config,
    load_config,
    parse_overrides,
    resolve_paths,
    validate_config,
)
from rayft.console import say
from rayft.data.read import BLANK, DataError, expand_sources
from rayft.data.write import WRITE_FORMATS, LazyJsonLines, RowWriter
from rayft.tasks import Task, get_task

RUN_INFO = "rayft.json"  # written by rayft.checkpoint.export_model (not imported: torch)
EXPORT_HINT = "pass the model directory of a finished `rayft train` run (<output_dir>/model)"


# ------------------------------------------------------------------- model and config


def read_model_info(model_dir: str) -> dict[str, Any]:
    """The export's `rayft.json`: task, method, labels (in id order), max_seq_len."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError([f"--model {model_dir}: no such directory; {EXPORT_HINT}"])
    info = path / RUN_INFO
    if not info.is_file():
        raise ConfigError(
            [f"--model {model_dir}: not a rayft export (no {RUN_INFO} in it); {EXPORT_HINT}"]
        )
    return json.loads(info.read_text())


def inference_config(
    model_dir: str,
    info: dict[str, Any],
    data_file: str,
    config_path: str | None,
    overrides: list[str],
    output_dir: str | None = None,
) -> RayftConfig:
    """`--config` (its data settings: columns, format, templates, QA windows, generation)
    or the task's defaults; then what the export says (model, task, labels, window); then
    the `key.sub=value` overrides, which win."""
    raw: dict[str, Any] = {}
    if config_path is not None:
        raw = load_config(config_path).model_dump(mode="json")
    labels = info.get("labels") or None
    exported = {
        "task": info["task"],
        "model": {"name_or_path": model_dir, "tokenizer": None},  # the export holds both
        "train": {"max_seq_len": info["max_seq_len"]},
        # The data file stands in for every split, so the config validates; `rayft eval`
        # runs the data stage on it alone (see `evaluate_file`).
        "data": {
            "train": data_file,
            "eval": data_file,
            "test": None,
            "split": None,
            "labels": labels,
        },  # fmt: skip
        "storage_path": None,  # default: under output_dir (the training run's is not ours)
    }
    if output_dir is not None:
        exported["output_dir"] = output_dir
    raw = deep_merge(deep_merge(raw, exported), parse_overrides(overrides))
    # One sequence per row: each prediction (and causal_lm's loss) belongs to one row.
    raw["data"]["packing"] = False
    return resolve_paths(validate_config(raw, config_path))


# ------------------------------------------------------------------ the Ray Data actor


class Predictor:
    """Ray Data actor: loads the model once (CPU, or its GPU), then turns each batch into
    one prediction per row. `labelled`: prepared rows with references (`rayft eval`);
    otherwise raw records, extracted here, and quarantined when unusable."""

    def __init__(
        self, cfg_json: str, labels: list[str], labelled: bool, batch_size: int, gpu: bool
    ):
        import torch

        from rayft.modeling import load_tokenizer
        from rayft.tasks.common import pad_multiple

        self.cfg = RayftConfig.model_validate_json(cfg_json)
        self.task = get_task(self.cfg.task)
        self.labels, self.labelled, self.batch_size = labels, labelled, batch_size
        self.label2id = {label: i for i, label in enumerate(labels)}
        self.tokenizer = load_tokenizer(self.cfg)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.pad_multiple = pad_multiple(self.device)
        self.model = self.task.auto_class().from_pretrained(
            self.cfg.model.name_or_path, trust_remote_code=self.cfg.model.trust_remote_code
        )
        self.model.to(self.device).eval()

    def __call__(self, table: pa.Table) -> pa.Table:
        return self._score(table) if self.labelled else self._predict(table)

    def _predict(self, table: pa.Table) -> pa.Table:
        """Raw records -> `_output` (the prediction columns, JSON) for usable ones, else
        `_reason` (and `_raw`) for the quarantine."""
        reasons = table.column("_reason").to_pylist()
        records = table.column("_record").to_pylist()
        usable: dict[int, dict[str, Any]] = {}
        for i, record in enumerate(records):
            if reasons[i] is None:
                fields, reasons[i] = self._inputs(json.loads(record))
                if fields is not None:
                    usable[i] = fields
        outputs: list[str | None] = [None] * table.num_rows
        if usable:
            sources, lines = table.column("_source").to_pylist(), table.column("_line").to_pylist()
            rows = [{**usable[i], "_source": sources[i], "_line": lines[i]} for i in usable]
            predictions, _ = self._run(_numpy_batch(rows))
            for i, prediction in zip(usable, predictions, strict=True):
                outputs[i] = json.dumps(self.task.present(prediction, usable[i], self.labels))
        raws = table.column("_raw").to_pylist()
        return pa.table(
            {
                "_source": table.column("_source"),
                "_line": table.column("_line"),
                "_reason": pa.array(reasons, pa.string()),
                "_raw": pa.array(
                    [
                        r if why not in (None, BLANK) else None
                        for r, why in zip(raws, reasons, strict=True)
                    ],
                    pa.string(),
                ),
                "_record": pa.array(
                    [
                        r if out is not None else None
                        for r, out in zip(records, outputs, strict=True)
                    ],
                    pa.string(),
                ),
                "_output": pa.array(outputs, pa.string()),
            }
        )

    def _inputs(self, record: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """A record's model inputs, renamed and cleaned as the data stage does (the model
        learned from cleaned text); length filters and dedup are for training data only."""
        from rayft.data.prepare import clean_fields, renamed

        data, task = self.cfg.data, self.task
        fields, reason = task.extract_inputs(renamed(record, data), data)
        if fields is None:
            return None, reason
        clean_fields(task, fields, data)
        if not fields[task.text_fields[0]]:
            return None, "empty_after_cleaning"
        return fields, None

    def _score(self, table: pa.Table) -> pa.Table:
        """Prepared rows -> each row's prediction and reference (JSON), with provenance."""
        predictions, references = self._run(_numpy_batch(table.to_pylist()))
        return pa.table(
            {
                "_source": table.column("_source"),
                "_line": table.column("_line"),
                "_slice": table.column("_slice"),  # eval.slice_column's value, or null
                "_prediction": [json.dumps(p) for p in predictions],
                "_reference": [json.dumps(r) for r in references],
            }
        )

    def _run(self, batch: dict[str, np.ndarray]) -> tuple[list[Any], list[Any]]:
        """One prediction (and with labels, one reference) per row of `batch`."""
        import torch

        task, n = self.task, len(batch["_source"])
        if not self.labelled and task.generate_rows is not None:
            return task.generate_rows(self.model, batch, self.tokenizer, self.cfg), [None] * n
        features = task.tokenize(batch, self.tokenizer, self.cfg, self.label2id)
        owners = features.pop("_row", None)  # windowed: the row each feature came from
        predictions: list[Any] = []
        references: list[Any] = []
        for start in range(0, len(features["input_ids"]), self.batch_size):
            chunk = {k: v[start : start + self.batch_size] for k, v in features.items()}
            collated = task.collate(chunk, self.tokenizer.pad_token_id, self.pad_multiple)
            inputs = {k: v.to(self.device) for k, v in collated.items()}
            with torch.no_grad():  # "_" keys are for `predict`, not the model (as in training)
                outputs = self.model(**{k: v for k, v in inputs.items() if not k.startswith("_")})
            predictions += task.predict(outputs, inputs, self.cfg)
            references += (
                task.references(chunk) if self.labelled else [None] * len(chunk["input_ids"])
            )
        if owners is None:
            return predictions, references
        return _one_per_row(task, owners, n, predictions, references)


def _numpy_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> a batch as Ray Data's numpy format gives it: one 1-D object array per
    column (lists stay lists, never a 2-D array)."""
    batch = {}
    for name in rows[0]:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            column[i] = row[name]
        batch[name] = column
    return batch


def _one_per_row(
    task: Task, owners: np.ndarray, n: int, predictions: list[Any], references: list[Any]
) -> tuple[list[Any], list[Any]]:
    """Features -> rows. A row's windows (QA) are merged by the task's own rule, the one
    training's predictions file uses (`per_example`: the best-scoring window)."""
    windows: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for owner, prediction, reference in zip(owners, predictions, references, strict=True):
        windows[int(owner)].append(
            {"source": "", "line": int(owner), "prediction": prediction, "reference": reference}
        )
    best = [task.per_example(w)[0] if task.per_example else w[0] for w in windows]
    return [b["prediction"] for b in best], [b["reference"] for b in best]


def _map_predictor(
    dataset: Any,
    cfg: RayftConfig,
    labels: list[str],
    *,
    labelled: bool,
    batch_size: int,
    concurrency: int,
    gpu: bool,
) -> Any:
    """`dataset` -> one output row per input row, from `concurrency` Predictor actors."""
    import ray.data

    resources = {"num_gpus": 1} if gpu else {}
    return dataset.map_batches(
        Predictor,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        fn_constructor_kwargs={
            "cfg_json": cfg.model_dump_json(),
            "labels": labels,
            "labelled": labelled,
            "batch_size": batch_size,
            "gpu": gpu,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        **resources,
    )


# ------------------------------------------------------------------------ rayft predict


def predict_file(
    model_dir: str,
    input_path: str,
    output_path: str,
    *,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    batch_size: int = 32,
    concurrency: int = 1,
    gpu: bool = False,
) -> dict[str, Any]:
    """Predict every usable row of `input_path` into `output_path` (its input columns plus
    the task's prediction columns, in input order); unusable rows go to
    `<output stem>.quarantine.jsonl`. Returns the counts."""
    from rayft.data.prepare import ordered_execution
    from rayft.data.read import read_records
    from rayft.trainer import init_ray

    info = read_model_info(model_dir)
    output = Path(output_path)
    if output.suffix.lower() not in WRITE_FORMATS:
        raise ConfigError(
            [
                f"--output {output_path}: cannot tell the format from '{output.suffix}'; "
                f"end the file name with {', '.join(WRITE_FORMATS)}"
            ]
        )
    cfg = inference_config(model_dir, info, input_path, config_path, overrides or [])
    files = expand_sources(input_path, "--input", cfg.data.format)
    if output.resolve() in {Path(f).resolve() for f in files if "://" not in f}:
        raise ConfigError([f"--output {output_path} is the input file; name another file"])
    task = get_task(cfg.task)
    _check_input_columns(cfg, task, files[0])
    quarantine = output.with_name(output.name[: -len(output.suffix)] + ".quarantine.jsonl")
    quarantine.unlink(missing_ok=True)  # never leave an earlier run's rows behind
    init_ray(cfg)
    records = read_records(files, cfg.data.format)
    labels = info.get("labels") or []
    results = _map_predictor(
        records,
        cfg,
        labels,
        labelled=False,
        batch_size=batch_size,
        concurrency=concurrency,
        gpu=gpu,
    )
    predicted, blank, reasons = 0, 0, Counter()
    with ordered_execution(), RowWriter(str(output)) as out, LazyJsonLines(quarantine) as bad:
        for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            good = []
            for row in table.to_pylist():
                if row["_output"] is not None:
                    good.append({**json.loads(row["_record"]), **json.loads(row["_output"])})
                elif row["_reason"] == BLANK:
                    blank += 1  # not a row: counted apart, as the data stage does
                else:
                    reasons[row["_reason"]] += 1
                    where = {"source": row["_source"], "line": row["_line"]}
                    bad.write({**where, "reason": row["_reason"], "raw": row["_raw"]})
            out.write(good)
            predicted += len(good)
    counts = {
        "read": predicted + sum(reasons.values()),
        "predicted": predicted,
        "quarantined": {"total": sum(reasons.values()), **dict(reasons.most_common())},
        "blank_lines": blank,
        "output": str(output),
        "quarantine": str(quarantine) if reasons else None,
    }
    _say_predicted(counts)
    return counts


def _check_input_columns(cfg: RayftConfig, task: Task, path: str) -> None:
    """The columns prediction needs (the task's, less labels / tags / answers) are in the
    first file's first record, and none is named like a prediction column (which would
    overwrite it in the output)."""
    from rayft.data.prepare import missing_column

    needed = {k: v for k, v in task.columns(cfg.data).items() if k not in task.label_columns}
    columns, missing = missing_column(cfg, path, needed, f"--input {path} is empty (no rows)")
    if columns is None:
        return  # nothing parsable in the first lines: the quarantine will say why
    if missing:
        key, column = missing
        raise DataError(
            f"{key} '{column}' not found in {path} (columns: {', '.join(columns)}); pass "
            f"{key}=<column>, or --config with the training run's data settings"
        )
    clash = [c for c in task.prediction_columns if c in columns]
    if clash:
        raise DataError(
            f"--input {path} has column(s) {', '.join(clash)}, which `rayft predict` writes "
            "for this task; rename them in the input (or predict from a file without them)"
        )


def _say_predicted(counts: dict[str, Any]) -> None:
    quarantined = counts["quarantined"]
    detail = ", ".join(f"{k} {v:,}" for k, v in quarantined.items() if k != "total")
    text = (
        f"predict: read {counts['read']:,} rows: predicted {counts['predicted']:,}, "
        f"quarantined {quarantined['total']:,}" + (f" ({detail})" if detail else "")
    )
    if counts["blank_lines"]:
        text += f"; {counts['blank_lines']:,} blank line(s) skipped"
    text += f"; predictions: {counts['output']}"
    if counts["quarantine"]:
        text += f"; quarantined rows: {counts['quarantine']}"
    say(text)


# --------------------------------------------------------------------------- rayft eval


def default_eval_dir(model_dir: str, data_file: str) -> str:
    """`<model dir>/../eval-<data file stem>`."""
    name = Path(data_file.rstrip("/")).name
    for suffix in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    stem = re.sub(r"[^\w.-]", "_", Path(name).stem) or "data"
    return str(Path(model_dir).resolve().parent / f"eval-{stem}")


def evaluate_file(
    model_dir: str,
    data_file: str,
    config_path: str,
    overrides: list[str] | None = None,
    out_dir: str | None = None,
    *,
    concurrency: int = 1,
    gpu: bool = False,
) -> dict[str, Any]:
    """Score a saved model on labelled data with training's metrics; write metrics.json,
    eval_predictions.jsonl, config.yaml, the data report and quarantine, and report.md
    into `out_dir`. Returns the metrics."""
    import ray.data

    from rayft.data.prepare import check_sources, ordered_execution, prepare
    from rayft.evaluate import slice_metrics
    from rayft.trainer import init_ray

    info = read_model_info(model_dir)
    out_dir = os.path.abspath(out_dir or default_eval_dir(model_dir, data_file))
    cfg = inference_config(model_dir, info, data_file, config_path, overrides or [], out_dir)
    task, labels = get_task(cfg.task), info.get("labels") or []
    # The data stage prepares `data.train` plus any eval / test files, and needs a train
    # split. Here the file is the one split: a copy of the config names it as data.train
    # only, so it is read, cleaned, filtered and deduplicated once, as training prepared
    # its eval split (duplicates removed within the split, none across: there is no
    # other), with the export's labels (unknown ones quarantined). data_report.json and
    # quarantine/ call that split `train`. Naming the file as both train and eval would
    # read it twice and mark every training row as a copy of an eval row.
    stage = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval": None})})
    files = check_sources(stage)
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "config.yaml").write_text(dump_config(cfg))
    init_ray(cfg)
    prepared = prepare(stage, files)
    rows = ray.data.read_parquet(prepared.splits["train"], columns=task.row_columns)
    batch_size = cfg.train.eval_batch_size
    scored = _map_predictor(
        rows, cfg, labels, labelled=True, batch_size=batch_size, concurrency=concurrency, gpu=gpu
    )
    # Every row's prediction and reference on the driver, as rank 0 holds them in training.
    described: list[dict[str, Any]] = []
    slices: list[str | None] = []
    with ordered_execution():
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in table.to_pylist():
                described.append(
                    {
                        "source": row["_source"],
                        "line": row["_line"],
                        "prediction": json.loads(row["_prediction"]),
                        "reference": json.loads(row["_reference"]),
                    }
                )
                slices.append(row["_slice"])
    predictions = [r["prediction"] for r in described]
    references = [r["reference"] for r in described]
    metrics: dict[str, Any] = task.compute_metrics(predictions, references, labels)
    metrics["eval_rows"] = len(predictions)
    if cfg.eval.slice_column:
        metrics["slices"] = slice_metrics(predictions, references, slices, task, labels, cfg)
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(os.path.join(out_dir, "eval_predictions.jsonl"), "w") as handle:
        for row in sorted(described, key=lambda r: (r["source"], r["line"])):
            handle.write(json.dumps(task.describe(row, labels)) + "\n")
    if cfg.eval.report:
        from rayft.report import write_report

        write_report(out_dir)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    say(f"eval: {metrics['eval_rows']:,} rows scored: {shown}; results in {out_dir}/")
    return metrics
