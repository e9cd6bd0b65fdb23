"""`rayft tune`: every trial a 2-worker DeepSpeed run, scheduled by ASHA on the metric it
reports while it trains; and the same search submitted as a Ray job to a real head."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rayft.config import ConfigError, validate_config
from rayft.tune import check_search_space, trial_zero_notes
from tests.conftest import REPO, base_config, wait_for

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
    raw["tune"] = {"search_space": {"train.lr": {"grid": [1e-3]}}, "metric": "token_accuracy"}
    with pytest.raises(ConfigError, match="sequence_classification reports no 'token_accuracy'"):
        check_search_space(validate_config(raw))
    raw["task"] = "token_classification"
    check_search_space(validate_config(raw))  # NER does report it
    for task, metric, mode in (("question_answering", "exact_match", "max"),
                               ("causal_lm", "perplexity", "min")):  # fmt: skip
        raw["task"], raw["tune"]["metric"] = task, metric
        assert validate_config(raw).tune.resolved_mode == mode
        check_search_space(validate_config(raw))
    del raw["task"]
    raw["tune"] = {"search_space": {"train.lr": {"uniform": [1e-5, 1e-3]}}, "search_alg": "grid"}
    with pytest.raises(ConfigError, match="search_alg grid needs grid or choice values"):
        check_search_space(validate_config(raw))


def test_trials_of_one_worker_given_a_zero_stage_get_the_note():
    raw = {
        "model": {"name_or_path": "m"},
        "data": {"train": "t.jsonl", "eval": "e.jsonl"},
        "scaling": {"num_workers": 2},
        "deepspeed": {"stage": 2},
        "tune": {"search_space": {"scaling.num_workers": {"choice": [1, 2, 4]}}},
    }
    (note,) = trial_zero_notes(validate_config(raw))
    assert note.startswith("trials with scaling.num_workers=1: deepspeed.stage=2 with one worker")
    raw["tune"]["search_space"]["deepspeed.stage"] = {"grid": [0, 3, "auto"]}
    notes = trial_zero_notes(validate_config(raw))
    assert [n.split(":")[0] for n in notes] == [
        "trials with scaling.num_workers=1, deepspeed.stage=3"
    ]
    raw["tune"]["search_space"]["deepspeed.offload_optimizer"] = {"choice": [True, False]}
    notes = trial_zero_notes(validate_config(raw))
    assert [n.split(":")[0] for n in notes] == [
        "trials with scaling.num_workers=1, deepspeed.stage=3, deepspeed.offload_optimizer=False"
    ]
    raw["scaling"]["num_workers"], raw["tune"]["search_space"] = 1, {"train.lr": {"grid": [1e-3]}}
    assert trial_zero_notes(validate_config(raw)) == []  # the launch advice says it once


def test_a_job_passes_its_cluster_address_to_its_actors(monkeypatch):
    """Ray Train's placement-group cleaner looks its cluster up from RAY_ADDRESS; where a
    machine runs two Ray instances it fails without it, and the worker groups of the
    trials Tune stops keep their CPUs (the PBT test below waited forever for workers)."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from rayft.trainer import JOB_CONFIG_ENV, runtime_env

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert runtime_env() == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what `ray job submit` gives a driver
    assert runtime_env()["env_vars"]["RAY_ADDRESS"] == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.5:10001")  # Ray Client: not for workers
    assert "RAY_ADDRESS" not in runtime_env()["env_vars"]
    # A job that sets a variable itself keeps it, and Ray merges the two envs.
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    job_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "HF_HOME": "/data"}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": job_env}))
    assert runtime_env() == {"env_vars": {"RAY_ADDRESS": "10.0.0.5:6379"}}
    merged = _merge_runtime_env(job_env, runtime_env())
    assert merged["env_vars"] == {**job_env["env_vars"], "RAY_ADDRESS": "10.0.0.5:6379"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Head:
    """A real Ray head from `ray start --head` (dashboard on 127.0.0.1, token auth on),
    driven through the `ray job` CLI as a user would."""

    def __init__(self, cpus: int):
        self.ray = str(Path(sys.executable).parent / "ray")
        self.temp_dir = tempfile.mkdtemp(prefix="rft-", dir="/tmp")
        dashboard = 8271
        self.address = f"http://127.0.0.1:{dashboard}"
        # The test session's own Ray holds the default agent ports: give this head its own.
        agent_ports = [f"--dashboard-agent-listen-port={free_port()}",
                       f"--dashboard-agent-grpc-port={free_port()}",
                       f"--runtime-env-agent-port={free_port()}",
                       f"--metrics-export-port={free_port()}",
                       f"--ray-client-server-port={free_port()}"]  # fmt: skip
        self.env = {**os.environ, "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        subprocess.run(
            [self.ray, "start", "--head", "--port=6391", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--num-cpus={cpus}",
             f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *agent_ports],
            check=True, env=self.env, capture_output=True,
        )  # fmt: skip
        for _ in range(60):  # the job server comes up a little after `ray start` returns
            if self.job("list").returncode == 0:
                break
            time.sleep(1)

    def job(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.ray, "job", *args[:1], "--address", self.address, *args[1:]],
            env={**self.env, **env}, capture_output=True, text=True,
        )  # fmt: skip

    def submit(self, *command: str, env_vars: dict[str, str] | None = None) -> str:
        runtime_env = json.dumps({"env_vars": env_vars or {}})
        for _ in range(30):  # the job agent comes up a little after the job server
            submitted = self.job(
                "submit", "--working-dir", str(REPO), "--runtime-env-json", runtime_env,
                "--no-wait", "--", sys.executable, *command,
            )  # fmt: skip
            if "No available agent" not in submitted.stderr:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        words = (submitted.stdout + submitted.stderr).split()
        return next(w.strip("'") for w in words if w.strip("'").startswith("raysubmit_"))

    def wait(self, job_id: str, timeout: float = 600) -> str:
        """The job's final status word, lowercase (`ray job status` prints it so)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job("status", job_id)
            text = (status.stdout + status.stderr).lower()
            for word in ("succeeded", "failed", "stopped"):
                if f"job '{job_id.lower()}' {word}" in text or f"' was {word}" in text:
                    return word
            time.sleep(5)
        return "timed out"

    def logs(self, job_id: str) -> str:
        return self.job("logs", job_id).stdout

    def stop(self) -> None:
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in part for part in proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()


def trial_states(search_dir: Path) -> dict[str, str]:
    """Trial id -> status, as Tune last saved its experiment state (what a resume reads)."""
    states = {}
    for path in search_dir.glob("experiment_state-*.json"):
        with contextlib.suppress(ValueError, OSError):  # caught mid-write: read it again
            for entry in json.loads(path.read_text())["trial_data"]:
                trial = json.loads(entry[0])
                states[trial["trial_id"]] = trial["status"]
    return states


@pytest.fixture(scope="module")
def head():
    started = Head(cpus=6)
    yield started
    started.stop()


def test_asha_search_as_a_ray_job_stopped_and_resumed(tmp_path, tiny_model, toy_data, head):
    """A search submitted with `ray job submit` to a head started by `ray start --head`
    (token auth on). ASHA, one trial at a time: a good learning rate, then one that
    diverges. The driver is stopped once the good trial has ended; `--resume` must not
    rerun it, and ASHA, its rungs restored, must stop the diverging trial before its last
    step."""
    unauthenticated = head.job("list", RAY_AUTH_MODE="disabled")
    assert unauthenticated.returncode != 0  # the token is what lets the jobs in

    asha = tmp_path / "asha"
    asha_config = tmp_path / "asha.yaml"
    asha_config.write_text(yaml.safe_dump(tune_config(tiny_model, toy_data, asha)))
    command = ["-m", "rayft.tune", "--config", str(asha_config)]
    # Tune saves its experiment state every second (not every 10+), so the driver is
    # stopped before the second trial's first report.
    first = head.submit(*command, env_vars={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    # Stop the driver as soon as Tune has recorded the good trial as ended.
    search_dir = asha / "ray/tune/search"
    wait_for(lambda: "TERMINATED" in trial_states(search_dir).values(), 600, "a trial")
    assert head.job("stop", first).returncode == 0
    at_stop = trial_states(search_dir)
    assert head.wait(first, timeout=120) == "stopped"
    good_id = next(k for k, v in at_stop.items() if v == "TERMINATED")
    assert len(at_stop) == 2 and list(at_stop.values()).count("TERMINATED") == 1, at_stop
    good_metrics = asha / "tune/trials" / good_id / "metrics.json"
    finished_at = good_metrics.stat().st_mtime
    resumed = head.submit(*command, "--resume")
    assert head.wait(resumed) == "succeeded", head.logs(resumed)[-4000:]
    asha_logs = head.logs(resumed)

    # ASHA, resumed: the good trial was not rerun; the bad one was stopped early.
    assert "tune: resuming the search" in asha_logs
    assert "eval at step 17" in asha_logs  # the bad trial's first evaluation: after the resume
    assert "tune: best eval_loss" in asha_logs
    assert good_metrics.stat().st_mtime == finished_at
    assert not list((asha / "ray/trials" / good_id).glob("*restored*"))
    with open(asha / "tune/trials.csv") as handle:
        trials = list(csv.DictReader(handle))
    assert len(trials) == 2
    by_lr = {float(t["train.lr"]): t for t in trials}
    assert by_lr[GOOD_LR]["trial_id"] == good_id
    full_steps = int(by_lr[GOOD_LR]["steps"])
    assert by_lr[GOOD_LR]["status"] == "completed" and full_steps == 3 * 17
    for lr in BAD_LRS:
        assert by_lr[lr]["status"] == "stopped", trials
        assert int(by_lr[lr]["steps"]) < full_steps
    best = json.loads((asha / "tune/best.json").read_text())
    assert best["best_config"] == {"train.lr": GOOD_LR}
    assert best["stopped_early"] == 1
    assert best["best_metric"] == pytest.approx(float(by_lr[GOOD_LR]["last_eval_loss"]))
    # best/ is a `rayft train` output: a model that loads, its metrics.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(asha / "tune/best/model")
    assert model.config.num_labels == 2
    metrics = json.loads((asha / "tune/best/metrics.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(best["best_metric"])
    assert (asha / "tune/trials.png").stat().st_size > 10_000
    # The best trial's report, with the search's data report and the trial's own config.
    report = (asha / "tune/best/report.md").read_text()
    assert "No data_report.json" not in report and "No config.yaml" not in report
    assert (asha / "tune/best/learning_curves.png").is_file()


@pytest.mark.slow
def test_pbt_restarts_a_trailing_trial_from_a_better_ones_checkpoint(
    tmp_path, tiny_model, toy_data, head
):
    """PBT, a good and a diverging learning rate side by side, submitted as a job: the
    diverging trial must continue from the good trial's checkpoint at a perturbed learning
    rate. (Minutes on 2 cores: every exploit restarts worker groups.)"""
    pbt = tmp_path / "pbt"
    pbt_config = tmp_path / "pbt.yaml"
    config = tune_config(
        tiny_model,
        toy_data,
        pbt,
        scheduler="pbt",
        # Every report is a chance to exploit; perturb (x0.8, x1.2) rather than draw anew.
        scheduler_config={"perturbation_interval": 1, "quantile_fraction": 0.5,
                          "resample_probability": 0.0},
        eval_every_steps=5,
        max_concurrent_trials=2,
    )  # fmt: skip
    config["train"]["epochs"] = 1
    pbt_config.write_text(yaml.safe_dump(config))
    pbt_job = head.submit("-m", "rayft.tune", "--config", str(pbt_config))
    assert head.wait(pbt_job, timeout=1200) == "succeeded", head.logs(pbt_job)[-4000:]
    pbt_logs = head.logs(pbt_job)

    # PBT: the diverging trial (grid order: the second) continued from the good one.
    with open(pbt / "tune/trials.csv") as handle:
        trials = {t["trial_id"].rsplit("_", 1)[-1]: t for t in csv.DictReader(handle)}
    assert {t["status"] for t in trials.values()} == {"completed"}, trials
    exploited = trials["00001"]
    # Its learning rate is now the good one's times 0.8 or 1.2 (once per exploit).
    lr = float(exploited["train.lr"])
    assert abs(math.log(lr / GOOD_LR)) < 3 * math.log(1.25), exploited
    good_dir = f"/trials/{trials['00000']['trial_id']}/"  # under the search's storage_path
    assert f"trial {exploited['trial_id']}: continuing from" in pbt_logs
    assert any(
        line.split("continuing from")[-1].find(good_dir) >= 0
        for line in pbt_logs.splitlines()
        if f"trial {exploited['trial_id']}: continuing from" in line
    ), pbt_logs[-3000:]
    assert "resuming from checkpoint at step" in pbt_logs
    assert f"learning rate set to {lr:g}" in pbt_logs
    # Diverged at lr 3, its loss would be far above ln 2; from the good weights it is not.
    assert float(exploited["last_eval_loss"]) < 0.75, exploited
