"""End-to-end training on a local Ray with 2 gloo workers and real DeepSpeed engines.

Each run checks several things, since starting a worker group is the expensive part."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rayft import checkpoint as ckpt
from rayft.config import load_config, validate_config
from rayft.timing import SECTIONS, Timings
from rayft.trainer import fit
from tests.conftest import base_config, files_holding_secrets, run_dir, wait_for
from tests.fixtures.data import sentiment_rows, write_jsonl
from tests.fixtures.models import GENERAL_TEXT

METRIC_KEYS = {
    "accuracy",
    "precision",
    "recall",
    "f1",
    "eval_loss",
    "train_loss",
    "train_samples_per_second",
    "train_tokens_per_second",
    "wall_seconds",
}


def run(config: dict) -> tuple[dict, Path]:
    metrics = fit(validate_config(config))
    return metrics, Path(config["output_dir"])


def alive_actors(*classes: str) -> dict[int, str]:
    """Processes of these Ray actor classes on this machine (pid -> class), by their
    titles in /proc."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        found |= {int(pid): name for name in classes if title.startswith(f"ray::{name}")}
    return found


class ActorWatch:
    """The actor classes among ``classes`` that ran at any time inside the block, in
    processes that were not there when it began (a previous run's actors may still be
    on their way out)."""

    def __init__(self, *classes: str):
        self.classes, self.seen = classes, set()
        self.before: dict[int, str] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            alive = alive_actors(*self.classes)
            self.seen.update(name for pid, name in alive.items() if pid not in self.before)

    def __enter__(self) -> set[str]:
        self.before = alive_actors(*self.classes)
        self.thread.start()
        return self.seen

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def history(out: Path) -> list[dict]:
    return read_jsonl(out / "history.jsonl")


