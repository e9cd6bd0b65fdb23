"""The memory planner: ZeRO formulas, activations, the recommendation ladder, parameter
counts from the meta device against real models, `rayft plan` and the pre-launch warning.
No Ray, no DeepSpeed engine: a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayft import plan
from rayft.cli import main
from rayft.config import ConfigError, validate_config
from rayft.plan import (
    GiB,
    ModelShape,
    Setting,
    activation_bytes,
    build_plan,
    candidates,
    estimate,
    layer_activation_bytes,
    model_shape,
    parse_size,
    recommend,
)
from tests.conftest import REPO

BILLION = 10**9
# A 1B-parameter decoder-like shape: 24 layers x 2048, 16 heads, 4x MLP, 32k vocabulary.
ONE_B = ModelShape(
    params=BILLION,
    trainable=BILLION,
    largest_module=65_536_000,
    hidden=2048,
    layers=24,
    heads=16,
    intermediate=8192,
    vocab=32_000,
)


def states(shape: ModelShape, stage: int, world: int, precision: str = "bf16") -> int:
    found = estimate(shape, Setting(stage), seq_len=128, precision=precision, world_size=world)
    return found.model_states


def test_model_states_follow_the_zero_paper():
    # Mixed precision Adam: 2 (params) + 2 (grads) + 12 (fp32 master, m, v) bytes each.
    assert states(ONE_B, stage=0, world=8) == 16 * BILLION
    assert states(ONE_B, stage=1, world=8) == (2 + 2 + 12 / 8) * BILLION
    assert states(ONE_B, stage=2, world=8) == (2 + (2 + 12) / 8) * BILLION
    assert states(ONE_B, stage=3, world=8) == 2 * BILLION
    # fp32: 4 + 4 + 8; DeepSpeed's ZeRO optimizers also clone an fp32 master partition.
    assert states(ONE_B, stage=0, world=1, precision="fp32") == 16 * BILLION
    assert states(ONE_B, stage=3, world=8, precision="fp32") == (4 + 4 + 12) / 8 * BILLION


def test_only_trainable_parameters_have_gradients_and_optimizer_states():
    lora = ModelShape(**{**ONE_B.__dict__, "trainable": 4_000_000})
    found = estimate(lora, Setting(0), seq_len=128, precision="bf16", world_size=1)
    assert found.params == 2 * BILLION
    assert found.grads == 2 * 4_000_000
    assert found.optimizer == 12 * 4_000_000


def test_offload_moves_states_to_host_memory():
    kwargs = {"seq_len": 128, "precision": "bf16", "world_size": 4}
    on_gpu = estimate(ONE_B, Setting(3), **kwargs)
    offloaded = estimate(ONE_B, Setting(3, offload_optimizer=True, offload_param=True), **kwargs)
    assert offloaded.params == offloaded.grads == offloaded.optimizer == 0
    assert offloaded.host == on_gpu.params + on_gpu.optimizer + BILLION * 4 // 4
    assert offloaded.activations == on_gpu.activations
    with pytest.raises(ValueError, match="invalid setting"):
        estimate(ONE_B, Setting(2, offload_param=True), **kwargs)


def test_activations_are_the_korthikanti_estimate_in_16_bit():
    # Eager attention keeps the scores; with dropout on CUDA (1-byte masks) and f = 4h a
    # layer keeps s*b*h*(34 + 5*a*s/h) bytes.
    shape = ModelShape(
        **{
            **ONE_B.__dict__,
            "attention": "eager",
            "hidden_dropout": True,
            "attention_dropout": True,
        }
    )
    s, b, h, a = 512, 4, 2048, 16
    layer = layer_activation_bytes(shape, batch=b, seq_len=s, precision="bf16", gpu=True)
    assert layer == s * b * h * (34 + 5 * a * s / h)
    # SDPA on CUDA recomputes the scores; fp32 doubles the 16-bit tensors.
    sdpa = ModelShape(**{**shape.__dict__, "attention": "sdpa"})
    assert layer_activation_bytes(sdpa, batch=b, seq_len=s, precision="bf16", gpu=True) == (
        s * b * h * 34
    )
    assert layer_activation_bytes(sdpa, batch=b, seq_len=s, precision="fp32", gpu=True) == (
        s * b * h * (2 * 34 - 2)  # the two 1-byte dropout masks do not double
    )


def test_checkpointing_keeps_layer_inputs_and_a_frozen_body_keeps_nothing():
    kwargs = {"batch": 8, "seq_len": 1024, "precision": "bf16", "gpu": True}
    full = activation_bytes(ONE_B, checkpointing=False, **kwargs)
    ckpt = activation_bytes(ONE_B, checkpointing=True, **kwargs)
    layer = layer_activation_bytes(ONE_B, **kwargs)
    sbh = 8 * 1024 * 2048
    assert full - ckpt == 24 * layer - (24 * 2 * sbh + layer)
    assert ckpt < full / 5
    head_only = ModelShape(**{**ONE_B.__dict__, "body_trains": False})
    assert activation_bytes(head_only, checkpointing=False, **kwargs) == layer


def test_a_model_too_big_at_stage_0_is_recommended_a_setting_that_fits():
    seven_b = ModelShape(**{**ONE_B.__dict__, "params": 7 * BILLION, "trainable": 7 * BILLION})
    current = Setting(0, batch_size=8, grad_accum=2)
    kwargs = {"seq_len": 1024, "precision": "bf16", "world_size": 2}
    budget = 80 * GiB
    assert estimate(seven_b, current, **kwargs).total > budget  # 112 GB of states alone
    found = recommend(seven_b, current, budget=budget, **kwargs)
    assert found is not None
    setting, found_estimate = found
    assert setting.stage >= 2 or setting.offload_optimizer
    assert found_estimate.total <= budget
    assert estimate(seven_b, setting, **kwargs) == found_estimate  # the recommendation fits
    # Preference: nothing more preferred in the ladder fits.
    ladder = candidates(current)
    for better in ladder[: ladder.index(setting)]:
        assert estimate(seven_b, better, **kwargs).total > budget


def test_preference_order_and_smaller_micro_batches_keep_the_effective_batch():
    current = Setting(1, batch_size=12, grad_accum=2)
    ladder = candidates(current)
    assert ladder[0] == current
    assert [s.stage for s in ladder[:3]] == [1, 2, 3]  # a higher stage first
    assert ladder[3] == Setting(1, gradient_checkpointing=True, batch_size=12, grad_accum=2)
    assert all(s.stage >= 1 for s in ladder)  # never below the configured stage
    assert all(s.valid for s in ladder)
    batches = [s.batch_size for s in ladder]
    assert batches == sorted(batches, reverse=True)
    assert {s.batch_size * s.grad_accum for s in ladder} == {24}
    assert sorted(set(batches), reverse=True) == [12, 6, 4, 3, 2, 1]
    # Activations too large for anything but a smaller micro-batch.
    long = ModelShape(**{**ONE_B.__dict__, "params": 10_000_000, "trainable": 10_000_000})
    kwargs = {"seq_len": 8192, "precision": "bf16", "world_size": 1}
    found = recommend(long, Setting(0, batch_size=16), budget=16 * GiB, **kwargs)
    assert found is not None and found[0].batch_size < 16
    assert found[0].gradient_checkpointing and found[0].batch_size * found[0].grad_accum == 16


def test_nothing_fits_says_so(tiny_model):
    cfg = validate_config(run_config(tiny_model, scaling={"num_workers": 1, "use_gpu": True}))
    result = build_plan(cfg, gpu_memory=100 * 2**20)  # below the CUDA overhead alone
    assert not result.fits and result.recommended is None
    assert "scaling.num_workers" in result.advice()


def run_config(model: str, **sections: dict) -> dict:
    config = {
        "model": {"name_or_path": model},
        "data": {"train": "unused.jsonl", "eval": "unused.jsonl"},
        "scaling": {"num_workers": 2},
        "train": {"batch_size": 8, "max_seq_len": 64},
    }
    return {**config, **sections}


@pytest.mark.parametrize("method", ["full", "lora", "frozen"])
def test_meta_device_counts_equal_the_real_models(tiny_model, method):
    from transformers import AutoModelForSequenceClassification

    from rayft import methods

    cfg = validate_config({**run_config(tiny_model), "method": method})
    shape = model_shape(cfg)
    real = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    real = methods.apply(real, ["classifier"], cfg, methods.phases(cfg)[0], "SEQ_CLS")
    trainable, total = methods.trainable_summary(real)
    assert (shape.params, shape.trainable) == (total, trainable)
    assert (shape.hidden, shape.layers, shape.heads, shape.intermediate) == (64, 2, 2, 128)
    assert shape.body_trains is (method != "frozen")
    if method == "lora":
        assert trainable < total / 5
    if method == "frozen":
        assert trainable == 64 * 2 + 2  # the classifier


def test_plan_command_prints_json_and_a_table(tiny_model, capsys):
    config = str(REPO / "configs" / "demo.yaml")
    overrides = [f"model.name_or_path={tiny_model}", "scaling.use_gpu=true"]
    assert main(["plan", "--config", config, *overrides, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "lora" and result["precision"] == "bf16"
    assert result["world_size"] == 2 and result["seq_len"] == 128
    assert result["current"]["fits"] is True
    assert result["memory_bytes"] == 80 * GiB
    current = result["current"]["estimate"]
    assert current["total"] == sum(
        current[k] for k in ("params", "grads", "optimizer", "buffers", "activations", "overhead")
    )
    assert result["shape"]["trainable"] < result["shape"]["params"]

    # Just too small for the current setting: ZeRO-3 keeps one reduce bucket, not two.
    budget = f"{current['total'] // 2**20 - 1}MiB"
    assert main(["plan", "--config", config, *overrides, "--gpu-memory", budget, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["current"]["fits"] is False
    assert result["recommended"]["overrides"] == ["deepspeed.stage=3"]
    assert result["recommended"]["estimate"]["total"] <= result["memory_bytes"]
    assert main(["plan", "--config", config, *overrides, "--gpu-memory", budget]) == 0
    table = capsys.readouterr().out
    assert "does NOT fit" in table and "recommended  ZeRO-3, micro-batch 16, accum 1" in table
    assert "recommendation: set deepspeed.stage=3" in table


def test_bad_gpu_memory_is_an_error_naming_the_flag(capsys):
    config = str(REPO / "configs" / "demo.yaml")
    with pytest.raises(SystemExit) as info:
        main(["plan", "--config", config, "--gpu-memory", "80"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--gpu-memory" in err and "80GiB" in err


def test_memory_sizes_take_units():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("81920MiB") == 80 * GiB
    assert parse_size("1.5 gib") == 3 * GiB // 2
    for bad in ("80", "eighty GiB", "80 GiX", "0GiB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_unreadable_model_is_a_config_error(tmp_path):
    cfg = validate_config(run_config(str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="model.name_or_path"):
        model_shape(cfg)


def test_warning_before_launch_only_for_gpu_runs_that_do_not_fit(tiny_model, monkeypatch):
    gpu = validate_config(run_config(tiny_model, scaling={"num_workers": 2, "use_gpu": True}))
    cpu = validate_config(run_config(tiny_model))
    monkeypatch.setattr(plan, "cuda_memory", lambda: None)
    assert plan.warn_if_unfit(gpu) is None  # GPU memory unknown: skipped
    monkeypatch.setattr(plan, "cuda_memory", lambda: 80 * GiB)
    assert plan.warn_if_unfit(gpu) is None  # fits
    assert plan.warn_if_unfit(cpu) is None  # CPU workers: nothing to check
    monkeypatch.setattr(plan, "cuda_memory", lambda: GiB)
    warning = plan.warn_if_unfit(gpu)
    assert warning is not None and "per GPU" in warning and "1.00 GiB" in warning


def test_docs_page_exists():
    text = (Path(REPO) / "docs" / "plan.md").read_text()
    assert "rayft plan" in text and "34 + 5as/h" in text


def test_optimizer_step_temporaries_count_when_larger_than_activations():
    kwargs = {"seq_len": 16, "precision": "bf16", "world_size": 4}
    found = estimate(ONE_B, Setting(2, batch_size=1), **kwargs)
    # ZeRO-2 flattens the bf16 gradient partition and converts it to fp32: 2 + 4 bytes.
    assert found.step == 6 * BILLION // 4 > found.activations
    assert found.total == found.model_states + found.buffers + found.step + found.overhead
    assert estimate(ONE_B, Setting(2, offload_optimizer=True), **kwargs).step == 0
    # CPU workers step with torch's unfused AdamW: two more fp32 temporaries.
    cpu = estimate(ONE_B, Setting(2), **{**kwargs, "precision": "fp32"}, gpu=False)
    assert cpu.step == (4 + 2 * 4) * BILLION // 4
