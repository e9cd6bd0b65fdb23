"""The config contract: schema, errors, overrides, shipped YAMLs, CLI and generated docs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayft.cli import main
from rayft.config import (
    DEFAULT_LR,
    ConfigError,
    in_process_note,
    load_config,
    parse_overrides,
    resolve_path,
    resolve_paths,
    single_worker_zero_note,
    sync_upload_note,
    validate_config,
    zero_stage,
)
from rayft.data.prepare import check_sources
from tests.conftest import REPO

MINIMAL = {"model": {"name_or_path": "m"}, "data": {"train": "a.jsonl", "eval": "b.jsonl"}}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.problems


def test_required_keys_exist_with_their_contract_names():
    cfg = validate_config(MINIMAL)
    for path in [
        "task",
        "model.name_or_path",
        "method",
        "data.train",
        "data.eval",
        "data.text_column",
        "data.label_column",
        "scaling.num_workers",
        "scaling.use_gpu",
        "deepspeed.stage",
        "deepspeed.offload_optimizer",
        "train.epochs",
        "train.lr",
        "train.batch_size",
        "train.grad_accum",
        "train.max_seq_len",
        "train.seed",
        "output_dir",
    ]:
        node = cfg
        for part in path.split("."):
            node = getattr(node, part)
    assert cfg.task == "sequence_classification"


def test_every_problem_is_reported_at_once_with_field_paths_and_hints():
    problems = problems_of(
        {
            **MINIMAL,
            "deepspeed": {"stage": 5},
            "train": {"lr": "fast", "epochs": 2},
            "data": {**MINIMAL["data"], "txt_column": "review"},
        }
    )
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "deepspeed.stage: Value error, should be 0, 1, 2, 3 or auto, got 5" in joined
    assert "train.lr: Input should be a valid number" in joined and "'fast'" in joined
    assert "data.txt_column: unknown key; did you mean 'text_column'?" in joined


def test_unknown_top_level_key_and_wrong_literal():
    problems = problems_of({**MINIMAL, "methd": "lora", "task": "translation"})
    assert any(p.startswith("methd: unknown key; did you mean 'method'?") for p in problems)
    assert any(p.startswith("task: Input should be") and "'translation'" in p for p in problems)


def test_cross_field_rules_name_the_fix():
    problems = problems_of(
        {
            **MINIMAL,
            "deepspeed": {
                "stage": 2,
                "offload_param": True,
                "precision": "bf16",
                "overrides": {"zero_optimization": {"stage": 3}},
            },
            "model": {"name_or_path": "m", "trust_remote_code": True},
        }
    )
    assert any("deepspeed.offload_param needs deepspeed.stage=3" in p for p in problems)
    assert any(
        p.startswith("deepspeed.overrides.zero_optimization.stage: set deepspeed.stage instead")
        for p in problems
    )
    assert any("deepspeed.precision=bf16 needs scaling.use_gpu=true" in p for p in problems)
    assert any("model.revision" in p for p in problems)


@pytest.mark.parametrize(
    "workers, deepspeed, stage, on_three",
    [
        (1, {}, 0, 2),  # alone, ZeRO partitions nothing: stage 0
        (2, {}, 2, 2),
        (1, {"offload_optimizer": True}, 2, 2),  # offload needs a ZeRO optimizer
        (1, {"offload_param": True}, 3, 3),
        (1, {"stage": 2}, 2, 2),  # an explicit stage is kept, with a note before launch
        (4, {"stage": 0}, 0, 0),
    ],
)
def test_auto_zero_stage_is_0_for_one_worker_and_2_for_several(workers, deepspeed, stage, on_three):
    cfg = validate_config({**MINIMAL, "scaling": {"num_workers": workers}, "deepspeed": deepspeed})
    assert zero_stage(cfg) == stage
    note = single_worker_zero_note(cfg)
    if workers == 1 and deepspeed == {"stage": 2}:
        assert "deepspeed.stage=2 with one worker partitions nothing" in note
        assert "deepspeed.stage=auto runs stage 0" in note
    else:
        assert note is None
    # A world size given outright (a 1-rank engine in a test or benchmark) decides too.
    assert zero_stage(cfg, world_size=3) == on_three


@pytest.mark.parametrize(
    "storage, upload, noted",
    [
        ("s3://bucket/runs", "sync", True),  # every worker stops for each upload
        ("gs://bucket/runs", "async", False),
        ("/mnt/shared/runs", "sync", False),  # a local or shared path copies quickly
        ("file:///mnt/shared/runs", "sync", False),
        (None, "sync", False),  # <output_dir>/ray
    ],
)
def test_remote_storage_with_sync_uploads_is_noted_before_launch(storage, upload, noted):
    cfg = validate_config({**MINIMAL, "storage_path": storage, "checkpoint": {"upload": upload}})
    note = sync_upload_note(cfg)
    if noted:
        assert f"storage_path {storage} is remote and checkpoint.upload is sync" in note
        assert "checkpoint.upload=async" in note
    else:
        assert note is None


@pytest.mark.parametrize(
    "scaling, problem",
    [
        ({"num_workers": 1}, None),  # one worker in this process
        ({"num_workers": 1, "cpus_per_worker": 2, "use_gpu": True}, None),
        ({"num_workers": 2}, "scaling.in_process trains one worker in this process "
                             "(got scaling.num_workers=2): set scaling.num_workers=1"),
        ({"num_workers": 1, "max_failures": 1}, "scaling.max_failures=1 restarts a worker "
                                                "group, and scaling.in_process has none"),
    ],
)  # fmt: skip
def test_in_process_is_one_worker_without_restarts(scaling, problem):
    from rayft.tune import check_search_space

    raw = {**MINIMAL, "scaling": {**scaling, "in_process": True}}
    # Before a run of one worker that could, `rayft train` says so.
    note = in_process_note(validate_config({**MINIMAL, "scaling": scaling}))
    if problem is None:
        assert "scaling.in_process=true trains it in this process" in note
    else:  # several workers, or restarts asked for: not said
        assert note is None, note
    if problem is None:
        cfg = validate_config(raw)
        assert cfg.scaling.in_process
        # A search runs each trial as a worker group; said before any trial starts.
        cfg = validate_config({**raw, "tune": {"search_space": {"train.lr": {"grid": [1e-3]}}}})
        with pytest.raises(ConfigError, match="scaling.in_process: a search runs every trial"):
            check_search_space(cfg)
    else:
        assert any(p.startswith(problem) for p in problems_of(raw)), problems_of(raw)


def test_missing_required_keys_are_named():
    problems = problems_of({"data": {"eval": "x"}})
    assert "model: required key is missing" in problems
    assert any(p.startswith("data.train: required key is missing") for p in problems)


def test_method_default_learning_rates_are_resolved():
    for method, lr in DEFAULT_LR.items():
        assert validate_config({**MINIMAL, "method": method}).train.lr == lr
    assert validate_config({**MINIMAL, "train": {"lr": 1e-4}}).train.lr == 1e-4


def test_overrides_are_parsed_as_yaml_and_merged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {"epochs": 2}}))
    cfg = load_config(path, ["train.lr=1e-4", "method=lora", "data.labels=[neg, pos]"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2
    assert cfg.method == "lora" and cfg.data.labels == ["neg", "pos"]
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="deepspeed.stage: Value error, should be 0, 1, 2, 3"):
        load_config(path, ["deepspeed.stage=7"])


def test_paths_are_resolved_for_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    cfg = resolve_paths(
        validate_config(
            {
                "model": {"name_or_path": "local-model"},
                "data": {"train": "t.jsonl", "eval": "e.jsonl"},
            }
        )
    )
    assert cfg.model.name_or_path == str(tmp_path / "local-model")
    assert cfg.data.train == str(tmp_path / "t.jsonl")
    assert cfg.storage_path == str(tmp_path / "runs/default/ray")
    assert resolve_path("bert-base-uncased", may_be_hub_id=True) == "bert-base-uncased"
    assert resolve_path("pkg:rayft/resources/reviews/train.jsonl").endswith(
        "rayft/resources/reviews/train.jsonl"
    )
    with pytest.raises(ConfigError, match="not installed"):
        resolve_path("pkg:no_such_package_xyz/model")


SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates(path):
    cfg = resolve_paths(load_config(path))
    local = [cfg.data.train] if isinstance(cfg.data.train, str) else cfg.data.train
    if all(Path(p).exists() for p in local):  # data outside the repo may be absent
        check_sources(cfg)


def test_validate_command_reports_ok_and_errors(capsys, tmp_path):
    demo = str(REPO / "configs/demo.yaml")
    assert main(["validate", "--config", demo]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "2 worker(s), ZeRO stage 2" in out and "NOTE" not in out
    # The local mode: one worker runs stage 0 under `auto`; an explicit 2 gets a note.
    assert main(["validate", "--config", demo, "scaling.num_workers=1"]) == 0
    assert "1 worker(s), ZeRO stage 0" in capsys.readouterr().out
    assert main(["validate", "--config", demo, "scaling.num_workers=1", "deepspeed.stage=2"]) == 0
    assert "NOTE: deepspeed.stage=2 with one worker partitions nothing" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "deepspeed": {"stage": 5}}))
    assert main(["validate", "--config", str(bad)]) == 2
    assert "deepspeed.stage: Value error, should be 0, 1, 2, 3 or auto" in capsys.readouterr().err


def test_module_entry_point_fails_fast_before_ray(tmp_path):
    """`python -m rayft.train` with a bad config exits 2 with the message, starting nothing."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "train": {"epochs": "many"}}))
    run = subprocess.run(
        [sys.executable, "-m", "rayft.train", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "train.epochs: Input should be a valid integer" in run.stderr
    assert "Started a local Ray instance" not in run.stderr + run.stdout


def test_configuration_reference_is_generated_from_the_schema():
    from rayft.docs import config_reference

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == config_reference(), "run `make docs` to regenerate"
    assert "`deepspeed.stage`" in committed and "ZeRO stage" in committed


def test_performance_page_lists_every_timed_section():
    from rayft.timing import SECTIONS

    page = (REPO / "docs" / "performance.md").read_text()
    for name, what in SECTIONS.items():
        assert f"| `{name}` | {what} |" in page, f"docs/performance.md: add or update `{name}`"


def test_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.grad_accum" in out and "Micro-batches accumulated" in out