def predict(model_dir: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


def test_full_zero2_baselines_slices_report_and_tracking(
    tmp_path, ray_session, tiny_model, toy_data
):
    """Full fine-tuning on uneven shards with string labels, compared with all three
    baselines, on an eval set with a planted biased slice, tracked to TensorBoard and an
    MLflow file store. Both ranks send their ZeRO shards of each epoch's checkpoint
    through their upload threads (`checkpoint.upload: async`) into one checkpoint."""
    out = tmp_path / "full"
    # The eval set: the clean toy rows (slice "a") and rows whose labels are flipped
    # (slice "b"): a model that learned the task must fail exactly there.
    clean = [{**r, "group": "a"} for r in read_jsonl(toy_data["eval"])]
    flipped = [
        {**r, "group": "b", "label": {"positive": "negative", "negative": "positive"}[r["label"]]}
        for r in sentiment_rows(24, seed=2)
    ]
    eval_file = write_jsonl(tmp_path / "eval-sliced.jsonl", clean + flipped)
    # 6 epochs: the toy sits at ln 2 for a while first. (3 epochs at lr 5e-3 left it there
    # in some runs, eval loss 0.64; 6 at 5e-3 never left it in one; 6 at 2e-3 learned by
    # epoch 2, eval loss 0.003 at the end.)
    config = base_config(
        tiny_model,
        {**toy_data, "eval": eval_file},
        out,
        train={"lr": 2e-3, "epochs": 6},
        eval={"baselines": ["majority", "frozen", "pretrained"], "general_text": None,
              "slice_column": "group", "frozen_epochs": 2},
        tracking={"mlflow": True},
        checkpoint={"upload": "async"},
    )  # fmt: skip
    own_handler = signal.getsignal(signal.SIGINT)
    before = ckpt.local_copies()
    metrics, out = run(config)
    kept = ckpt.checkpoints_of_run(str(run_dir(out)))
    assert 2 <= len(kept) <= 3, kept  # checkpoint.keep's 2 best, and Ray keeps the newest
    for path in kept:  # every rank's files at the sizes its marker records
        assert ckpt.check_complete(path)["world_size"] == 2
    assert ckpt.local_copies() <= before

    assert set(metrics) >= METRIC_KEYS
    # Ray Train's Ctrl-C handler (which held its controller) is gone with the run, and
    # with it the controller and the data actors it owned.
    assert signal.getsignal(signal.SIGINT) is own_handler
    wait_for(lambda: not alive_actors("TrainController", "SplitCoordinator"), 20, "run's actors")
    steps = history(out)
    assert steps[-1]["train_loss"] < steps[1]["train_loss"]
    # 257 rows on 2 workers: one row repeated, nothing dropped, 6 epochs all completed.
    assert metrics["train_samples"] == 6 * 258
    assert metrics["train_rows"] == 257
    # Tokens are counted without padding: more than a token per row, fewer than the cap.
    max_len = load_config(out / "config.yaml").train.max_seq_len
    assert 6 * 258 < metrics["train_tokens"] < 6 * 258 * max_len
    assert steps[-1]["train_tokens"] == metrics["train_tokens"]
    # Where the wall time went: every section of the run timed, in order, none negative,
    # together within the wall time (the frozen baseline ran after it).
    timings = metrics["timings"]
    assert list(timings) == list(SECTIONS)
    assert all(v >= 0 for v in timings.values())
    assert timings["train"] == pytest.approx(metrics["train_seconds"], abs=1e-3)
    assert timings["eval"] > 0 and timings["checkpoint"] > 0 and timings["launch"] > 0
    assert sum(timings.values()) <= metrics["wall_seconds"]
    # The resolved config is saved and is itself a valid config.
    assert load_config(out / "config.yaml").deepspeed.stage == 2 == metrics["zero_stage"]

    # Slices: the clean slice is learned, the planted one is wrong, the gap is flagged.
    slices = metrics["slices"]
    assert slices["column"] == "group" and slices["metric"] == "accuracy"
    assert slices["values"]["a"]["rows"] == 48 and slices["values"]["b"]["rows"] == 24
    assert slices["values"]["a"]["accuracy"] >= 0.9
    assert slices["values"]["b"]["accuracy"] <= 0.1
    assert (slices["best"], slices["worst"]) == ("a", "b")
    assert slices["gap"] >= 0.8 and slices["exceeded"] is True
    overall = (48 * slices["values"]["a"]["accuracy"] + 24 * slices["values"]["b"]["accuracy"]) / 72
    assert math.isclose(metrics["accuracy"], overall)

    # Baselines on the same eval split: majority by counting, the untrained model at
    # step 0 (also the history's first entry), and a second, head-only run.
    baselines = metrics["baselines"]
    assert set(baselines) == {"majority", "frozen", "pretrained"}
    assert baselines["majority"]["accuracy"] == 0.5
    assert steps[0]["step"] == 0 and "train_loss" not in steps[0]
    assert steps[0]["accuracy"] == baselines["pretrained"]["accuracy"]
    assert baselines["pretrained"]["eval_rows"] == 72
    assert slices["values"]["a"]["accuracy"] > baselines["pretrained"]["accuracy"]
    frozen = baselines["frozen"]
    assert 0.0 <= frozen["accuracy"] <= 1.0 and frozen["epochs"] == 2 and frozen["lr"] == 1e-3
    assert (Path(frozen["checkpoint_path"]) / "model" / "model.safetensors").is_file()

    # The report and its plots.
    report = (out / "report.md").read_text()
    for name in ("report.html", "learning_curves.png", "confusion_matrix.png", "slices.png"):
        assert (out / name).stat().st_size > 1000, name
    assert "frozen" in report and "FLAGGED" in report

    # Tracking: TensorBoard events and the MLflow run hold every report of the workers.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_loss")] == [h["step"] for h in steps[1:]]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("rayft").experiment_id])
    assert run_info.data.params["train.lr"] == "0.002"
    assert run_info.info.status == "FINISHED"
    assert len(client.get_metric_history(run_info.info.run_id, "eval_loss")) == len(steps) - 1
    assert run_info.data.metrics["final.baselines.frozen.accuracy"] == frozen["accuracy"]
    assert {a.path for a in client.list_artifacts(run_info.info.run_id)} >= {"report.md"}

    # Secrets in the environment (planted by conftest before Ray started) are written
    # nowhere: outputs, checkpoints, the prepared data, the MLflow store, Ray's session logs.
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    assert files_holding_secrets(out, session) == []

    # The saved model reloads and predicts exactly what the run's final evaluation did.
    model_dir = out / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert (model_dir / "model.safetensors").is_file()
    predicted = read_jsonl(out / "eval_predictions.jsonl")
    texts = [read_jsonl(eval_file)[p["line"] - 1]["text"] for p in predicted]
    probs = torch.softmax(predict(model_dir, texts), -1)
    assert [config["id2label"][str(i)] for i in probs.argmax(-1).tolist()] == [
        p["prediction"] for p in predicted
    ]
    assert torch.allclose(
        probs.max(-1).values, torch.tensor([p["score"] for p in predicted]), atol=1e-4
    )

    # `rayft export` of the final checkpoint (ZeRO-2 shards, consolidated) predicts as
    # the run's own export does.
    from rayft.cli import main

    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", metrics["checkpoint_path"], "--out", str(exported)]) == 0
    assert torch.allclose(predict(exported, texts), predict(model_dir, texts), atol=1e-5)


def test_frozen_zero3_integer_labels_trains_only_the_head(tmp_path, ray_session, bare_backbone):
    """Also labels given as integers (0 / 1): they name the classes as strings. The body is
    frozen, so the general text scores the same before and after (through a probe: the
    tiny checkpoint has no masked-LM head)."""
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", sentiment_rows(257, seed=0, labels=(0, 1))),
        "eval": write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(48, seed=1, labels=(0, 1))),
    }
    config = base_config(
        bare_backbone,
        data,
        tmp_path / "frozen",
        method="frozen",
        deepspeed={"stage": 3},
        train={"lr": 5e-2, "epochs": 3, "grad_accum": 2, "lr_schedule": "cosine"},
        eval={"general_text": GENERAL_TEXT, "general_max_tokens": 4096, "probe_steps": 100},
    )
    metrics, out = run(config)
    steps = history(out)
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]  # only the head can have moved
    # 129 rows per worker = 17 micro-batches; accumulating 2 gives 9 steps per epoch, the
    # last one closing a group of 1 so that every epoch ends on an optimizer step.
    assert [h["step"] for h in steps] == [9, 18, 27]
    assert metrics["lr"] == 0.0  # cosine decayed to zero at the last step
    config = json.loads((out / "model/config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}

    trained = load_file(out / "model/model.safetensors")
    pretrained = load_file(Path(bare_backbone) / "model.safetensors")
    body = {k: v for k, v in trained.items() if not k.startswith("classifier.")}
    assert body, "the exported model has a body"
    for name, value in body.items():
        assert torch.equal(value, pretrained[name.removeprefix("bert.")]), name
    # `rayft export` consolidates ZeRO-3 shards, frozen parameters included, to the same
    # weights as the run's own export.
    from rayft.cli import main

    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", metrics["checkpoint_path"], "--out", str(exported)]) == 0
    again = load_file(exported / "model.safetensors")
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)

    # Forgetting: nothing to forget with a frozen body, at every evaluation.
    forgetting = metrics["forgetting"]
    assert forgetting["head"] == "probe" and forgetting["measure"] == "mlm_loss"
    assert forgetting["tokens"] > 200  # 15% of the scored half of 4096 tokens
    assert abs(forgetting["ratio"] - 1.0) < 1e-4
    assert all(abs(h["forgetting_ratio"] - 1.0) < 1e-4 for h in steps)
    # The run is the frozen baseline itself: fuller methods are suggested, not run.
    assert "frozen" not in metrics["baselines"] and "lora" in metrics["baselines_note"]
    assert "probe" in (out / "report.md").read_text()


def test_overtraining_is_flagged_as_forgetting_and_fails_the_command(
    tmp_path, ray_session, mlm_model, toy_data
):
    """A backbone with a real masked-LM head (pretrained on the general text) fine-tuned
    at a learning rate far too high: its general-text loss rises, the run is flagged and
    `rayft train` exits with 3; checkpoints within the limit rank first. One worker (both
    cores, the 2-worker global batch of 16), so it reads the splits in the object store
    directly (no split coordinators run) and `deepspeed.stage: auto` runs ZeRO stage 0.
    Its checkpoint at every step goes through Ray's upload thread (`checkpoint.upload:
    async`): each reaches storage complete and in order, and no local copy is left."""
    from rayft.cli import main

    config = base_config(
        mlm_model,
        toy_data,
        tmp_path / "overtrained",
        scaling={"num_workers": 1, "cpus_per_worker": 2},
        deepspeed={"stage": "auto"},
        # lr 0.1: the backbone drifts within a step or two and stays there; at 0.2 the
        # ratio swung between 1.02 and 1.44 step by step. Where it settles depends on
        # rounding (1.19 and 1.30 on two hosts; 1.30 again when the masked-LM fixture's
        # loss was computed in another order), while the first step sits at 1.01 in each:
        # the limit, 1.1, lies between with room on either side.
        train={"lr": 0.1, "epochs": 1, "eval_every_steps": 1, "batch_size": 16},
        checkpoint={"every_steps": 1, "keep": 20, "upload": "async"},
        eval={"general_text": GENERAL_TEXT, "general_max_tokens": 4096, "max_forgetting": 1.1,
              "baselines": ["pretrained"]},
    )  # fmt: skip
    path = tmp_path / "overtrained.yaml"
    path.write_text(yaml.safe_dump(config))
    before = ckpt.local_copies()
    with ActorWatch("TrainController", "SplitCoordinator") as seen:
        assert main(["train", "--config", str(path)]) == 3
    assert "TrainController" in seen and "SplitCoordinator" not in seen, seen

    out = tmp_path / "overtrained"
    metrics = json.loads((out / "metrics.json").read_text())
    saved = [ckpt.check_complete(p)["step"] for p in ckpt.checkpoints_of_run(str(run_dir(out)))]
    assert saved == list(range(1, metrics["step"] + 1)), saved  # the last: the final one
    assert ckpt.local_copies() <= before
    forgetting = metrics["forgetting"]
    assert forgetting["head"] == "pretrained" and forgetting["exceeded"] is True
    assert forgetting["ratio"] > 1.1 and forgetting["after"] > forgetting["before"]
    steps = history(out)
    assert steps[0]["forgetting_ratio"] == 1.0 and steps[-1]["forgetting_ratio"] > 1.1
    # The selected checkpoint: the lowest eval loss among those within the limit (the
    # first step still is, at 1.01), although the run ended over it.
    within = [h for h in steps[1:-1] if h["forgetting_ratio"] <= 1.1]
    assert within, [(h["step"], h["forgetting_ratio"], h["eval_loss"]) for h in steps]
    selected = metrics["selected_checkpoint"]
    best = min(within, key=lambda h: h["eval_loss"])
    assert selected["step"] == best["step"] and selected["within_forgetting"] is True
    report = (out / "report.md").read_text()
    assert "FLAGGED" in report
    # Alone, ZeRO partitions nothing: `auto` ran stage 0, whose checkpoints hold the whole
    # optimizer in rank 0's file (no per-rank ZeRO optimizer shards).
    assert metrics["zero_stage"] == 0 and "| `deepspeed.stage` | auto (ran stage 0) |" in report
    kept = list((out / "ray").rglob("mp_rank_00_model_states.pt"))
    shards = list((out / "ray").rglob("*optim_states.pt"))
    assert kept and not shards, (kept, shards)
    states = [json.loads(p.read_text()) for p in (out / "ray").rglob("rayft_state.json")]
    assert states and {s["zero_stage"] for s in states} == {0}  # what a resume must match


def test_in_process_run_trains_as_the_worker_group_does(
    tmp_path, ray_session, tiny_model, toy_data
):
    """`scaling.in_process` (Ray Train's local mode) trains in this process: no controller
    or worker process starts, and the run is the same as a worker group of one: the same
    losses and metrics at every report, the same checkpoints kept by `checkpoint.keep`
    (rayft stores them itself here), the callbacks see every report, and the run resumes.
    The process is left as it was (no process group, its torch threads)."""
    import torch.distributed as dist

    threads = torch.get_num_threads()
    runs = {}
    for mode in (True, False):  # in-process first: a worker group must still run after it
        config = base_config(
            tiny_model,
            toy_data,
            tmp_path / f"in_process_{mode}",
            scaling={"num_workers": 1, "in_process": mode},
            deepspeed={"stage": "auto"},
            train={"epochs": 1, "lr": 2e-3, "eval_every_steps": 10},
            # Ranked by the highest eval loss, so that the best two (the first two, before
            # the loss falls) and the newest, which is always kept, differ.
            checkpoint={"every_steps": 10, "keep": 2, "mode": "max"},
            tracking={"tensorboard": True},
        )
        # Streamed, not kept in the object store: Ray Data reads and tokenizes the splits
        # while the run trains (in-process, from the process that trains).
        config["data"]["materialize"] = "never"
        if mode:  # its frozen-head baseline, a second training run, in-process too
            config["eval"]["baselines"] = ["majority", "frozen"]
        before = ckpt.local_copies()
        with ActorWatch("TrainController", "RayTrainWorker") as seen:
            metrics, out = run(config)
        assert ckpt.local_copies() <= before
        kept = ckpt.checkpoints_of_run(str(run_dir(out)))
        runs[mode] = (metrics, out, seen, [ckpt.check_complete(p)["step"] for p in kept])
    (local, out, seen, kept), (group, group_out, group_seen, group_kept) = runs[True], runs[False]
    assert seen == set() and group_seen == {"TrainController", "RayTrainWorker"}
    assert not dist.is_initialized() and torch.get_num_threads() == threads
    assert local["timings"]["launch"] < 2.0  # no worker group to start (~10 s here)

    def figures(out: Path) -> list[float]:
        keys = ("step", "train_loss", "eval_loss", "accuracy", "lr")
        return [v for h in history(out) for k in keys if (v := h.get(k)) is not None]

    assert figures(out) == pytest.approx(figures(group_out), abs=1e-6)
    assert local["accuracy"] == group["accuracy"] and local["step"] == group["step"] == 33
    # 4 checkpoints (every 10 steps and the final one): the best 2 and the newest kept,
    # the same either way.
    assert kept == group_kept == [10, 20, 33], (kept, group_kept)
    assert local["selected_checkpoint"]["step"] == group["selected_checkpoint"]["step"]
    assert Path(local["selected_checkpoint"]["path"]).is_dir()
    assert (Path(local["checkpoint_path"]) / "model" / "model.safetensors").is_file()
    frozen = local["baselines"]["frozen"]
    assert 0.0 <= frozen["accuracy"] <= 1.0
    assert (Path(frozen["checkpoint_path"]) / "model" / "model.safetensors").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_loss")] == [h["step"] for h in history(out)]

    # A second run in this process: --resume finds every epoch done in the stored checkpoint.
    again = fit(validate_config(base_config(
        tiny_model, toy_data, out, scaling={"num_workers": 1, "in_process": True},
        deepspeed={"stage": "auto"}, train={"epochs": 1, "lr": 2e-3, "eval_every_steps": 10},
        checkpoint={"every_steps": 10, "keep": 2, "mode": "max"},
    )), resume=True)  # fmt: skip
    assert again["step"] == 33 and again["accuracy"] == local["accuracy"]


def test_timings_merge_driver_and_worker_sections():
    driver = Timings()
    driver.add("data", 2.0)
    driver.add("run", 10.0)
    with driver.section("outputs"):
        pass
    merged = driver.with_workers({"setup": 1.5, "train": 5.0, "eval": 1.0, "worker": 8.0})
    assert merged.as_dict() == {
        "data": 2.0, "launch": 2.0, "setup": 1.5, "train": 5.0, "eval": 1.0,
        "outputs": pytest.approx(0.0, abs=0.01),
    }  # fmt: skip
    # Without the workers' figures (a run that reported none) nothing is made up.
    assert driver.with_workers(None).as_dict().keys() == {"data", "outputs"}


def test_report_waits_that_dominate_a_run_name_the_settings_to_change(monkeypatch):
    """Ray Train's controller collects one report per poll, so a run reporting every step
    spends its time waiting (bench_launch's `reports` part: 20.7 s against 5.6 s of
    training at the 2 s default): rank 0 says so, with the settings that set the pace."""
    from rayft.loop import POLL_ENV, report_wait_advice

    cfg = validate_config(
        {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", "eval": "e.jsonl"},
         "train": {"eval_every_steps": 1}, "checkpoint": {"every_steps": 1}}
    )  # fmt: skip
    monkeypatch.delenv(POLL_ENV, raising=False)
    assert report_wait_advice(4.0, 1.0, cfg) == ""  # a few seconds: not worth a line
    assert report_wait_advice(9.0, 100.0, cfg) == ""  # under 10% of the training time
    advice = report_wait_advice(28.0, 0.4, cfg)
    assert "took 28.0 s against 0.4 s of training" in advice and "every 2 s" in advice
    assert "train.eval_every_steps 1, checkpoint.every_steps 1" in advice
    assert f"export {POLL_ENV}=0.5" in advice
    monkeypatch.setenv(POLL_ENV, "0.5")  # already short: only the cadence is left to change
    advice = report_wait_advice(6.4, 0.2, cfg)
    assert "every 0.5 s" in advice and "export" not in advice
