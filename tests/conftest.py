"""Shared fixtures: one local Ray instance per test session, tiny models, toy data."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rayft.loop import POLL_ENV
from tests.fixtures.data import WORDS, sentiment_splits
from tests.fixtures.models import tiny_bert, tiny_mlm_bert

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite is many short runs that evaluate and checkpoint every few steps: Ray Train's
# controller collects one report per poll, every 2 s by default, and a run reporting at
# every step waits for each (20.7 s against 5.6 s of training in bench_launch's `reports`
# part, 0.16 s at 0.5 s). docs/performance.md gives this setting for many short runs;
# every Ray the suite starts (the session's, `ray start` heads) inherits it.
os.environ.setdefault(POLL_ENV, "0.5")
# Secrets a user would have in the environment, planted before Ray starts so every process
# of the session sees them; tests check that no file rayft or Ray writes contains them.
SECRET_VARIABLES = (
    "HF_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)
for _name in SECRET_VARIABLES:
    os.environ.setdefault(_name, f"canary-{_name.lower()}-5f3a9c1e7b")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 2 s until it holds; fail after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def files_holding_secrets(*roots: str | Path) -> list[str]:
    """Every file under `roots` that contains one of the planted secret values."""
    secrets = [os.environ[name].encode() for name in SECRET_VARIABLES]
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {s.decode()[:12]}..." for s in secrets if s in data]
    return found


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: starting Ray costs tens of seconds here.
    More logical CPUs than cores, so 2 training workers leave room for Ray Data."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=6,
            # No dashboard: faster. (Searches that stop trials early run on their own head
            # in test_tune: Ray Train's placement-group cleaner needs its State API.)
            include_dashboard=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="session")
def mlm_model(tmp_path_factory) -> str:
    """A tiny BERT with its masked-LM head, pretrained on the shipped general text."""
    return tiny_mlm_bert(tmp_path_factory.mktemp("tiny-mlm-bert"), WORDS)


@pytest.fixture(scope="session")
def bare_backbone(tmp_path_factory, mlm_model) -> str:
    """The same pretrained body without its masked-LM head (as sentence-transformers
    checkpoints come): forgetting is then scored through a probe."""
    from transformers import AutoTokenizer, BertModel

    directory = tmp_path_factory.mktemp("tiny-bare-bert")
    BertModel.from_pretrained(mlm_model).save_pretrained(directory)
    AutoTokenizer.from_pretrained(mlm_model).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, str]:
    """A learnable sentiment set; 257 train rows so 2 workers get an uneven split."""
    return sentiment_splits(tmp_path_factory.mktemp("toy"), 257, 48, seed=0)


def run_dir(output_dir: Path) -> Path:
    """Where Ray Train stored the run an output_dir last started (default storage_path)."""
    return output_dir / "ray" / json.loads((output_dir / "run.json").read_text())["run_name"]


def base_config(model: str, data: dict[str, str], output_dir: Path, **sections) -> dict:
    """A small, fast run config; keyword arguments replace or extend its sections."""
    config = {
        "model": {"name_or_path": model},
        # The toy set is templated, so it repeats itself: deduplication (tested on its own
        # in test_pipeline) would change the row counts these runs are built around.
        "data": {
            "train": data["train"],
            "eval": data["eval"],
            "dedup": {"exact": False, "near": False, "remove_contaminated": False},
        },
        "output_dir": str(output_dir),
        "scaling": {"num_workers": 2},
        "deepspeed": {"stage": 2},
        "train": {"epochs": 3, "batch_size": 8, "lr": 2e-3, "log_every_steps": 20},
        # The frozen baseline is a second training run and forgetting a measurement at
        # every evaluation: each is asked for by the tests about it.
        "eval": {"baselines": ["majority"], "general_text": None},
    }
    for key, value in sections.items():  # one level deep: replaces keys within a section
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
