"""Faults: a worker killed mid-epoch, a retry budget, a driver killed and resumed, a
checkpoint cut short. Real Ray Train worker groups, real DeepSpeed engines and real
SIGKILLs (`RAYFT_FAULT`), on the session's local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from rayft import checkpoint as ckpt
from rayft.config import ConfigError, validate_config
from rayft.resilience import FAULT_ENV, audit_ledger, faults_fired
from rayft.trainer import TrainingFailed, fit
from tests.conftest import base_config
from tests.fixtures.data import WORDS, sentiment_splits
from tests.fixtures.models import tiny_bert


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> str:
    """Dropout on, so a resume that lost the workers' random states would not match."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), WORDS, dropout=0.1)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, str]:
    """95 train rows: 2 workers x 6 micro-batches of 8 per epoch, one row repeated."""
    root = tmp_path_factory.mktemp("small")
    # Prepared once, shared by every run here.
    return {**sentiment_splits(root, 95, 16, seed=3), "cache_dir": str(root / "prepared")}


def config(model: str, data: dict, out: Path, **sections) -> dict:
    """2 epochs of 6 steps, a checkpoint (and evaluation) every 3 steps, every row's
    step in the ledger; no report (tested elsewhere)."""
    raw = base_config(
        model,
        data,
        out,
        train={"epochs": 2, "batch_size": 8, "lr": 2e-3, "log_every_steps": 100},
        checkpoint={"every_steps": 3, "keep": 3, "ledger": True},
        run_name=out.name,
        storage_path=str(out / "ray"),
        **sections,
    )
    raw["data"]["cache_dir"] = data["cache_dir"]
    raw["eval"]["report"] = False
    return raw


def with_fault(spec: str | None, raw: dict) -> dict:
    """`fit` with RAYFT_FAULT set in the driver's environment."""
    if spec:
        os.environ[FAULT_ENV] = spec
    try:
        return fit(validate_config(raw))
    finally:
        os.environ.pop(FAULT_ENV, None)


def steps_by_row(run_dir: Path) -> dict:
    """(phase, epoch) -> {(source, line): count}: what the run trained on, resumes
    accounted for."""
    return audit_ledger(str(run_dir))["epochs"]


def test_worker_killed_mid_epoch_resumes_exactly(tmp_path, ray_session, dropout_model, small_data):
    """Rank 1 is SIGKILLed right after step 4 (the last checkpoint is step 3); with
    max_failures=1 the group restarts from step 3 and finishes. Loss and weights equal an
    uninterrupted run's; the ledger shows every row once per epoch."""
    reference = config(dropout_model, small_data, tmp_path / "reference")
    killed = config(dropout_model, small_data, tmp_path / "killed", scaling={"max_failures": 1})
    expected = with_fault(None, reference)
    metrics = with_fault("kill:rank=1:step=4", killed)

    run_dir = tmp_path / "killed" / "ray" / "killed"
    assert faults_fired(str(run_dir)) == ["kill-1-rank1-step4"]
    audit = audit_ledger(str(run_dir))
    assert audit["attempts"] == 2 and audit["resumed_from"] == [0, 3]
    epochs = audit["epochs"]
    assert sorted(epochs) == [(0, 0), (0, 1)]
    for seen in epochs.values():
        assert len(seen) == 95 and set(seen.values()) == {1}  # no row skipped or repeated
    # The same rows at the same steps as the uninterrupted run.
    assert epochs == steps_by_row(tmp_path / "reference" / "ray" / "reference")

    assert metrics["step"] == expected["step"] == 12
    for key in ("train_loss", "eval_loss", "accuracy"):
        assert abs(metrics[key] - expected[key]) <= 1e-5, (key, metrics[key], expected[key])
    assert metrics["train_samples"] == expected["train_samples"]
    got = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    want = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-5, worst
    history = [json.loads(line) for line in (tmp_path / "killed" / "history.jsonl").open()]
    assert [h["step"] for h in history] == [3, 6, 9, 12]


