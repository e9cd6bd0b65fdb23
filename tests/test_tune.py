"""`rayft tune`: every trial a 2-worker DeepSpeed run, scheduled by ASHA on the metric it
reports while it trains; and the same search submitted as a Ray job to a real head."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rayft.config import ConfigError, validate_config
from rayft.tune import check_search_space, search
from tests.conftest import REPO, base_config

GOOD_LR = 3e-3
BAD_LRS = [3.0]  # AdamW diverges: the eval loss shoots far above ln 2 at once


def tune_config(tiny_model, toy_data, out: Path, **tune) -> dict:
    config = base_config(tiny_model, toy_data, out, train={"epochs": 3})
    config["tune"] = {
        "search_space": {"train.lr": {"grid": [GOOD_LR, *BAD_LRS]}},
        "num_samples": 1,
        "metric": "eval_loss",
        "scheduler": "asha",
        "scheduler_config": {"grace_period": 1, "reduction_factor": 2},
        # One at a time: the good trial records its evaluations first, and ASHA compares
        # each later trial with them (concurrent trials in lockstep pass rungs by chance).
        "max_concurrent_trials": 1,
        **tune,
    }
    return config


def test_search_space_problems_are_all_reported_before_anything_runs(tmp_path):
    raw = {
        "model": {"name_or_path": "m"},
        "data": {"train": "t.jsonl", "eval": "e.jsonl"},
        "tune": {"search_space": {"train.lr": {"loguniform": [0, 1e-3]}, "lora.r": {"pick": [1]}}},
    }
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert "train.lr: loguniform needs 0 < low < high" in message
    assert "lora.r: write exactly one of loguniform, uniform, choice, randint, grid" in message

    raw["tune"] = {
        "search_space": {
            "train.lrr": {"loguniform": [1e-5, 1e-3]},
            "train.batch_size": {"choice": [8, "big"]},
            "deepspeed.stage": {"grid": [2, 5]},
            "method": {"choice": ["lora", "full"]},
        }
    }
    with pytest.raises(ConfigError) as info:
        check_search_space(validate_config(raw))
    problems = info.value.problems
    assert any(
        p.startswith("tune.search_space.train.lrr") and "did you mean 'lr'" in p for p in problems
    )
    assert any(p.startswith("tune.search_space.train.batch_size = 'big'") for p in problems)
    assert any(p.startswith("tune.search_space.deepspeed.stage = 5") for p in problems)
    assert not any("method" in p for p in problems)
    raw["tune"] = {"search_space": {"train.lr": {"uniform": [1e-5, 1e-3]}}, "search_alg": "grid"}
    with pytest.raises(ConfigError, match="search_alg grid needs grid or choice values"):
        check_search_space(validate_config(raw))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def test_asha_search_submitted_as_a_ray_job_to_a_real_head(
    tmp_path, tiny_model, toy_data, ray_session
):
    """`ray start --head` (dashboard on 127.0.0.1, token auth on), `ray job submit` a
    search in which one learning rate is good and one diverges; ASHA must stop the bad
    trial before its last step and keep the good one. Then `--resume` on the finished
    search reruns nothing."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = tempfile.mkdtemp(prefix="rft-", dir="/tmp")
    port, dashboard = 6391, 8271
    # The test session's own Ray holds the default agent ports: give this head its own.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}",
                   f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}",
                   f"--metrics-export-port={free_port()}",
                   f"--ray-client-server-port={free_port()}"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=6", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *agent_ports],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    try:
        out = tmp_path / "job"
        config = tune_config(tiny_model, toy_data, out)
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(config))
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(60):  # the job server comes up a little after `ray start` returns
            listed = subprocess.run(
                [str(ray_bin), "job", "list", "--address", address], env=env, capture_output=True
            )
            if listed.returncode == 0:
                break
            time.sleep(1)
        unauthenticated = subprocess.run(
            [str(ray_bin), "job", "list", "--address", address],
            env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
        )  # fmt: skip
        for _ in range(30):  # ... and its job agent a little later still
            submitted = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir",
                 str(REPO), "--no-wait", "--", sys.executable, "-m", "rayft.tune", "--config",
                 str(path)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if "No available agent" not in submitted.stderr:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        words = (submitted.stdout + submitted.stderr).split()
        job_id = next(w.strip("'") for w in words if w.strip("'").startswith("raysubmit_"))
        status = ""
        deadline = time.time() + 600
        while time.time() < deadline:
            checked = subprocess.run(
                [str(ray_bin), "job", "status", "--address", address, job_id],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            status = (checked.stdout + checked.stderr).lower()
            if any(s in status for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(5)
        logs = subprocess.run(
            [str(ray_bin), "job", "logs", "--address", address, job_id],
            env=env, capture_output=True, text=True,
        ).stdout  # fmt: skip
        assert f"job '{job_id.lower()}' succeeded" in status, logs[-4000:]
        assert unauthenticated.returncode != 0  # the token is what lets the job in
        assert "tune: best eval_loss" in logs
    finally:
        _kill_cluster(temp_dir)

    with open(out / "tune/trials.csv") as handle:
        trials = list(csv.DictReader(handle))
    assert len(trials) == 2
    by_lr = {float(t["train.lr"]): t for t in trials}
    full_steps = int(by_lr[GOOD_LR]["steps"])
    assert by_lr[GOOD_LR]["status"] == "completed" and full_steps == 3 * 17
    for lr in BAD_LRS:
        assert by_lr[lr]["status"] == "stopped", trials
        assert int(by_lr[lr]["steps"]) < full_steps
    best = json.loads((out / "tune/best.json").read_text())
    assert best["best_config"] == {"train.lr": GOOD_LR}
    assert best["stopped_early"] == 1 and best["trial_steps"] < 2 * full_steps
    assert best["best_metric"] == pytest.approx(float(by_lr[GOOD_LR]["last_eval_loss"]))
    # best/ is a `rayft train` output: a model that loads, its metrics.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "tune/best/model")
    assert model.config.num_labels == 2
    metrics = json.loads((out / "tune/best/metrics.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(best["best_metric"])
    assert (out / "tune/trials.png").stat().st_size > 10_000

    # Resuming the finished search (here, on the test session's Ray) reruns no trial.
    again = search(validate_config(config), resume=True)
    assert (
        again["trial_steps"] == best["trial_steps"] and again["best_config"] == best["best_config"]
    )
    with open(out / "tune/trials.csv") as handle:
        resumed = {t["trial_id"]: t["wall_seconds"] for t in csv.DictReader(handle)}
    assert resumed == {t["trial_id"]: t["wall_seconds"] for t in trials}
