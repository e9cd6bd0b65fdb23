"""Trackers through their own APIs, without Ray: the Train callback and the final log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rayft import tracking
from rayft.config import ConfigError, resolve_paths, validate_config

CANARY = "canary-wandb-key-0123456789abcdef0123"


def config(out: Path, **section):
    raw = {
        "model": {"name_or_path": "model"},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
        "output_dir": str(out),
        "tracking": {"tensorboard": False, **section},
    }
    return resolve_paths(validate_config(raw))


def test_wandb_logs_every_report_and_the_summary_offline_without_the_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    cfg = config(tmp_path, wandb=True)
    run = tracking.start(cfg, "run-1")
    assert run.wandb["config"]["tracking.wandb"] == "True"
    callback = tracking.callback(run)
    callback.after_report(None, [{"step": 1, "eval_loss": 0.5, "phase": "full"}], None)
    callback.after_report(None, [{"step": 2, "eval_loss": 0.4, "done": True}], None)
    (tmp_path / "report.md").write_text("# report\n")
    tracking.finish(run, {"step": 2, "accuracy": 0.8, "baselines": {"frozen": {"accuracy": 0.6}}})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and all(list(r.glob("*.wandb")) for r in runs)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if CANARY.encode() in p.read_bytes()]


def test_a_tracker_that_cannot_run_fails_before_training(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_wandb)
    with pytest.raises(ConfigError, match="pip install wandb"):
        tracking.start(config(tmp_path, wandb=True), "run-1")


def test_mlflow_credentials_never_in_the_config_nor_its_errors(tmp_path):
    with pytest.raises(ConfigError) as error:
        config(tmp_path, mlflow_tracking_uri="https://alice:s3cret@mlflow.example.com")
    assert "s3cret" not in str(error.value) and "MLFLOW_TRACKING_PASSWORD" in str(error.value)
    assert tracking.mlflow_tracking_uri(config(tmp_path)).startswith("sqlite:///")
    assert os.path.basename(tracking.mlflow_tracking_uri(config(tmp_path))) == "mlflow.db"


def test_the_secret_scan_finds_a_planted_leak(tmp_path):
    from tests.conftest import files_holding_secrets

    (tmp_path / "clean.txt").write_text("nothing to see")
    assert files_holding_secrets(tmp_path) == []
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "leak.log").write_text(f"token={os.environ['HF_TOKEN']}\n")
    assert len(files_holding_secrets(tmp_path)) == 1