def test_retry_budget_is_spent_exactly(tmp_path, ray_session, tiny_model, small_data):
    """max_failures=0: the first kill ends the run with an error naming the worker.
    max_failures=1 and a worker that dies every time (1 worker, to be quick): two
    attempts, then the error."""
    none = config(tiny_model, small_data, tmp_path / "none")
    with pytest.raises(TrainingFailed) as failed:
        with_fault("kill:rank=1:step=1", none)
    message = str(failed.value)
    assert "scaling.max_failures=0" in message and "no restarts" in message
    assert "worker rank 1 (pid " in message and "died" in message, message
    assert faults_fired(str(tmp_path / "none" / "ray" / "none")) == ["kill-1-rank1-step1"]

    one = config(
        tiny_model, small_data, tmp_path / "one", scaling={"max_failures": 1, "num_workers": 1}
    )
    with pytest.raises(TrainingFailed, match=r"1 restart\(s\).*worker rank 0 \(pid "):
        with_fault("kill:rank=0:step=1:times=5", one)
    fired = faults_fired(str(tmp_path / "one" / "ray" / "one"))
    assert fired == ["kill-1-rank0-step1", "kill-2-rank0-step1"]  # 1 run + exactly 1 retry


def rayft_train(config_file: Path, *args: str, fault: str | None = None) -> tuple[int, str]:
    """`python -m rayft.train` as its own driver process on the session's Ray."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    done = subprocess.run(
        [sys.executable, "-m", "rayft.train", "--config", str(config_file), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, done.stdout + done.stderr


def test_driver_killed_then_resumed_past_a_truncated_checkpoint(
    tmp_path, ray_session, tiny_model, small_data
):
    """The driver is SIGKILLed after step 8 (checkpoints at steps 3 and 6); the newest is
    then cut short as if the kill had come while it was written. Rerunning the command
    with --resume skips it with a warning naming it, continues from step 3 and finishes;
    the ledger shows every row once per epoch. Resuming on another worker count, or a
    run that never started, is refused before any worker starts."""
    out = tmp_path / "run"
    raw = config(tiny_model, small_data, out)
    del raw["run_name"]  # --resume finds it in output_dir/run.json
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))

    code, log = rayft_train(config_file, fault="kill:rank=driver:step=8")
    assert code == -signal.SIGKILL, log[-3000:]
    run_name = json.loads((out / "run.json").read_text())["run_name"]
    run_dir = out / "ray" / run_name
    assert faults_fired(str(run_dir)) == ["kill-1-driver-step8"]
    checkpoints = ckpt.checkpoints_of_run(str(run_dir))
    steps = [ckpt.check_complete(path)["step"] for path in checkpoints]
    assert steps == [3, 6], steps
    shard = next(Path(checkpoints[-1], ckpt.DS_DIR, ckpt.TAG).glob("*rank_1*optim_states.pt"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)

    with pytest.raises(ConfigError, match="written by 2 workers"):
        fit(validate_config({**raw, "scaling": {"num_workers": 1}}), resume=True)
    with pytest.raises(ConfigError, match=r"written at ZeRO stage 2 .* is stage 3"):
        fit(validate_config({**raw, "deepspeed": {"stage": 3}}), resume=True)
    with pytest.raises(ConfigError, match="run.json not found"):
        fit(validate_config({**raw, "output_dir": str(tmp_path / "never")}), resume=True)

    code, log = rayft_train(config_file, "--resume")
    assert code == 0, log[-5000:]
    assert f"skipping an incomplete checkpoint: {checkpoints[-1]}" in log
    assert f"continuing run {run_name} from {checkpoints[0]} (step 3)" in log
    assert "resuming from checkpoint at step 3" in log
    audit = audit_ledger(str(run_dir))
    assert audit["resumed_from"] == [0, 3]
    for seen in audit["epochs"].values():
        assert len(seen) == 95 and set(seen.values()) == {1}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["train_samples"] == 12 * 16
    # The skipped micro-batches count as neither training nor waiting for data: the wait
    # is a part of the steps' time, so a fraction over 1 means the skip was counted (it
    # read 6.6 before). Its size here is the tiny model's and the loaded machine's (0.53
    # in one CI run: each epoch's first batch waits for the pipeline to start).
    assert 0 <= metrics["data_wait_fraction"] <= 1, metrics
